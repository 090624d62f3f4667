"""Property tests: random sessions (spanning many bins, still open, exactly on bin edges, around
DST changes, reported open then closed, some deleted, in several orgs) go through the real
ingest path into the real database; every answer — report, histogram, statistics, through the
rollups and through the base tables, for an auditor and for a user token — must equal the
plain-Python reference over the same rows (tests/analytics_reference.py)."""

from __future__ import annotations

import asyncio
import fnmatch
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from session_audit.analytics import requests, rollups, store
from session_audit.analytics.fields import GROUPABLE
from session_audit.analytics.q import parse_q
from session_audit.analytics.timebins import bin_starts, day_start
from session_audit.core import auth, db
from session_audit.core.validation import parse_zone
from session_audit.sessions.ingest import IngestBatch
from tests import analytics_reference as ref
from tests.analytics_reference import Pred
from tests.factories import Spec
from tests.support import Stack, run

EXAMPLES = 80
T = TypeVar("T")

ANCHORS = [
    datetime(2026, 3, 29, 1, tzinfo=UTC),  # Europe/Berlin springs forward
    datetime(2026, 3, 8, 7, tzinfo=UTC),  # America/New_York springs forward
    datetime(2026, 10, 25, 1, tzinfo=UTC),  # Europe/Berlin falls back
    datetime(2026, 11, 1, 6, tzinfo=UTC),  # America/New_York falls back
    datetime(2026, 2, 28, 23, tzinfo=UTC),  # a month edge (and Berlin's 1 March)
]
ZONES = ["Etc/UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"]
CONNECTIONS = {
    "pg-prod": "database",
    "pg-stg": "database",
    "bastion": "custom",
    "win": "application",
}
PROTOCOLS = ["postgres", "ssh", "rdp"]
EMAILS = ["ana@x.example", "ANA@x.example", "bo@x.example", "cy@x.example"]
REVIEWS = [None, None, "APPROVED", "PENDING", "REJECTED"]
INFO_TYPES = ["EMAIL_ADDRESS", "PHONE_NUMBER", "IBAN_CODE"]
ROLES = ["dba", "dev", "ops-1", "ops-2"]
RESOURCES = [None, "", "db-a", "db-b", "web"]  # None: not sent (NULL)
VIEWER = "ana@x.example"


