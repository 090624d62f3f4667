"""`session-audit` command line: run, serve, migrate, seed, token create|list|revoke,
rollups rebuild, retention purge, trail verify."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import logging
import os
import shlex
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import click

from session_audit import envoy, seed, server
from session_audit.analytics import rollups
from session_audit.core import auth, db, logs, migrate, trail
from session_audit.core.config import Config, ConfigError
from session_audit.embedded import EmbeddedPostgres
from session_audit.retention import purge
from session_audit.retention.config import RetentionConfig

DEMO_SESSIONS = 3000


def _config() -> Config:
    try:
        return Config.from_environ()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


@contextlib.contextmanager
def database(config: Config, *, keep_running: bool = True) -> Iterator[str]:
    """DATABASE_URL if set, else the embedded cluster in the data folder (left running for the
    next command, and said so)."""
    if config.database_url:
        yield config.database_url
        return
    embedded = EmbeddedPostgres(config.data_dir)
    dsn = embedded.start()
    try:
        yield dsn
    finally:
        if not keep_running:
            embedded.stop()
        else:
            click.echo(
                f"note: the embedded PostgreSQL in {config.data_dir} stays running for the next "
                "command (`make run` and `serve` reuse it)",
                err=True,
            )


async def _migrate(dsn: str) -> list[str]:
    conn = await db.connect(dsn)
    try:
        return await migrate.migrate(conn)
    except migrate.EditedMigration as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        await conn.close()


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def main(verbose: bool) -> None:
    """Session Audit Service: the system of record for privileged sessions."""
    try:
        logs.configure(logging.INFO if verbose else logging.WARNING)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@main.command("migrate")
def migrate_cmd() -> None:
    """Apply pending schema migrations."""
    with database(_config()) as dsn:
        applied = asyncio.run(_migrate(dsn))
    click.echo(
        f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else "")
    )


@main.command("seed")
@click.option(
    "--sessions", "count", default=DEMO_SESSIONS, show_default=True, type=click.IntRange(1)
)
@click.option("--if-empty", is_flag=True, help="Do nothing when sessions already exist.")
def seed_cmd(count: int, if_empty: bool) -> None:
    """Load demo orgs and sessions (with a progress bar)."""

    async def go(dsn: str) -> None:
        await _migrate(dsn)
        conn = await db.connect(dsn, json_codec=False)
        try:
            if if_empty and not await seed.is_empty(conn):
                click.echo("sessions already present; nothing seeded", err=True)
                return
            result = await seed.seed(conn, count)
            click.echo(f"seeded {result.written} sessions ({result.rejected} rejected)", err=True)
            # Say why: the reasons, most frequent first (each names the field).
            reasons = Counter(reason for _, _, reason in result.rejections)
            for reason, n in reasons.most_common(5):
                click.echo(f"  {n} rejected: {reason}", err=True)
        finally:
            await conn.close()

    with database(_config()) as dsn:
        asyncio.run(go(dsn))


@main.command("serve")
@click.option(
    "--workers", type=click.IntRange(1, 64), default=None, help="Processes (SO_REUSEPORT)."
)
def serve_cmd(workers: int | None) -> None:
    """Run the gRPC server (GRPC_PORT on 127.0.0.1) until SIGTERM."""
    config = _config()
    if workers is not None:
        config = replace(config, workers=workers)
    logging.getLogger().setLevel(logging.INFO)
    with database(config) as dsn:
        asyncio.run(_migrate(dsn))
        server.serve_workers(config, dsn)


@main.group()
def token() -> None:
    """Manage API tokens."""


@token.command("create")
@click.option("--org", required=True, help="Org name (must exist unless --create-org).")
@click.option("--role", required=True, type=click.Choice(auth.ROLES))
@click.option(
    "--email", required=True, help="Who the token is for; `user` tokens see this e-mail's sessions."
)
@click.option(
    "--create-org", is_flag=True, help="Create the org if it does not exist (else refused)."
)
def token_create(org: str, role: str, email: str, create_org: bool) -> None:
    """Create a token and print only the token on stdout."""

    async def go(dsn: str) -> str:
        await _migrate(dsn)
        conn = await db.connect(dsn)
        try:
            return await auth.create_token(conn, org, role, email, create_org=create_org)
        finally:
            await conn.close()

    with database(_config()) as dsn:
        try:
            click.echo(asyncio.run(go(dsn)))
        except auth.UnknownOrg as exc:
            raise click.UsageError(_unknown_org(exc)) from None
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None


def _unknown_org(exc: auth.UnknownOrg, shown: int = 10) -> str:
    """What `token create` says about an org that does not exist: the close names, how many
    orgs there are (the first few by name), and the flag that creates a new one."""
    close = difflib.get_close_matches(exc.name, exc.known, n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    n = len(exc.known)
    if n == 0:
        known = "there are no orgs yet"
    else:
        names = ", ".join(exc.known[:shown]) + (f", … ({n - shown} more)" if n > shown else "")
        known = f"{n} org{'s' if n != 1 else ''} exist{'s' if n == 1 else ''}: {names}"
    return (
        f"{exc}{hint}; {known}. Pass --create-org to create {exc.name!r} as a new org "
        "(`session-audit token list` shows each token's org)."
    )


@token.command("list")
def token_list() -> None:
    """List tokens (never the secrets)."""

    async def go(dsn: str) -> list[auth.TokenInfo]:
        conn = await db.connect(dsn)
        try:
            return await auth.list_tokens(conn)
        finally:
            await conn.close()

    with database(_config()) as dsn:
        rows = asyncio.run(go(dsn))
    click.echo(f"{'ID':>5}  {'PREFIX':<12} {'ORG':<12} {'ROLE':<8} {'EMAIL':<32} STATUS")
    for t in rows:
        status = f"revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "active"
        click.echo(f"{t.id:>5}  {t.prefix:<12} {t.org:<12} {t.role:<8} {t.email:<32} {status}")


@token.command("revoke")
@click.argument("ident")
def token_revoke(ident: str) -> None:
    """Revoke a token by id or prefix; it stops working at once."""

    async def go(dsn: str) -> int:
        conn = await db.connect(dsn)
        try:
            return await auth.revoke_token(conn, ident)
        finally:
            await conn.close()

    with database(_config()) as dsn:
        n = asyncio.run(go(dsn))
    if n == 0:
        raise click.ClickException(
            f"no active token with id or prefix {ident!r}: give the numeric ID or the exact "
            "10-character PREFIX that `session-audit token list` shows"
        )
    click.echo(f"revoked {n} token(s)")


@main.group("rollups")
def rollups_group() -> None:
    """Maintain the aggregation rollups."""


@rollups_group.command("rebuild")
@click.option("--org", "org_name", default=None, help="Only this org (by name); default: all.")
def rollups_rebuild(org_name: str | None) -> None:
    """Recompute the rollups from the sessions table (after a backfill with maintenance off).

    Holds off ingest while it runs; reads continue on the old rollups until it commits."""

    async def go(dsn: str) -> str:
        await _migrate(dsn)
        conn = await db.connect(dsn)
        try:
            org_id = None
            if org_name is not None:
                org_id = await conn.fetchval("SELECT id FROM orgs WHERE name = $1", org_name)
                if org_id is None:
                    raise click.ClickException(f"no org named {org_name!r}")
            await rollups.rebuild(conn, org_id)
            return org_name or "every org"
        finally:
            await conn.close()

    with database(_config()) as dsn:
        which = asyncio.run(go(dsn))
    click.echo(f"rebuilt the rollups of {which}")


async def _org_ids(conn: db.Conn, org_name: str | None) -> list[tuple[str, uuid.UUID]]:
    if org_name is None:
        rows = await conn.fetch(
            "SELECT o.name, o.id FROM orgs o JOIN retention_policies p ON p.org_id = o.id"
            " WHERE p.days IS NOT NULL ORDER BY o.name"
        )
        return [(r["name"], r["id"]) for r in rows]
    org_id = await conn.fetchval("SELECT id FROM orgs WHERE name = $1", org_name)
    if org_id is None:
        raise click.ClickException(f"no org named {org_name!r}")
    return [(org_name, org_id)]


@main.group("retention")
def retention_group() -> None:
    """Retention: purge what the orgs' policies no longer keep."""


