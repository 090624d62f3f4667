"""Rollups: per org, time bucket and dimensions, kept current by ingest.

Eight tables (migrations 0010, 0050, 0052, 0054, 0055), with UTC buckets at the grains that pay
for themselves:

    rollup_sessions         day, month   starts/ends per connection, type, protocol, verb,
                                         status, review status
    rollup_sessions_total   hour, day,   starts/ends, no dimensions (one row per org and
                            month        hour/day/month)
    rollup_sessions_user    day, week,   starts/ends per user (lower-cased e-mail)
                            month
    rollup_redactions       day, month   report sums per connection, type, verb, info type
                                         (by end time)
    rollup_redactions_user  day, month   report sums per user, info type
    rollup_values           day, month   starts/ends per (field, value) of each cube field
                                         alone: what a top-N or one-field statistic ranks
    rollup_outcomes         day, month   starts/ends per duration bucket and exit code
    rollup_names            day, month   starts/ends per (field, value) of role and resource,
                                         each alone: a `q` on one of them

Rows with dimensions barely compress within an hour (about one row per session or two), so
only the dimension-less totals keep hours: they answer histograms that filter and group
nothing at any bin size and in any zone, from a handful of rows. Partial days of other
answers (ranges not aligned to UTC days) come from the base table, a small slice. (Measured:
hourly rows with dimensions cost a third of ingest's rate, most of it in the final upsert.)

How ingest keeps them current, in the batch's own transaction:

  * per chunk, the contributions of the chunk's sessions are computed by PostgreSQL from the
    stored rows and added to per-connection temporary delta tables: for sessions already
    stored, their old contribution is subtracted (read under the FOR UPDATE lock ingest takes)
    before the merge, and the new one added after it;
  * once per batch, just before commit, `apply` folds the deltas into the rollups with one
    `INSERT … ON CONFLICT DO UPDATE` per table, rows in primary-key order.

Deferring the shared-row writes to one ordered statement per table at the end means two
concurrent batches lock rollup rows in the same order and only for the last moment of their
transaction: they cannot deadlock on rollup rows and do not hold each other up for a whole
stream. Counters are added (never overwritten), so concurrent batches lose nothing.

`rebuild` recomputes everything from the base table (backfills, or after ingest with
maintenance off, which marks the org stale so reads use the base tables meanwhile).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from session_audit.analytics.fields import BASE, CUBE, DURATION_EDGES, FIELDS
from session_audit.analytics.timebins import DAY, HOUR, MONTH, WEEK
from session_audit.core.db import Conn
from session_audit.core.schema import INGEST_COLUMNS

# Grain numbers as stored (timebins.HOUR/DAY/MONTH); the unit is date_trunc's.
UNITS = {HOUR: "hour", DAY: "day", MONTH: "month", WEEK: "week"}


def grains_sql(grains: tuple[int, ...]) -> str:
    values = ", ".join(f"({g}::smallint, '{UNITS[g]}')" for g in grains)
    return f"(VALUES {values}) g(grain, unit)"


@dataclass(frozen=True)
class Family:
    """One rollup table and how a session contributes to it."""

    table: str
    # (column, SQL expression over the session row `s`)
    dims: tuple[tuple[str, str], ...]
    # (column, SQL expression of the contribution)
    measures: tuple[tuple[str, str], ...]
    # FROM items after `sessions s`, giving the time `t.at` each contribution is bucketed by.
    lateral: str
    where: str
    # Grains kept, finest first.
    grains: tuple[int, ...] = (DAY, MONTH)
    # The primary key's column order when it is not `key`'s (ingest upserts in this order).
    pk: tuple[str, ...] = ()
    # Captured only (no table of its name): the delta table's columns, instead of LIKE table.
    delta_columns: str = ""

    @property
    def key(self) -> tuple[str, ...]:
        return ("org_id", "grain", "bucket", *(c for c, _ in self.dims))

    @property
    def order(self) -> str:
        """ORDER BY positions (in `key`) of the primary key's columns: the order in which
        every writer locks this table's rows."""
        return ", ".join(str(self.key.index(c) + 1) for c in (self.pk or self.key))

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.key, *(c for c, _ in self.measures))

    @property
    def finest(self) -> int:
        return self.grains[0]

    def contributions(
        self, source_where: str, source: str = "sessions", grains: tuple[int, ...] | None = None
    ) -> str:
        """SELECT of the aggregated contributions of the rows of `source` (the sessions table,
        or a relation with its columns) matching `source_where`, at `grains` (default: the
        table's)."""
        n = len(self.key)
        columns = [
            "s.org_id",
            "g.grain",
            "date_trunc(g.unit, t.at, 'UTC') AS bucket",
            *(e for _, e in self.dims),
            *(f"sum({e})" for _, e in self.measures),
        ]
        return (
            f"SELECT {', '.join(columns)}"
            f" FROM {source} s {self.lateral} CROSS JOIN {grains_sql(grains or self.grains)}"
            f" WHERE ({source_where}) AND {self.where}"
            f" GROUP BY {', '.join(str(i) for i in range(1, n + 1))}"
        )