def offsets(max_minutes: int) -> st.SearchStrategy[timedelta]:
    """Minutes from an anchor, often exactly on an hour or day edge."""
    return st.one_of(
        st.integers(-max_minutes, max_minutes).map(lambda m: timedelta(minutes=m)),
        st.integers(-max_minutes // 60, max_minutes // 60).map(lambda h: timedelta(hours=h)),
        st.integers(-max_minutes // 1440, max_minutes // 1440).map(lambda d: timedelta(days=d)),
        st.integers(-max_minutes * 60, max_minutes * 60).map(lambda s: timedelta(seconds=s)),
    )


durations = st.one_of(
    st.none(),  # still open
    st.just(timedelta(0)),
    # On and around the duration buckets' edges (rollup_outcomes), to the second.
    st.sampled_from([59, 60, 61, 299, 300, 1799, 1800, 3599, 3600, 3601, 86400]).map(
        lambda n: timedelta(seconds=n)
    ),
    st.integers(1, 600).map(lambda m: timedelta(minutes=m)),
    st.integers(1, 24 * 6).map(lambda h: timedelta(hours=h)),  # spans many bins
)


@st.composite
def sessions(draw: st.DrawFn, anchor: datetime) -> Spec:
    connection = draw(st.sampled_from(sorted(CONNECTIONS)))
    start = anchor + draw(offsets(4 * 1440))
    duration = draw(durations)
    reds = draw(
        st.lists(
            st.tuples(st.sampled_from(INFO_TYPES), st.integers(0, 20), st.integers(0, 500)),
            max_size=3,
            unique_by=lambda r: r[0],
        )
    )
    return Spec(
        start=start,
        end=None if duration is None else start + duration,
        email=draw(st.sampled_from(EMAILS)),
        connection=connection,
        type=CONNECTIONS[connection],
        subtype=draw(st.sampled_from(PROTOCOLS)),
        verb=draw(st.sampled_from(["exec", "connect"])),
        review_status=draw(st.sampled_from(REVIEWS)),
        redactions=tuple(reds),
        exit_code=draw(st.sampled_from([0, 0, 1, 2, 137])),
        role=draw(st.sampled_from(ROLES)),
        resource=draw(st.sampled_from(RESOURCES)),
        user_id=draw(st.sampled_from(["sub-1", "sub-2"])),
        correlation_id=draw(st.sampled_from([None, "c-1", "c-2"])),
    )


@st.composite
def name_leaves(draw: st.DrawFn) -> list[tuple[str, Pred]]:
    """Role and resource terms (rollup_names answers them alone); a resource never sent, or
    sent empty, is no value."""
    leaves: list[tuple[str, Pred]] = []
    ro = draw(st.sampled_from(["dba", "ops-*", "d?v", "*"]))
    if ro == "*":
        leaves.append(("role:*", lambda s: s.role_name != ""))
    else:
        leaves.append((f"role:{ro}", lambda s: fnmatch.fnmatchcase(s.role_name, ro)))
    leaves.append(("role:(dba OR ops-2)", lambda s: s.role_name in ("dba", "ops-2")))
    rs = draw(st.sampled_from(["db-a", "db-*", "*", '"web"']))
    if rs == "*":
        leaves.append(("resource:*", lambda s: bool(s.resource)))
    else:
        leaves.append(
            (f"resource:{rs}", lambda s: fnmatch.fnmatchcase(s.resource or "", rs.strip('"')))
        )
    return leaves


@st.composite
def one_name_terms(draw: st.DrawFn, field: str | None = None, depth: int = 0) -> tuple[str, Pred]:
    """A q on role only or on resource only: what rollup_names answers (without size)."""
    field = field or draw(st.sampled_from(["role", "resource"]))
    leaf = draw(st.sampled_from([x for x in draw(name_leaves()) if x[0].startswith(field)]))
    return _combined(draw, leaf, depth, lambda: one_name_terms(field, depth + 1))


@st.composite
def q_terms(draw: st.DrawFn, anchor: datetime, depth: int = 0) -> tuple[str, Pred]:
    """A q string and the predicate it means, written independently of the compiler."""
    leaves: list[tuple[str, Pred]] = []
    c = draw(st.sampled_from(sorted(CONNECTIONS)))
    leaves.append((f"connection:{c}", lambda s: s.connection == c))
    pattern = draw(st.sampled_from(["pg*", "b*", "*n", "pg-???"]))
    leaves.append((f"connection:{pattern}", lambda s: fnmatch.fnmatchcase(s.connection, pattern)))
    p = draw(st.sampled_from(PROTOCOLS))
    leaves.append((f'protocol:"{p}"', lambda s: s.subtype == p))
    v = draw(st.sampled_from(["exec", "CONNECT"]))
    leaves.append((f"verb:{v}", lambda s: s.verb == v.lower()))
    leaves.append(("status:open", lambda s: s.end is None))
    r = draw(st.sampled_from(["APPROVED", "pending", "*"]))
    if r == "*":
        leaves.append(("review_status:*", lambda s: s.review_status is not None))
    else:
        leaves.append((f"review_status:{r}", lambda s: s.review_status == r.upper()))
    u = draw(st.sampled_from(["ANA@x.example", "bo*", "C?@x.example"]))
    leaves.append((f"user:{u}", lambda s: fnmatch.fnmatchcase(s.email.lower(), u.lower())))
    # Keys with their own index: a q pinned to one value reads ends by start (store.PINNED).
    uid = draw(st.sampled_from(["sub-1", "sub-2"]))
    leaves.append((f"user_id:{uid}", lambda s: s.user_id == uid))
    leaves.append(("user_id:(sub-1 OR sub-3)", lambda s: s.user_id in ("sub-1", "sub-3")))
    corr = draw(st.sampled_from(["c-1", "c-2"]))
    leaves.append((f"correlation_id:{corr}", lambda s: s.correlation_id == corr))
    lo = anchor + draw(offsets(2 * 1440))
    # An offset's "+" is Lucene syntax: such times go in quotes; Z needs none.
    bound = draw(st.sampled_from([lo.strftime("%Y-%m-%dT%H:%M:%SZ"), f'"{lo.isoformat()}"']))
    leaves.append((f"start:[{bound} TO *]", lambda s: s.start >= lo))

    def lasted(test: Callable[[float], bool]) -> Pred:
        """Ended sessions whose duration in seconds passes `test` (open ones have none)."""
        return lambda s: s.end is not None and test((s.end - s.start).total_seconds())

    # Durations at bucket edges (rollup_outcomes answers) and not (rollup_outcomes for the
    # buckets the comparison decides, the sessions table for the partial ones).
    lo_s, hi_s = draw(st.sampled_from([(60, 3600), (300, 1800), (3599, 3601), (0, 60)]))
    leaves += [
        ("duration:>=3600", lasted(lambda d: d >= 3600)),
        (f"duration:<{hi_s}", lasted(lambda d: d < hi_s)),
        (f"duration:[{lo_s} TO {hi_s}}}", lasted(lambda d: lo_s <= d < hi_s)),
        (f"duration:>{lo_s}", lasted(lambda d: d > lo_s)),
        (f"duration:<={hi_s}", lasted(lambda d: d <= hi_s)),
        (f"duration:{lo_s}", lasted(lambda d: d == lo_s)),
        ("duration:*", lasted(lambda d: True)),
    ]
    x = draw(st.sampled_from([0, 1, 137]))
    leaves.append((f"exit_code:{x}", lambda s: s.end is not None and s.exit_code == x))
    leaves.append(("exit_code:>=1", lambda s: s.end is not None and s.exit_code >= 1))
    leaves += draw(name_leaves())
    return _combined(draw, draw(st.sampled_from(leaves)), depth,
                     lambda: q_terms(anchor, depth + 1))  # fmt: skip


def _combined(
    draw: st.DrawFn,
    leaf: tuple[str, Pred],
    depth: int,
    more: Callable[[], st.SearchStrategy[tuple[str, Pred]]],
) -> tuple[str, Pred]:
    """`leaf` alone, or negated, or ANDed/ORed with a term drawn from `more()` (to depth 2)."""
    text, pred = leaf
    if depth >= 2 or draw(st.booleans()):
        return text, pred
    op = draw(st.sampled_from(["AND", "OR", "NOT"]))
    if op == "NOT":
        return f"NOT ({text})", lambda s: not pred(s)
    other_text, other = draw(more())
    if op == "AND":
        return f"({text}) AND ({other_text})", lambda s: pred(s) and other(s)
    return f"({text}) OR ({other_text})", lambda s: pred(s) or other(s)


@dataclass
class World:
    anchor: datetime
    specs: list[Spec]
    drafts: list[Spec]
    deleted: list[Spec]
    others: list[Spec]


@st.composite
def worlds(draw: st.DrawFn) -> World:
    anchor = draw(st.sampled_from(ANCHORS))
    specs = draw(st.lists(sessions(anchor), min_size=1, max_size=25))
    # Some sessions were first reported open, on another connection and by another protocol,
    # then closed with their final values: their contributions must move.
    # Some drafts of sessions that end had already ended, with another duration and exit code.
    # Drafts name another role and resource (a resource not sent later keeps the stored one).
    drafts = [
        replace(s, end=None if s.end is None or draw(st.booleans()) else s.start + timedelta(hours=1),
                exit_code=7, redactions=(), review_status=None, connection="pg-prod",
                type="database", subtype="postgres", role="draft",
                resource=None if s.resource is None else "db-draft")
        for s in specs
        if draw(st.booleans())
    ]  # fmt: skip
    deleted = [s for s in specs if draw(st.integers(0, 9)) == 0]
    others = [replace(s, id=str(uuid.uuid4())) for s in specs[: draw(st.integers(0, 5))]]
    return World(anchor, specs, drafts, deleted, others)


async def _ingest(dsn: str, org_id: uuid.UUID, batches: list[list[Spec]]) -> None:
    conn = await db.connect(dsn, json_codec=False)
    try:
        for batch in batches:
            if not batch:
                continue
            async with conn.transaction():
                async with IngestBatch(conn, org_id, 60) as b:
                    for s in batch:
                        await b.add(s.to_proto())
                    result = await b.finish()
            assert result.rejected == 0, result.rejections
    finally:
        await conn.close()


def load(stack: Stack, world: World) -> tuple[uuid.UUID, list[Spec]]:
    """Ingest the world into two fresh orgs; returns our org and the sessions it keeps."""

    async def go() -> uuid.UUID:
        conn = await db.connect(stack.dsn)
        try:
            org = await auth.ensure_org(conn, f"prop-{uuid.uuid4().hex[:10]}")
            other = await auth.ensure_org(conn, f"prop-other-{uuid.uuid4().hex[:10]}")
        finally:
            await conn.close()
        draft_ids = {d.id for d in world.drafts}
        firsts = [s for s in world.specs if s.id not in draft_ids]
        await _ingest(
            stack.dsn, org, [world.drafts + firsts, [s for s in world.specs if s.id in draft_ids]]
        )
        await _ingest(stack.dsn, other, [world.others])
        if world.deleted:
            conn = await db.connect(stack.dsn)
            try:
                # The service's delete (no trigger): rollups follow in the same transaction.
                await rollups.delete_sessions(
                    conn, org, [uuid.UUID(s.id) for s in world.deleted], 60.0
                )
            finally:
                await conn.close()
        return org

    org = run(go())
    gone = {s.id for s in world.deleted}
    return org, [s for s in world.specs if s.id not in gone]


@dataclass(frozen=True)
class Ask:
    zone: str
    start: datetime
    end: datetime
    bin_size: str
    field: str
    size: int | None
    q: str
    pred: Pred
    sub_field: str | None
    group_by: str
    filters: dict[str, Any]
    first_day: int
    days: int


@st.composite
def asks(draw: st.DrawFn, world: World) -> Ask:
    zone = draw(st.sampled_from(ZONES))
    start = world.anchor + draw(offsets(3 * 1440))
    length = draw(st.sampled_from([timedelta(hours=h) for h in (1, 3, 24, 49, 24 * 7)]))
    length += draw(st.sampled_from([timedelta(0), timedelta(minutes=30), timedelta(seconds=7)]))
    choices = ["hour", "day", "week", "month"] + (
        ["minute"] if length <= timedelta(hours=3) else []
    )
    q, pred = draw(
        st.one_of(st.just(("", lambda s: True)), q_terms(world.anchor), one_name_terms())
    )
    spec = draw(st.sampled_from(world.specs))
    filters: dict[str, Any] = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "connection": st.sampled_from(sorted(CONNECTIONS)),
                "user_email": st.sampled_from(["ANA@x.example", "bo@x.example"]),
                "verb": st.sampled_from(["exec", "connect"]),
                "session_id": st.just(spec.id.upper()),
            },
        )
    )
    return Ask(
        zone=zone,
        start=start,
        end=start + length,
        bin_size=draw(st.sampled_from(choices)),
        field=draw(st.sampled_from(GROUPABLE)),
        size=draw(st.one_of(st.none(), st.integers(1, 3))),
        q=q,
        pred=pred,
        sub_field=draw(st.one_of(st.none(), st.sampled_from(GROUPABLE))),
        group_by=draw(st.sampled_from(requests.GROUP_BYS)),
        filters=filters,
        first_day=draw(st.integers(-4, 3)),
        days=draw(st.integers(0, 6)),
    )


