"""Read replicas: read-only calls on a streaming standby, when it is fresh enough for the caller.

With DATABASE_READ_URL set, list, get, the session report, histogram, stats and downloads run
on the standby (`Reads.run`), except:

  * read-your-writes: after an ingest commits, that caller (its token) reads from the primary
    until the standby has replayed past the LSN the primary was at after the commit;
  * a standby lagging more than READ_MAX_LAG_SECONDS (measured as the age of the newest
    primary LSN sample the standby has replayed past, sampled every `interval`), or
    unreachable, is not used;
  * a call that fails on the standby because the standby went away (or a query was cancelled
    by a recovery conflict) runs again on the primary, in the same request.

Without DATABASE_READ_URL every read runs on the primary pool, at no cost. Per process: a
caller's writes are known to the process that took them (see docs/scaling.md for several
instances).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from session_audit.core.db import Conn

log = logging.getLogger(__name__)

T = TypeVar("T")

PRIMARY_LSN = "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"
STANDBY_LSN = "SELECT pg_last_wal_replay_lsn() - '0/0'::pg_lsn"
# How long a caller's write is remembered at most (a standby that never catches up sends the
# caller to the primary meanwhile anyway, through the lag bound).
WRITE_MEMORY_SECONDS = 3600.0
# Errors of the standby itself (gone, restarting, recovery conflict), not of the query.
STANDBY_GONE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.SerializationError,  # canceling statement due to conflict with recovery
)


class Behind(Exception):
    """Raised by a read that found the standby not (yet) holding what the primary showed: the
    read runs again on the primary."""


class Reads:
    def __init__(
        self,
        primary: asyncpg.Pool,
        standby: asyncpg.Pool | None = None,
        max_lag: float = 10.0,
        interval: float = 0.5,
    ) -> None:
        self.primary = primary
        self.standby = standby
        self.max_lag = max_lag
        self.interval = interval
        # Token id -> (primary LSN after the caller's last write, monotonic time).
        self._written: dict[int, tuple[int, float]] = {}
        self._replayed = -1
        self._lag = float("inf")
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._task: asyncio.Task[None] | None = None

    # -- which pool --------------------------------------------------------------------------

    @property
    def lag(self) -> float:
        return self._lag

    def _standby_for(self, token_id: int) -> bool:
        if self.standby is None or self._lag > self.max_lag:
            return False
        written = self._written.get(token_id)
        if written is None:
            return True
        if self._replayed >= written[0]:
            self._written.pop(token_id, None)
            return True
        return False

    async def run(self, token_id: int, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """`fn` on a connection of the standby when it may serve this caller, else (or when
        the standby fails under it) of the primary."""
        if self.standby is not None and self._standby_for(token_id):
            try:
                async with self.standby.acquire() as conn:
                    return await fn(conn)
            except Behind:
                pass
            except STANDBY_GONE as exc:
                log.warning("standby failed (%s); reading from the primary", type(exc).__name__)
                self._lag = float("inf")
        async with self.primary.acquire() as conn:
            return await fn(conn)

    # -- what happened -----------------------------------------------------------------------

    async def wrote(self, token_id: int) -> None:
        """Call after the caller's write committed."""
        if self.standby is None:
            return
        lsn = int(await self.primary.fetchval(PRIMARY_LSN))
        self._written[token_id] = (lsn, time.monotonic())

    async def probe(self) -> None:
        """Sample the primary's LSN and the standby's replay position; update the lag."""
        assert self.standby is not None
        now = time.monotonic()
        self._samples.append((now, int(await self.primary.fetchval(PRIMARY_LSN))))
        try:
            replayed = await self.standby.fetchval(STANDBY_LSN, timeout=max(1.0, self.interval))
        except (*STANDBY_GONE, asyncpg.PostgresError, TimeoutError):  # type: ignore[misc]
            self._lag = float("inf")
            return
        if replayed is None:  # not a standby (or not in recovery any more)
            self._lag = float("inf")
            return
        self._replayed = int(replayed)
        # The newest sample the standby has replayed past bounds how stale it is.
        newest = None
        for t, lsn in self._samples:
            if lsn <= self._replayed:
                newest = t
        while len(self._samples) > 1 and self._samples[1][1] <= self._replayed:
            self._samples.popleft()
        oldest = self._samples[0][0]
        self._lag = now - newest if newest is not None else now - oldest
        horizon = now - WRITE_MEMORY_SECONDS
        for token_id, (_, at) in list(self._written.items()):
            if at < horizon:
                self._written.pop(token_id, None)

    async def _loop(self) -> None:
        while True:
            try:
                await self.probe()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the primary is down: health reports it
                self._lag = float("inf")
                log.debug("read replica probe failed: %s", exc)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self.standby is not None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
