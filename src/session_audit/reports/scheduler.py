"""The subscription scheduler: one report per (subscription, elapsed period), exactly once.

Each tick takes the due subscriptions (`next_run_at <= now`) with `FOR UPDATE SKIP LOCKED`,
and for each one, in the same transaction, records every elapsed period in
`subscription_periods` (primary key (subscription_id, period_start): a period can be recorded
once, ever), creates its pending report and advances the subscription's watermark. Several
server processes tick concurrently: the row lock keeps them off the same subscription, the
primary key backs it up, and all state lives in PostgreSQL, so a restart or a downtime
spanning several periods is caught up period by period on the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from zoneinfo import ZoneInfo

import asyncpg

from session_audit.core import metrics, redact
from session_audit.reports import periods
from session_audit.reports.config import Clock
from session_audit.reports.store import NewReport, insert_report

log = logging.getLogger(__name__)

# `scope` is what the subscriber may read *now*, from their active tokens: the whole org with
# an admin or auditor token, their own sessions with a user token, nothing (NULL) once their
# reading tokens are all revoked. A subscription never keeps access its owner has lost.
DUE = """
SELECT s.id, s.org_id, s.owner, s.period, s.time_zone, s.next_period_start,
       s.next_run_at, d.id AS defined_report_id, d.title, d.type, d.query_filter,
       d.query_order,
       (SELECT CASE WHEN bool_or(t.role IN ('admin', 'auditor')) THEN 'org'
                    WHEN bool_or(t.role = 'user') THEN 'own' END
          FROM api_tokens t
         WHERE t.org_id = s.org_id AND lower(t.email) = s.owner AND t.revoked_at IS NULL
       ) AS scope
  FROM report_subscriptions s
  JOIN defined_reports d ON d.id = s.defined_report_id
 WHERE s.next_run_at <= $1
 ORDER BY s.next_run_at, s.id
 LIMIT $2
   FOR UPDATE OF s SKIP LOCKED
"""
RECORD_PERIOD = """
INSERT INTO subscription_periods (subscription_id, period_start, period_end)
VALUES ($1, $2, $3)
ON CONFLICT DO NOTHING
RETURNING true
"""
LINK_REPORT = """
UPDATE subscription_periods SET report_id = $3 WHERE subscription_id = $1 AND period_start = $2
"""
ADVANCE = """
UPDATE report_subscriptions SET next_period_start = $2, next_run_at = $3 WHERE id = $1
"""
BATCH = 100
# Periods caught up per subscription per tick; the rest follow on the next ticks.
MAX_CATCH_UP = 1000


def may_read(scope: str | None, report_type: str) -> bool:
    """Whether a subscriber with this scope now may have this report (the System report is for
    admins and auditors only, as when subscribing)."""
    return scope == "org" or (scope == "own" and report_type != "system")


async def tick(pool: asyncpg.Pool, now: datetime, timeout: float = 60.0) -> int:
    """Create the reports of every period that ended at or before `now`. Returns how many."""
    created = 0
    first = True
    while True:
        async with pool.acquire() as conn, conn.transaction():
            due = await conn.fetch(DUE, now, BATCH, timeout=timeout)
            if first:
                # Rows come oldest first: the first is the longest overdue.
                lag = (now - due[0]["next_run_at"]).total_seconds() if due else 0.0
                metrics.SCHEDULER_LAG.set(max(0.0, lag))
                first = False
            for sub in due:
                zone = ZoneInfo(sub["time_zone"])
                start, end = sub["next_period_start"], sub["next_run_at"]
                done = 0
                while end <= now and done < MAX_CATCH_UP:
                    recorded = await conn.fetchval(
                        RECORD_PERIOD, sub["id"], start, end, timeout=timeout
                    )
                    if recorded and not may_read(sub["scope"], sub["type"]):
                        # The period is recorded (once) without a report: its owner has no
                        # access to it now. Periods reached later follow their access again.
                        log.info("subscription %s: %s has no reading access; period %s skipped",
                                 sub["id"], sub["owner"], start.isoformat())  # fmt: skip
                    elif recorded:
                        label = periods.label(sub["period"], zone, start)
                        report = NewReport(
                            defined_report_id=sub["defined_report_id"], type=sub["type"],
                            title=f"{sub['title']} · {label}", query_filter=sub["query_filter"],
                            query_order=sub["query_order"], time_zone=sub["time_zone"],
                            subscription_id=sub["id"], period=sub["period"],
                            period_start=start, period_end=end,
                        )  # fmt: skip
                        rid = await insert_report(
                            conn, sub["org_id"], sub["owner"], sub["scope"], report, timeout
                        )
                        await conn.execute(LINK_REPORT, sub["id"], start, rid, timeout=timeout)
                        created += 1
                    start, end = periods.next_period(sub["period"], zone, start)
                    done += 1
                await conn.execute(ADVANCE, sub["id"], start, end, timeout=timeout)
        if len(due) < BATCH:
            return created


class Scheduler:
    """Ticks every `interval` seconds with the configured clock; wakes the generators when a
    tick created reports."""

    def __init__(
        self, pool: asyncpg.Pool, clock: Clock, interval: float, on_created: Callable[[], None]
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.interval = interval
        self.on_created = on_created
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            try:
                if await tick(self.pool, self.clock()):
                    self.on_created()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("scheduler tick failed: %s", redact.describe(exc))
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