def principals(org: uuid.UUID) -> list[tuple[auth.Principal, str | None]]:
    return [
        (auth.Principal(0, org, "auditor", "aud@x.example"), None),
        (auth.Principal(0, org, "user", VIEWER), VIEWER),
    ]


class Db:
    """One event loop and one connection for the whole hypothesis run."""

    def __init__(self, dsn: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn = self.loop.run_until_complete(db.connect(dsn))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.conn.close())
        self.loop.close()


def check_histogram(d: Db, org: uuid.UUID, specs: list[Spec], a: Ask) -> None:
    _, zone = parse_zone(a.zone)
    bins = bin_starts(a.start, a.end, a.bin_size, zone, requests.MAX_BUCKETS)
    q = parse_q(a.q, zone)
    hq = requests.HistogramQuery(a.field, a.bin_size, a.start, a.end, a.zone, zone, a.size, q,
                                 tuple(bins))  # fmt: skip
    for who, viewer in principals(org):
        expected = ref.histogram(
            ref.visible(specs, viewer), bins, a.start, a.end, a.field, a.size, a.pred
        )
        for force in (False, True):
            got = d.run(store.histogram(d.conn, who, hq, 30, store.Options(force_base=force)))
            assert (got.buckets, got.top, got.by_value) == expected, (who.role, force, got.source)


