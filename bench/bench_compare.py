"""Two source trees on one data set, alternating (issue 14: before/after in ONE run). Not a
test: prints figures, asserts nothing.

    .venv/bin/python bench/bench_compare.py --trees /work/main,. --rounds 2 \
        --data-dir .bench-data-throughput

Each tree's server runs from that tree's `src` (PYTHONPATH), behind an Envoy rendered from that
tree's envoy/envoy.yaml, against the same embedded PostgreSQL data set (bench_throughput's; it is
generated when missing). Per round and tree:

  * throughput: `wrk` closed loop (--connections callers, --duration s) on the first page of
    ListSessions (default count) and the histogram day/30d alternating, WORKERS=2; requests/s,
    p50/p99, and the CPU seconds per request of the server processes, Envoy and PostgreSQL
    (the machine is shared: CPU per request varies less with other load than rates do);
  * latency: ListSessions cases as bench_sessions.py measures them (direct SQL through asyncpg,
    gRPC, REST through Envoy, interleaved request by request, WORKERS=1), p50 against the
    target 2 × SQL + 1 ms;
  * latency-ab (`--modes latency-ab`): the same, with every tree's server up at once and the
    requests interleaved across trees too (columns "SQL 0", "gRPC 0", "REST 0" for the first
    tree, "… 1" for the second), so other load on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

CASES: list[tuple[str, dict[str, str]]] = [
    ("first page (count=none)", {"count": "none"}),
    ("filtered page", {"count": "none"}),  # connection + type filled in from the data
    ("offset 5000", {"offset": "5000", "count": "none"}),
    ("first page, default count", {}),
    ("cursor 100k deep", {"count": "none"}),  # page_token filled in
]


def child(tree: Path, data_dir: Path, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in a fresh interpreter whose imports come from `tree`."""
    env = {**os.environ, "PYTHONPATH": f"{tree / 'src'}{os.pathsep}{tree}"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--tree", str(tree),
         "--data-dir", str(data_dir), "--duration", str(args.duration),
         "--connections", str(args.connections), "--requests", str(args.requests),
         "--trees", args.trees],
        env=env, cwd=tree, capture_output=True, text=True, check=True, timeout=900,
    ).stdout  # fmt: skip
    found: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return found


def run_child(mode: str, args: argparse.Namespace) -> None:
    sys.path.insert(0, str(args.tree))
    args.tree_paths = [Path(t).resolve() for t in args.trees.split(",")]
    # Imported here: from the tree under test (PYTHONPATH), not from this file's tree.
    from session_audit.embedded import EmbeddedPostgres

    embedded = EmbeddedPostgres(args.data_dir)
    url = embedded.start()
    try:
        jobs = {"throughput": throughput, "latency": latency, "latency-ab": latency_ab}
        result = asyncio.run(jobs[mode](url, args))
    finally:
        embedded.stop()
    print(json.dumps(result))


async def _token(url: str) -> tuple[str, Any, Any]:
    from session_audit.core import auth, db

    conn = await db.connect(url)
    try:
        token = await auth.create_token(conn, "bench-org-1", "auditor", "auditor@org1.example")
        org_id = await conn.fetchval("SELECT id FROM orgs WHERE name = 'bench-org-1'")
        t_end = await conn.fetchval("SELECT t_end FROM bench_meta")
        return token, org_id, t_end
    finally:
        await conn.close()


def _postgres_pids(data_dir: Path) -> list[int]:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "postgres" in cmd and str(data_dir) in cmd:
            found += [p.pid, *(c.pid for c in p.children(recursive=True))]
    return found


