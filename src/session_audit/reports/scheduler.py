"""The subscription scheduler: one report per (subscription, elapsed period), exactly once.

Each tick lists the orgs with due subscriptions (`next_run_at <= now`), then per org takes
them with `FOR UPDATE SKIP LOCKED` (per org: on Citus a row lock needs the distribution
column, docs/scaling.md), and for each one, in the same transaction, records every elapsed period in
`subscription_periods` (primary key (org_id, subscription_id, period_start): a period can be
recorded once, ever), creates its pending report and advances the subscription's watermark. Several
server processes tick concurrently: the row lock keeps them off the same subscription, the
primary key backs it up, and all state lives in PostgreSQL, so a restart or a downtime
spanning several periods is caught up period by period on the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from zoneinfo import ZoneInfo

import asyncpg

from session_audit.core import metrics, redact
from session_audit.reports import periods
from session_audit.reports.config import Clock
from session_audit.reports.store import NewReport, insert_report

log = logging.getLogger(__name__)

# The one statement that spans orgs (no lock; on Citus one task per shard).
DUE_ORGS = """
SELECT org_id, min(next_run_at) AS oldest FROM report_subscriptions WHERE next_run_at <= $1
 GROUP BY org_id
"""
DUE = """
SELECT s.id, s.org_id, s.owner, s.period, s.time_zone, s.next_period_start,
       s.next_run_at, d.id AS defined_report_id, d.title, d.type, d.query_filter,
       d.query_order
  FROM report_subscriptions s
  JOIN defined_reports d ON d.org_id = s.org_id AND d.id = s.defined_report_id
 WHERE s.org_id = $3 AND d.org_id = $3 AND s.next_run_at <= $1
 ORDER BY s.next_run_at, s.id
 LIMIT $2
   FOR UPDATE OF s SKIP LOCKED
"""
# What each subscriber of the org may read *now*, from their active tokens: the whole org with
# an admin or auditor token, their own sessions with a user token, nothing (absent) once their
# reading tokens are all revoked. A subscription never keeps access its owner has lost. Read in
# the claiming transaction (api_tokens stays on the coordinator under Citus).
SCOPES = """
SELECT lower(email) AS owner,
       CASE WHEN bool_or(role IN ('admin', 'auditor')) THEN 'org'
            WHEN bool_or(role = 'user') THEN 'own' END AS scope
  FROM api_tokens
 WHERE org_id = $1 AND revoked_at IS NULL AND lower(email) = any($2::text[])
 GROUP BY 1
"""
RECORD_PERIOD = """
INSERT INTO subscription_periods (org_id, subscription_id, period_start, period_end)
VALUES ($4, $1, $2, $3)
ON CONFLICT DO NOTHING
RETURNING true
"""
LINK_REPORT = """
UPDATE subscription_periods SET report_id = $3
 WHERE org_id = $4 AND subscription_id = $1 AND period_start = $2
"""
ADVANCE = """
UPDATE report_subscriptions SET next_period_start = $2, next_run_at = $3
 WHERE org_id = $4 AND id = $1
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
    due_orgs = await pool.fetch(DUE_ORGS, now, timeout=timeout)
    # The longest overdue subscription of any org.
    lag = max(((now - r["oldest"]).total_seconds() for r in due_orgs), default=0.0)
    metrics.SCHEDULER_LAG.set(max(0.0, lag))
    for row in due_orgs:
        created += await _tick_org(pool, row["org_id"], now, timeout)
    return created


async def _tick_org(pool: asyncpg.Pool, org_id: uuid.UUID, now: datetime, timeout: float) -> int:
    created = 0
    while True:
        async with pool.acquire() as conn, conn.transaction():
            due = await conn.fetch(DUE, now, BATCH, org_id, timeout=timeout)
            owners = sorted({sub["owner"] for sub in due})
            scopes = {
                r["owner"]: r["scope"]
                for r in await conn.fetch(SCOPES, org_id, owners, timeout=timeout)
            }
            for sub in due:
                scope = scopes.get(sub["owner"])
                zone = ZoneInfo(sub["time_zone"])
                start, end = sub["next_period_start"], sub["next_run_at"]
                done = 0
                while end <= now and done < MAX_CATCH_UP:
                    recorded = await conn.fetchval(
                        RECORD_PERIOD, sub["id"], start, end, org_id, timeout=timeout
                    )
                    if recorded and not may_read(scope, sub["type"]):
                        # The period is recorded (once) without a report: its owner has no
                        # access to it now. Periods reached later follow their access again.
                        log.info("subscription %s: %s has no reading access; period %s skipped",
                                 sub["id"], sub["owner"], start.isoformat())  # fmt: skip
                    elif recorded:
                        assert scope is not None
                        label = periods.label(sub["period"], zone, start)
                        report = NewReport(
                            defined_report_id=sub["defined_report_id"], type=sub["type"],
                            title=f"{sub['title']} · {label}", query_filter=sub["query_filter"],
                            query_order=sub["query_order"], time_zone=sub["time_zone"],
                            subscription_id=sub["id"], period=sub["period"],
                            period_start=start, period_end=end,
                        )  # fmt: skip
                        rid = await insert_report(
                            conn, org_id, sub["owner"], scope, report, timeout
                        )
                        await conn.execute(
                            LINK_REPORT, sub["id"], start, rid, org_id, timeout=timeout
                        )
                        created += 1
                    start, end = periods.next_period(sub["period"], zone, start)
                    done += 1
                await conn.execute(ADVANCE, sub["id"], start, end, org_id, timeout=timeout)
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
