"""Rollup maintenance: concurrent batches neither deadlock nor lose counts, a batch that meets
a concurrently inserted session moves its contribution correctly, ingest without maintenance
marks the org stale (reads fall back to the base table until a rebuild), and the planner picks
the rollups for the cases they are built for."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from session_audit.analytics import requests, rollups, store
from session_audit.analytics.fields import BASE, CUBE, OUTCOMES, USER, VALUES
from session_audit.analytics.q import parse_q
from session_audit.analytics.timebins import bin_starts
from session_audit.core import auth, db
from session_audit.core.validation import parse_zone
from session_audit.sessions.ingest import IngestBatch
from tests.factories import Spec
from tests.support import Stack, run
from tests.test_analytics_properties import snapshot

DAY = datetime(2026, 4, 6, tzinfo=UTC)


async def _org(conn: Any) -> uuid.UUID:
    return await auth.ensure_org(conn, f"roll-{uuid.uuid4().hex[:10]}")


def hq(field: str = "protocol", size: int | None = None, q: str = "") -> requests.HistogramQuery:
    _, zone = parse_zone("")
    start, end = DAY, DAY + timedelta(days=2)
    bins = tuple(bin_starts(start, end, "hour", zone, 1000))
    return requests.HistogramQuery(field, "hour", start, end, "Etc/UTC", zone, size,
                                   parse_q(q, zone), bins)  # fmt: skip


async def consistent(conn: Any, org: uuid.UUID) -> None:
    """The incrementally maintained rollups equal a rebuild from the sessions."""
    before = {f.table: await snapshot(conn, f, org) for f in rollups.FAMILIES}
    await rollups.rebuild(conn, org)
    after = {f.table: await snapshot(conn, f, org) for f in rollups.FAMILIES}
    assert before == after


def test_batches_crossing_hours_in_opposite_orders_do_not_deadlock(stack: Stack) -> None:
    """Two transactions each write two chunks touching the same rollup rows, in opposite
    orders, and finish together. Rollup rows are only locked by the one ordered statement at
    the end of each batch, so neither waits on the other in a cycle."""

    async def go() -> None:
        admin = await db.connect(stack.dsn)
        org = await _org(admin)
        early = [Spec(start=DAY + timedelta(minutes=i)) for i in range(200)]
        late = [Spec(start=DAY + timedelta(hours=5, minutes=i)) for i in range(200)]
        conns = [await db.connect(stack.dsn, json_codec=False) for _ in range(2)]
        txs = [c.transaction() for c in conns]
        for tx in txs:
            await tx.start()
        batches = [IngestBatch(c, org, 30) for c in conns]
        for batch, first, second in ((batches[0], early[:100], late[:100]),
                                     (batches[1], late[100:], early[100:])):  # fmt: skip
            for s in first:
                await batch.add(s.to_proto())
            await batch.flush()
            for s in second:
                await batch.add(s.to_proto())
            await batch.flush()

        async def finish(batch: IngestBatch, tx: Any) -> Any:
            result = await batch.finish()
            await tx.commit()
            return result

        results = await asyncio.wait_for(
            asyncio.gather(*(finish(b, t) for b, t in zip(batches, txs, strict=True))), 20
        )
        assert [r.written for r in results] == [200, 200]
        got = await store.histogram(admin, auth.Principal(0, org, "admin", "a@x"), hq(), 30)
        assert got.source == CUBE
        assert sum(b[0] for b in got.buckets) == 400
        await consistent(admin, org)
        for c in [*conns, admin]:
            await c.close()

    run(go())


def test_a_session_inserted_concurrently_is_merged_not_double_counted(stack: Stack) -> None:
    """Batch B reports sessions that batch A inserted but has not committed: B's COPY waits,
    fails once A commits, and B then locks the rows, takes out A's contribution and adds the
    merged one."""

    async def go() -> None:
        admin = await db.connect(stack.dsn)
        org = await _org(admin)
        opened = [Spec(start=DAY + timedelta(minutes=i), subtype="postgres") for i in range(50)]
        closed = [
            Spec(id=s.id, start=s.start, end=s.start + timedelta(hours=30), subtype="ssh",
                 redactions=(("EMAIL_ADDRESS", 2, 20),))
            for s in opened
        ]  # fmt: skip
        ca = await db.connect(stack.dsn, json_codec=False)
        cb = await db.connect(stack.dsn, json_codec=False)
        ta, tb_ = ca.transaction(), cb.transaction()
        await ta.start()
        await tb_.start()
        a = IngestBatch(ca, org, 30)
        for s in opened:
            await a.add(s.to_proto())
        await a.flush()
        await a.flush()  # the second flush waits for the first chunk's write to end
        b = IngestBatch(cb, org, 30)
        for s in closed:
            await b.add(s.to_proto())
        finishing_b = asyncio.create_task(b.finish())
        await asyncio.sleep(0.3)
        assert not finishing_b.done()  # waiting on A's uncommitted rows
        await a.finish()
        await ta.commit()
        result = await asyncio.wait_for(finishing_b, 20)
        await tb_.commit()
        assert result.written == 50 and result.rejected == 0
        who = auth.Principal(0, org, "admin", "a@x")
        got = await store.histogram(admin, who, hq(size=5), 30)
        assert got.top == ["ssh"]  # every session moved from postgres to ssh
        # Started in the first hour, each ended 30 hours later: open until the 31st hour.
        assert got.buckets[0] == (50, 50)
        assert got.buckets[30] == (0, 50) and got.buckets[31] == (0, 0)
        await consistent(admin, org)
        for c in (ca, cb, admin):
            await c.close()

    run(go())


@pytest.mark.parametrize("read_back", [True, False], ids=["read back", "values sent"])
def test_copied_sessions_count_the_same_read_back_or_sent(stack: Stack, read_back: bool) -> None:
    """Sessions copied in are counted into the rollups either by reading the copied rows back
    (one node) or from the values sent (Citus): both equal a rebuild, on the fast path (all
    new) and on the careful path (new ones beside stored ones), and a hand count."""

    async def go() -> None:
        conn = await db.connect(stack.dsn, json_codec=False)
        admin = await db.connect(stack.dsn)
        org = await _org(admin)
        first = [
            Spec(start=DAY + timedelta(minutes=7 * i), subtype=("postgres", "ssh", "rdp")[i % 3],
                 end=None if i % 4 == 0 else DAY + timedelta(minutes=7 * i + 95),
                 redactions=(("EMAIL_ADDRESS", 1, 4),) if i % 5 == 0 else (),
                 exit_code=i % 3, role=f"role-{i % 2}", resource=f"db-{i % 3}" if i % 2 else None)
            for i in range(40)
        ]  # fmt: skip
        # The careful path: ten stored sessions (now ended) beside thirty new ones.
        second = [
            Spec(id=s.id, start=s.start, end=s.start + timedelta(hours=2), subtype="ssh")
            for s in first[:10]
        ] + [Spec(start=DAY + timedelta(hours=5, minutes=i), subtype="mysql") for i in range(30)]
        for batch_specs in (first, second):
            async with conn.transaction():
                batch = IngestBatch(conn, org, 30, read_back=read_back)
                for s in batch_specs:
                    await batch.add(s.to_proto())
                result = await batch.finish()
            assert result.rejected == 0 and result.written == len(batch_specs)
        await consistent(admin, org)
        who = auth.Principal(0, org, "admin", "a@x")
        got = await store.histogram(admin, who, hq(size=5), 30)
        # By hand: 70 sessions, each started once in the two days.
        assert sum(s for s, _ in got.buckets) == 70
        # By hand: mysql 30; ssh 10 moved + 10 of i = 10…39 with i % 3 == 1; postgres and rdp
        # 10 each (i % 3 == 0 and 2 among the 30 not reported again).
        starts = {
            v: sum(s for s, _ in series) for v, series in zip(got.top, got.by_value, strict=True)
        }
        assert starts == {"mysql": 30, "ssh": 20, "postgres": 10, "rdp": 10}
        assert got.source == "values"  # answered from a rollup (rollup_values), not the table
        await conn.close()
        await admin.close()

    run(go())


def test_ingest_without_maintenance_marks_the_org_stale_until_a_rebuild(stack: Stack) -> None:
    org_name = stack.new_org("stale")

    async def go() -> tuple[uuid.UUID, Any, Any]:
        conn = await db.connect(stack.dsn, json_codec=False)
        org = await auth.ensure_org(conn, org_name)
        async with conn.transaction():
            batch = IngestBatch(conn, org, 30, maintain_rollups=False)
            for i in range(30):
                await batch.add(Spec(start=DAY + timedelta(minutes=10 * i)).to_proto())
            await batch.finish()
        await conn.close()
        conn = await db.connect(stack.dsn)
        assert await rollups.is_stale(conn, org, 5)
        got = await store.histogram(conn, auth.Principal(0, org, "admin", "a@x"), hq(), 30)
        await conn.close()
        return org, got, None

    org, stale, _ = run(go())
    assert stale.source == BASE and sum(b[0] for b in stale.buckets) == 30

    env = {**os.environ, "DATABASE_URL": stack.dsn}
    done = subprocess.run(
        [sys.executable, "-m", "session_audit.cli", "rollups", "rebuild", "--org", org_name],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"rebuilt the rollups of {org_name}" in done.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "session_audit.cli", "rollups", "rebuild", "--org", "no-such-org"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert missing.returncode != 0 and "no org named" in missing.stderr

    async def after() -> Any:
        conn = await db.connect(stack.dsn)
        try:
            assert not await rollups.is_stale(conn, org, 5)
            return await store.histogram(conn, auth.Principal(0, org, "admin", "a@x"), hq(), 30)
        finally:
            await conn.close()

    fresh = run(after())
    assert fresh.source == CUBE and fresh.buckets == stale.buckets


@pytest.mark.parametrize(
    ("role", "field", "size", "q", "source"),
    [
        ("auditor", "protocol", None, "", CUBE),
        ("auditor", "connection", 10, "verb:exec AND NOT review_status:*", CUBE),
        # One field, grouped by and/or searched: its per-value totals (rollup_values).
        ("auditor", "protocol", 5, "", VALUES),
        ("auditor", "connection", 3, "connection:pg* AND NOT connection:pg-2", VALUES),
        ("auditor", "protocol", None, "verb:exec", VALUES),
        ("auditor", "protocol", 5, "verb:exec", CUBE),
        ("auditor", "user", 10, "", USER),
        ("auditor", "user", 10, "user:ana*", USER),
        ("auditor", "user", 10, "protocol:ssh", BASE),  # no rollup holds user x protocol
        ("auditor", "protocol", None, "exit_code:[1 TO *]", OUTCOMES),
        ("auditor", "protocol", None, "duration:>=3600 AND NOT exit_code:0", OUTCOMES),
        ("auditor", "protocol", None, "duration:[60 TO 3600} OR duration:*", OUTCOMES),
        # Off the edges: the partial bucket's sessions come from the sessions table (0056).
        ("auditor", "protocol", None, "duration:>3600", OUTCOMES),
        ("auditor", "protocol", None, "duration:>=3599", OUTCOMES),
        ("auditor", "protocol", None, "duration:<=60 OR exit_code:1", OUTCOMES),
        ("auditor", "protocol", None, "duration:>=3600 AND protocol:ssh", BASE),
        ("auditor", "protocol", 5, "exit_code:1", BASE),  # no rollup holds protocol x exit code
        ("auditor", "protocol", None, "start:[2026-04-06 TO *]", BASE),
        ("user", "protocol", None, "", BASE),
    ],
)
def test_the_planner_uses_a_rollup_when_one_carries_every_field(
    role: str, field: str, size: int | None, q: str, source: str
) -> None:
    query = hq(field, size, q)
    needed = set(query.q.fields if query.q else ()) | ({field} if size else set())
    who = auth.Principal(0, uuid.uuid4(), role, "ana@x.example")
    assert store.plan(who, needed, rollups_ok=True, query=query.q) == source
    assert store.plan(who, needed, rollups_ok=False, query=query.q) == BASE


@pytest.mark.parametrize(
    ("group_by", "filters", "source"),
    [
        ("connection", {}, store.REPORT_CONN),
        ("connection_type", {"connection": "pg", "verb": "exec"}, store.REPORT_CONN),
        ("user_email", {}, store.REPORT_USER),
        ("user_email", {"user_email": "ana@x.example"}, store.REPORT_USER),
        ("user_email", {"verb": "exec"}, BASE),
        ("connection", {"user_email": "ana@x.example"}, BASE),
        ("user_email", {"connection": "pg"}, BASE),
        ("id", {}, BASE),
        ("connection", {"session_id": uuid.uuid4()}, BASE),
    ],
)
def test_the_report_planner(group_by: str, filters: dict[str, Any], source: str) -> None:
    rq = requests.ReportQuery(group_by, filters.get("connection"), filters.get("user_email"),
                              filters.get("verb"), filters.get("session_id"), DAY, DAY, "Etc/UTC")  # fmt: skip
    who = auth.Principal(0, uuid.uuid4(), "admin", "a@x")
    assert store.report_plan(who, rq, True) == source
    assert store.report_plan(auth.Principal(0, uuid.uuid4(), "user", "a@x"), rq, True) == BASE
