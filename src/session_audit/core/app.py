"""What every servicer shares: the pool, the configuration, and the per-call query timeout."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, fields

import asyncpg
import grpc

from session_audit.core import auth
from session_audit.core.config import Config


@dataclass
class App:
    config: Config
    pool: asyncpg.Pool
    # Connections without the JSON codec, for the ingest write path (see db.create_pool).
    ingest_pool: asyncpg.Pool
    tokens: auth.TokenCache = field(default_factory=auth.TokenCache)

    def pools(self) -> dict[str, asyncpg.Pool]:
        """Every pool the app holds, by field name (the `pool` label of the metrics)."""
        found = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: p for name, p in found.items() if isinstance(p, asyncpg.Pool)}

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
        return await auth.authenticate(
            self.pool, context, roles, action, self.timeout(context), self.tokens
        )
