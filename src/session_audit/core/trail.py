"""The tamper-evident trail: one hash chain per org (docs/retention.md).

Every change to an org's stored sessions (ingest, lock, unlock, purge) and every change made
through the API appends an entry: seq, time, actor, kind, object type and ids, the digest of
the objects' new content, and the previous entry's hash, hashed together with SHA-256:

    hash = SHA-256(prev || canonical JSON [org, seq, at, actor, kind, object_type,
                                           object_ids, items, digest hex])

An entry about sessions covers a whole batch: its items (trail_items) hold each session's
id and the digest of its stored row after the change (NULL when deleted), and the entry's
digest is SHA-256 over (id bytes || item digest) in id order, so the head is taken once per
batch, not per row. A row's digest is computed by PostgreSQL (`ROW_DIGEST`), the same
expression when writing and when verifying.

The head (trail_heads) is locked per org for the last moment of the writing transaction, so
two tenants never wait for each other, and entries are numbered in commit order. Callers take
the head after their row changes (row locks first, head last: no lock cycle).

`verify` reads the chain, the items and the live rows in one snapshot and reports the first
entry that does not hold: a hash that does not chain, an entry whose items do not match its
digest, or a session whose stored content differs from its last entry (changed, deleted or
re-inserted outside the service), or a session no entry covers.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from session_audit.core.db import Conn
from session_audit.core.schema import INGEST_COLUMNS

ZERO = bytes(32)
_TIMES = frozenset({"start_date", "end_date"})


def _digest_part(col: str) -> str:
    # Times as exact epoch seconds (a text form would follow the session's TimeZone); the
    # array column through to_jsonb, so its elements are separated by ", " as jsonb prints them.
    if col in _TIMES:
        return f"extract(epoch FROM s.{col})"
    if col in _ARRAYS:
        return f"to_jsonb(s.{col})"
    return f"s.{col}"


_ARRAYS = frozenset({"review_approvers"})

# The digest of a stored session (alias `s`): SHA-256 of the JSON array of every column ingest
# writes and the lock. The text is the one `jsonb_build_array(…)::text` gives (what the trail
# was first written with; tests/test_trail.py checks the two agree on every kind of value),
# built with json_build_array, which is ~20% cheaper per row.
ROW_DIGEST = (
    "sha256(convert_to(json_build_array("
    + ", ".join(_digest_part(c) for c in (*INGEST_COLUMNS, "retention_locked"))
    + ")::text, 'UTF8'))"
)

# Takes (and on first use creates) the org's head; the row stays locked until commit.
LOCK_HEAD = """
INSERT INTO trail_heads AS h (org_id, seq, hash) VALUES ($1, 0, $2)
ON CONFLICT (org_id) DO UPDATE SET seq = h.seq
RETURNING seq, hash, (xmax = 0) AS created
"""
INSERT_ENTRY = """
WITH e AS (
    INSERT INTO trail_entries (org_id, seq, at, actor, kind, object_type, object_ids, items,
                               digest, prev, hash)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
)
UPDATE trail_heads SET seq = $2, hash = $11 WHERE org_id = $1
"""


def _write_items_sql(match: str) -> str:
    """Digest the org's sessions `match` selects ($3: ids), store them as entry $2's items and
    return their count and the entry's digest (items_digest's definition, in SQL): one
    statement, nothing per row travels to Python."""
    return f"""
WITH d AS MATERIALIZED (
    SELECT s.id, {ROW_DIGEST} AS digest
      FROM sessions s
     WHERE s.org_id = $1 AND {match}
), w AS (
    INSERT INTO trail_items (org_id, seq, session_id, digest)
    SELECT $1, $2, d.id, d.digest FROM d
)
SELECT count(*) AS n,
       sha256(coalesce(string_agg(uuid_send(d.id) || d.digest, ''::bytea ORDER BY d.id),
                       ''::bytea)) AS digest
  FROM d
"""  # noqa: S608 - ROW_DIGEST and `match` are code constants


ITEMS_OF_SESSIONS = _write_items_sql("s.id = any($3::uuid[])")
ITEMS_OF_ORG = _write_items_sql("NOT (s.id = any($3::uuid[]))")
ITEMS_DELETED = """
INSERT INTO trail_items (org_id, seq, session_id, digest)
SELECT $1, $2, x, NULL FROM unnest($3::uuid[]) x
"""


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def content_digest(value: Any) -> bytes:
    """Digest of an API object's new content (a policy, a hold)."""
    return hashlib.sha256(canonical(value)).digest()


def items_digest(items: Sequence[tuple[uuid.UUID, bytes | None]]) -> bytes:
    h = hashlib.sha256()
    for sid, digest in sorted(items, key=lambda x: x[0]):
        h.update(sid.bytes)
        h.update(digest if digest is not None else ZERO)
    return h.digest()


