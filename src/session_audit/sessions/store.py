"""SQL for the session store: list, get, and the upsert behind ingest. No protobuf here."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from session_audit.core.auth import Principal
from session_audit.core.db import Conn
from session_audit.core.schema import INGEST_COLUMNS, JSON_COLUMNS
from session_audit.core.sql import Template, Where
from session_audit.sessions.requests import COUNT_CAP, Filters, ListQuery

# Text columns that are NOT NULL DEFAULT '' in the table; NULL in staging means "not sent".
_TEXT_DEFAULT_EMPTY = frozenset({
    "user_id", "user_email", "user_name", "connection", "connection_type",
    "connection_subtype", "role_name",
})  # fmt: skip
# Sizes are always sent (0 when unknown); a later report without them keeps what is stored.
_ZERO_MEANS_ABSENT = frozenset({"event_size", "script_size"})

# Lists carry neither the script nor the event stream (GetSession does).
LIST_COLUMNS = ", ".join(f"s.{c}" for c in INGEST_COLUMNS if c not in ("script", "event_stream"))
GET_COLUMNS = ", ".join(f"s.{c}" for c in INGEST_COLUMNS)

_STAGING_TYPES = {
    "id": "uuid", "org_id": "uuid", "start_date": "timestamptz", "end_date": "timestamptz",
    "exit_code": "integer", "event_size": "bigint", "script_size": "bigint",
    "review_approvers": "text[]",
}  # fmt: skip

CREATE_STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS ingest_staging ("
    + ", ".join(f"{c} {_STAGING_TYPES.get(c, 'text')}" for c in INGEST_COLUMNS)
    + ") ON COMMIT DELETE ROWS"
)
TRUNCATE_STAGING = "TRUNCATE ingest_staging"

# Rows are locked in id order, so two batches updating overlapping sessions cannot deadlock.
# Ids are unique per org (key (org_id, id)): another org's sessions are never seen.
LOCK_EXISTING = """
SELECT id, org_id, start_date, end_date
  FROM sessions
 WHERE org_id = $2 AND id = any($1::uuid[])
 ORDER BY id
   FOR UPDATE
"""


def _merged(col: str) -> str:
    """The value a column takes when a stored session is reported again."""
    if col in ("id", "org_id"):
        return f"s.{col}"
    if col == "start_date":
        return "t.start_date"
    if col == "status":
        # An update without end_date cannot reopen an ended session: end_date is kept, so the
        # status stays consistent with it.
        return (
            "CASE WHEN t.end_date IS NULL AND s.end_date IS NOT NULL"
            " THEN s.status ELSE t.status END"
        )
    if col in _ZERO_MEANS_ABSENT:
        return f"CASE WHEN t.{col} = 0 THEN s.{col} ELSE t.{col} END"
    if col in _TEXT_DEFAULT_EMPTY:
        return f"COALESCE(NULLIF(t.{col}, ''), s.{col})"
    return f"COALESCE(t.{col}, s.{col})"


def _insert_value(col: str) -> str:
    if col in JSON_COLUMNS:
        return f"t.{col}::jsonb"
    if col in _TEXT_DEFAULT_EMPTY:
        return f"COALESCE(t.{col}, '')"
    return f"t.{col}"


_UPDATABLE = [c for c in INGEST_COLUMNS if c not in ("id", "org_id")]

# Insert new sessions; merge reported ones into what is stored. A row whose merged value equals
# the stored one is not touched at all (no new tuple, updated_at unchanged), so re-sending a
# batch changes nothing. RETURNING tells inserts (xmax = 0) from updates. updated_at is the
# proposed row's default (now()): Citus allows no function call in DO UPDATE SET.
UPSERT = f"""
WITH t AS (
    SELECT {", ".join(f"{_insert_value(c)} AS {c}" for c in INGEST_COLUMNS)}
      FROM ingest_staging t
)
INSERT INTO sessions AS s ({", ".join(INGEST_COLUMNS)})
SELECT {", ".join(INGEST_COLUMNS)} FROM t ORDER BY id
ON CONFLICT (org_id, id) DO UPDATE SET
    {", ".join(f"{c} = {_merged(c).replace('t.', 'EXCLUDED.')}" for c in _UPDATABLE)},
    updated_at = EXCLUDED.updated_at
 WHERE ({", ".join(f"s.{c}" for c in _UPDATABLE)})
       IS DISTINCT FROM
       ({", ".join(_merged(c).replace("t.", "EXCLUDED.") for c in _UPDATABLE)})
RETURNING s.id
"""  # noqa: S608 - every name above is a code constant

GET = Template(f"""
SELECT {GET_COLUMNS}
  FROM sessions s
 WHERE s.id = $id AND $scope
""")  # noqa: S608
PAGE = Template(f"""
SELECT {LIST_COLUMNS}
  FROM sessions s
 WHERE $where
 ORDER BY s.start_date DESC, s.id DESC
 LIMIT $limit OFFSET $offset
""")  # noqa: S608
COUNT_EXACT = Template("SELECT count(*) AS n FROM sessions s WHERE $where")
COUNT_CAPPED = Template(
    f"SELECT count(*) AS n FROM (SELECT 1 FROM sessions s WHERE $where LIMIT {COUNT_CAP + 1}) c"  # noqa: S608
)
# The page and its total in ONE statement: one statement is one snapshot, so the total and the
# page agree without a transaction (BEGIN, page, count, COMMIT were four round trips; this is
# one). The count side is one row; the page is joined to it, so an empty page still brings
# its total (one row whose page columns are all NULL).
PAGE_AND_COUNT = Template("""
SELECT c.n AS total__, p.*
  FROM ($count) c
  LEFT JOIN ($page) p ON true
 ORDER BY p.start_date DESC, p.id DESC
