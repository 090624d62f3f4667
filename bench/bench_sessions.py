"""Ingest and ListSessions benchmark (issue 2). Not a test: prints figures, asserts nothing.

    make bench                                    # 1,000,000 sessions
    .venv/bin/python bench/bench_sessions.py --sessions 200000

One run, one machine: a fresh embedded PostgreSQL in .bench-data/ (or DATABASE_URL's server),
the real server process and Envoy. It prints
  * ingest rows/s: gRPC client stream and REST batches, next to asyncpg binary COPY of the same
    rows into an identical table (same indexes), both starting empty. COPY and the stream
    alternate segment by segment (each segment its own stream), so both see the same noise
    and the same table sizes;
  * ListSessions p50/p99 and requests/s over gRPC and REST for the first page, a filtered page,
    offset 5,000, the default (capped) count and a deep keyset cursor, next to the same SQL run
    directly through asyncpg. Latencies are taken round-robin (SQL, gRPC, REST, SQL, …) so a
    burst of load from elsewhere hits the three alike; REST goes through aiohttp (httpx's own
    client cost is ~0.9 ms a request here, which is not the service's) and is timed to the
    last byte of the body (not including the client's JSON parse).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import asyncpg
import grpc
from google.protobuf import json_format
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from session_audit import envoy
from session_audit.core import auth, db, migrate
from session_audit.core.schema import INGEST_COLUMNS
from session_audit.embedded import EmbeddedPostgres
from session_audit.seed import demo_sessions
from session_audit.sessions import requests as listing
from session_audit.sessions import store
from session_audit.sessions.rows import item_from_proto
from session_audit.v1 import sessions_pb2 as pb
from session_audit.v1 import sessions_pb2_grpc as pb_grpc
from tests.support import ServerProcess

CHUNK = 1000


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.node()}: {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Python {platform.python_version()}"


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


async def timed(fn: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


async def interleaved(
    fns: dict[str, Callable[[], Awaitable[object]]], n: int
) -> dict[str, list[float]]:
    """`n` latencies (ms) per function, taking them in turn."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            t = time.perf_counter()
            await fn()
            out[name].append((time.perf_counter() - t) * 1000)
    return out


async def throughput(fn: Callable[[], Awaitable[object]], seconds: float, workers: int) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await fn()
            done += 1

    t = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(workers)))
    return done / (time.perf_counter() - t)


def chunks(sessions: list[pb.Session]) -> Iterator[pb.IngestSessionsRequest]:
    for i in range(0, len(sessions), CHUNK):
        yield pb.IngestSessionsRequest(sessions=sessions[i : i + CHUNK])


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=1_000_000)
    ap.add_argument("--rest-sessions", type=int, default=100_000)
    ap.add_argument("--segments", type=int, default=10, help="COPY/stream alternations")
    ap.add_argument("--requests", type=int, default=300, help="per case and surface")
    ap.add_argument("--seconds", type=float, default=3.0, help="throughput window per case")
    ap.add_argument("--workers", type=int, default=1, help="server processes")
    ap.add_argument("--keep", action="store_true", help="keep .bench-data afterwards")
    args = ap.parse_args()
    n = args.sessions
    data_dir = ROOT / ".bench-data"

    print(f"machine  {machine()}")
    print(f"data     {n:,} sessions (gRPC stream) + {args.rest_sessions:,} (REST), one year, 1 org")
    url = os.environ.get("DATABASE_URL", "")
    embedded = None
    if not url:
        shutil.rmtree(data_dir, ignore_errors=True)
        embedded = EmbeddedPostgres(data_dir)
        url = embedded.start()
    try:
        await bench(args, url, data_dir)
    finally:  # whatever failed, the embedded server started here is stopped
        if embedded is not None:
            embedded.stop()
            if not args.keep:
                shutil.rmtree(data_dir, ignore_errors=True)


