"""Event-loop responsiveness (issue 11: no request holds the loop for more than ~20 ms).
Not a test: prints figures, asserts nothing.

    make bench-loop
    .venv/bin/python bench/bench_loop.py --rounds 5

A fresh embedded PostgreSQL in .bench-data-loop/, the real server (one process, with
LOOP_STALL_MS set, so it logs every stall of its event loop with what held it: loopwatch.py)
and Envoy. A probe calls the gRPC health Check back to back (5 ms apart) the whole time:
  * quiet, for --quiet seconds;
  * then --rounds times: ten 1,000-session IngestSessions batches at once (half REST through
    Envoy, half gRPC), a report generation and a PDF download of a --report-sessions report.
It prints the probe's p50/p99/max quiet and busy, the server's stalls above --stall-ms (count,
longest, the loop thread's CPU over the longest, and the code most often found holding the
loop), and the load average before and after, so a figure from a loaded machine says so.
Bounded: a few thousand sessions, about a minute; stops only the processes it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_sessions import machine, pct
from session_audit import envoy
from session_audit.core import json_body
from session_audit.embedded import EmbeddedPostgres
from session_audit.v1 import sessions_pb2 as pb
from session_audit.v1 import sessions_pb2_grpc as pb_grpc
from tests.factories import Spec
from tests.support import ServerProcess, Stack, _migrate, run

DAY = datetime(2026, 3, 1, tzinfo=UTC)


def batch(n: int, offset: int) -> list[pb.Session]:
    """`n` closed sessions with a script, redactions and labels (about 0.5 KB of JSON each)."""
    out = []
    for i in range(n):
        start = DAY + timedelta(seconds=offset + i)
        s = Spec(start=start, end=start + timedelta(seconds=30), connection=f"c{i % 7}",
                 script=f"SELECT {i} FROM t WHERE x = 'abc{i}'",
                 redactions=(("EMAIL_ADDRESS", i % 3, 7),)).to_proto()  # fmt: skip
        s.labels.update({"team": "core", "n": str(i % 5)})
        out.append(s)
    return out


def ms(values: list[float]) -> str:
    if not values:
        return "n=0"
    return (f"n={len(values)}, p50 {1000 * statistics.median(values):.1f} ms, "
            f"p99 {1000 * pct(values, 0.99):.1f} ms, max {1000 * max(values):.1f} ms")  # fmt: skip


def stalls(log: Path, windows: list[tuple[float, float]], key: str) -> list[dict[str, Any]]:
    """The server's loopwatch lines carrying `key` (stall_ms or step_ms) that fall in one of
    `windows` (wall-clock seconds)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if '"session_audit.loop"' not in line:
            continue
        rec = json.loads(line)
        if key not in rec:
            continue
        at = datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()
        if any(a <= at <= b for a, b in windows):
            out.append(rec)
    return out


def show_stalls(label: str, recs: list[dict[str, Any]], threshold: float) -> None:
    if not recs:
        print(f"  {label}: no stall above {threshold:g} ms")
        return
    worst = max(recs, key=lambda r: r["stall_ms"])
    print(f"  {label}: {len(recs)} stalls above {threshold:g} ms, longest {worst['stall_ms']:.0f} ms "
          f"(loop thread on CPU {worst['loop_cpu_ms']:.0f} ms of it, the process "
          f"{worst['process_cpu_ms']:.0f} ms)")  # fmt: skip
    # What would stall a quiet machine: the loop thread's own CPU time within a stall.
    held = [r for r in recs if r["loop_cpu_ms"] > threshold]
    top = max(recs, key=lambda r: r["loop_cpu_ms"])
    print(f"  {label}: {len(held)} stalls with the loop thread on CPU above {threshold:g} ms; "
          f"most loop CPU in one stall {top['loop_cpu_ms']:.0f} ms (stall {top['stall_ms']:.0f} ms), "
          f"held by: {top['held_by']}")  # fmt: skip
    spots: Counter[str] = Counter()
    for r in held or recs:
        for part in r["held_by"].split("; "):
            count, _, spot = part.partition("× ")
            spots[spot] += int(count) if count.isdigit() else 1
    print(
        f"    where the loop thread was, sampled every 5 ms in {'those' if held else 'all'} stalls:"
    )
    for spot, n in spots.most_common(8):
        print(f"    {n:>4}  {spot}")