@dataclass(frozen=True)
class Entry:
    org_id: uuid.UUID
    seq: int
    at: datetime
    actor: str
    kind: str
    object_type: str
    object_ids: tuple[str, ...]
    items: int
    digest: bytes
    prev: bytes

    def body(self) -> bytes:
        return canonical(
            [
                str(self.org_id),
                self.seq,
                self.at.astimezone(UTC).isoformat(timespec="microseconds"),
                self.actor,
                self.kind,
                self.object_type,
                list(self.object_ids),
                self.items,
                self.digest.hex(),
            ]
        )

    def hash(self) -> bytes:
        return hashlib.sha256(self.prev + self.body()).digest()

    def to_json(self, hash_: bytes) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at.astimezone(UTC).isoformat(timespec="microseconds"),
            "actor": self.actor,
            "kind": self.kind,
            "object_type": self.object_type,
            "object_ids": list(self.object_ids),
            "items": self.items,
            "digest": self.digest.hex(),
            "prev": self.prev.hex(),
            "hash": hash_.hex(),
        }


class Head:
    """The org's chain head, locked: append entries with `add` (all in the caller's
    transaction)."""

    def __init__(self, conn: Conn, org_id: uuid.UUID, seq: int, hash_: bytes, timeout: float):
        self.conn = conn
        self.org_id = org_id
        self.seq = seq
        self.hash = hash_
        self.timeout = timeout

    async def add(
        self,
        actor: str,
        kind: str,
        object_type: str,
        object_ids: Sequence[str],
        digest: bytes,
        items: int = 0,
    ) -> Entry:
        entry = Entry(
            self.org_id,
            self.seq + 1,
            datetime.now(UTC),
            actor,
            kind,
            object_type,
            tuple(object_ids),
            items,
            digest,
            self.hash,
        )
        h = entry.hash()
        await self.conn.execute(
            INSERT_ENTRY,
            self.org_id,
            entry.seq,
            entry.at,
            actor,
            kind,
            object_type,
            list(entry.object_ids),
            items,
            digest,
            self.hash,
            h,
            timeout=self.timeout,
        )
        self.seq, self.hash = entry.seq, h
        return entry

    async def add_sessions(
        self, actor: str, kind: str, ids: Sequence[uuid.UUID], *, deleted: bool = False
    ) -> Entry | None:
        """An entry for these sessions as now stored (or deleted); none when `ids` is empty."""
        seq = self.seq + 1
        if deleted:
            await self.conn.execute(
                ITEMS_DELETED, self.org_id, seq, list(ids), timeout=self.timeout
            )
            n, digest = len(ids), items_digest([(i, None) for i in ids])
        else:
            n, digest = await _write_items(
                self.conn, self.org_id, seq, ITEMS_OF_SESSIONS, list(ids), self.timeout
            )
        if not n:
            return None
        return await self.add(actor, kind, "sessions", (), digest, n)


async def _write_items(
    conn: Conn, org_id: uuid.UUID, seq: int, query: str, ids: list[uuid.UUID], timeout: float
) -> tuple[int, bytes]:
    """Store the sessions `query` selects as entry `seq`'s items: (how many, their digest)."""
    row = await conn.fetchrow(query, org_id, seq, ids, timeout=timeout)
    assert row is not None  # an aggregate without GROUP BY returns one row
    return int(row["n"]), bytes(row["digest"])


async def lock_head(
    conn: Conn, org_id: uuid.UUID, timeout: float, covered: Sequence[uuid.UUID] = ()
) -> Head:
    """Lock the org's head until the caller's transaction ends. The first time, the chain
    starts with a genesis entry covering every session the org already has (except those
    `covered` by the caller's own next entry)."""
    row = await conn.fetchrow(LOCK_HEAD, org_id, ZERO, timeout=timeout)
    assert row is not None  # INSERT … ON CONFLICT DO UPDATE returns its row
    head = Head(conn, org_id, row["seq"], row["hash"], timeout)
    if row["created"]:
        n, digest = await _write_items(conn, org_id, 1, ITEMS_OF_ORG, list(covered), timeout)
        await head.add("service", "genesis", "sessions", (), digest, n)
    return head


async def record(
    conn: Conn,
    org_id: uuid.UUID,
    actor: str,
    kind: str,
    object_type: str,
    object_ids: Sequence[str],
    content: Any,
    timeout: float,
) -> Entry:
    """One entry for an API change (call last in the transaction: it takes the head)."""
    head = await lock_head(conn, org_id, timeout)
    return await head.add(actor, kind, object_type, object_ids, content_digest(content))


async def record_sessions(
    conn: Conn,
    org_id: uuid.UUID,
    actor: str,
    kind: str,
    ids: Sequence[uuid.UUID],
    timeout: float,
    *,
    deleted: bool = False,
) -> Entry | None:
    """One entry for a batch of sessions just written or deleted (call last in the
    transaction, after the rows are changed and locked)."""
    if not ids:
        return None
    head = await lock_head(conn, org_id, timeout, ids)
    return await head.add_sessions(actor, kind, ids, deleted=deleted)


# -- reading and verifying --------------------------------------------------------------------

