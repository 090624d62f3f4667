"""On a Citus cluster (`make test-citus`): every statement the service issues for one org is a
router query — planned as one task on the one node holding the org.

A server process runs against the cluster as its own database role, whose statements are logged
(`ALTER ROLE … SET log_statement = all`; the log line names the role); the test drives one org through
every per-org call (ingest new and known sessions, list, get, the session report, histogram,
stats, definitions, reports of every type generated and downloaded, subscriptions, a
scheduler tick, deletions). Then each logged statement is prepared again with its logged
parameters and `EXPLAIN EXECUTE`d: no plan may have more than one task.

Skipped on plain PostgreSQL (the embedded default)."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from session_audit import envoy
from session_audit.analytics import rollups
from session_audit.core import db
from session_audit.reports.generate import PENDING, PENDING_ORGS
from session_audit.reports.scheduler import DUE_ORGS, tick
from session_audit.reports.types import TYPES
from session_audit.retention.purge import DUE as PURGE_DUE_ORGS
from session_audit.retention.store import APPLYING as UNFINISHED_HOLDS
from session_audit.sessions import store
from tests.factories import T0, Spec
from tests.report_reference import ok, wait_report
from tests.support import ServerProcess, Stack, run

pytestmark = pytest.mark.skipif(
    not os.environ.get("CITUS_WORKER_URLS"), reason="needs a Citus cluster (make test-citus)"
)

APP = "router_check"
# Statements that span orgs by design: listing which orgs have due or pending work (reports,
# subscriptions, retention purges, unfinished legal holds; no lock, one task per shard), before
# the per-org claims, and the generation queue's depth for the metrics. Nothing else may.
CROSS_ORG = {
    " ".join(q.split()) for q in (PENDING_ORGS, DUE_ORGS, PURGE_DUE_ORGS, PENDING, UNFINISHED_HOLDS)
}
LOGGED = re.compile(r"^\S+ \S+ \S+ \[\d+\] " + APP + r": LOG:  (?:execute [^:]*|statement): ")
PARAMS = re.compile(r"\$(\d+) = (NULL|'(?:[^']|'')*')")
SHARD = re.compile(r"\b[a-z_]+_1\d{5}\b")
PID = re.compile(r"\[\d+\]")
TASKS = re.compile(r"Task Count: (\d+)")
EXPLAINABLE = ("select", "with", "insert", "update", "delete")


def _logged_dsn(dsn: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{APP}@{parts.hostname}:{parts.port}"))


async def _logged_role(dsn: str) -> None:
    conn = await db.connect(dsn)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", APP):
            await conn.execute(f"CREATE ROLE {APP} LOGIN SUPERUSER")
        await conn.execute(f"ALTER ROLE {APP} SET log_statement = 'all'")
    finally:
        await conn.close()


def _coordinator_log() -> Path:
    path = os.environ.get("CITUS_COORDINATOR_LOG", "")
    if not path:
        pytest.skip("CITUS_COORDINATOR_LOG is not set (make test-citus sets it)")
    return Path(path)


def _pid(line: str) -> str:
    m = PID.search(line)
    return m.group(0) if m else ""


def statements(log: Path, offset: int) -> Iterator[tuple[str, dict[int, str]]]:
    """(SQL, {n: literal}) of every statement logged for APP after `offset`."""
    text = log.read_bytes()[offset:].decode(errors="replace")
    entry: list[str] = []
    entries: list[list[str]] = []
    for line in text.splitlines():
        if re.match(r"^\d{4}-\d\d-\d\d ", line):
            if entry:
                entries.append(entry)
            entry = [line]
        elif entry:
            entry.append(line)
    if entry:
        entries.append(entry)
    for i, e in enumerate(entries):
        m = LOGGED.match(e[0])
        if not m:
            continue
        sql = "\n".join([e[0][m.end() :], *(x.lstrip("\t") for x in e[1:])]).strip()
        if SHARD.search(sql):
            continue  # Citus's own task on a shard placement the coordinator holds
        # Its parameters: the next entry of the same backend, when it is their DETAIL (other
        # backends' entries may come in between).
        params: dict[int, str] = {}
        pid = _pid(e[0])
        for nxt in entries[i + 1 :]:
            if _pid(nxt[0]) == pid:
                if "DETAIL:  parameters:" in nxt[0]:
                    params = {int(n): v for n, v in PARAMS.findall("\n".join(nxt))}
                break
        yield sql, params


def _literal(params: dict[int, str]) -> Callable[[re.Match[str]], str]:
    return lambda m: params[int(m.group(1))]


async def _explain_all(
    dsn: str, found: list[tuple[str, dict[int, str]]]
) -> tuple[dict[str, int], dict[str, str]]:
    """Most tasks in any plan, per distinct statement; statements that could not be planned."""
    conn = await db.connect(dsn)
    worst: dict[str, int] = {}
    failed: dict[str, str] = {}
    try:
        # The service's temporary tables, so statements that use them can be planned.
        await conn.execute(store.CREATE_STAGING)
        await conn.execute(rollups.CREATE_DELTAS)
        for sql, params in found:
            if not sql.lower().lstrip("( ").startswith(EXPLAINABLE):
                continue
            key = " ".join(sql.split())
            if key in CROSS_ORG:
                continue
            # The logged values as literals (untyped: each takes its parameter's type).
            text = re.sub(r"\$(\d+)\b", _literal(params), sql)
            try:
                plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {text}"))
            except asyncpg.PostgresError as exc:
                failed[key] = f"{type(exc).__name__}: {exc}"
                continue
            tasks = max((int(t) for t in TASKS.findall(plan)), default=0)
            worst[key] = max(worst.get(key, 0), tasks)
    finally:
        await conn.close()
    return worst, failed


def test_every_statement_for_one_org_is_a_router_query(stack: Stack, workdir: Path) -> None:
    log = _coordinator_log()
    run(_logged_role(stack.dsn))
    offset = log.stat().st_size
    server = ServerProcess(
        _logged_dsn(stack.dsn), workdir, {"REPORT_GENERATORS": "1"}
    ).start()  # fmt: skip
    http_port = envoy.free_port()
    proxy = server.start_envoy(http_port, workdir)
    one = Stack(stack.dsn, server, http_port, proxy)
    try:
        _drive_one_org(one)
    finally:
        envoy.stop(proxy)
        server.stop()
    time.sleep(0.5)  # the coordinator's log is written asynchronously by its processes
    found = list(statements(log, offset))
    assert len(found) > 50, f"only {len(found)} statements logged; is log_statement honoured?"
    worst, failed = run(_explain_all(stack.dsn, found))
    assert not failed, "statements EXPLAIN could not plan:\n" + "\n\n".join(
        f"{why}\n{sql}" for sql, why in failed.items()
    )
    multi = {sql: n for sql, n in worst.items() if n > 1}
    routed = sum(1 for n in worst.values() if n == 1)
    print(f"\nrouter check: {len(worst)} distinct statements, {routed} one-task router plans, "
          f"{len(worst) - routed} without distributed tables, {len(multi)} multi-task")  # fmt: skip
    assert not multi, "statements planned as more than one task:\n" + "\n\n".join(
        f"[{n} tasks] {sql}" for sql, n in multi.items()
    )
    assert routed >= 20


def _drive_one_org(s: Stack) -> None:
    org = s.new_org("router")
    admin = s.token(org, "admin", "admin@router.example")
    ana = s.token(org, "user", "ana@router.example")
    specs = [
        Spec(start=T0 + timedelta(minutes=i), end=T0 + timedelta(minutes=i + 5),
             email="ana@router.example" if i % 2 else "bo@router.example",
             redactions=(("EMAIL_ADDRESS", 2, 40),))
        for i in range(6)
    ]  # fmt: skip
    specs.append(Spec(start=T0 + timedelta(hours=2), email="ana@router.example"))
    assert s.ingest(admin, [x.to_proto() for x in specs]).written == len(specs)
    # Known sessions again (the lock-and-merge path), one changed.
    again = [x.to_proto() for x in specs[:3]]
    again[0].connection = "pg-other"
    s.ingest(admin, again)
    for token in (admin, ana):
        ok(s.rest("GET", "/api/sessions", token, params={"count": "exact"}))
        ok(s.rest("GET", "/api/sessions", token, params={"count": "capped", "user": "sub-1"}))
        ok(s.rest("GET", f"/api/sessions/{specs[1].id}", token))
        window = {"start_date": "2026-03-01", "end_date": "2026-03-02"}
        ok(s.rest("GET", "/api/reports/sessions", token, params=window))
        for bins in ("hour", "day"):
            ok(s.rest("GET", "/api/audit/sessions/histogram", token,
                      params={"field": "protocol", "bin-size": bins,
                              "start": "2026-03-01T00:00:00Z", "end": "2026-03-02T00:00:00Z"}))  # fmt: skip
        # Off the duration buckets' edges: rollup_outcomes plus the partial buckets' sessions
        # (sessions_org_duration; the unbounded last bucket by start and end time).
        for q in ("duration:>300 OR exit_code:1", "duration:>700000"):
            ok(s.rest("GET", "/api/audit/sessions/histogram", token,
                      params={"field": "protocol", "bin-size": "hour", "q": q,
                              "start": "2026-03-01T00:00:00Z", "end": "2026-03-02T00:00:00Z"}))  # fmt: skip
        ok(s.rest("GET", "/api/audit/sessions/stats", token,
                  params={"field": "protocol", "start": "2026-03-01", "end": "2026-03-02"}))  # fmt: skip
        ok(s.rest("GET", "/api/audit/sessions/stats", token, params={"field": "user"}))
    # Definitions, reports of every type, downloads.
    did = ok(s.rest("POST", "/api/v2/report/defined", admin,
                    json={"title": "mine", "type": "session_summary"}))["defined_report"]["id"]  # fmt: skip
    ok(s.rest("PATCH", f"/api/v2/report/defined/{did}", admin, json={"title": "renamed"}))
    ok(s.rest("GET", "/api/v2/report/defined", admin))
    ok(s.rest("GET", "/api/v2/report/defined", ana))
    ok(s.rest("GET", f"/api/v2/report/defined/{did}", admin))
    rids = []
    for kind in TYPES:
        body = ok(s.rest("POST", "/api/v2/report", admin,
                         json={"defined_report_id": str(kind.predefined_id)}))  # fmt: skip
        rids.append(body["report"]["id"])
    for rid in rids:
        assert wait_report(s, admin, rid)["status"] == "ready"
    for fmt in ("csv", "html", "pdf"):
        r = s.rest("GET", f"/api/v2/report/{rids[-1]}/{fmt}", admin)
        assert r.status_code == 200, r.text
    ok(s.rest("GET", "/api/v2/report", admin))
    ok(s.rest("GET", "/api/v2/report", ana))
    ok(s.rest("DELETE", f"/api/v2/report/{rids[0]}", admin))
    # A subscription whose first period is over: the scheduler's per-org claim.
    sid = ok(s.rest("POST", "/api/v2/report/subscription", admin,
                    json={"period": "day", "defined_report_id": did}))[
        "defined_report_subscription"]["id"]  # fmt: skip
    ok(s.rest("GET", "/api/v2/report/subscription", admin))
    ok(s.rest("GET", f"/api/v2/report/subscription/{sid}", admin))
    created = run(_tick(_logged_dsn(s.dsn), datetime.now(UTC) + timedelta(days=2)))
    assert created >= 1
    ok(s.rest("DELETE", f"/api/v2/report/subscription/{sid}", admin))
    ok(s.rest("DELETE", f"/api/v2/report/defined/{did}", admin))
    # Deleting sessions keeps the rollups exact (the service's delete, no trigger).
    run(_delete(_logged_dsn(s.dsn), org, [specs[0].id]))


async def _tick(dsn: str, now: datetime) -> int:
    pool = await db.create_pool(dsn)
    try:
        return await tick(pool, now)
    finally:
        await pool.close()


async def _delete(dsn: str, org: str, ids: list[str]) -> None:
    import uuid

    conn = await db.connect(dsn)
    try:
        org_id = await conn.fetchval("SELECT id FROM orgs WHERE name = $1", org)
        assert await rollups.delete_sessions(conn, org_id, [uuid.UUID(i) for i in ids], 30) == 1
    finally:
        await conn.close()


def test_the_cluster_is_citus() -> None:
    """The module runs where it should: the coordinator's workers are the ones given."""
    workers = os.environ["CITUS_WORKER_URLS"].split()
    ports = sorted(urlsplit(w).port or 0 for w in workers)

    async def go() -> list[int]:
        conn = await db.connect(os.environ["DATABASE_URL"])
        try:
            rows = await conn.fetch("SELECT node_port FROM citus_get_active_worker_nodes()")
            return sorted(r[0] for r in rows)
        finally:
            await conn.close()

    assert asyncio.run(go()) == ports