def show_steps(label: str, recs: list[dict[str, Any]], threshold: float) -> None:
    """Single loop callbacks (a task's step) longer than the threshold."""
    if not recs:
        print(f"  {label}: no single step above {threshold:g} ms")
        return
    worst = max(recs, key=lambda r: r["step_ms"])
    cpu = max(recs, key=lambda r: r["step_cpu_ms"])
    over = [r for r in recs if r["step_cpu_ms"] > threshold]
    print(f"  {label}: {len(recs)} single steps above {threshold:g} ms, longest {worst['step_ms']:.0f} ms "
          f"(CPU {worst['step_cpu_ms']:.0f} ms): {worst['step']}")  # fmt: skip
    print(f"  {label}: {len(over)} steps with more than {threshold:g} ms of CPU; most CPU in one step "
          f"{cpu['step_cpu_ms']:.0f} ms (wall {cpu['step_ms']:.0f} ms): {cpu['step']}; held by {cpu['held_by']}")  # fmt: skip
    kinds = Counter(r["step"].split(", then")[0] for r in over or recs)
    print(
        f"    {'those' if over else 'all'} steps by task: "
        + "; ".join(f"{n}× {k}" for k, n in kinds.most_common(6))
    )


async def _max_lag_during(work: Any, tick: float = 0.001) -> tuple[float, float]:
    """(longest lag of a 1 ms ticker on this loop, seconds) while `work` runs."""
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(tick)
            lags.append(time.perf_counter() - t0 - tick)

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    await work()
    took = time.perf_counter() - t0
    done.set()
    await task
    return max(lags), took


