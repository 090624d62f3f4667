"""Faults and bounded resources (issue 11, findings 4-7): a frozen or stopped PostgreSQL, idle
streams, revoked tokens mid-stream, pools that cannot starve one another.

The database-fault tests run their own PostgreSQL, server and Envoy (freezing the shared one
would stall every other test); the server gets short bounds so the tests stay quick."""

from __future__ import annotations

import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2

from session_audit import envoy
from session_audit.embedded import EmbeddedPostgres
from session_audit.sessions.ingest import CHUNK, FIRST_CHUNK
from session_audit.v1 import analytics_pb2 as an
from session_audit.v1 import analytics_pb2_grpc as an_grpc
from session_audit.v1 import sessions_pb2 as pb
from session_audit.v1 import sessions_pb2_grpc as pb_grpc
from tests.factories import T0, Spec
from tests.support import ServerProcess, Stack, _migrate, auth_md, run
from tests.test_operations import health_status, wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Faulty:
    """A stack of its own: PostgreSQL that tests may stop or freeze, server, Envoy."""

    pg: EmbeddedPostgres
    dsn: str
    server: ServerProcess
    http_port: int
    envoy_proc: Any
    token: str

    def rest(self, path: str, **headers: str) -> tuple[int, float]:
        t0 = time.monotonic()
        try:
            r = httpx.get(f"http://127.0.0.1:{self.http_port}{path}", timeout=60,
                          headers={"authorization": f"Bearer {self.token}", **headers})  # fmt: skip
            code = r.status_code
        except httpx.HTTPError:
            code = -1
        return code, time.monotonic() - t0

    def grpc_list(self, timeout: float | None) -> tuple[grpc.StatusCode, float]:
        t0 = time.monotonic()
        with grpc.insecure_channel(self.server.target) as ch:
            try:
                pb_grpc.SessionServiceStub(ch).ListSessions(
                    pb.ListSessionsRequest(), metadata=auth_md(self.token), timeout=timeout
                )
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
        return code, time.monotonic() - t0

    def postgres_processes(self) -> list[psutil.Process]:
        pid = int((self.pg.pgdata / "postmaster.pid").read_text().split()[0])
        main = psutil.Process(pid)
        return [main, *main.children(recursive=True)]


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faulty]:
    work = tmp_path_factory.mktemp("faulty")
    pg = EmbeddedPostgres(work / "pg")
    dsn = pg.start()
    run(_migrate(dsn))
    server = ServerProcess(dsn, work, env_extra={
        "QUERY_TIMEOUT_SECONDS": "3", "POOL_ACQUIRE_TIMEOUT_SECONDS": "2",
        "STREAM_IDLE_SECONDS": "2", "DB_POOL_MAX": "2", "REPORT_GENERATORS": "3",
        "REPORT_POLL_INTERVAL_MS": "200",
    }).start()  # fmt: skip
    http_port = envoy.free_port()
    proxy = server.start_envoy(http_port, work)
    stack = Stack(dsn, server, http_port, proxy)
    token = stack.token(stack.new_org("faulty"), "admin")
    try:
        yield Faulty(pg, dsn, server, http_port, proxy, token)
    finally:
        envoy.stop(proxy)
        server.stop()
        pg.stop()


