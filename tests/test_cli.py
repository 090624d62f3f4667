"""The command line against the test database: tokens are scriptable and revocable."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.support import Stack


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": stack.dsn}
    return subprocess.run(
        [sys.executable, "-m", "session_audit.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_token_create_prints_only_the_token_and_revoke_stops_it(stack: Stack) -> None:
    org = stack.new_org("cli")
    created = cli(stack, "token", "create", "--org", org, "--role", "auditor",
                  "--email", "Dana@Cli.example", "--create-org")  # fmt: skip
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert created.stdout == token + "\n"
    assert re.fullmatch(r"sat_[A-Za-z0-9_-]{43}", token)
    assert stack.rest("GET", "/api/sessions", token).status_code == 200

    # The secret is stored hashed only.
    assert not stack.sql("SELECT 1 FROM api_tokens WHERE token_hash::text LIKE $1", f"%{token}%")

    listed = cli(stack, "token", "list")
    assert listed.returncode == 0
    line = next(row for row in listed.stdout.splitlines() if org in row)
    assert token not in listed.stdout
    assert "auditor" in line and "active" in line

    revoked = cli(stack, "token", "revoke", token[:10])
    assert revoked.returncode == 0, revoked.stderr
    assert stack.rest("GET", "/api/sessions", token).status_code == 401
    again = cli(stack, "token", "revoke", token[:10])
    assert again.returncode != 0 and "no active token" in again.stderr


def test_token_create_rejects_bad_role_and_email(stack: Stack) -> None:
    bad_role = cli(stack, "token", "create", "--org", "x", "--role", "root", "--email", "a@b.c")
    assert bad_role.returncode == 2 and "role" in bad_role.stderr.lower()
    assert bad_role.stdout == ""
    bad_email = cli(stack, "token", "create", "--org", "x", "--role", "user", "--email", "nobody")
    assert bad_email.returncode == 2 and "email" in bad_email.stderr
    assert bad_email.stdout == ""


def test_token_create_refuses_an_unknown_org_unless_asked_to_create_it(stack: Stack) -> None:
    """A typo in --org must not mint a token for a new, empty org: it is refused, naming the
    close match and how many orgs exist; --create-org creates it; an existing org needs no
    flag."""
    org = stack.new_org("typo")
    first = cli(stack, "token", "create", "--org", org, "--role", "admin", "--email",
                "a@typo.example", "--create-org")  # fmt: skip
    assert first.returncode == 0, first.stderr
    n_orgs = stack.sql("SELECT count(*) FROM orgs")[0][0]
    typo = org[:-1] + ("x" if org[-1] != "x" else "y")
    refused = cli(stack, "token", "create", "--org", typo, "--role", "admin", "--email",
                  "a@typo.example")  # fmt: skip
    assert refused.returncode == 2 and refused.stdout == ""
    message = " ".join(refused.stderr.split())
    assert f"no org named '{typo}'" in message
    assert f"did you mean '{org}'" in message
    assert f"{n_orgs} orgs exist" in message
    assert "--create-org" in message
    assert stack.sql("SELECT count(*) FROM orgs WHERE name = $1", typo)[0][0] == 0
    assert stack.sql("SELECT count(*) FROM orgs")[0][0] == n_orgs

    again = cli(stack, "token", "create", "--org", org, "--role", "auditor", "--email",
                "b@typo.example")  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert stack.rest("GET", "/api/sessions", again.stdout.strip()).status_code == 200