_START_END = "CROSS JOIN LATERAL (VALUES (s.start_date, 1, 0), (s.end_date, 0, 1)) t(at, st, en)"
_REDACTIONS = (
    "CROSS JOIN LATERAL jsonb_array_elements(s.redactions) x"
    " CROSS JOIN LATERAL (VALUES (s.end_date)) t(at)"
)
_REDACTION_SUMS = (
    ("sessions", "1"),
    ("redact_total", "(x ->> 'count')::bigint"),
    ("transformed_bytes", "(x ->> 'transformed_bytes')::bigint"),
)

SESSIONS = Family(
    table="rollup_sessions",
    dims=(
        ("connection", "s.connection"),
        ("connection_type", "s.connection_type"),
        ("connection_subtype", "s.connection_subtype"),
        ("verb", "coalesce(s.verb, '')"),
        ("status", "s.status"),
        ("review_status", "coalesce(s.review_status, '')"),
    ),
    measures=(("starts", "t.st"), ("ends", "t.en")),
    lateral=_START_END,
    where="t.at IS NOT NULL",
)
SESSIONS_TOTAL = Family(
    table="rollup_sessions_total",
    dims=(),
    measures=(("starts", "t.st"), ("ends", "t.en")),
    lateral=_START_END,
    where="t.at IS NOT NULL",
    grains=(HOUR, DAY, MONTH),
)
# Weeks too (migration 0054): a top-N of users per weekly bin reads one row per (week, top
# user) instead of seven days; ingest upserts three rows per (user, day) touched instead of two.
SESSIONS_USER = Family(
    table="rollup_sessions_user",
    dims=(("user_key", "lower(s.user_email)"),),
    measures=(("starts", "t.st"), ("ends", "t.en")),
    lateral=_START_END,
    where="t.at IS NOT NULL",
    grains=(DAY, WEEK, MONTH),
)
REDACTIONS = Family(
    table="rollup_redactions",
    dims=(
        ("connection", "s.connection"),
        ("connection_type", "s.connection_type"),
        ("verb", "coalesce(s.verb, '')"),
        ("info_type", "x ->> 'info_type'"),
    ),
    measures=_REDACTION_SUMS,
    lateral=_REDACTIONS,
    where="s.end_date IS NOT NULL AND jsonb_typeof(s.redactions) = 'array'",
)
REDACTIONS_USER = Family(
    table="rollup_redactions_user",
    # No verb: per user it would double the rows (and ingest's cost) for a rare combination.
    dims=(("user_key", "lower(s.user_email)"), ("info_type", "x ->> 'info_type'")),
    measures=_REDACTION_SUMS,
    lateral=_REDACTIONS,
    where="s.end_date IS NOT NULL AND jsonb_typeof(s.redactions) = 'array'",
)
# Per-field totals (migration 0050): one row per (org, bucket, field, value), what a top-N or
# a one-field statistic ranks, without summing every dimension combination of rollup_sessions.
# The fields and their SQL are analytics.fields' (values as the cube stores them).
VALUE_FIELDS = ("protocol", "connection", "connection_type", "verb", "status", "review_status")


def _unpivot(names: tuple[str, ...]) -> str:
    """Each session's starts and ends once per field of `names`, as (field, value) rows."""
    pairs = ", ".join(f"('{name}', {FIELDS[name].sql[BASE]})" for name in names)
    return f"{_START_END} CROSS JOIN LATERAL (VALUES {pairs}) f(field, value)"


