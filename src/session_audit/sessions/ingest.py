"""Ingest: validate reported sessions, then upsert them in one transaction.

A batch (a unary request, or a whole client stream) is one transaction. Invalid items are
rejected with their index and reason and the valid ones are stored; a server fault rolls the
whole batch back. Items are written in chunks so a long stream never sits whole in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from session_audit.analytics import rollups
from session_audit.core.db import Conn
from session_audit.sessions import store
from session_audit.sessions.rows import IngestItem, ItemError, item_from_proto, merge_items
from session_audit.v1 import sessions_pb2 as pb

MAX_BATCH = 1000
CHUNK = 5000
YIELD_EVERY = 128
MAX_REPORTED_REJECTIONS = 1000
# (index in the batch, id as sent, reason)
Rejection = tuple[int, str, str]


@dataclass
class IngestResult:
    accepted: int = 0
    written: int = 0
    unchanged: int = 0
    rejected: int = 0
    rejections: list[tuple[int, str, str]] = field(default_factory=list)

    def reject(self, index: int, sid: str, reason: str) -> None:
        self.rejected += 1
        if len(self.rejections) < MAX_REPORTED_REJECTIONS:
            self.rejections.append((index, sid[:80], reason))

    def to_proto(self) -> pb.IngestSessionsResponse:
        return pb.IngestSessionsResponse(
            accepted=self.accepted,
            written=self.written,
            unchanged=self.unchanged,
            rejected=self.rejected,
            rejections=[pb.IngestRejection(index=i, id=s, reason=r) for i, s, r in self.rejections],
        )


class IngestBatch:
    """Feed sessions with `add`; chunks are flushed to the open transaction as they fill.

    With `maintain_rollups` (the default) every chunk's contribution to the rollups is
    captured as it is written and folded in by `finish` (see rollups.py). Without it the org
    is marked stale, so reads use the base tables until `session-audit rollups rebuild`."""

    def __init__(
        self, conn: Conn, org_id: uuid.UUID, timeout: float, *, maintain_rollups: bool = True
    ) -> None:
        self.conn = conn
        self.org_id = org_id
        self.timeout = timeout
        self.maintain_rollups = maintain_rollups
        self.deltas = rollups.Deltas(conn, org_id, timeout)
        self.now = datetime.now(UTC)
        self.result = IngestResult()
        self._next_index = 0
        self._pending: dict[uuid.UUID, tuple[int, IngestItem]] = {}
        self._writer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> IngestBatch:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        # On failure the caller's transaction rolls back; a chunk still being written must
        # not outlive it on the connection.
        if exc is not None and self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(BaseException):
                await self._writer
            self._writer = None

    async def add(self, session: pb.Session) -> None:
        index = self._next_index
        self._next_index += 1
        try:
            item = item_from_proto(session, self.org_id, self.now)
        except ItemError as exc:
            self.result.reject(index, session.id, str(exc))
            return
        self.result.accepted += 1
        earlier = self._pending.get(item.id)
        if earlier is not None:
            # Two reports of one session in a chunk: fold the earlier into the later.
            item = merge_items(earlier[1], item)
        self._pending[item.id] = (index, item)
        if len(self._pending) >= CHUNK:
            await self.flush()
        elif index % YIELD_EVERY == 0 and self._writer is not None:
            # Let the writer send its next statement: a chunk's write is several round trips
            # (COPY, rollup capture), and they only advance when this loop yields.
            await asyncio.sleep(0)

    async def flush(self) -> None:
        """Hand the pending chunk to the writer and return: PostgreSQL stores chunk k while
        Python validates chunk k+1 (chunks are still written one after another, in order)."""
        await self._wait_writer()
        if self._pending:
            pending, self._pending = self._pending, {}
            self._writer = asyncio.create_task(self._write(pending))

    async def _wait_writer(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await writer

    async def _write(self, pending: dict[uuid.UUID, tuple[int, IngestItem]]) -> None:
        # Most chunks are sessions never seen before: try the binary COPY first. It fails
        # fast (savepoint rolled back) when any id is already stored; then the chunk takes
        # the careful path.
        ids = list(pending)
        records = [item.record() for _, item in pending.values()]
        if await store.copy_new(self.conn, records, self.timeout):
            self.result.written += len(pending)
            if self.maintain_rollups:
                await self.deltas.add_records(records)
            return
        while True:
            # Lock what is stored; insert the rest by COPY. If a concurrent batch stored one of
            # "the rest" meanwhile, the COPY fails (after waiting for that batch to commit)
            # and the next round finds and locks it: every stored row we overwrite is locked
            # before its old contribution to the rollups is read.
            existing = await store.lock_existing(self.conn, self.org_id, ids, self.timeout)
            fresh, known, rejected = self._partition(pending, existing)
            records = [item.record() for item in fresh.values()]
            if not fresh or await store.copy_new(self.conn, records, self.timeout):
                break
        for index, sid, reason in rejected:
            self.result.accepted -= 1
            self.result.reject(index, sid, reason)
        self.result.written += len(fresh)
        if self.maintain_rollups:
            await self.deltas.add_records(records)
        if known:
            if self.maintain_rollups:
                await self.deltas.subtract(list(known))
            inserted, updated = await store.upsert(
                self.conn, [item.record() for item in known.values()], self.timeout
            )
            self.result.written += inserted + updated
            if self.maintain_rollups:
                await self.deltas.add(list(known))

    def _partition(
        self,
        pending: dict[uuid.UUID, tuple[int, IngestItem]],
        existing: dict[uuid.UUID, store.Existing],
    ) -> tuple[dict[uuid.UUID, IngestItem], dict[uuid.UUID, IngestItem], list[Rejection]]:
        """Split a chunk into new sessions, stored ones to merge, and rejected reports."""
        fresh: dict[uuid.UUID, IngestItem] = {}
        known: dict[uuid.UUID, IngestItem] = {}
        rejected: list[Rejection] = []
        for sid, (index, item) in pending.items():
            old = existing.get(sid)
            if old is None:
                fresh[sid] = item
            elif (item.end_date or old.end_date or item.start_date) < item.start_date:
                rejected.append((index, str(sid), "start_date: after the stored end_date"))
            else:
                known[sid] = item
        return fresh, known, rejected

    async def finish(self) -> IngestResult:
        """Write what is pending and bring the rollups up to date; the caller commits."""
        await self.flush()
        await self._wait_writer()
        if self.maintain_rollups:
            await self.deltas.apply()
        elif self.result.written:
            await rollups.mark_stale(self.conn, self.org_id, self.timeout)
        self.result.unchanged = self.result.accepted - self.result.written
        return self.result