async def bench(args: argparse.Namespace, url: str, data_dir: Path) -> None:
    n = args.sessions
    conn = await db.connect(url)
    await migrate.migrate(conn)
    org = f"bench-{uuid.uuid4().hex[:6]}"
    token = await auth.create_token(conn, org, "admin", "bench@bench.example")
    org_id = await conn.fetchval("SELECT id FROM orgs WHERE name = $1", org)

    rng = random.Random(42)
    now = datetime.now(UTC)
    total = n + args.rest_sessions
    sessions = list(tqdm(demo_sessions(rng, org, total, now, 365), total=total, desc="generate"))
    grpc_part, rest_part = sessions[:n], sessions[n:]

    # The raw baseline: binary COPY of the same rows into an identical, empty table.
    await conn.execute("DROP TABLE IF EXISTS copy_baseline")
    await conn.execute("CREATE TABLE copy_baseline (LIKE sessions INCLUDING ALL)")
    raw = await asyncpg.connect(url)  # default codecs: jsonb accepts text

    srv = ServerProcess(url, data_dir, env_extra={"WORKERS": str(args.workers)})
    srv.start(envoy.free_port() if args.workers > 1 else None)
    http_port = envoy.free_port()
    proxy = srv.start_envoy(http_port, data_dir)
    md = (("authorization", f"Bearer {token}"),)
    try:
        channel = grpc.aio.insecure_channel(
            srv.target, options=[("grpc.max_send_message_length", 64 << 20)]
        )
        stub = pb_grpc.SessionServiceStub(channel)

        async def stream(part: list[pb.Session]) -> pb.IngestSessionsResponse:
            async def gen() -> object:
                for c in chunks(part):
                    yield c

            reply: pb.IngestSessionsResponse = await stub.StreamIngestSessions(
                gen(), metadata=md, timeout=3600
            )
            return reply

        copy_s = grpc_s = 0.0
        step = -(-n // args.segments)
        with tqdm(total=n, desc="ingest (COPY, stream)") as bar:
            for lo in range(0, n, step):
                part = grpc_part[lo : lo + step]
                records = [item_from_proto(s, org_id, now).record() for s in part]
                t = time.perf_counter()
                await raw.copy_records_to_table("copy_baseline", records=records,
                                                columns=INGEST_COLUMNS)  # fmt: skip
                copy_s += time.perf_counter() - t
                del records
                t = time.perf_counter()
                reply = await stream(part)
                grpc_s += time.perf_counter() - t
                assert reply.written == len(part), reply
                bar.update(len(part))
        copy_rate, grpc_rate = n / copy_s, n / grpc_s
        await raw.execute("DROP TABLE copy_baseline")
        await raw.close()

        bodies = [
            json.dumps(
                {"sessions": [json_format.MessageToDict(s, preserving_proto_field_name=True)
                              for s in rest_part[i : i + CHUNK]]}
            ).encode()
            for i in range(0, len(rest_part), CHUNK)
        ]  # fmt: skip
        http = aiohttp.ClientSession(
            base_url=f"http://127.0.0.1:{http_port}",
            headers={"authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=600),
        )
        t = time.perf_counter()
        for body in bodies:
            async with http.post(
                "/api/sessions/ingest", data=body, headers={"content-type": "application/json"}
            ) as r:
                assert r.status == 200, await r.text()
        rest_rate = len(rest_part) / (time.perf_counter() - t)
        await conn.execute("VACUUM ANALYZE sessions")

        print(f"\n== ingest (rows/s, both tables starting empty, all indexes, {args.segments} "
              "alternating segments)")  # fmt: skip
        print(f"  asyncpg binary COPY (raw)    {copy_rate:>10,.0f}")
        print(
            f"  gRPC client stream           {grpc_rate:>10,.0f}   {grpc_rate / copy_rate:6.0%} of COPY"
            f"   target ≥ 50% {'ok' if grpc_rate >= copy_rate / 2 else 'MISSED'}"
        )
        print(
            f"  REST batches of {CHUNK}         {rest_rate:>10,.0f}   {rest_rate / copy_rate:6.0%} of COPY"
        )

        who = auth.Principal(0, org_id, "admin", "bench@bench.example")
        deep = await conn.fetchrow(
            "SELECT start_date, id FROM sessions WHERE org_id = $1"
            " ORDER BY start_date DESC, id DESC OFFSET 100000 LIMIT 1",
            org_id,
        )
        assert deep is not None, "fewer than 100,000 sessions: use --sessions 110000 or more"
        base_filters = listing.Filters()
        deep_token = listing.encode_cursor(base_filters, deep["start_date"], deep["id"])
        cases: list[tuple[str, dict[str, str]]] = [
            ("first page (count=none)", {"count": "none"}),
            ("filtered page (connection+type)", {"connection": "pg-prod", "type": "database",
                                                 "count": "none"}),
            ("offset 5000 (count=none)", {"offset": "5000", "count": "none"}),
            ("first page, default count", {}),
            ("cursor at depth 100k", {"page_token": deep_token, "count": "none"}),
        ]  # fmt: skip
        pool = await db.create_pool(url, 2, 4)
        print(f"\n== ListSessions, limit 20, {n + len(rest_part):,} sessions in the org")
        print(f"  {'case':<34}{'surface':<8}{'p50 ms':>8}{'p99 ms':>8}{'req/s':>9}   target")
        for name, params in cases:
            req = pb.ListSessionsRequest(
                connection=params.get("connection", ""),
                type=params.get("type", ""),
                count=params.get("count", ""),
                page_token=params.get("page_token", ""),
            )
            if "offset" in params:
                req.offset = int(params["offset"])
            q = listing.parse_list_request(req)

            async def direct(q: listing.ListQuery = q) -> object:
                async with pool.acquire() as c:
                    return await store.list_sessions(c, who, q, 30)

            async def via_grpc(req: pb.ListSessionsRequest = req) -> object:
                return await stub.ListSessions(req, metadata=md)

            async def via_rest(params: dict[str, str] = params) -> object:
                # Time to the last byte, as HTTP load tools measure it (the client's JSON
                # parse is not the service's time).
                async with http.get("/api/sessions", params=params) as r:
                    assert r.status == 200, await r.text()
                    return await r.read()

            fns: dict[str, Callable[[], Awaitable[object]]] = {
                "SQL": direct,
                "gRPC": via_grpc,
                "REST": via_rest,
            }
            await interleaved(fns, 20)  # warm
            lat = await interleaved(fns, args.requests)
            sql_p50 = statistics.median(lat["SQL"])
            for surface, fn in fns.items():
                rps = await throughput(fn, args.seconds, 4)
                p50, p99 = statistics.median(lat[surface]), pct(lat[surface], 0.99)
                verdict = ""
                if surface != "SQL":
                    limit = 2 * sql_p50 + 1
                    verdict = f"≤ {limit:.2f} ms {'ok' if p50 <= limit else 'MISSED'}"
                print(f"  {name:<34}{surface:<8}{p50:>8.2f}{p99:>8.2f}{rps:>9,.0f}   {verdict}")
        await pool.close()
        await http.close()
        await channel.close()
    finally:
        envoy.stop(proxy)
        srv.stop()
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
