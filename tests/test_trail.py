"""The tamper-evident trail (issue 15): one entry per ingest batch and per change, a chain an
auditor can recompute from the download alone, and verify naming the right entry when a row
or an entry is changed, deleted or added directly in PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import uuid
from asyncio import sleep as asyncio_sleep
from datetime import UTC, datetime, timedelta
from typing import Any

from session_audit.core.db import connect as db_connect
from tests.factories import Spec
from tests.support import Stack, run
from tests.test_retention import ok, org_id, protos

NOW = datetime.now(UTC).replace(microsecond=0)


def lines(stack: Stack, token: str) -> list[dict[str, Any]]:
    r = stack.rest("GET", "/api/audit/trail", token)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(x) for x in r.text.splitlines()]


def recompute(org: uuid.UUID, entries: list[dict[str, Any]]) -> str:
    """The chain from the download alone, per docs/retention.md (no service code)."""
    prev = bytes(32)
    for e in entries:
        assert e["prev"] == prev.hex()
        body = json.dumps(
            [str(org), e["seq"], e["at"], e["actor"], e["kind"], e["object_type"],
             e["object_ids"], e["items"], e["digest"]],
            sort_keys=True, separators=(",", ":"),
        ).encode()  # fmt: skip
        prev = hashlib.sha256(prev + body).digest()
        assert e["hash"] == prev.hex()
    return prev.hex()


def verify(stack: Stack, token: str) -> dict[str, Any]:
    return ok(stack.rest("GET", "/api/audit/trail/verify", token))


def test_every_change_extends_the_chain_and_the_download_recomputes(stack: Stack) -> None:
    org = stack.new_org("trail")
    admin, auditor = stack.token(org, "admin"), stack.token(org, "auditor")
    oid = org_id(stack, org)
    batches = [[Spec(start=NOW - timedelta(hours=h)) for _ in range(4)] for h in (1, 2, 3)]
    for b in batches:
        stack.ingest(admin, protos(b))
    ok(stack.rest("PUT", f"/api/sessions/{batches[0][0].id}/retention_lock", auditor,
                  json={"locked": True}))  # fmt: skip
    ok(stack.rest("PUT", "/api/retention", admin, json={"days": 3650}))
    got = lines(stack, auditor)
    *entries, tail = got
    # genesis (the org had nothing yet), three batches (one entry each), the lock, the policy
    assert [(e["kind"], e["object_type"], e["items"]) for e in entries] == [
        ("genesis", "sessions", 0), ("ingest", "sessions", 4), ("ingest", "sessions", 4),
        ("ingest", "sessions", 4), ("lock", "sessions", 1), ("update", "retention_policy", 0),
    ]  # fmt: skip
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5, 6]
    assert entries[1]["actor"] == f"admin@{org}.example"
    assert entries[4]["actor"] == f"auditor@{org}.example"
    head = recompute(oid, entries)
    assert tail == {"head": head, "entries": 6}
    assert verify(stack, auditor) == {"ok": True, "entries": 6, "head": head}
    # Re-sending a batch changes nothing stored but is still an entry (and still verifies).
    stack.ingest(admin, protos(batches[1]))
    v = verify(stack, admin)
    assert v["ok"] is True and v["entries"] == 7
    user = stack.token(org, "user")
    assert stack.rest("GET", "/api/audit/trail/verify", user).status_code == 403
    assert stack.rest("GET", "/api/audit/trail", user).status_code == 403


def fault(stack: Stack, token: str) -> dict[str, Any]:
    v = verify(stack, token)
    assert v["ok"] is False, v
    first_bad: dict[str, Any] = v["first_bad"]
    return first_bad


def test_direct_changes_in_postgresql_are_reported_at_the_right_entry(stack: Stack) -> None:
    org = stack.new_org("trail")
    admin = stack.token(org, "admin")
    oid = org_id(stack, org)
    b1 = [Spec(start=NOW - timedelta(days=2)) for _ in range(3)]
    b2 = [Spec(start=NOW - timedelta(days=1)) for _ in range(3)]
    stack.ingest(admin, protos(b1))  # seq 1 genesis, 2 this batch
    stack.ingest(admin, protos(b2))  # seq 3
    ok(stack.rest("PUT", f"/api/sessions/{b1[1].id}/retention_lock", admin,
                  json={"locked": True}))  # seq 4  # fmt: skip
    assert verify(stack, admin)["ok"] is True

    # An UPDATE bypassing the service: reported at the last entry that covered the row.
    stack.sql("UPDATE sessions SET user_email = 'mallory@x.example' WHERE org_id = $1 AND id = $2",
              oid, uuid.UUID(b2[2].id))  # fmt: skip
    bad = fault(stack, admin)
    assert (bad["seq"], bad["object_id"]) == (3, b2[2].id)
    assert "changed outside the service" in bad["reason"]
    # The same for the lock column (an unlock bypassing the API), at the lock's entry.
    stack.sql("UPDATE sessions SET retention_locked = false WHERE org_id = $1 AND id = $2",
              oid, uuid.UUID(b1[1].id))  # fmt: skip
    assert (fault(stack, admin)["seq"], fault(stack, admin)["object_id"]) == (3, b2[2].id)
    stack.sql("UPDATE sessions SET user_email = $3 WHERE org_id = $1 AND id = $2",
              oid, uuid.UUID(b2[2].id), b2[2].email)  # put back  # fmt: skip
    bad = fault(stack, admin)
    assert (bad["seq"], bad["object_id"]) == (4, b1[1].id)
    stack.sql("UPDATE sessions SET retention_locked = true WHERE org_id = $1 AND id = $2",
              oid, uuid.UUID(b1[1].id))  # fmt: skip
    assert verify(stack, admin)["ok"] is True

    # A DELETE bypassing the service (and the purge's entry).
    stack.sql("DELETE FROM sessions WHERE org_id = $1 AND id = $2", oid, uuid.UUID(b1[0].id))
    bad = fault(stack, admin)
    assert (bad["seq"], bad["object_id"]) == (2, b1[0].id)
    assert "deleted outside the service" in bad["reason"]


def test_a_direct_insert_and_edited_entries_are_reported(stack: Stack) -> None:
    org = stack.new_org("trail")
    admin = stack.token(org, "admin")
    oid = org_id(stack, org)
    for h in (1, 2, 3):
        stack.ingest(admin, protos([Spec(start=NOW - timedelta(hours=h)) for _ in range(2)]))
    assert verify(stack, admin)["entries"] == 4

    stranger = uuid.uuid4()
    stack.sql("INSERT INTO sessions (id, org_id, start_date, status) VALUES ($1, $2, now(), 'open')",
              stranger, oid)  # fmt: skip
    bad = fault(stack, admin)
    assert bad == {"seq": None, "object_id": str(stranger),
                   "reason": "session not in the trail (written outside the service)"}  # fmt: skip

    # An edited entry is reported at its seq, before any later problem.
    stack.sql("UPDATE trail_entries SET actor = 'someone else' WHERE org_id = $1 AND seq = 3", oid)
    bad = fault(stack, admin)
    assert bad["seq"] == 3 and "hash does not match" in bad["reason"]
    # So is an entry whose items were edited (its digest no longer covers them).
    stack.sql("UPDATE trail_entries SET actor = $2 WHERE org_id = $1 AND seq = 3",
              oid, f"admin@{org}.example")  # fmt: skip
    stack.sql("DELETE FROM trail_items WHERE org_id = $1 AND seq = 2 AND session_id ="
              " (SELECT session_id FROM trail_items WHERE org_id = $1 AND seq = 2 LIMIT 1)", oid)  # fmt: skip
    bad = fault(stack, admin)
    assert bad["seq"] == 2 and "items were changed" in bad["reason"]


def test_purge_and_holds_keep_the_trail_intact_and_the_cli_verifies(stack: Stack) -> None:
    org = stack.new_org("trail")
    admin = stack.token(org, "admin")
    old = [Spec(start=NOW - timedelta(days=50), end=NOW - timedelta(days=49)) for _ in range(6)]
    stack.ingest(admin, protos(old))
    ok(stack.rest("POST", "/api/holds", admin,
                  json={"reason": "case", "query_filter": f"id.eq({old[0].id})"}))  # fmt: skip
    ok(stack.rest("PUT", "/api/retention", admin, json={"days": 30}))
    env = {**os.environ, "DATABASE_URL": stack.dsn}
    cli = [sys.executable, "-m", "session_audit.cli"]
    out = subprocess.run([*cli, "retention", "purge", "--org", org], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    v = verify(stack, admin)
    assert v["ok"] is True
    kinds = [e["kind"] for e in lines(stack, admin)[:-1]]
    assert kinds.count("purge") >= 1
    out = subprocess.run([*cli, "trail", "verify", "--org", org], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == v
    stack.sql("DELETE FROM sessions WHERE org_id = $1 AND id = $2",
              org_id(stack, org), uuid.UUID(old[0].id))  # fmt: skip
    out = subprocess.run([*cli, "trail", "verify", "--org", org], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1
    assert json.loads(out.stdout)["first_bad"]["object_id"] == old[0].id


def test_reports_api_changes_are_entries_too(stack: Stack) -> None:
    org = stack.new_org("trail")
    admin = stack.token(org, "admin")
    r = stack.rest("POST", "/api/v2/report/defined", admin,
                   json={"title": "Mine", "type": "session_summary", "query_filter": "verb.eq(exec)"})  # fmt: skip
    assert r.status_code == 200, r.text
    did = r.json()["defined_report"]["id"]
    assert ok(stack.rest("DELETE", f"/api/v2/report/defined/{did}", admin))
    entries = lines(stack, admin)[:-1]
    assert [(e["kind"], e["object_type"], e["object_ids"]) for e in entries] == [
        ("genesis", "sessions", []), ("create", "defined_report", [did]),
        ("delete", "defined_report", [did]),
    ]  # fmt: skip
    assert verify(stack, admin)["ok"] is True


def test_trail_init_starts_the_trail_of_an_org_that_had_sessions_before(stack: Stack) -> None:
    org = stack.new_org("trail")
    admin = stack.token(org, "admin")
    oid = org_id(stack, org)
    stack.ingest(admin, protos([Spec(start=NOW - timedelta(hours=1)) for _ in range(5)]))
    # As before migration 0040: sessions, no trail.
    for table in ("trail_items", "trail_entries", "trail_heads"):
        stack.sql(f"DELETE FROM {table} WHERE org_id = $1", oid)
    assert fault(stack, admin)["reason"].startswith("session not in the trail")
    env = {**os.environ, "DATABASE_URL": stack.dsn}
    out = subprocess.run([sys.executable, "-m", "session_audit.cli", "trail", "init"], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"{org}: trail started" in out.stdout
    v = verify(stack, admin)
    assert v["ok"] is True and v["entries"] == 1
    assert [(e["kind"], e["items"]) for e in lines(stack, admin)[:-1]] == [("genesis", 5)]


# The row digest as docs/retention.md defines it, written out here (not taken from the code).
DOC_COLUMNS = (
    "id, org_id, extract(epoch FROM start_date), extract(epoch FROM end_date), status, verb, "
    "user_id, user_email, user_name, connection, connection_type, connection_subtype, "
    "role_name, resource_name, identity_type, machine_identity_id, correlation_id, "
    "session_batch_id, exit_code, event_size, script, script_size, review_status, "
    "review_approvers, redactions, review, ai_analysis, guardrails_info, connection_tags, "
    "integrations_metadata, labels, metadata, metrics, event_stream, retention_locked"
)


def test_item_and_entry_digests_follow_the_documented_definition(stack: Stack) -> None:
    """Every stored item digest is SHA-256 of `jsonb_build_array(columns…)::text`, and every
    entry's digest is SHA-256 over (id bytes || item digest) in id order — for values with
    quotes, backslashes, control characters, non-ASCII, nested JSON, numbers and arrays."""
    from session_audit.seed import demo_sessions

    org = stack.new_org("digest")
    admin = stack.token(org, "admin")
    oid = org_id(stack, org)
    odd = Spec(
        start=NOW - timedelta(hours=5),
        end=NOW - timedelta(hours=4),
        exit_code=-2147483648,
        email='q"uo\\te\u00e9\U0001f600@example.com',
        review_status="APPROVED",
        approvers=('a"b@example.com', "c\\d@example.com", "\u00fcber@example.com"),
        script='select 1;\n\t"x"\\ \u2028 \x01 end',
        jira="AB-1",
        redactions=(("EMAIL", 3, 70), ("PHONE", 0, 0)),
    ).to_proto()
    odd.metadata.update({"n": 1.5, "big": 1e300, "tiny": -2.5e-8, "zero": 0.0, "t": True,
                         "nested": {"k\"ey": ["\u00e9", None, 7.0, {"": ""}]}})  # fmt: skip
    odd.labels.update({"retention_locked": "no", "\u00e9": "\n"})
    plain = Spec(start=NOW - timedelta(hours=3)).to_proto()  # no end, no JSON, no approvers
    rng = random.Random(5)
    demo = list(demo_sessions(rng, org, 40, NOW, 3))
    stack.ingest(admin, [odd, plain, *demo])
    ok(stack.rest("PUT", f"/api/sessions/{plain.id}/retention_lock", admin,
                  json={"locked": True, "reason": "x"}))  # fmt: skip

    rows = stack.sql(
        f"SELECT s.id, sha256(convert_to(jsonb_build_array({DOC_COLUMNS})::text, 'UTF8')) AS d"
        " FROM sessions s WHERE s.org_id = $1", oid)  # fmt: skip
    expected = {r["id"]: bytes(r["d"]) for r in rows}
    assert len(expected) == 42
    items = stack.sql("SELECT seq, session_id, digest FROM trail_items WHERE org_id = $1"
                      " ORDER BY seq", oid)  # fmt: skip
    latest = {r["session_id"]: bytes(r["digest"]) for r in items}
    assert latest == expected

    by_seq: dict[int, list[tuple[uuid.UUID, bytes]]] = {}
    for r in items:
        by_seq.setdefault(r["seq"], []).append((r["session_id"], bytes(r["digest"])))
    entries = stack.sql("SELECT seq, kind, items, digest FROM trail_entries WHERE org_id = $1"
                        " AND items > 0 ORDER BY seq", oid)  # fmt: skip
    assert [(e["kind"], e["items"]) for e in entries] == [("ingest", 42), ("lock", 1)]
    for e in entries:
        h = hashlib.sha256()
        for sid, d in sorted(by_seq[e["seq"]], key=lambda x: x[0].bytes):
            h.update(sid.bytes + d)
        assert bytes(e["digest"]) == h.digest()
    assert verify(stack, admin)["ok"] is True


def test_verify_runs_for_the_callers_deadline_not_the_query_cap(stack: Stack) -> None:
    """Verify digests every live session (minutes for a large org): with QUERY_TIMEOUT_SECONDS=1
    it still answers a caller that gave it 20 s, here while a lock keeps it waiting ~2.5 s."""
    import threading
    import time

    import grpc

    from session_audit.v1 import retention_pb2 as rpb
    from session_audit.v1 import retention_pb2_grpc as rpb_grpc
    from tests.support import ServerProcess, auth_md

    org = stack.new_org("vdead")
    admin = stack.token(org, "admin")
    stack.ingest(admin, protos([Spec(start=NOW - timedelta(hours=1))]))
    server = ServerProcess(stack.dsn, stack.server.workdir, env_extra={
        "QUERY_TIMEOUT_SECONDS": "1", "RETENTION_PURGE": "0", "REPORT_SCHEDULER": "0"}).start()  # fmt: skip
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        async def go() -> None:
            conn = await db_connect(stack.dsn)
            try:
                async with conn.transaction():
                    await conn.execute("LOCK TABLE trail_entries IN ACCESS EXCLUSIVE MODE")
                    locked.set()
                    await asyncio_sleep(2.5)
            finally:
                await conn.close()

        run(go())
        release.set()

    try:
        t = threading.Thread(target=hold_lock)
        t.start()
        assert locked.wait(30)
        with grpc.insecure_channel(server.target) as ch:
            stub = rpb_grpc.RetentionServiceStub(ch)
            t0 = time.monotonic()
            reply = stub.VerifyTrail(rpb.VerifyTrailRequest(), metadata=auth_md(admin), timeout=20)
            waited = time.monotonic() - t0
        t.join()
    finally:
        server.stop()
    assert reply.ok is True and release.is_set()
    assert waited > 1.5  # it did wait for the lock, past the 1 s cap of other calls
