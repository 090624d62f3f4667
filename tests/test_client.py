"""session_audit.client against the real server: streamed ingest with per-item rejections,
every page by cursor, analytics, the Reports API down to a file; the retry policy against a
small gRPC server that fails on purpose (the real one cannot be made to fail on cue)."""

from __future__ import annotations

import asyncio
import csv
import re
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from session_audit.client import AsyncClient, Client, ReportFailed
from session_audit.v1 import sessions_pb2 as pb
from session_audit.v1 import sessions_pb2_grpc as pb_grpc
from tests.factories import T0, Spec
from tests.support import ROOT, Stack


def specs(n: int, bad: set[int]) -> tuple[list[pb.Session], list[Spec]]:
    """n closed sessions, one a minute, across three connections, with redactions (counted by
    the day they ended); those at `bad` lack a start date."""
    messages, good = [], []
    for i in range(n):
        start = T0 + timedelta(minutes=i)
        spec = Spec(start=start, end=start + timedelta(minutes=5), connection=f"conn-{i % 3}",
                    redactions=(("EMAIL", i % 4, 10 * (i % 4)),))  # fmt: skip
        message = spec.to_proto()
        if i in bad:
            message.ClearField("start_date")
        else:
            good.append(spec)
        messages.append(message)
    return messages, good


def test_sync_client_ingests_lists_and_downloads(stack: Stack, tmp_path: Path) -> None:
    org = stack.new_org("client")
    admin = stack.token(org, "admin")
    auditor = stack.token(org, "auditor")
    messages, good = specs(1203, bad={7, 1100})
    consumed: list[int] = []

    def lazily() -> Iterator[pb.Session]:
        for i, m in enumerate(messages):
            consumed.append(i)
            yield m

    with Client(stack.grpc_target, token=admin) as c:
        result = c.ingest(lazily(), chunk=500)
        assert len(consumed) == 1203
        assert (result.written, result.unchanged, result.rejected) == (1201, 0, 2)
        assert [r.index for r in result.rejections] == [7, 1100]
        assert [r.id for r in result.rejections] == [messages[7].id, messages[1100].id]
        assert all("start_date" in r.reason for r in result.rejections)
        # Idempotent: the same again changes nothing.
        assert c.ingest(messages).unchanged == 1201

        # Every page by cursor (13 pages of 100), newest first; the token of this call only.
        listed = [s.id for s in c.sessions(token=auditor)]
        expected = [s.id for s in sorted(good, key=lambda s: s.start, reverse=True)]
        assert listed == expected
        conn1 = [s.id for s in c.sessions(connection="conn-1", page_size=7)]
        assert conn1 == [s.id for s in sorted(good, key=lambda s: s.start, reverse=True)
                         if s.connection == "conn-1"]  # fmt: skip
        assert c.session(good[0].id).connection == "conn-0"

        # Analytics, against counts made here.
        start, end = T0.isoformat(), (T0 + timedelta(days=2)).isoformat()
        stats = c.stats("connection", start=start, end=end, size=5)
        counts = {v.value: v.count for v in stats.body.values}
        assert counts == {f"conn-{k}": sum(1 for s in good if s.connection == f"conn-{k}")
                          for k in range(3)}  # fmt: skip
        hist = c.histogram("connection", bin_size="day", start=start, end=end)
        assert sum(b.start_count for b in hist.body.buckets) == len(good)
        report = c.report(start_date=T0.date().isoformat(),
                          end_date=(T0 + timedelta(days=2)).date().isoformat())  # fmt: skip
        assert report.total_redact_count == sum(s.redactions[0][1] for s in good)

        # Reports: create, wait, download into a directory (the server's file name) and a file.
        rid = c.create_report(title="Everything", token=auditor)
        ready = c.wait_report(rid, poll=0.1)
        assert ready.status == "ready" and ready.rows == len(good)
        path = c.download_report(rid, "csv", tmp_path)
        assert path.parent == tmp_path and path.suffix == ".csv"
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        assert sorted(r[0] for r in rows[1:]) == sorted(s.id for s in good)
        pdf = c.download_report(rid, "pdf", tmp_path / "r.pdf")
        assert pdf.read_bytes().startswith(b"%PDF-")

        # Per-call deadline and token.
        with pytest.raises(grpc.RpcError) as err:
            list(c.sessions(timeout=0.000001))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.RpcError) as err:
            c.create_report(token="sat_" + "x" * 43)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(TypeError, match="unknown filter 'colour'"):
            list(c.sessions(colour="red"))


def test_wait_report_raises_when_generation_fails(stack: Stack) -> None:
    org = stack.new_org("client-fail")
    admin = stack.token(org, "admin")
    with Client(stack.grpc_target, token=admin) as c:
        rid = c.create_report()
        c.wait_report(rid, poll=0.1)
        # A ready report is failed by nobody; make a failed one as the generator would.
        stack.sql("UPDATE reports SET status = 'failed', failure = 'boom' WHERE id = $1", int(rid))
        with pytest.raises(ReportFailed, match=f"report {rid} failed: boom"):
            c.wait_report(rid)