VALUES = Family(
    table="rollup_values",
    dims=(("field", "f.field"), ("value", "f.value")),
    measures=(("starts", "t.st"), ("ends", "t.en")),
    lateral=_unpivot(VALUE_FIELDS),
    where="t.at IS NOT NULL",
)
# How sessions ended (migration 0052): starts/ends per duration bucket (fields.DURATION_EDGES;
# -1 while open) and exit code ('' when none): a `q` on `duration` and/or `exit_code`
# (store.plan; the buckets a threshold leaves partial come from the sessions table,
# store._partial_parts). A session that ends moves from bucket -1 to its own, like any changed
# field (ingest subtracts the stored contribution, adds the merged one).
_DURATION = "extract(epoch FROM s.end_date - s.start_date)::float8"
_EDGES = "'{" + ",".join(f"{e:g}" for e in DURATION_EDGES) + "}'::float8[]"
# A session's duration bucket, over the sessions table `s`. Also the key of the index
# sessions_org_duration (migration 0056, the same expression without `s.`): the sessions of
# one bucket, by start time, which store.count reads for the buckets a `q` leaves partial.
DURATION_BUCKET = f"coalesce(width_bucket({_DURATION}, {_EDGES}), -1)"
OUTCOMES = Family(
    table="rollup_outcomes",
    dims=(
        ("duration_bucket", DURATION_BUCKET),
        ("exit_code", "coalesce(s.exit_code::text, '')"),
    ),
    measures=(("starts", "t.st"), ("ends", "t.en")),
    lateral=_START_END,
    where="t.at IS NOT NULL",
)
# Role and resource names (migration 0055): one row per (org, bucket, field, value), like
# rollup_values, for the fields no other rollup carries, so a `q` on `role` alone or on
# `resource` alone (store.plan) reads a few rows per day. Values exactly as the base table
# compares them (fields.FIELDS[...].sql[BASE]: a NULL resource is '', which `resource:*` does
# not match there either). Captured per session (the cube has neither field to derive them
# from: ingest captures (role, resource) pairs, NAME_PAIRS below). Rows per org and day:
# distinct roles + distinct resources that day — at most two per session, whatever the
# cardinality. The key puts `field` before `bucket`, so reading one field's days skips the
# other field's rows (many resources must not slow `q=role:…`).
NAME_FIELDS = ("role", "resource")
NAMES = Family(
    table="rollup_names",
    dims=(("field", "f.field"), ("value", "f.value")),
    measures=(("starts", "t.st"), ("ends", "t.en")),
    lateral=_unpivot(NAME_FIELDS),
    where="t.at IS NOT NULL",
    pk=("org_id", "grain", "field", "bucket", "value"),
)
# What ingest captures for rollup_names: starts/ends per (role, resource) pair and day, one
# row per session and time, unpivoted into NAMES' (field, value) rows when applied (capturing
# the unpivoted rows, two per session and time, cost twice as much: 4.4 against 2.4 µs per
# session, docs/benchmarks.md). No table: deltas only.
NAME_PAIRS = Family(
    table="rollup_names_pairs",
    dims=tuple((name, FIELDS[name].sql[BASE]) for name in NAME_FIELDS),
    measures=(("starts", "t.st"), ("ends", "t.en")),
    lateral=_START_END,
    where="t.at IS NOT NULL",
    delta_columns="org_id uuid, grain smallint, bucket timestamptz, "
    + ", ".join(f"{name} text" for name in NAME_FIELDS)
    + ", starts integer, ends integer",
)
FAMILIES = (
    SESSIONS, SESSIONS_TOTAL, SESSIONS_USER, REDACTIONS, REDACTIONS_USER, VALUES, OUTCOMES, NAMES
)  # fmt: skip
# What ingest captures per chunk. VALUES is derived from the cube's deltas when they are
# applied (each field's totals are sums over the cube's rows): unpivoting every session into
# six (field, value) rows per chunk cost ingest a tenth of its rate, the aggregated deltas
# almost nothing. NAMES likewise from NAME_PAIRS.
CAPTURED = (
    SESSIONS, SESSIONS_TOTAL, SESSIONS_USER, REDACTIONS, REDACTIONS_USER, OUTCOMES, NAME_PAIRS
)  # fmt: skip


