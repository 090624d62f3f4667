"""SQL of the retention domain: the policy, locks and legal holds. Every statement is scoped
by org (`org_id = $1`); every change writes its audit-log row and its trail entry in the same
transaction (no triggers: docs/retention.md)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from session_audit import reports
from session_audit.core import trail
from session_audit.core.auth import Principal
from session_audit.core.db import Conn
from session_audit.core.errors import InvalidArgument, NotFound
from session_audit.core.sql import TRUE, Sql, Template, Where, q

MAX_DAYS = 36_500
MAX_REASON = 1000
# hold_id of a lock set through PUT /api/sessions/{id}/retention_lock.
MANUAL = 0
# The gateway's label, as the generated column of migration 0020 read it.
LABELLED = "coalesce(lower(s.labels ->> 'retention_locked') = 'true', false)"

INSERT_AUDIT = """
INSERT INTO audit_log (org_id, actor, actor_role, action, object_type, object_id, details)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)
"""


async def audit(
    conn: Conn,
    who: Principal,
    action: str,
    object_type: str,
    object_id: str,
    details: dict[str, Any],
    timeout: float,
) -> None:
    await conn.execute(
        INSERT_AUDIT,
        who.org_id,
        who.email,
        who.role,
        action,
        object_type,
        object_id,
        json.loads(json.dumps(details, default=str)),
        timeout=timeout,
    )


def check_reason(reason: str, required: bool) -> str:
    reason = reason.strip()
    if required and not reason:
        raise InvalidArgument("reason: expected why (a case or ticket), got nothing")
    if len(reason) > MAX_REASON:
        raise InvalidArgument(
            f"reason: expected at most {MAX_REASON} characters, got {len(reason)}"
        )
    return reason


# -- policy -----------------------------------------------------------------------------------

GET_POLICY = "SELECT days FROM retention_policies WHERE org_id = $1"
# The times come from the proposed row: Citus allows no function call in DO UPDATE SET.
SET_POLICY = """
INSERT INTO retention_policies (org_id, days, modified_by, modified_at, next_purge_at)
VALUES ($1, $2, $3, now(), now())
ON CONFLICT (org_id) DO UPDATE
   SET days = EXCLUDED.days, modified_by = EXCLUDED.modified_by,
       modified_at = EXCLUDED.modified_at, next_purge_at = EXCLUDED.next_purge_at
"""


def check_days(days: int | None) -> int | None:
    if days is not None and not 1 <= days <= MAX_DAYS:
        raise InvalidArgument(f"days: expected 1..{MAX_DAYS} or null (keep forever), got {days}")
    return days


async def get_policy(conn: Conn | asyncpg.Pool, org_id: uuid.UUID, timeout: float) -> int | None:
    days: int | None = await conn.fetchval(GET_POLICY, org_id, timeout=timeout)
    return days


async def set_policy(conn: Conn, who: Principal, days: int | None, timeout: float) -> None:
    async with conn.transaction():
        before = await conn.fetchval(GET_POLICY + " FOR UPDATE", who.org_id, timeout=timeout)
        await conn.execute(SET_POLICY, who.org_id, days, who.email, timeout=timeout)
        await audit(
            conn,
            who,
            "update",
            "retention_policy",
            str(who.org_id),
            {"days": days, "previous_days": before},
            timeout,
        )
        await trail.record(
            conn,
            who.org_id,
            who.email,
            "update",
            "retention_policy",
            [str(who.org_id)],
            {"days": days},
            timeout,
        )


# -- locks ------------------------------------------------------------------------------------

LOCK_SESSION = f"""
SELECT s.retention_locked, {LABELLED} AS labelled
  FROM sessions s
 WHERE s.org_id = $1 AND s.id = $2
   FOR UPDATE
"""  # noqa: S608 - code constants
UPSERT_LOCK = """
INSERT INTO retention_locks (org_id, hold_id, session_id, reason, locked_by, locked_at)
VALUES ($1, $2, $3, $4, $5, now())
ON CONFLICT (org_id, hold_id, session_id) DO UPDATE
   SET reason = EXCLUDED.reason, locked_by = EXCLUDED.locked_by, locked_at = EXCLUDED.locked_at
