"""What every servicer shares: the pools, the configuration, and the per-call time bounds."""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field

import asyncpg
import grpc

from session_audit.core import auth
from session_audit.core.config import Config
from session_audit.core.db import request_deadline


@dataclass
class App:
    config: Config
    # RPC reads and small writes.
    pool: asyncpg.Pool
    # Connections without the JSON codec, for the ingest write path (see db.create_pool).
    ingest_pool: asyncpg.Pool
    tokens: auth.TokenCache = field(default_factory=auth.TokenCache)
    # Report generation and the scheduler (None: share `pool`). Separate so generators, which
    # hold a connection for a whole generation, can never starve RPCs or each other.
    report_pool: asyncpg.Pool | None = None

    def timeout(self, context: grpc.aio.ServicerContext) -> float:
        """Seconds a query may run: the caller's remaining deadline, else the default."""
        remaining: float | None = context.time_remaining()
        default = self.config.default_query_timeout
        if remaining is None:
            return default
        return max(0.001, min(default, remaining))

    async def caller(
        self, context: grpc.aio.ServicerContext, roles: Collection[str], action: str
    ) -> auth.Principal:
        """Authenticate the call; from here on pool waits are bounded by its deadline."""
        remaining: float | None = context.time_remaining()
        if remaining is not None:
            request_deadline.set(time.monotonic() + remaining)
        return await auth.authenticate(
            self.pool, context, roles, action, self.timeout(context), self.tokens
        )