@retention_group.command("purge")
@click.option("--org", "org_name", default=None, help="Only this org (by name); default: all.")
def retention_purge(org_name: str | None) -> None:
    """Purge now (whether due or not) and print what was deleted."""
    settings = RetentionConfig.from_environ()

    async def go(dsn: str) -> list[str]:
        await _migrate(dsn)
        pool = await db.create_pool(dsn, 1, 2)
        try:
            async with pool.acquire() as conn:
                orgs = await _org_ids(conn, org_name)
            lines = []
            for name, org_id in orgs:
                r = await purge.purge_org(
                    pool, org_id, datetime.now(UTC), interval=settings.interval,
                    batch=settings.batch, timeout=600.0, claim=False,
                    hold_window=settings.hold_window,
                )  # fmt: skip
                if r is None:
                    lines.append(f"{name}: no retention policy (keeps everything)")
                else:
                    lines.append(
                        f"{name}: deleted {r.sessions} session(s) and {r.reports} report(s)"
                        f" older than {r.days} day(s) (before {r.before.isoformat()})"
                        + (
                            "; sessions postponed: a legal hold is still locking what it matches"
                            if r.postponed
                            else ""
                        )
                    )
            return lines
        finally:
            await pool.close()

    with database(_config()) as dsn:
        for line in asyncio.run(go(dsn)):
            click.echo(line)


