"""SQL of the Reports API: definitions, reports, subscriptions and the audit log. No protobuf.

Who sees what (docs/reports.md, "Permissions"): every statement is scoped by the caller's org;
a `user` reads only objects they own (owner = their token's e-mail, lower case), admin and
auditor read the whole org's. Predefined definitions (owner NULL; every org has its copy,
ids 5-16) are visible to everyone. Every statement names the org (`org_id = …` on each table
it reads), so on Citus it is routed to the one node holding the org (docs/scaling.md).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from session_audit.core import trail
from session_audit.core.auth import ORG_READERS, Principal
from session_audit.core.db import Conn
from session_audit.core.errors import Conflict, NotFound
from session_audit.core.reads import Behind
from session_audit.core.sql import Sql, Template, Where, join, q
from session_audit.core.validation import DEFAULT_ZONE


@dataclass(frozen=True)
class Owner:
    """The caller as the reports surface sees them."""

    org_id: uuid.UUID
    email: str  # lower case; the owner key of what they create
    role: str
    # Which caller's reads these are (core.reads: read-your-writes on a standby).
    token_id: int = 0

    @classmethod
    def of(cls, who: Principal) -> Owner:
        return cls(who.org_id, who.email.strip().lower(), who.role, who.token_id)

    @property
    def reads_org(self) -> bool:
        return self.role in ORG_READERS

    @property
    def scope(self) -> str:
        """What their reports may contain: the whole org, or their own sessions."""
        return "org" if self.reads_org else "own"

    def may_change(self, owner: str | None) -> bool:
        return owner is not None and (owner == self.email or self.role == "admin")


def _visible(where: Where, me: Owner, alias: str) -> Where:
    where.add(f"{alias}.org_id = $org", org=me.org_id)
    if not me.reads_org:
        where.add(f"{alias}.owner = $owner", owner=me.email)
    return where


@dataclass(frozen=True)
class Page:
    rows: list[asyncpg.Record]
    has_next: bool
    total: int


PAGE = Template("$select WHERE $where ORDER BY $order LIMIT $limit OFFSET $offset")
COUNT = Template("SELECT count(*) FROM $source WHERE $where")
SELECT_WHERE = Template("$select WHERE $where")


async def _page(
    conn: Conn, select: Sql, source: Sql, where: Where, order: Sql, limit: int,
    offset: int, timeout: float,
) -> Page:  # fmt: skip
    """One page and the total, in one snapshot."""
    matching = where.sql()
    sql, args = PAGE(select=select, where=matching, order=order, limit=limit + 1,
                     offset=offset).render()  # fmt: skip
    count_sql, count_args = COUNT(source=source, where=matching).render()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        rows = await conn.fetch(sql, *args, timeout=timeout)
        total = await conn.fetchval(count_sql, *count_args, timeout=timeout)
    return Page(rows[:limit], len(rows) > limit, total)


# -- audit ------------------------------------------------------------------------------------

INSERT_AUDIT = """
INSERT INTO audit_log (org_id, actor, actor_role, action, object_type, object_id, details)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)
"""


async def audit(
    conn: Conn,
    me: Owner,
    action: str,
    object_type: str,
    object_id: int,
    details: dict[str, Any],
    timeout: float,
) -> None:
    await conn.execute(
        INSERT_AUDIT, me.org_id, me.email, me.role, action, object_type, str(object_id),
        json.loads(json.dumps(details, default=str)), timeout=timeout,
    )  # fmt: skip
    # Every API change is also an entry of the org's trail (last in the transaction).
    await trail.record(
        conn, me.org_id, me.email, action, object_type, [str(object_id)], details, timeout
    )


# -- definitions ------------------------------------------------------------------------------


# Predefined definitions are the org's own copies (owner NULL); the org of a predefined one is
# not shown (org_id NULL), as before they were copied per org.
DEFINITION_SELECT = Template("""
SELECT d.id, CASE WHEN d.owner IS NOT NULL THEN d.org_id END AS org_id, d.title, d.type,
       d.query_filter, d.query_order, d.owner, d.created_at, d.modified_at,
       EXISTS (SELECT 1 FROM report_subscriptions rs
                WHERE rs.org_id = d.org_id AND rs.defined_report_id = d.id
                  AND rs.org_id = $org AND rs.owner = $email)
           AS subscribed,
       EXISTS (SELECT 1 FROM reports r
                WHERE r.org_id = d.org_id AND r.defined_report_id = d.id AND r.org_id = $org
                  AND ($reads::boolean OR r.owner = $email)) AS has_reports
  FROM defined_reports d""")
DEFINITIONS = Sql("defined_reports d")
BY_ID = Sql("d.id")


def _definition_select(me: Owner) -> Sql:
    return DEFINITION_SELECT(org=me.org_id, email=me.email, reads=me.reads_org)


def _definitions_where(me: Owner) -> Where:
    where = Where().add("d.org_id = $org", org=me.org_id)
    if not me.reads_org:
        where.add("d.owner IS NULL OR d.owner = $owner", owner=me.email)
    return where


async def list_definitions(
    conn: Conn, me: Owner, type_: str | None, limit: int, offset: int, timeout: float
) -> Page:
    where = _definitions_where(me)
    if type_ is not None:
        where.add("d.type = $type", type=type_)
    return await _page(
        conn, _definition_select(me), DEFINITIONS, where, BY_ID, limit, offset, timeout
    )


async def get_definition(
    conn: Conn | asyncpg.Pool, me: Owner, id_: int, timeout: float
) -> asyncpg.Record | None:
    where = _definitions_where(me).add("d.id = $id", id=id_)
    sql, args = SELECT_WHERE(select=_definition_select(me), where=where.sql()).render()
    row: asyncpg.Record | None = await conn.fetchrow(sql, *args, timeout=timeout)
    return row


INSERT_DEFINITION = """
INSERT INTO defined_reports (org_id, owner, title, type, query_filter, query_order)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING id
"""


async def create_definition(
    conn: Conn, me: Owner, title: str, type_: str, query_filter: str, query_order: str,
    timeout: float,
) -> int:  # fmt: skip
    async with conn.transaction():
        id_: int = await conn.fetchval(
            INSERT_DEFINITION, me.org_id, me.email, title, type_, query_filter, query_order,
            timeout=timeout,
        )  # fmt: skip
        await audit(conn, me, "create", "defined_report", id_, {
            "title": title, "type": type_, "query_filter": query_filter,
            "query_order": query_order,
        }, timeout)  # fmt: skip
    return id_


# Only custom definitions of the caller's org; the caller decides who may (see service).
LOCK_DEFINITION = """
SELECT id, owner, title, type, query_filter, query_order
  FROM defined_reports
 WHERE id = $1 AND org_id = $2
   FOR UPDATE