ENTRIES = """
SELECT e.seq, e.at, e.actor, e.kind, e.object_type, e.object_ids, e.items, e.digest, e.prev,
       e.hash, i.n, i.d
  FROM trail_entries e
  LEFT JOIN LATERAL (
       SELECT count(*) AS n,
              sha256(string_agg(uuid_send(t.session_id) || coalesce(t.digest, $2::bytea),
                                ''::bytea ORDER BY t.session_id)) AS d
         FROM trail_items t
        WHERE t.org_id = e.org_id AND t.seq = e.seq) i ON e.items > 0
 WHERE e.org_id = $1
 ORDER BY e.seq
"""
ENTRIES_PLAIN = """
SELECT seq, at, actor, kind, object_type, object_ids, items, digest, prev, hash
  FROM trail_entries
 WHERE org_id = $1
 ORDER BY seq
"""
HEAD = "SELECT seq, hash FROM trail_heads WHERE org_id = $1"
# Sessions whose stored content is not what their last entry says.
LIVE_MISMATCH = f"""
WITH latest AS (
    SELECT DISTINCT ON (session_id) session_id, seq, digest
      FROM trail_items
     WHERE org_id = $1
     ORDER BY session_id, seq DESC
), live AS (
    SELECT s.id, {ROW_DIGEST} AS digest FROM sessions s WHERE s.org_id = $1
)
SELECT coalesce(l.session_id, v.id) AS id, l.seq, l.digest IS NULL AS was_deleted,
       v.id IS NULL AS is_gone
  FROM latest l FULL JOIN live v ON v.id = l.session_id
 WHERE l.digest IS DISTINCT FROM v.digest
 ORDER BY l.seq NULLS LAST, 1
 LIMIT 1
"""  # noqa: S608


@dataclass(frozen=True)
class Bad:
    seq: int | None
    object_id: str
    reason: str


@dataclass(frozen=True)
class Verdict:
    entries: int
    head: bytes
    bad: Bad | None

    @property
    def ok(self) -> bool:
        return self.bad is None

    def to_json(self) -> dict[str, Any]:
        if self.bad is None:
            return {"ok": True, "entries": self.entries, "head": self.head.hex()}
        b = self.bad
        return {
            "ok": False,
            "first_bad": {"seq": b.seq, "object_id": b.object_id, "reason": b.reason},
        }


def _entry(org_id: uuid.UUID, r: asyncpg.Record) -> Entry:
    return Entry(
        org_id,
        r["seq"],
        r["at"],
        r["actor"],
        r["kind"],
        r["object_type"],
        tuple(r["object_ids"]),
        r["items"],
        r["digest"],
        r["prev"],
    )


async def _check_chain(
    conn: Conn, org_id: uuid.UUID, timeout: float
) -> tuple[int, bytes, Bad | None]:
    prev, n = ZERO, 0
    async for r in conn.cursor(ENTRIES, org_id, ZERO, prefetch=5000, timeout=timeout):
        n += 1
        e = _entry(org_id, r)
        oid = e.object_ids[0] if e.object_ids else ""
        if e.seq != n:
            return n, prev, Bad(n, oid, f"entry {n} is missing (next stored entry is {e.seq})")
        if e.prev != prev:
            return n, prev, Bad(e.seq, oid, "prev does not match the previous entry's hash")
        if e.hash() != r["hash"]:
            return n, prev, Bad(e.seq, oid, "the entry was changed (its hash does not match)")
        if e.items > 0 and (r["n"] != e.items or r["d"] != e.digest):
            return n, prev, Bad(e.seq, oid, "its items were changed (digest does not match)")
        prev = r["hash"]
    head = await conn.fetchrow(HEAD, org_id, timeout=timeout)
    if head is not None and (head["seq"] != n or head["hash"] != prev):
        return (
            n,
            prev,
            Bad(
                n + 1 if head["seq"] > n else head["seq"],
                "",
                "entries after this one were removed (the head is further on)",
            ),
        )
    return n, prev, None


async def verify(conn: Conn, org_id: uuid.UUID, timeout: float) -> Verdict:
    """Recompute the org's chain and the digests of its live sessions, in one snapshot."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        n, head, bad = await _check_chain(conn, org_id, timeout)
        row = await conn.fetchrow(LIVE_MISMATCH, org_id, timeout=timeout)
    live: Bad | None = None
    if row is not None:
        sid = str(row["id"])
        if row["seq"] is None:
            live = Bad(None, sid, "session not in the trail (written outside the service)")
        elif row["was_deleted"]:
            live = Bad(row["seq"], sid, "session present although this entry deleted it")
        elif row["is_gone"]:
            live = Bad(row["seq"], sid, "session deleted outside the service after this entry")
        else:
            live = Bad(row["seq"], sid, "session changed outside the service after this entry")
    candidates = [b for b in (bad, live) if b is not None]
    if not candidates:
        return Verdict(n, head, None)
    first = min(candidates, key=lambda b: b.seq if b.seq is not None else 1 << 62)
    return Verdict(n, head, first)


async def entries(conn: Conn, org_id: uuid.UUID, timeout: float) -> AsyncIterator[dict[str, Any]]:
    """The org's chain in order, as JSON objects (one snapshot; caller holds a transaction)."""
    async for r in conn.cursor(ENTRIES_PLAIN, org_id, prefetch=5000, timeout=timeout):
        yield _entry(org_id, r).to_json(r["hash"])
