"""What every RPC shares, in one place: who is calling, and how errors leave.

A servicer method declares who may call it, next to the method:

    @roles(READERS, "list sessions")
    async def ListSessions(self, request, context):
        who = caller()

`Guard` is a grpc.aio server interceptor. For every method of a registered service (the names
come from the generated service descriptor, never from a string in the code) it authenticates
the bearer token once, checks the declared roles, makes the principal available to the method
through `caller()` (a context variable of the RPC's task), and maps whatever escapes the method
to a gRPC status once, most specific first:

    ServiceError (errors.py)                  its own code (INVALID_ARGUMENT, NOT_FOUND, …)
    a query cancelled by the deadline         DEADLINE_EXCEEDED
    a lost or refused database connection     UNAVAILABLE
    anything else                             INTERNAL, logged as class, SQLSTATE and frames

A REST twin (e.g. IngestSessionsJson) is its own RPC with its own declaration; it calls the
plain method directly, so the caller is authenticated once. A method of a registered service
without a declaration stops the server at start. Services registered elsewhere (health,
reflection) pass through untouched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from session_audit.core import metrics
from session_audit.core.app import App
from session_audit.core.auth import Principal, authenticate
from session_audit.core.db import request_deadline
from session_audit.core.errors import ServiceError, status_for, within
from session_audit.core.interceptor import WrapOnce

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

_ACCESS = "__session_audit_access__"
_CALLER: ContextVar[Principal] = ContextVar("session_audit_caller")


@dataclass(frozen=True)
class Access:
    """Who may call a method, and the action named in a PermissionDenied message."""

    roles: frozenset[str]
    action: str


def roles(allowed: Collection[str], action: str) -> Callable[[F], F]:
    """Declare the roles that may call this servicer method (`action` completes
    "role 'x' may not …")."""

    def mark(method: F) -> F:
        setattr(method, _ACCESS, Access(frozenset(allowed), action))
        return method

    return mark


def access_of(method: object) -> Access | None:
    found = getattr(method, _ACCESS, None)
    return found if isinstance(found, Access) else None


def caller() -> Principal:
    """The authenticated caller of the current RPC."""
    try:
        return _CALLER.get()
    except LookupError:
        raise RuntimeError("caller() outside an RPC guarded by Guard") from None


async def abort_for(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> NoReturn:
    """Abort the call with the status that fits `exc` (errors.status_for)."""
    code, message = status_for(method, exc)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and not isinstance(exc, ServiceError):
        metrics.STATEMENT_TIMEOUTS.labels("rpc").inc()
    await context.abort(code, message)
    raise AssertionError("context.abort returned")


_PASS = (grpc.aio.AbortError, asyncio.CancelledError)


class Guard(WrapOnce):
    """Authentication and error mapping for every method of the registered services."""

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app
        # "/package.Service/Method" → (Method, its access)
        self._methods: dict[str, tuple[str, Access]] = {}

    def register(self, service: ServiceDescriptor, servicer: object) -> None:
        for m in service.methods:
            access = access_of(getattr(type(servicer), m.name, None))
            if access is None:
                raise TypeError(
                    f"{type(servicer).__name__}.{m.name}: declare who may call it with @roles"
                )
            self._methods[f"/{service.full_name}/{m.name}"] = (m.name, access)

    async def _authenticate(self, access: Access, context: grpc.aio.ServicerContext) -> None:
        app = self.app
        left: float | None = context.time_remaining()
        if left is not None:
            # From here on pool waits never outlast the call's deadline (db.BoundedPool).
            request_deadline.set(time.monotonic() + left)
        principal = await authenticate(
            app.pool, context, access.roles, access.action, app.timeout(context), app.tokens
        )
        # Calls that run at the same time run in different asyncio tasks, each with its own
        # copy of the context; every guarded call sets the value before its method runs.
        _CALLER.set(principal)

    def wrap(self, method: str, handler: Any) -> Any | None:
        entry = self._methods.get(method)
        return None if entry is None else self._guarded(handler, *entry)

    def _guarded(self, handler: Any, name: str, access: Access) -> Any:
        h: Any = handler
        if h.unary_unary is not None:
            return h._replace(unary_unary=self._single(h.unary_unary, name, access, bound=True))
        if h.stream_unary is not None:
            return h._replace(stream_unary=self._single(h.stream_unary, name, access))
        if h.unary_stream is not None:
            return h._replace(unary_stream=self._streaming(h.unary_stream, name, access))
        return h._replace(stream_stream=self._streaming(h.stream_stream, name, access))

    def _single(
        self, behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], name: str,
        access: Access, *, bound: bool = False,
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:  # fmt: skip
        """`bound`: a unary call whose caller set no deadline runs at most
        QUERY_TIMEOUT_SECONDS in all. (With a deadline gRPC itself cancels the call when it
        passes.) This also answers a call stuck where no statement timeout reaches, e.g. a
        ROLLBACK waiting on a frozen database; client streams have their own bounds."""

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                await self._authenticate(access, context)
                if bound and context.time_remaining() is None:
                    limit = self.app.config.default_query_timeout
                    return await within(limit, behavior(request, context))
                return await behavior(request, context)
            except _PASS:
                raise
            except Exception as exc:
                await abort_for(context, name, exc)

        return guarded

    def _streaming(
        self, behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]], name: str,
        access: Access,
    ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:  # fmt: skip
        """An error before the first message leaves as its status (so REST gets the right
        HTTP status); after it, the stream is aborted with it."""

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                await self._authenticate(access, context)
                async for item in behavior(request, context):
                    yield item
            except _PASS:
                raise
            except Exception as exc:
                await abort_for(context, name, exc)

        return guarded
