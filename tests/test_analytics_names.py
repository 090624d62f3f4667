"""rollup_names (migration 0055): a `q` on `role` alone or on `resource` alone is answered from
per-day counts of each role and resource name, exactly as the sessions table answers it — by
hand on a small fixture, in UTC and in a zone whose days are not UTC days, before and after
ingest moves a stored session to another role and resource, and after a retention purge.
(Random worlds against the plain-Python reference: tests/test_analytics_properties.py.)"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from session_audit.analytics import requests, rollups, store
from session_audit.analytics.fields import BASE, CUBE, NAMES, VALUES
from session_audit.analytics.q import parse_q
from session_audit.core import auth, db
from session_audit.core.validation import parse_zone
from session_audit.retention import purge
from tests.factories import Spec, histogram_query, ingest_specs
from tests.support import Stack, run
from tests.test_analytics_rollups import consistent

D1 = datetime(2026, 4, 6, tzinfo=UTC)
MIGRATION = Path(__file__).parent.parent / "src/session_audit/core/migrations/0055_rollup_names.sql"


def test_the_migration_backfills_with_the_rollup_definition() -> None:
    """The backfill of existing data is the same SELECT rebuild and ingest use."""
    text = MIGRATION.read_text()
    insert = re.search(r"^INSERT INTO rollup_names \((.*?)\)\n(SELECT .*?);$", text, re.M | re.S)
    assert insert is not None
    assert tuple(c.strip() for c in insert.group(1).split(",")) == rollups.NAMES.columns
    assert insert.group(2) == rollups.NAMES.contributions("TRUE")
    # Ingest upserts in the primary key's order (field before bucket), as every writer does.
    key = re.search(r"PRIMARY KEY \((.*?)\)", text)
    assert key is not None
    assert tuple(c.strip() for c in key.group(1).split(",")) == rollups.NAMES.pk


def _who(org: uuid.UUID, role: str = "auditor") -> auth.Principal:
    return auth.Principal(0, org, role, "ana@x.example")


@pytest.mark.parametrize(
    ("field", "size", "q", "source"),
    [
        ("protocol", None, "role:ssh-1*", NAMES),
        ("protocol", None, "NOT role:(a OR b)", NAMES),
        ("protocol", None, "role:* AND NOT role:dba", NAMES),
        ("connection", None, "resource:db-*", NAMES),
        ("protocol", None, "NOT resource:*", NAMES),
        ("protocol", None, "role:dba AND resource:db-a", BASE),  # two fields: no row has both
        ("protocol", 5, "role:dba", BASE),  # role x protocol: no rollup holds it
        ("protocol", None, "role:dba OR verb:exec", BASE),
        ("protocol", None, "verb:exec", VALUES),
        ("protocol", None, "verb:exec AND status:done", CUBE),
    ],
)
def test_the_planner_reads_role_or_resource_alone_from_rollup_names(
    field: str, size: int | None, q: str, source: str
) -> None:
    _, zone = parse_zone("")
    query = parse_q(q, zone)
    assert query is not None
    needed = set(query.fields) | ({field} if size else set())
    org = uuid.uuid4()
    assert store.plan(_who(org), needed, rollups_ok=True, query=query) == source
    assert store.plan(_who(org), needed, rollups_ok=False, query=query) == BASE
    assert store.plan(_who(org, "user"), needed, rollups_ok=True, query=query) == BASE


def _hq(q: str, zone_name: str, days: int = 2) -> requests.HistogramQuery:
    return histogram_query(q, zone_name, D1.replace(tzinfo=None), days)


def _at(h: float, day: int = 0) -> datetime:
    return D1 + timedelta(days=day, hours=h)


def test_role_and_resource_counts_by_hand_after_an_update_and_a_purge(stack: Stack) -> None:
    a = Spec(start=_at(1), end=_at(2), role="ssh-10", resource="db-a")
    b = Spec(start=_at(10), end=_at(11), role="ssh-11", resource="")  # sent empty
    c = Spec(start=_at(11), end=_at(1, day=1), role="dba")  # no resource (NULL)
    d = Spec(start=_at(12), role="ssh-2", resource="db-b")  # open
    e = Spec(start=_at(-0.5), end=_at(1), role="dba", resource="web")  # started the day before

    async def answers(conn: Any, org: uuid.UUID, q: str, zone: str) -> list[tuple[int, int]]:
        rolled = await store.histogram(conn, _who(org), _hq(q, zone), 30)
        based = await store.histogram(conn, _who(org), _hq(q, zone), 30, store.Options(True))
        assert rolled.source == NAMES and based.source == BASE
        assert rolled.buckets == based.buckets
        return rolled.buckets

    async def go() -> None:
        conn = await db.connect(stack.dsn, json_codec=False)
        try:
            org = await auth.ensure_org(conn, f"names-{uuid.uuid4().hex[:10]}")
            await ingest_specs(conn, org, [a, b, c, d, e])
            # (start_count, active_count) per UTC day, 6 and 7 April.
            utc = "Etc/UTC"
            assert await answers(conn, org, "role:ssh-1*", utc) == [(2, 2), (0, 0)]
            assert await answers(conn, org, "NOT role:(ssh-10 OR ssh-11)", utc) == [(2, 3), (0, 2)]
            assert await answers(conn, org, "role:dba AND NOT role:ssh*", utc) == [(1, 2), (0, 1)]
            # '' and NULL are no resource: `resource:*` matches neither, NOT matches both.
            assert await answers(conn, org, "resource:*", utc) == [(2, 3), (0, 1)]
            assert await answers(conn, org, "NOT resource:*", utc) == [(2, 2), (0, 1)]
            assert await answers(conn, org, "resource:db-? OR resource:web", utc) == [
                (2, 3), (0, 1)
            ]  # fmt: skip
            assert await answers(conn, org, 'resource:"db-a"', utc) == [(1, 1), (0, 0)]
            # A moves to role dba and resource web; C gets a resource; D ends on 7 April.
            a2 = Spec(id=a.id, start=a.start, end=a.end, role="dba", resource="web")
            c2 = Spec(id=c.id, start=c.start, end=c.end, role="dba", resource="db-a")
            d2 = Spec(id=d.id, start=d.start, end=_at(3, day=1), role="ssh-2", resource="db-b")
            await ingest_specs(conn, org, [a2, c2, d2])
            assert await answers(conn, org, "role:ssh-1*", utc) == [(1, 1), (0, 0)]
            assert await answers(conn, org, "role:dba", utc) == [(2, 3), (0, 1)]
            assert await answers(conn, org, "resource:db-*", utc) == [(2, 2), (0, 2)]
            assert await answers(conn, org, "resource:web", utc) == [(1, 2), (0, 0)]
            assert await answers(conn, org, "NOT resource:*", utc) == [(1, 1), (0, 0)]
            # Berlin days (UTC+2) start at 22:00 UTC the day before: E starts on 6 April there;
            # the parts of the days that are not UTC days come from the sessions table.
            berlin = "Europe/Berlin"
            assert await answers(conn, org, "resource:web", berlin) == [(2, 2), (0, 0)]
            await consistent(conn, org)
            # Retention: a 30-day policy run on 6 May 12:00 UTC deletes what ended before
            # 6 April 12:00 (A, B, E): their rows leave rollup_names in the same transaction.
            await conn.execute(
                "INSERT INTO retention_policies (org_id, days, modified_by) VALUES ($1, 30, 't')",
                org,
            )
            pool = await db.create_pool(stack.dsn, 1, 2)
            try:
                done = await purge.purge_org(pool, org, _at(12, day=30), interval=3600,
                                             batch=2, timeout=60, claim=False)  # fmt: skip
            finally:
                await pool.close()
            assert done is not None and done.sessions == 3
            assert await answers(conn, org, "role:dba", utc) == [(1, 1), (0, 1)]
            assert await answers(conn, org, "resource:*", utc) == [(2, 2), (0, 2)]
            assert await answers(conn, org, "role:ssh*", utc) == [(1, 1), (0, 1)]
            await consistent(conn, org)
        finally:
            await conn.close()

    run(go())
