"""What every servicer shares: the pools, the configuration, and the per-call time bounds."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import asyncpg
import grpc

from session_audit.core import auth
from session_audit.core.config import Config


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
