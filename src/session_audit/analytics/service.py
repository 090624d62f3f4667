"""AnalyticsService: composes validation, the SQL layer and the mapping per RPC."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import ParamSpec, TypeVar

import grpc
from google.api import httpbody_pb2

from session_audit.analytics import requests, rows, store
from session_audit.core.app import App
from session_audit.core.auth import READERS
from session_audit.core.rpc import caller, roles
from session_audit.v1 import analytics_pb2 as pb
from session_audit.v1 import analytics_pb2_grpc as pb_grpc

JSON = "application/json"
# A histogram answer with at least this many counts (bins × (1 + top values)), or a report
# with this many items, is built in a worker thread: the largest histogram (1,000 bins × 100
# values) takes 30-60 ms of CPU, which on the event loop would hold every other call that long
# (issue 11: ~20 ms at most); a worker thread gives the GIL back to the loop at least every
# 5 ms (sys.getswitchinterval()).
OFF_LOOP_COUNTS = 5_000
R = TypeVar("R")
P = ParamSpec("P")


async def _rendered(size: int, render: Callable[P, R], *args: P.args, **kw: P.kwargs) -> R:
    """`render(*args)`: on the event loop, or in a worker thread when the answer is large (`size`
    counts or items, at least OFF_LOOP_COUNTS)."""
    if size < OFF_LOOP_COUNTS:
        return render(*args, **kw)
    return await asyncio.to_thread(render, *args, **kw)


class AnalyticsService(pb_grpc.AnalyticsServiceServicer):
    def __init__(self, app: App) -> None:
        self.app = app

    @roles(READERS, "read session reports")
    async def GetSessionReport(
        self, request: pb.SessionReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.SessionReport:
        return await self._report(request, context, rows.report_to_proto)

    @roles(READERS, "read session reports")
    async def GetSessionReportJson(
        self, request: pb.SessionReportRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        data = await self._report(request, context, rows.report_to_json)
        return httpbody_pb2.HttpBody(content_type=JSON, data=data)

    async def _report(
        self,
        request: pb.SessionReportRequest,
        context: grpc.aio.ServicerContext,
        render: Callable[[store.ReportResult], R],
    ) -> R:
        """The answer, rendered by `render` (in a worker thread when large: OFF_LOOP_COUNTS)."""
        who = caller()
        query = requests.parse_report(request, datetime.now(UTC))
        timeout = self.app.timeout(context)
        result = await self.app.read(
            who.token_id, lambda conn: store.report(conn, who, query, timeout)
        )
        return await _rendered(len(result.items), render, result)

    @roles(READERS, "read session histograms")
    async def GetSessionHistogram(
        self, request: pb.HistogramRequest, context: grpc.aio.ServicerContext
    ) -> pb.HistogramResponse:
        return await self._histogram(request, context, rows.histogram_to_proto)

    @roles(READERS, "read session histograms")
    async def GetSessionHistogramJson(
        self, request: pb.HistogramRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        data = await self._histogram(request, context, rows.histogram_to_json)
        return httpbody_pb2.HttpBody(content_type=JSON, data=data)

    async def _histogram(
        self,
        request: pb.HistogramRequest,
        context: grpc.aio.ServicerContext,
        render: Callable[[requests.HistogramQuery, store.HistogramResult, float], R],
    ) -> R:
        """The answer, rendered by `render` (in a worker thread when large: OFF_LOOP_COUNTS)."""
        who = caller()
        query = requests.parse_histogram(request, datetime.now(UTC))
        timeout = self.app.timeout(context)
        result = await self.app.read(
            who.token_id, lambda conn: store.histogram(conn, who, query, timeout)
        )
        remaining = self.app.remaining(context)
        counts = len(query.bins) * (1 + len(result.top))
        return await _rendered(counts, render, query, result, remaining)

    @roles(READERS, "read session statistics")
    async def GetSessionStats(
        self, request: pb.SessionStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SessionStatsResponse:
        who = caller()
        query = requests.parse_stats(request, datetime.now(UTC))
        timeout = self.app.timeout(context)
        result = await self.app.read(
            who.token_id, lambda conn: store.stats(conn, who, query, timeout)
        )
        return rows.stats_to_proto(query, result, self.app.remaining(context))