"""
UPDATE_DEFINITION = Template(
    "UPDATE defined_reports SET $set, modified_at = now() WHERE id = $id AND org_id = $org"
)


async def update_definition(
    conn: Conn, me: Owner, id_: int, changes: dict[str, str], timeout: float
) -> None:
    """`changes` maps column names (a fixed set, checked by the caller) to new values."""
    allowed = {"title", "query_filter", "query_order"}
    if not set(changes) <= allowed:
        raise ValueError(f"update_definition: unexpected columns {sorted(set(changes) - allowed)}")
    assignments = join(", ", (q(f"{col} = $value", value=value)
                              for col, value in sorted(changes.items())))  # fmt: skip
    sql, args = UPDATE_DEFINITION(set=assignments, id=id_, org=me.org_id).render()
    async with conn.transaction():
        old = await conn.fetchrow(LOCK_DEFINITION, id_, me.org_id, timeout=timeout)
        if old is None:  # deleted since the caller looked it up
            raise NotFound(f"defined report {id_} not found")
        await conn.execute(sql, *args, timeout=timeout)
        before = {k: old[k] for k in changes}
        await audit(conn, me, "update", "defined_report", id_,
                    {"before": before, "after": changes}, timeout)  # fmt: skip


async def delete_definition(conn: Conn, me: Owner, id_: int, timeout: float) -> None:
    async with conn.transaction():
        gone = await conn.fetchrow(
            "DELETE FROM defined_reports WHERE id = $1 AND org_id = $2"
            " RETURNING title, type, owner,"
            " (SELECT count(*) FROM report_subscriptions"
            "   WHERE org_id = $2 AND defined_report_id = $1)"
            "   AS subscriptions",
            id_, me.org_id, timeout=timeout,
        )  # fmt: skip
        if gone is None:  # a concurrent delete won
            raise NotFound(f"defined report {id_} not found")
        await audit(conn, me, "delete", "defined_report", id_, dict(gone), timeout)


# -- reports ----------------------------------------------------------------------------------

REPORT_COLUMNS = """
r.id, r.org_id, r.defined_report_id, r.subscription_id, r.type, r.title, r.owner,
r.owner_scope, r.query_filter, r.query_order, r.time_zone, r.period, r.period_start,
r.period_end, r.status, r.failure, r.row_count, r.generated_at, r.created_at, r.modified_at"""

REPORT_SELECT = Sql(f"""
SELECT {REPORT_COLUMNS}, d.title AS defined_report_title
  FROM reports r
  LEFT JOIN defined_reports d ON d.org_id = r.org_id AND d.id = r.defined_report_id""")  # noqa: S608
REPORTS = Sql("reports r")
NEWEST_FIRST = Sql("r.id DESC")


async def list_reports(
    conn: Conn, me: Owner, status: str | None, definition: int | None, limit: int,
    offset: int, timeout: float,
) -> Page:  # fmt: skip
    where = _visible(Where(), me, "r")
    if status is not None:
        where.add("r.status = $status", status=status)
    if definition is not None:
        where.add("r.defined_report_id = $definition", definition=definition)
    return await _page(conn, REPORT_SELECT, REPORTS, where, NEWEST_FIRST, limit, offset, timeout)


async def get_report(
    conn: Conn | asyncpg.Pool, me: Owner, id_: int, timeout: float
) -> asyncpg.Record | None:
    where = _visible(Where(), me, "r").add("r.id = $id", id=id_)
    sql, args = SELECT_WHERE(select=REPORT_SELECT, where=where.sql()).render()
    row: asyncpg.Record | None = await conn.fetchrow(sql, *args, timeout=timeout)
    return row


@dataclass(frozen=True)
class NewReport:
    defined_report_id: int
    type: str
    title: str
    query_filter: str
    query_order: str
    time_zone: str = DEFAULT_ZONE
    subscription_id: int | None = None
    period: str | None = None
    period_start: datetime | None = None
    period_end: datetime | None = None


INSERT_REPORT = """
INSERT INTO reports (org_id, owner, owner_scope, defined_report_id, subscription_id, type, title,
                     query_filter, query_order, time_zone, period, period_start, period_end)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
