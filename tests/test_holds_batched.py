"""Legal holds over many sessions (issue 15, docs/retention.md "Holds over millions"): a hold
locks what is stored one window of sessions per transaction; a request whose time runs out
answers `applying` and the rest is finished in the background or by the next purge, which
never deletes what an unfinished hold matches; windows applied by two processes at once, a
concurrent ingest and a release in the middle all end with exactly the sessions the filter
matches locked (computed here from the fixtures), and a trail that verifies."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from datetime import timedelta

import grpc

from session_audit.core import auth, db
from session_audit.retention import purge, store
from session_audit.v1 import retention_pb2 as rpb
from session_audit.v1 import retention_pb2_grpc as rpb_grpc
from tests.factories import Spec
from tests.support import ServerProcess, Stack, auth_md, run
from tests.test_retention import (
    NOW,
    _env,
    hold_background_purge,
    locked_ids,
    ok,
    org_id,
    protos,
    stored_ids,
)  # fmt: skip

ANA = "user_email.eq(ana@x.example)"


def fixtures() -> tuple[list[Spec], list[Spec]]:
    """Ana's sessions (what the hold matches) and the others, over 90 days."""
    ana = [Spec(start=NOW - timedelta(days=3 + 9 * i), email="ana@x.example") for i in range(9)]
    other = [Spec(start=NOW - timedelta(days=2 + 7 * i, hours=12), email=f"u{i}@x.example")
             for i in range(13)]  # fmt: skip
    return ana, other


def holds(stack: Stack, token: str) -> list[tuple[int, bool]]:
    return [
        (h["locked"], h["applying"]) for h in ok(stack.rest("GET", "/api/holds", token))["holds"]
    ]