def body_reading(batch_size: int) -> None:
    """The REST ingest body's reading, on the loop (as before) and in a worker thread (as the
    server does now for bodies over OFF_LOOP_BYTES): how long a 1 ms ticker on the same loop
    is held up, in this process."""
    items = batch(batch_size, 0)
    body = json.dumps({"sessions": [json_format.MessageToDict(s, preserving_proto_field_name=True)
                                    for s in items]}).encode()  # fmt: skip

    async def on_loop() -> None:
        json_body.parse_strict(body, pb.IngestSessionsRequest)

    async def off_loop() -> None:
        await json_body.parse_strict_off_loop(body, pb.IngestSessionsRequest)

    async def both() -> None:
        for name, fn in (("on the loop", on_loop), ("in a thread", off_loop)) * 2:
            lag, took = await _max_lag_during(fn)
            print(f"  {len(body) / 1e6:.2f} MB body ({batch_size:,} sessions) read {name}: "
                  f"{1000 * took:.0f} ms, loop held up to {1000 * lag:.1f} ms")  # fmt: skip

    asyncio.run(both())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--report-sessions", type=int, default=5000)
    ap.add_argument("--quiet", type=float, default=3.0)
    ap.add_argument("--stall-ms", type=int, default=20)
    ap.add_argument("--data", default=str(ROOT / ".bench-data-loop"))
    args = ap.parse_args()

    print(machine())
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("REST ingest body reading (this process, twice each):")
    body_reading(args.batch_size)
    data = Path(args.data)
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    pg = EmbeddedPostgres(data / "pg")
    dsn = pg.start()
    server = proxy = None
    try:
        run(_migrate(dsn))
        server = ServerProcess(dsn, data, {"LOOP_STALL_MS": str(args.stall_ms),
                                           "LOG_FORMAT": "json"}).start()  # fmt: skip
        http_port = envoy.free_port()
        proxy = envoy.start(http_port, server.port, data)
        stack = Stack(dsn, server, http_port, proxy)
        token = stack.token(stack.new_org("loop"), "admin")
        auth = {"authorization": f"Bearer {token}"}
        md = [("authorization", f"Bearer {token}")]
        base = f"http://127.0.0.1:{http_port}"
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.SessionServiceStub(ch)
            for i in range(0, args.report_sessions, 1000):
                stub.IngestSessions(pb.IngestSessionsRequest(
                    sessions=batch(min(1000, args.report_sessions - i), i)), metadata=md,
                    timeout=60)  # fmt: skip
        rid = httpx.post(f"{base}/api/v2/report", json={}, headers=auth, timeout=30).json()[
            "report"
        ]["id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            report = httpx.get(f"{base}/api/v2/report/{rid}", headers=auth, timeout=30).json()[
                "report"
            ]
            if report["status"] != "pending":
                break
            time.sleep(0.1)
        pdf = httpx.get(f"{base}/api/v2/report/{rid}/pdf", headers=auth, timeout=120)
        print(f"report {rid}: {report['status']}, PDF {len(pdf.content) / 1e6:.1f} MB")

        probes: list[tuple[float, float]] = []  # (wall time, seconds)
        stop = threading.Event()

        def probe() -> None:
            with grpc.insecure_channel(server.target) as ch:
                hs = health_pb2_grpc.HealthStub(ch)
                hs.Check(health_pb2.HealthCheckRequest(), timeout=10)
                while not stop.is_set():
                    t0 = time.perf_counter()
                    hs.Check(health_pb2.HealthCheckRequest(), timeout=10)
                    probes.append((time.time(), time.perf_counter() - t0))
                    time.sleep(0.005)

        offset = args.report_sessions

        retries = [0]

        def grpc_batch(items: list[pb.Session]) -> None:
            with grpc.insecure_channel(server.target) as ch:
                while True:
                    try:
                        reply = pb_grpc.SessionServiceStub(ch).IngestSessions(
                            pb.IngestSessionsRequest(sessions=items), metadata=md, timeout=120
                        )
                        break
                    except grpc.RpcError as err:
                        if err.code() != grpc.StatusCode.UNAVAILABLE:
                            raise
                        retries[0] += 1
                assert reply.accepted == len(items), reply

        def rest_batch(items: list[pb.Session]) -> None:
            body = {"sessions": [json_format.MessageToDict(s, preserving_proto_field_name=True)
                                 for s in items]}  # fmt: skip
            while True:
                r = httpx.post(f"{base}/api/sessions/ingest", json=body, headers=auth, timeout=120)
                if r.status_code != 503:
                    break
                retries[0] += 1
            assert r.status_code == 200 and r.json()["accepted"] == len(items), r.text[:300]

        def pdf_download() -> None:
            r = httpx.get(f"{base}/api/v2/report/{rid}/pdf", headers=auth, timeout=120)
            assert r.status_code == 200, r.text[:300]

        def generate() -> None:
            r = httpx.post(f"{base}/api/v2/report", json={}, headers=auth, timeout=60)
            assert r.status_code == 200, r.text[:300]

        t = threading.Thread(target=probe)
        t.start()
        quiet_from = time.time()
        time.sleep(args.quiet)
        quiet = (quiet_from, time.time())
        busy: list[tuple[float, float]] = []
        for _ in range(args.rounds):
            work = []
            for b in range(args.batches):
                items = batch(args.batch_size, offset)
                offset += args.batch_size
                work.append((grpc_batch if b % 2 else rest_batch, items))
            began = time.time()
            with ThreadPoolExecutor(args.batches + 2) as ex:
                futures = [ex.submit(fn, items) for fn, items in work]
                futures += [ex.submit(pdf_download), ex.submit(generate)]
                for f in futures:
                    f.result()
            busy.append((began, time.time()))
            time.sleep(0.5)
        stop.set()
        t.join()
        print(f"load average at end:   {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        quiet_probes = [s for at, s in probes if quiet[0] <= at <= quiet[1]]
        busy_probes = [s for at, s in probes if any(a <= at <= b for a, b in busy)]
        print(f"health Check quiet: {ms(quiet_probes)}")
        print(f"health Check while {args.batches} × {args.batch_size:,}-session batches, a PDF "
              f"and a generation run ({args.rounds} rounds, {sum(b - a for a, b in busy):.1f} s): "
              f"{ms(busy_probes)}")  # fmt: skip
        log = data / f"server-{server.port}.log"
        print("server-side event-loop stalls (loopwatch):")
        show_stalls("quiet", stalls(log, [quiet], "stall_ms"), args.stall_ms)
        show_stalls("busy", stalls(log, busy, "stall_ms"), args.stall_ms)
        show_steps("quiet", stalls(log, [quiet], "step_ms"), args.stall_ms)
        show_steps("busy", stalls(log, busy, "step_ms"), args.stall_ms)
        print(
            f"retries of batches answered UNAVAILABLE/503 (no ingest connection in time): {retries[0]}"
        )
    finally:
        if proxy is not None:
            envoy.stop(proxy)
        if server is not None:
            server.stop()
        pg.stop()


if __name__ == "__main__":
    main()