def _delta_table(f: Family) -> str:
    return f"pg_temp.delta_{f.table}"


CREATE_DELTAS = "; ".join(
    f"CREATE TEMP TABLE IF NOT EXISTS delta_{f.table} ({f.delta_columns or f'LIKE {f.table}'})"
    " ON COMMIT DELETE ROWS"
    for f in CAPTURED
)


# Session columns any family reads, with their types.
SOURCE_COLUMNS = (
    ("org_id", "uuid"), ("start_date", "timestamptz"), ("end_date", "timestamptz"),
    ("connection", "text"), ("connection_type", "text"), ("connection_subtype", "text"),
    ("verb", "text"), ("status", "text"), ("review_status", "text"), ("user_email", "text"),
    ("redactions", "jsonb"), ("exit_code", "integer"), ("role_name", "text"),
    ("resource_name", "text"),
)  # fmt: skip
_NAMES = ", ".join(c for c, _ in SOURCE_COLUMNS)
# Where each source column sits in an ingest record (core.schema.INGEST_COLUMNS order).
_RECORD_INDEX = tuple(INGEST_COLUMNS.index(c) for c, _ in SOURCE_COLUMNS)


def _capture_sql(src: str) -> str:
    """One statement: the contributions of the sessions of `src` times `$1` (+1 or -1) at each
    table's finest grain, into every delta table. The rows are read once (a materialized CTE)
    for all the tables; coarser grains are derived when the deltas are applied."""
    parts = [f"src AS MATERIALIZED ({src})"]
    for i, f in enumerate(CAPTURED):
        select = f.contributions("TRUE", "src", (f.finest,))
        signed = ", ".join(
            [*f.key, *(f"{c} * $1::int" for c, _ in f.measures)]
        )  # fmt: skip
        parts.append(
            f"d{i} AS (INSERT INTO {_delta_table(f)} ({', '.join(f.columns)})"
            f" SELECT {signed} FROM ({select}) c({', '.join(f.columns)}))"
        )
    return "WITH " + ", ".join(parts) + " SELECT 1"


# The stored rows of org $3's ids $2: sessions being overwritten, just merged, or just copied
# in (on one node: see Deltas.add_copied).
CAPTURE = _capture_sql(f"SELECT {_NAMES} FROM sessions WHERE org_id = $3 AND id = any($2::uuid[])")
# Rows given as one array per column ($2…): sessions just copied in, whose stored values are
# exactly what was sent, so they need not be read back (on Citus: see Deltas.add_copied).
CAPTURE_VALUES = _capture_sql(
    "SELECT "
    + ", ".join(f"{c}::jsonb" if t == "jsonb" else c for c, t in SOURCE_COLUMNS)
    + " FROM unnest("
    + ", ".join(
        f"${i}::{'text' if t == 'jsonb' else t}[]" for i, (_, t) in enumerate(SOURCE_COLUMNS, 2)
    )
    + f") AS v({_NAMES})"
)


def _bucket_sql(f: Family) -> str:
    """A delta's bucket at grain `g.grain`: deltas are at the finest grain already, so only the
    coarser grains are truncated (date_trunc with a zone is the costly part of applying)."""
    return (
        f"CASE WHEN g.grain = {f.finest} THEN d.bucket ELSE date_trunc(g.unit, d.bucket, 'UTC') END"
    )


def _apply_sql(f: Family) -> str:
    """Deltas at the finest grain → rows at every grain, upserted in primary-key order."""
    key = ", ".join(f.key)
    dims = [c for c, _ in f.dims]
    select = ", ".join(["d.org_id", "g.grain", _bucket_sql(f), *(f"d.{c}" for c in dims)])
    sums = ", ".join(f"sum(d.{c})" for c, _ in f.measures)
    nonzero = " OR ".join(f"sum(d.{c}) <> 0" for c, _ in f.measures)
    positions = ", ".join(str(i) for i in range(1, len(f.key) + 1))
    updates = ", ".join(f"{c} = r.{c} + EXCLUDED.{c}" for c, _ in f.measures)
    return (
        f"INSERT INTO {f.table} AS r ({', '.join(f.columns)})"
        f" SELECT {select}, {sums} FROM {_delta_table(f)} d CROSS JOIN {grains_sql(f.grains)}"
        f" GROUP BY {positions} HAVING {nonzero} ORDER BY {f.order}"
        f" ON CONFLICT ({key}) DO UPDATE SET {updates}"
    )


