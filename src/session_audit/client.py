"""A typed Python client for the Session Audit Service over gRPC: `Client` (blocking) and
`AsyncClient` (asyncio), with the same methods.

    from session_audit.client import Client
    with Client("127.0.0.1:50051", token=TOKEN) as c:
        print(c.ingest(sessions).written)              # any iterable, streamed in chunks
        for s in c.sessions(connection="pg-prod"):     # every page, by cursor
            print(s.id)
        c.download_report(c.wait_report(c.create_report({"protocol": "ssh"})).id, "pdf", ".")

Every method takes `token=` (else the client's) and `timeout=` (seconds, the call's deadline;
else the client's default). Failures raise `grpc.RpcError`; `.code()` is the status
(INVALID_ARGUMENT for bad input, with the parameter named in `.details()`).

Retries are grpc's own, from the service config below: UNAVAILABLE (the database or server
is down for a moment) is retried on every method with exponential backoff, and ABORTED too
on the ingest methods (a write that lost a conflict; ingest is an idempotent upsert by id).
A client-streamed ingest is retried only while what was sent fits grpc's retry buffer
(256 KiB by default); past that a failure is returned to the caller, who may resend: sending
the same sessions again changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from session_audit.v1 import analytics_pb2 as apb
from session_audit.v1 import analytics_pb2_grpc as apb_grpc
from session_audit.v1 import reports_pb2 as rpb
from session_audit.v1 import reports_pb2_grpc as rpb_grpc
from session_audit.v1 import sessions_pb2 as pb
from session_audit.v1 import sessions_pb2_grpc as pb_grpc

SESSIONS = "session_audit.v1.SessionService"
REPORTS = "session_audit.v1.ReportService"
ANALYTICS = "session_audit.v1.AnalyticsService"
_BACKOFF = {"initialBackoff": "0.1s", "maxBackoff": "2s", "backoffMultiplier": 2}
SERVICE_CONFIG: dict[str, Any] = {
    "methodConfig": [
        {
            "name": [{"service": SESSIONS}, {"service": REPORTS}, {"service": ANALYTICS}],
            "retryPolicy": {
                "maxAttempts": 5, **_BACKOFF, "retryableStatusCodes": ["UNAVAILABLE"]
            },
        },
        {
            # The most specific name wins: these two also retry ABORTED.
            "name": [
                {"service": SESSIONS, "method": "IngestSessions"},
                {"service": SESSIONS, "method": "StreamIngestSessions"},
            ],
            "retryPolicy": {
                "maxAttempts": 5, **_BACKOFF,
                "retryableStatusCodes": ["UNAVAILABLE", "ABORTED"],
            },
        },
    ]
}  # fmt: skip
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    ("grpc.enable_retries", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
# Sessions per streamed message (the server's unary limit is 1000 per request).
CHUNK = 500
PAGE = 100


class ReportFailed(Exception):
    """The report's generation failed; `report.failure` says why."""

    def __init__(self, report: rpb.Report) -> None:
        super().__init__(f"report {report.id} failed: {report.failure}")
        self.report = report


@dataclass(frozen=True)
class Rejection:
    index: int  # position in the iterable given to ingest()
    id: str
    reason: str


@dataclass
class IngestResult:
    accepted: int = 0
    written: int = 0
    unchanged: int = 0
    rejected: int = 0
    rejections: list[Rejection] = field(default_factory=list)

    @classmethod
    def of(cls, reply: pb.IngestSessionsResponse) -> IngestResult:
        return cls(
            reply.accepted, reply.written, reply.unchanged, reply.rejected,
            [Rejection(r.index, r.id, r.reason) for r in reply.rejections],
        )  # fmt: skip


def _chunks(sessions: Iterable[pb.Session], size: int) -> Iterator[pb.IngestSessionsRequest]:
    batch: list[pb.Session] = []
    for s in sessions:
        batch.append(s)
        if len(batch) >= size:
            yield pb.IngestSessionsRequest(sessions=batch)
            batch = []
    if batch:
        yield pb.IngestSessionsRequest(sessions=batch)


async def _achunks(
    sessions: Iterable[pb.Session] | AsyncIterable[pb.Session], size: int
) -> AsyncIterator[pb.IngestSessionsRequest]:
    if not isinstance(sessions, AsyncIterable):
        for chunk in _chunks(sessions, size):
            yield chunk
        return
    batch: list[pb.Session] = []
    async for s in sessions:
        batch.append(s)
        if len(batch) >= size:
            yield pb.IngestSessionsRequest(sessions=batch)
            batch = []
    if batch:
        yield pb.IngestSessionsRequest(sessions=batch)


