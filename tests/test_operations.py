"""Operating the server: health follows the database, SIGTERM drains, several workers."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from session_audit.embedded import EmbeddedPostgres
from session_audit.envoy import free_port
from session_audit.v1 import sessions_pb2 as pb
from session_audit.v1 import sessions_pb2_grpc as pb_grpc
from tests.factories import Spec
from tests.support import ServerProcess, Stack, auth_md, run


def health_status(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        status: int = reply.status
        return status


def wait_for(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached in time")


def test_health_follows_the_database(tmp_path: Path) -> None:
    from tests.support import _migrate

    pg = EmbeddedPostgres(tmp_path / "pg")
    dsn = pg.start()
    run(_migrate(dsn))
    server = ServerProcess(dsn, tmp_path).start()
    try:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        assert health_status(server.target) == serving
        pg.pg_ctl("stop")
        wait_for(lambda: health_status(server.target) == not_serving)
        pg.pg_ctl("start")
        wait_for(lambda: health_status(server.target) == serving)
        # The pool reconnects: a real call works again.
        with grpc.insecure_channel(server.target) as ch:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.SessionServiceStub(ch).ListSessions(
                    pb.ListSessionsRequest(), metadata=auth_md("sat_nope")
                )
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop()
        pg.stop()


def test_sigterm_lets_inflight_rpcs_finish_and_refuses_new_ones(stack: Stack) -> None:
    server = ServerProcess(stack.dsn, stack.server.workdir).start()
    token = stack.token(stack.new_org("drain"), "ingest")
    base = datetime(2026, 1, 5, tzinfo=UTC)
    specs = [Spec(start=base + timedelta(seconds=i)) for i in range(200)]

    def slow_stream() -> Iterator[pb.IngestSessionsRequest]:
        yield pb.IngestSessionsRequest(sessions=[s.to_proto() for s in specs[:100]])
        assert server.proc is not None
        # Let the server pick the call up first: a call it has not dispatched yet when the
        # signal lands is a new RPC, which shutdown rightly refuses (CANCELLED).
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        yield pb.IngestSessionsRequest(sessions=[s.to_proto() for s in specs[100:]])

    with grpc.insecure_channel(server.target) as ch:
        reply = pb_grpc.SessionServiceStub(ch).StreamIngestSessions(
            slow_stream(), metadata=auth_md(token), timeout=30
        )
    assert (reply.accepted, reply.written) == (200, 200)
    with grpc.insecure_channel(server.target) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.SessionServiceStub(ch).ListSessions(
            pb.ListSessionsRequest(), metadata=auth_md(token), timeout=3
        )
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    # It exits by itself, cleanly, after the one SIGTERM.
    assert server.proc is not None
    assert server.proc.wait(timeout=30) == 0


def test_several_workers_share_one_port(stack: Stack) -> None:
    # Workers need a fixed port to share.
    server = ServerProcess(stack.dsn, stack.server.workdir, env_extra={"WORKERS": "2"})
    server.start(free_port())
    try:
        token = stack.token(stack.new_org("workers"), "auditor")
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.SessionServiceStub(ch)
            for _ in range(10):
                reply = stub.ListSessions(pb.ListSessionsRequest(), metadata=auth_md(token))
                assert list(reply.data) == []
        workers = server.children()
        assert len(workers) == 2
    finally:
        assert server.stop() == 0


def test_a_call_past_its_deadline_leaves_no_query_running(stack: Stack) -> None:
    token = stack.token(stack.new_org("deadline"), "auditor")

    async def scenario() -> tuple[grpc.StatusCode, int]:
        from session_audit.core import db

        blocker = await db.connect(stack.dsn)
        tx = blocker.transaction()
        await tx.start()
        # Every read of sessions now waits for this lock: the list query cannot finish.
        await blocker.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        try:

            def call() -> grpc.StatusCode:
                with grpc.insecure_channel(stack.grpc_target) as ch:
                    try:
                        pb_grpc.SessionServiceStub(ch).ListSessions(
                            pb.ListSessionsRequest(), metadata=auth_md(token), timeout=1.0
                        )
                    except grpc.RpcError as err:
                        return err.code()
                return grpc.StatusCode.OK

            code = await asyncio.to_thread(call)
            await asyncio.sleep(1.0)
            # The server cancelled its query when the deadline passed: nothing of ours waits.
            waiting = await blocker.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = 'session-audit' AND state = 'active'"
                " AND query ILIKE '%FROM sessions%' AND pid <> pg_backend_pid()"
            )
        finally:
            await tx.rollback()
            await blocker.close()
        return code, waiting

    code, waiting = run(scenario())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert waiting == 0
