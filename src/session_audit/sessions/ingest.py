"""Ingest: validate reported sessions, then upsert them in chunks of at most CHUNK items.

A unary batch (at most MAX_BATCH items) is one transaction. A stream is written in chunks of
CHUNK items (the first FIRST_CHUNK) in arrival order, and every chunk is its own transaction,
committed as soon as it is written: a stream never holds one chunk's locks while it waits for
the next, so no transaction ever takes row locks in more than one sorted pass (see "Locks").
Invalid items are rejected with their index and reason and the valid ones are stored; a
server fault rolls back the chunk it hit, while the chunks committed before it stay
(re-sending the whole stream is idempotent: a report already stored changes nothing). A
caller that gives its own connection (seeding, benchmarks) gets every chunk in its one
transaction.

Items of one id in a batch apply in order, as separate reports of that session would: each is
checked against the session as the earlier ones (and the stored row) left it, a bad one is
rejected alone, and the good ones are merged into one row write. The reply counts items: every
item is either rejected or accepted, and every accepted item either wrote (changed the
session) or left it unchanged — `accepted + rejected` is the number of items sent and
`written + unchanged` is `accepted`.

Locks: every transaction takes its session row locks in one sorted pass over one chunk, in one
global order, the session id: the fast-path COPY inserts its chunk sorted by id, the careful
path locks stored rows `FOR UPDATE` in id order and then inserts the new ones sorted by id.
Only then come the rollup rows (one statement per table in a fixed table order, rows in
primary-key order, rollups.py), the retention locks of its own (already locked) sessions and,
last, the org's trail head. Two transactions that overlap in sessions therefore serialize on
the first session they share and cannot form a cycle, whatever the order of their items and
however long the streams. If PostgreSQL still aborts a transaction (deadlock detected,
serialization failure), its chunk — still in memory — is replayed from the start, up to
MAX_ATTEMPTS times; after that the caller gets ABORTED (retryable: re-sending is idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import random
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from session_audit.analytics import rollups
from session_audit.core.db import Conn
from session_audit.core.errors import RETRYABLE_DB, Retryable
from session_audit.core.schema import INGEST_COLUMNS, JSON_COLUMNS
from session_audit.retention.ingest import on_ingest
from session_audit.sessions import store
from session_audit.sessions.rows import IngestItem, ItemError, item_from_proto, merge_items
from session_audit.v1 import sessions_pb2 as pb

MAX_BATCH = 1000
CHUNK = 5000
# A stream's first chunk is smaller: PostgreSQL starts writing after ~30 ms of validation
# instead of ~150, and the pipeline (chunk k written while k+1 is validated) fills sooner.
FIRST_CHUNK = 1000
assert MAX_BATCH <= FIRST_CHUNK <= CHUNK  # a unary batch is one chunk: one transaction
# Validation yields to the event loop every this many items (~0.5 ms of CPU): other calls,
# and the writer resuming after each statement of the previous chunk, wait at most that long.
YIELD_EVERY = 16
MAX_REPORTED_REJECTIONS = 1000
# Attempts of a replayable batch's transaction on deadlock / serialization failure.
MAX_ATTEMPTS = 4
# (index in the batch, id as sent, reason)
Rejection = tuple[int, str, str]
# Opens a connection with a transaction begun on it; leaving the context commits (or rolls
# back on an exception) and gives the connection back.
Opener = Callable[[], contextlib.AbstractAsyncContextManager[Conn]]
Check = Callable[[], Awaitable[None]]

ASYNC_COMMIT = "SET LOCAL synchronous_commit = off"
# Gives the transaction an id, so its (synchronous) commit writes a record and flushes to it.
FLUSH_WAL = "SELECT pg_current_xact_id()"
# Where an ingest record holds the labels (JSON text), and the label that locks on arrival.
_LABELS = INGEST_COLUMNS.index("labels")
_LOCK_LABEL = '"retention_locked"'

AFTER_END = "start_date: after the session's end_date (stored or reported earlier)"
# Session ids in lock order: UUID's own `<` is a Python call per comparison (~7 ms to sort a
# chunk of 5,000, 1 ms by key); its `int` gives the same order with C comparisons.
_ID_ORDER = operator.attrgetter("int")


def _in_id_order(ids: Iterable[uuid.UUID]) -> list[uuid.UUID]:
    return sorted(ids, key=_ID_ORDER)


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


@dataclass(slots=True)
class _Report:
    index: int
    sent_id: str
    item: IngestItem


@dataclass(slots=True)
class _Group:
    """The reports of one id in a chunk, in arrival order (none rejected so far)."""

    reports: list[_Report]
    # The latest end_date among them: a later report without one must not start after it.
    end_date: datetime | None


@dataclass
class _Outcome:
    """What writing one chunk did, per item."""

    written: int = 0
    unchanged: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    # Sessions whose stored labels may carry `retention_locked` (None: any of the chunk's):
    # known when the chunk took the fast path, its rows stored exactly as sent.
    labelled: list[uuid.UUID] | None = None


# The reports of one id merged, and per report whether it changed the session.
_Folded = tuple[IngestItem, list[bool]]


@dataclass(slots=True)
class _Chunk:
    """A chunk ready to write: its groups, its ids in lock order, each id's reports folded,
    and the folded sessions' COPY records in that order (what the fast path sends)."""

    pending: dict[uuid.UUID, _Group]
    ids: list[uuid.UUID]
    folded: dict[uuid.UUID, _Folded]
    records: list[tuple[Any, ...]]