LIST_FILTERS = (
    "user", "connection", "type", "correlation_id", "jira_issue_key", "start_date", "end_date",
)  # fmt: skip


def _list_request(
    page_size: int, page_token: str, filters: Mapping[str, str]
) -> pb.ListSessionsRequest:
    """ListSessionsRequest fields, plus review_approver / review_status for the review."""
    req = pb.ListSessionsRequest(limit=page_size, count="none", page_token=page_token)
    for name, value in filters.items():
        if name in ("review_approver", "review_status"):
            setattr(req.review, name.removeprefix("review_"), value)
        elif name in LIST_FILTERS:
            setattr(req, name, value)
        else:
            raise TypeError(f"sessions(): unknown filter {name!r}")
    return req


def _create_request(
    criteria: Mapping[str, str] | None,
    defined_report_id: str,
    title: str,
    query_filter: str,
    query_order: str,
) -> rpb.CreateReportRequest:
    return rpb.CreateReportRequest(
        criteria=[rpb.Criterion(field=k, value=v) for k, v in (criteria or {}).items()],
        defined_report_id=defined_report_id, title=title,
        query_filter=query_filter, query_order=query_order,
    )  # fmt: skip


_FILENAME = re.compile(r'filename="([^"/\\]+)"')


def _target_file(dest: str | Path, report_id: str, fmt: str, disposition: str) -> Path:
    path = Path(dest)
    if not path.is_dir():
        return path
    found = _FILENAME.search(disposition)
    return path / (found.group(1) if found else f"report-{report_id}.{fmt}")