"""
DELETE_LOCK = "DELETE FROM retention_locks WHERE org_id = $1 AND hold_id = $2 AND session_id = $3"
HOLDS_OF = """
SELECT hold_id FROM retention_locks WHERE org_id = $1 AND session_id = $2 ORDER BY hold_id
"""
SET_LOCKED = "UPDATE sessions SET retention_locked = $3 WHERE org_id = $1 AND id = $2"


@dataclass(frozen=True)
class LockState:
    locked: bool
    holds: list[int]


async def set_lock(
    conn: Conn, who: Principal, session_id: uuid.UUID, locked: bool, reason: str, timeout: float
) -> LockState:
    async with conn.transaction():
        row = await conn.fetchrow(LOCK_SESSION, who.org_id, session_id, timeout=timeout)
        if row is None:
            raise NotFound(f"session {session_id} not found")
        if locked:
            await conn.execute(
                UPSERT_LOCK, who.org_id, MANUAL, session_id, reason, who.email, timeout=timeout
            )
        else:
            await conn.execute(DELETE_LOCK, who.org_id, MANUAL, session_id, timeout=timeout)
        holds = [
            r["hold_id"]
            for r in await conn.fetch(HOLDS_OF, who.org_id, session_id, timeout=timeout)
        ]
        now_locked = bool(row["labelled"] or holds)
        if now_locked != row["retention_locked"]:
            await conn.execute(SET_LOCKED, who.org_id, session_id, now_locked, timeout=timeout)
        await audit(
            conn,
            who,
            "update",
            "session",
            str(session_id),
            {"retention_lock": locked, "reason": reason, "locked": now_locked},
            timeout,
        )
        await trail.record_sessions(
            conn, who.org_id, who.email, "lock" if locked else "unlock", [session_id], timeout
        )
    return LockState(now_locked, [h for h in holds if h != MANUAL])


# -- holds ------------------------------------------------------------------------------------

NEW_HOLD = """
INSERT INTO retention_holds (org_id, reason, query_filter, report_ids, created_by, applying)
VALUES ($1, $2, $3, $4, $5, true)
RETURNING id
"""
# The hold row, locked for one window of its application (a release waits for the window).
HOLD_TO_APPLY = """
SELECT query_filter, applied_through, created_by FROM retention_holds
 WHERE org_id = $1 AND id = $2 AND applying AND released_at IS NULL
   FOR UPDATE
"""
# The end of the next window: the `$3`-th session id after the last window (NULL: the rest).
WINDOW_END = """
SELECT id FROM sessions WHERE org_id = $1 ORDER BY id OFFSET $2 LIMIT 1
"""
WINDOW_END_AFTER = """
SELECT id FROM sessions WHERE org_id = $1 AND id > $3 ORDER BY id OFFSET $2 LIMIT 1
"""
HOLD_STARTED = """
SELECT applied_through IS NOT NULL FROM retention_holds
 WHERE org_id = $1 AND id = $2 AND applying AND released_at IS NULL
"""
# A transaction id is the mark, taken in a transaction of its own: every transaction that held
# an id before it has a lower one, and all of those have ended once the oldest still running is
# not below the mark. (A snapshot's xmax would not do: ids above the last completed one are not
# in its list, although they may be running.)
TAKE_XID = "SELECT pg_current_xact_id()"
SETTLED = "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::xid8"
HOLD_APPLIED = """
UPDATE retention_holds SET applied_through = $3, applying = $4, touched_at = now()
 WHERE org_id = $1 AND id = $2
"""
HOLD_COUNT = """
SELECT count(*) FROM retention_locks WHERE org_id = $1 AND hold_id = $2
"""
# Holds left unfinished: no window applied for `$1` seconds (the request that made the hold
# gave up, or its process died); a request still working on its hold is left alone.
APPLYING = """
SELECT org_id, id FROM retention_holds
 WHERE applying AND released_at IS NULL AND touched_at < now() - make_interval(secs => $1)
 ORDER BY id LIMIT 100
"""
LEFT_AFTER = 30.0
ANY_APPLYING = """
SELECT EXISTS (SELECT 1 FROM retention_holds WHERE org_id = $1 AND applying AND released_at IS NULL)
"""
APPLYING_IN_ORG = """
SELECT id FROM retention_holds WHERE org_id = $1 AND applying AND released_at IS NULL ORDER BY id
"""
RELEASE_HOLD = """
UPDATE retention_holds SET released_at = now(), released_by = $3
 WHERE org_id = $1 AND id = $2 AND released_at IS NULL