def _apply_unpivoted_sql(f: Family, deltas: Family, fields: list[tuple[str, str]]) -> str:
    """Rows of `f` (field, value) from `deltas`' rows at the finest grain → every grain, in
    primary-key order. Each delta row is bucketed once per grain (a fenced subquery), then
    unpivoted into one row per (field name, delta column) of `fields`."""
    unpivot = ", ".join(f"('{name}', x.{col})" for name, col in fields)
    inner = ", ".join(sorted({f"d.{col}" for _, col in fields}))
    positions = ", ".join(str(i) for i in range(1, len(f.key) + 1))
    updates = ", ".join(f"{c} = r.{c} + EXCLUDED.{c}" for c, _ in f.measures)
    return (
        f"INSERT INTO {f.table} AS r ({', '.join(f.columns)})"
        f" SELECT x.org_id, x.grain, x.bucket, v.field, v.value, sum(x.starts), sum(x.ends)"
        f" FROM (SELECT d.org_id, g.grain, {_bucket_sql(deltas)} AS bucket, {inner},"
        f" d.starts, d.ends FROM {_delta_table(deltas)} d CROSS JOIN {grains_sql(f.grains)}"
        f" OFFSET 0) x CROSS JOIN LATERAL (VALUES {unpivot}) v(field, value)"
        f" GROUP BY {positions} HAVING sum(x.starts) <> 0 OR sum(x.ends) <> 0"
        f" ORDER BY {f.order} ON CONFLICT ({', '.join(f.key)}) DO UPDATE SET {updates}"
    )


def _apply_values_sql() -> str:
    """rollup_values from the cube's deltas (each field's totals are sums over the cube)."""
    return _apply_unpivoted_sql(VALUES, SESSIONS, [
        (name, FIELDS[name].sql[CUBE].removeprefix("r.")) for name in VALUE_FIELDS
    ])  # fmt: skip


def _apply_names_sql() -> str:
    """rollup_names from the (role, resource) deltas, field before bucket in its key."""
    return _apply_unpivoted_sql(NAMES, NAME_PAIRS, [(name, name) for name in NAME_FIELDS])


assert SESSIONS.finest == VALUES.finest and VALUES.grains == SESSIONS.grains
assert NAME_PAIRS.grains == NAMES.grains
APPLY = (
    *(_apply_sql(f) for f in CAPTURED if f is not NAME_PAIRS),
    _apply_values_sql(),
    _apply_names_sql(),
)
MARK_STALE = "INSERT INTO rollup_stale_orgs (org_id) VALUES ($1) ON CONFLICT DO NOTHING"
IS_STALE = "SELECT EXISTS (SELECT 1 FROM rollup_stale_orgs WHERE org_id = $1)"


