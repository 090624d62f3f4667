"""What every servicer shares: the pools, the configuration, and the per-call time bounds."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import TypeVar

import asyncpg
import grpc

from session_audit.core import auth
from session_audit.core.config import Config
from session_audit.core.db import Conn
from session_audit.core.reads import Reads

T = TypeVar("T")


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
    # Where read-only calls run (a standby when DATABASE_READ_URL is set); see core/reads.py.
    reads: Reads | None = None
    # The database is a Citus coordinator (sessions distributed by org): ingest then sends the
    # rollups the values of copied-in sessions instead of reading them back (rollups.Deltas).
    distributed: bool = False

    async def read(self, token_id: int, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """A read-only call of the caller with this token: on the standby when it may serve
        them, else on the primary."""
        if self.reads is None:
            async with self.pool.acquire() as conn:
                return await fn(conn)
        return await self.reads.run(token_id, fn)

    async def wrote(self, who: auth.Principal) -> None:
        """After `who`'s write committed: their reads stay on the primary until the standby
        has replayed past the primary's position now (which is past the commit)."""
        if self.reads is not None:
            await self.reads.wrote(who.token_id)

    def pools(self) -> dict[str, asyncpg.Pool]:
        """Every pool the app holds, by field name (the `pool` label of the metrics)."""
        found = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: p for name, p in found.items() if isinstance(p, asyncpg.Pool)}

    def remaining(self, context: grpc.aio.ServicerContext) -> float:
        """Seconds left of the caller's deadline; the default query bound when it set none.
        The one place a deadline is read."""
        left: float | None = context.time_remaining()
        return self.config.default_query_timeout if left is None else left

    def timeout(self, context: grpc.aio.ServicerContext) -> float:
        """Seconds a query may run: what is left of the caller's deadline, at most the default
        (and never zero or negative)."""
        return max(0.001, min(self.config.default_query_timeout, self.remaining(context)))