RETURNING id
"""
ACTIVE_HOLDS = """
SELECT h.id, h.reason, h.query_filter, h.report_ids, h.created_by, h.created_at, h.applying,
       (SELECT count(*) FROM retention_locks l WHERE l.org_id = h.org_id AND l.hold_id = h.id)
           AS locked
  FROM retention_holds h
 WHERE h.org_id = $1 AND h.released_at IS NULL
 ORDER BY h.id DESC
"""
ACTIVE_FILTERS = """
SELECT id, query_filter FROM retention_holds WHERE org_id = $1 AND released_at IS NULL
"""
HELD_REPORTS = """
SELECT coalesce(array_agg(DISTINCT r), '{}') FROM retention_holds h, unnest(h.report_ids) r
 WHERE h.org_id = $1 AND h.released_at IS NULL
"""
LOCK_HELD_SESSIONS = """
SELECT s.id FROM sessions s
 WHERE s.org_id = $1
   AND s.id IN (SELECT l.session_id FROM retention_locks l WHERE l.org_id = $1 AND l.hold_id = $2)
 ORDER BY s.id
   FOR UPDATE OF s
"""
# Sessions a hold held that nothing holds any more (no lock row, no label) are unlocked.
RELEASE_LOCKS = (
    "DELETE FROM retention_locks WHERE org_id = $1 AND hold_id = $2 RETURNING session_id"
)
UNLOCK_FREED = f"""
UPDATE sessions s SET retention_locked = false
 WHERE s.org_id = $1 AND s.id = any($2::uuid[]) AND s.retention_locked AND NOT {LABELLED}
   AND NOT EXISTS (SELECT 1 FROM retention_locks l WHERE l.org_id = $1 AND l.session_id = s.id)
RETURNING s.id
"""  # noqa: S608
LOCK_HELD = """
UPDATE sessions s SET retention_locked = true
 WHERE s.org_id = $1 AND s.id = any($2::uuid[]) AND NOT s.retention_locked
RETURNING s.id
"""


HOLD_MATCH = Template("""
INSERT INTO retention_locks (org_id, hold_id, session_id, locked_by)
SELECT s.org_id, $hold, s.id, $actor
  FROM sessions s
 WHERE s.org_id = $org AND $scope AND $filter
ON CONFLICT DO NOTHING
RETURNING session_id
""")


MATCHED_IN_WINDOW = Template("""
SELECT s.id FROM sessions s
 WHERE s.org_id = $org AND $scope AND $filter
 ORDER BY s.id
   FOR UPDATE OF s
""")
HOLD_LOCK_ROWS = """
INSERT INTO retention_locks (org_id, hold_id, session_id, locked_by)
SELECT $1, $2, x, $3 FROM unnest($4::uuid[]) x
ON CONFLICT DO NOTHING
"""


def hold_match_sql(
    org_id: uuid.UUID, hold_id: int, actor: str, query_filter: str,
    ids: list[uuid.UUID] | None = None,
) -> tuple[str, list[Any]]:  # fmt: skip
    """INSERT the lock rows of the hold for the org's sessions matching its filter (only among
    `ids` when given), RETURNING the sessions."""
    where = reports.session_filter(Where(), query_filter)
    scope = TRUE if ids is None else q("s.id = any($ids::uuid[])", ids=ids)
    return HOLD_MATCH(hold=hold_id, actor=actor, org=org_id, scope=scope,
                      filter=where.sql()).render()  # fmt: skip


def _window(after: uuid.UUID | None, upto: uuid.UUID | None) -> Sql:
    """The org's sessions with after < id <= upto (open ends: no bound)."""
    w = Where()
    if after is not None:
        w.add("s.id > $after", after=after)
    if upto is not None:
        w.add("s.id <= $upto", upto=upto)
    return w.sql()


def parse_report_ids(raw: Sequence[str]) -> list[int]:
    out = []
    for i, r in enumerate(raw):
        if not r.strip().isdigit() or len(r.strip()) > 19:
            raise InvalidArgument(f"report_ids[{i}]: expected a report id (digits), got {r[:40]!r}")
        out.append(int(r.strip()))
    return out


