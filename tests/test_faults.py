"""Faults and bounded resources (issue 11, findings 4-7): a frozen or stopped PostgreSQL, idle
streams, revoked tokens mid-stream, pools that cannot starve one another.

The database-fault tests run their own PostgreSQL, server and Envoy (freezing the shared one
would stall every other test); the server gets short bounds so the tests stay quick."""

from __future__ import annotations

import signal
import threading
import time
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
    proxy = envoy.start(http_port, server.port, work)
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
    """Finding 5: the stream's token is checked again before each chunk (5,000 items, its
    own transaction) is written: revoked at item 7,000 of a 20,000-session stream, nothing
    sent after the revocation is stored — at most the first chunk, if the server wrote it
    before the revocation (the client may run ahead of the server)."""
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
    assert stored in (set(), {s.id for s in specs[:5000]})


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