def _disposition(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "content-disposition":
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


class _Base:
    def __init__(self, token: str | None, timeout: float | None) -> None:
        self.token = token
        self.timeout = timeout

    def _md(self, token: str | None) -> list[tuple[str, str]]:
        tok = token or self.token
        return [("authorization", f"Bearer {tok}")] if tok else []

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


class Client(_Base):
    """Blocking client. `target` is host:port of the gRPC server; give `credentials` for TLS."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        *,
        timeout: float | None = 60.0,
        credentials: grpc.ChannelCredentials | None = None,
        options: Iterable[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(token, timeout)
        opts = [*CHANNEL_OPTIONS, *options]
        self.channel = (
            grpc.secure_channel(target, credentials, opts)
            if credentials is not None
            else grpc.insecure_channel(target, opts)
        )
        self._sessions = pb_grpc.SessionServiceStub(self.channel)
        self._reports = rpb_grpc.ReportServiceStub(self.channel)
        self._analytics = apb_grpc.AnalyticsServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- sessions -------------------------------------------------------------------------------
    def ingest(
        self,
        sessions: Iterable[pb.Session],
        *,
        chunk: int = CHUNK,
        token: str | None = None,
        timeout: float | None = None,
    ) -> IngestResult:
        """Stream any number of sessions (the server commits every 5,000 items); rejected items
        are reported by their position in `sessions`, the others are stored."""
        reply = self._sessions.StreamIngestSessions(
            _chunks(sessions, chunk), metadata=self._md(token), timeout=self._deadline(timeout)
        )
        return IngestResult.of(reply)

    def sessions(
        self,
        *,
        page_size: int = PAGE,
        token: str | None = None,
        timeout: float | None = None,
        **filters: str,
    ) -> Iterator[pb.Session]:
        """Every matching session, newest first, page by page. Filters are ListSessionsRequest
        fields (user, connection, type, correlation_id, jira_issue_key, start_date, end_date)
        and review_approver / review_status. `timeout` applies to each page."""
        page_token = ""
        while True:
            reply: pb.ListSessionsResponse = self._sessions.ListSessions(
                _list_request(page_size, page_token, filters),
                metadata=self._md(token), timeout=self._deadline(timeout),
            )  # fmt: skip
            yield from reply.data
            if not reply.has_next_page or not reply.next_page_token:
                return
            page_token = reply.next_page_token

    def session(
        self, id: str, *, token: str | None = None, timeout: float | None = None
    ) -> pb.Session:
        reply: pb.Session = self._sessions.GetSession(
            pb.GetSessionRequest(id=id), metadata=self._md(token), timeout=self._deadline(timeout)
        )
        return reply

    # -- analytics ------------------------------------------------------------------------------
    def report(
        self, *, token: str | None = None, timeout: float | None = None, **params: str
    ) -> apb.SessionReport:
        """Redaction totals (SessionReportRequest fields: start_date, end_date, group_by, ...)."""
        reply: apb.SessionReport = self._analytics.GetSessionReport(
            apb.SessionReportRequest(**params),
            metadata=self._md(token), timeout=self._deadline(timeout),
        )  # fmt: skip
        return reply

    def histogram(
        self, field: str, *, token: str | None = None, timeout: float | None = None,
        **params: Any,
    ) -> apb.HistogramResponse:  # fmt: skip
        """Sessions over time (HistogramRequest fields: bin_size, start, end, size, q, ...)."""
        reply: apb.HistogramResponse = self._analytics.GetSessionHistogram(
            apb.HistogramRequest(field=field, **params),
            metadata=self._md(token), timeout=self._deadline(timeout),
        )  # fmt: skip
        return reply

    def stats(
        self, field: str, *, token: str | None = None, timeout: float | None = None,
        **params: Any,
    ) -> apb.SessionStatsResponse:  # fmt: skip
        """Top values of a field (SessionStatsRequest fields: sub_fields, size, q, start, ...)."""
        reply: apb.SessionStatsResponse = self._analytics.GetSessionStats(
            apb.SessionStatsRequest(field=field, **params),
            metadata=self._md(token), timeout=self._deadline(timeout),
        )  # fmt: skip
        return reply

    # -- reports --------------------------------------------------------------------------------
    def create_report(
        self,
        criteria: Mapping[str, str] | None = None,
        *,
        defined_report_id: str = "",
        title: str = "",
        query_filter: str = "",
        query_order: str = "",
        token: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """Start generating a report; returns its id at once."""
        reply: rpb.CreateReportResponse = self._reports.CreateReport(
            _create_request(criteria, defined_report_id, title, query_filter, query_order),
            metadata=self._md(token), timeout=self._deadline(timeout),
        )  # fmt: skip
        return reply.report.id

    def get_report(
        self, id: str, *, token: str | None = None, timeout: float | None = None
    ) -> rpb.Report:
        reply: rpb.GetReportResponse = self._reports.GetReport(
            rpb.GetReportRequest(id=id), metadata=self._md(token), timeout=self._deadline(timeout)
        )
        return reply.report

    def wait_report(
        self, id: str, *, within: float = 600.0, poll: float = 0.5, token: str | None = None
    ) -> rpb.Report:
        """Poll until the report is ready (returned) or failed (ReportFailed); TimeoutError
        after `within` seconds."""
        deadline = time.monotonic() + within
        while True:
            rep = self.get_report(id, token=token)
            if rep.status == "ready":
                return rep
            if rep.status == "failed":
                raise ReportFailed(rep)
            if time.monotonic() + poll > deadline:
                raise TimeoutError(f"report {id}: still {rep.status} after {within:.0f} s")
            time.sleep(poll)

    def download_report(
        self,
        id: str,
        fmt: str,
        dest: str | Path,
        *,
        token: str | None = None,
        timeout: float | None = None,
    ) -> Path:
        """Write the report as csv, pdf or html to `dest` (a file, or a directory where the
        server's file name is used). Returns the file written."""
        call = self._reports.DownloadReport(
            rpb.DownloadReportRequest(id=id, format=fmt),
            metadata=self._md(token), timeout=self._deadline(timeout),
        )  # fmt: skip
        target = _target_file(dest, id, fmt, _disposition(call.initial_metadata()))
        with open(target, "wb") as out:
            for part in call:
                out.write(part.data)
        return target


class AsyncClient(_Base):
    """asyncio client (grpc.aio); use `async with`, and create it inside the running loop."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        *,
        timeout: float | None = 60.0,
        credentials: grpc.ChannelCredentials | None = None,
        options: Iterable[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(token, timeout)
        opts = [*CHANNEL_OPTIONS, *options]
        self.channel = (
            grpc.aio.secure_channel(target, credentials, opts)
            if credentials is not None
            else grpc.aio.insecure_channel(target, opts)
        )
        self._sessions = pb_grpc.SessionServiceStub(self.channel)
        self._reports = rpb_grpc.ReportServiceStub(self.channel)
        self._analytics = apb_grpc.AnalyticsServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def ingest(
        self,
        sessions: Iterable[pb.Session] | AsyncIterable[pb.Session],
        *,
        chunk: int = CHUNK,
        token: str | None = None,
        timeout: float | None = None,
    ) -> IngestResult:
        reply = await self._sessions.StreamIngestSessions(
            _achunks(sessions, chunk), metadata=self._md(token), timeout=self._deadline(timeout)
        )
        return IngestResult.of(reply)

    async def sessions(
        self,
        *,
        page_size: int = PAGE,
        token: str | None = None,
        timeout: float | None = None,
        **filters: str,
    ) -> AsyncIterator[pb.Session]:
        page_token = ""
        while True:
            reply: pb.ListSessionsResponse = await self._sessions.ListSessions(
                _list_request(page_size, page_token, filters),
                metadata=self._md(token), timeout=self._deadline(timeout),
            )  # fmt: skip
            for s in reply.data:
                yield s
            if not reply.has_next_page or not reply.next_page_token:
                return
            page_token = reply.next_page_token

    async def session(
        self, id: str, *, token: str | None = None, timeout: float | None = None
    ) -> pb.Session:
        reply: pb.Session = await self._sessions.GetSession(
            pb.GetSessionRequest(id=id), metadata=self._md(token), timeout=self._deadline(timeout)
        )
        return reply

    async def report(
        self, *, token: str | None = None, timeout: float | None = None, **params: str
    ) -> apb.SessionReport:
        reply: apb.SessionReport = await self._analytics.GetSessionReport(
            apb.SessionReportRequest(**params),
            metadata=self._md(token), timeout=self._deadline(timeout),
        )  # fmt: skip
        return reply

    async def histogram(
        self, field: str, *, token: str | None = None, timeout: float | None = None,
        **params: Any,
    ) -> apb.HistogramResponse:  # fmt: skip
        reply: apb.HistogramResponse = await self._analytics.GetSessionHistogram(
            apb.HistogramRequest(field=field, **params),
            metadata=self._md(token), timeout=self._deadline(timeout),
        )  # fmt: skip
        return reply

    async def stats(
        self, field: str, *, token: str | None = None, timeout: float | None = None,
        **params: Any,
    ) -> apb.SessionStatsResponse:  # fmt: skip
        reply: apb.SessionStatsResponse = await self._analytics.GetSessionStats(
            apb.SessionStatsRequest(field=field, **params),
            metadata=self._md(token), timeout=self._deadline(timeout),
        )  # fmt: skip
        return reply

    async def create_report(
        self,
        criteria: Mapping[str, str] | None = None,
        *,
        defined_report_id: str = "",
        title: str = "",
        query_filter: str = "",
        query_order: str = "",
        token: str | None = None,
        timeout: float | None = None,
    ) -> str:
        reply: rpb.CreateReportResponse = await self._reports.CreateReport(
            _create_request(criteria, defined_report_id, title, query_filter, query_order),
            metadata=self._md(token), timeout=self._deadline(timeout),
        )  # fmt: skip
        return reply.report.id

    async def get_report(
        self, id: str, *, token: str | None = None, timeout: float | None = None
    ) -> rpb.Report:
        reply: rpb.GetReportResponse = await self._reports.GetReport(
            rpb.GetReportRequest(id=id), metadata=self._md(token), timeout=self._deadline(timeout)
        )
        return reply.report

    async def wait_report(
        self, id: str, *, within: float = 600.0, poll: float = 0.5, token: str | None = None
    ) -> rpb.Report:
        deadline = time.monotonic() + within
        while True:
            rep = await self.get_report(id, token=token)
            if rep.status == "ready":
                return rep
            if rep.status == "failed":
                raise ReportFailed(rep)
            if time.monotonic() + poll > deadline:
                raise TimeoutError(f"report {id}: still {rep.status} after {within:.0f} s")
            await asyncio.sleep(poll)

    async def download_report(
        self,
        id: str,
        fmt: str,
        dest: str | Path,
        *,
        token: str | None = None,
        timeout: float | None = None,
    ) -> Path:
        call = self._reports.DownloadReport(
            rpb.DownloadReportRequest(id=id, format=fmt),
            metadata=self._md(token), timeout=self._deadline(timeout),
        )  # fmt: skip
        target = _target_file(dest, id, fmt, _disposition(await call.initial_metadata()))
        with open(target, "wb") as out:  # noqa: ASYNC230 - small local writes between chunks
            async for part in call:
                out.write(part.data)
        return target
