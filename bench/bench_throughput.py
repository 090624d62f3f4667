"""Throughput benchmark (issue 14). Not a test: prints figures, asserts nothing.

    make bench-throughput
    .venv/bin/python bench/bench_throughput.py --duration 30 --connections 32

A closed loop of cheap calls — the first page of ListSessions and a histogram day/30 days,
alternating — by `--connections` concurrent callers for `--duration` seconds, against the real
server with WORKERS=2 and WORKERS=1:

  * REST through Envoy, driven by `wrk` (Debian package; installed with apt-get when missing);
  * gRPC direct, driven by a small multi-process Python client (grpc.aio, callers spread over
    two processes): no maintained gRPC load tool (ghz) is installable with pip or apt here.

Each line gives requests/s, p50/p99 latency, errors, and the CPU share (of all cores, over the
run) of the load generator, the server processes and Envoy: they share the machine's cores.
The data set (one org, `--sessions` over a year, generated in SQL) lives in
.bench-data-throughput/ and is reused.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_analytics import load
from bench.bench_sessions import machine, pct
from session_audit import envoy
from session_audit.core import auth, db, migrate
from session_audit.embedded import EmbeddedPostgres
from session_audit.v1 import analytics_pb2 as apb
from session_audit.v1 import analytics_pb2_grpc as apb_grpc
from session_audit.v1 import sessions_pb2 as pb
from session_audit.v1 import sessions_pb2_grpc as pb_grpc
from tests.support import ServerProcess

DATA_DIR = ROOT / ".bench-data-throughput"
CLIENT_PROCESSES = 2


@dataclass
class Result:
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    loadgen_cpu: float  # CPU seconds of the load generator
    server_cpu: float  # CPU seconds of the server processes
    envoy_cpu: float

    def line(self, name: str) -> str:
        cores = os.cpu_count() or 1
        share = 100 / (self.seconds * cores)
        return (
            f"  {name:<34}{self.requests / self.seconds:>9,.0f} req/s  p50 {self.p50_ms:6.1f} ms"
            f"  p99 {self.p99_ms:6.1f} ms  errors {self.errors:<4} CPU: load generator "
            f"{self.loadgen_cpu * share:3.0f}%, server {self.server_cpu * share:3.0f}%, "
            f"envoy {self.envoy_cpu * share:3.0f}%"
        )


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("installing wrk (apt-get)…", file=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is not installed and apt-get could not install it")
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def server_pids(srv: ServerProcess) -> list[int]:
    assert srv.proc is not None
    return [srv.proc.pid, *srv.children()]


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    assert m, text
    return float(m.group(1)) * _UNITS[m.group(2)]


LUA = """
local paths = {%s}
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i %% #paths) + 1], {["authorization"] = "Bearer %s"})
end
"""


def run_wrk(wrk: str, port: int, paths: list[str], token: str, args: Any, watch: list[int],
            envoy_pid: int) -> Result:  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(LUA % (", ".join(f'"{p}"' for p in paths), token))
        script = f.name
    before = (children_cpu(), cpu_seconds(watch), cpu_seconds([envoy_pid]))
    t = time.perf_counter()
    out = subprocess.run(
        [wrk, "-t2", f"-c{args.connections}", f"-d{int(args.duration)}s", "--latency", "-s", script,
         f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, check=True, timeout=args.duration + 60,
    ).stdout  # fmt: skip
    seconds = time.perf_counter() - t
    os.unlink(script)
    after = (children_cpu(), cpu_seconds(watch), cpu_seconds([envoy_pid]))
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    errors = int(bad.group(1)) if bad else 0
    if socket_errors:
        errors += sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1)))
    p50 = _ms(re.search(r"50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    duration = float(re.search(r"requests in ([\d.]+)s", out).group(1))  # type: ignore[union-attr]
    del seconds
    return Result(total, errors, duration, p50, p99, after[0] - before[0], after[1] - before[1],
                  after[2] - before[2])  # fmt: skip


def _grpc_client(target: str, token: str, callers: int, duration: float, start: str, end: str,
                 out: Any) -> None:  # fmt: skip
    async def go() -> tuple[int, int, list[float]]:
        md = (("authorization", f"Bearer {token}"),)
        lat: list[float] = []
        errors = 0
        async with grpc.aio.insecure_channel(target) as ch:
            sessions = pb_grpc.SessionServiceStub(ch)
            analytics = apb_grpc.AnalyticsServiceStub(ch)
            hist = apb.HistogramRequest(field="protocol", bin_size="day", start=start, end=end)
            deadline = time.perf_counter() + duration

            async def caller(k: int) -> None:
                nonlocal errors
                i = k
                while time.perf_counter() < deadline:
                    t = time.perf_counter()
                    try:
                        if i % 2:
                            await analytics.GetSessionHistogram(hist, metadata=md, timeout=10)
                        else:
                            await sessions.ListSessions(
                                pb.ListSessionsRequest(), metadata=md, timeout=10
                            )
                        lat.append((time.perf_counter() - t) * 1000)
                    except grpc.RpcError:
                        errors += 1
                    i += 1

            await asyncio.gather(*(caller(k) for k in range(callers)))
        return len(lat), errors, lat

    out.put(asyncio.run(go()))


def run_grpc(target: str, token: str, args: Any, start: str, end: str, watch: list[int],
             envoy_pid: int) -> Result:  # fmt: skip
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    per = [args.connections // CLIENT_PROCESSES + (1 if i < args.connections % CLIENT_PROCESSES
                                                   else 0) for i in range(CLIENT_PROCESSES)]  # fmt: skip
    before = (children_cpu(), cpu_seconds(watch), cpu_seconds([envoy_pid]))
    t = time.perf_counter()
    procs = [ctx.Process(target=_grpc_client,
                         args=(target, token, n, args.duration, start, end, q)) for n in per]  # fmt: skip
    for p in procs:
        p.start()
    parts = [q.get(timeout=args.duration + 120) for _ in procs]
    for p in procs:
        p.join()
    seconds = time.perf_counter() - t
    after = (children_cpu(), cpu_seconds(watch), cpu_seconds([envoy_pid]))
    lat = [x for _, _, ls in parts for x in ls]
    # Process start-up (imports) is excluded from the rate: the callers ran `duration` seconds.
    del seconds
    return Result(sum(n for n, _, _ in parts), sum(e for _, e, _ in parts), args.duration,
                  statistics.median(lat) if lat else 0.0, pct(lat, 0.99) if lat else 0.0,
                  after[0] - before[0], after[1] - before[1], after[2] - before[2])  # fmt: skip


async def prepare(url: str, args: Any) -> tuple[datetime, str]:
    conn = await db.connect(url)
    try:
        await migrate.migrate(conn)
        # Any data set of bench_analytics (--data-dir) is reused as it is.
        meta = None
        if await conn.fetchval("SELECT to_regclass('bench_meta') IS NOT NULL"):
            meta = await conn.fetchrow("SELECT sessions, orgs, t_end FROM bench_meta")
        if meta is not None:
            t_end: datetime = meta["t_end"]
            args.sessions = meta["sessions"] // meta["orgs"]
        else:
            t_end = await load(conn, args.sessions, 1, 365)
        token = await auth.create_token(conn, "bench-org-1", "auditor", "auditor@org1.example")
        return t_end, token
    finally:
        await conn.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per measurement")
    ap.add_argument("--connections", type=int, default=32, help="concurrent callers")
    ap.add_argument("--sessions", type=int, default=200_000)
    ap.add_argument("--workers", default="2,1", help="WORKERS values to measure")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    args = ap.parse_args()
    wrk = ensure_wrk()
    print(f"machine  {machine()}")
    embedded = EmbeddedPostgres(args.data_dir)
    url = embedded.start()
    try:
        t_end, token = asyncio.run(prepare(url, args))
        today = t_end.date()
        start, end = (today - timedelta(days=30)).isoformat(), today.isoformat()
        paths = ["/api/sessions",
                 f"/api/audit/sessions/histogram?field=protocol&bin-size=day&start={start}&end={end}"]  # fmt: skip
        print(f"data     {args.sessions:,} sessions in the org over a year; calls: {paths[0]} "
              f"(first page) and {paths[1]}, alternating")  # fmt: skip
        print(f"load     closed loop, {args.connections} concurrent callers, "
              f"{args.duration:.0f} s per line; CPU shares are of all {os.cpu_count()} cores")  # fmt: skip
        for workers in (int(w) for w in args.workers.split(",")):
            srv = ServerProcess(url, args.data_dir, env_extra={"WORKERS": str(workers)})
            srv.start(envoy.free_port())
            http_port = envoy.free_port()
            proxy = srv.start_envoy(http_port, args.data_dir)
            try:
                for p in paths:  # warm every worker's caches and pools a little
                    for _ in range(20 * workers):
                        r = httpx.get(f"http://127.0.0.1:{http_port}{p}",
                                      headers={"authorization": f"Bearer {token}"}, timeout=30)  # fmt: skip
                        assert r.status_code == 200, r.text
                watch = server_pids(srv)
                rest = run_wrk(wrk, http_port, paths, token, args, watch, proxy.pid)
                print(rest.line(f"REST via Envoy, WORKERS={workers} (wrk)"))
                sys.stdout.flush()
                direct = run_grpc(srv.target, token, args, start, end, watch, proxy.pid)
                print(direct.line(f"gRPC direct, WORKERS={workers} (py)"))
                sys.stdout.flush()
            finally:
                envoy.stop(proxy)
                srv.stop()
    finally:
        embedded.stop()


if __name__ == "__main__":
    main()