def test_a_frozen_database_gives_bounded_answers_and_recovers(faulty: Faulty) -> None:
    """Finding 6: PostgreSQL frozen (SIGSTOP) under calls → each answers within its deadline
    + 1 s (REST: the caller's grpc-timeout through Envoy), health turns NOT_SERVING, and once
    PostgreSQL runs again the same server process answers again."""
    assert faulty.rest("/api/sessions")[0] == 200
    procs = faulty.postgres_processes()
    for p in procs:
        p.send_signal(signal.SIGSTOP)
    try:
        results: list[tuple[str, Any, float]] = []

        def rest(deadline: str, bound: float) -> None:
            code, took = faulty.rest("/api/sessions?count=exact", **{"grpc-timeout": deadline})
            results.append((f"REST {deadline}", code, took - bound))

        def unary(deadline: float | None, bound: float) -> None:
            code, took = faulty.grpc_list(deadline)
            results.append((f"gRPC {deadline}", code, took - bound))

        threads = [
            threading.Thread(target=rest, args=("2S", 2.0)),
            threading.Thread(target=rest, args=("1500m", 1.5)),
            threading.Thread(target=unary, args=(2.0, 2.0)),
            # No deadline: the server's own bounds (pool wait 2 s, statement 3 s) apply.
            threading.Thread(target=unary, args=(None, 3.0)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(results) == 4
        for name, code, late in results:
            assert late < 1.0, (name, code, late)
            assert code in (503, 504, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.UNAVAILABLE), (name, code)  # fmt: skip
        wait_for(lambda: health_status(faulty.server.target) == NOT_SERVING, 10)
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
    wait_for(lambda: health_status(faulty.server.target) == SERVING, 30)
    wait_for(lambda: faulty.rest("/api/sessions")[0] == 200, 30)


def test_a_stopped_database_is_unavailable_then_recovers(faulty: Faulty) -> None:
    faulty.pg.pg_ctl("stop")
    try:
        code, took = faulty.grpc_list(5)
        assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED) or (
            code == grpc.StatusCode.DEADLINE_EXCEEDED
        ), code
        assert took < 6
        rest_code, _ = faulty.rest("/api/sessions", **{"grpc-timeout": "3S"})
        assert rest_code in (503, 504)
        wait_for(lambda: health_status(faulty.server.target) == NOT_SERVING, 10)
    finally:
        faulty.pg.pg_ctl("start")
    wait_for(lambda: health_status(faulty.server.target) == SERVING, 30)
    wait_for(lambda: faulty.rest("/api/sessions")[0] == 200, 30)


@dataclass
class Call:
    """One call of the load: when it started (seconds since the load began), what it was and
    how it ended (a gRPC status name or an HTTP status), and how long it took."""

    at: float
    what: str
    code: str
    took: float


def test_a_frozen_then_stopped_database_under_load(faulty: Faulty) -> None:
    """Issue 11, "How it is proven": six callers of three orgs run list, session report,
    histogram and ingest over gRPC and REST (through Envoy), each with a 1.5 s deadline, while
    PostgreSQL is frozen (SIGSTOP, every process of it) for 5 s, runs again, is stopped for 3 s
    and started again. Every call answers within its deadline + 1 s, with OK or a retryable
    DEADLINE_EXCEEDED / UNAVAILABLE (REST 504 / 503), never INTERNAL or 500; health reads
    NOT_SERVING in both outages; afterwards the same server process answers every kind of call,
    and every session whose ingest was acknowledged, before, between or after the outages, is
    stored."""
    stack = Stack(faulty.dsn, faulty.server, faulty.http_port, faulty.envoy_proc)
    orgs = [stack.new_org(f"load{i}") for i in range(3)]
    tokens = {org: stack.token(org, "admin") for org in orgs}
    day = T0.replace(hour=0, minute=0)
    for token in tokens.values():
        stack.ingest(token, [Spec(start=day + timedelta(minutes=7 * i)).to_proto()
                             for i in range(200)])  # fmt: skip
    window = {"start_date": day.date().isoformat(),
              "end_date": (day + timedelta(days=2)).date().isoformat()}  # fmt: skip
    deadline = 1.5
    server_pid = faulty.server.proc.pid if faulty.server.proc else 0
    acked: dict[str, list[str]] = {org: [] for org in orgs}
    calls: list[Call] = []
    health: list[tuple[float, str]] = []
    lock = threading.Lock()
    stop = threading.Event()
    t_zero = time.monotonic()

    def grpc_call(what: str, token: str, ch: grpc.Channel, ids: list[str]) -> str:
        md = auth_md(token)
        try:
            if what == "list":
                pb_grpc.SessionServiceStub(ch).ListSessions(
                    pb.ListSessionsRequest(limit=20), metadata=md, timeout=deadline
                )
            elif what == "report":
                an_grpc.AnalyticsServiceStub(ch).GetSessionReport(
                    an.SessionReportRequest(**window), metadata=md, timeout=deadline
                )
            elif what == "histogram":
                an_grpc.AnalyticsServiceStub(ch).GetSessionHistogram(
                    an.HistogramRequest(
                        field="protocol",
                        bin_size="hour",
                        start=window["start_date"],
                        end=window["end_date"],
                    ),
                    metadata=md,
                    timeout=deadline,
                )
            else:
                reply = pb_grpc.SessionServiceStub(ch).IngestSessions(
                    pb.IngestSessionsRequest(
                        sessions=[Spec(id=i, start=day).to_proto() for i in ids]
                    ),
                    metadata=md,
                    timeout=deadline,
                )
                if reply.accepted != len(ids):
                    return f"accepted {reply.accepted} of {len(ids)}"
            return "OK"
        except grpc.RpcError as err:
            return str(err.code().name)  # fmt: skip

    def rest_call(what: str, token: str, client: httpx.Client, ids: list[str]) -> str:
        h = {"authorization": f"Bearer {token}", "grpc-timeout": f"{int(deadline * 1000)}m"}
        if what == "list":
            r = client.get("/api/sessions", params={"limit": 20}, headers=h)
        elif what == "report":
            r = client.get("/api/reports/sessions", params=window, headers=h)
        elif what == "histogram":
            r = client.get("/api/audit/sessions/histogram", headers=h, params={
                "field": "protocol", "bin-size": "hour",
                "start": window["start_date"], "end": window["end_date"]})  # fmt: skip
        else:
            body = {"sessions": [{"id": i, "start_date": day.isoformat(), "connection": "pg"}
                                 for i in ids]}  # fmt: skip
            r = client.post("/api/sessions/ingest", json=body, headers=h)
            if r.status_code == 200 and r.json()["accepted"] != len(ids):
                return f"accepted {r.json()['accepted']} of {len(ids)}"
        return str(r.status_code)

    def caller(seed: int) -> None:
        rng = random.Random(seed)
        with (
            grpc.insecure_channel(faulty.server.target) as ch,
            httpx.Client(base_url=f"http://127.0.0.1:{faulty.http_port}", timeout=30) as client,
        ):
            while not stop.is_set():
                org = rng.choice(orgs)
                what = rng.choice(["list", "report", "histogram", "ingest"])
                via = rng.choice(["gRPC", "REST"])
                ids = [str(uuid.uuid4()) for _ in range(5)] if what == "ingest" else []
                t0 = time.monotonic()
                try:
                    if via == "gRPC":
                        code = grpc_call(what, tokens[org], ch, ids)
                    else:
                        code = rest_call(what, tokens[org], client, ids)
                except Exception as err:  # recorded: the test fails on it
                    code = repr(err)
                took = time.monotonic() - t0
                with lock:
                    calls.append(Call(t0 - t_zero, f"{via} {what}", code, took))
                    if what == "ingest" and code in ("OK", "200"):
                        acked[org].extend(ids)
                time.sleep(rng.uniform(0.02, 0.1))

    def prober() -> None:
        while not stop.is_set():
            t0 = time.monotonic() - t_zero
            try:
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(
                    health_status(faulty.server.target)
                )
            except grpc.RpcError as err:
                status = str(err.code().name)  # fmt: skip
            with lock:
                health.append((t0, status))
            time.sleep(0.25)

    threads = [threading.Thread(target=caller, args=(s,)) for s in range(6)]
    threads.append(threading.Thread(target=prober))
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        procs = faulty.postgres_processes()
        frozen_at = time.monotonic() - t_zero
        for p in procs:
            p.send_signal(signal.SIGSTOP)
        try:
            time.sleep(5)
        finally:
            for p in procs:
                p.send_signal(signal.SIGCONT)
        thawed_at = time.monotonic() - t_zero
        wait_for(lambda: health_status(faulty.server.target) == SERVING, 30)
        time.sleep(1)
        stopped_at = time.monotonic() - t_zero
        faulty.pg.pg_ctl("stop")
        try:
            time.sleep(3)
        finally:
            faulty.pg.pg_ctl("start")
        started_at = time.monotonic() - t_zero
        wait_for(lambda: health_status(faulty.server.target) == SERVING, 30)
        recovered_at = time.monotonic() - t_zero
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    ok = {"OK", "200"}
    retryable = {"DEADLINE_EXCEEDED", "UNAVAILABLE", "503", "504"}
    wrong = [c for c in calls if c.code not in ok | retryable]
    assert not wrong, wrong[:10]
    late = [c for c in calls if c.took > deadline + 1.0]
    assert not late, late[:10]
    # The outages were felt: calls gave up and health said so, in each of them.
    assert any(c.code in retryable for c in calls if frozen_at <= c.at < thawed_at)
    assert any(c.code in retryable for c in calls if stopped_at <= c.at < started_at)
    assert any(s == "NOT_SERVING" for t, s in health if frozen_at <= t < thawed_at + 2)
    assert any(s == "NOT_SERVING" for t, s in health if stopped_at <= t < started_at + 2)
    # The same process serves again: every kind of call succeeded once health was back.
    assert faulty.server.proc is not None and faulty.server.proc.pid == server_pid
    assert faulty.server.proc.poll() is None
    after = {c.what for c in calls if c.at >= recovered_at + 1 and c.code in ok}
    assert after == {f"{via} {what}" for via in ("gRPC", "REST")
                     for what in ("list", "report", "histogram", "ingest")}, after  # fmt: skip
    # No acknowledged session was lost.
    for org, ids in acked.items():
        stored = stack.sql("SELECT count(*) FROM sessions s JOIN orgs o ON o.id = s.org_id "
                           "WHERE o.name = $1 AND s.id = any($2::uuid[])", org, ids)[0][0]  # fmt: skip
        assert stored == len(ids), (org, stored, len(ids))
    counts = Counter((c.what, c.code) for c in calls)
    print(
        f"\n{len(calls)} calls: {dict(sorted(counts.items()))}; "
        f"acknowledged ingests: {sum(len(v) for v in acked.values())} sessions"
    )


def test_an_idle_stream_is_ended_and_stores_nothing(faulty: Faulty) -> None:
    """Finding 4: a stream that stops sending is ended after STREAM_IDLE_SECONDS (2 here)."""
    specs = [Spec(start=T0 + timedelta(seconds=i)) for i in range(10)]

    def idle() -> Iterator[pb.IngestSessionsRequest]:
        yield pb.IngestSessionsRequest(sessions=[s.to_proto() for s in specs])
        time.sleep(6)

    t0 = time.monotonic()
    with grpc.insecure_channel(faulty.server.target) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.SessionServiceStub(ch).StreamIngestSessions(
            idle(), metadata=auth_md(faulty.token), timeout=30
        )
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "STREAM_IDLE_SECONDS" in (err.value.details() or "")
    assert time.monotonic() - t0 < 6
    n = Stack(faulty.dsn, faulty.server, 0, faulty.envoy_proc).sql(
        "SELECT count(*) FROM sessions WHERE id = any($1::uuid[])", [s.id for s in specs]
    )[0][0]
    assert n == 0


def test_report_generators_cannot_starve_rpcs(faulty: Faulty) -> None:
    """Finding 7: DB_POOL_MAX=2 ≤ REPORT_GENERATORS=3 (each generator holds a connection and
    takes a second): reports still get generated and RPCs keep answering meanwhile."""
    base = f"http://127.0.0.1:{faulty.http_port}"
    auth = {"authorization": f"Bearer {faulty.token}"}
    rids = [
        httpx.post(f"{base}/api/v2/report", headers=auth, json={}, timeout=30).json()["report"][
            "id"
        ]
        for _ in range(6)
    ]
    deadline = time.monotonic() + 60
    pending = set(rids)
    while pending and time.monotonic() < deadline:
        code, took = faulty.rest("/api/sessions", **{"grpc-timeout": "5S"})
        assert code == 200 and took < 5
        for rid in list(pending):
            got = httpx.get(f"{base}/api/v2/report/{rid}", headers=auth, timeout=30).json()
            if got["report"]["status"] != "pending":
                assert got["report"]["status"] == "ready"
                pending.discard(rid)
        time.sleep(0.1)
    assert not pending


# -- on the shared stack -----------------------------------------------------------------------


def test_idle_streams_of_one_org_do_not_hold_up_another(stack: Stack) -> None:
    """Finding 4: streams of one org that send a message and idle hold no connection, lock or
    transaction (a stream buffers its first chunk), so another org's ingest is not delayed;
    beyond INGEST_STREAMS_PER_ORG (4) concurrent streams an org gets RESOURCE_EXHAUSTED."""
    busy = stack.token(stack.new_org("idle"), "ingest")
    other = stack.token(stack.new_org("other"), "ingest")
    release = threading.Event()
    shared = [Spec(start=T0 + timedelta(seconds=i)) for i in range(50)]
    outcomes: list[Any] = []

    def stream() -> None:
        def gen() -> Iterator[pb.IngestSessionsRequest]:
            yield pb.IngestSessionsRequest(sessions=[s.to_proto() for s in shared])
            release.wait(20)

        try:
            outcomes.append(stack.stub().StreamIngestSessions(gen(), metadata=auth_md(busy),
                                                              timeout=30).written)  # fmt: skip
        except grpc.RpcError as err:
            outcomes.append(err.code())

    channel = stack.channel()
    stub = pb_grpc.SessionServiceStub(channel)

    def timed_ingest(specs: list[Spec]) -> tuple[pb.IngestSessionsResponse, float]:
        t0 = time.monotonic()
        reply = stub.IngestSessions(pb.IngestSessionsRequest(sessions=[s.to_proto() for s in specs]),
                                    metadata=auth_md(other), timeout=30)  # fmt: skip
        return reply, time.monotonic() - t0

    # The same call before the streams: what it costs on this machine now.
    baseline = min(timed_ingest([Spec(start=T0)])[1] for _ in range(3))
    threads = [threading.Thread(target=stream) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    try:
        reply, took = timed_ingest(shared[:5])
        # Same ids as the idle streams: they lock nothing yet, so no wait.
        assert took < baseline + 1.0, (took, baseline)
        assert reply.written == 5 or reply.rejected == 5
        with pytest.raises(grpc.RpcError) as err:
            stack.stub().StreamIngestSessions(
                iter([pb.IngestSessionsRequest(sessions=[shared[0].to_proto()])]),
                metadata=auth_md(busy), timeout=10,
            )  # fmt: skip
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "INGEST_STREAMS_PER_ORG" in (err.value.details() or "")
    finally:
        release.set()
        for t in threads:
            t.join(30)
    # The 5 sessions another org stored first are theirs; the streams are told so per item.
    assert len(outcomes) == 4 and all(isinstance(o, int) for o in outcomes)
    channel.close()


def test_a_token_revoked_mid_stream_stores_nothing_more(stack: Stack) -> None:
    """Finding 5: the stream's token is checked again before each chunk (1,000 items, then
    5,000, each its own transaction) is written: revoked at item 7,000 of a 20,000-session
    stream, nothing sent after the revocation is stored — at most the chunks the server wrote
    before the revocation (the client may run ahead of the server), whole."""
    org = stack.new_org("revoke")
    token = stack.token(org, "ingest")
    specs = [Spec(start=T0 + timedelta(seconds=i)) for i in range(20_000)]

    def gen() -> Iterator[pb.IngestSessionsRequest]:
        for i in range(0, 20_000, 1000):
            if i == 7000:
                prefix = token[:10]
                stack.sql("UPDATE api_tokens SET revoked_at = now() WHERE prefix = $1", prefix)
                time.sleep(0.3)
            yield pb.IngestSessionsRequest(sessions=[s.to_proto() for s in specs[i : i + 1000]])

    with pytest.raises(grpc.RpcError) as err:
        stack.stub().StreamIngestSessions(gen(), metadata=auth_md(token), timeout=60)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    stored = {r[0] for r in stack.sql("SELECT id::text FROM sessions WHERE id = any($1::uuid[])",
                                      [s.id for s in specs])}  # fmt: skip
    assert (FIRST_CHUNK, CHUNK) == (1000, 5000)  # the chunks below end at items 1,000 and 6,000
    assert stored in (set(), {s.id for s in specs[:1000]}, {s.id for s in specs[:6000]})


def test_an_exhausted_pool_answers_unavailable_and_health_stays_serving(faulty: Faulty) -> None:
    """Finding 7: every RPC connection (DB_POOL_MAX=2 here) waits on a lock; the next call
    is told UNAVAILABLE after POOL_ACQUIRE_TIMEOUT_SECONDS (2) with a message, and the health
    probe, on its own connection, still answers SERVING."""
    import asyncio

    from session_audit.core import db

    async def scenario() -> list[Any]:
        blocker = await db.connect(faulty.dsn)
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        try:
            stuck = [asyncio.to_thread(faulty.grpc_list, 8.0) for _ in range(2)]
            tasks = [asyncio.ensure_future(c) for c in stuck]
            # Their statements wait on the lock until QUERY_TIMEOUT_SECONDS (3) ends them.
            await asyncio.sleep(0.3)

            def third() -> tuple[Any, str, float]:
                t0 = time.monotonic()
                with grpc.insecure_channel(faulty.server.target) as ch:
                    try:
                        pb_grpc.SessionServiceStub(ch).ListSessions(
                            pb.ListSessionsRequest(), metadata=auth_md(faulty.token), timeout=8
                        )
                        return grpc.StatusCode.OK, "", time.monotonic() - t0
                    except grpc.RpcError as err:
                        return err.code(), err.details() or "", time.monotonic() - t0

            code, details, took = await asyncio.to_thread(third)
            serving = await asyncio.to_thread(health_status, faulty.server.target)
        finally:
            await tx.rollback()
            await blocker.close()
        stuck_codes = [r[0] for r in await asyncio.gather(*tasks)]
        return [code, details, took, serving, stuck_codes]

    code, details, took, serving, stuck_codes = run(scenario())
    assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
    assert "no RPC connection became free within 2 s" in details
    assert 1.5 < took < 4
    assert serving == SERVING
    # The calls holding the connections end by their statement timeout, not as errors of ours.
    assert set(stuck_codes) <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}


def test_a_silent_token_listener_turns_the_cache_off(faulty: Faulty) -> None:
    """Finding 7: the token cache trusts its LISTEN connection only while that connection
    answers. Its backend frozen (as a half-open TCP connection would be: it looks open and
    hears nothing), a token revoked meanwhile is refused within a few seconds, not after the
    cache's 30 s TTL."""
    from session_audit.core.auth import LISTENER_NAME

    stack = Stack(faulty.dsn, faulty.server, 0, faulty.envoy_proc)
    token = stack.token(stack.new_org("listen"), "auditor")
    probe = Faulty(faulty.pg, faulty.dsn, faulty.server, faulty.http_port, faulty.envoy_proc, token)
    assert probe.grpc_list(5)[0] == grpc.StatusCode.OK
    assert probe.grpc_list(5)[0] == grpc.StatusCode.OK  # now cached
    rows = stack.sql("SELECT pid FROM pg_stat_activity WHERE application_name = $1", LISTENER_NAME)
    assert len(rows) == 1
    backend = psutil.Process(rows[0]["pid"])
    backend.send_signal(signal.SIGSTOP)
    try:
        stack.sql("UPDATE api_tokens SET revoked_at = now() WHERE prefix = $1", token[:10])
        t0 = time.monotonic()
        wait_for(lambda: probe.grpc_list(5)[0] == grpc.StatusCode.UNAUTHENTICATED, 10)
        assert time.monotonic() - t0 < 10
    finally:
        backend.send_signal(signal.SIGCONT)
