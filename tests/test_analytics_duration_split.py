"""A `q` on `duration` off the buckets' edges (`>3600`, `<=60`, `3599`, `[100 TO 200]`…) is
answered from rollup_outcomes for every bucket the comparison decides and from the sessions
table (index sessions_org_duration, migration 0056) for the buckets it leaves partial, with the
whole `q`: by hand on a small fixture in UTC and Europe/Berlin, before and after ingest changes
stored durations; and, over random sessions around the edges, equal to a plain-Python count
(tests/analytics_reference.py) for random AND/OR/NOT of duration and exit-code comparisons."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from session_audit.analytics import rollups, store
from session_audit.analytics.fields import BASE, DURATION_EDGES, OUTCOMES
from session_audit.analytics.q import exact_on, parse_q, partial_buckets
from session_audit.core import auth, db
from session_audit.core.validation import parse_zone
from tests import analytics_reference as ref
from tests.analytics_reference import Pred
from tests.factories import Spec, histogram_query, ingest_specs
from tests.support import Stack, run
from tests.test_analytics_rollups import consistent

MIGRATION = (
    Path(__file__).parent.parent
    / "src/session_audit/core/migrations/0056_sessions_by_duration_bucket.sql"
)
D1 = datetime(2026, 4, 6, tzinfo=UTC)
UTC_ZONE = parse_zone("")[1]


def test_the_index_key_is_the_rollups_bucket_expression() -> None:
    """The planner uses the index only for the very expression the query filters on."""
    expr = rollups.DURATION_BUCKET.replace("s.", "")
    assert "s." not in expr.replace("epoch", "")  # every column was qualified
    assert f"ON sessions (org_id, ({expr}), start_date)" in MIGRATION.read_text()


# Buckets (width_bucket over DURATION_EDGES): 0 below 0 s, 1 [0, 1), … 6 [60, 120),
# 7 [120, 300), 11 [1800, 3600), 12 [3600, 7200), 19 [604800, ∞).
@pytest.mark.parametrize(
    ("q", "partial"),
    [
        ("duration:>=3600", ()),
        ("duration:<60", ()),
        ("duration:[0 TO 604800}", ()),
        ("duration:* AND NOT exit_code:0", ()),
        ("exit_code:[1 TO 3] OR exit_code:137", ()),
        ("duration:>3600", (12,)),  # 3600 itself is in [3600, 7200) and not > 3600
        ("duration:<=60", (6,)),
        ("duration:3600", (12,)),
        ("duration:3599.5", (11,)),
        ("duration:>=3601", (12,)),
        ("duration:[60 TO 3600]", (12,)),
        ("duration:{60 TO 120}", (6,)),
        ("duration:[100 TO 110]", (6,)),  # inside one bucket
        ("duration:[100 TO 200]", (6, 7)),  # across two
        ("duration:>=0.5", (1,)),
        ("duration:>700000", (19,)),  # the unbounded last bucket
        ("NOT duration:>3600 OR exit_code:1", (12,)),
        ("duration:<=60 AND duration:>3600", (6, 12)),
    ],
)
def test_which_buckets_a_comparison_leaves_partial(q: str, partial: tuple[int, ...]) -> None:
    query = parse_q(q, UTC_ZONE)
    assert partial_buckets(query) == partial
    assert exact_on(query, OUTCOMES) and exact_on(query, BASE)
    assert DURATION_EDGES[11] == 3600 and DURATION_EDGES[5] == 60


def test_a_field_rollup_outcomes_lacks_still_goes_to_the_base_table() -> None:
    assert not exact_on(parse_q("duration:>3600 AND verb:exec", UTC_ZONE), OUTCOMES)


async def _both(conn: Any, org: uuid.UUID, hq: Any) -> list[tuple[int, int]]:
    """The rollup-and-split answer, checked equal to the sessions table's."""
    who = auth.Principal(0, org, "auditor", "aud@x.example")
    rolled = await store.histogram(conn, who, hq, 30)
    based = await store.histogram(conn, who, hq, 30, store.Options(force_base=True))
    assert rolled.source == OUTCOMES and based.source == BASE
    assert rolled.buckets == based.buckets, (rolled.buckets, based.buckets)
    return rolled.buckets


