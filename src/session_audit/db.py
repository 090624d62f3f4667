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


async def create_pool(dsn: str, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        server_settings=SERVER_SETTINGS,
        command_timeout=None,
    )
    return pool


async def connect(dsn: str) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(dsn, server_settings=SERVER_SETTINGS)
    await _init_connection(conn)
    return conn


# A connection, whether dedicated or borrowed from the pool.
Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
