"""The purge: deletes what an org's policy no longer keeps, in short batches.

A run per org is claimed by moving the org's `next_purge_at` forward with one UPDATE (it
names the org: one router statement on Citus): of several processes whose ticks find the org
due, exactly one UPDATE matches, the others see the moved time and skip it. The claimed run
then deletes, one short transaction per batch:

  * sessions whose end (or start, while still open) is before now - days, not locked, taken
    `FOR UPDATE SKIP LOCKED` (a session an ingest is writing is left for the next run), their
    contributions taken out of the rollups in the same transaction, with a trail entry per
    batch (kind `purge`, the deleted ids with a NULL digest);
  * generated reports made before the cutoff, except those an active hold names.

The run's totals go to the audit log (how many, which window), not the ids.
A process that dies mid-run leaves the rest to the next run (deleting the expired is
idempotent)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from session_audit import reports
from session_audit.analytics import rollups
from session_audit.core import trail
from session_audit.core.db import Conn
from session_audit.retention import store
from session_audit.retention.config import HOLD_WINDOW, Clock

log = logging.getLogger(__name__)

ACTOR = "retention purge"
DUE = """
SELECT org_id FROM retention_policies
 WHERE days IS NOT NULL AND next_purge_at <= $1
 ORDER BY next_purge_at, org_id
 LIMIT 100
"""
CLAIM = """
UPDATE retention_policies SET next_purge_at = $2::timestamptz + make_interval(secs => $3),
                              last_purge_at = $2
 WHERE org_id = $1 AND days IS NOT NULL AND next_purge_at <= $2
RETURNING days
"""
CLAIM_NOW = """
UPDATE retention_policies SET last_purge_at = $2
 WHERE org_id = $1 AND days IS NOT NULL
RETURNING days
"""
# Expired: ended before the cutoff, or still open and started before it (an ended session
# started before it ended, so every expired row has start_date < cutoff). Batches go in
# (start_date, id) order from where the last one stopped: a batch never walks again over the
# index entries of rows deleted by the batches before it (dead until vacuum), nor over locked
# expired rows, so a purge costs one pass over the org's rows older than the cutoff.
EXPIRED = """
SELECT id, start_date FROM sessions
 WHERE org_id = $1 AND NOT retention_locked AND start_date < $2
   AND (end_date < $2 OR end_date IS NULL)
 ORDER BY start_date, id
 LIMIT $3
   FOR UPDATE SKIP LOCKED
"""
EXPIRED_AFTER = """
SELECT id, start_date FROM sessions
 WHERE org_id = $1 AND NOT retention_locked AND start_date < $2
   AND (end_date < $2 OR end_date IS NULL)
   AND start_date >= $4 AND (start_date > $4 OR id > $5)
 ORDER BY start_date, id
 LIMIT $3
   FOR UPDATE SKIP LOCKED
