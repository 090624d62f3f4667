"""Several service instances behind one Envoy (docs/scaling.md): one instance killed with
SIGKILL under a read load costs no failed read beyond the calls in flight on it (Envoy retries
reads on the other instance, and its gRPC health checks take the dead one out)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import httpx

from session_audit import envoy
from tests.factories import T0, Spec
from tests.support import ServerProcess, Stack

CLIENTS = 4


def _until(check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "reads did not progress"
        time.sleep(0.05)


def test_killing_one_of_two_instances_fails_no_read_beyond_those_in_flight(
    stack: Stack, workdir: Path
) -> None:
    token = stack.token(stack.new_org("twins"), "admin")
    specs = [Spec(start=T0 + timedelta(minutes=i)) for i in range(5)]
    assert stack.ingest(token, [s.to_proto() for s in specs]).written == len(specs)
    instances = [ServerProcess(stack.dsn, workdir).start() for _ in range(2)]
    http_port = envoy.free_port()
    proxy = envoy.start(
        http_port, instances[0].port, workdir, upstreams=[("127.0.0.1", i.port) for i in instances]
    )
    paths = ["/api/sessions", f"/api/sessions/{specs[0].id}", "/api/audit/sessions/stats"]
    killed_at: list[float] = []
    results: list[tuple[float, float, int]] = []  # (sent, answered, status)
    stop = threading.Event()
    lock = threading.Lock()
    bodies: list[str] = []

    def reader(k: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as client:
            n = k
            while not stop.is_set():
                path = paths[n % len(paths)]
                params = {"field": "protocol"} if path.endswith("stats") else None
                sent = time.monotonic()
                try:
                    r = client.get(path, params=params,
                                   headers={"authorization": f"Bearer {token}"})  # fmt: skip
                    status = r.status_code
                    if status != 200:
                        bodies.append(r.text[:200])
                except httpx.HTTPError as exc:
                    status = 0
                    bodies.append(repr(exc))
                with lock:
                    results.append((sent, time.monotonic(), status))
                n += 1

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(CLIENTS)]
    try:
        for t in threads:
            t.start()
        _until(lambda: len(results) >= 30)
        victim = instances[1].proc
        assert victim is not None
        killed_at.append(time.monotonic())
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(10)
        done = len(results)
        _until(lambda: len(results) >= done + 60)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        envoy.stop(proxy)
        instances[0].stop()
    kill = killed_at[0]
    before = [r for r in results if r[1] < kill]
    after = [r for r in results if r[0] > kill]
    failed = [r for r in results if r[2] != 200]
    # In flight on the killed instance: at most one per client, sent before the kill and
    # answered after it.
    in_flight = [r for r in results if r[0] <= kill <= r[1]]
    assert len(before) >= 20 and len(after) >= 50, (len(before), len(after))
    assert all(r in in_flight for r in failed), (failed, bodies)
    assert len(failed) <= CLIENTS
    print(f"\nreads: {len(results)}, {len(before)} before the kill, {len(after)} after; "
          f"{len(in_flight)} in flight at the kill; failed: {len(failed)}")  # fmt: skip