class Deltas:
    """The rollup changes of one ingest batch, held in temporary tables until `apply`."""

    def __init__(
        self, conn: Conn, org_id: uuid.UUID, timeout: float, *, read_back: bool = True
    ) -> None:
        self.conn = conn
        self.org_id = org_id
        self.timeout = timeout
        self.read_back = read_back
        self.pending = False
        self._ready = False

    async def _prepare(self) -> None:
        if not self._ready:
            await self.conn.execute(CREATE_DELTAS, timeout=self.timeout)
            self._ready = True

    async def add(self, ids: Sequence[uuid.UUID]) -> None:
        """Count the stored rows of `ids` in (after they were written or copied in)."""
        await self._capture(ids, 1)

    async def add_copied(
        self, ids: Sequence[uuid.UUID], records: Sequence[tuple[Any, ...]]
    ) -> None:
        """Count in sessions just copied in as these ingest records (`ids`: theirs, in order).
        On one node they are read back (`read_back`): the rows of the chunk's own transaction
        come from shared buffers, cheaper for PostgreSQL than decoding the values sent as 14
        arrays, which also cost Python ~10 µs a session to encode on the event loop. On Citus
        the rows are on a worker and reading them back means pulling them to the coordinator,
        which costs more than the arrays (docs/benchmarks.md, session 6): the values are sent."""
        if self.read_back:
            await self.add(ids)
            return
        if not records:
            return
        await self._prepare()
        columns = [[r[i] for r in records] for i in _RECORD_INDEX]
        await self.conn.execute(CAPTURE_VALUES, 1, *columns, timeout=self.timeout)
        self.pending = True

    async def subtract(self, ids: Sequence[uuid.UUID]) -> None:
        """Take the stored rows of `ids` out (before they are overwritten; they must be locked)."""
        await self._capture(ids, -1)

    async def _capture(self, ids: Sequence[uuid.UUID], sign: int) -> None:
        if not ids:
            return
        await self._prepare()
        await self.conn.execute(CAPTURE, sign, list(ids), self.org_id, timeout=self.timeout)
        self.pending = True

    async def apply(self) -> None:
        """Fold the batch's deltas into the rollups (call once, right before commit)."""
        if not self.pending:
            return
        for sql in APPLY:
            await self.conn.execute(sql, timeout=self.timeout)
        self.pending = False


LOCK_FOR_DELETE = """
SELECT id FROM sessions WHERE org_id = $1 AND id = any($2::uuid[]) ORDER BY id FOR UPDATE
"""
DELETE_SESSIONS = "DELETE FROM sessions WHERE org_id = $1 AND id = any($2::uuid[])"


async def delete_sessions(
    conn: Conn, org_id: uuid.UUID, ids: Sequence[uuid.UUID], timeout: float
) -> int:
    """Delete sessions of one org and take their contributions out of the rollups, in one
    transaction (retention, clean-up). The only way to delete sessions that keeps the rollups
    exact: there is no trigger (none on a distributed table, docs/scaling.md). Returns how
    many were deleted."""
    async with conn.transaction():
        locked = await conn.fetch(LOCK_FOR_DELETE, org_id, list(ids), timeout=timeout)
        found = [r["id"] for r in locked]
        if not found:
            return 0
        deltas = Deltas(conn, org_id, timeout)
        await deltas.subtract(found)
        status = await conn.execute(DELETE_SESSIONS, org_id, found, timeout=timeout)
        await deltas.apply()
    return int(status.rsplit(" ", 1)[-1])


async def mark_stale(conn: Conn, org_id: uuid.UUID, timeout: float) -> None:
    await conn.execute(MARK_STALE, org_id, timeout=timeout)


async def is_stale(conn: Conn, org_id: uuid.UUID, timeout: float) -> bool:
    stale: bool = await conn.fetchval(IS_STALE, org_id, timeout=timeout)
    return stale


async def rebuild(
    conn: Conn, org_id: uuid.UUID | None = None, timeout: float | None = None
) -> None:
    """Recompute the rollups of one org (or all) from the sessions table, in one transaction.

    Ingest is held off meanwhile (SHARE lock on sessions); reads go on and see the old rollups
    until commit. Rebuilding every org truncates (fast, but briefly blocks readers too)."""
    async with conn.transaction():
        await conn.execute("LOCK TABLE sessions IN SHARE MODE", timeout=timeout)
        if org_id is None:
            tables = ", ".join(f.table for f in FAMILIES)
            await conn.execute(f"TRUNCATE {tables}", timeout=timeout)
            await conn.execute("DELETE FROM rollup_stale_orgs", timeout=timeout)
            where, args = "TRUE", []
        else:
            for f in FAMILIES:
                await conn.execute(
                    f"DELETE FROM {f.table} WHERE org_id = $1",
                    org_id,
                    timeout=timeout,
                )
            await conn.execute(
                "DELETE FROM rollup_stale_orgs WHERE org_id = $1", org_id, timeout=timeout
            )
            where, args = "s.org_id = $1", [org_id]
        for f in FAMILIES:
            await conn.execute(
                f"INSERT INTO {f.table} ({', '.join(f.columns)}) {f.contributions(where)}",
                *args,
                timeout=timeout,
            )