def test_a_hold_the_request_cannot_finish_is_finished_before_the_purge_deletes(
    stack: Stack,
) -> None:
    org = stack.new_org("hbat")
    admin = stack.token(org, "admin")
    ana, other = fixtures()
    stack.ingest(admin, protos([*ana, *other]))
    server = ServerProcess(stack.dsn, stack.server.workdir, env_extra={
        "RETENTION_HOLD_WINDOW": "4", "RETENTION_PURGE": "0"}).start()  # fmt: skip
    try:
        # A request whose time ran out before the first window (as CreateHold leaves it when
        # less than a second is left): made and active, nothing stored locked yet.
        oid = org_id(stack, org)

        async def made_only() -> store.Applied:
            conn = await db.connect(stack.dsn)
            try:
                hold = await _new_hold(conn, oid, ANA)
                return await store.apply_hold(
                    conn, oid, hold, window=4, timeout=60, until=time.monotonic()
                )
            finally:
                await conn.close()

        assert run(made_only()) == store.Applied(False, 0)
        assert holds(stack, admin) == [(0, True)]
        with grpc.insecure_channel(server.target) as ch:
            stub = rpb_grpc.RetentionServiceStub(ch)
            # Active already: a session of ana's arriving now is locked on ingest.
            late = Spec(start=NOW - timedelta(days=50), email="ana@x.example")
            stack.ingest(admin, protos([late]))
            assert locked_ids(stack, org) == {late.id}
            assert holds(stack, admin) == [(1, True)]
            # Time enough: 23 sessions in windows of 4 (six windows), all in the request.
            r2 = stub.CreateHold(rpb.CreateHoldRequest(reason="others", query_filter=
                                 "user_email.eq(u0@x.example)"), metadata=auth_md(admin))  # fmt: skip
            assert (r2.locked, r2.applying) == (1, False)
    finally:
        server.stop()
    # A 30-day policy; the purge finishes the hold before deleting anything.
    ok(stack.rest("PUT", "/api/retention", admin, json={"days": 30}))
    hold_background_purge(stack, org)
    out = subprocess.run(
        [sys.executable, "-m", "session_audit.cli", "retention", "purge", "--org", org],
        env={**_env(), "DATABASE_URL": stack.dsn, "RETENTION_HOLD_WINDOW": "4"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    cutoff = NOW - timedelta(days=30)
    held = {s.id for s in [*ana, late]} | {other[0].id}
    expired = {s.id for s in other if s.start < cutoff} - held
    assert len(expired) == 9 and f"deleted {len(expired)} session(s)" in out.stdout
    assert stored_ids(stack, org) == {s.id for s in [*ana, late, *other]} - expired
    assert locked_ids(stack, org) == held
    assert sorted(holds(stack, admin)) == [(1, False), (10, False)]
    assert ok(stack.rest("GET", "/api/audit/trail/verify", admin))["ok"] is True


def test_windows_from_two_processes_an_ingest_and_a_release_in_the_middle(
    stack: Stack,
) -> None:
    org = stack.new_org("hcon")
    admin = stack.token(org, "admin")
    oid = org_id(stack, org)
    ana = [Spec(start=NOW - timedelta(hours=i), email="ana@x.example") for i in range(40)]
    other = [Spec(start=NOW - timedelta(hours=i), email="bob@x.example") for i in range(60)]
    stack.ingest(admin, protos([*ana, *other]))
    late = [Spec(start=NOW - timedelta(minutes=i), email="ana@x.example") for i in range(30)]

    async def go() -> tuple[store.Applied, store.Applied, int]:
        conns = [await db.connect(stack.dsn) for _ in range(2)]
        try:
            hold = await _new_hold(conns[0], oid, ANA)
            a, b, _ = await asyncio.gather(
                store.apply_hold(conns[0], oid, hold, window=3, timeout=60),
                store.apply_hold(conns[1], oid, hold, window=3, timeout=60),
                asyncio.to_thread(stack.ingest, admin, protos(late)),
            )
            return a, b, hold
        finally:
            for c in conns:
                await c.close()

    a, b, _ = run(go())
    want = {s.id for s in [*ana, *late]}
    assert a == b == store.Applied(True, len(want))
    assert locked_ids(stack, org) == want
    # Every session the hold changed is in exactly one lock entry.
    rows = stack.sql(
        "SELECT i.session_id FROM trail_items i JOIN trail_entries e USING (org_id, seq)"
        " WHERE e.org_id = $1 AND e.kind = 'lock'", oid)  # fmt: skip
    ids = [str(r["session_id"]) for r in rows]
    assert len(ids) == len(set(ids)) and set(ids) <= want
    assert ok(stack.rest("GET", "/api/audit/trail/verify", admin))["ok"] is True

    # A second hold released after its first window: what it had locked is unlocked again
    # (nothing else holds bob's sessions) and its application stops.
    async def release_midway() -> tuple[bool, store.Applied]:
        conn = await db.connect(stack.dsn)
        try:
            hold2 = await _new_hold(conn, oid, "user_email.eq(bob@x.example)")
            last = await store._apply_window(conn, oid, hold2, 7, 60)
            mid = await asyncio.to_thread(locked_ids, stack, org)
            # The first window: the org's first 7 sessions in id (byte) order; bob's of them.
            first = sorted(uuid.UUID(s.id) for s in [*ana, *other, *late])[:7]
            assert mid - want == {str(i) for i in first} & {s.id for s in other}
            ok(await asyncio.to_thread(stack.rest, "DELETE", f"/api/holds/{hold2}", admin))
            return last, await store.apply_hold(conn, oid, hold2, window=7, timeout=60)
        finally:
            await conn.close()

    last, after = run(release_midway())
    assert last is False and after == store.Applied(True, 0)
    assert locked_ids(stack, org) == want
    assert ok(stack.rest("GET", "/api/audit/trail/verify", admin))["ok"] is True


async def _new_hold(conn: db.Conn, oid: uuid.UUID, query_filter: str) -> int:
    """A hold made as the API makes it, before any window is applied."""
    who = auth.Principal(0, oid, "admin", "admin@x.example")
    return await store.create_hold(conn, who, "test", query_filter, [], 60)


def test_the_first_window_waits_for_transactions_that_began_before_the_hold(
    stack: Stack,
) -> None:
    """A session written by an ingest still open when the hold is made (it read the active holds
    before the hold existed, so it does not lock) is not visible to the windows until it
    commits: the hold waits for such transactions before its first window, instead of passing
    the session by. (An ingest that already holds the org's trail head makes the hold itself
    wait; this is the one between the two.)"""
    org = stack.new_org("hset")
    admin = stack.token(org, "admin")
    oid = org_id(stack, org)
    stack.ingest(admin, protos([Spec(start=NOW - timedelta(hours=2), email="ana@x.example")]))

    async def go() -> tuple[store.Applied, store.Applied, str]:
        writer = await db.connect(stack.dsn)
        applier = await db.connect(stack.dsn)
        try:
            tx = writer.transaction()
            await tx.start()
            # An ingest between reading the active holds (before the hold below existed) and
            # taking the org's trail head, last: its transaction id taken as on_ingest takes
            # it, its session written (the columns a list needs), nothing locked, no commit.
            await writer.execute(store.TAKE_XID)
            sid = str(uuid.uuid4())
            await writer.execute(
                "INSERT INTO sessions (id, org_id, start_date, user_email, connection,"
                " connection_type, connection_subtype, verb, status)"
                " VALUES ($1, $2, now() - interval '1 hour', 'ana@x.example', 'pg', 'database',"
                " 'postgres', 'exec', 'ready')", uuid.UUID(sid), oid)  # fmt: skip
            hold = await _new_hold(applier, oid, ANA)
            waited = await store.apply_hold(
                applier, oid, hold, window=4, timeout=60, until=time.monotonic() + 0.5
            )
            await tx.commit()
            done = await store.apply_hold(applier, oid, hold, window=4, timeout=60)
            return waited, done, sid
        finally:
            await writer.close()
            await applier.close()

    waited, done, sid = run(go())
    assert waited == store.Applied(False, 0)
    assert done == store.Applied(True, 2)
    assert sid in locked_ids(stack, org)


def test_a_purge_postpones_sessions_while_a_hold_cannot_settle_and_never_hangs(
    stack: Stack,
) -> None:
    """A transaction left open keeps a new hold from starting its windows; the purge of that
    org then deletes no session (the hold's may not be locked yet) and answers within its
    timeout instead of waiting; once the transaction ends, the next run purges as usual."""
    org = stack.new_org("hpost")
    admin = stack.token(org, "admin")
    oid = org_id(stack, org)
    ana, other = fixtures()
    stack.ingest(admin, protos([*ana, *other]))
    ok(stack.rest("PUT", "/api/retention", admin, json={"days": 30}))
    hold_background_purge(stack, org)

    async def go() -> tuple[purge.PurgeResult | None, float, purge.PurgeResult | None]:
        writer = await db.connect(stack.dsn)
        pool = await db.create_pool(stack.dsn, 1, 2)
        try:
            async with pool.acquire() as conn:
                await _new_hold(conn, oid, ANA)
            tx = writer.transaction()
            await tx.start()
            await writer.execute(store.TAKE_XID)  # open, holding an id
            t0 = time.monotonic()
            first = await purge.purge_org(pool, oid, NOW, interval=3600, batch=5, timeout=1,
                                          claim=False, hold_window=4)  # fmt: skip
            took = time.monotonic() - t0
            await tx.rollback()
            second = await purge.purge_org(pool, oid, NOW, interval=3600, batch=5, timeout=30,
                                           claim=False, hold_window=4)  # fmt: skip
            return first, took, second
        finally:
            await writer.close()
            await pool.close()

    first, took, second = run(go())
    assert first is not None and (first.sessions, first.postponed) == (0, True)
    assert took < 10
    expired = {s.id for s in other if s.start < NOW - timedelta(days=30)}
    assert second is not None and (second.sessions, second.postponed) == (len(expired), False)
    assert stored_ids(stack, org) == {s.id for s in [*ana, *other]} - expired
    assert locked_ids(stack, org) == {s.id for s in ana}
