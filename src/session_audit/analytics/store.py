"""SQL for the report, the histogram and the statistics. No protobuf here.

Every answer is a sum over *pieces* of time (timebins.decompose): whole UTC months, weeks (the
per-user rollup), days (and hours, for the dimension-less totals) are read from a rollup, the
rest (what is left at the ends of a range, or everything when no rollup can answer) from the
sessions table. One statement per question: the rollup parts (one per grain) and the
base-table parts are UNION ALL-ed, each piece joined to its index range.

Which source answers (`plan`):
  * the base table for `user` tokens (their own sessions: a small slice, index-scanned), for
    orgs whose rollups are stale, and for anything a rollup does not carry (a `q` on other
    fields, a field/sub-field combination no rollup holds, group_by=id, an id filter);
  * otherwise the rollup that carries every field needed. (rollup_outcomes with a `duration`
    threshold off its bucket edges: the rollup for the buckets the `q` decides, plus the
    sessions of the one or two buckets it leaves partial from the sessions table,
    `_partial_parts`.)

Histogram active counts come from counters: sessions open during bin k are
    open(T0) + starts in [T0, end of bin k) - ends in [T0, start of bin k)
where T0 is the start of the range and open(T0) = starts - ends over all of history before T0
(rollup months/days/hours). On the base table, open(T0) is counted directly with a bounded
look-back: sessions started in the 24 hours before T0 and not ended by T0, plus the few long
or still-open ones (partial index sessions_org_long).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any

from session_audit.analytics import rollups
from session_audit.analytics.fields import BASE, CUBE, FIELDS, NAMES, OUTCOMES, USER, VALUES
from session_audit.analytics.q import (
    Query,
    buckets_of,
    compile_q,
    exact_on,
    partial_buckets,
    pinned_by,
)
from session_audit.analytics.requests import HistogramQuery, ReportQuery, StatsQuery
from session_audit.analytics.timebins import (
    EPOCH,
    HOUR,
    RAW,
    WEEK,
    Piece,
    cheapest,
    decompose,
    shorten,
)
from session_audit.core.auth import ORG_READERS, Principal
from session_audit.core.db import Conn
from session_audit.core.errors import InvalidArgument
from session_audit.core.sql import Sql, Template, Where, join, param, q

ROLLUP_TABLES = {
    CUBE: "rollup_sessions",
    USER: "rollup_sessions_user",
    VALUES: "rollup_values",
    OUTCOMES: "rollup_outcomes",
    NAMES: "rollup_names",
}
# Dimension-less counters: every piece of a count that filters and groups nothing.
TOTAL_TABLE = "rollup_sessions_total"
LOOK_BACK = timedelta(hours=24)
BASELINE = -1  # bin index of the pieces before the range (sessions open at its start)
INF = float("inf")

# -- report sources ----------------------------------------------------------------------------
REPORT_CONN, REPORT_USER = "redactions", "redactions_user"
REPORT_TABLES = {REPORT_CONN: "rollup_redactions", REPORT_USER: "rollup_redactions_user"}
REPORT_FINEST = {
    BASE: None,
    REPORT_CONN: rollups.REDACTIONS.finest,
    REPORT_USER: rollups.REDACTIONS_USER.finest,
}
FINEST = {
    CUBE: rollups.SESSIONS.finest,
    USER: rollups.SESSIONS_USER.finest,
    VALUES: rollups.VALUES.finest,
    OUTCOMES: rollups.OUTCOMES.finest,
    NAMES: rollups.NAMES.finest,
}
# Sources whose rollup also keeps UTC weeks (read where a whole week lies in a piece and that
# reads fewer rows than days and months: timebins.cheapest).
WEEKLY = frozenset(s for s, f in ((USER, rollups.SESSIONS_USER),) if WEEK in f.grains)
# Largest answer of the session report with group_by=id (items: session × info type).
MAX_ID_ITEMS = 10_000

# group_by → SQL per report source
REPORT_GROUP = {
    "connection": {BASE: "s.connection", REPORT_CONN: "r.connection"},
    "connection_type": {BASE: "s.connection_type", REPORT_CONN: "r.connection_type"},
    "user_email": {BASE: "lower(s.user_email)", REPORT_USER: "r.user_key"},
    "id": {BASE: "s.id::text"},
}
REPORT_FILTERS = {
    "connection": {BASE: "s.connection", REPORT_CONN: "r.connection"},
    "user_email": {BASE: "lower(s.user_email)", REPORT_USER: "r.user_key"},
    "verb": {BASE: "coalesce(s.verb, '')", REPORT_CONN: "r.verb"},
    "id": {BASE: "s.id"},
}


@dataclass
class Options:
    """Knobs for tests and benchmarks: `force_base` answers from the sessions table only."""

    force_base: bool = False


def _arrays(pieces: Sequence[Piece]) -> tuple[list[int], list[datetime], list[datetime], list[int]]:
    return (
        [p.grain for p in pieces],
        [p.lo for p in pieces],
        [p.hi for p in pieces],
        [p.bin for p in pieces],
    )


def _signs(pieces: Sequence[Piece]) -> list[int]:
    return [p.sign for p in pieces]


def _snapshot(conn: Conn, *, several: bool) -> AbstractAsyncContextManager[Any]:
    """One snapshot for an answer made of several counting statements (a top-N ranks, then
    counts the values it ranked): a read-only repeatable-read transaction. An answer made of
    one statement is consistent by itself; BEGIN and COMMIT would only add two round trips.
    (Whichever source the stale check picks is exact at any commit: the rollups change in
    the same transactions as the sessions.)"""
    if several:
        return conn.transaction(isolation="repeatable_read", readonly=True)
    return nullcontext()


async def _rollups_usable(conn: Conn, who: Principal, opts: Options, timeout: float) -> bool:
    if opts.force_base or who.role not in ORG_READERS:
        return False
    return not await rollups.is_stale(conn, who.org_id, timeout)


# -- histogram and statistics counts -----------------------------------------------------------


@dataclass(frozen=True)
class CountSpec:
    """What to count: sessions matching `q` (and `top` values of groups[0]), grouped by bin and
    the values of `groups`."""

    who: Principal
    source: str
    q: Query | None
    groups: tuple[str, ...] = ()
    top: tuple[str, ...] | None = None
    ends: bool = True


def _values_sql(spec: CountSpec, src: str) -> list[str]:
    return [FIELDS[g].sql[src] for g in spec.groups]


def _partial(spec: CountSpec) -> tuple[int, ...]:
    """The duration buckets `spec.q` leaves partial, when rollup_outcomes answers: their
    sessions are counted from the sessions table (`_partial_parts`), the rollup's rows and the
    raw pieces count every other bucket."""
    return partial_buckets(spec.q) if spec.source == OUTCOMES else ()


# The duration bucket of a rollup_outcomes row and of a session.
DURATION_BUCKET = {OUTCOMES: FIELDS["duration"].sql[OUTCOMES], BASE: rollups.DURATION_BUCKET}


def _filters(spec: CountSpec, src: str, *, per_value: bool = False) -> Sql:
    """The condition on rows of `src`; with `per_value`, the top value is the one `u.val` read
    instead of any of `spec.top`. Sessions of the buckets `spec.q` leaves partial are left out:
    `_partial_parts` counts them."""
    cond = compile_q(spec.q, src)
    partial = _partial(spec)
    if partial:
        cond += q(f" AND {DURATION_BUCKET[src]} <> all($partial::int[])", partial=list(partial))
    if src in (VALUES, NAMES):
        # rollup_values/rollup_names hold several fields' values: keep the one this count is
        # about.
        (name,) = _needed(spec.q, *spec.groups)
        cond += q(" AND r.field = $field::text", field=name)
    if spec.top is not None:
        top = FIELDS[spec.groups[0]].sql[src]
        if per_value:
            cond += Sql(f" AND {top} = u.val")
        else:
            cond += q(f" AND {top} = any($top::text[])", top=list(spec.top))
    return cond


def _group_cols(values: list[str]) -> tuple[Sql, Sql]:
    """SELECT list and GROUP BY positions for bin + values."""
    cols = ", ".join(f"{v} AS v{i}" for i, v in enumerate(values))
    positions = ", ".join(str(i) for i in range(1, len(values) + 2))
    return Sql(", " + cols if cols else ""), Sql(positions)


def _finest(spec: CountSpec) -> int | None:
    """The finest rollup grain that can answer `spec` (None: the base table only). A count
    that filters and groups nothing reads the dimension-less totals, which keep hours."""
    if spec.source == BASE:
        return None
    if spec.q is None and not spec.groups:
        return rollups.SESSIONS_TOTAL.finest
    return FINEST[spec.source]


def _by_grain(pieces: Sequence[Piece]) -> dict[int, list[Piece]]:
    out: dict[int, list[Piece]] = defaultdict(list)
    for x in pieces:
        out[x.grain].append(x)
    return out


# Slots: $cols/$positions/$table/$grain/$ends are code; the rest are values.
# Each piece is read by a LATERAL on its bounds, fenced by OFFSET 0 (not flattened into a
# join): always one index range scan per piece (a plain join let the planner scan every row of
# the org and grain once and filter the ranges). A piece's sign subtracts it (timebins.shorten).
ROLLUP_PART = Template("""
SELECT p.bin$cols, sum(r.starts * p.sign)::bigint AS starts, $ends AS ends
  FROM unnest($lo::timestamptz[], $hi::timestamptz[], $bin::int[], $sign::int[])
       AS p(lo, hi, bin, sign)
 CROSS JOIN LATERAL (SELECT r.starts, r.ends$inner FROM $table r
        WHERE r.org_id = $org AND r.grain = $grain AND r.bucket >= p.lo AND r.bucket < p.hi
          AND $filters OFFSET 0) r
 GROUP BY $positions""")
# The same shape for the sessions table: a join let the planner read every session of the org
# through the primary key and filter them when the filter looked selective to it (`q=role:x*`:
# 650 ms for a 30-day window at 1M), instead of one range of sessions_org_start per piece.
BASE_PART = Template("""
SELECT p.bin$cols, $measures
  FROM unnest($lo::timestamptz[], $hi::timestamptz[], $bin::int[]) AS p(lo, hi, bin)
 CROSS JOIN LATERAL (SELECT 1 AS one$inner FROM sessions s
        WHERE $scope AND s.$column >= p.lo AND s.$column < p.hi AND $filters OFFSET 0) x
 GROUP BY $positions""")
# Ends of the sessions a `q` pins to a few values of an indexed key (PINNED): a range of the
# end index would read every session ending in the piece and filter; the key's index
# (org_id, key, start_date) reads only the key's sessions, but bounded by start, not end. A
# session that ended in [lo, hi) started in [lo - LOOK_BACK, hi) (read from the key's index),
# or earlier and then lasted over LOOK_BACK (end_date >= start_date is a table constraint):
# those are read from the small partial index sessions_org_long (its predicate verbatim),
# fenced from the filter so that the planner cannot pick the key's index (its whole history
# before the piece, once per piece) instead.
BASE_ENDS_RECENT = Template("""
SELECT p.bin$cols, 0, count(*)
  FROM unnest($lo::timestamptz[], $hi::timestamptz[], $bin::int[]) AS p(lo, hi, bin)
 CROSS JOIN LATERAL (SELECT 1 AS one$inner FROM sessions s
        WHERE $scope AND s.start_date >= p.lo - $back::interval AND s.start_date < p.hi
          AND s.end_date >= p.lo AND s.end_date < p.hi AND $filters OFFSET 0) x
 GROUP BY $positions""")
BASE_ENDS_LONG = Template("""
SELECT p.bin$cols, 0, count(*)
  FROM unnest($lo::timestamptz[], $hi::timestamptz[], $bin::int[]) AS p(lo, hi, bin)
 CROSS JOIN LATERAL (SELECT 1 AS one$inner FROM (SELECT * FROM sessions s
        WHERE $scope AND (s.end_date IS NULL OR s.end_date - s.start_date > interval '24 hours')
          AND s.start_date < p.lo - $back::interval
          AND s.end_date >= p.lo AND s.end_date < p.hi OFFSET 0) s
        WHERE $filters OFFSET 0) x
 GROUP BY $positions""")
# Keys with an (org_id, key, start_date) index (migration 0001; `id` is the primary key).
PINNED = frozenset({"id", "user_id", "correlation_id"})
BASE_OPEN_AT = Template(f"""
SELECT {BASELINE}$cols, count(*), 0
  FROM sessions s
 WHERE $scope AND $window AND (s.end_date IS NULL OR s.end_date >= $at) AND $filters
 GROUP BY $positions""")
# Sessions open at $at: started in the look-back window, or earlier and still open. Only long
# or open sessions qualify for the second, which the partial index sessions_org_long holds (its
# predicate, verbatim, lets it be used).
RECENT = Template("s.start_date >= $since AND s.start_date < $at")
LONG = "(s.end_date IS NULL OR s.end_date - s.start_date > interval '24 hours')"
LONG_OR_OPEN = Template(LONG + " AND s.start_date < $since")
# The top-N's per-bin counts per user: one read per (piece, top user) pair, each an equality
# on the user and a range on the bucket: always the (org, grain, user, bucket) index
# rollup_sessions_user_by_user. (With `user = any(top)` the planner read whole months of every
# user through the primary key and filtered them.) Pieces and top users are sent as two arrays
# and crossed by PostgreSQL: sending every pair cost more to encode and bind than to run.
ROLLUP_PART_PER_VALUE = Template("""
SELECT p.bin$cols, sum(r.starts * p.sign)::bigint AS starts, $ends AS ends
  FROM unnest($lo::timestamptz[], $hi::timestamptz[], $bin::int[], $sign::int[])
       AS p(lo, hi, bin, sign)
 CROSS JOIN unnest($val::text[]) AS u(val)
 CROSS JOIN LATERAL (SELECT r.starts, r.ends$inner FROM $table r
        WHERE r.org_id = $org AND r.grain = $grain AND r.bucket >= p.lo AND r.bucket < p.hi
          AND $filters OFFSET 0) r
 GROUP BY $positions""")
SUMS = Sql("sum(r.ends * p.sign)::bigint")
NO_ENDS = Sql("0::bigint")


def _rollup_parts(spec: CountSpec, pieces: Sequence[Piece], table: str) -> list[Sql]:
    """One part per grain, the grain a constant: pieces and rollup rows share no equality, so
    each piece is a nested-loop index range scan (an equality on grain let the planner pick a
    merge join that rescans every row of the org per piece)."""
    values = _values_sql(spec, spec.source)
    cols, positions = _group_cols([f"r.v{i}" for i in range(len(values))])
    inner = Sql("".join(f", {v} AS v{i}" for i, v in enumerate(values)))
    per_value = spec.top is not None and spec.source == USER
    out = []
    for grain, group in sorted(_by_grain(pieces).items()):
        _, lo, hi, b = _arrays(group)
        sign = _signs(group)
        common = dict(
            cols=cols, ends=SUMS if spec.ends else NO_ENDS, inner=inner, table=Sql(table),
            org=spec.who.org_id, grain=Sql(str(int(grain))), positions=positions,
            filters=_filters(spec, spec.source, per_value=per_value),
        )  # fmt: skip
        if per_value:
            assert spec.top is not None
            out.append(ROLLUP_PART_PER_VALUE(
                lo=lo, hi=hi, bin=b, sign=sign, val=list(spec.top), **common
            ))  # fmt: skip
        else:
            out.append(ROLLUP_PART(lo=lo, hi=hi, bin=b, sign=sign, **common))
    return out


_MEASURES = {"start_date": Sql("count(*), 0"), "end_date": Sql("0, count(*)")}


def _base_parts(spec: CountSpec, pieces: Sequence[Piece], filters: Sql | None = None) -> list[Sql]:
    """Starts (and ends) of sessions in raw pieces, from the sessions table (matching
    `filters`, by default the spec's)."""
    if not pieces:
        return []
    _, lo, hi, b = _arrays(pieces)
    values = _values_sql(spec, BASE)
    cols, positions = _group_cols([f"x.v{i}" for i in range(len(values))])
    inner = Sql("".join(f", {v} AS v{i}" for i, v in enumerate(values)))
    out = []
    for column, measures in _MEASURES.items():
        if column == "end_date" and not spec.ends:
            continue
        common = dict(
            cols=cols, inner=inner, lo=lo, hi=hi, bin=b, positions=positions,
            scope=spec.who.scope(Where(), "s").sql(),
            filters=_filters(spec, BASE) if filters is None else filters,
        )  # fmt: skip
        if column == "end_date" and pinned_by(spec.q, PINNED):
            back = param(LOOK_BACK)
            out += [BASE_ENDS_RECENT(back=back, **common), BASE_ENDS_LONG(back=back, **common)]
        else:
            out.append(BASE_PART(measures=measures, column=Sql(column), **common))
    return out


def _base_open_at(spec: CountSpec, t0: datetime, filters: Sql | None = None) -> list[Sql]:
    """Sessions open at t0 (started before it, not ended before it), counted as `starts` of
    the BASELINE bin, by a bounded look-back (matching `filters`, by default the spec's)."""
    cols, positions = _group_cols(_values_sql(spec, BASE))
    at, since = param(t0), param(t0 - LOOK_BACK)
    return [
        BASE_OPEN_AT(
            cols=cols, scope=spec.who.scope(Where(), "s").sql(), window=window, at=at,
            filters=_filters(spec, BASE) if filters is None else filters, positions=positions,
        )
        for window in (RECENT(since=since, at=at), LONG_OR_OPEN(since=since))
    ]  # fmt: skip


# The sessions of the duration buckets a `q` leaves partial (`_partial`), counted with the full
# `q` from the index sessions_org_duration (migration 0056: org, bucket, start): one range per
# (bin, bucket). Starts are a range of start times; ends too, since a session of bucket
# [shortest, longest) that ended in [lo, hi) started in (lo - longest, hi - shortest]; and so
# are the sessions open at $at (started in (at - longest, at), not ended before at). Such a
# bucket always has an end (open sessions are bucket -1, which no comparison leaves partial).
PARTIAL_STARTS = Template("""
SELECT p.bin, count(*), 0
  FROM unnest($lo::timestamptz[], $hi::timestamptz[], $bin::int[]) AS p(lo, hi, bin)
 CROSS JOIN unnest($bucket::int[]) AS b(bucket)
 CROSS JOIN LATERAL (SELECT 1 FROM sessions s
        WHERE $scope AND $expr = b.bucket AND s.start_date >= p.lo AND s.start_date < p.hi
          AND $filters OFFSET 0) x
 GROUP BY 1""")
PARTIAL_ENDS = Template("""
SELECT p.bin, 0, count(*)
  FROM unnest($lo::timestamptz[], $hi::timestamptz[], $bin::int[]) AS p(lo, hi, bin)
 CROSS JOIN unnest($bucket::int[], $shortest::float8[], $longest::float8[])
       AS b(bucket, shortest, longest)
 CROSS JOIN LATERAL (SELECT 1 FROM sessions s
        WHERE $scope AND $expr = b.bucket
          AND s.start_date >= p.lo - b.longest * interval '1 second'
          AND s.start_date <= p.hi - b.shortest * interval '1 second'
          AND s.end_date >= p.lo AND s.end_date < p.hi AND $filters OFFSET 0) x
 GROUP BY 1""")
PARTIAL_OPEN_AT = Template(f"""
SELECT {BASELINE}, count(*), 0
  FROM unnest($bucket::int[], $longest::float8[]) AS b(bucket, longest)
 CROSS JOIN LATERAL (SELECT 1 FROM sessions s
        WHERE $scope AND $expr = b.bucket
          AND s.start_date >= $at::timestamptz - b.longest * interval '1 second'
          AND s.start_date < $at AND s.end_date >= $at AND $filters OFFSET 0) x""")
# The last bucket (a week or more) has no longest duration, so its ends and the sessions open
# at $at have no range of start times: the bucket's sessions that started before are read once
# (not once per bin), then the ends put in their bins. The planner takes them from that
# bucket's range of sessions_org_duration or from the partial index sessions_org_long (its
# predicate, verbatim: every session of the bucket is longer than 24 h); either holds only
# long sessions, a small share of an org's history.
PARTIAL_ENDS_LONG = Template(f"""
SELECT p.bin, 0, count(*)
  FROM (SELECT s.end_date AS at FROM sessions s
         WHERE $scope AND {LONG} AND $expr = any($bucket::int[])
           AND s.start_date <= $last::timestamptz - $shortest::float8 * interval '1 second'
           AND s.end_date >= $first AND s.end_date < $last AND $filters OFFSET 0) x
  JOIN unnest($lo::timestamptz[], $hi::timestamptz[], $bin::int[]) AS p(lo, hi, bin)
    ON x.at >= p.lo AND x.at < p.hi
 GROUP BY 1""")
PARTIAL_OPEN_AT_LONG = Template(f"""
SELECT {BASELINE}, count(*), 0
  FROM sessions s
 WHERE $scope AND {LONG} AND $expr = any($bucket::int[]) AND s.start_date < $at
   AND s.end_date >= $at AND $filters""")


def _partial_parts(
    spec: CountSpec, intervals: Sequence[tuple[datetime, datetime, int]], open_at: datetime | None
) -> list[Sql]:
    """Starts, ends (and the sessions open at `open_at`) of the sessions in the buckets
    `spec.q` leaves partial, matching the whole `q`, per interval, from the sessions table:
    by bucket from sessions_org_duration; the ends and the open ones of the last bucket (a
    week or more) from sessions_org_long; those of negative durations (which ingest refuses)
    like any base-table count, by start and end time over the window."""
    partial = _partial(spec)
    if not partial:
        return []
    assert not spec.groups and spec.top is None, "rollup_outcomes answers plain counts only"
    widths = buckets_of(FIELDS["duration"].edges)
    bounded = [k for k in partial if widths[k][0] > -INF and widths[k][1] < INF]
    # Every session of these is long enough for sessions_org_long (> 24 hours).
    long = [k for k in partial if widths[k][1] == INF and widths[k][0] > LOOK_BACK.total_seconds()]
    rest = [k for k in partial if k not in bounded and k not in long]
    scope = spec.who.scope(Where(), "s").sql()
    expr = Sql(rollups.DURATION_BUCKET)
    filters = compile_q(spec.q, BASE)
    common = dict(scope=scope, expr=expr, filters=filters)
    lo, hi, b = [x[0] for x in intervals], [x[1] for x in intervals], [x[2] for x in intervals]
    out: list[Sql] = []
    if intervals and (bounded or long):
        out.append(PARTIAL_STARTS(lo=lo, hi=hi, bin=b, bucket=bounded + long, **common))
    if bounded:
        shortest, longest = [widths[k][0] for k in bounded], [widths[k][1] for k in bounded]
        if intervals:
            out.append(PARTIAL_ENDS(lo=lo, hi=hi, bin=b, bucket=bounded, longest=longest,
                                    shortest=shortest, **common))  # fmt: skip
        if open_at is not None:
            out.append(PARTIAL_OPEN_AT(at=param(open_at), bucket=bounded, longest=longest,
                                       **common))  # fmt: skip
    if long:
        if intervals:
            out.append(PARTIAL_ENDS_LONG(
                lo=lo, hi=hi, bin=b, bucket=long, first=min(lo), last=max(hi),
                shortest=min(widths[k][0] for k in long), **common,
            ))  # fmt: skip
        if open_at is not None:
            out.append(PARTIAL_OPEN_AT_LONG(at=param(open_at), bucket=long, **common))
    if rest:
        only = filters + q(f" AND {rollups.DURATION_BUCKET} = any($b::int[])", b=rest)
        pieces = [Piece(RAW, lo, hi, b) for lo, hi, b in intervals]
        out += _base_parts(spec, pieces, only)
        if open_at is not None:
            out += _base_open_at(spec, open_at, only)
    return out


Key = tuple[Any, ...]  # (bin, *values)


@dataclass
class Counts:
    starts: dict[Key, int] = field(default_factory=lambda: defaultdict(int))
    ends: dict[Key, int] = field(default_factory=lambda: defaultdict(int))


# A count on the sessions table alone over contiguous bins, with the sessions open at their
# start (a histogram answered from the base table): every session is read once, from one range
# of sessions_org_start (its start in the window or in the look-back before it) plus the long
# ones from sessions_org_long, and PostgreSQL groups them by the bin of their start, the bin
# of their end and whether they were open at the start (width_bucket over the bins' edges).
# Reading the starts and the ends by two ranges, one per piece each, read every session of the
# window twice (`event_size:>1000` at 10M: 111 -> 76 ms). Exact for the same reason as the
# open-at count: a session that ended in the window or was open at its start either started
# less than LOOK_BACK before it or lasted longer (end_date >= start_date is a constraint).
ONE_PASS = Template(f"""
SELECT width_bucket(x.start_date, $edges::timestamptz[]),
       CASE WHEN x.end_date IS NULL THEN 0 ELSE width_bucket(x.end_date, $edges) END,
       x.start_date < $first AND (x.end_date IS NULL OR x.end_date >= $first)$cols, count(*)
  FROM (SELECT s.start_date, s.end_date$inner FROM sessions s
         WHERE $scope AND s.start_date >= $since AND s.start_date < $last AND $filters
        UNION ALL
        SELECT s.start_date, s.end_date$inner FROM sessions s
         WHERE $scope AND {LONG} AND s.start_date < $since
           AND (s.end_date IS NULL OR s.end_date >= $first) AND $filters) x
 GROUP BY $positions""")


def _one_pass_fits(
    spec: CountSpec, intervals: list[tuple[datetime, datetime, int]], open_at: datetime | None
) -> bool:
    """Whether `_count_one_pass` answers: the sessions table alone, starts and ends of
    contiguous bins and the sessions open at the first one's start, and no key that pins the
    query to a few sessions (those read the key's index instead, PINNED)."""
    return (
        spec.source == BASE
        and spec.ends
        and bool(intervals)
        and open_at == intervals[0][0]
        and all(a[1] == b[0] for a, b in pairwise(intervals))
        and not pinned_by(spec.q, PINNED)
    )


async def _count_one_pass(
    conn: Conn,
    spec: CountSpec,
    intervals: list[tuple[datetime, datetime, int]],
    timeout: float,
) -> Counts:
    values = _values_sql(spec, BASE)
    inner = Sql("".join(f", {v} AS v{i}" for i, v in enumerate(values)))
    cols = Sql("".join(f", x.v{i}" for i in range(len(values))))
    positions = Sql(", ".join(str(i) for i in range(1, len(values) + 4)))
    first, last = intervals[0][0], intervals[-1][1]
    sql, args = ONE_PASS(
        edges=[lo for lo, _, _ in intervals] + [last], first=param(first), last=param(last),
        since=param(first - LOOK_BACK), cols=cols, inner=inner, positions=positions,
        scope=spec.who.scope(Where(), "s").sql(), filters=_filters(spec, BASE),
    ).render()  # fmt: skip
    # width_bucket: 0 before the first edge, k + 1 in bin k, len(intervals) + 1 from the end on.
    bins = {k + 1: b for k, (_, _, b) in enumerate(intervals)}
    out = Counts()
    for row in await conn.fetch(sql, *args, timeout=timeout):
        started, ended, was_open, *group, n = tuple(row)
        if started in bins:
            out.starts[(bins[started], *group)] += n
        if ended in bins:
            out.ends[(bins[ended], *group)] += n
        if was_open:
            out.starts[(BASELINE, *group)] += n
    return out


async def count(
    conn: Conn,
    spec: CountSpec,
    intervals: Iterable[tuple[datetime, datetime, int]],
    timeout: float,
    *,
    open_at: datetime | None = None,
) -> Counts:
    """Sessions started (and ended) in each interval, per bin and group values; with
    `open_at`, also those open at that moment, as the starts of bin BASELINE."""
    use_rollups = spec.source != BASE
    finest = _finest(spec)
    weeks = finest != HOUR and spec.source in WEEKLY
    pieces: list[Piece] = []
    intervals = list(intervals)
    if _one_pass_fits(spec, intervals, open_at):
        return await _count_one_pass(conn, spec, intervals, timeout)
    for lo, hi, b in intervals:
        pieces += cheapest(lo, hi, b, finest, weeks)
    if open_at is not None and use_rollups:
        pieces += cheapest(EPOCH, open_at, BASELINE, finest, weeks)
    parts = []
    rolled = [x for x in pieces if x.grain != RAW]
    if rolled:
        table = TOTAL_TABLE if finest == HOUR else ROLLUP_TABLES[spec.source]
        parts += _rollup_parts(spec, rolled, table)
    parts += _base_parts(spec, [x for x in pieces if x.grain == RAW])
    if open_at is not None and not use_rollups:
        parts += _base_open_at(spec, open_at)
    parts += _partial_parts(spec, intervals, open_at)
    out = Counts()
    if not parts:
        return out
    sql, args = join(" UNION ALL ", ("(" + part + ")" for part in parts)).render()
    for row in await conn.fetch(sql, *args, timeout=timeout):
        key = tuple(row)[:-2]
        out.starts[key] += row[-2]
        out.ends[key] += row[-1]
    return out


def plan(who: Principal, needed: set[str], rollups_ok: bool, query: Query | None = None) -> str:
    """The source that answers: a rollup carrying every needed field (and answering `query`
    exactly), else the base table."""
    if not rollups_ok or who.role not in ORG_READERS:
        return BASE
    # One field only (grouped by and/or searched): its per-value totals, a few rows per day.
    if len(needed) == 1 and VALUES in FIELDS[next(iter(needed))].sql:
        return VALUES
    # `role` alone or `resource` alone (searched only: neither is groupable): rollup_names.
    if len(needed) == 1 and NAMES in FIELDS[next(iter(needed))].sql:
        return NAMES
    for source in (CUBE, USER, OUTCOMES):
        if all(source in FIELDS[name].sql for name in needed) and exact_on(query, source):
            return source
    return BASE


def _needed(q: Query | None, *fields: str | None) -> set[str]:
    out = set(q.fields) if q is not None else set()
    out.update(f for f in fields if f)
    return out


def rank(totals: dict[str, int], size: int) -> list[str]:
    """The `size` most frequent non-empty values: most sessions first, ties by value (code
    point order)."""
    ranked = sorted(
        (v for v, n in totals.items() if v != "" and n > 0), key=lambda v: (-totals[v], v)
    )
    return ranked[:size]


@dataclass(frozen=True)
class HistogramResult:
    # Per bucket: (start_count, active_count)
    buckets: list[tuple[int, int]]
    # Top values in rank order, and per bucket their (start_count, active_count).
    top: list[str]
    by_value: list[list[tuple[int, int]]]
    source: str


async def histogram(
    conn: Conn, who: Principal, hq: HistogramQuery, timeout: float, opts: Options | None = None
) -> HistogramResult:
    opts = opts or Options()
    async with _snapshot(conn, several=bool(hq.size)):
        usable = await _rollups_usable(conn, who, opts, timeout)
        needed = _needed(hq.q, hq.field if hq.size else None)
        source = plan(who, needed, usable, hq.q)
        intervals = hq.intervals()
        top: list[str] = []
        if hq.size:
            spec = CountSpec(who, source, hq.q, (hq.field,), ends=False)
            ranking = await count(conn, spec, [(hq.start, hq.end, 0)], timeout)
            totals = {key[1]: n for key, n in ranking.starts.items()}
            top = rank(totals, hq.size)
            spec = CountSpec(who, source, hq.q, (hq.field,), tuple(top))
        else:
            spec = CountSpec(who, source, hq.q)
        if hq.size and not top:
            counts = Counts()
        else:
            counts = await count(
                conn,
                spec,
                [(lo, hi, k) for k, (lo, hi) in enumerate(intervals)],
                timeout,
                open_at=hq.start if intervals else None,
            )
    groups: list[tuple[str, ...]] = [(v,) for v in top] if hq.size else [()]
    series = [_active(counts, g, len(intervals)) for g in groups]
    if hq.size:
        totals_per_bin = [
            (sum(s[k][0] for s in series), sum(s[k][1] for s in series))
            for k in range(len(intervals))
        ]
        return HistogramResult(totals_per_bin, top, series, source)
    return HistogramResult(series[0], [], [], source)


def _active(counts: Counts, group: tuple[str, ...], n: int) -> list[tuple[int, int]]:
    """(start_count, active_count) per bin: active = open at T0 + started before the bin's
    end - ended before its start."""
    opened = counts.starts.get((BASELINE, *group), 0) - counts.ends.get((BASELINE, *group), 0)
    out = []
    started_before_end = 0
    ended_before_start = 0
    for k in range(n):
        starts = counts.starts.get((k, *group), 0)
        started_before_end += starts
        out.append((starts, opened + started_before_end - ended_before_start))
        ended_before_start += counts.ends.get((k, *group), 0)
    return out


@dataclass(frozen=True)
class StatsResult:
    total: int
    # (value, count, [(sub value, count)], sub_other)
    values: list[tuple[str, int, list[tuple[str, int]], int]]
    other: int
    source: str


async def stats(
    conn: Conn, who: Principal, sq: StatsQuery, timeout: float, opts: Options | None = None
) -> StatsResult:
    opts = opts or Options()
    async with _snapshot(conn, several=False):
        usable = await _rollups_usable(conn, who, opts, timeout)
        source = plan(who, _needed(sq.q, sq.field, sq.sub_field), usable, sq.q)
        groups = (sq.field, sq.sub_field) if sq.sub_field else (sq.field,)
        spec = CountSpec(who, source, sq.q, groups, ends=False)
        counts = await count(conn, spec, [(sq.start, sq.end, 0)], timeout)
    per_value: dict[str, int] = defaultdict(int)
    per_sub: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for key, n in counts.starts.items():
        per_value[key[1]] += n
        if sq.sub_field:
            per_sub[key[1]][key[2]] += n
    total = sum(per_value.values())
    values = []
    for value in rank(per_value, sq.size):
        n = per_value[value]
        subs: list[tuple[str, int]] = []
        sub_other = 0
        if sq.sub_field:
            split = per_sub[value]
            subs = [(s, split[s]) for s in rank(split, sq.size)]
            sub_other = n - sum(c for _, c in subs)
        values.append((value, n, subs, sub_other))
    other = total - sum(n for _, n, _, _ in values)
    return StatsResult(total, values, other, source)


# -- report ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportResult:
    # (resource, info_type, redact_total, transformed_bytes), ordered by resource, info type
    items: list[tuple[str, str, int, int]]
    source: str


def report_plan(who: Principal, rq: ReportQuery, rollups_ok: bool) -> str:
    if not rollups_ok or who.role not in ORG_READERS or rq.session_id is not None:
        return BASE
    used = {"verb"} if rq.verb else set()
    if rq.connection:
        used.add("connection")
    if rq.user_email:
        used.add("user_email")
    for source in (REPORT_CONN, REPORT_USER):
        if source in REPORT_GROUP[rq.group_by] and all(source in REPORT_FILTERS[f] for f in used):
            return source
    return BASE


def _report_where(rq: ReportQuery, src: str) -> Sql:
    w = Where()
    if rq.connection:
        w.add(f"{REPORT_FILTERS['connection'][src]} = $v", v=rq.connection)
    if rq.user_email:
        w.add(f"{REPORT_FILTERS['user_email'][src]} = $v", v=rq.user_email)
    if rq.verb:
        w.add(f"{REPORT_FILTERS['verb'][src]} = $v", v=rq.verb)
    if rq.session_id is not None and src == BASE:
        w.add(f"{REPORT_FILTERS['id'][src]} = $v::uuid", v=rq.session_id)
    return w.sql()


REPORT_ROLLUP_PART = Template("""
SELECT $resource AS resource, r.info_type, sum(r.sessions * p.sign)::bigint,
       sum(r.redact_total * p.sign)::bigint, sum(r.transformed_bytes * p.sign)::bigint
  FROM unnest($lo::timestamptz[], $hi::timestamptz[], $sign::int[]) AS p(lo, hi, sign)
 CROSS JOIN LATERAL (SELECT * FROM $table r
        WHERE r.org_id = $org AND r.grain = $grain AND r.bucket >= p.lo AND r.bucket < p.hi
          AND $filters OFFSET 0) r
 GROUP BY 1, 2""")
# A session reports each info type once (ingest checks it), so with group_by=id the base rows
# are already one per item: no grouping needed.
REPORT_BASE_PART = Template("""
SELECT $resource AS resource, x ->> 'info_type' AS info_type, $measures
  FROM unnest($lo::timestamptz[], $hi::timestamptz[]) AS p(lo, hi)
  JOIN sessions s ON s.end_date >= p.lo AND s.end_date < p.hi
 CROSS JOIN LATERAL jsonb_array_elements(s.redactions) x
 WHERE $scope AND jsonb_typeof(s.redactions) = 'array' AND $filters$group""")
PER_SESSION = Sql("1, (x ->> 'count')::bigint, (x ->> 'transformed_bytes')::bigint")
PER_GROUP = Sql("count(*), sum((x ->> 'count')::bigint), sum((x ->> 'transformed_bytes')::bigint)")
GROUP_1_2 = Sql(" GROUP BY 1, 2")
# Merged and ordered by PostgreSQL (byte order of UTF-8 = code point order); a row whose
# sessions all moved away (sums back to zero) is not an item.
REPORT_ORDER = ' ORDER BY resource COLLATE "C", info_type COLLATE "C"'
REPORT_ONE = Template(f"SELECT * FROM ($part) u{REPORT_ORDER}")
REPORT_MERGED = Template(f"""
SELECT resource, info_type, sum(r)::bigint, sum(b)::bigint
  FROM ($union) u(resource, info_type, n, r, b)
 GROUP BY 1, 2 HAVING sum(n) > 0{REPORT_ORDER}""")


async def report(
    conn: Conn, who: Principal, rq: ReportQuery, timeout: float, opts: Options | None = None
) -> ReportResult:
    opts = opts or Options()
    usable = await _rollups_usable(conn, who, opts, timeout)
    source = report_plan(who, rq, usable)
    pieces = shorten(decompose(rq.start, rq.end, 0, REPORT_FINEST[source]))
    parts: list[Sql] = []
    rolled = [x for x in pieces if x.grain != RAW]
    for grain, group in sorted(_by_grain(rolled).items()):
        _, lo, hi, _ = _arrays(group)
        parts.append(REPORT_ROLLUP_PART(
            resource=Sql(REPORT_GROUP[rq.group_by][source]), lo=lo, hi=hi, sign=_signs(group),
            table=Sql(REPORT_TABLES[source]), org=who.org_id, grain=Sql(str(int(grain))),
            filters=_report_where(rq, source),
        ))  # fmt: skip
    raw = [x for x in pieces if x.grain == RAW]
    per_session = rq.group_by == "id"
    if raw:
        _, lo, hi, _ = _arrays(raw)
        parts.append(REPORT_BASE_PART(
            resource=Sql(REPORT_GROUP[rq.group_by][BASE]),
            measures=PER_SESSION if per_session else PER_GROUP, lo=lo, hi=hi,
            scope=who.scope(Where(), "s").sql(), filters=_report_where(rq, BASE),
            group=Sql() if per_session else GROUP_1_2,
        ))  # fmt: skip
    if not parts:
        return ReportResult([], source)
    if len(parts) == 1 and per_session:
        statement = REPORT_ONE(part=parts[0])
    else:
        statement = REPORT_MERGED(union=join(" UNION ALL ", ("(" + x + ")" for x in parts)))
    sql, args = statement.render()
    if per_session:
        # One item per session and info type: bounded, so memory does not grow with the
        # window (docs/reliability.md); the Reports API exports any number of sessions.
        sql += f" LIMIT {MAX_ID_ITEMS + 1}"
    rows = await conn.fetch(sql, *args, timeout=timeout)
    if per_session and len(rows) > MAX_ID_ITEMS:
        raise InvalidArgument(
            f"group_by: id lists at most {MAX_ID_ITEMS} items and this window has more; "
            "narrow start_date/end_date or filter (connection_name, user_email, verb), or "
            "export every session with the Reports API (POST /api/v2/report, then "
            "GET /api/v2/report/{id}/csv)"
        )
    if len(parts) == 1 and per_session:
        items = [(r[0], r[1], r[3], r[4]) for r in rows]
    else:
        items = [(r[0], r[1], r[2], r[3]) for r in rows]
    return ReportResult(items, source)
