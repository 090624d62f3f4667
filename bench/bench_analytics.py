"""Aggregations benchmark (issue 3). Not a test: prints figures, asserts nothing.

    make bench-analytics                                  # 10,000,000 sessions, 4 orgs, a year
    .venv/bin/python bench/bench_analytics.py --sessions 1000000

The data set lives in .bench-data-analytics/ (or DATABASE_URL's server) and is reused by later
runs when it holds the same --sessions/--orgs/--days (loading 10M takes minutes); --fresh
reloads it. One run prints, for one org of sessions/orgs sessions:
  * the session report (each group_by), the histogram (day/30 days, hour/2 days, week/1 year,
    with and without size, with a q, in a DST zone) and the statistics: p50/p99 over gRPC and
    REST (the real server and Envoy), next to the same answer computed by the SQL layer from
    the rollups and from the base tables only, and for the report next to the reference
    gateway's own query (expand every session's metrics JSON of the org, then filter); each
    line says whether the rollup answer equals the base-table answer;
  * ingest rate through the real write path (IngestBatch, as the servicer uses it) with and
    without rollup maintenance, alternating rounds on fresh orgs; and a gRPC stream with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import analytics_data as data
from bench.bench_sessions import machine, pct
from session_audit import envoy
from session_audit.analytics import (
    requests,
    rollups,
    store,
)
from session_audit.core import auth, db, migrate
from session_audit.embedded import EmbeddedPostgres
from session_audit.sessions.ingest import IngestBatch
from session_audit.v1 import analytics_pb2 as apb
from session_audit.v1 import analytics_pb2_grpc as apb_grpc
from session_audit.v1 import sessions_pb2 as pb
from session_audit.v1 import sessions_pb2_grpc as pb_grpc
from tests.support import ServerProcess

DATA_DIR = ROOT / ".bench-data-analytics"
LOAD_BATCH = 250_000

# The reference gateway's report query (hoophq/hoop, models/reports.go), on our table: expand
# the metrics JSON of every session of the org, join back, filter by end time, group.
GATEWAY_REPORT = """
WITH info_types AS (
    SELECT id, info_type, redact_total::numeric
      FROM sessions, jsonb_each_text(metrics -> 'data_masking' -> 'info_types') AS kv(info_type, redact_total)
     WHERE org_id = $1 AND metrics IS NOT NULL
), metrics AS (
    SELECT CASE $2::text
             WHEN 'connection' THEN s.connection
             WHEN 'id' THEN s.id::text
             WHEN 'user_email' THEN s.user_email
             WHEN 'connection_type' THEN s.connection_type
           END AS resource,
           i.info_type,
           sum(i.redact_total) AS redact_total,
           sum((metrics -> 'data_masking' ->> 'transformed_bytes')::int) AS transformed_bytes
      FROM sessions s
      JOIN info_types i ON s.id = i.id
     WHERE s.org_id = $1 AND metrics IS NOT NULL
       AND end_date BETWEEN $3 AND $4
     GROUP BY 1, 2
)
SELECT * FROM metrics
"""


@dataclass
class Case:
    name: str
    target_ms: float | None
    grpc: Callable[[], Awaitable[Any]]
    rest: Callable[[], Awaitable[Any]]
    rollup: Callable[[], Awaitable[Any]]
    base: Callable[[], Awaitable[Any]]
    gateway: Callable[[], Awaitable[Any]] | None = None
    same: Callable[[Any, Any], bool] = field(default=lambda a, b: a == b)


async def timed(fn: Callable[[], Awaitable[Any]], n: int, warm: int = 3) -> tuple[list[float], Any]:
    result = None
    for _ in range(warm):
        result = await fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        result = await fn()
        out.append((time.perf_counter() - t) * 1000)
    return out, result


def fmt(samples: list[float]) -> str:
    return f"{statistics.median(samples):8.1f} {pct(samples, 0.99):8.1f}"


async def load(
    conn: asyncpg.Connection, n: int, orgs: int, days: int, seed: float | None = None,
    t_end_at: datetime | None = None,
) -> datetime:  # fmt: skip
    """Generate the data set unless this database already holds it; returns its end time. With
    `seed` and `t_end_at` the same rows (but for their random ids) on any engine."""
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS bench_meta (sessions bigint, orgs int, days int,"
        " t_end timestamptz)"
    )
    row = await conn.fetchrow("SELECT * FROM bench_meta")
    if row is not None and (row["sessions"], row["orgs"], row["days"]) == (n, orgs, days):
        print(f"data     reusing {n:,} sessions ending {row['t_end']:%Y-%m-%d %H:%M} UTC")
        t_end: datetime = row["t_end"]
        return t_end
    if row is not None:
        raise SystemExit("this database holds another data set: use --fresh")
    t_end = t_end_at or datetime.now(UTC).replace(microsecond=0)
    per_org = n // orgs
    t = time.perf_counter()
    # Secondary indexes are dropped while generating and built afterwards (several times
    # faster than maintaining them row by row); the definitions are put back verbatim.
    indexes = await conn.fetch(
        "SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS ddl"
        "  FROM pg_index i WHERE i.indrelid = 'sessions'::regclass AND NOT i.indisprimary"
    )
    for ix in indexes:
        await conn.execute(f"DROP INDEX {ix['name']}")
    with tqdm(total=n, unit="session", desc="generate") as bar:
        for k in range(1, orgs + 1):
            org_id = await auth.ensure_org(conn, f"bench-org-{k}")
            for done in range(0, per_org, LOAD_BATCH):
                size = min(LOAD_BATCH, per_org - done)
                if seed is not None:
                    part = seed + k * 0.137 + done / LOAD_BATCH * 0.0711
                    await conn.execute("SELECT setseed($1)", part % 2 - 1)
                await conn.execute(data.GENERATE, org_id, k, size, t_end, days * 86400.0)
                bar.update(size)
    for ix in tqdm(indexes, desc="index"):
        await conn.execute(ix["ddl"])
    generated = time.perf_counter() - t
    t = time.perf_counter()
    await rollups.rebuild(conn)
    rebuilt = time.perf_counter() - t
    await conn.execute("VACUUM ANALYZE")
    # On Citus a bare VACUUM covers only the coordinator's local tables; named distributed
    # tables are vacuumed on every shard (visibility maps for index-only scans, statistics).
    if await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'citus'"):
        for (table,) in await conn.fetch("SELECT logicalrelid::text FROM pg_dist_partition"):
            await conn.execute(f"VACUUM ANALYZE {table}")
    await conn.execute("INSERT INTO bench_meta VALUES ($1, $2, $3, $4)", n, orgs, days, t_end)
    print(f"load     {n:,} sessions generated in SQL in {generated:.0f} s; rollups rebuilt "
          f"in {rebuilt:.0f} s")  # fmt: skip
    return t_end


async def sizes(conn: asyncpg.Connection) -> str:
    if await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'citus'"):
        # The coordinator's own statistics see no shard: sizes summed over the workers.
        rows = await conn.fetch(
            "SELECT logicalrelid::text AS relname, citus_total_relation_size(logicalrelid)"
            "  AS bytes FROM pg_dist_partition WHERE logicalrelid::text LIKE 'rollup_%'"
            "    OR logicalrelid::text = 'sessions' ORDER BY 1"
        )
        return ", ".join(f"{r['relname']} {r['bytes'] / 2**20:,.0f} MiB" for r in rows)
    rows = await conn.fetch(
        "SELECT relname, n_live_tup, pg_total_relation_size(relid) AS bytes"
        "  FROM pg_stat_user_tables WHERE relname LIKE 'rollup_%' OR relname = 'sessions'"
        " ORDER BY relname"
    )
    return ", ".join(f"{r['relname']} {r['n_live_tup']:,} rows {r['bytes'] / 2**20:,.0f} MiB"
                     for r in rows)  # fmt: skip


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=10_000_000)
    ap.add_argument("--orgs", type=int, default=4)
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--requests", type=int, default=40, help="per case and surface")
    ap.add_argument("--base-requests", type=int, default=5, help="for the base-table SQL")
    ap.add_argument("--ingest-sessions", type=int, default=100_000)
    ap.add_argument("--ingest-rounds", type=int, default=3)
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--only-ingest", action="store_true", help="skip the latency cases")
    ap.add_argument("--skip", action="append", default=[], metavar="TEXT",
                    help="skip the cases whose name contains TEXT (repeatable)")  # fmt: skip
    ap.add_argument("--only", action="append", default=[], metavar="TEXT",
                    help="run only the cases whose name contains TEXT (repeatable)")  # fmt: skip
    ap.add_argument("--fresh", action="store_true", help="drop and reload the data set")
    ap.add_argument("--load-only", action="store_true", help="load the data set and stop")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR,
                    help="embedded PostgreSQL data directory (one per data set size)")  # fmt: skip
    # Comparing engines (docs/scaling.md): the same data on each (seeded, fixed end time), and
    # every answer written to a file to compare.
    ap.add_argument("--seed", type=float, default=None, help="seed the generated data")
    ap.add_argument("--t-end", type=datetime.fromisoformat, default=None, help="data end time")
    ap.add_argument("--answers", type=Path, default=None, help="write each case's answer here")
    args = ap.parse_args()
    data_dir: Path = args.data_dir
    os.makedirs(data_dir, exist_ok=True)  # logs and Envoy's files, also with DATABASE_URL

    print(f"machine  {machine()}")
    url = os.environ.get("DATABASE_URL", "")
    embedded = None
    if not url:
        if args.fresh:
            shutil.rmtree(data_dir, ignore_errors=True)
        embedded = EmbeddedPostgres(data_dir)
        url = embedded.start()
    conn = await db.connect(url)
    if args.fresh and embedded is None:
        await conn.execute("DROP TABLE IF EXISTS bench_meta")
    await migrate.migrate(conn)
    t_end = await load(conn, args.sessions, args.orgs, args.days, args.seed, args.t_end)
    if args.load_only:
        await conn.close()
        if embedded is not None:
            embedded.stop()
        return
    org_id = await conn.fetchval("SELECT id FROM orgs WHERE name = 'bench-org-1'")
    in_org = await conn.fetchval("SELECT count(*) FROM sessions WHERE org_id = $1", org_id)
    print(f"data     {args.sessions:,} sessions, {args.orgs} orgs, {args.days} days; measured "
          f"org: {in_org:,} sessions; {data.CONNECTIONS} connections, {data.USERS} users")  # fmt: skip
    print(f"tables   {await sizes(conn)}")

    auditor = await auth.create_token(conn, "bench-org-1", "auditor", "auditor@org1.example")
    user_token = await auth.create_token(conn, "bench-org-1", "user", "user-007@org1.example")
    srv = ServerProcess(url, data_dir).start()
    http_port = envoy.free_port()
    proxy = srv.start_envoy(http_port, data_dir)
    pool = await db.create_pool(url, 2, 4)
    channel = grpc.aio.insecure_channel(
        srv.target, options=[("grpc.max_receive_message_length", 256 << 20)]
    )
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=600)
    try:
        ctx = Ctx(
            stub=apb_grpc.AnalyticsServiceStub(channel),
            http=http,
            pool=pool,
            conn=conn,
            tokens={"auditor": auditor, "user": user_token},
            principals={
                "auditor": auth.Principal(0, org_id, "auditor", "auditor@org1.example"),
                "user": auth.Principal(0, org_id, "user", "user-007@org1.example"),
            },
            org_id=org_id,
            now=t_end,
        )
        if not args.only_ingest:
            cases = [c for c in build_cases(ctx, t_end.date())
                     if not any(text in c.name for text in args.skip)
                     and (not args.only or any(text in c.name for text in args.only))]  # fmt: skip
            await run_cases(cases, args)
        if not args.skip_ingest:
            await ingest(url, conn, srv, args, t_end)
    finally:
        await http.aclose()
        await channel.close()
        await pool.close()
        envoy.stop(proxy)
        srv.stop()
        await conn.close()
        if embedded is not None:
            embedded.stop()


@dataclass
class Ctx:
    """What every case needs: clients, the SQL pool, tokens and the measured org."""

    stub: Any
    http: httpx.AsyncClient
    pool: asyncpg.Pool
    conn: asyncpg.Connection
    tokens: dict[str, str]
    principals: dict[str, auth.Principal]
    org_id: uuid.UUID
    now: datetime

    def rest(self, path: str, params: dict[str, str], role: str) -> Callable[[], Awaitable[Any]]:
        async def go() -> Any:
            headers = {"authorization": f"Bearer {self.tokens[role]}"}
            r = await self.http.get(path, params=params, headers=headers)
            assert r.status_code == 200, r.text
            return r.json()

        return go

    def md(self, role: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.tokens[role]}"),)


def report_case(ctx: Ctx, name: str, target: float | None, params: dict[str, str], role: str,
                gateway: bool) -> Case:  # fmt: skip
    req = apb.SessionReportRequest(**params)
    rq = requests.parse_report(req, ctx.now)
    who = ctx.principals[role]

    async def via_grpc() -> Any:
        return await ctx.stub.GetSessionReport(req, metadata=ctx.md(role), timeout=600)

    async def rolled() -> store.ReportResult:
        async with ctx.pool.acquire() as c:
            return await store.report(c, who, rq, 600)

    async def based() -> store.ReportResult:
        async with ctx.pool.acquire() as c:
            return await store.report(c, who, rq, 600, store.Options(force_base=True))

    async def gateway_sql() -> Any:
        return await ctx.conn.fetch(
            GATEWAY_REPORT, ctx.org_id, params["group_by"], rq.start, rq.end
        )

    return Case(name, target, via_grpc, ctx.rest("/api/reports/sessions", params, role), rolled,
                based, gateway_sql if gateway else None, same=lambda a, b: a.items == b.items)  # fmt: skip


def histogram_case(ctx: Ctx, name: str, target: float | None, params: dict[str, Any]) -> Case:
    req = apb.HistogramRequest(**params)
    hq = requests.parse_histogram(req, ctx.now)
    who = ctx.principals["auditor"]

    async def via_grpc() -> Any:
        return await ctx.stub.GetSessionHistogram(req, metadata=ctx.md("auditor"), timeout=600)

    async def rolled() -> store.HistogramResult:
        async with ctx.pool.acquire() as c:
            return await store.histogram(c, who, hq, 600)

    async def based() -> store.HistogramResult:
        async with ctx.pool.acquire() as c:
            return await store.histogram(c, who, hq, 600, store.Options(force_base=True))

    rest = {("bin-size" if k == "bin_size" else k): str(v) for k, v in params.items()}
    return Case(name, target, via_grpc,
                ctx.rest("/api/audit/sessions/histogram", rest, "auditor"), rolled, based,
                same=lambda a, b: (a.buckets, a.top, a.by_value) == (b.buckets, b.top, b.by_value))  # fmt: skip


def stats_case(ctx: Ctx, name: str, params: dict[str, Any]) -> Case:
    req = apb.SessionStatsRequest(**params)
    sq = requests.parse_stats(req, ctx.now)
    who = ctx.principals["auditor"]

    async def via_grpc() -> Any:
        return await ctx.stub.GetSessionStats(req, metadata=ctx.md("auditor"), timeout=600)

    async def rolled() -> store.StatsResult:
        async with ctx.pool.acquire() as c:
            return await store.stats(c, who, sq, 600)

    async def based() -> store.StatsResult:
        async with ctx.pool.acquire() as c:
            return await store.stats(c, who, sq, 600, store.Options(force_base=True))

    rest = {k: str(v) for k, v in params.items()}
    return Case(name, None, via_grpc, ctx.rest("/api/audit/sessions/stats", rest, "auditor"),
                rolled, based,
                same=lambda a, b: (a.total, a.values, a.other) == (b.total, b.values, b.other))  # fmt: skip


def build_cases(ctx: Ctx, today: date) -> list[Case]:
    day = timedelta(days=1)
    month_ago, year_ago = (today - 30 * day).isoformat(), (today - 364 * day).isoformat()
    two_days, end = (today - 2 * day).isoformat(), today.isoformat()
    two_weeks = (today - 14 * day).isoformat()
    window = {"start_date": month_ago, "end_date": end}
    cases = [
        report_case(ctx, "report 30d group_by=connection", 50.0,
                    {**window, "group_by": "connection"}, "auditor", True),
        report_case(ctx, "report 30d group_by=connection_type", 150.0,
                    {**window, "group_by": "connection_type"}, "auditor", True),
        report_case(ctx, "report 30d group_by=user_email", 150.0,
                    {**window, "group_by": "user_email"}, "auditor", True),
        report_case(ctx, "report 30d group_by=id", 150.0,
                    {**window, "group_by": "id"}, "auditor", True),
        report_case(ctx, "report 30d group_by=connection verb=exec", None,
                    {**window, "group_by": "connection", "verb": "exec"}, "auditor", False),
        report_case(ctx, "report 30d group_by=connection (user token)", None,
                    {**window, "group_by": "connection"}, "user", False),
    ]  # fmt: skip
    month = {"start": month_ago, "end": end}
    for name, target, params in (
        ("histogram day/30d", 50.0, {"field": "protocol", "bin_size": "day", **month}),
        ("histogram hour/2d", None, {"field": "protocol", "bin_size": "hour", "start": two_days, "end": end}),
        ("histogram week/1y", 150.0, {"field": "protocol", "bin_size": "week", "start": year_ago, "end": end}),
        ("histogram day/30d size=10 field=user", 150.0, {"field": "user", "bin_size": "day", "size": 10, **month}),
        ("histogram day/30d size=5 field=protocol", None, {"field": "protocol", "bin_size": "day", "size": 5, **month}),
        ("histogram week/1y size=10 field=user", None, {"field": "user", "bin_size": "week", "size": 10, "start": year_ago, "end": end}),
        ("histogram day/30d q=protocol:ssh AND verb:connect", None, {"field": "connection", "bin_size": "day", "q": "protocol:ssh AND verb:connect", **month}),
        ("histogram day/30d q=duration:>=3600", None, {"field": "protocol", "bin_size": "day", "q": "duration:>=3600", **month}),
        ("histogram day/30d q=exit_code:1 OR duration:<60", None, {"field": "protocol", "bin_size": "day", "q": "exit_code:1 OR duration:<60", **month}),
        ("histogram day/30d q=duration:>3600 (off the edges)", None, {"field": "protocol", "bin_size": "day", "q": "duration:>3600", **month}),
        ("histogram day/30d q=role:ssh-1*", None, {"field": "protocol", "bin_size": "day", "q": "role:ssh-1*", **month}),
        ("histogram day/30d q=resource:db-0*", None, {"field": "protocol", "bin_size": "day", "q": "resource:db-0*", **month}),
        ("histogram day/30d q=user_id:sub-7 (pinned key)", None, {"field": "protocol", "bin_size": "day", "q": "user_id:sub-7", **month}),
        ("histogram day/30d q=user AND protocol (base)", None, {"field": "protocol", "bin_size": "day", "q": "user:user-007@org1.example AND protocol:ssh", **month}),
        ("histogram day/30d q=event_size:>1000 (base)", None, {"field": "protocol", "bin_size": "day", "q": "event_size:>1000", **month}),
        ("histogram day/30d q=start:[2 weeks ago TO *] (base)", None, {"field": "protocol", "bin_size": "day", "q": f"start:[{two_weeks} TO *]", **month}),
        ("histogram day/30d q=user_id:sub-1* (base)", None, {"field": "protocol", "bin_size": "day", "q": "user_id:sub-1*", **month}),
        ("histogram day/30d q=correlation_id:* (base)", None, {"field": "protocol", "bin_size": "day", "q": "correlation_id:*", **month}),
        ("histogram day/30d q=protocol:ssh OR role:ssh-1* (base)", None, {"field": "protocol", "bin_size": "day", "q": "protocol:ssh OR role:ssh-1*", **month}),
        ("histogram day/30d time_zone=Europe/Berlin", None, {"field": "protocol", "bin_size": "day", "time_zone": "Europe/Berlin", **month}),
    ):  # fmt: skip
        cases.append(histogram_case(ctx, name, target, params))
    cases.append(stats_case(ctx, "stats 30d protocol by connection",
                            {"field": "protocol", "sub_fields": "connection", "size": 10, **month}))  # fmt: skip
    cases.append(stats_case(ctx, "stats 30d user", {"field": "user", "size": 10, **month}))
    for q in ("duration:>=3600", "user_id:sub-1*", "event_size:>1000"):
        cases.append(stats_case(ctx, f"stats 30d protocol q={q} (base)",
                                {"field": "protocol", "q": q, **month}))  # fmt: skip
    return cases


async def run_cases(cases: list[Case], args: Any) -> None:
    print("\n== latency in ms (p50 p99); sequential requests on a warm cache")
    print(f"  {'case':<52}{'gRPC':>17}{'REST':>17}{'SQL rollups':>17}{'SQL base only':>17}"
          f"{'gateway SQL':>17}  answer  path      target")  # fmt: skip
    answers: dict[str, str] = {}
    for c in cases:
        g, _ = await timed(c.grpc, args.requests)
        r, _ = await timed(c.rest, args.requests)
        s, rolled = await timed(c.rollup, args.requests)
        b, based = await timed(c.base, args.base_requests, warm=1)
        gw = (
            ""
            if c.gateway is None
            else fmt((await timed(c.gateway, max(2, args.base_requests // 2), warm=1))[0])
        )
        verdict = ""
        if c.target_ms is not None:
            p50 = statistics.median(r)
            verdict = f"REST p50 ≤ {c.target_ms:.0f}: {'ok' if p50 <= c.target_ms else 'MISSED'}"
        same = "same" if c.same(rolled, based) else "DIFFERS"
        print(f"  {c.name:<52}{fmt(g)}{fmt(r)}{fmt(s)}{fmt(b)}{gw:>17}  {same:<7} {rolled.source:<9} {verdict}")  # fmt: skip
        sys.stdout.flush()
        answers[c.name] = repr(rolled)
    if args.answers is not None:
        args.answers.write_text(json.dumps(answers, indent=1, sort_keys=True))


async def ingest(url: str, conn: asyncpg.Connection, srv: ServerProcess, args: Any,
                 t_end: datetime) -> None:  # fmt: skip
    """Ingest rate with and without rollup maintenance, through IngestBatch (the servicer's
    write path), alternating on fresh orgs, on top of the loaded table; then a gRPC stream."""
    n = args.ingest_sessions
    per_hour = args.sessions / args.orgs / (args.days * 24)
    rng = random.Random(7)
    sessions = list(data.sessions(rng, 9, n, t_end - timedelta(hours=n / per_hour), per_hour))
    orgs: list[uuid.UUID] = []
    rates: dict[bool, list[float]] = {False: [], True: []}
    writer = await db.connect(url, json_codec=False)
    print(f"\n== ingest, {n:,} sessions per round in start order ({per_hour:.0f}/hour, as live), "
          f"chunks of 5,000, one transaction; {args.ingest_rounds} rounds each, alternating")  # fmt: skip
    try:
        for _ in range(args.ingest_rounds):
            for maintain in (False, True):
                org = await auth.ensure_org(writer, f"bench-ingest-{uuid.uuid4().hex[:8]}")
                orgs.append(org)
                for s in sessions:
                    s.id = str(uuid.uuid4())
                t = time.perf_counter()
                async with writer.transaction():
                    async with IngestBatch(writer, org, 3600, maintain_rollups=maintain) as b:
                        for s in sessions:
                            await b.add(s)
                        result = await b.finish()
                rate = n / (time.perf_counter() - t)
                assert result.written == n, result
                rates[maintain].append(rate)
                print(f"  rollups {'on ' if maintain else 'off'}  {rate:>10,.0f} sessions/s")
                sys.stdout.flush()
        on, off = statistics.median(rates[True]), statistics.median(rates[False])
        print(f"  median: {off:,.0f}/s without rollup maintenance, {on:,.0f}/s with: "
              f"{on / off:.0%} (target ≥ 70%)")  # fmt: skip

        token = await auth.create_token(conn, "bench-stream", "ingest", "ingest@bench.example")
        org = await conn.fetchval("SELECT id FROM orgs WHERE name = 'bench-stream'")
        orgs.append(org)
        for s in sessions:
            s.id = str(uuid.uuid4())
        channel = grpc.aio.insecure_channel(
            srv.target, options=[("grpc.max_send_message_length", 64 << 20)]
        )
        stub = pb_grpc.SessionServiceStub(channel)

        async def gen() -> Any:
            for i in range(0, n, 1000):
                yield pb.IngestSessionsRequest(sessions=sessions[i : i + 1000])

        t = time.perf_counter()
        reply = await stub.StreamIngestSessions(
            gen(), metadata=(("authorization", f"Bearer {token}"),), timeout=3600
        )
        print(f"  gRPC client stream (server, rollups on): {n / (time.perf_counter() - t):,.0f} sessions/s "
              f"(written {reply.written:,})")  # fmt: skip
        await channel.close()
    finally:
        # Leave the data set as loaded: these orgs' sessions and rollup rows go.
        await writer.execute("DELETE FROM sessions WHERE org_id = any($1::uuid[])", orgs)
        for f in rollups.FAMILIES:
            await writer.execute(f"DELETE FROM {f.table} WHERE org_id = any($1::uuid[])", orgs)
        await writer.close()


if __name__ == "__main__":
    asyncio.run(main())
