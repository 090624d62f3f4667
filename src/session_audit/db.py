"""Connection pool and the per-call query timeout."""

from __future__ import annotations

import json

import asyncpg
import asyncpg.pool

SERVER_SETTINGS = {"jit": "off", "application_name": "session-audit"}


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


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
    )
    return pool


async def connect(dsn: str, *, json_codec: bool = True) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(dsn, server_settings=SERVER_SETTINGS)
    if json_codec:
        await _init_connection(conn)
    return conn


# A connection, whether dedicated or borrowed from the pool.
Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
