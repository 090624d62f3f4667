"""Metrics and logs as an operator sees them: the server's /metrics and Envoy's
/stats/prometheus scraped before and after requests this test makes; the access lines of both
sides read back from their log files."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from session_audit.core import logs
from session_audit.envoy import free_port
from session_audit.v1 import sessions_pb2 as pb
from tests.factories import Spec
from tests.support import ServerProcess, Stack, auth_md

SESSIONS = "session_audit.v1.SessionService"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200, r.text
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels; 0 when it does not exist yet."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def rpc(method: str, kind: str = "unary", **more: str) -> dict[str, str]:
    return {"grpc_type": kind, "grpc_service": SESSIONS, "grpc_method": method, **more}


def server_metrics(stack: Stack) -> Samples:
    return scrape(f"http://127.0.0.1:{stack.metrics_port}/metrics")


def envoy_stats(stack: Stack) -> Samples:
    return scrape(f"http://127.0.0.1:{stack.envoy_metrics_port}/stats/prometheus")


def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_requests_move_the_right_counters_on_both_sides(stack: Stack) -> None:
    org = stack.new_org("metrics")
    token = stack.token(org, "admin")
    before, envoy_before = server_metrics(stack), envoy_stats(stack)

    # Through Envoy: one listing (OK) and one bad id (INVALID_ARGUMENT).
    assert stack.rest("GET", "/api/sessions?limit=1", token).status_code == 200
    assert stack.rest("GET", "/api/sessions/not-a-uuid", token).status_code == 400
    # Direct gRPC: 3 sessions of which one is invalid (no start date), then the same again.
    good = [Spec().to_proto(), Spec(connection="other").to_proto()]
    bad = pb.Session(id=str(uuid.uuid4()), user="x@example.com", connection="c")
    first = stack.ingest(token, [good[0], bad, good[1]])
    assert (first.written, first.rejected) == (2, 1)
    again = stack.ingest(token, good)
    assert again.unchanged == 2

    after = server_metrics(stack)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("grpc_server_started_total", **rpc("ListSessions")) == 1
    assert delta("grpc_server_handled_total", **rpc("ListSessions", grpc_code="OK")) == 1
    assert (
        delta("grpc_server_handled_total", **rpc("GetSession", grpc_code="INVALID_ARGUMENT")) == 1
    )
    assert delta("grpc_server_handled_total", **rpc("GetSession", grpc_code="OK")) == 0
    assert delta("grpc_server_handled_total", **rpc("IngestSessions", grpc_code="OK")) == 2
    assert delta("grpc_server_handling_seconds_count", **rpc("ListSessions", grpc_code="OK")) == 1
    # The histogram's +Inf bucket counts every observation.
    inf = rpc("IngestSessions", grpc_code="OK", le="+Inf")
    assert delta("grpc_server_handling_seconds_bucket", **inf) == 2
    assert delta("session_audit_ingest_sessions_total", outcome="written") == 2
    assert delta("session_audit_ingest_sessions_total", outcome="rejected") == 1
    assert delta("session_audit_ingest_sessions_total", outcome="unchanged") == 2
    # Four authenticated calls: each is a cache hit or a miss; the first sight of a new token
    # is a miss.
    hits = delta("session_audit_token_cache_hits_total")
    misses = delta("session_audit_token_cache_misses_total")
    assert hits + misses == 4 and misses >= 1
    # Pools: the server holds its two (DB_POOL_MAX 10 by default; ingest gets half).
    assert value(after, "session_audit_db_pool_max", pool="pool") == 10
    assert value(after, "session_audit_db_pool_max", pool="ingest_pool") == 5
    assert value(after, "session_audit_db_pool_size", pool="pool") >= 1
    assert value(after, "session_audit_db_pool_waiting", pool="pool") == 0

    # Envoy saw exactly the two REST requests on its `rest` listener, and sent them upstream.
    def envoy_moved() -> None:
        now = envoy_stats(stack)

        def d(name: str, **labels: str) -> float:
            return value(now, name, **labels) - value(envoy_before, name, **labels)

        assert d("envoy_http_downstream_rq_total", envoy_http_conn_manager_prefix="rest") == 2
        assert d("envoy_cluster_upstream_rq_total", envoy_cluster_name="session_audit_grpc") == 2

    eventually(envoy_moved)


def test_envoy_metrics_port_serves_nothing_else_of_the_admin(stack: Stack) -> None:
    base = f"http://127.0.0.1:{stack.envoy_metrics_port}"
    for path in ("/", "/stats", "/config_dump", "/clusters", "/server_info", "/stats/prometheus/"):
        assert httpx.get(base + path).status_code == 404, path
    for path in ("/quitquitquit", "/healthcheck/fail", "/stats/prometheus"):
        assert httpx.post(base + path).status_code == 404, path
    # Still up, still answering.
    assert stack.envoy_proc.poll() is None
    assert (
        stack.rest(
            "GET", "/api/sessions?limit=1", stack.token(stack.new_org(), "admin")
        ).status_code
        == 200
    )


def test_metrics_with_two_workers_are_the_sum_of_both(stack: Stack) -> None:
    metrics_port = free_port()
    server = ServerProcess(
        stack.dsn, stack.server.workdir, {"WORKERS": "2", "METRICS_PORT": str(metrics_port)}
    ).start()
    try:
        workers = eventually(lambda: _two(server.children()))
        dirs = {psutil.Process(pid).environ().get("PROMETHEUS_MULTIPROC_DIR") for pid in workers}
        assert len(dirs) == 1 and None not in dirs
        (metrics_dir,) = dirs
        assert metrics_dir is not None and Path(metrics_dir).is_dir()
        token = stack.token(stack.new_org(), "auditor")
        # A new connection per call, so the kernel spreads them over both workers.
        for _ in range(8):
            with grpc.insecure_channel(server.target) as ch:
                from session_audit.v1 import sessions_pb2_grpc

                sessions_pb2_grpc.SessionServiceStub(ch).ListSessions(
                    pb.ListSessionsRequest(limit=1), metadata=auth_md(token)
                )
        url = f"http://127.0.0.1:{metrics_port}/metrics"

        def summed() -> Samples:
            got = scrape(url)
            assert (
                value(got, "grpc_server_handled_total", **rpc("ListSessions", grpc_code="OK")) == 8
            )
            # Each worker has its own pool of at most 10: the live sum is 20.
            assert value(got, "session_audit_db_pool_max", pool="pool") == 20
            return got

        eventually(summed)
        # Both workers wrote their own files.
        files = list(Path(metrics_dir).glob("counter_*.db"))
        assert len(files) == 2, files
    finally:
        assert server.stop() == 0
    assert not Path(metrics_dir).exists()


def _two(pids: list[int]) -> list[int]:
    assert len(pids) == 2
    return pids


# -- logs --------------------------------------------------------------------------------------


def json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def access_line(stack: Stack, request_id: str) -> dict[str, Any]:
    log = stack.server.workdir / f"server-{stack.server.port}.log"
    found = [
        x for x in json_lines(log) if x.get("request_id") == request_id and x["event"] == "rpc"
    ]
    assert len(found) == 1, found
    return found[0]


def envoy_line(stack: Stack, request_id: str) -> dict[str, Any]:
    log = stack.server.workdir / f"envoy-{stack.http_port}-access.log"
    found = [x for x in json_lines(log) if x.get("request_id") == request_id]
    assert len(found) == 1, found
    return found[0]


def test_rest_request_id_and_traceparent_are_logged_on_both_sides_and_returned(
    stack: Stack,
) -> None:
    org = stack.new_org("logs")
    token = stack.token(org, "auditor")
    secret = f"SELECT 'session-content-{uuid.uuid4().hex}'"
    admin = stack.token(org, "admin")
    spec = Spec(script=secret)
    assert stack.ingest(admin, [spec.to_proto()]).written == 1
    # The content went through both (and must not reach their logs, below).
    assert secret in stack.rest("GET", f"/api/sessions/{spec.id}", token).text
    (org_id,) = [r["id"] for r in stack.sql("SELECT id FROM orgs WHERE name = $1", org)]

    # Envoy makes the request id; the caller gets it back; both sides log it.
    r = stack.rest("GET", "/api/sessions?limit=5", token, headers={"traceparent": TRACEPARENT})
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    uuid.UUID(rid)
    line = eventually(lambda: access_line(stack, rid))
    assert line["method"] == f"/{SESSIONS}/ListSessions"
    assert line["org_id"] == str(org_id) and line["role"] == "auditor"
    assert line["status"] == "OK" and isinstance(line["duration_ms"], float)
    assert line["traceparent"] == TRACEPARENT
    assert line["logger"] == "session_audit.access" and line["level"] == "info"
    edge = eventually(lambda: envoy_line(stack, rid))
    assert edge["traceparent"] == TRACEPARENT
    assert (edge["method"], edge["path"], edge["status"]) == ("GET", "/api/sessions", 200)

    # A caller's own request id is kept, also on errors; one header, not two.
    mine = f"req-{uuid.uuid4().hex}"
    r = stack.rest("GET", "/api/sessions/nope", token, headers={"x-request-id": mine})
    assert r.status_code == 400
    assert r.headers.get_list("x-request-id") == [mine]
    assert eventually(lambda: access_line(stack, mine))["status"] == "INVALID_ARGUMENT"
    assert eventually(lambda: envoy_line(stack, mine))["status"] == 400

    # Neither log holds a token or session content.
    server_log = (stack.server.workdir / f"server-{stack.server.port}.log").read_text()
    envoy_log = (stack.server.workdir / f"envoy-{stack.http_port}-access.log").read_text()
    for text in (server_log, envoy_log):
        assert token not in text and admin not in text
        assert secret not in text and "session-content-" not in text


def test_grpc_caller_gets_a_request_id_in_the_trailers(stack: Stack) -> None:
    token = stack.token(stack.new_org(), "auditor")
    stub = stack.stub()
    _, call = stub.ListSessions.with_call(pb.ListSessionsRequest(limit=1), metadata=auth_md(token))
    made = dict(call.trailing_metadata())["x-request-id"]
    uuid.UUID(made)
    assert eventually(lambda: access_line(stack, made))["role"] == "auditor"
    mine = f"grpc-{uuid.uuid4().hex}"
    md = [*auth_md(token), ("x-request-id", mine), ("traceparent", TRACEPARENT)]
    with pytest.raises(grpc.RpcError) as err:
        stub.GetSession(pb.GetSessionRequest(id=str(uuid.uuid4())), metadata=md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert dict(err.value.trailing_metadata())["x-request-id"] == mine
    line = eventually(lambda: access_line(stack, mine))
    assert (line["status"], line["traceparent"]) == ("NOT_FOUND", TRACEPARENT)
    # A request id that is not a plain token is replaced, not logged as sent.
    _, call = stub.ListSessions.with_call(
        pb.ListSessionsRequest(limit=1), metadata=[*auth_md(token), ("x-request-id", "a b/c")]
    )
    uuid.UUID(dict(call.trailing_metadata())["x-request-id"])


def test_log_format_choice() -> None:
    class Tty:
        def isatty(self) -> bool:
            return True

    class Pipe:
        def isatty(self) -> bool:
            return False

    assert logs.log_format({}, Tty()) == "text"
    assert logs.log_format({}, Pipe()) == "json"
    assert logs.log_format({"LOG_FORMAT": "TEXT"}, Pipe()) == "text"
    assert logs.log_format({"LOG_FORMAT": "json"}, Tty()) == "json"
    with pytest.raises(ValueError, match="LOG_FORMAT: expected json or text, got 'xml'"):
        logs.log_format({"LOG_FORMAT": "xml"}, Tty())


def test_traceparent_validation() -> None:
    assert logs.traceparent(TRACEPARENT) == TRACEPARENT
    for bad in ("", "00-abc", TRACEPARENT.upper(), "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
                "ff" + TRACEPARENT[2:], TRACEPARENT + "-extra"):  # fmt: skip
        assert logs.traceparent(bad) is None, bad


def test_report_generation_is_counted(stack: Stack) -> None:
    from session_audit.client import Client

    token = stack.token(stack.new_org("metrics-report"), "admin")
    ready = {"outcome": "ready"}
    before = server_metrics(stack)
    with Client(stack.grpc_target, token=token) as c:
        assert c.wait_report(c.create_report(), poll=0.05).status == "ready"
    after = eventually(lambda: _generated(stack, before))
    assert value(after, "session_audit_report_generation_seconds_sum", **ready) > value(
        before, "session_audit_report_generation_seconds_sum", **ready
    )
    # The queue depth is published (sampled from the reports table every poll).
    assert ("session_audit_report_queue_depth", frozenset()) in after
    assert value(after, "session_audit_report_generation_failures_total") == value(
        before, "session_audit_report_generation_failures_total"
    )


def _generated(stack: Stack, before: Samples) -> Samples:
    now = server_metrics(stack)
    name = "session_audit_report_generation_seconds_count"
    assert value(now, name, outcome="ready") - value(before, name, outcome="ready") >= 1
    return now


def test_a_statement_timeout_is_counted_once(stack: Stack) -> None:
    """Issue 13: session_audit_db_statement_timeouts_total{source="rpc"} counts the calls whose
    statement the deadline cut short. A server with QUERY_TIMEOUT_SECONDS=1; the test holds an
    ACCESS EXCLUSIVE lock on sessions, so a ListSessions without a deadline of its own waits
    on it until the 1 s bound cancels it: DEADLINE_EXCEEDED, and the counter goes up by exactly
    one; the calls before and after the lock leave it alone."""
    import asyncio

    from session_audit.core import db
    from session_audit.v1 import sessions_pb2_grpc

    metrics_port = free_port()
    server = ServerProcess(stack.dsn, stack.server.workdir, {
        "QUERY_TIMEOUT_SECONDS": "1", "METRICS_PORT": str(metrics_port),
        "RETENTION_PURGE": "0", "REPORT_SCHEDULER": "0",
    }).start()  # fmt: skip
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    token = stack.token(stack.new_org("timeout"), "auditor")

    def list_sessions() -> tuple[grpc.StatusCode, float]:
        t0 = time.monotonic()
        with grpc.insecure_channel(server.target) as ch:
            try:
                sessions_pb2_grpc.SessionServiceStub(ch).ListSessions(
                    pb.ListSessionsRequest(limit=1), metadata=auth_md(token)
                )
                return grpc.StatusCode.OK, time.monotonic() - t0
            except grpc.RpcError as err:
                return err.code(), time.monotonic() - t0

    async def locked_call() -> tuple[grpc.StatusCode, float]:
        blocker = await db.connect(stack.dsn)
        try:
            async with blocker.transaction():
                await blocker.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
                return await asyncio.to_thread(list_sessions)
        finally:
            await blocker.close()

    def timeouts() -> float:
        return value(scrape(url), "session_audit_db_statement_timeouts_total", source="rpc")

    try:
        assert list_sessions()[0] == grpc.StatusCode.OK  # the token is cached from here on
        before = timeouts()
        code, took = asyncio.run(locked_call())
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.9 < took < 3.0
        assert list_sessions()[0] == grpc.StatusCode.OK
        assert timeouts() - before == 1
    finally:
        server.stop()