@main.group("trail")
def trail_group() -> None:
    """The orgs' tamper-evident trails."""


@trail_group.command("init")
def trail_init() -> None:
    """Start the trail of every org that has none yet (after upgrading a large database: the
    genesis entry digests each existing session, which a first ingest should not have to do)."""

    async def go(dsn: str) -> list[str]:
        await _migrate(dsn)
        conn = await db.connect(dsn)
        try:
            # Two plain reads (Citus plans no correlated subquery over the reference table).
            started = {r["org_id"] for r in await conn.fetch("SELECT org_id FROM trail_heads")}
            orgs = await conn.fetch("SELECT id, name FROM orgs ORDER BY name")
            out = []
            for org in (o for o in orgs if o["id"] not in started):
                async with conn.transaction():
                    head = await trail.lock_head(conn, org["id"], 86_400.0)
                out.append(f"{org['name']}: trail started (head {head.hash.hex()[:16]}…)")
            return out
        finally:
            await conn.close()

    with database(_config()) as dsn:
        lines = asyncio.run(go(dsn))
    for line in lines:
        click.echo(line)
    click.echo(f"{len(lines)} org(s) started")


@trail_group.command("verify")
@click.option("--org", "org_name", required=True, help="The org (by name).")
def trail_verify(org_name: str) -> None:
    """Recompute the org's hash chain and its live sessions' digests; exit 1 when not intact."""

    async def go(dsn: str) -> trail.Verdict:
        await _migrate(dsn)
        conn = await db.connect(dsn)
        try:
            [(_, org_id)] = await _org_ids(conn, org_name)
            return await trail.verify(conn, org_id, 3600.0)
        finally:
            await conn.close()

    with database(_config()) as dsn:
        verdict = asyncio.run(go(dsn))
    click.echo(json.dumps(verdict.to_json()))
    if not verdict.ok:
        sys.exit(1)


@main.command("run")
def run_cmd() -> None:
    """Everything: database, migrations, demo data, gRPC server and Envoy. Ctrl-C stops all."""
    config = _config()
    logging.getLogger("session_audit").setLevel(logging.INFO)
    embedded = None if config.database_url else EmbeddedPostgres(config.data_dir)
    dsn = config.database_url or (embedded.start() if embedded else "")
    proxy = None
    try:

        async def prepare() -> tuple[str, str]:
            await _migrate(dsn)
            conn = await db.connect(dsn, json_codec=False)
            try:
                if await seed.is_empty(conn):
                    click.echo(f"loading {DEMO_SESSIONS} demo sessions…", err=True)
                    await seed.seed(conn, DEMO_SESSIONS)
                org = await seed.showcase_org(conn)
                return org, await banner_token(conn, org, config.data_dir / BANNER_TOKEN_FILE)
            finally:
                await conn.close()

        org, admin = asyncio.run(prepare())

        admin_socket = envoy.admin_socket(config.data_dir, config.http_port)
        grace = config.shutdown_grace

        def ready(grpc_port: int) -> None:
            nonlocal proxy
            proxy = envoy.start(
                config.http_port, grpc_port, config.data_dir,
                metrics_port=config.envoy_metrics_port, drain_time=max(1, int(grace)),
            )  # fmt: skip
            _print_banner(config, grpc_port, org, admin)

        stop_began = 0.0

        def stopping() -> None:
            # Health is NOT_SERVING already; Envoy asks its clients to go elsewhere.
            nonlocal stop_began
            stop_began = time.monotonic()
            if proxy is not None:
                envoy.drain(admin_socket)

        # WORKERS processes share GRPC_PORT (SO_REUSEPORT); Envoy starts once all listen.
        server.serve_workers(config, dsn, on_ready=ready, on_stopping=stopping)
        # Envoy may still be sending what the server produced (a slow client's download):
        # it gets what is left of the grace period (at least a second).
        if proxy is not None:
            left = grace - (time.monotonic() - stop_began) if stop_began else 1.0
            envoy.wait_idle(admin_socket, max(1.0, left))
    finally:
        if proxy is not None:
            envoy.stop(proxy)
        if embedded is not None:
            embedded.stop()
        click.echo("stopped.", err=True)


