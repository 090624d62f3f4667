"""AnalyticsService: composes validation, the SQL layer and the mapping per RPC."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc

from session_audit.analytics import requests, rows, store
from session_audit.core.app import App
from session_audit.core.auth import READERS
from session_audit.core.rpc import caller, roles
from session_audit.v1 import analytics_pb2 as pb
from session_audit.v1 import analytics_pb2_grpc as pb_grpc


class AnalyticsService(pb_grpc.AnalyticsServiceServicer):
    def __init__(self, app: App) -> None:
        self.app = app

    @roles(READERS, "read session reports")
    async def GetSessionReport(
        self, request: pb.SessionReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.SessionReport:
        who = caller()
        query = requests.parse_report(request, datetime.now(UTC))
        timeout = self.app.timeout(context)
        result = await self.app.read(
            who.token_id, lambda conn: store.report(conn, who, query, timeout)
        )
        return rows.report_to_proto(result)

    @roles(READERS, "read session histograms")
    async def GetSessionHistogram(
        self, request: pb.HistogramRequest, context: grpc.aio.ServicerContext
    ) -> pb.HistogramResponse:
        who = caller()
        query = requests.parse_histogram(request, datetime.now(UTC))
        timeout = self.app.timeout(context)
        result = await self.app.read(
            who.token_id, lambda conn: store.histogram(conn, who, query, timeout)
        )
        return rows.histogram_to_proto(query, result, self.app.remaining(context))

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
