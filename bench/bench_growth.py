"""Cost as the data grows (issue 14, goal 5), measured in ONE run. Not a test: prints figures,
asserts nothing.

    .venv/bin/python bench/bench_growth.py \
        --data-dirs /work/bench-data/single-1m,/work/bench-data/single-3m,/work/bench-data/single-10m

Each directory holds a data set that bench_analytics.py loaded (its `bench_meta` row says how
many sessions). All of them are started at once — one embedded PostgreSQL, one server and one
Envoy each — and every case is measured request by request across the sizes in turn (1M, 3M,
10M, 1M, …), so whatever else the machine does hits every size alike; run one after the other,
the same cases differed by 2× from run to run on this 2-core VM. For the cases the rollups
answer (bench_analytics's cases; `--skip` the others), prints the p50 per size of the SQL layer
(the rollup path), gRPC and REST, and the ratio of the largest data set to the smallest (the
goal: ≤ 1.3), checking that each answer is the same from the three surfaces.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import grpc
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_analytics import Case, Ctx, build_cases
from bench.bench_sessions import machine
from session_audit import envoy
from session_audit.analytics.fields import BASE
from session_audit.core import auth, db, migrate
from session_audit.embedded import EmbeddedPostgres
from session_audit.v1 import analytics_pb2_grpc as apb_grpc
from tests.support import ServerProcess

SURFACES = ("SQL", "gRPC", "REST")


async def start(stack: AsyncExitStack, data_dir: Path) -> tuple[int, list[Case]]:
    """One data set's database, server and Envoy (closed by `stack`); its size and cases."""
    embedded = EmbeddedPostgres(data_dir)
    url = embedded.start()
    stack.callback(embedded.stop)
    conn = await db.connect(url)
    stack.push_async_callback(conn.close)
    await migrate.migrate(conn)
    meta = await conn.fetchrow("SELECT sessions, t_end FROM bench_meta")
    if meta is None:
        raise SystemExit(f"{data_dir}: no bench_analytics data set here")
    org_id = await conn.fetchval("SELECT id FROM orgs WHERE name = 'bench-org-1'")
    tokens = {
        "auditor": await auth.create_token(conn, "bench-org-1", "auditor", "auditor@org1.example"),
        "user": await auth.create_token(conn, "bench-org-1", "user", "user-007@org1.example"),
    }
    srv = ServerProcess(url, data_dir).start()
    stack.callback(srv.stop)
    port = envoy.free_port()
    proxy = srv.start_envoy(port, data_dir)
    stack.callback(envoy.stop, proxy)
    pool = await db.create_pool(url, 2, 4)
    stack.push_async_callback(pool.close)
    channel = grpc.aio.insecure_channel(srv.target)
    stack.push_async_callback(channel.close)
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600)
    stack.push_async_callback(http.aclose)
    ctx = Ctx(
        stub=apb_grpc.AnalyticsServiceStub(channel), http=http, pool=pool, conn=conn,
        tokens=tokens,
        principals={
            "auditor": auth.Principal(0, org_id, "auditor", "auditor@org1.example"),
            "user": auth.Principal(0, org_id, "user", "user-007@org1.example"),
        },
        org_id=org_id, now=meta["t_end"],
    )  # fmt: skip
    return int(meta["sessions"]), build_cases(ctx, meta["t_end"].date())


async def ms(fn: Callable[[], Awaitable[Any]]) -> float:
    t = time.perf_counter()
    await fn()
    return (time.perf_counter() - t) * 1000


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dirs", required=True, help="comma-separated, smallest first")
    ap.add_argument("--requests", type=int, default=30, help="per case, surface and size")
    ap.add_argument("--skip", action="append", default=[], metavar="TEXT",
                    help="skip the cases whose name contains TEXT (repeatable)")  # fmt: skip
    args = ap.parse_args()
    dirs = [Path(d) for d in args.data_dirs.split(",")]
    print(f"machine  {machine()}")
    async with AsyncExitStack() as stack:
        sets = [await start(stack, d) for d in dirs]
        sizes = [n for n, _ in sets]
        print(f"data     {', '.join(f'{n:,}' for n in sizes)} sessions (measured org: a quarter)")
        print("\n== p50 ms per size, requests interleaved across sizes; ratio = largest / smallest")
        head = "".join(f"{s + ' ' + _short(n):>12}" for s in SURFACES for n in sizes)
        print(f"  {'case':<50}{head}  {'ratio SQL':>9} {'gRPC':>5} {'REST':>5}  path")
        names = [c.name for c in sets[0][1] if not any(t in c.name for t in args.skip)]
        for name in names:
            cases = [next(c for c in cs if c.name == name) for _, cs in sets]
            rolled = [await c.rollup() for c in cases]
            if any(r.source == BASE for r in rolled):
                print(f"  {name:<50}  (base table: not a rollup case)")
                continue
            for c in cases:  # warm every surface
                for fn in (c.rollup, c.grpc, c.rest):
                    await fn()
            samples: dict[tuple[str, int], list[float]] = {}
            for _ in range(args.requests):
                for k, c in enumerate(cases):
                    for surface, fn in zip(SURFACES, (c.rollup, c.grpc, c.rest), strict=True):
                        samples.setdefault((surface, k), []).append(await ms(fn))
            p50 = {key: statistics.median(v) for key, v in samples.items()}
            cells = "".join(f"{p50[(s, k)]:12.1f}" for s in SURFACES for k in range(len(sizes)))
            ratios = " ".join(f"{p50[(s, len(sizes) - 1)] / p50[(s, 0)]:5.2f}" for s in SURFACES)
            print(f"  {name:<50}{cells}  {ratios:>21}  {rolled[0].source}")
            sys.stdout.flush()


def _short(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k"


if __name__ == "__main__":
    asyncio.run(main())
