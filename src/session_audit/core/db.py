"""Connection pool and the per-call query timeout."""

from __future__ import annotations

import asyncpg
import asyncpg.pool
import orjson

SERVER_SETTINGS = {"jit": "off", "application_name": "session-audit"}


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


async def create_pool(
    dsn: str, min_size: int = 2, max_size: int = 10, *, json_codec: bool = True
) -> asyncpg.Pool:
    """`json_codec=False` leaves json/jsonb as text both ways: ingest hands PostgreSQL the JSON
    it already serialised (and checked) instead of paying for a second encoding."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection if json_codec else None,
        server_settings=SERVER_SETTINGS,
        command_timeout=None,
        reset=_keep_session,
    )
    return pool


async def connect(dsn: str, *, json_codec: bool = True) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(dsn, server_settings=SERVER_SETTINGS)
    if json_codec:
        await _init_connection(conn)
    return conn


# A connection, whether dedicated or borrowed from the pool.
Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