def check_stats(d: Db, org: uuid.UUID, specs: list[Spec], a: Ask) -> None:
    _, zone = parse_zone(a.zone)
    size = a.size or 2
    sq = requests.StatsQuery(a.field, a.sub_field, size, a.start, a.end, a.zone, zone,
                             parse_q(a.q, zone))  # fmt: skip
    for who, viewer in principals(org):
        expected = ref.stats(
            ref.visible(specs, viewer), a.start, a.end, a.field, a.sub_field, size, a.pred
        )
        for force in (False, True):
            got = d.run(store.stats(d.conn, who, sq, 30, store.Options(force_base=force)))
            assert (got.total, got.values, got.other) == expected, (who.role, force, got.source)


def check_report(d: Db, org: uuid.UUID, specs: list[Spec], a: Ask) -> None:
    _, zone = parse_zone(a.zone)
    day0 = a.start.astimezone(zone).date() + timedelta(days=a.first_day)
    start, end = day_start(day0, zone), day_start(day0 + timedelta(days=a.days), zone)
    f = a.filters
    rq = requests.ReportQuery(
        group_by=a.group_by,
        connection=f.get("connection"),
        user_email=f["user_email"].lower() if "user_email" in f else None,
        verb=f.get("verb"),
        session_id=uuid.UUID(f["session_id"]) if "session_id" in f else None,
        start=start,
        end=end,
        zone=a.zone,
    )
    for who, viewer in principals(org):
        expected = ref.report(ref.visible(specs, viewer), start, end, a.group_by, **f)
        for force in (False, True):
            got = d.run(store.report(d.conn, who, rq, 30, store.Options(force_base=force)))
            assert got.items == expected, (who.role, force, got.source)