def _at(h: float, day: int = 0, s: float = 0) -> datetime:
    return D1 + timedelta(days=day, hours=h, seconds=s)


def test_off_edge_counts_by_hand_in_utc_and_berlin_and_after_updates(stack: Stack) -> None:
    a = Spec(start=_at(10), end=_at(11))  # 3600 s: bucket [3600, 7200)
    b = Spec(start=_at(10), end=_at(11, s=-1), exit_code=1)  # 3599 s: [1800, 3600)
    c = Spec(start=_at(11), end=_at(13), exit_code=137)  # 7200 s: [7200, 14400)
    d = Spec(start=_at(12))  # open: bucket -1
    e = Spec(start=_at(-0.5), end=_at(1))  # 5400 s, open when the window starts
    f = Spec(start=_at(20), end=_at(0.5, day=1))  # 16200 s, ends the next day
    g = Spec(start=_at(23.5), end=_at(0.5, day=1, s=60))  # 3660 s, ends the next day
    h = Spec(start=_at(5, day=1), end=_at(5, day=1, s=4000))  # 4000 s
    # 5430 s, ends 30 s into 7 April: started more than 3600 s (the bucket's shortest) before
    i = Spec(start=_at(22.5), end=_at(0, day=1, s=30))

    async def go() -> None:
        conn = await db.connect(stack.dsn, json_codec=False)
        try:
            org = await auth.ensure_org(conn, f"split-{uuid.uuid4().hex[:10]}")
            await ingest_specs(conn, org, [a, b, c, d, e, f, g, h, i])

            async def utc(q: str) -> list[tuple[int, int]]:
                return await _both(conn, org, histogram_query(q, "Etc/UTC", D1, 3))

            # (start_count, active_count) on 6, 7 and 8 April, UTC. > 3600: c e f g h i (the
            # ends on the 7th, i's included, take them out of the 8th).
            assert await utc("duration:>3600") == [(4, 5), (1, 4), (0, 0)]
            assert await utc("duration:<=3600") == [(2, 2), (0, 0), (0, 0)]  # a b
            assert await utc("duration:3600") == [(1, 1), (0, 0), (0, 0)]  # a
            assert await utc("duration:[3000 TO 4000]") == [(3, 3), (1, 2), (0, 0)]  # a b g h
            assert await utc("duration:[3650 TO 3700]") == [(1, 1), (0, 1), (0, 0)]  # g
            assert await utc("NOT duration:>3600") == [(3, 3), (0, 1), (0, 1)]  # a b d
            assert await utc("duration:>3600 OR exit_code:1") == [(5, 6), (1, 4), (0, 0)]  # + b
            assert await utc("duration:>3600 AND NOT exit_code:137") == [(3, 4), (1, 4), (0, 0)]
            # Berlin days (UTC+2) run 22:00-22:00 UTC: e starts on 6 April there, g, i on the 7th.
            assert await _both(conn, org, histogram_query("duration:>3600", "Europe/Berlin",
                                              datetime(2026, 4, 6), 2)) == [(3, 3), (3, 4)]  # fmt: skip
            # a lasts a second longer (same bucket, now > 3600); d ends after 38 h; c lasts
            # 30 minutes (leaves the query's buckets).
            a2 = replace(a, end=_at(11, s=1))
            d2 = replace(d, end=_at(2, day=1), exit_code=2)
            c2 = replace(c, end=_at(11.5))
            await ingest_specs(conn, org, [a2, d2, c2])
            assert await utc("duration:>3600") == [(5, 6), (1, 5), (0, 0)]  # a d e f g h i
            assert await utc("duration:3600") == [(0, 0), (0, 0), (0, 0)]
            assert await utc("duration:<=3600") == [(2, 2), (0, 0), (0, 0)]  # b c
            await consistent(conn, org)
        finally:
            await conn.close()

    run(go())