def _comparable(values: dict[str, Any]) -> dict[str, Any]:
    """Column values with JSON compared by meaning (PostgreSQL's jsonb text differs from ours)."""
    return {c: orjson.loads(v) if c in JSON_COLUMNS and isinstance(v, str) else v
            for c, v in values.items()}  # fmt: skip


def _changes_over(stored: dict[str, Any], reports: list[_Report]) -> list[bool]:
    """Whether each report changed the session, applied one after another to the stored row
    (as separate requests would be)."""
    end = stored["end_date"]
    state = IngestItem(stored["id"], stored["start_date"], end, True, stored)
    before = _comparable(stored)
    changed = []
    for r in reports:
        state = merge_items(state, r.item)
        after = _comparable(state.values)
        changed.append(after != before)
        before = after
    return changed


def _fold(reports: list[_Report]) -> _Folded:
    """The reports merged in order, and whether each later one changed what the earlier left."""
    item = reports[0].item
    if len(reports) == 1:
        return item, [True]
    changed = [True]
    for r in reports[1:]:
        merged = merge_items(item, r.item)
        changed.append(merged.values != item.values)
        item = merged
    return item, changed


class IngestBatch:
    """Feed sessions with `add`; chunks are written as they fill.

    With `maintain_rollups` (the default) every chunk's contribution to the rollups is
    captured as it is written and folded in before its commit (see rollups.py). Without it
    the org is marked stale, so reads use the base tables until `session-audit rollups
    rebuild`.

    Made with `on_pool` (the servicer's way), every chunk is its own transaction, opened when
    the chunk is written and committed right after it (a stream buffers its next chunk holding
    no connection), and replayed from memory on a deadlock or serialization failure up to
    MAX_ATTEMPTS times. Given a connection, the caller owns its transaction: every chunk is
    written in it, the rollups and the retention hook run in `finish`, and the caller commits
    after `finish`. `check` runs before every chunk is written (the stream re-checks its
    token there)."""

    def __init__(
        self,
        conn: Conn | None,
        org_id: uuid.UUID,
        timeout: float | Callable[[], float],
        *,
        maintain_rollups: bool = True,
        read_back: bool = True,
        opener: Opener | None = None,
        check: Check | None = None,
        actor: str = "ingest",
    ) -> None:
        if (conn is None) == (opener is None):
            raise ValueError("IngestBatch: give a connection or an opener, not both")
        self.conn = conn
        self.actor = actor
        # Every id written (or found unchanged) on the caller's connection, for the retention
        # hook in `finish` (on_pool: each chunk's transaction runs the hook for its own ids).
        self._ids: list[uuid.UUID] = []
        self.org_id = org_id
        self._timeout = timeout
        self.maintain_rollups = maintain_rollups
        # How the rollups count copied-in sessions (rollups.Deltas.add_copied): read back on
        # one node, sent as values on Citus.
        self.read_back = read_back
        self._opener = opener
        self._check = check
        self._deltas = (
            rollups.Deltas(conn, org_id, self.timeout, read_back=read_back)
            if conn is not None
            else None
        )
        self.now = datetime.now(UTC)
        self.result = IngestResult()
        self._next_index = 0
        self._pending: dict[uuid.UUID, _Group] = {}
        self._pending_items = 0
        self._writer: asyncio.Task[None] | None = None
        self._chunks = 0
        self._outcomes: list[_Outcome] = []
        # Items sent before the end of the last committed chunk (on_pool): stored or rejected.
        self.committed = 0
        # A chunk committed without waiting for its WAL flush, none flushed since (on_pool).
        self._unflushed = False

    @classmethod
    def on_pool(
        cls,
        opener: Opener,
        org_id: uuid.UUID,
        timeout: float | Callable[[], float],
        *,
        maintain_rollups: bool = True,
        read_back: bool = True,
        check: Check | None = None,
        actor: str = "ingest",
    ) -> IngestBatch:
        return cls(
            None,
            org_id,
            timeout,
            maintain_rollups=maintain_rollups,
            read_back=read_back,
            opener=opener,
            check=check,
            actor=actor,
        )

    @property
    def timeout(self) -> float:
        """Seconds the next statement may run (a callable gives the time left to a deadline)."""
        t = self._timeout
        return t() if callable(t) else t

    async def __aenter__(self) -> IngestBatch:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        # A chunk still being written must not outlive the batch: cancelled, its transaction
        # rolls back (on_pool), or the caller's does.
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(BaseException):
                await self._writer
            self._writer = None

    # -- validation ----------------------------------------------------------------------------

    async def add(self, session: pb.Session) -> None:
        index = self._next_index
        self._next_index += 1
        if index % YIELD_EVERY == 0:
            # Validation is pure CPU: let other requests (and the writer's next statement:
            # a chunk's write is several round trips) run between slices of it.
            await asyncio.sleep(0)
        try:
            item = item_from_proto(session, self.org_id, self.now)
        except ItemError as exc:
            self.result.reject(index, session.id, str(exc))
            return
        report = _Report(index, session.id, item)
        group = self._pending.get(item.id)
        if group is None:
            self._pending[item.id] = _Group([report], item.end_date)
        elif (
            item.end_date is None
            and group.end_date is not None
            and (item.start_date > group.end_date)
        ):
            # An earlier report of this batch ended the session before this one starts.
            self.result.reject(index, session.id, AFTER_END)
            return
        else:
            group.reports.append(report)
            group.end_date = item.end_date or group.end_date
        self._pending_items += 1
        if self._pending_items >= (CHUNK if self._chunks else FIRST_CHUNK):
            await self.flush(durable=False)

    async def flush(self, *, durable: bool = True) -> None:
        """Hand the pending chunk to the writer and return: PostgreSQL stores chunk k while
        Python validates chunk k+1 (chunks are still written one after another, in order).
        The chunk is folded into its records before waiting for chunk k's writer, so that
        Python work overlaps chunk k's statements too instead of keeping PostgreSQL idle.
        A chunk of a stream that goes on (`durable=False`) commits without waiting for the
        disk (`synchronous_commit = off`): nothing is acknowledged until the last commit,
        which is synchronous and so makes every earlier chunk durable with it."""
        chunk = None
        if self._pending:
            pending, self._pending, self._pending_items = self._pending, {}, 0
            chunk = await self._prepare(pending)
        await self._wait_writer()
        if chunk is not None:
            self._chunks += 1
            if self._opener is None:
                self._ids.extend(chunk.pending)
                self._writer = asyncio.create_task(self._write_on_conn(chunk))
            else:
                self._writer = asyncio.create_task(
                    self._commit_chunk(chunk, self._next_index, durable)
                )

    @staticmethod
    async def _prepare(pending: dict[uuid.UUID, _Group]) -> _Chunk:
        ids = _in_id_order(pending)
        folded: dict[uuid.UUID, _Folded] = {}
        records: list[tuple[Any, ...]] = []
        for n, sid in enumerate(ids):
            folded[sid] = f = _fold(pending[sid].reports)
            records.append(f[0].record())
            if n % (4 * YIELD_EVERY) == 0:
                await asyncio.sleep(0)
        return _Chunk(pending, ids, folded, records)

    async def _wait_writer(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await writer

    # -- the transactions ----------------------------------------------------------------------

    async def _write_on_conn(self, chunk: _Chunk) -> None:
        """Write a chunk in the caller's transaction (nothing to replay: it is the caller's)."""
        assert self.conn is not None and self._deltas is not None
        if self._check is not None:
            await self._check()
        self._deltas.timeout = self.timeout
        try:
            self._outcomes.append(await self._write(self.conn, self._deltas, chunk))
        except RETRYABLE_DB as exc:
            raise Retryable(
                "ingest: the batch conflicted with a concurrent one and was rolled back; re-send it"
            ) from exc

    async def _commit_chunk(self, chunk: _Chunk, end: int, durable: bool) -> None:
        """One chunk, one transaction: write it, fold its rollup deltas in, run the retention
        hook and the trail entry, commit. Replayed from `chunk` (still in memory) on a
        deadlock or serialization failure, a bounded number of times."""
        assert self._opener is not None
        attempt = 1
        while True:
            if self._check is not None:
                await self._check()
            try:
                async with self._opener() as conn:
                    if not durable:
                        await conn.execute(ASYNC_COMMIT, timeout=self.timeout)
                    deltas = rollups.Deltas(
                        conn, self.org_id, self.timeout, read_back=self.read_back
                    )
                    out = await self._write(conn, deltas, chunk)
                    await self._before_commit(conn, deltas, [out], chunk.ids)
            except RETRYABLE_DB as exc:
                if attempt >= MAX_ATTEMPTS:
                    raise Retryable(
                        f"ingest: the batch conflicted with concurrent ones {MAX_ATTEMPTS} "
                        "times and was rolled back; re-send it"
                    ) from exc
                attempt += 1
                await asyncio.sleep(random.uniform(0.02, 0.1) * attempt)
                continue
            self._outcomes.append(out)
            self.committed = end
            self._unflushed = not durable
            return

    async def _flush_wal(self) -> None:
        """Wait until every chunk committed so far is on disk: a synchronous commit of a
        transaction with an id flushes the WAL up to its commit record, earlier commits too."""
        assert self._opener is not None
        async with self._opener() as conn:
            await conn.execute(FLUSH_WAL, timeout=self.timeout)
        self._unflushed = False

    async def _before_commit(
        self, conn: Conn, deltas: rollups.Deltas, outcomes: list[_Outcome], ids: list[uuid.UUID]
    ) -> None:
        deltas.timeout = self.timeout
        if self.maintain_rollups:
            await deltas.apply()
        elif any(o.written for o in outcomes):
            await rollups.mark_stale(conn, self.org_id, self.timeout)
        labelled: list[uuid.UUID] | None = []
        for o in outcomes:
            labelled = None if labelled is None or o.labelled is None else labelled + o.labelled
        # Retention (locks on arrival) and the org's trail entry: last, so the org's chain
        # head is held only for the moment before commit.
        await on_ingest(conn, self.org_id, self.actor, ids, self.timeout, labelled)

    async def _write(self, conn: Conn, deltas: rollups.Deltas, chunk: _Chunk) -> _Outcome:
        # One lock order for everything: the session id.
        pending, ids, folded, records = chunk.pending, chunk.ids, chunk.folded, chunk.records
        out = _Outcome()
        # Most chunks are sessions never seen before: try the binary COPY first. It fails
        # fast (savepoint rolled back) when any id is already stored; then the chunk takes
        # the careful path.
        if await store.copy_new(conn, records, self.timeout):
            for sid in ids:
                self._count(out, folded[sid][1], True)
            # The key anywhere in the labels' JSON text: a superset of the labelled ones.
            out.labelled = [sid for sid, r in zip(ids, records, strict=True)
                            if r[_LABELS] is not None and _LOCK_LABEL in r[_LABELS]]  # fmt: skip
            if self.maintain_rollups:
                await deltas.add_copied(ids, records)
            return out
        while True:
            # Lock what is stored (in id order); insert the rest by COPY (in id order). If a
            # concurrent batch stored one of "the rest" meanwhile, the COPY fails (after
            # waiting for that batch to commit) and the next round finds and locks it: every
            # stored row we overwrite is locked before its old contribution to the rollups is
            # read.
            existing = await store.lock_existing(conn, self.org_id, ids, self.timeout)
            out = _Outcome()
            fresh, known, kept = self._partition(pending, ids, existing, out)
            records = [fresh[sid][0].record() for sid in _in_id_order(fresh)]
            if not fresh or await store.copy_new(conn, records, self.timeout):
                break
        for _item, changed in fresh.values():
            self._count(out, changed, True)
        if self.maintain_rollups:
            await deltas.add_copied(_in_id_order(fresh), records)
        if known:
            known_ids = _in_id_order(known)
            # Several reports of a stored session: which of them changed it is told by
            # applying them one by one to the stored row (rare: read it only then).
            several = [sid for sid in known_ids if len(known[sid][1]) > 1]
            exact: dict[uuid.UUID, list[bool]] = {}
            if several:
                rows = await store.stored_values(conn, self.org_id, several, self.timeout)
                exact = {sid: _changes_over(rows[sid], kept[sid]) for sid in several}
            if self.maintain_rollups:
                await deltas.subtract(known_ids)
            written = await store.upsert(
                conn, [known[sid][0].record() for sid in known_ids], self.timeout
            )
            for sid in known_ids:
                if sid in exact:
                    flags = exact[sid]
                    out.written += sum(flags)
                    out.unchanged += len(flags) - sum(flags)
                else:
                    self._count(out, known[sid][1], sid in written)
            if self.maintain_rollups:
                await deltas.add(known_ids)
        return out

    @staticmethod
    def _count(out: _Outcome, changed: list[bool], row_written: bool) -> None:
        """Per item: the first wrote iff the row changed; a later one iff it changed what the
        earlier reports left (and the row was written at all)."""
        n_written = sum(changed) if row_written else 0
        out.written += n_written
        out.unchanged += len(changed) - n_written

    def _partition(
        self,
        pending: dict[uuid.UUID, _Group],
        ids: list[uuid.UUID],
        existing: dict[uuid.UUID, store.Existing],
        out: _Outcome,
    ) -> tuple[dict[uuid.UUID, _Folded], dict[uuid.UUID, _Folded], dict[uuid.UUID, list[_Report]]]:
        """Split a chunk into new sessions and stored ones to merge; apply each stored one's
        reports in order against the stored row, rejecting the ones that do not fit."""
        fresh: dict[uuid.UUID, _Folded] = {}
        known: dict[uuid.UUID, _Folded] = {}
        kept_reports: dict[uuid.UUID, list[_Report]] = {}
        for sid in ids:
            reports = pending[sid].reports
            old = existing.get(sid)
            if old is None:
                fresh[sid] = _fold(reports)
                continue
            kept = []
            end = old.end_date
            for r in reports:
                if r.item.end_date is None and end is not None and r.item.start_date > end:
                    out.rejections.append((r.index, r.sent_id, AFTER_END))
                else:
                    kept.append(r)
                    end = r.item.end_date or end
            if kept:
                known[sid] = _fold(kept)
                kept_reports[sid] = kept
        return fresh, known, kept_reports

    async def finish(self) -> IngestResult:
        """Write what is pending. On the caller's connection, bring the rollups up to date and
        run the retention hook (the caller commits); `on_pool`, every chunk has committed."""
        await self.flush()
        await self._wait_writer()
        if self._unflushed:
            await self._flush_wal()
        if self._opener is None and self._chunks:
            assert self.conn is not None and self._deltas is not None
            if self._check is not None:
                await self._check()
            try:
                await self._before_commit(self.conn, self._deltas, self._outcomes, self._ids)
            except RETRYABLE_DB as exc:
                raise Retryable(
                    "ingest: the batch conflicted with a concurrent one and was rolled back; "
                    "re-send it"
                ) from exc
        result = self.result
        for out in self._outcomes:
            result.written += out.written
            result.unchanged += out.unchanged
            for index, sid, reason in out.rejections:
                result.reject(index, sid, reason)
        result.rejections.sort()
        result.accepted = self._next_index - result.rejected
        return result