async def throughput(url: str, args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from bench.bench_throughput import cpu_seconds, ensure_wrk, run_wrk, server_pids
    from session_audit import envoy
    from tests.support import ServerProcess

    token, _org, t_end = await _token(url)
    today = t_end.date()
    start, end = (today - timedelta(days=30)).isoformat(), today.isoformat()
    paths = ["/api/sessions",
             f"/api/audit/sessions/histogram?field=protocol&bin-size=day&start={start}&end={end}"]  # fmt: skip
    work = args.data_dir / "compare"
    work.mkdir(exist_ok=True)
    srv = ServerProcess(url, work, env_extra={"WORKERS": "2"})
    srv.start(envoy.free_port())
    http_port = envoy.free_port()
    proxy = srv.start_envoy(http_port, work)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as client:
            for p in paths:  # warm both workers' caches and pools
                for _ in range(40):
                    r = await client.get(p, headers={"authorization": f"Bearer {token}"})
                    assert r.status_code == 200, r.text
        watch = server_pids(srv)
        pg_before = cpu_seconds(_postgres_pids(args.data_dir))
        res = run_wrk(ensure_wrk(), http_port, paths, token, args, watch, proxy.pid)
        # Backends opened during the run count from zero.
        pg_cpu = cpu_seconds(_postgres_pids(args.data_dir)) - pg_before
    finally:
        envoy.stop(proxy)
        srv.stop()
    n = max(res.requests, 1)
    return {
        "req/s": round(res.requests / res.seconds),
        "p50 ms": round(res.p50_ms, 1),
        "p99 ms": round(res.p99_ms, 1),
        "errors": res.errors,
        "server CPU ms/req": round(res.server_cpu * 1000 / n, 3),
        "Envoy CPU ms/req": round(res.envoy_cpu * 1000 / n, 3),
        "PostgreSQL CPU ms/req": round(pg_cpu * 1000 / n, 3),
        "wrk CPU ms/req": round(res.loadgen_cpu * 1000 / n, 3),
        "load average": round(os.getloadavg()[0], 1),
    }


async def latency(url: str, args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from bench.bench_sessions import interleaved
    from session_audit import envoy
    from session_audit.core import auth, db
    from session_audit.sessions import requests as listing
    from session_audit.sessions import store
    from session_audit.v1 import sessions_pb2 as pb
    from session_audit.v1 import sessions_pb2_grpc as pb_grpc
    from tests.support import ServerProcess

    token, org_id, _t_end = await _token(url)
    conn = await db.connect(url)
    try:
        deep = await conn.fetchrow(
            "SELECT start_date, id FROM sessions WHERE org_id = $1"
            " ORDER BY start_date DESC, id DESC OFFSET 100000 LIMIT 1",
            org_id,
        )
        common = await conn.fetchrow(
            "SELECT connection, connection_type FROM sessions WHERE org_id = $1"
            " GROUP BY 1, 2 ORDER BY count(*) DESC LIMIT 1",
            org_id,
        )
    finally:
        await conn.close()
    assert deep is not None and common is not None, "the data set needs 100,000+ sessions"
    cases = [(name, dict(params)) for name, params in CASES]
    cases[1][1].update(connection=common["connection"], type=common["connection_type"])
    cases[4][1]["page_token"] = listing.encode_cursor(
        listing.Filters(), deep["start_date"], deep["id"]
    )
    work = args.data_dir / "compare"
    work.mkdir(exist_ok=True)
    srv = ServerProcess(url, work, env_extra={"WORKERS": "1"})
    srv.start(envoy.free_port())
    http_port = envoy.free_port()
    proxy = srv.start_envoy(http_port, work)
    out: dict[str, Any] = {}
    try:
        who = auth.Principal(0, org_id, "admin", "bench@bench.example")
        pool = await db.create_pool(url, 2, 4)
        http = aiohttp.ClientSession(
            base_url=f"http://127.0.0.1:{http_port}",
            headers={"authorization": f"Bearer {token}"},
        )
        channel = grpc.aio.insecure_channel(srv.target)
        stub = pb_grpc.SessionServiceStub(channel)
        md = (("authorization", f"Bearer {token}"),)
        health = health_pb2_grpc.HealthStub(channel)

        async def check() -> object:
            return await health.Check(health_pb2.HealthCheckRequest())

        # The floor of any call: grpc.aio and the observer, no auth, no SQL.
        await interleaved({"gRPC": check}, 50)
        floor = await interleaved({"gRPC": check}, args.requests)
        out["trivial RPC (health Check)"] = {"gRPC": round(statistics.median(floor["gRPC"]), 2)}
        for name, params in cases:
            req = pb.ListSessionsRequest(
                connection=params.get("connection", ""), type=params.get("type", ""),
                count=params.get("count", ""), page_token=params.get("page_token", ""),
            )  # fmt: skip
            if "offset" in params:
                req.offset = int(params["offset"])
            q = listing.parse_list_request(req)

            async def direct(q: listing.ListQuery = q) -> object:
                async with pool.acquire() as c:
                    return await store.list_sessions(c, who, q, 30)

            async def via_grpc(req: pb.ListSessionsRequest = req) -> object:
                return await stub.ListSessions(req, metadata=md)

            async def via_rest(params: dict[str, str] = params) -> object:
                async with http.get("/api/sessions", params=params) as r:
                    assert r.status == 200, await r.text()
                    return await r.read()

            fns: dict[str, Callable[[], Awaitable[object]]] = {
                "SQL": direct, "gRPC": via_grpc, "REST": via_rest,
            }  # fmt: skip
            await interleaved(fns, 20)
            lat = await interleaved(fns, args.requests)
            out[name] = {k: round(statistics.median(v), 2) for k, v in lat.items()}
        await http.close()
        await channel.close()
        await pool.close()
    finally:
        envoy.stop(proxy)
        srv.stop()
    out["load average"] = round(os.getloadavg()[0], 1)
    return out


async def latency_ab(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every tree's server at once on the one database, requests interleaved across the trees
    (and direct SQL through each tree's store module): machine load hits all alike."""
    import importlib.util

    import aiohttp
    import grpc

    from bench.bench_sessions import interleaved
    from session_audit import envoy
    from session_audit.core import auth, db
    from session_audit.sessions import requests as listing
    from session_audit.v1 import sessions_pb2 as pb
    from session_audit.v1 import sessions_pb2_grpc as pb_grpc
    from tests.support import ServerProcess

    trees: list[Path] = args.tree_paths
    token, org_id, _t_end = await _token(url)
    conn = await db.connect(url)
    try:
        deep = await conn.fetchrow(
            "SELECT start_date, id FROM sessions WHERE org_id = $1"
            " ORDER BY start_date DESC, id DESC OFFSET 100000 LIMIT 1",
            org_id,
        )
        common = await conn.fetchrow(
            "SELECT connection, connection_type FROM sessions WHERE org_id = $1"
            " GROUP BY 1, 2 ORDER BY count(*) DESC LIMIT 1",
            org_id,
        )
    finally:
        await conn.close()
    assert deep is not None and common is not None, "the data set needs 100,000+ sessions"
    cases = [(name, dict(params)) for name, params in CASES]
    cases[1][1].update(connection=common["connection"], type=common["connection_type"])
    cases[4][1]["page_token"] = listing.encode_cursor(
        listing.Filters(), deep["start_date"], deep["id"]
    )
    work = args.data_dir / "compare"
    work.mkdir(exist_ok=True)
    stores: list[Any] = []
    servers: list[tuple[ServerProcess, Any, int]] = []
    out: dict[str, Any] = {"trees": [str(t) for t in trees]}
    try:
        for k, tree in enumerate(trees):
            spec = importlib.util.spec_from_file_location(
                f"store_{k}", tree / "src/session_audit/sessions/store.py"
            )
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[f"store_{k}"] = module  # dataclasses look their module up
            spec.loader.exec_module(module)
            stores.append(module)
            srv = ServerProcess(
                url, work, env_extra={"WORKERS": "1", "PYTHONPATH": f"{tree / 'src'}"}
            )
            srv.start(envoy.free_port())
            http_port = envoy.free_port()
            servers.append((srv, srv.start_envoy(http_port, work), http_port))
        who = auth.Principal(0, org_id, "admin", "bench@bench.example")
        pool = await db.create_pool(url, 2, 4)
        md = (("authorization", f"Bearer {token}"),)
        https = [
            aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}",
                                  headers={"authorization": f"Bearer {token}"})
            for _, _, port in servers
        ]  # fmt: skip
        channels = [grpc.aio.insecure_channel(srv.target) for srv, _, _ in servers]
        stubs = [pb_grpc.SessionServiceStub(ch) for ch in channels]
        for name, params in cases:
            req = pb.ListSessionsRequest(
                connection=params.get("connection", ""), type=params.get("type", ""),
                count=params.get("count", ""), page_token=params.get("page_token", ""),
            )  # fmt: skip
            if "offset" in params:
                req.offset = int(params["offset"])
            q = listing.parse_list_request(req)
            fns: dict[str, Callable[[], Awaitable[object]]] = {}
            for k in range(len(trees)):

                async def direct(q: listing.ListQuery = q, st: Any = stores[k]) -> object:
                    async with pool.acquire() as c:
                        return await st.list_sessions(c, who, q, 30)

                async def via_grpc(req: pb.ListSessionsRequest = req, k: int = k) -> object:
                    return await stubs[k].ListSessions(req, metadata=md)

                async def via_rest(params: dict[str, str] = params, k: int = k) -> object:
                    async with https[k].get("/api/sessions", params=params) as r:
                        assert r.status == 200, await r.text()
                        return await r.read()

                fns |= {f"SQL {k}": direct, f"gRPC {k}": via_grpc, f"REST {k}": via_rest}
            await interleaved(fns, 20)
            lat = await interleaved(fns, args.requests)
            out[name] = {key: round(statistics.median(v), 2) for key, v in lat.items()}
        for h in https:
            await h.close()
        for ch in channels:
            await ch.close()
        await pool.close()
    finally:
        for srv, proxy, _ in servers:
            envoy.stop(proxy)
            srv.stop()
    out["load average"] = round(os.getloadavg()[0], 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trees", default=f"/work/main,{ROOT}", help="comma-separated source trees")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=15.0, help="wrk seconds per line")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--requests", type=int, default=200, help="latency samples per case")
    ap.add_argument("--data-dir", type=Path, default=ROOT / ".bench-data-throughput")
    ap.add_argument("--modes", default="throughput,latency")
    ap.add_argument("--child", default="")
    ap.add_argument("--tree", type=Path)
    args = ap.parse_args()
    args.data_dir = args.data_dir.resolve()
    if args.child:
        run_child(args.child, args)
        return
    sys.path.insert(0, str(ROOT))
    from bench.bench_sessions import machine

    if not (args.data_dir / "PG_VERSION").exists() and not any(args.data_dir.glob("*/PG_VERSION")):
        subprocess.run([sys.executable, str(ROOT / "bench" / "bench_throughput.py"),
                        "--duration", "1", "--workers", "1", "--data-dir", str(args.data_dir)],
                       check=True)  # fmt: skip
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    print(f"machine  {machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for mode in args.modes.split(","):
        if mode == "latency-ab":  # all trees at once, in this tree's harness
            for rnd in range(args.rounds):
                res = child(ROOT, args.data_dir, mode, args)
                print(f"{mode} round {rnd + 1}: {json.dumps(res)}", flush=True)
            continue
        for rnd in range(args.rounds):
            for tree in trees:
                res = child(tree, args.data_dir, mode, args)
                print(f"{mode} round {rnd + 1} {tree}: {json.dumps(res)}", flush=True)


if __name__ == "__main__":
    main()
