"""Subscriptions and the scheduler: calendar periods (weeks from Monday, DST), exactly one report
per (subscription, period) under concurrent ticks, two server processes on a simulated clock,
restart and downtime catch-up, and the period applied to the report's content."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import grpc
import pytest

from session_audit.core import auth, db
from session_audit.reports.periods import label, next_period, period_containing
from session_audit.reports.scheduler import tick
from session_audit.v1 import reports_pb2 as rpb
from session_audit.v1 import reports_pb2_grpc
from tests.report_reference import RSpec, csv_rows, ok, wait_report
from tests.support import ServerProcess, Stack, auth_md

UTC_ = ZoneInfo("UTC")
WARSAW = ZoneInfo("Europe/Warsaw")
NEW_YORK = ZoneInfo("America/New_York")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, sec: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, sec, tzinfo=UTC)


# -- periods (hand-computed) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "zone", "instant", "start", "end"),
    [
        ("day", UTC_, utc(2026, 1, 7, 15), utc(2026, 1, 7), utc(2026, 1, 8)),
        # 2026-01-07 is a Wednesday: the week runs Monday 5th to Monday 12th.
        ("week", UTC_, utc(2026, 1, 7, 15), utc(2026, 1, 5), utc(2026, 1, 12)),
        ("week", UTC_, utc(2026, 1, 5), utc(2026, 1, 5), utc(2026, 1, 12)),
        ("week", UTC_, utc(2026, 1, 4, 23, 59), utc(2025, 12, 29), utc(2026, 1, 5)),
        ("month", UTC_, utc(2026, 2, 28, 23), utc(2026, 2, 1), utc(2026, 3, 1)),
        ("quarter", UTC_, utc(2026, 5, 15), utc(2026, 4, 1), utc(2026, 7, 1)),
        ("quarter", UTC_, utc(2026, 12, 31, 23), utc(2026, 10, 1), utc(2027, 1, 1)),
        ("year", UTC_, utc(2026, 7, 1), utc(2026, 1, 1), utc(2027, 1, 1)),
        # Warsaw: UTC+1 in winter, +2 in summer; 29 March 2026 has 23 hours.
        ("day", WARSAW, utc(2026, 3, 29, 12), utc(2026, 3, 28, 23), utc(2026, 3, 29, 22)),
        ("day", WARSAW, utc(2026, 1, 7, 23, 30), utc(2026, 1, 7, 23), utc(2026, 1, 8, 23)),
        ("month", WARSAW, utc(2026, 3, 31, 22, 30), utc(2026, 3, 31, 22), utc(2026, 4, 30, 22)),
        ("week", NEW_YORK, utc(2026, 3, 9, 3), utc(2026, 3, 2, 5), utc(2026, 3, 9, 4)),
        ("year", NEW_YORK, utc(2026, 1, 1, 3), utc(2025, 1, 1, 5), utc(2026, 1, 1, 5)),
    ],
)
def test_period_containing(
    period: str, zone: ZoneInfo, instant: datetime, start: datetime, end: datetime
) -> None:
    assert period_containing(period, zone, instant) == (start, end)


def test_next_period_and_labels() -> None:
    assert next_period("month", UTC_, utc(2026, 12, 1)) == (utc(2027, 1, 1), utc(2027, 2, 1))
    assert next_period("day", WARSAW, utc(2026, 3, 28, 23)) == (
        utc(2026, 3, 29, 22), utc(2026, 3, 30, 22))  # fmt: skip
    assert label("week", UTC_, utc(2026, 1, 5)) == "2026-W02"
    assert label("week", UTC_, utc(2024, 12, 30)) == "2025-W01"
    assert label("quarter", UTC_, utc(2026, 10, 1)) == "2026-Q4"
    assert label("day", WARSAW, utc(2026, 3, 28, 23)) == "2026-03-29"
    assert label("month", UTC_, utc(2026, 2, 1)) == "2026-02"
    assert label("year", UTC_, utc(2026, 1, 1)) == "2026"


def _is_first(period: str, d: date) -> bool:
    return {
        "day": True,
        "week": d.weekday() == 0,
        "month": d.day == 1,
        "quarter": d.day == 1 and d.month in (1, 4, 7, 10),
        "year": d.day == 1 and d.month == 1,
    }[period]


def expected_periods(period: str, tz: str, created: datetime, now: datetime) -> list[datetime]:
    """Starts of the periods to report: brute force, walking calendar days one by one."""
    zone = ZoneInfo(tz)
    d = created.astimezone(zone).date()
    while not _is_first(period, d):
        d -= timedelta(days=1)
    starts: list[datetime] = []
    while True:
        e = d + timedelta(days=1)
        while not _is_first(period, e):
            e += timedelta(days=1)
        if datetime(e.year, e.month, e.day, tzinfo=zone) > now:
            return starts
        starts.append(datetime(d.year, d.month, d.day, tzinfo=zone).astimezone(UTC))
        d = e


# -- exactly once: concurrent ticks on the database ------------------------------------------

SUBS = [("day", "UTC"), ("day", "Europe/Warsaw"), ("week", "UTC"), ("week", "America/New_York"),
        ("month", "Asia/Kolkata"), ("quarter", "UTC"), ("year", "Pacific/Auckland"),
        ("day", "America/St_Johns")]  # fmt: skip


async def _subscribe(
    conn: asyncpg.Connection, org_id: object, owner: str, definition: int, period: str, tz: str,
    created: datetime,
) -> int:  # fmt: skip
    start, end = period_containing(period, ZoneInfo(tz), created)
    sid: int = await conn.fetchval(
        "INSERT INTO report_subscriptions (org_id, owner, owner_scope, defined_report_id, period,"
        " time_zone, next_period_start, next_run_at, created_at) VALUES"
        " ($1, $2, 'org', $3, $4, $5, $6, $7, $8) RETURNING id",
        org_id, owner, definition, period, tz, start, end, created,
    )  # fmt: skip
    return sid


async def _ledger(conn: asyncpg.Connection, sids: list[int]) -> dict[int, list[datetime]]:
    rows = await conn.fetch(
        "SELECT subscription_id, period_start FROM subscription_periods"
        " WHERE subscription_id = any($1::bigint[]) ORDER BY 1, 2", sids)  # fmt: skip
    out: dict[int, list[datetime]] = {s: [] for s in sids}
    for r in rows:
        out[r["subscription_id"]].append(r["period_start"])
    return out


async def _duplicates(conn: asyncpg.Connection, sids: list[int]) -> int:
    n: int = await conn.fetchval(
        "SELECT count(*) FROM (SELECT 1 FROM reports WHERE subscription_id = any($1::bigint[])"
        " GROUP BY subscription_id, period_start HAVING count(*) > 1) d", sids)  # fmt: skip
    return n


def test_concurrent_ticks_create_each_period_once(stack: Stack) -> None:
    org = stack.new_org("ticks")
    stack.token(org, "admin")
    created = utc(2031, 1, 5, 10)
    nows = [utc(2031, 1, 9, 0, 0, 1), utc(2031, 2, 1), utc(2031, 7, 3, 12)]

    async def scenario() -> None:
        conn = await db.connect(stack.dsn)
        pools = [await db.create_pool(stack.dsn, 1, 2) for _ in range(4)]
        try:
            org_id = await conn.fetchval("SELECT id FROM orgs WHERE name = $1", org)
            for i in range(len(SUBS)):  # subscribers need reading access for their reports
                await auth.create_token(conn, org, "auditor", f"u{i}@x.example")
            sids = [await _subscribe(conn, org_id, f"u{i}@x.example", 16, p, tz, created)
                    for i, (p, tz) in enumerate(SUBS)]  # fmt: skip
            for now in nows:
                # Eight tickers at once, two per pool, all with the same clock.
                await asyncio.gather(*(tick(p, now) for p in pools for _ in range(2)))
                ledger = await _ledger(conn, sids)
                for sid, (period, tz) in zip(sids, SUBS, strict=True):
                    assert ledger[sid] == expected_periods(period, tz, created, now), (period, tz)
                assert await _duplicates(conn, sids) == 0
                n_reports = await conn.fetchval(
                    "SELECT count(*) FROM reports WHERE subscription_id = any($1::bigint[])", sids)  # fmt: skip
                assert n_reports == sum(len(v) for v in ledger.values())
            # Ticking again at the same time creates nothing.
            assert sum(await asyncio.gather(*(tick(p, nows[-1]) for p in pools))) == 0
            # Leave nothing due for other tests' tickers.
            await conn.execute("DELETE FROM report_subscriptions WHERE org_id = $1", org_id)
        finally:
            for p in pools:
                await p.close()
            await conn.close()

    asyncio.run(scenario())


def test_a_scheduled_report_covers_its_period_only(stack: Stack) -> None:
    org = stack.new_org("period")
    admin = stack.token(org, "admin", "admin@acme.example")
    base = utc(2026, 1, 5)  # a Monday, in the past
    inside = [RSpec(start=base + timedelta(hours=h), user_id=f"in{h}") for h in (0, 5, 23)]
    outside = [RSpec(start=base - timedelta(seconds=1), user_id="before"),
               RSpec(start=base + timedelta(days=1), user_id="after")]  # fmt: skip
    stack.ingest(admin, [s.to_proto() for s in inside + outside])

    async def schedule() -> int:
        conn = await db.connect(stack.dsn)
        pool = await db.create_pool(stack.dsn, 1, 2)
        try:
            org_id = await conn.fetchval("SELECT id FROM orgs WHERE name = $1", org)
            sid = await _subscribe(conn, org_id, "admin@acme.example", 11, "day", "UTC",
                                   base + timedelta(hours=1))  # fmt: skip
            await tick(pool, base + timedelta(days=1, minutes=1))
            rid: int = await conn.fetchval(
                "SELECT report_id FROM subscription_periods WHERE subscription_id = $1"
                " AND period_start = $2", sid, base)  # fmt: skip
            # Its later periods (up to today) are not this test's business.
            await conn.execute("DELETE FROM report_subscriptions WHERE id = $1", sid)
            return rid
        finally:
            await pool.close()
            await conn.close()

    rid = str(asyncio.run(schedule()))
    report = wait_report(stack, admin, rid)
    assert report["status"] == "ready"
    assert report["title"] == "Session summary · 2026-01-05"
    assert (report["period"], report["period_start"], report["period_end"]) == (
        "day", "2026-01-05T00:00:00Z", "2026-01-06T00:00:00Z")  # fmt: skip
    assert report["subscription_id"] != "" and report["user_id"] == "admin@acme.example"
    ids = {r[0] for r in csv_rows(stack, admin, rid)[1:]}
    assert ids == {s.id for s in inside}
    html = stack.rest("GET", f"/api/v2/report/{rid}/html", admin).content.decode()
    assert "day: 2026-01-05 00:00 to 2026-01-06 00:00 (UTC)" in html


def test_a_subscription_follows_its_owners_access_now(stack: Stack) -> None:
    """Scope is decided when a period's report is made, from the owner's active tokens: whole
    org with an admin/auditor token, own sessions with a user token, no report (the period is
    still recorded, once) when none is left. The System report needs admin or auditor."""
    org = stack.new_org("access")
    owner = "Dana@acme.example"
    created = utc(2031, 3, 2, 10)  # a Sunday
    day = timedelta(days=1)

    async def scenario() -> None:
        conn = await db.connect(stack.dsn)
        pool = await db.create_pool(stack.dsn, 1, 2)
        try:
            admin = await auth.create_token(conn, org, "admin", owner)
            org_id = await conn.fetchval("SELECT id FROM orgs WHERE name = $1", org)
            summary = await _subscribe(conn, org_id, owner.lower(), 11, "day", "UTC", created)
            system = await _subscribe(conn, org_id, owner.lower(), 5, "day", "UTC", created)

            async def made(sid: int) -> list[tuple[datetime, str | None]]:
                rows = await conn.fetch(
                    "SELECT p.period_start, r.owner_scope FROM subscription_periods p"
                    " LEFT JOIN reports r ON r.org_id = p.org_id AND r.id = p.report_id"
                    " WHERE p.org_id = $2 AND p.subscription_id = $1"
                    " ORDER BY 1", sid, org_id)  # fmt: skip
                return [(r["period_start"], r["owner_scope"]) for r in rows]

            d0 = utc(2031, 3, 2)
            await tick(pool, d0 + day)  # admin: both reports, whole org
            await auth.revoke_token(conn, admin[: len(auth.TOKEN_PREFIX) + 6])
            user = await auth.create_token(conn, org, "user", owner)
            await tick(pool, d0 + 2 * day)  # user: own sessions; no System report
            await auth.revoke_token(conn, user[: len(auth.TOKEN_PREFIX) + 6])
            await tick(pool, d0 + 3 * day)  # no access: periods recorded, no reports
            assert await made(summary) == [(d0, "org"), (d0 + day, "own"), (d0 + 2 * day, None)]
            assert await made(system) == [(d0, "org"), (d0 + day, None), (d0 + 2 * day, None)]
            await conn.execute(
                "DELETE FROM report_subscriptions WHERE id = any($1::bigint[])", [summary, system]
            )
        finally:
            await pool.close()
            await conn.close()

    asyncio.run(scenario())


# -- exactly once: two server processes on a simulated clock ---------------------------------


def wait_until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


def set_clock(path: Path, t: datetime) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(t.isoformat())
    tmp.replace(path)  # atomic: a server never reads half a time


def test_two_servers_on_a_simulated_clock_report_each_period_once(
    stack: Stack, tmp_path: Path
) -> None:
    clock = tmp_path / "clock"
    # Far in the future, so the shared test server (on the real clock) never finds these due.
    created = utc(2032, 3, 3, 10)  # a Wednesday
    set_clock(clock, created)
    env = {"REPORT_CLOCK_FILE": str(clock), "REPORT_SCHEDULER_INTERVAL_MS": "100",
           "REPORT_POLL_INTERVAL_MS": "200"}  # fmt: skip
    servers = [ServerProcess(stack.dsn, tmp_path, env_extra=env).start() for _ in range(2)]
    org = stack.new_org("twoproc")
    plan = [("day", "UTC", "11"), ("day", "Europe/Warsaw", "12"), ("week", "UTC", "16"),
            ("week", "Asia/Tokyo", "11"), ("month", "America/New_York", "16"),
            ("quarter", "UTC", "12")]  # fmt: skip
    tokens = [stack.token(org, "auditor", f"a{i}@acme.example") for i in range(len(plan))]
    sids: list[str] = []
    try:
        for i, ((period, tz, did), token) in enumerate(zip(plan, tokens, strict=True)):
            with grpc.insecure_channel(servers[i % 2].target) as ch:
                reply = reports_pb2_grpc.ReportServiceStub(ch).CreateDefinedReportSubscription(
                    rpb.CreateDefinedReportSubscriptionRequest(
                        period=period, time_zone=tz, defined_report_id=did),
                    metadata=auth_md(token))  # fmt: skip
            sids.append(reply.defined_report_subscription.id)
        sub = ok(stack.rest("GET", f"/api/v2/report/subscription/{sids[0]}", tokens[0]))
        assert sub["defined_report_subscription"]["created_at"] == "2032-03-03T10:00:00Z"

        def count() -> int:
            rows = stack.sql("SELECT count(*) FROM subscription_periods WHERE subscription_id ="
                             " any($1::bigint[])", [int(s) for s in sids])  # fmt: skip
            return int(rows[0][0])

        def expected_total(now: datetime) -> int:
            return sum(len(expected_periods(p, tz, created, now)) for p, tz, _ in plan)

        # Time moves in steps while both processes tick every 100 ms.
        for now in (utc(2032, 3, 4, 0, 0, 1), utc(2032, 3, 8, 12), utc(2032, 4, 2)):
            set_clock(clock, now)
            wait_until(lambda now=now: count() == expected_total(now))  # type: ignore[misc]
        time.sleep(0.5)  # more ticks: still nothing new
        assert count() == expected_total(utc(2032, 4, 2))

        # Downtime spanning several periods: both stop, time jumps, one comes back.
        for s in servers:
            s.stop()
        later = utc(2032, 7, 15, 6)
        set_clock(clock, later)
        servers = [ServerProcess(stack.dsn, tmp_path, env_extra=env).start()]
        wait_until(lambda: count() == expected_total(later))
        time.sleep(0.5)
        assert count() == expected_total(later)

        ledger = stack.sql(
            "SELECT subscription_id, period_start FROM subscription_periods WHERE"
            " subscription_id = any($1::bigint[]) ORDER BY 1, 2", [int(s) for s in sids])  # fmt: skip
        for sid, (period, tz, _) in zip(sids, plan, strict=True):
            got = [r["period_start"] for r in ledger if r["subscription_id"] == int(sid)]
            assert got == expected_periods(period, tz, created, later), (period, tz)
        dup = stack.sql(
            "SELECT count(*) FROM (SELECT 1 FROM reports WHERE subscription_id = any($1::bigint[])"
            " GROUP BY subscription_id, period_start HAVING count(*) > 1) d", [int(s) for s in sids])  # fmt: skip
        assert dup[0][0] == 0
        # Every scheduled report gets generated (by whichever process).
        wait_until(lambda: stack.sql(
            "SELECT count(*) FROM reports WHERE subscription_id = any($1::bigint[])"
            " AND status <> 'ready'", [int(s) for s in sids])[0][0] == 0)  # fmt: skip
        titles = [r["title"] for r in stack.sql(
            "SELECT title FROM reports WHERE subscription_id = $1 ORDER BY period_start",
            int(sids[2]))]  # fmt: skip
        weeks = expected_periods("week", "UTC", created, later)
        assert titles == [f"User report · {w.isocalendar()[0]}-W{w.isocalendar()[1]:02d}"
                          for w in weeks]  # fmt: skip
        assert titles[0] == "User report · 2032-W10"
    finally:
        for s in servers:
            s.stop()
        stack.sql("DELETE FROM report_subscriptions WHERE id = any($1::bigint[])",
                  [int(s) for s in sids])  # fmt: skip
