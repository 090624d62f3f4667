"""The reliability soak (issue 11; `make soak`, about 5 minutes): long runs of real processes.

  * 8 concurrent ingest clients for SOAK_SECONDS (60) sending overlapping ids in random order,
    retrying on the retryable codes: the final state equals a sequential model of what was
    acknowledged, no INTERNAL, and the rollups equal a full rebuild;
  * kill -9 of the server mid-stream, restart, replay: exactly the sent sessions, once;
  * a mixed load (list, session report, histogram, ingest, report generation; three orgs) for
    SOAK_MIXED_SECONDS (60) at a bounded concurrency: p50/p99 per call and errors printed,
    no errors;
  * the event loop stays responsive: health-check p99 while ten 1,000-session batches and
    a PDF are in flight.

Skipped unless SOAK=1 (so `make test` stays quick)."""

from __future__ import annotations

import os
import random
import signal
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from session_audit.analytics import rollups
from session_audit.core import db
from session_audit.v1 import sessions_pb2 as pb
from session_audit.v1 import sessions_pb2_grpc as pb_grpc
from tests.factories import T0, Spec
from tests.report_reference import wait_report
from tests.support import ServerProcess, Stack, auth_md, run
from tests.test_analytics_properties import snapshot

pytestmark = pytest.mark.skipif(os.environ.get("SOAK") != "1", reason="make soak (SOAK=1)")

# What docs/reliability.md tells clients to retry (RESOURCE_EXHAUSTED: more than
# INGEST_STREAMS_PER_ORG streams of one org at once, after a pause).
RETRYABLE = {grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE,
             grpc.StatusCode.RESOURCE_EXHAUSTED}  # fmt: skip
SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
MIXED_SECONDS = float(os.environ.get("SOAK_MIXED_SECONDS", "60"))


def _rollups_equal_a_rebuild(dsn: str, org_name: str) -> None:
    async def go() -> None:
        conn = await db.connect(dsn)
        try:
            org = await conn.fetchval("SELECT id FROM orgs WHERE name = $1", org_name)
            before = {f.table: await snapshot(conn, f, org) for f in rollups.FAMILIES}
            await rollups.rebuild(conn, org)
            after = {f.table: await snapshot(conn, f, org) for f in rollups.FAMILIES}
            assert before == after
        finally:
            await conn.close()

    run(go())


# -- 8 concurrent clients, overlapping ids, random order -----------------------------------


@dataclass
class Session:
    """One session's two possible reports. Applied in any order and any number of times,
    they merge to the same row (an open report never reopens a closed session), so the
    expected final state depends only on which reports were acknowledged."""

    id: str
    start: Any
    n: int

    def opened(self) -> pb.Session:
        return Spec(id=self.id, start=self.start, connection=f"c{self.n % 7}",
                    email=f"u{self.n % 11}@x.example").to_proto()  # fmt: skip

    def closed(self) -> pb.Session:
        return Spec(id=self.id, start=self.start, end=self.start + timedelta(minutes=self.n % 90 + 1),
                    connection=f"c{self.n % 7}", email=f"u{self.n % 11}@x.example",
                    redactions=(("EMAIL_ADDRESS", self.n % 4, 10 * (self.n % 4)),)).to_proto()  # fmt: skip


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[str, bool] = field(default_factory=dict)  # id → a close was acknowledged
    codes: Counter[str] = field(default_factory=Counter)
    items: int = 0
    batches: int = 0
    retries: int = 0