def test_the_last_bucket_a_week_or_more_by_hand(stack: Stack) -> None:
    """Thresholds of a week or more fall in the last bucket, which has no upper edge: its ends
    and open sessions come from the long sessions' index instead of a range by bucket."""
    j = Spec(start=_at(0, day=-10), end=_at(3, day=1))  # 11 days 3 h, open at the start
    k = Spec(start=_at(12, day=-8), end=_at(12))  # 8 days exactly (691,200 s)
    ll = Spec(start=_at(6, day=1), end=_at(6, day=10))  # 9 days, ends after the window
    m = Spec(start=_at(0, day=-17))  # open for weeks: no duration
    n = Spec(start=_at(10), end=_at(11), exit_code=1)  # an hour
    p = Spec(start=_at(12, day=-6), end=_at(13, day=1))  # 7 days 1 h, ends on the 7th

    async def go() -> None:
        conn = await db.connect(stack.dsn, json_codec=False)
        try:
            org = await auth.ensure_org(conn, f"split-long-{uuid.uuid4().hex[:10]}")
            await ingest_specs(conn, org, [j, k, ll, m, n, p])

            async def utc(q: str) -> list[tuple[int, int]]:
                return await _both(conn, org, histogram_query(q, "Etc/UTC", D1, 3))

            assert await utc("duration:>700000") == [(0, 1), (1, 2), (0, 1)]  # j ll
            assert await utc("duration:[604800 TO 700000]") == [(0, 2), (0, 1), (0, 0)]  # k p
            assert await utc("duration:[605000 TO 650000]") == [(0, 1), (0, 1), (0, 0)]  # p
            assert await utc("NOT duration:>700000") == [(1, 4), (0, 2), (0, 1)]  # k m n p
            assert await utc("duration:>700000 OR exit_code:1") == [(1, 2), (1, 2), (0, 1)]
            assert await _both(conn, org, histogram_query("duration:>700000", "Europe/Berlin",
                                              datetime(2026, 4, 6), 2)) == [(0, 1), (1, 2)]  # fmt: skip
        finally:
            await conn.close()

    run(go())


# -- random sessions around the edges vs the plain-Python count ---------------------------------

ANCHOR = datetime(2026, 3, 31, 22, tzinfo=UTC)  # near a month's end: windows use months
NEAR = [0.0, 1.0, -1.0, 0.5, -0.5, 0.000001, -0.000001]
# Every positive edge, and more often a few, so that durations and thresholds meet in a bucket.
EDGES = [e for e in DURATION_EDGES if e > 0] + [60, 3600, 7200, 86400, 604800] * 3


def near_edge() -> st.SearchStrategy[float]:
    return st.builds(lambda e, d: max(e + d, 0.0), st.sampled_from(EDGES), st.sampled_from(NEAR))


def day_edge(seconds: float) -> datetime:
    """A UTC or Berlin midnight near ANCHOR, `seconds` before it."""
    return ANCHOR + timedelta(days=-3, hours=2) - timedelta(seconds=seconds)


durations = st.one_of(
    st.none(),  # open
    near_edge(),
    st.floats(0, 3 * 86400, allow_nan=False).map(lambda x: round(x, 6)),
    st.floats(604800, 40 * 86400).map(lambda x: round(x, 3)),  # a week or more: bucket 19
)


@st.composite
def sessions(draw: st.DrawFn) -> Spec:
    start = draw(st.one_of(
        st.integers(-40 * 86400, 10 * 86400).map(lambda x: ANCHOR + timedelta(seconds=x)),
        # Shortly before a bin's start, so that it ends in the next bin (or open at its start).
        st.builds(lambda d, e, h: day_edge(e) + timedelta(days=d, hours=h), st.integers(-30, 3),
                  near_edge(), st.sampled_from([0, 0, 2, 22])),
    ))  # fmt: skip
    seconds = draw(durations)
    return Spec(
        start=start,
        end=None if seconds is None else start + timedelta(seconds=seconds),
        exit_code=draw(st.sampled_from([0, 0, 1, 137])),
    )


def threshold() -> st.SearchStrategy[float]:
    return st.one_of(
        near_edge(),
        st.integers(0, 700000).map(float),
        st.sampled_from([605000.0, 650000.0, 700000.0, 1e6, 2e6]),  # inside the last bucket
    )


def lasted(test: Callable[[float], bool]) -> Pred:
    """Ended sessions whose duration in seconds passes `test` (open ones have none)."""
    return lambda s: s.end is not None and test((s.end - s.start).total_seconds())


def num(x: float) -> str:
    return repr(x)