async def create_hold(
    conn: Conn,
    who: Principal,
    reason: str,
    query_filter: str,
    report_ids: list[int],
    timeout: float,
) -> int:
    """Make the hold (active, applying: from now on every ingest locks what it matches) with
    its audit row and trail entry, in one short transaction; `apply_hold` then locks what the
    org already has. Returns the hold id."""
    reports.canonical_filter(query_filter)  # a bad filter is a 400 before anything is written
    async with conn.transaction():
        hold_id: int = await conn.fetchval(
            NEW_HOLD, who.org_id, reason, query_filter, report_ids, who.email, timeout=timeout
        )
        content = {"reason": reason, "query_filter": query_filter, "report_ids": report_ids}
        await audit(conn, who, "create", "hold", str(hold_id), content, timeout)
        await trail.record(
            conn, who.org_id, who.email, "create", "hold", [str(hold_id)], content, timeout
        )
    return hold_id


@dataclass(frozen=True)
class Applied:
    done: bool  # every window applied (or the hold is released / gone)
    locked: int  # sessions the hold holds now


async def apply_hold(
    conn: Conn,
    org_id: uuid.UUID,
    hold_id: int,
    *,
    window: int,
    timeout: float,
    until: float | None = None,
) -> Applied:
    """Lock the org's sessions the hold matches, one window of `window` sessions (in id order)
    per transaction, until every window is done or the monotonic clock passes `until`. Safe
    to run from several processes at once: each window takes the hold's row first."""
    # Not settled in time: no window applied, still applying.
    done = False
    if await _settled(conn, org_id, hold_id, timeout, until):
        while not done and (until is None or time.monotonic() < until):
            done = await _apply_window(conn, org_id, hold_id, window, timeout)
    locked: int = await conn.fetchval(HOLD_COUNT, org_id, hold_id, timeout=timeout)
    return Applied(done, locked)


async def _settled(
    conn: Conn, org_id: uuid.UUID, hold_id: int, timeout: float, until: float | None
) -> bool:
    """Before the first window: wait until every transaction in progress now has ended. An
    ingest that read the active holds before this one was made (and so will not lock what it
    writes) is one of them, and the windows would not see its rows while it is uncommitted;
    every later ingest sees the hold. (CREATE INDEX CONCURRENTLY waits the same way.) False
    when time ran out first."""
    started = await conn.fetchval(HOLD_STARTED, org_id, hold_id, timeout=timeout)
    if started is not False:  # released, finished, or past its first window
        return True
    async with conn.transaction():
        mark = await conn.fetchval(TAKE_XID, timeout=timeout)
    give_up = (
        time.monotonic() + timeout if until is None else min(until, time.monotonic() + timeout)
    )
    while not await conn.fetchval(SETTLED, mark, timeout=timeout):
        if time.monotonic() >= give_up:
            return False
        await asyncio.sleep(0.02)
    return True


async def _apply_window(
    conn: Conn, org_id: uuid.UUID, hold_id: int, window: int, timeout: float
) -> bool:
    """One window in one transaction; True when it was the last (or nothing is left to do)."""
    async with conn.transaction():
        hold = await conn.fetchrow(HOLD_TO_APPLY, org_id, hold_id, timeout=timeout)
        if hold is None:
            return True
        after: uuid.UUID | None = hold["applied_through"]
        if after is None:
            upto = await conn.fetchval(WINDOW_END, org_id, window - 1, timeout=timeout)
        else:
            upto = await conn.fetchval(WINDOW_END_AFTER, org_id, window - 1, after, timeout=timeout)
        actor = hold["created_by"]
        # The matching sessions first, locked in id order (as ingest locks them), then their
        # lock rows: an ingest writing one of them waits here, or we wait for it, never both.
        where = reports.session_filter(Where(), hold["query_filter"])
        sql, args = MATCHED_IN_WINDOW(org=org_id, scope=_window(after, upto),
                                filter=where.sql()).render()  # fmt: skip
        matched = [r["id"] for r in await conn.fetch(sql, *args, timeout=timeout)]
        await conn.execute(HOLD_LOCK_ROWS, org_id, hold_id, actor, matched, timeout=timeout)
        changed = [r["id"] for r in await conn.fetch(LOCK_HELD, org_id, matched, timeout=timeout)]
        last = upto is None
        await conn.execute(HOLD_APPLIED, org_id, hold_id, upto, not last, timeout=timeout)
        await trail.record_sessions(conn, org_id, actor, "lock", changed, timeout)
    return last


