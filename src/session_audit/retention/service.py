"""RetentionService: the policy, locks, holds and the org's trail over gRPC (and REST)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import grpc
import orjson
from google.api import httpbody_pb2
from google.protobuf import struct_pb2

from session_audit import reports
from session_audit.core import trail
from session_audit.core.app import App
from session_audit.core.auth import ORG_READERS, Principal
from session_audit.core.errors import InvalidArgument
from session_audit.core.json_body import parse_strict, parse_strict_for_path
from session_audit.core.rpc import caller, roles
from session_audit.retention import store
from session_audit.retention.config import RetentionConfig
from session_audit.retention.purge import Purger
from session_audit.v1 import retention_pb2 as pb
from session_audit.v1 import retention_pb2_grpc as pb_grpc

ADMINS = frozenset({"admin"})


def _session_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw.strip())
    except ValueError:
        raise InvalidArgument(f"id: expected a session UUID, got {raw[:80]!r}") from None


def _hold_id(raw: str) -> int:
    text = raw.strip()
    if not text.isdigit() or len(text) > 18:
        raise InvalidArgument(f"id: expected a hold id (digits), got {raw[:40]!r}")
    return int(text)


def _policy(days: int | None) -> pb.RetentionPolicy:
    reply = pb.RetentionPolicy()
    if days is None:
        reply.days.null_value = struct_pb2.NULL_VALUE
    else:
        reply.days.number_value = days
    return reply


class RetentionService(pb_grpc.RetentionServiceServicer):
    def __init__(self, app: App, config: RetentionConfig | None = None) -> None:
        self.app = app
        self.config = config or RetentionConfig.from_environ()
        self.purger = Purger(
            app.pool,
            self.config.clock,
            interval=self.config.interval,
            tick=self.config.tick,
            batch=self.config.batch,
            timeout=app.config.default_query_timeout,
            hold_window=self.config.hold_window,
        )
        self.background_tasks: list[Purger] = [self.purger] if self.config.enabled else []

    # -- policy ---------------------------------------------------------------------------------

    @roles(ADMINS, "read the retention policy")
    async def GetRetentionPolicy(
        self, request: pb.GetRetentionPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RetentionPolicy:
        who = caller()
        return _policy(await store.get_policy(self.app.pool, who.org_id, self.app.timeout(context)))

    @roles(ADMINS, "set the retention policy")
    async def SetRetentionPolicy(
        self, request: pb.SetRetentionPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RetentionPolicy:
        who = caller()
        days = store.check_days(request.days if request.HasField("days") else None)
        async with self.app.pool.acquire() as conn:
            await store.set_policy(conn, who, days, self.app.timeout(context))
        return _policy(days)

    @roles(ADMINS, "set the retention policy")
    async def SetRetentionPolicyJson(
        self, request: pb.RetentionJsonBody, context: grpc.aio.ServicerContext
    ) -> pb.RetentionPolicy:
        body = parse_strict(request.body.data, pb.SetRetentionPolicyRequest)
        return await self.SetRetentionPolicy(body, context)

    # -- locks and holds ------------------------------------------------------------------------

    @roles(ORG_READERS, "lock sessions")
    async def SetRetentionLock(
        self, request: pb.SetRetentionLockRequest, context: grpc.aio.ServicerContext
    ) -> pb.RetentionLock:
        who = caller()
        sid = _session_id(request.id)
        reason = store.check_reason(request.reason, required=False)
        async with self.app.pool.acquire() as conn:
            state = await store.set_lock(
                conn, who, sid, request.locked, reason, self.app.timeout(context)
            )
        return pb.RetentionLock(
            id=str(sid), locked=state.locked, holds=[str(h) for h in state.holds]
        )

    @roles(ORG_READERS, "lock sessions")
    async def SetRetentionLockJson(
        self, request: pb.RetentionJsonBody, context: grpc.aio.ServicerContext
    ) -> pb.RetentionLock:
        body = parse_strict_for_path(request.body.data, pb.SetRetentionLockRequest, request.id)
        return await self.SetRetentionLock(body, context)

    @roles(ORG_READERS, "create legal holds")
    async def CreateHold(
        self, request: pb.CreateHoldRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateHoldResponse:
        who = caller()
        reason = store.check_reason(request.reason, required=True)
        # Validated (400 naming query_filter) and stored in canonical form.
        query_filter = reports.canonical_filter(request.query_filter)
        report_ids = store.parse_report_ids(request.report_ids)
        timeout = self.app.timeout(context)
        async with self.app.pool.acquire() as conn:
            hold_id = await store.create_hold(conn, who, reason, query_filter, report_ids, timeout)
            # Lock what is stored, a window per transaction, while the caller's time lasts
            # (keeping a fifth of it, at least a second, to answer); the rest is finished in
            # the background (docs/retention.md "Holds over millions").
            left = self.app.remaining(context)
            until = time.monotonic() + left - max(1.0, left / 5)
            applied = await store.apply_hold(
                conn,
                who.org_id,
                hold_id,
                window=self.config.hold_window,
                timeout=self.app.timeout(context),
                until=until,
            )
        return pb.CreateHoldResponse(
            id=str(hold_id), locked=applied.locked, applying=not applied.done
        )

    @roles(ORG_READERS, "create legal holds")
    async def CreateHoldJson(
        self, request: pb.RetentionJsonBody, context: grpc.aio.ServicerContext
    ) -> pb.CreateHoldResponse:
        body = parse_strict(request.body.data, pb.CreateHoldRequest)
        return await self.CreateHold(body, context)

    @roles(ORG_READERS, "read legal holds")
    async def ListHolds(
        self, request: pb.ListHoldsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListHoldsResponse:
        who = caller()
        rows = await store.list_holds(self.app.pool, who.org_id, self.app.timeout(context))
        reply = pb.ListHoldsResponse()
        for r in rows:
            h = reply.holds.add(
                id=str(r["id"]),
                reason=r["reason"],
                query_filter=r["query_filter"],
                report_ids=[str(x) for x in r["report_ids"]],
                created_by=r["created_by"],
                locked=r["locked"],
                applying=r["applying"],
            )
            h.created_at.FromDatetime(r["created_at"])
        return reply

    @roles(ORG_READERS, "release legal holds")
    async def DeleteHold(
        self, request: pb.DeleteHoldRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteHoldResponse:
        who = caller()
        hold_id = _hold_id(request.id)
        async with self.app.pool.acquire() as conn:
            released = await store.delete_hold(conn, who, hold_id, self.app.timeout(context))
        return pb.DeleteHoldResponse(id=str(hold_id), released=released)

    # -- the trail ------------------------------------------------------------------------------

    @roles(ORG_READERS, "verify the trail")
    async def VerifyTrail(
        self, request: pb.VerifyTrailRequest, context: grpc.aio.ServicerContext
    ) -> pb.VerifyTrailResponse:
        who = caller()
        # Verify digests every live session of the org (~20k rows/s: a large org takes minutes),
        # so it runs for the whole deadline the caller gives, not the QUERY_TIMEOUT_SECONDS cap
        # of other calls (REST: `grpc-timeout: 300S`, Envoy's ceiling; the CLI has no limit).
        timeout = max(0.001, self.app.remaining(context))
        async with self.app.pool.acquire() as conn:
            verdict = await trail.verify(conn, who.org_id, timeout)
        return verdict_to_proto(verdict)

    @roles(ORG_READERS, "read the trail")
    async def GetTrail(
        self, request: pb.GetTrailRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async for chunk in self._trail_lines(caller()):
            yield chunk

    async def _trail_lines(self, who: Principal) -> AsyncIterator[httpbody_pb2.HttpBody]:
        # The download streams for as long as it takes (Envoy's route has no timeout).
        timeout = self.app.config.default_query_timeout
        content_type = "application/x-ndjson"
        async with (
            self.app.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            buf: list[bytes] = []
            n, head = 0, ""
            async for entry in trail.entries(conn, who.org_id, timeout):
                buf.append(orjson.dumps(entry) + b"\n")
                n, head = entry["seq"], entry["hash"]
                if len(buf) >= 1000:
                    yield httpbody_pb2.HttpBody(content_type=content_type, data=b"".join(buf))
                    content_type, buf = "", []
            buf.append(orjson.dumps({"head": head, "entries": n}) + b"\n")
            yield httpbody_pb2.HttpBody(content_type=content_type, data=b"".join(buf))


def verdict_to_proto(v: trail.Verdict) -> pb.VerifyTrailResponse:
    if v.bad is None:
        return pb.VerifyTrailResponse(ok=True, entries=v.entries, head=v.head.hex())
    reply = pb.VerifyTrailResponse(ok=False, entries=v.entries)
    reply.first_bad.object_id = v.bad.object_id
    reply.first_bad.reason = v.bad.reason
    if v.bad.seq is None:
        reply.first_bad.seq.null_value = struct_pb2.NULL_VALUE
    else:
        reply.first_bad.seq.number_value = v.bad.seq
    return reply
