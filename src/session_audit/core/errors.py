"""Errors the service raises, and the one place that maps them to gRPC status codes.

    ServiceError             base: carries a message safe to show the caller
    ├── InvalidArgument      bad request input; the message names the parameter → INVALID_ARGUMENT
    ├── Unauthenticated      missing/unknown/revoked token → UNAUTHENTICATED (HTTP 401)
    ├── PermissionDenied     the token's role may not do this → PERMISSION_DENIED (HTTP 403)
    ├── NotFound             no such row in the caller's org → NOT_FOUND (HTTP 404)
    ├── Conflict             the row is not in a state that allows this → ABORTED (HTTP 409)
    ├── Retryable            lost a race with a concurrent transaction; re-send → ABORTED (409)
    ├── Unavailable          no capacity now (e.g. no pooled connection in time) → UNAVAILABLE
    ├── ResourceExhausted    a per-caller limit is reached (429) → RESOURCE_EXHAUSTED
    ├── DeadlineExceeded     a time limit of ours ran out → DEADLINE_EXCEEDED (504)
    └── FailedPrecondition   request valid but cannot be answered now → FAILED_PRECONDITION (400)

Anything else that escapes an RPC is mapped by `rpc` (`status_for`), most specific first:

    deadlock / serialization failure            → ABORTED (retryable; docs/reliability.md)
    query cancelled (deadline, statement_timeout) or asyncio timeout → DEADLINE_EXCEEDED
    lost or refused database connection, server shutting down, network errors → UNAVAILABLE
    anything else (asyncpg.InterfaceError: a client-side bug, among them) → INTERNAL, logged
                                                once with its traceback, never shown
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar, cast

import asyncpg
import grpc
from google.protobuf.message import Message

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


class Retryable(ServiceError):
    code = grpc.StatusCode.ABORTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


# PostgreSQL aborted the transaction to break a lock cycle or keep it serializable: running it
# again is the remedy.
RETRYABLE_DB = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)

# The database cannot be reached or is going away. asyncpg.InterfaceError as a whole is NOT
# here: it also covers client-side misuse (encoding a wrong type, a busy connection), our bugs;
# only its "the connection is gone" subclass is.
_UNAVAILABLE = (
    asyncpg.PostgresConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.IdleInTransactionSessionTimeoutError,
    ConnectionError,
)
_NETWORK_ERRNOS = frozenset({
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTUNREACH,
    errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE, errno.ETIMEDOUT,
})  # fmt: skip


def _network_error(exc: Exception) -> bool:
    """A socket error reaching the database (a missing Unix socket is ENOENT without a file
    name; a missing file of ours has one)."""
    if not isinstance(exc, OSError):
        return False
    return exc.errno in _NETWORK_ERRNOS or (exc.errno == errno.ENOENT and exc.filename is None)


def database_unreachable(exc: BaseException) -> bool:
    """The database cannot be reached or is going away (not: it answered with an error)."""
    return isinstance(exc, _UNAVAILABLE) or (isinstance(exc, Exception) and _network_error(exc))


def status_for(rpc: str, exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and caller-safe message for `exc`; logs what an operator must see."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, RETRYABLE_DB):
        log.info("%s: transaction aborted by the database: %s", rpc, exc)
        return (
            grpc.StatusCode.ABORTED,
            f"{rpc}: conflicted with a concurrent transaction; retry the call",
        )
    if isinstance(exc, TimeoutError | asyncpg.QueryCanceledError):
        return (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"{rpc}: the query did not finish before the deadline",
        )
    if database_unreachable(exc):
        log.warning("%s: database unavailable: %s: %s", rpc, type(exc).__name__, exc)
        return grpc.StatusCode.UNAVAILABLE, f"{rpc}: the database is unavailable"
    log.error("%s failed", rpc, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"{rpc}: internal error"


async def abort_for(context: grpc.aio.ServicerContext, rpc: str, exc: Exception) -> NoReturn:
    """Abort the call with the status that fits `exc`, most specific first."""
    code, message = status_for(rpc, exc)
    await context.abort(code, message)
    raise AssertionError("context.abort returned")


def call_bound(servicer: Any, request: Any, context: grpc.aio.ServicerContext) -> float | None:
    """Seconds a unary call may run in all when its caller set no deadline: the default query
    timeout (QUERY_TIMEOUT_SECONDS). With a deadline gRPC itself cancels the call when it
    passes; without one, this bound also ends a call stuck where no statement timeout reaches
    (e.g. a ROLLBACK waiting on a frozen database). Client streams have their own bounds."""
    if context.time_remaining() is not None or not isinstance(request, Message):
        return None
    config = getattr(getattr(servicer, "app", None), "config", None)
    bound = getattr(config, "default_query_timeout", None)
    return float(bound) if bound is not None else None


# Calls given up on by `within`, still cleaning up; kept referenced until they end.
_ABANDONED: set[asyncio.Task[Any]] = set()


async def within(seconds: float, call: Awaitable[T]) -> T:
    """Run `call`, answering TimeoutError after `seconds` even if its cleanup (a ROLLBACK on a
    frozen database, say) cannot finish yet: it is cancelled and left to end on its own."""
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task in done:
        return task.result()
    task.cancel()
    _ABANDONED.add(task)
    task.add_done_callback(_ABANDONED.discard)
    raise TimeoutError


T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def rpc(name: str) -> Callable[[F], F]:
    """Decorate a servicer method so every error leaves as the right gRPC status."""

    def decorate(method: F) -> F:
        @functools.wraps(method)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                bound = call_bound(self, request, context)
                if bound is None:
                    return await method(self, request, context)
                return await within(bound, method(self, request, context))
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await abort_for(context, name, exc)

        return cast(F, wrapper)

    return decorate