RETURNING id
"""


async def insert_report(
    conn: Conn, org_id: uuid.UUID, owner: str, owner_scope: str, r: NewReport, timeout: float
) -> int:
    id_: int = await conn.fetchval(
        INSERT_REPORT, org_id, owner, owner_scope, r.defined_report_id, r.subscription_id,
        r.type, r.title, r.query_filter, r.query_order, r.time_zone, r.period, r.period_start,
        r.period_end, timeout=timeout,
    )  # fmt: skip
    return id_


async def create_report(conn: Conn, me: Owner, r: NewReport, timeout: float) -> int:
    async with conn.transaction():
        id_ = await insert_report(conn, me.org_id, me.email, me.scope, r, timeout)
        await audit(conn, me, "create", "report", id_, {
            "title": r.title, "defined_report_id": str(r.defined_report_id), "type": r.type,
            "query_filter": r.query_filter, "query_order": r.query_order,
        }, timeout)  # fmt: skip
    return id_


DELETE_REPORT = (
    "DELETE FROM report_rows WHERE org_id = $1 AND report_id = $2",
    "DELETE FROM reports WHERE org_id = $1 AND id = $2",
    "DELETE FROM report_attempts WHERE org_id = $1 AND report_id = $2",
)


async def delete_report(conn: Conn, me: Owner, id_: int, timeout: float) -> None:
    """Waits at most 2 s for a generation holding the report (then 409)."""
    async with conn.transaction():
        await conn.execute("SET LOCAL lock_timeout = '2s'")
        try:
            row = await conn.fetchrow(
                "SELECT title, type, status, owner FROM reports"
                " WHERE id = $1 AND org_id = $2 FOR UPDATE",
                id_, me.org_id, timeout=timeout,
            )  # fmt: skip
        except asyncpg.LockNotAvailableError:
            raise Conflict(f"report {id_} is being generated; try again when it is ready") from None
        if row is None:  # a concurrent delete won
            raise NotFound(f"report {id_} not found")
        for sql in DELETE_REPORT:
            await conn.execute(sql, me.org_id, id_, timeout=timeout)
        await audit(conn, me, "delete", "report", id_, dict(row), timeout)


# -- snapshot reads (downloads) ----------------------------------------------------------------

REPORT_CONTENT = """
SELECT summary, chart, note FROM reports WHERE org_id = $1 AND id = $2 AND status = 'ready'
"""
ROWS = """
SELECT cells FROM report_rows WHERE org_id = $1 AND report_id = $2 AND n > $3 ORDER BY n LIMIT $4
"""


async def report_content(
    conn: Conn | asyncpg.Pool, org_id: uuid.UUID, id_: int, timeout: float
) -> asyncpg.Record:
    """A ready report's summary, chart and note. Raises reads.Behind when this database does not
    have it ready (a standby behind the primary, or the report deleted meanwhile)."""
    row: asyncpg.Record | None = await conn.fetchrow(REPORT_CONTENT, org_id, id_, timeout=timeout)
    if row is None:
        raise Behind(f"report {id_} not ready here")
    return row


async def report_rows(
    conn: Conn, org_id: uuid.UUID, id_: int, after: int, limit: int, timeout: float
) -> list[list[str]]:
    """Rows n > after, in order (keyset pages: constant cost at any depth)."""
    rows = await conn.fetch(ROWS, org_id, id_, after, limit, timeout=timeout)
    return [r["cells"] for r in rows]


# -- subscriptions ----------------------------------------------------------------------------

SUBSCRIPTION_SELECT = Sql("""
SELECT s.id, s.org_id, s.defined_report_id, s.owner, s.owner_scope, s.period, s.time_zone,
       s.next_period_start, s.next_run_at, s.created_at, s.modified_at
  FROM report_subscriptions s""")
SUBSCRIPTIONS = Sql("report_subscriptions s")
BY_SUBSCRIPTION_ID = Sql("s.id")


async def list_subscriptions(
    conn: Conn, me: Owner, definition: int | None, limit: int, offset: int, timeout: float
) -> Page:
    where = _visible(Where(), me, "s")
    if definition is not None:
        where.add("s.defined_report_id = $definition", definition=definition)
    return await _page(
        conn, SUBSCRIPTION_SELECT, SUBSCRIPTIONS, where, BY_SUBSCRIPTION_ID, limit, offset,
        timeout,
    )  # fmt: skip


async def get_subscription(
    conn: Conn | asyncpg.Pool, me: Owner, id_: int, timeout: float
) -> asyncpg.Record | None:
    where = _visible(Where(), me, "s").add("s.id = $id", id=id_)
    sql, args = SELECT_WHERE(select=SUBSCRIPTION_SELECT, where=where.sql()).render()
    row: asyncpg.Record | None = await conn.fetchrow(sql, *args, timeout=timeout)
    return row


INSERT_SUBSCRIPTION = """
INSERT INTO report_subscriptions (org_id, owner, owner_scope, defined_report_id, period,
                                  time_zone, next_period_start, next_run_at, created_at,
                                  modified_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)
