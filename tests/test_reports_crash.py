"""A report whose generation dies with its server process (SIGKILL, as the OOM killer does) is
picked up again by the next process, each interrupted start counted; after three it is failed
with the reason instead of killing process after process."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from session_audit.core import auth, db, migrate
from tests.support import ServerProcess, Stack, drop_database, fresh_database


@pytest.fixture()
def own_database(stack: Stack) -> Iterator[str]:
    """A database of its own: the shared stack's generators must not claim this report."""
    dsn, name = fresh_database(stack.dsn)
    yield dsn
    drop_database(stack.dsn, name)


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def test_generation_that_dies_with_its_process_is_retried_then_failed(
    own_database: str, tmp_path: Path
) -> None:
    env = {"REPORT_POLL_INTERVAL_MS": "100", "REPORT_SCHEDULER": "0", "REPORT_GENERATORS": "1"}

    async def scenario() -> None:
        conn = await db.connect(own_database)
        blocker = await db.connect(own_database)
        try:
            await migrate.migrate(conn)
            await auth.create_token(conn, "crash", "admin", "admin@crash.example")
            org = await conn.fetchval("SELECT id FROM orgs WHERE name = 'crash'")
            rid = await conn.fetchval(
                "INSERT INTO reports (org_id, owner, owner_scope, defined_report_id, type, title)"
                " VALUES ($1, 'admin@crash.example', 'org', 11, 'session_summary', 'doomed')"
                " RETURNING id",
                org,
            )

            async def attempts() -> int:
                n = await conn.fetchval(
                    "SELECT attempts FROM report_attempts WHERE report_id = $1", rid
                )
                return int(n or 0)

            async def unclaimed() -> bool:
                # The killed server's backend is gone and its transaction rolled back.
                try:
                    async with conn.transaction():
                        row = await conn.fetchrow(
                            "SELECT status FROM reports WHERE org_id = $1 AND id = $2"
                            " FOR UPDATE NOWAIT",
                            org,
                            rid,
                        )
                    return row is not None and row["status"] == "pending"
                except asyncpg.LockNotAvailableError:
                    return False

            for attempt in (1, 2, 3):

                async def counted(expected: int = attempt) -> bool:
                    return await attempts() == expected

                # Generation will block writing its rows, like one that runs out of memory there.
                tx = blocker.transaction()
                await tx.start()
                await blocker.execute("LOCK TABLE report_rows IN EXCLUSIVE MODE")
                server = ServerProcess(own_database, tmp_path, env_extra=env)
                await asyncio.to_thread(server.start)
                await _until(counted)
                assert server.proc is not None
                os.killpg(server.proc.pid, signal.SIGKILL)
                server.proc.wait(30)
                await tx.rollback()
                await _until(unclaimed)

            server = ServerProcess(own_database, tmp_path, env_extra=env)
            await asyncio.to_thread(server.start)
            try:

                async def settled() -> bool:
                    status = await conn.fetchval("SELECT status FROM reports WHERE id = $1", rid)
                    return bool(status != "pending")

                await _until(settled)
            finally:
                server.stop()
            row = await conn.fetchrow("SELECT status, failure FROM reports WHERE id = $1", rid)
            assert row is not None and row["status"] == "failed"
            assert row["failure"].startswith("generation was interrupted 3 times")
            assert (
                await conn.fetchval("SELECT count(*) FROM report_rows WHERE report_id = $1", rid)
                == 0
            )
            assert await attempts() == 0  # the count goes with the outcome
        finally:
            await blocker.close()
            await conn.close()

    asyncio.run(scenario())
