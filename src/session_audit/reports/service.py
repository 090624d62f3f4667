"""ReportService: composes request validation, the reports store, generation and rendering.

Background work of this surface (started and stopped by server.serve): the report generators
and the subscription scheduler.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import grpc
from google.api import httpbody_pb2

from session_audit.core import validation as v
from session_audit.core.app import App
from session_audit.core.auth import READERS
from session_audit.core.errors import Conflict, InvalidArgument, NotFound, PermissionDenied
from session_audit.core.json_body import parse_strict, parse_strict_for_path
from session_audit.core.reads import Behind
from session_audit.core.rpc import caller, roles
from session_audit.reports import messages as msg
from session_audit.reports import requests as req
from session_audit.reports import store
from session_audit.reports.config import ReportConfig
from session_audit.reports.filters import join_filters
from session_audit.reports.generate import Generators
from session_audit.reports.pdf import PdfBuilder, pdf_notice
from session_audit.reports.periods import period_containing
from session_audit.reports.render import (
    CHUNK,
    CONTENT_TYPES,
    ReportDoc,
    content_disposition,
    csv_chunks,
    html_chunks,
)
from session_audit.reports.scheduler import Scheduler
from session_audit.reports.types import BY_KEY, DEFAULT_ON_DEMAND, ReportType
from session_audit.v1 import reports_pb2 as pb
from session_audit.v1 import reports_pb2_grpc as pb_grpc

SUCCESS = msg.SUCCESS
ROW_PAGE = 2000


def _restricted(kind: ReportType, me: store.Owner) -> None:
    if kind.org_readers_only and not me.reads_org:
        raise PermissionDenied(
            f"role '{me.role}' may not use the {kind.title} (needs admin or auditor)"
        )


class ReportService(pb_grpc.ReportServiceServicer):
    def __init__(self, app: App, config: ReportConfig | None = None) -> None:
        self.app = app
        self.config = config or ReportConfig.from_environ()
        background_pool = app.report_pool or app.pool
        self.generators = Generators(
            background_pool, self.config.generators, self.config.poll_interval,
            self.config.generation_timeout,
        )  # fmt: skip
        self.scheduler = Scheduler(
            background_pool, self.config.clock, self.config.scheduler_interval,
            self.generators.kick,
        )  # fmt: skip
        # PDF documents are built in memory: at most this many at once (REPORT_PDF_BUILDERS).
        self._pdf_slots = asyncio.Semaphore(self.config.pdf_builders)
        # Started after the server listens, stopped before the pool closes (server.serve).
        self.background_tasks: list[Generators | Scheduler] = [self.generators]
        if self.config.scheduler_enabled:
            self.background_tasks.append(self.scheduler)

    @staticmethod
    def _me() -> store.Owner:
        return store.Owner.of(caller())

    async def _definition(
        self, me: store.Owner, id_: int, context: grpc.aio.ServicerContext
    ) -> asyncpg.Record:
        row = await store.get_definition(self.app.pool, me, id_, self.app.timeout(context))
        if row is None:
            raise NotFound(f"defined report {id_} not found")
        return row

    async def _report(
        self, me: store.Owner, id_: int, context: grpc.aio.ServicerContext
    ) -> asyncpg.Record:
        row = await store.get_report(self.app.pool, me, id_, self.app.timeout(context))
        if row is None:
            raise NotFound(f"report {id_} not found")
        return row

    # -- generated reports ---------------------------------------------------------------

    @roles(READERS, "list reports")
    async def ListReports(
        self, request: pb.ListReportsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListReportsResponse:
        me = self._me()
        limit, offset = v.paging(
            request.HasField("limit"), request.limit, request.HasField("offset"), request.offset
        )
        status = req.choice("status", request.status, req.STATUSES) if request.status else None
        definition = req.optional_id("defined_report_id", request.defined_report_id)
        async with self.app.pool.acquire() as conn:
            page = await store.list_reports(
                conn, me, status, definition, limit, offset, self.app.timeout(context)
            )
        return pb.ListReportsResponse(
            reports=[msg.report(r, me) for r in page.rows], result=SUCCESS,
            has_next_page=page.has_next, total=page.total,
        )  # fmt: skip

    @roles(READERS, "create reports")
    async def CreateReport(
        self, request: pb.CreateReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateReportResponse:
        me = self._me()
        wanted = req.create_report(request)
        def_id = wanted.defined_report_id or DEFAULT_ON_DEMAND.predefined_id
        definition = await self._definition(me, def_id, context)
        kind = BY_KEY[definition["type"]]
        _restricted(kind, me)
        query_filter = join_filters(definition["query_filter"], wanted.extra_filter)
        query_order = (
            wanted.query_order if wanted.query_order is not None else definition["query_order"]
        )
        req.check_filter_and_order(kind.key, query_filter, query_order)
        new = store.NewReport(
            defined_report_id=def_id, type=kind.key, title=wanted.title or definition["title"],
            query_filter=query_filter, query_order=query_order,
        )  # fmt: skip
        async with self.app.pool.acquire() as conn:
            id_ = await store.create_report(conn, me, new, self.app.timeout(context))
        self.generators.kick()
        return pb.CreateReportResponse(report=pb.ReportRef(id=str(id_)), result=SUCCESS)

    # -- REST bodies, read strictly (see JsonBodyRequest) ---------------------------------------

    @roles(READERS, "create reports")
    async def CreateReportJson(
        self, request: pb.JsonBodyRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateReportResponse:
        body = parse_strict(request.body.data, pb.CreateReportRequest)
        return await self.CreateReport(body, context)

    @roles(READERS, "create report definitions")
    async def CreateDefinedReportJson(
        self, request: pb.JsonBodyRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateDefinedReportResponse:
        body = parse_strict(request.body.data, pb.CreateDefinedReportRequest)
        return await self.CreateDefinedReport(body, context)

    @roles(READERS, "change report definitions")
    async def UpdateDefinedReportJson(
        self, request: pb.JsonBodyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportResult:
        body = parse_strict_for_path(request.body.data, pb.UpdateDefinedReportRequest, request.id)
        return await self.UpdateDefinedReport(body, context)

    @roles(READERS, "subscribe to reports")
    async def CreateDefinedReportSubscriptionJson(
        self, request: pb.JsonBodyRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateDefinedReportSubscriptionResponse:
        body = parse_strict(request.body.data, pb.CreateDefinedReportSubscriptionRequest)
        return await self.CreateDefinedReportSubscription(body, context)

    @roles(READERS, "read reports")
    async def GetReport(
        self, request: pb.GetReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetReportResponse:
        me = self._me()
        row = await self._report(me, req.object_id("id", request.id), context)
        return pb.GetReportResponse(report=msg.report(row, me), result=SUCCESS)

    @roles(READERS, "delete reports")
    async def DeleteReport(
        self, request: pb.DeleteReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportResult:
        me = self._me()
        id_ = req.object_id("id", request.id)
        row = await self._report(me, id_, context)
        if not me.may_change(row["owner"]):
            raise PermissionDenied(f"report {id_} belongs to {row['owner']}; only they or an "
                                   "admin may delete it")  # fmt: skip
        async with self.app.pool.acquire() as conn:
            await store.delete_report(conn, me, id_, self.app.timeout(context))
        return pb.ReportResult(result=SUCCESS)

    @roles(READERS, "download reports")
    async def DownloadReport(
        self, request: pb.DownloadReportRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        me = self._me()
        id_, fmt = req.download(request)
        row = await self._report(me, id_, context)
        if row["status"] == "pending":
            raise Conflict(f"report {id_} is not ready yet (status pending); try again shortly")
        if row["status"] == "failed":
            raise Conflict(f"report {id_} failed and has no content: {row['failure']}")
        kind = BY_KEY[row["type"]]
        _restricted(kind, me)
        timeout = self.app.timeout(context)
        try:
            content = await self.app.read(
                me.token_id, lambda conn: store.report_content(conn, me.org_id, id_, timeout)
            )
        except Behind:  # not on the primary either: deleted meanwhile
            raise NotFound(f"report {id_} not found") from None
        doc = self._doc(row, content, kind, fmt)
        await context.send_initial_metadata(
            (("content-disposition", content_disposition(doc, fmt)),)
        )
        content_type = CONTENT_TYPES[fmt]
        first = True
        async for data in self._render(doc, fmt, me, id_, timeout):
            yield httpbody_pb2.HttpBody(content_type=content_type if first else "", data=data)
            first = False

    def _doc(
        self, row: asyncpg.Record, content: asyncpg.Record, kind: ReportType, fmt: str
    ) -> ReportDoc:
        zone = row["time_zone"]
        if row["period_start"] is not None:
            z = ZoneInfo(zone)
            period = (
                f"{row['period']}: {row['period_start'].astimezone(z):%Y-%m-%d %H:%M} to "
                f"{row['period_end'].astimezone(z):%Y-%m-%d %H:%M} ({zone})"
            )
        elif kind.source == "tokens":
            period = "as of generation"
        else:
            period = "all time (only the filter applies)"
        notices = []
        if row["query_order"].strip() and not kind.orderable:
            notices.append(
                "query_order orders sessions; this report's rows are grouped, so they keep "
                "the report's own order."
            )
        if fmt == "pdf":
            notice = pdf_notice(row["row_count"] or 0, self.config.pdf_max_rows)
            if notice:
                notices.append(notice)
        return ReportDoc(
            id=row["id"], title=row["title"], type_title=kind.title,
            query_filter=row["query_filter"], query_order=row["query_order"], period=period,
            time_zone=zone, generated_at=row["generated_at"], owner=row["owner"],
            columns=kind.columns, summary=content["summary"] or [], chart=content["chart"],
            note=content["note"] or "", row_count=row["row_count"] or 0, notices=notices,
        )  # fmt: skip

    async def _batches(
        self, me: store.Owner, id_: int, timeout: float, limit: int | None = None
    ) -> Any:
        """The snapshot's rows in order, a page at a time (a pooled connection per page, so a
        slow client holds no connection)."""
        after = 0
        while limit is None or after < limit:
            size = ROW_PAGE if limit is None else min(ROW_PAGE, limit - after)
            page = functools.partial(store.report_rows, org_id=me.org_id, id_=id_, after=after,
                                     limit=size, timeout=timeout)  # fmt: skip
            rows = await self.app.read(me.token_id, page)
            if not rows:
                return
            yield rows
            after += len(rows)

    async def _render(
        self, doc: ReportDoc, fmt: str, me: store.Owner, id_: int, timeout: float
    ) -> AsyncIterator[bytes]:
        if fmt == "csv":
            async for chunk in csv_chunks(doc, self._batches(me, id_, timeout)):
                yield chunk
        elif fmt == "html":
            async for chunk in html_chunks(doc, self._batches(me, id_, timeout)):
                yield chunk
        else:
            async with self._pdf_slots:
                builder = await asyncio.to_thread(PdfBuilder, doc, self.config.pdf_max_rows)
                async for batch in self._batches(me, id_, timeout, self.config.pdf_max_rows):
                    await asyncio.to_thread(builder.add_rows, batch)
                data = await asyncio.to_thread(builder.output)
                del builder
            for i in range(0, len(data), CHUNK):
                yield data[i : i + CHUNK]

    # -- definitions ---------------------------------------------------------------------

    @roles(READERS, "list report definitions")
    async def ListDefinedReports(
        self, request: pb.ListDefinedReportsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDefinedReportsResponse:
        me = self._me()
        limit, offset = v.paging(
            request.HasField("limit"), request.limit, request.HasField("offset"), request.offset
        )
        type_ = req.report_type(request.type) if request.type else None
        async with self.app.pool.acquire() as conn:
            page = await store.list_definitions(
                conn, me, type_, limit, offset, self.app.timeout(context)
            )
        return pb.ListDefinedReportsResponse(
            defined_reports=[msg.definition(r, me) for r in page.rows], result=SUCCESS,
            has_next_page=page.has_next, total=page.total,
        )  # fmt: skip

    @roles(READERS, "create report definitions")
    async def CreateDefinedReport(
        self, request: pb.CreateDefinedReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateDefinedReportResponse:
        me = self._me()
        d = req.create_definition(request)
        _restricted(BY_KEY[d.type], me)
        async with self.app.pool.acquire() as conn:
            id_ = await store.create_definition(
                conn, me, d.title, d.type, d.query_filter, d.query_order,
                self.app.timeout(context),
            )  # fmt: skip
        return pb.CreateDefinedReportResponse(
            defined_report=pb.ReportRef(id=str(id_)), result=SUCCESS
        )

    @roles(READERS, "read report definitions")
    async def GetDefinedReport(
        self, request: pb.GetDefinedReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDefinedReportResponse:
        me = self._me()
        row = await self._definition(me, req.object_id("id", request.id), context)
        return pb.GetDefinedReportResponse(defined_report=msg.definition(row, me), result=SUCCESS)

    async def _changeable(
        self, me: store.Owner, id_: int, context: grpc.aio.ServicerContext, verb: str
    ) -> asyncpg.Record:
        row = await self._definition(me, id_, context)
        if row["org_id"] is None:
            raise PermissionDenied(
                f"defined report {id_} ({row['title']}) is predefined and cannot be {verb}"
            )
        if not me.may_change(row["owner"]):
            raise PermissionDenied(
                f"defined report {id_} belongs to {row['owner']}; only they or an admin may "
                f"{verb.removesuffix('d')} it"
            )
        return row

    @roles(READERS, "change report definitions")
    async def UpdateDefinedReport(
        self, request: pb.UpdateDefinedReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportResult:
        me = self._me()
        ch = req.update_definition(request)
        row = await self._changeable(me, ch.id, context, "changed")
        if ch.type is not None and ch.type != row["type"]:
            raise InvalidArgument(f"type: immutable; this definition's type is {row['type']}")
        if ch.user_id is not None and ch.user_id.strip().lower() != row["owner"]:
            raise InvalidArgument(f"user_id: immutable; this definition belongs to {row['owner']}")
        req.check_filter_and_order(
            row["type"],
            ch.changes.get("query_filter", row["query_filter"]),
            ch.changes.get("query_order", row["query_order"]),
        )
        if ch.changes:
            async with self.app.pool.acquire() as conn:
                await store.update_definition(
                    conn, me, ch.id, ch.changes, self.app.timeout(context)
                )
        return pb.ReportResult(result=SUCCESS)

    @roles(READERS, "delete report definitions")
    async def DeleteDefinedReport(
        self, request: pb.DeleteDefinedReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportResult:
        me = self._me()
        id_ = req.object_id("id", request.id)
        await self._changeable(me, id_, context, "deleted")
        async with self.app.pool.acquire() as conn:
            await store.delete_definition(conn, me, id_, self.app.timeout(context))
        return pb.ReportResult(result=SUCCESS)

    # -- subscriptions -------------------------------------------------------------------

    @roles(READERS, "list subscriptions")
    async def ListDefinedReportSubscriptions(
        self,
        request: pb.ListDefinedReportSubscriptionsRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ListDefinedReportSubscriptionsResponse:
        me = self._me()
        limit, offset = v.paging(
            request.HasField("limit"), request.limit, request.HasField("offset"), request.offset
        )
        definition = req.optional_id("defined_report_id", request.defined_report_id)
        async with self.app.pool.acquire() as conn:
            page = await store.list_subscriptions(
                conn, me, definition, limit, offset, self.app.timeout(context)
            )
        return pb.ListDefinedReportSubscriptionsResponse(
            defined_report_subscriptions=[msg.subscription(r, me) for r in page.rows],
            result=SUCCESS, has_next_page=page.has_next, total=page.total,
        )  # fmt: skip

    @roles(READERS, "subscribe to reports")
    async def CreateDefinedReportSubscription(
        self,
        request: pb.CreateDefinedReportSubscriptionRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.CreateDefinedReportSubscriptionResponse:
        me = self._me()
        new = req.create_subscription(request)
        definition = await self._definition(me, new.defined_report_id, context)
        _restricted(BY_KEY[definition["type"]], me)
        now = self.config.clock()
        first = period_containing(new.period, ZoneInfo(new.time_zone), now)
        async with self.app.pool.acquire() as conn:
            id_ = await store.create_subscription(
                conn, me, new.defined_report_id, new.period, new.time_zone, first, now,
                self.app.timeout(context),
            )  # fmt: skip
        return pb.CreateDefinedReportSubscriptionResponse(
            defined_report_subscription=pb.ReportRef(id=str(id_)), result=SUCCESS
        )

    @roles(READERS, "read subscriptions")
    async def GetDefinedReportSubscription(
        self,
        request: pb.GetDefinedReportSubscriptionRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.GetDefinedReportSubscriptionResponse:
        me = self._me()
        id_ = req.object_id("id", request.id)
        row = await store.get_subscription(self.app.pool, me, id_, self.app.timeout(context))
        if row is None:
            raise NotFound(f"subscription {id_} not found")
        return pb.GetDefinedReportSubscriptionResponse(
            defined_report_subscription=msg.subscription(row, me), result=SUCCESS
        )

    @roles(READERS, "unsubscribe")
    async def DeleteDefinedReportSubscription(
        self,
        request: pb.DeleteDefinedReportSubscriptionRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ReportResult:
        me = self._me()
        id_ = req.object_id("id", request.id)
        row = await store.get_subscription(self.app.pool, me, id_, self.app.timeout(context))
        if row is None:
            raise NotFound(f"subscription {id_} not found")
        if not me.may_change(row["owner"]):
            raise PermissionDenied(f"subscription {id_} belongs to {row['owner']}; only they or "
                                   "an admin may delete it")  # fmt: skip
        async with self.app.pool.acquire() as conn:
            await store.delete_subscription(conn, me, id_, self.app.timeout(context))
        return pb.ReportResult(result=SUCCESS)

    # -- attributes ----------------------------------------------------------------------

    @roles(READERS, "read report attributes")
    async def GetReportAttributes(
        self, request: pb.ReportAttributesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportAttributesResponse:
        return pb.ReportAttributesResponse(attributes=msg.REPORT_ATTRIBUTES, result=SUCCESS)

    @roles(READERS, "read report attributes")
    async def GetDefinedReportAttributes(
        self, request: pb.ReportAttributesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportAttributesResponse:
        return pb.ReportAttributesResponse(attributes=msg.DEFINED_REPORT_ATTRIBUTES, result=SUCCESS)

    @roles(READERS, "read report attributes")
    async def GetDefinedReportSubscriptionAttributes(
        self, request: pb.ReportAttributesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportAttributesResponse:
        return pb.ReportAttributesResponse(attributes=msg.SUBSCRIPTION_ATTRIBUTES, result=SUCCESS)

    @roles(READERS, "read report attributes")
    async def GetCriteriaAttributes(
        self, request: pb.ReportAttributesRequest, context: grpc.aio.ServicerContext
    ) -> pb.CriteriaAttributesResponse:
        return msg.criteria_attributes()
