"""rollup_outcomes (migration 0052): a `q` on `duration` at bucket edges and/or on `exit_code` is
answered from per-day counts of how sessions ended, exactly as the sessions table answers it —
by hand on a small fixture, in UTC and in a zone whose days are not UTC days, before and after
ingest changes a stored session's duration and exit code. (Thresholds off the edges:
tests/test_analytics_duration_split.py; random worlds against the plain-Python reference:
tests/test_analytics_properties.py.)"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from session_audit.analytics import requests, rollups, store
from session_audit.analytics.fields import BASE, OUTCOMES
from session_audit.core import auth, db
from tests.factories import Spec, histogram_query, ingest_specs
from tests.support import Stack, run
from tests.test_analytics_rollups import consistent

D1 = datetime(2026, 4, 6, tzinfo=UTC)
MIGRATION = (
    Path(__file__).parent.parent / "src/session_audit/core/migrations/0052_rollup_outcomes.sql"
)


def test_the_migration_backfills_with_the_rollup_definition() -> None:
    """The backfill of existing data is the same SELECT rebuild and ingest use."""
    text = MIGRATION.read_text()
    insert = re.search(r"^INSERT INTO rollup_outcomes \((.*?)\)\n(SELECT .*?);$", text, re.M | re.S)
    assert insert is not None
    assert tuple(c.strip() for c in insert.group(1).split(",")) == rollups.OUTCOMES.columns
    assert insert.group(2) == rollups.OUTCOMES.contributions("TRUE")


def _hq(q: str, zone_name: str, days: int = 2) -> requests.HistogramQuery:
    return histogram_query(q, zone_name, D1.replace(tzinfo=None), days)


def _at(h: float, day: int = 0) -> datetime:
    return D1 + timedelta(days=day, hours=h)


def test_duration_and_exit_code_counts_by_hand_and_after_an_update(stack: Stack) -> None:
    a = Spec(start=_at(10), end=_at(11))  # exactly 3600 s
    b = Spec(start=_at(10), end=_at(11) - timedelta(seconds=1), exit_code=1)  # 3599 s
    c = Spec(start=_at(11), end=_at(13), exit_code=137)  # 7200 s
    d = Spec(start=_at(12))  # open
    e = Spec(start=_at(-0.5), end=_at(1))  # 5400 s, started the day before

    async def answers(conn: Any, org: uuid.UUID, q: str, zone: str) -> list[tuple[int, int]]:
        who = auth.Principal(0, org, "auditor", "aud@x.example")
        rolled = await store.histogram(conn, who, _hq(q, zone), 30)
        based = await store.histogram(conn, who, _hq(q, zone), 30, store.Options(force_base=True))
        assert rolled.source == OUTCOMES and based.source == BASE
        assert rolled.buckets == based.buckets
        return rolled.buckets

    async def go() -> None:
        conn = await db.connect(stack.dsn, json_codec=False)
        try:
            org = await auth.ensure_org(conn, f"outcomes-{uuid.uuid4().hex[:10]}")
            await ingest_specs(conn, org, [a, b, c, d, e])
            # (start_count, active_count) per UTC day, 6 and 7 April.
            assert await answers(conn, org, "duration:>=3600", "Etc/UTC") == [(2, 3), (0, 0)]
            assert await answers(conn, org, "duration:<3600", "Etc/UTC") == [(1, 1), (0, 0)]
            assert await answers(conn, org, "exit_code:>=1", "Etc/UTC") == [(2, 2), (0, 0)]
            assert await answers(conn, org, "NOT duration:*", "Etc/UTC") == [(1, 1), (0, 1)]
            # A reports it lasted a minute after all; D ends on 7 April 02:00 after 38 h, exit 2.
            a2 = Spec(id=a.id, start=a.start, end=_at(10) + timedelta(minutes=1))
            d2 = Spec(id=d.id, start=d.start, end=_at(2, day=1), exit_code=2)
            await ingest_specs(conn, org, [a2, d2])
            assert await answers(conn, org, "duration:>=3600", "Etc/UTC") == [(2, 3), (0, 1)]
            assert await answers(conn, org, "duration:<3600", "Etc/UTC") == [(2, 2), (0, 0)]
            assert await answers(conn, org, "exit_code:>=1", "Etc/UTC") == [(3, 3), (0, 1)]
            assert await answers(conn, org, "NOT duration:*", "Etc/UTC") == [(0, 0), (0, 0)]
            # Berlin days (UTC+2) start at 22:00 UTC the day before: E starts on 6 April there;
            # the parts of the days that are not UTC days come from the sessions table.
            assert await answers(conn, org, "duration:>=3600", "Europe/Berlin") == [(3, 3), (0, 1)]
            await consistent(conn, org)
        finally:
            await conn.close()

    run(go())