@pytest.fixture(scope="module")
def qdb(stack: Stack) -> Iterator[Db]:
    d = Db(stack.dsn)
    yield d
    d.close()


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(data=st.data())
def test_every_answer_matches_the_reference(stack: Stack, qdb: Db, data: st.DataObject) -> None:
    world = data.draw(worlds())
    org, specs = load(stack, world)
    for _ in range(3):
        a = data.draw(asks(world))
        check_histogram(qdb, org, specs, a)
        check_stats(qdb, org, specs, a)
        check_report(qdb, org, specs, a)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(world=worlds())
def test_rollups_equal_a_rebuild_after_ingest_updates_and_deletes(
    stack: Stack, world: World
) -> None:
    """Whatever was ingested, updated and deleted (ingest maintains the rollups,
    rollups.delete_sessions takes deleted sessions out in the same transaction): the rollups
    are exactly what recomputing them from the sessions with rollups.py's definitions gives.
    Half of what is left is deleted too, so deletion is exercised on every example."""
    org, specs = load(stack, world)

    async def go() -> None:
        conn = await db.connect(stack.dsn)
        try:
            await rollups.delete_sessions(conn, org, [uuid.UUID(s.id) for s in specs[::2]], 60.0)
            before = {f.table: await snapshot(conn, f, org) for f in rollups.FAMILIES}
            await rollups.rebuild(conn, org)
            after = {f.table: await snapshot(conn, f, org) for f in rollups.FAMILIES}
            assert before == after
        finally:
            await conn.close()

    run(go())


async def snapshot(conn: Any, f: rollups.Family, org: uuid.UUID) -> list[tuple[Any, ...]]:
    """The rows of a rollup table for one org that count anything."""
    nonzero = " OR ".join(f"{c} <> 0" for c, _ in f.measures)
    rows = await conn.fetch(
        f"SELECT * FROM {f.table} WHERE org_id = $1 AND ({nonzero}) ORDER BY {', '.join(f.key)}",
        org,
    )
    return [tuple(r) for r in rows]