@st.composite
def comparisons(draw: st.DrawFn) -> tuple[str, Pred]:
    x = draw(threshold())
    kind = draw(st.sampled_from([">", ">=", "<", "<=", "=", "range", "exists", "exit"]))
    if kind == "exists":
        return "duration:*", lasted(lambda d: True)
    if kind == "exit":
        code = draw(st.sampled_from([0, 1, 137]))
        return f"exit_code:{code}", lambda s: s.end is not None and s.exit_code == code
    if kind == "=":
        return f"duration:{num(x)}", lasted(lambda d: d == x)
    if kind == "range":
        y = x + draw(st.one_of(near_edge(), st.floats(0, 5000).map(lambda v: round(v, 3))))
        lo_in, hi_in = draw(st.booleans()), draw(st.booleans())
        text = f"duration:{'[' if lo_in else '{'}{num(x)} TO {num(y)}{']' if hi_in else '}'}"

        def inside(d: float) -> bool:
            return (d >= x if lo_in else d > x) and (d <= y if hi_in else d < y)

        return text, lasted(inside)
    tests: dict[str, Callable[[float], bool]] = {
        ">": lambda d: d > x, ">=": lambda d: d >= x, "<": lambda d: d < x, "<=": lambda d: d <= x,
    }  # fmt: skip
    return f"duration:{kind}{num(x)}", lasted(tests[kind])


@st.composite
def queries(draw: st.DrawFn, depth: int = 0) -> tuple[str, Pred]:
    text, pred = draw(comparisons())
    if depth >= 2 or draw(st.booleans()):
        return text, pred
    op = draw(st.sampled_from(["AND", "OR", "NOT"]))
    if op == "NOT":
        return f"NOT ({text})", lambda s: not pred(s)
    other_text, other = draw(queries(depth + 1))
    if op == "AND":
        return f"({text}) AND ({other_text})", lambda s: pred(s) and other(s)
    return f"({text}) OR ({other_text})", lambda s: pred(s) or other(s)


class Db:
    def __init__(self, dsn: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn = self.loop.run_until_complete(db.connect(dsn, json_codec=False))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def sdb(stack: Stack) -> Iterator[Db]:
    d = Db(stack.dsn)
    yield d
    d.run(d.conn.close())
    d.loop.close()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(data=st.data())
def test_split_counts_equal_the_plain_python_count(sdb: Db, data: st.DataObject) -> None:
    specs = data.draw(st.lists(sessions(), min_size=1, max_size=30))
    # Some were reported before, open or (when they end) with another duration: their
    # contributions must move to their final bucket.
    drafts = [
        replace(s, end=None if s.end is None or data.draw(st.booleans())
                else s.start + timedelta(seconds=data.draw(near_edge())), exit_code=7)
        for s in specs
        if data.draw(st.booleans())
    ]  # fmt: skip
    org = sdb.run(auth.ensure_org(sdb.conn, f"split-prop-{uuid.uuid4().hex[:10]}"))
    draft_ids = {x.id for x in drafts}
    sdb.run(ingest_specs(sdb.conn, org, drafts + [s for s in specs if s.id not in draft_ids]))
    if drafts:
        sdb.run(ingest_specs(sdb.conn, org, [s for s in specs if s.id in draft_ids]))
    who = auth.Principal(0, org, "auditor", "aud@x.example")
    for _ in range(3):
        text, pred = data.draw(queries())
        zone_name = data.draw(st.sampled_from(["Etc/UTC", "Europe/Berlin"]))
        bins, days = data.draw(st.sampled_from([("day", 30), ("hour", 2), ("week", 35)]))
        offset = timedelta(hours=data.draw(st.integers(-30 * 24, 24)))
        _, zone = parse_zone(zone_name)
        start = (ANCHOR + offset).astimezone(zone).replace(minute=0, second=0, microsecond=0)
        hq = histogram_query(text, zone_name, start, days, bins)
        expected, _, _ = ref.histogram(specs, list(hq.bins), hq.start, hq.end, "protocol",
                                       None, pred)  # fmt: skip
        got = sdb.run(store.histogram(sdb.conn, who, hq, 30))
        assert got.source == OUTCOMES
        assert got.buckets == expected, (text, zone_name, bins, start)