""")


def filters_where(where: Where, f: Filters) -> Where:
    """The document's filters. Exact matches unless noted; see docs/sessions.md."""
    if f.user_id is not None:
        where.add("s.user_id = $v", v=f.user_id)
    if f.connection is not None:
        where.add("s.connection = $v", v=f.connection)
    if f.connection_type is not None:
        where.add("s.connection_type = $v", v=f.connection_type)
    if f.review_status is not None:
        where.add("s.review_status = $v", v=f.review_status)
    if f.approver is not None:
        where.add("s.review_approvers @> array[$v::text]", v=f.approver)
    if f.correlation_id is not None:
        where.add("s.correlation_id = $v", v=f.correlation_id)
    if f.jira_keys is not None:
        where.add("s.jira_issue_key = any($v::text[])", v=list(f.jira_keys))
    if f.start is not None:
        where.add("s.start_date >= $v", v=f.start)
    if f.end is not None:
        where.add("s.start_date <= $v", v=f.end)
    return where


@dataclass(frozen=True)
class Page:
    rows: list[asyncpg.Record]
    has_next: bool
    total: int | None
    total_is_capped: bool


async def list_sessions(conn: Conn, who: Principal, q: ListQuery, timeout: float) -> Page:
    where = filters_where(who.scope(Where(), "s"), q.filters)
    matching = where.sql()
    if q.cursor is not None:
        where.add("(s.start_date, s.id) < ($start, $id)", start=q.cursor.start_date, id=q.cursor.id)
    if q.count == "none":
        page_sql, page_args = PAGE(where=where.sql(), limit=q.limit + 1, offset=q.offset).render()
        rows = await conn.fetch(page_sql, *page_args, timeout=timeout)
        return Page(rows[: q.limit], len(rows) > q.limit, None, False)
    count = (COUNT_EXACT if q.count == "exact" else COUNT_CAPPED)(where=matching)
    page = PAGE(where=where.sql(), limit=q.limit + 1, offset=q.offset)
    sql, args = PAGE_AND_COUNT(count=count, page=page).render()
    rows = await conn.fetch(sql, *args, timeout=timeout)
    n: int = rows[0]["total__"]
    if rows[0]["id"] is None:  # no row on this page: only the total came back
        rows = []
    capped = q.count == "capped" and n > COUNT_CAP
    total = min(n, COUNT_CAP) if q.count == "capped" else n
    return Page(rows[: q.limit], len(rows) > q.limit, total, capped)


async def get_session(
    conn: Conn | asyncpg.Pool, who: Principal, session_id: uuid.UUID, timeout: float
) -> asyncpg.Record | None:
    sql, args = GET(id=session_id, scope=who.scope(Where(), "s").sql()).render()
    row: asyncpg.Record | None = await conn.fetchrow(sql, *args, timeout=timeout)
    return row


@dataclass(frozen=True)
class Existing:
    org_id: uuid.UUID
    start_date: Any
    end_date: Any


async def lock_existing(
    conn: Conn, org_id: uuid.UUID, ids: Sequence[uuid.UUID], timeout: float
) -> dict[uuid.UUID, Existing]:
    rows = await conn.fetch(LOCK_EXISTING, list(ids), org_id, timeout=timeout)
    return {r["id"]: Existing(r["org_id"], r["start_date"], r["end_date"]) for r in rows}


async def stored_values(
    conn: Conn, org_id: uuid.UUID, ids: Sequence[uuid.UUID], timeout: float
) -> dict[uuid.UUID, dict[str, Any]]:
    """The stored columns of `ids` (locked by the caller), as ingest items hold them."""
    rows = await conn.fetch(
        f"SELECT {GET_COLUMNS} FROM sessions s"  # noqa: S608
        " WHERE s.org_id = $1 AND s.id = any($2::uuid[])",
        org_id,
        list(ids),
        timeout=timeout,
    )
    return {r["id"]: dict(r) for r in rows}


async def copy_new(conn: Conn, records: Sequence[tuple[Any, ...]], timeout: float) -> bool:
    """Binary COPY of sessions not stored yet straight into the table (the fast path, as fast
    as a raw COPY); give the records in id order (the lock order). Runs in a savepoint: if a
    concurrent writer stored one of the ids meanwhile, nothing of this chunk is kept and False
    tells the caller to upsert instead.
    JSON columns must hold JSON text (a connection without the JSON codec)."""
    try:
        async with conn.transaction():
            await conn.copy_records_to_table(
                "sessions", records=records, columns=INGEST_COLUMNS, timeout=timeout
            )
    except (asyncpg.UniqueViolationError, asyncpg.InternalServerError) as exc:
        if not _duplicate_key(exc):
            raise
        return False
    return True


def _duplicate_key(exc: asyncpg.PostgresError) -> bool:
    """A unique violation. Citus reports a worker's unique violation during COPY into a
    distributed table as an internal error (XX000) carrying the worker's message."""
    return isinstance(exc, asyncpg.UniqueViolationError) or str(exc).startswith(
        "duplicate key value violates unique constraint"
    )


async def upsert(conn: Conn, records: Sequence[tuple[Any, ...]], timeout: float) -> set[uuid.UUID]:
    """Write staged rows (must run inside a transaction; give them in id order, the lock
    order). Returns the ids of the rows inserted or changed."""
    await conn.execute(CREATE_STAGING)
    await conn.execute(TRUNCATE_STAGING)
    await conn.copy_records_to_table(
        "ingest_staging", records=records, columns=INGEST_COLUMNS, timeout=timeout
    )
    result = await conn.fetch(UPSERT, timeout=timeout)
    return {r["id"] for r in result}