async def apply_pending(
    conn: Conn, org_id: uuid.UUID | None, *, window: int, timeout: float
) -> int:
    """Finish the holds still being applied: every one of the org's, or (org None) those of
    every org that nobody has worked on for LEFT_AFTER seconds. Returns how many are still
    unfinished (waiting, within `timeout`, for older transactions to end: store._settled)."""
    if org_id is None:
        rows = [
            (r["org_id"], r["id"]) for r in await conn.fetch(APPLYING, LEFT_AFTER, timeout=timeout)
        ]
    else:
        rows = [(org_id, r["id"]) for r in await conn.fetch(APPLYING_IN_ORG, org_id,
                                                             timeout=timeout)]  # fmt: skip
    left = 0
    for org, hold_id in rows:
        applied = await apply_hold(conn, org, hold_id, window=window, timeout=timeout)
        left += not applied.done
    return left


async def list_holds(conn: Conn | asyncpg.Pool, org_id: uuid.UUID, timeout: float) -> list[Any]:
    rows: list[Any] = await conn.fetch(ACTIVE_HOLDS, org_id, timeout=timeout)
    return rows


async def delete_hold(conn: Conn, who: Principal, hold_id: int, timeout: float) -> int:
    """Release the hold; returns how many sessions it unlocked."""
    async with conn.transaction():
        if (
            await conn.fetchval(RELEASE_HOLD, who.org_id, hold_id, who.email, timeout=timeout)
            is None
        ):
            raise NotFound(f"hold {hold_id} not found (or already released)")
        # The sessions first (in id order, as ingest locks them), then their lock rows: an
        # ingest matching this hold meanwhile waits here instead of deadlocking with us.
        await conn.execute(LOCK_HELD_SESSIONS, who.org_id, hold_id, timeout=timeout)
        held = [
            r["session_id"]
            for r in await conn.fetch(RELEASE_LOCKS, who.org_id, hold_id, timeout=timeout)
        ]
        freed = [
            r["id"]
            for r in await conn.fetch(UNLOCK_FREED, who.org_id, sorted(held), timeout=timeout)
        ]
        await audit(
            conn,
            who,
            "delete",
            "hold",
            str(hold_id),
            {"held": len(held), "unlocked": len(freed)},
            timeout,
        )
        head = await trail.lock_head(conn, who.org_id, timeout)
        await head.add(who.email, "delete", "hold", [str(hold_id)], trail.content_digest(None))
        await head.add_sessions(who.email, "unlock", freed)
    return len(freed)


async def held_reports(conn: Conn, org_id: uuid.UUID, timeout: float) -> list[int]:
    ids: list[int] = await conn.fetchval(HELD_REPORTS, org_id, timeout=timeout)
    return ids


# -- ingest -----------------------------------------------------------------------------------

LOCK_ARRIVED = f"""
UPDATE sessions s SET retention_locked = true
 WHERE s.org_id = $1 AND s.id = any($2::uuid[]) AND NOT s.retention_locked
   AND ({LABELLED} OR s.id = any($3::uuid[]))
"""  # noqa: S608


async def lock_arrived(
    conn: Conn,
    org_id: uuid.UUID,
    actor: str,
    ids: list[uuid.UUID],
    timeout: float,
    labelled: list[uuid.UUID] | None = None,
) -> None:
    """Lock the sessions of an ingest batch that the gateway labelled or an active hold
    matches (in the batch's transaction). `labelled`, when the caller knows it, is a superset
    of the batch's sessions whose stored labels may say `retention_locked` (ingest knows it
    for sessions it has just inserted as sent): only those and the held ones are looked at."""
    held: list[uuid.UUID] = []
    for hold in await conn.fetch(ACTIVE_FILTERS, org_id, timeout=timeout):
        sql, args = hold_match_sql(org_id, hold["id"], actor, hold["query_filter"], ids)
        rows = await conn.fetch(sql, *args, timeout=timeout)
        held += [r["session_id"] for r in rows]
    if labelled is not None:
        ids = [*labelled, *held]
        if not ids:
            return
    await conn.execute(LOCK_ARRIVED, org_id, ids, held, timeout=timeout)