RETURNING id
"""


async def create_subscription(
    conn: Conn, me: Owner, definition: int, period: str, time_zone: str,
    first: tuple[datetime, datetime], now: datetime, timeout: float,
) -> int:  # fmt: skip
    async with conn.transaction():
        try:
            id_: int = await conn.fetchval(
                INSERT_SUBSCRIPTION, me.org_id, me.email, me.scope, definition, period,
                time_zone, first[0], first[1], now, timeout=timeout,
            )  # fmt: skip
        except asyncpg.UniqueViolationError:
            raise Conflict(
                f"defined_report_id: already subscribed to {definition} with period {period}"
            ) from None
        await audit(conn, me, "create", "subscription", id_, {
            "defined_report_id": str(definition), "period": period, "time_zone": time_zone,
        }, timeout)  # fmt: skip
    return id_


async def delete_subscription(conn: Conn, me: Owner, id_: int, timeout: float) -> None:
    async with conn.transaction():
        gone = await conn.fetchrow(
            "DELETE FROM report_subscriptions WHERE id = $1 AND org_id = $2"
            " RETURNING defined_report_id::text, period, time_zone, owner",
            id_, me.org_id, timeout=timeout,
        )  # fmt: skip
        if gone is None:  # a concurrent delete won
            raise NotFound(f"subscription {id_} not found")
        await audit(conn, me, "delete", "subscription", id_, dict(gone), timeout)