"""


@dataclass
class PurgeResult:
    org_id: uuid.UUID
    days: int
    before: datetime
    sessions: int = 0
    reports: int = 0
    postponed: bool = False  # sessions left for the next run: a legal hold was still locking


async def _delete_sessions(conn: Conn, org_id: uuid.UUID, ids: list[uuid.UUID], t: float) -> None:
    # No trigger (none on a distributed table): the rows' contributions leave the rollups in
    # this transaction, from code.
    await rollups.delete_sessions(conn, org_id, ids, t)


async def purge_org(
    pool: asyncpg.Pool,
    org_id: uuid.UUID,
    now: datetime,
    *,
    interval: float,
    batch: int,
    timeout: float,
    claim: bool = True,
    hold_window: int = HOLD_WINDOW,
) -> PurgeResult | None:
    """One purge run of an org (None: not due, or another process claimed it, or the org
    keeps everything). `claim=False` runs at once (the CLI). A legal hold still locking what
    is stored is finished before any session is deleted (checked again at every batch)."""
    async with pool.acquire() as conn:
        if claim:
            days = await conn.fetchval(CLAIM, org_id, now, interval, timeout=timeout)
        else:
            days = await conn.fetchval(CLAIM_NOW, org_id, now, timeout=timeout)
        if days is None:
            return None
        result = PurgeResult(org_id, days, now - timedelta(days=days))
        last: tuple[datetime, uuid.UUID] | None = None
        while True:
            if await store.apply_pending(conn, org_id, window=hold_window, timeout=timeout):
                # A hold still waits for older transactions (one left open, say): its sessions
                # may not be locked yet, so none is deleted this run; the next run tries again.
                result.postponed = True
                log.warning(
                    "retention purge of org %s: sessions postponed to the next run (a legal "
                    "hold is still locking what it matches)",
                    org_id,
                )
                break
            async with conn.transaction():
                if await conn.fetchval(store.ANY_APPLYING, org_id, timeout=timeout):
                    continue  # a hold made meanwhile: finish it first
                if last is None:
                    rows = await conn.fetch(EXPIRED, org_id, result.before, batch, timeout=timeout)
                else:
                    rows = await conn.fetch(
                        EXPIRED_AFTER, org_id, result.before, batch, *last, timeout=timeout
                    )
                ids = [r["id"] for r in rows]
                if rows:
                    last = (rows[-1]["start_date"], rows[-1]["id"])
                if ids:
                    await _delete_sessions(conn, org_id, ids, timeout)
                    await trail.record_sessions(
                        conn, org_id, ACTOR, "purge", ids, timeout, deleted=True
                    )
            result.sessions += len(ids)
            if len(ids) < batch:
                break
        while True:
            async with conn.transaction():
                keep = await store.held_reports(conn, org_id, timeout)
                n = await reports.purge_reports(conn, org_id, result.before, keep, batch, timeout)
                if n:
                    await trail.record(
                        conn,
                        org_id,
                        ACTOR,
                        "purge",
                        "reports",
                        [],
                        {"reports": n, "before": result.before},
                        timeout,
                    )
            result.reports += n
            if n < batch:
                break
        await conn.execute(
            store.INSERT_AUDIT,
            org_id,
            ACTOR,
            "",
            "delete",
            "sessions",
            "retention purge",
            {
                "sessions": result.sessions,
                "reports": result.reports,
                "postponed": result.postponed,
                "days": days,
                "before": result.before.isoformat(),
            },
            timeout=timeout,
        )
    log.info(
        "retention purge of org %s: %d sessions, %d reports before %s",
        org_id,
        result.sessions,
        result.reports,
        result.before.isoformat(),
    )
    return result


async def run_due(
    pool: asyncpg.Pool,
    now: datetime,
    *,
    interval: float,
    batch: int,
    timeout: float,
    hold_window: int = HOLD_WINDOW,
) -> list[PurgeResult]:
    """Finish the legal holds still locking what is stored (those whose request ran out of
    time), then purge every org that is due (each by exactly one of the processes running
    this)."""
    async with pool.acquire() as conn:
        await store.apply_pending(conn, None, window=hold_window, timeout=timeout)
    done = []
    for row in await pool.fetch(DUE, now, timeout=timeout):
        r = await purge_org(
            pool,
            row["org_id"],
            now,
            interval=interval,
            batch=batch,
            timeout=timeout,
            hold_window=hold_window,
        )
        if r is not None:
            done.append(r)
    return done


class Purger:
    """Background task of every server process: checks for due orgs every `tick` seconds."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        clock: Clock,
        *,
        interval: float,
        tick: float,
        batch: int,
        timeout: float,
        hold_window: int = HOLD_WINDOW,
    ) -> None:
        self.hold_window = hold_window
        self.pool = pool
        self.clock = clock
        self.interval = interval
        self.tick = tick
        self.batch = batch
        self.timeout = timeout
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            try:
                await run_due(
                    self.pool,
                    self.clock(),
                    interval=self.interval,
                    batch=self.batch,
                    timeout=self.timeout,
                    hold_window=self.hold_window,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("retention purge failed: %s", exc)
            await asyncio.sleep(self.tick)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
