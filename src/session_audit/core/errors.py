"""Errors the service raises, and the one place that maps them to gRPC status codes.

    ServiceError             base: carries a message safe to show the caller
    ├── InvalidArgument      bad request input; the message names the parameter → INVALID_ARGUMENT
    ├── Unauthenticated      missing/unknown/revoked token → UNAUTHENTICATED (HTTP 401)
    ├── PermissionDenied     the token's role may not do this → PERMISSION_DENIED (HTTP 403)
    ├── NotFound             no such row in the caller's org → NOT_FOUND (HTTP 404)
    ├── Conflict             the row is not in a state that allows this → ABORTED (HTTP 409)
    └── FailedPrecondition   request valid but cannot be answered now → FAILED_PRECONDITION (400)

Anything else that escapes an RPC is mapped by `rpc`: a query cancelled by the caller's
deadline → DEADLINE_EXCEEDED, a lost or refused database connection → UNAVAILABLE, and the
rest → INTERNAL (logged as class, SQLSTATE and frames by redact.describe — never the
message, which can carry session data — and never shown to the caller).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar, cast

import asyncpg
import grpc

from session_audit.core import redact

log = logging.getLogger(__name__)


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class Conflict(ServiceError):
    code = grpc.StatusCode.ABORTED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


_UNAVAILABLE = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    ConnectionError,
    OSError,
)


async def abort_for(context: grpc.aio.ServicerContext, rpc: str, exc: Exception) -> NoReturn:
    """Abort the call with the status that fits `exc`, most specific first."""
    if isinstance(exc, ServiceError):
        await context.abort(exc.code, exc.message)
    elif isinstance(exc, TimeoutError | asyncpg.QueryCanceledError):
        await context.abort(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"{rpc}: the query did not finish before the deadline",
        )
    elif isinstance(exc, _UNAVAILABLE):
        log.warning("%s: database unavailable: %s", rpc, redact.describe(exc))
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{rpc}: the database is unavailable")
    else:
        log.error("%s failed: %s", rpc, redact.describe(exc))
        await context.abort(grpc.StatusCode.INTERNAL, f"{rpc}: internal error")
    raise AssertionError("context.abort returned")


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def rpc(name: str) -> Callable[[F], F]:
    """Decorate a servicer method so every error leaves as the right gRPC status."""

    def decorate(method: F) -> F:
        @functools.wraps(method)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await method(self, request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await abort_for(context, name, exc)

        return cast(F, wrapper)

    return decorate