def test_async_client(stack: Stack, tmp_path: Path) -> None:
    org = stack.new_org("aclient")
    admin = stack.token(org, "admin")
    messages, good = specs(30, bad={3})

    async def stream() -> AsyncIterator[pb.Session]:
        for m in messages:
            yield m

    async def go() -> None:
        async with AsyncClient(stack.grpc_target, token=admin, timeout=30) as c:
            result = await c.ingest(stream(), chunk=4)
            assert (result.written, result.rejected) == (29, 1)
            assert [r.index for r in result.rejections] == [3]
            listed = [s.id async for s in c.sessions(page_size=4)]
            assert listed == [s.id for s in sorted(good, key=lambda s: s.start, reverse=True)]
            stats = await c.stats("connection", start=T0.isoformat(),
                                  end=(T0 + timedelta(days=1)).isoformat())  # fmt: skip
            assert sum(v.count for v in stats.body.values) == 29
            rid = await c.create_report()
            assert (await c.wait_report(rid, poll=0.1)).rows == 29
            html = await c.download_report(rid, "html", tmp_path / "r.html")
            assert b"<table" in html.read_bytes()

    asyncio.run(go())


# -- retries: grpc's own, from the client's service config ---------------------------------


class Flaky(pb_grpc.SessionServiceServicer):
    """Fails the first `failures` calls of each method with `code`, then answers."""

    def __init__(self, code: grpc.StatusCode, failures: int) -> None:
        self.code = code
        self.failures = failures
        self.calls: dict[str, int] = {}

    async def _maybe_fail(self, name: str, context: grpc.aio.ServicerContext) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] <= self.failures:
            await context.abort(self.code, f"{name}: try again")

    async def ListSessions(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._maybe_fail("ListSessions", context)
        return pb.ListSessionsResponse()

    async def StreamIngestSessions(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        n = 0
        async for chunk in requests:
            n += len(chunk.sessions)
        await self._maybe_fail("StreamIngestSessions", context)
        return pb.IngestSessionsResponse(accepted=n, written=n)

    async def _unused(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this stub")

    GetSession = IngestSessions = IngestSessionsJson = _unused


def with_flaky(code: grpc.StatusCode, failures: int, body: Any) -> dict[str, int]:
    async def go() -> dict[str, int]:
        server = grpc.aio.server()
        flaky = Flaky(code, failures)
        pb_grpc.add_SessionServiceServicer_to_server(flaky, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            await asyncio.get_running_loop().run_in_executor(None, body, f"127.0.0.1:{port}")
        finally:
            await server.stop(None)
        return flaky.calls

    return asyncio.run(go())


def test_unavailable_is_retried_with_backoff() -> None:
    def body(target: str) -> None:
        with Client(target, token="t", timeout=10) as c:
            assert list(c.sessions()) == []
            assert c.ingest([Spec().to_proto()]).written == 1

    calls = with_flaky(grpc.StatusCode.UNAVAILABLE, 2, body)
    assert calls == {"ListSessions": 3, "StreamIngestSessions": 3}


def test_aborted_is_retried_on_ingest_only() -> None:
    seen: list[grpc.StatusCode] = []

    def body(target: str) -> None:
        with Client(target, token="t", timeout=10) as c:
            assert c.ingest([Spec().to_proto()]).written == 1
            with pytest.raises(grpc.RpcError) as err:
                list(c.sessions())
            seen.append(err.value.code())

    calls = with_flaky(grpc.StatusCode.ABORTED, 1, body)
    assert calls == {"StreamIngestSessions": 2, "ListSessions": 1}
    assert seen == [grpc.StatusCode.ABORTED]


def test_invalid_argument_is_never_retried() -> None:
    def body(target: str) -> None:
        with Client(target, token="t", timeout=10) as c, pytest.raises(grpc.RpcError) as err:
            c.ingest([Spec().to_proto()])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    assert with_flaky(grpc.StatusCode.INVALID_ARGUMENT, 5, body) == {"StreamIngestSessions": 1}


def test_retries_give_up_after_five_attempts() -> None:
    def body(target: str) -> None:
        with Client(target, token="t", timeout=20) as c, pytest.raises(grpc.RpcError) as err:
            list(c.sessions())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    assert with_flaky(grpc.StatusCode.UNAVAILABLE, 100, body) == {"ListSessions": 5}


def test_the_documented_example_runs(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The five lines of docs/operability.md (the README's client example), as written."""
    text = (ROOT / "docs" / "operability.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(snippet.strip().splitlines()) == 5
    token = stack.token(stack.new_org("example"), "admin")
    sessions = [Spec(connection="pg-prod", subtype="ssh").to_proto() for _ in range(3)]
    monkeypatch.chdir(tmp_path)
    code = snippet.replace("127.0.0.1:50051", stack.grpc_target)
    exec(compile(code, "docs/operability.md", "exec"), {"TOKEN": token, "sessions": sessions})  # noqa: S102
    (pdf,) = tmp_path.glob("*.pdf")
    assert pdf.read_bytes().startswith(b"%PDF-")
