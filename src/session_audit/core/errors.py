"""Errors the service raises, each with its gRPC status code (mapped by core.rpc.Guard).

    ServiceError             base: carries a message safe to show the caller
    ├── InvalidArgument      bad request input; the message names the parameter → INVALID_ARGUMENT
    ├── Unauthenticated      missing/unknown/revoked token → UNAUTHENTICATED (HTTP 401)
    ├── PermissionDenied     the token's role may not do this → PERMISSION_DENIED (HTTP 403)
    ├── NotFound             no such row in the caller's org → NOT_FOUND (HTTP 404)
    ├── Conflict             the row is not in a state that allows this → ABORTED (HTTP 409)
    └── FailedPrecondition   request valid but cannot be answered now → FAILED_PRECONDITION (400)

Anything else that escapes an RPC is mapped by core.rpc: a query cancelled by the caller's
deadline → DEADLINE_EXCEEDED, a lost or refused database connection → UNAVAILABLE, and the
rest → INTERNAL (logged as class, SQLSTATE and frames by redact.describe — never the
message, which can carry session data — and never shown to the caller).
"""

from __future__ import annotations

import asyncpg
import grpc


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


# Exceptions that mean the database is unreachable (→ UNAVAILABLE).
UNAVAILABLE = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    ConnectionError,
    OSError,
)