BANNER_TOKEN_FILE = "banner-token"  # noqa: S105 - a file name


def _saved_token(path: Path) -> str | None:
    return path.read_text().strip() if path.exists() else None


def _save_token(path: Path, token: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")


async def banner_token(conn: asyncpg.Connection, org: str, path: Path) -> str:
    """The admin token `run` prints: the one saved in the data folder (mode 0600) while it is
    valid, else a new one saved there. Each `make run` no longer mints another admin token;
    revoking it (`session-audit token revoke <prefix>`) makes the next run mint a fresh one."""
    token = _saved_token(path)
    if token and await conn.fetchval(auth.LOOKUP, auth.hash_token(token)) is not None:
        return token
    token = await auth.create_token(conn, org, "admin", f"admin@{org}.example")
    _save_token(path, token)
    return token


def _data_env(config: Config) -> str:
    """The variables a second command needs to reach this server's database."""
    if config.database_url:
        return 'DATABASE_URL="$DATABASE_URL" '
    if os.environ.get("SESSION_AUDIT_DATA_DIR"):
        return f"SESSION_AUDIT_DATA_DIR={shlex.quote(str(config.data_dir))} "
    return ""


def _metrics_line(config: Config) -> str:
    urls = []
    if config.metrics_port:
        urls.append(f"http://127.0.0.1:{config.metrics_port}/metrics")
    if config.envoy_metrics_port:
        urls.append(f"http://127.0.0.1:{config.envoy_metrics_port}/stats/prometheus")
    return f"  metrics {'  '.join(urls)}\n" if urls else ""


def _print_banner(config: Config, grpc_port: int, org: str, admin: str) -> None:
    http = f"http://127.0.0.1:{config.http_port}"
    today = datetime.now(UTC).date()
    month_ago, tomorrow = today - timedelta(days=30), today + timedelta(days=1)
    grpcurl = Path(sys.executable).parent / "grpcurl"
    cli = Path(sys.executable).parent / "session-audit"
    click.echo(
        f"""
Session Audit Service is up.
  gRPC   127.0.0.1:{grpc_port}   (reflection on)
  REST   {http}   (Envoy)
  data   {config.database_url or config.data_dir}
{_metrics_line(config)}
Admin token for org '{org}':
  export TOKEN={admin}

Try:
  curl -s -H "authorization: Bearer $TOKEN" '{http}/api/sessions?limit=2'
  curl -s -H "authorization: Bearer $TOKEN" \\
      '{http}/api/sessions?type=database&review.status=APPROVED&limit=5'
  curl -s -H "authorization: Bearer $TOKEN" \\
      '{http}/api/reports/sessions?start_date={month_ago}&end_date={tomorrow}&group_by=connection'
  curl -s -H "authorization: Bearer $TOKEN" \\
      '{http}/api/audit/sessions/histogram?field=protocol&bin-size=day&size=3&start={month_ago}'
  curl -s -H "authorization: Bearer $TOKEN" \\
      '{http}/api/audit/sessions/stats?field=protocol&sub_fields=connection&size=5'
  {grpcurl} -plaintext 127.0.0.1:{grpc_port} list
  {grpcurl} -plaintext -H "authorization: Bearer $TOKEN" -d '{{"limit": 2}}' \\
      127.0.0.1:{grpc_port} session_audit.v1.SessionService/ListSessions

Reports (API v2): list definitions, generate a report, wait until ready, download it:
  curl -s -H "authorization: Bearer $TOKEN" '{http}/api/v2/report/defined?limit=3'
  ID=$(curl -s -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' \\
      -d '{{"criteria":[{{"field":"protocol","value":"ssh"}}]}}' '{http}/api/v2/report' \\
      | sed -E 's/.*"id":"([0-9]+)".*/\\1/')
  until curl -s -H "authorization: Bearer $TOKEN" "{http}/api/v2/report/$ID" \\
      | grep -q '"status":"ready"'; do sleep 1; done
  curl -s -OJ -H "authorization: Bearer $TOKEN" "{http}/api/v2/report/$ID/html"

More tokens: {_data_env(config)}{cli} token create --org {shlex.quote(org)} \\
    --role auditor --email {shlex.quote(f"you@{org}.example")}
Ctrl-C stops everything.
""",
        err=False,
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
