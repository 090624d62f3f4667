"""Errors the service raises, each with its gRPC status code, and the one mapping of any other
exception to a status (`status_for`, used by core.rpc.Guard).

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

Anything else that escapes an RPC is mapped by `status_for`, most specific first:

    deadlock / serialization failure            → ABORTED (retryable; docs/reliability.md)
    query cancelled (deadline, statement_timeout) or asyncio timeout → DEADLINE_EXCEEDED
    lost or refused database connection, server shutting down, network errors → UNAVAILABLE
    anything else (asyncpg.InterfaceError: a client-side bug, among them) → INTERNAL, logged
        once as class, SQLSTATE and frames by redact.describe (never the message, which can
        carry session data), never shown to the caller
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import asyncpg
import grpc

from session_audit.core import redact

log = logging.getLogger(__name__)
T = TypeVar("T")


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

# Exceptions that mean the database cannot be reached or is going away (→ UNAVAILABLE).
# asyncpg.InterfaceError as a whole is NOT here: it also covers client-side misuse (encoding a
# wrong type, a busy connection), our bugs; only its "the connection is gone" subclass is.
# Socket errors count by errno (see database_unreachable).
UNAVAILABLE = (
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


def _network_error(exc: BaseException) -> bool:
    """A socket error reaching the database (a missing Unix socket is ENOENT without a file
    name; a missing file of ours has one)."""
    if not isinstance(exc, OSError) or isinstance(exc, TimeoutError):
        return False
    return exc.errno in _NETWORK_ERRNOS or (exc.errno == errno.ENOENT and exc.filename is None)


# What asyncpg (0.30-0.32) says in an InterfaceError, rather than in
# ConnectionDoesNotExistError, when the connection was lost between taking it from the pool and
# using it: PostgreSQL shutting down (`pg_ctl stop -m fast`) closes idle pooled connections, and
# a call that took one a moment before finds it closed (tests/test_faults.py, under load).
_CONNECTION_GONE = ("the underlying connection is closed", "connection is closed")


def _connection_gone(exc: BaseException) -> bool:
    # InternalClientError is asyncpg's own protocol state machine out of step (our misuse is
    # InterfaceError): under load at `pg_ctl stop`, a BEGIN on a connection just taken from the
    # pool failed with "cannot switch to state …; another operation … is in progress". The
    # connection is unusable; a retry gets another one.
    if isinstance(exc, asyncpg.InternalClientError):
        return True
    if not isinstance(exc, asyncpg.InterfaceError):
        return False
    text = str(exc)
    return any(phrase in text for phrase in _CONNECTION_GONE)


def database_unreachable(exc: BaseException) -> bool:
    """The database cannot be reached or is going away (not: it answered with an error)."""
    return isinstance(exc, UNAVAILABLE) or _network_error(exc) or _connection_gone(exc)


def status_for(method: str, exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and caller-safe message for `exc`; logs what an operator must see."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, RETRYABLE_DB):
        log.info("%s: transaction aborted by the database: %s", method, redact.describe(exc))
        return (
            grpc.StatusCode.ABORTED,
            f"{method}: conflicted with a concurrent transaction; retry the call",
        )
    if isinstance(exc, TimeoutError | asyncpg.QueryCanceledError):
        return (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"{method}: the query did not finish before the deadline",
        )
    if database_unreachable(exc):
        log.warning("%s: database unavailable: %s", method, redact.describe(exc))
        return grpc.StatusCode.UNAVAILABLE, f"{method}: the database is unavailable"
    # Class, SQLSTATE and frames only: the message can carry session data (redact.py).
    log.error("%s failed: %s", method, redact.describe(exc))
    return grpc.StatusCode.INTERNAL, f"{method}: internal error"


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