def test_concurrent_overlapping_ingest_equals_a_sequential_model(stack: Stack) -> None:
    org = stack.new_org("soak")
    token = stack.token(org, "ingest")
    pool = [Session(str(uuid.uuid4()), T0 + timedelta(seconds=7 * i), i) for i in range(4000)]
    tally = Tally()
    end = time.monotonic() + SECONDS

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with grpc.insecure_channel(stack.grpc_target) as ch:
            stub = pb_grpc.SessionServiceStub(ch)
            while time.monotonic() < end:
                picked = rng.sample(pool, rng.randint(50, 900))
                picked += rng.sample(picked, len(picked) // 20)  # some ids twice
                rng.shuffle(picked)
                reports = [(s, rng.random() < 0.5) for s in picked]
                msgs = [s.closed() if c else s.opened() for s, c in reports]
                for attempt in range(30):
                    try:
                        if rng.random() < 0.5:
                            reply = stub.IngestSessions(
                                pb.IngestSessionsRequest(sessions=msgs),
                                metadata=auth_md(token), timeout=60,
                            )  # fmt: skip
                        else:
                            chunks = [pb.IngestSessionsRequest(sessions=msgs[i : i + 200])
                                      for i in range(0, len(msgs), 200)]  # fmt: skip
                            reply = stub.StreamIngestSessions(
                                iter(chunks), metadata=auth_md(token), timeout=60
                            )
                        break
                    except grpc.RpcError as err:
                        with tally.lock:
                            tally.codes[err.code().name] += 1
                        if err.code() not in RETRYABLE:
                            raise
                        with tally.lock:
                            tally.retries += 1
                        time.sleep(rng.uniform(0.01, 0.05) * (attempt + 1))
                else:
                    raise AssertionError("a batch was refused 30 times")
                assert reply.rejected == 0 and reply.accepted == len(msgs), reply
                with tally.lock:
                    tally.codes["OK"] += 1
                    tally.batches += 1
                    tally.items += len(msgs)
                    for s, c in reports:
                        tally.acked[s.id] = tally.acked.get(s.id, False) or c

    with ThreadPoolExecutor(8) as ex:
        for f in [ex.submit(client, seed) for seed in range(8)]:
            f.result()
    print(f"\n8 clients × {SECONDS:.0f} s: {tally.batches} batches, {tally.items} items, "
          f"{tally.retries} retries, codes {dict(tally.codes)}")  # fmt: skip
    assert tally.codes.get("INTERNAL", 0) == 0
    by_id = {s.id: s for s in pool}
    rows = stack.sql(
        "SELECT s.id::text, s.status, s.end_date, s.connection, s.redactions"
        " FROM sessions s JOIN orgs o ON o.id = s.org_id WHERE o.name = $1", org,
    )  # fmt: skip
    assert {r["id"] for r in rows} == set(tally.acked)
    for r in rows:
        s, closed = by_id[r["id"]], tally.acked[r["id"]]
        expected = s.closed() if closed else s.opened()
        assert r["status"] == ("done" if closed else "open"), r
        assert (r["end_date"] is not None) == closed
        if closed:
            assert r["end_date"] == expected.end_date.ToDatetime().replace(
                tzinfo=r["end_date"].tzinfo
            )
        assert r["connection"] == expected.connection
    _rollups_equal_a_rebuild(stack.dsn, org)


# -- kill -9 mid-stream, restart, replay -----------------------------------------------------


def test_kill_9_mid_stream_then_replay_stores_each_session_once(stack: Stack) -> None:
    server = ServerProcess(stack.dsn, stack.server.workdir).start()
    org = stack.new_org("kill9")
    token = stack.token(org, "ingest")
    specs = [Spec(start=T0 + timedelta(seconds=i), end=T0 + timedelta(seconds=i + 30),
                  redactions=(("EMAIL_ADDRESS", 1, 5),)) for i in range(20_000)]  # fmt: skip
    ids = [s.id for s in specs]

    def chunks(kill_after: int | None) -> Iterator[pb.IngestSessionsRequest]:
        for n, i in enumerate(range(0, len(specs), 1000)):
            if n == kill_after:
                assert server.proc is not None
                os.kill(server.proc.pid, signal.SIGKILL)
                server.proc.wait()
                time.sleep(0.2)
            yield pb.IngestSessionsRequest(sessions=[s.to_proto() for s in specs[i : i + 1000]])

    with grpc.insecure_channel(server.target) as ch, pytest.raises(grpc.RpcError):
        pb_grpc.SessionServiceStub(ch).StreamIngestSessions(
            chunks(12), metadata=auth_md(token), timeout=60
        )
    stored = "SELECT count(*) FROM sessions WHERE id = any($1::uuid[])"
    # A transaction per chunk of 5,000: whole chunks only, never one after the kill.
    assert stack.sql(stored, ids)[0][0] in (0, 5000, 10_000)
    port = server.port
    server = ServerProcess(stack.dsn, stack.server.workdir).start(port)
    try:
        for _replay in range(2):  # a gateway that re-sends after a timeout sends twice
            with grpc.insecure_channel(server.target) as ch:
                reply = pb_grpc.SessionServiceStub(ch).StreamIngestSessions(
                    chunks(None), metadata=auth_md(token), timeout=60
                )
            assert reply.accepted == len(specs)
        assert stack.sql(stored, ids)[0][0] == len(specs)
        assert stack.sql(
            "SELECT count(*) FROM sessions s JOIN orgs o ON o.id = s.org_id WHERE o.name = $1", org
        )[0][0] == len(specs)
        _rollups_equal_a_rebuild(stack.dsn, org)
    finally:
        server.stop()


# -- the event loop stays responsive -----------------------------------------------------------


def test_health_probe_latency_while_batches_and_a_pdf_are_in_flight(stack: Stack) -> None:
    org = stack.new_org("loop")
    token = stack.token(org, "admin")
    specs = [Spec(start=T0 + timedelta(seconds=i), end=T0 + timedelta(seconds=i + 5))
             for i in range(5000)]  # fmt: skip
    stack.ingest(token, [s.to_proto() for s in specs[:1000]])
    rid = httpx.post(f"{stack.http}/api/v2/report", json={}, timeout=30,
                     headers={"authorization": f"Bearer {token}"}).json()["report"]["id"]  # fmt: skip
    wait_report(stack, token, rid)
    stop = threading.Event()
    probes: list[float] = []

    def probe() -> None:
        with grpc.insecure_channel(stack.grpc_target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            while not stop.is_set():
                t0 = time.perf_counter()
                stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                probes.append(time.perf_counter() - t0)
                time.sleep(0.005)

    def batch(i: int) -> None:
        fresh = [Spec(start=T0 + timedelta(seconds=i * 1000 + j)).to_proto() for j in range(1000)]
        stack.ingest(token, fresh)

    def pdf() -> None:
        httpx.get(f"{stack.http}/api/v2/report/{rid}/pdf", timeout=60,
                  headers={"authorization": f"Bearer {token}"})  # fmt: skip

    t = threading.Thread(target=probe)
    t.start()
    time.sleep(0.5)
    idle = len(probes)
    work: list[Callable[[], None]] = [lambda i=i: batch(i) for i in range(10)] + [pdf]
    with ThreadPoolExecutor(11) as ex:
        for f in [ex.submit(w) for w in work]:
            f.result()
    stop.set()
    t.join()
    quiet, busy = probes[:idle], probes[idle:]
    print(f"\nhealth Check, quiet: n={len(quiet)}, p50 {1000 * statistics.median(quiet):.1f} ms, "
          f"p99 {1000 * _percentile(quiet, 0.99):.1f} ms; while 10 × 1,000-session batches and "
          f"a PDF run: n={len(busy)}, p50 {1000 * statistics.median(busy):.1f} ms, "
          f"p99 {1000 * _percentile(busy, 0.99):.1f} ms")  # fmt: skip


# -- mixed load -----------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_mixed_load_has_no_errors_and_prints_latencies(stack: Stack) -> None:
    orgs = [stack.new_org(f"mixed{i}") for i in range(3)]
    admins = [stack.token(o, "admin") for o in orgs]
    day = T0.replace(hour=0, minute=0)
    for token in admins:  # 20,000 sessions per org over 10 days
        specs = [
            Spec(start=day + timedelta(seconds=43 * i), end=day + timedelta(seconds=43 * i + 90),
                 connection=f"c{i % 13}", redactions=(("EMAIL_ADDRESS", i % 3, 7),))
            for i in range(20_000)
        ]  # fmt: skip
        stack.stub().StreamIngestSessions(
            (pb.IngestSessionsRequest(sessions=[s.to_proto() for s in specs[i : i + 1000]])
             for i in range(0, len(specs), 1000)), metadata=auth_md(token), timeout=120,
        )  # fmt: skip
    window = {"start_date": day.date().isoformat(),
              "end_date": (day + timedelta(days=10)).date().isoformat()}  # fmt: skip

    def call(kind: str, token: str, client: httpx.Client) -> int:
        h = {"authorization": f"Bearer {token}"}
        if kind == "list":
            return client.get("/api/sessions", params={"limit": 50}, headers=h).status_code
        if kind == "report":
            return client.get("/api/reports/sessions", params=window, headers=h).status_code
        if kind == "histogram":
            return client.get("/api/audit/sessions/histogram", headers=h, params={
                "field": "protocol", "bin-size": "day", "size": 3,
                "start": window["start_date"], "end": window["end_date"]}).status_code  # fmt: skip
        if kind == "ingest":
            body = {"sessions": [{"id": str(uuid.uuid4()), "start_date": "2026-03-05T10:00:00Z",
                                  "connection": "pg"} for _ in range(100)]}  # fmt: skip
            return client.post("/api/sessions/ingest", json=body, headers=h).status_code
        if kind == "generate":
            return client.post("/api/v2/report", json={}, headers=h).status_code
        raise AssertionError(kind)

    kinds = ["list"] * 4 + ["report"] * 2 + ["histogram"] * 2 + ["ingest"] * 2 + ["generate"]
    latencies: dict[str, list[float]] = {k: [] for k in set(kinds)}
    errors: Counter[tuple[str, int]] = Counter()
    lock = threading.Lock()
    end = time.monotonic() + MIXED_SECONDS

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=stack.http, timeout=60) as client:
            while time.monotonic() < end:
                kind, token = rng.choice(kinds), rng.choice(admins)
                t0 = time.perf_counter()
                status = call(kind, token, client)
                took = time.perf_counter() - t0
                with lock:
                    latencies[kind].append(took)
                    if status != 200:
                        errors[(kind, status)] += 1

    with ThreadPoolExecutor(8) as ex:
        for f in [ex.submit(worker, s) for s in range(8)]:
            f.result()
    print(f"\nmixed load, 8 workers × {MIXED_SECONDS:.0f} s, 3 orgs × 20,000 sessions:")
    print(f"  {'call':<10} {'n':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for kind, values in sorted(latencies.items()):
        print(f"  {kind:<10} {len(values):>6} {1000 * statistics.median(values):>8.1f}"
              f" {1000 * _percentile(values, 0.99):>8.1f}")  # fmt: skip
    print(f"  errors: {dict(errors) or 0}")
    assert not errors
