"""AnalyticsService: composes validation, the SQL layer and the mapping per RPC."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc

from session_audit.analytics import requests, rows, store
from session_audit.core.app import App
from session_audit.core.auth import READERS
from session_audit.core.errors import rpc
from session_audit.v1 import analytics_pb2 as pb
from session_audit.v1 import analytics_pb2_grpc as pb_grpc


class AnalyticsService(pb_grpc.AnalyticsServiceServicer):
    def __init__(self, app: App) -> None:
        self.app = app

    @rpc("GetSessionReport")
    async def GetSessionReport(
        self, request: pb.SessionReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.SessionReport:
        who = await self.app.caller(context, READERS, "read session reports")
        query = requests.parse_report(request, datetime.now(UTC))
        timeout = self.app.timeout(context)
        result = await self.app.read(
            who.token_id, lambda conn: store.report(conn, who, query, timeout)
        )
        return rows.report_to_proto(result)

    @rpc("GetSessionHistogram")
    async def GetSessionHistogram(
        self, request: pb.HistogramRequest, context: grpc.aio.ServicerContext
    ) -> pb.HistogramResponse:
        who = await self.app.caller(context, READERS, "read session histograms")
        query = requests.parse_histogram(request, datetime.now(UTC))
        timeout = self.app.timeout(context)
        result = await self.app.read(
            who.token_id, lambda conn: store.histogram(conn, who, query, timeout)
        )
        return rows.histogram_to_proto(query, result, self._remaining(context))

    @rpc("GetSessionStats")
    async def GetSessionStats(
        self, request: pb.SessionStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SessionStatsResponse:
        who = await self.app.caller(context, READERS, "read session statistics")
        query = requests.parse_stats(request, datetime.now(UTC))
        timeout = self.app.timeout(context)
        result = await self.app.read(
            who.token_id, lambda conn: store.stats(conn, who, query, timeout)
        )
        return rows.stats_to_proto(query, result, self._remaining(context))

    def _remaining(self, context: grpc.aio.ServicerContext) -> float:
        """Seconds left of the caller's deadline (the default query bound without one)."""
        remaining: float | None = context.time_remaining()
        return self.app.config.default_query_timeout if remaining is None else remaining
