"""UTC weeks in rollup_sessions_user (migration 0054): a top-N of users per weekly bin reads one
week row per (week, top user) where a whole UTC week lies in the bin, and days (plus the base
table) where it does not — every answer exactly the sessions table's: by hand on a small
fixture in UTC and Europe/Berlin, against the plain-Python reference on random worlds, and the
backfill of existing data equal to what ingest and a rebuild write. (The pieces themselves:
tests/test_analytics_timebins.py.)"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from session_audit.analytics import requests, rollups, store
from session_audit.analytics.fields import BASE, USER
from session_audit.analytics.timebins import DAY, MONTH, WEEK, bin_starts
from session_audit.core import auth, db
from session_audit.core.validation import parse_zone
from tests.factories import Spec, ingest_specs
from tests.support import Stack, run
from tests.test_analytics_properties import ZONES, Ask, Db, check_histogram, load, worlds

MIGRATION = (
    Path(__file__).parent.parent / "src/session_audit/core/migrations/0054_rollup_user_weeks.sql"
)
MONDAY = datetime(2026, 3, 16, tzinfo=UTC)  # weeks of 16, 23 and 30 March (Berlin: DST 29th)


def test_the_per_user_rollup_keeps_weeks() -> None:
    assert rollups.SESSIONS_USER.grains == (DAY, WEEK, MONTH)
    assert store.WEEKLY == {USER}


def _at(day: int, hour: float = 0) -> datetime:
    return MONDAY + timedelta(days=day, hours=hour)


def _hq(zone_name: str, start: datetime, end: datetime, size: int) -> requests.HistogramQuery:
    _, zone = parse_zone(zone_name)
    bins = tuple(bin_starts(start, end, "week", zone, 1000))
    return requests.HistogramQuery("user", "week", start, end, zone_name, zone, size, None, bins)


# Three users over three UTC weeks; some sessions sit in the hours between a UTC week's start
# (Monday 00:00 UTC) and a Berlin week's (Sunday 23:00 or 22:00 UTC), so the two zones differ.
FIXTURE = [
    Spec(email="ana@x.example", start=_at(0, 1), end=_at(0, 2)),  # Mon 16th, both zones' week 1
    Spec(email="ANA@x.example", start=_at(2, 5), end=_at(9, 5)),  # spans into week 2
    Spec(
        email="bo@x.example",
        start=_at(
            6,
            23,
        ),
        end=_at(6, 23.5),
    ),  # Sun 23:30 UTC: Berlin wk 2
    Spec(email="bo@x.example", start=_at(8)),  # Tue 24th, still open
    Spec(
        email="cy@x.example",
        start=_at(
            13,
            22,
        ),
        end=_at(14, 1),
    ),  # Sun 29th 22:00 UTC
    Spec(email="cy@x.example", start=_at(15)),  # Tue 31st, open
    Spec(email="cy@x.example", start=_at(-1, 12), end=_at(-1, 13)),  # the week before
]


def test_weekly_top_users_by_hand_in_utc_and_berlin_and_the_week_rows_are_read(
    stack: Stack,
) -> None:
    async def answer(conn: Any, org: uuid.UUID, zone: str) -> Any:
        who = auth.Principal(0, org, "auditor", "aud@x.example")
        _, tz = parse_zone(zone)
        start = datetime(2026, 3, 16, tzinfo=tz)
        hq = _hq(zone, start, start + timedelta(days=21), 2)
        rolled = await store.histogram(conn, who, hq, 30)
        based = await store.histogram(conn, who, hq, 30, store.Options(force_base=True))
        assert rolled.source == USER and based.source == BASE
        got = (rolled.buckets, rolled.top, rolled.by_value)
        assert got == (based.buckets, based.top, based.by_value)
        return got

    async def go() -> None:
        conn = await db.connect(stack.dsn, json_codec=False)
        try:
            org = await auth.ensure_org(conn, f"weeks-{uuid.uuid4().hex[:10]}")
            await ingest_specs(conn, org, FIXTURE)
            # UTC weeks of 16, 23, 30 March. Started in the window: ana 2, bo 2, cy 2 → ties
            # ranked by value: ana, bo. Active: ana week 1 (2), week 2 (the long one ends on
            # the 25th); bo: the Sunday one in week 1, the open one from week 2 on.
            utc = (
                [(3, 3), (1, 2), (0, 1)],
                ["ana@x.example", "bo@x.example"],
                [[(2, 2), (0, 1), (0, 0)], [(1, 1), (1, 1), (0, 1)]],
            )
            assert await answer(conn, org, "Etc/UTC") == utc
            # Berlin weeks start on Sunday 23:00 UTC (22:00 from 29 March): bo's Sunday session
            # is in week 2 there; cy's of Sunday 29th 22:00 UTC in week 3 (counted neither way
            # in the top two: cy ranks third in both zones).
            berlin = (
                [(2, 2), (2, 3), (0, 1)],
                ["ana@x.example", "bo@x.example"],
                [[(2, 2), (0, 1), (0, 0)], [(0, 0), (2, 2), (0, 1)]],
            )
            assert await answer(conn, org, "Europe/Berlin") == berlin
            # The UTC bins read the week rows, the Berlin bins do not: change the ends of bo's
            # week rows (the ranking counts starts only), and only the UTC answer moves.
            await conn.execute(
                "UPDATE rollup_sessions_user SET ends = ends + 10"
                " WHERE org_id = $1 AND grain = $2 AND user_key = 'bo@x.example'",
                org,
                WEEK,
            )
            who = auth.Principal(0, org, "auditor", "aud@x.example")
            hq = _hq("Etc/UTC", MONDAY, MONDAY + timedelta(days=21), 2)
            tampered = await store.histogram(conn, who, hq, 30)
            assert tampered.top == utc[1] and tampered.by_value[1] != utc[2][1]
            assert await answer(conn, org, "Europe/Berlin") == berlin
            await rollups.rebuild(conn, org)
            assert await answer(conn, org, "Etc/UTC") == utc
        finally:
            await conn.close()

    run(go())


def test_the_migration_backfills_weeks_as_ingest_and_rebuild_write_them(stack: Stack) -> None:
    text = MIGRATION.read_text()
    found = re.search(
        r"^INSERT INTO rollup_sessions_user \((.*?)\)\n(SELECT .*?);$", text, re.M | re.S
    )
    assert found is not None
    assert tuple(c.strip() for c in found.group(1).split(",")) == rollups.SESSIONS_USER.columns
    # The backfill's SELECT for one org (the statement fills every org's).
    select = found.group(2).replace("WHERE grain = 2", "WHERE grain = 2 AND org_id = $1")
    assert select != found.group(2)
    weeks = (
        "SELECT org_id, grain, bucket, user_key, starts, ends FROM rollup_sessions_user"
        " WHERE org_id = $1 AND grain = 4 AND (starts <> 0 OR ends <> 0)"
    )

    async def go() -> None:
        conn = await db.connect(stack.dsn, json_codec=False)
        try:
            org = await auth.ensure_org(conn, f"weeks-{uuid.uuid4().hex[:10]}")
            await ingest_specs(conn, org, FIXTURE)
            # A session moves (its user and times change): ingest subtracts and adds.
            moved = Spec(id=FIXTURE[1].id, email="bo@x.example", start=_at(4), end=_at(20))
            await ingest_specs(conn, org, [moved])
            written = sorted(tuple(r) for r in await conn.fetch(weeks, org))
            backfilled = sorted(tuple(r) for r in await conn.fetch(select, org))
            await rollups.rebuild(conn, org)
            rebuilt = sorted(tuple(r) for r in await conn.fetch(weeks, org))
            assert written == backfilled == rebuilt
            # By hand: bo's starts per UTC week (Sunday 22nd, Tuesday 24th, Friday 20th).
            bo = [(r[2], r[4]) for r in rebuilt if r[3] == "bo@x.example" and r[4]]
            assert bo == [(MONDAY, 2), (MONDAY + timedelta(days=7), 1)]
        finally:
            await conn.close()

    run(go())


# -- random worlds against the plain-Python reference ------------------------------------------


@pytest.fixture(scope="module")
def wdb(stack: Stack) -> Iterator[Db]:
    d = Db(stack.dsn)
    yield d
    d.close()


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(data=st.data())
def test_weekly_and_daily_top_users_match_the_reference(
    stack: Stack, wdb: Db, data: st.DataObject
) -> None:
    """Windows of one to three weeks around the world's sessions, starting on a UTC Monday or
    a little off it (a Berlin or New York Monday, half an hour later): UTC week rows where a
    whole week fits, days and base rows elsewhere."""
    world = data.draw(worlds())
    org, specs = load(stack, world)
    for _ in range(3):
        monday = world.anchor.replace(hour=0, minute=0, second=0) - timedelta(
            days=world.anchor.weekday() + 7 * data.draw(st.integers(0, 1))
        )
        start = monday + data.draw(
            st.sampled_from([timedelta(0), timedelta(hours=-1), timedelta(hours=5),
                             timedelta(minutes=30), timedelta(days=-3)])
        )  # fmt: skip
        end = start + timedelta(days=7 * data.draw(st.integers(1, 3)))
        end += data.draw(st.sampled_from([timedelta(0), timedelta(hours=-2), timedelta(hours=1)]))
        a = Ask(
            zone=data.draw(st.sampled_from(ZONES)), start=start, end=end,
            bin_size=data.draw(st.sampled_from(["week", "week", "day"])), field="user",
            size=data.draw(st.integers(1, 3)), q="", pred=lambda s: True, sub_field=None,
            group_by="connection", filters={}, first_day=0, days=0,
        )  # fmt: skip
        check_histogram(wdb, org, specs, a)
