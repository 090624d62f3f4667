"""SessionService: composes validation, the SQL layer and the row mapping per RPC."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import grpc
from google.api import httpbody_pb2
from google.protobuf import struct_pb2

from session_audit.core import metrics
from session_audit.core.app import App
from session_audit.core.auth import READERS, WRITERS, Principal, authenticate
from session_audit.core.db import Conn
from session_audit.core.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
)
from session_audit.core.json_body import parse_strict_off_loop
from session_audit.core.rpc import caller, roles
from session_audit.sessions import requests as listing
from session_audit.sessions import store
from session_audit.sessions.ingest import MAX_BATCH, Check, IngestBatch
from session_audit.sessions.rows import row_to_proto
from session_audit.v1 import sessions_pb2 as pb
from session_audit.v1 import sessions_pb2_grpc as pb_grpc


def parse_session_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw.strip())
    except ValueError:
        raise InvalidArgument(f"id: expected a session UUID, got {raw[:80]!r}") from None


class SessionService(pb_grpc.SessionServiceServicer):
    def __init__(self, app: App) -> None:
        self.app = app
        # Open ingest streams per org (this process).
        self._streams: Counter[uuid.UUID] = Counter()

    @roles(READERS, "list sessions")
    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        who = caller()
        query = listing.parse_list_request(request)
        timeout = self.app.timeout(context)
        page = await self.app.read(
            who.token_id, lambda conn: store.list_sessions(conn, who, query, timeout)
        )
        reply = pb.ListSessionsResponse(
            data=[row_to_proto(r) for r in page.rows],
            has_next_page=page.has_next,
            total_is_capped=page.total_is_capped,
        )
        if page.total is None:
            reply.total.null_value = struct_pb2.NULL_VALUE
        else:
            reply.total.number_value = page.total
        if page.has_next and page.rows:
            last = page.rows[-1]
            reply.next_page_token = listing.encode_cursor(
                query.filters, last["start_date"], last["id"]
            )
        return reply

    @roles(READERS, "read sessions")
    async def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.Session:
        who = caller()
        session_id = parse_session_id(request.id)
        timeout = self.app.timeout(context)
        row = await self.app.read(
            who.token_id, lambda conn: store.get_session(conn, who, session_id, timeout)
        )
        if row is None:
            raise NotFound(f"session {session_id} not found")
        return row_to_proto(row)

    @roles(WRITERS, "ingest sessions")
    async def IngestSessions(
        self, request: pb.IngestSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.IngestSessionsResponse:
        who = caller()
        return await self._ingest(who, request, context)

    @roles(WRITERS, "ingest sessions")
    async def IngestSessionsJson(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> pb.IngestSessionsResponse:
        who = caller()
        parsed = await parse_strict_off_loop(request.data, pb.IngestSessionsRequest)
        return await self._ingest(who, parsed, context)

    async def _ingest(
        self, who: Principal, request: pb.IngestSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.IngestSessionsResponse:
        n = len(request.sessions)
        if n == 0:
            raise InvalidArgument("sessions: expected at least one session")
        if n > MAX_BATCH:
            raise InvalidArgument(
                f"sessions: expected at most {MAX_BATCH} per request, got {n}; "
                "split the batch or use StreamIngestSessions"
            )
        async with self._batch(who, context) as batch:
            for session in request.sessions:
                await batch.add(session)
            result = await batch.finish()
        await self.app.wrote(who)
        metrics.ingested(result.written, result.unchanged, result.rejected)
        return result.to_proto()

    def _batch(
        self, who: Principal, context: grpc.aio.ServicerContext, check: Check | None = None
    ) -> IngestBatch:
        """A batch that opens its own transaction on the ingest pool when it first writes,
        with every statement bounded by the time left to the call's deadline."""

        @contextlib.asynccontextmanager
        async def transaction() -> AsyncIterator[Conn]:
            async with self.app.ingest_pool.acquire() as conn, conn.transaction():
                yield conn

        return IngestBatch.on_pool(
            transaction,
            who.org_id,
            lambda: self.app.timeout(context),
            read_back=not self.app.distributed,
            check=check,
            actor=who.email,
        )

    @roles(WRITERS, "ingest sessions")
    async def StreamIngestSessions(
        self,
        request_iterator: AsyncIterator[pb.IngestSessionsRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.IngestSessionsResponse:
        """One transaction per chunk of CHUNK items, opened when the chunk is written and
        committed right after (a stream buffers its next chunk holding no connection, and two
        streams cannot deadlock: sessions/ingest.py). Bounded: STREAM_IDLE_SECONDS between
        messages, STREAM_MAX_SECONDS in all, INGEST_STREAMS_PER_ORG at once per org; the
        token is checked again before every chunk is written, so a token revoked meanwhile
        stores nothing more. An error ends the stream with the chunks committed before it
        stored; its message says how many items those were."""
        who = caller()
        limit = self.app.config.streams_per_org
        if self._streams[who.org_id] >= limit:
            raise ResourceExhausted(
                f"ingest: at most {limit} concurrent streams per org (INGEST_STREAMS_PER_ORG); "
                "retry when one has ended"
            )
        self._streams[who.org_id] += 1

        async def still_allowed() -> None:
            app = self.app
            await authenticate(
                app.pool, context, WRITERS, "ingest sessions", app.timeout(context), app.tokens
            )

        batch = self._batch(who, context, still_allowed)
        try:
            async with batch:
                async for chunk in self._bounded(request_iterator):
                    for session in chunk.sessions:
                        await batch.add(session)
                result = await batch.finish()
        except ServiceError as exc:
            if not batch.committed:
                raise
            raise type(exc)(
                f"{exc.message} (the first {batch.committed} items of the stream were stored "
                "before this, in committed chunks; re-sending the stream is idempotent)"
            ) from exc
        finally:
            self._streams[who.org_id] -= 1
            if not self._streams[who.org_id]:
                del self._streams[who.org_id]
        await self.app.wrote(who)
        metrics.ingested(result.written, result.unchanged, result.rejected)
        return result.to_proto()

    async def _bounded(
        self, requests: AsyncIterator[pb.IngestSessionsRequest]
    ) -> AsyncIterator[pb.IngestSessionsRequest]:
        idle, longest = self.app.config.stream_idle, self.app.config.stream_max
        end = time.monotonic() + longest
        it = aiter(requests)
        while True:
            left = end - time.monotonic()
            try:
                async with asyncio.timeout(max(0.0, min(idle, left))):
                    chunk = await anext(it)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if left <= idle:
                    raise DeadlineExceeded(
                        f"stream: open longer than {longest:g} s (STREAM_MAX_SECONDS); the "
                        "items not yet committed were not stored; send it in shorter streams"
                    ) from None
                raise DeadlineExceeded(
                    f"stream: nothing received for {idle:g} s (STREAM_IDLE_SECONDS); the "
                    "items not yet committed were not stored"
                ) from None
            yield chunk
