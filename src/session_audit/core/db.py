"""Connection pools: bounded waits, the request's deadline, and the session settings."""

from __future__ import annotations

import contextvars
import time
from typing import Any

import asyncpg
import asyncpg.pool
import orjson

from session_audit.core.errors import Unavailable

SERVER_SETTINGS = {"jit": "off", "application_name": "session-audit"}

# The deadline (time.monotonic()) of the call being served, set when the caller is
# authenticated (app.App.caller). Pool waits never outlast it.
request_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "request_deadline", default=None
)


def _json_encode(value: object) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


async def _init_connection(conn: asyncpg.Connection) -> None:
    # orjson: decoding the jsonb columns of a listed page is ~4x cheaper than the json module.
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename, encoder=_json_encode, decoder=orjson.loads, schema="pg_catalog"
        )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release hook: asyncpg still rolls back an open transaction and drops listeners; we
    skip its reset query (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL), a round trip on
    every request. Rule that makes it safe: code on pooled connections keeps no session state —
    `SET LOCAL`, `pg_advisory_xact_lock`, no session LISTEN (dedicated connections for that)."""


class BoundedPool(asyncpg.Pool):
    """A pool whose `acquire()` waits at most `acquire_timeout` seconds (connecting a new
    connection included) and never past the current call's deadline. Out of time because the
    pool is busy → Unavailable (UNAVAILABLE, retryable); because of the deadline →
    TimeoutError (DEADLINE_EXCEEDED)."""

    def __init__(self, *args: Any, name: str, acquire_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.name = name
        self.acquire_timeout = acquire_timeout

    async def _acquire(self, timeout: float | None) -> asyncpg.pool.PoolConnectionProxy:
        bound = self.acquire_timeout if timeout is None else min(timeout, self.acquire_timeout)
        deadline = request_deadline.get()
        by_deadline = False
        if deadline is not None and deadline - time.monotonic() < bound:
            bound, by_deadline = max(0.0, deadline - time.monotonic()), True
        try:
            proxy: asyncpg.pool.PoolConnectionProxy = await super()._acquire(bound)  # type: ignore[misc]
        except TimeoutError:
            if by_deadline:
                raise
            raise Unavailable(
                f"database: no {self.name} connection became free within {bound:g} s "
                f"(pool of {self.get_max_size()}); retry later"
            ) from None
        return proxy


async def create_pool(
    dsn: str,
    min_size: int = 2,
    max_size: int = 10,
    *,
    json_codec: bool = True,
    name: str = "pooled",
    acquire_timeout: float = 30.0,
    idle_in_transaction: float | None = None,
) -> asyncpg.Pool:
    """`json_codec=False` leaves json/jsonb as text both ways: ingest hands PostgreSQL the JSON
    it already serialised (and checked) instead of paying for a second encoding.
    `idle_in_transaction` (seconds): PostgreSQL ends a transaction left idle that long, so a
    stuck client of ours can never hold row locks indefinitely."""
    settings = dict(SERVER_SETTINGS)
    if idle_in_transaction is not None:
        settings["idle_in_transaction_session_timeout"] = str(int(idle_in_transaction * 1000))
    pool = BoundedPool(
        dsn,
        name=name,
        acquire_timeout=acquire_timeout,
        min_size=min_size,
        max_size=max_size,
        max_queries=50000,
        max_inactive_connection_lifetime=300.0,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        setup=None,
        init=_init_connection if json_codec else None,
        reset=_keep_session,
        loop=None,
        server_settings=settings,
        command_timeout=None,
    )
    await pool
    return pool


async def connect(dsn: str, *, json_codec: bool = True) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(dsn, server_settings=SERVER_SETTINGS)
    if json_codec:
        await _init_connection(conn)
    return conn


# A connection, whether dedicated or borrowed from the pool.
Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
