"""Retention benchmark (issue 15). Not a test: prints figures, asserts nothing.

    make bench-retention                                   # 1M expired of 3M sessions
    .venv/bin/python bench/bench_retention.py --old 200000 --fresh 400000
    .venv/bin/python bench/bench_retention.py --others 8000000 --fresh 1000000  # 1M of 10M
    .venv/bin/python bench/bench_retention.py --reuse --data-dir DIR    # beside another data set
    .venv/bin/python bench/bench_retention.py --only-chain --chain-sessions 100000  # trail cost

One run, one machine: a fresh embedded PostgreSQL in .bench-data-retention/ (`--data-dir`, or
DATABASE_URL's server) and the real server process (background purge off). `--others N` first
fills the table with N sessions of four other orgs, generated in SQL as `bench_analytics` does
(fast; those orgs are not purged), so the purge works in a table of `--others + --old +
--fresh` rows. It prints
  * ingest sessions/s with and without the trail and lock hook (the same IngestBatch, the hook
    replaced by a no-op for "without"), alternating segment by segment so both see the same
    noise and table sizes;
  * the purge of the expired sessions (`--old`, all older than the 30-day policy) out of
    `--old + --fresh`: duration and sessions/s, and the p50/p99 of a concurrent gRPC load
    (ingest batches of 100 and ListSessions first pages) during the purge next to the same
    load without it;
  * a legal hold over every live session of the org (after the purge): how long the request
    took and how long until every session was locked, with the same load's p50/p99 during it;
  * verify: the time for the purged org (its live sessions and entries), and for a chain of
    `--entries` entries (written directly, hashes computed as the service does).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_analytics import load as load_others
from bench.bench_sessions import machine, pct
from session_audit.core import auth, db, migrate, trail
from session_audit.embedded import EmbeddedPostgres
from session_audit.retention import purge, store
from session_audit.retention.config import HOLD_WINDOW
from session_audit.seed import demo_sessions
from session_audit.sessions import ingest
from session_audit.v1 import retention_pb2 as rpb
from session_audit.v1 import retention_pb2_grpc as rpb_grpc
from session_audit.v1 import sessions_pb2 as pb
from session_audit.v1 import sessions_pb2_grpc as pb_grpc
from tests.support import ServerProcess

BATCH = 1000


async def ingest_all(
    pool: asyncpg.Pool, org_id: uuid.UUID, sessions: list[pb.Session], per_tx: int
) -> float:
    """Seconds to ingest `sessions` in transactions of `per_tx` (batches of 1000 each)."""
    t0 = time.perf_counter()
    for i in range(0, len(sessions), per_tx):
        async with pool.acquire() as conn, conn.transaction():
            async with ingest.IngestBatch(conn, org_id, 600, actor="bench") as b:
                for s in sessions[i : i + per_tx]:
                    await b.add(s)
                await b.finish()
    return time.perf_counter() - t0


async def no_hook(*args: Any, **kw: Any) -> None:
    return None


def segments(items: list[pb.Session], n: int) -> Iterator[list[pb.Session]]:
    size = max(1, len(items) // n)
    for i in range(0, len(items), size):
        yield items[i : i + size]


async def chain_cost(pool: asyncpg.Pool, conn: asyncpg.Connection, n: int, segs: int) -> None:
    rng = random.Random(7)
    now = datetime.now(UTC)
    org_on = await auth.ensure_org(conn, f"chain-on-{uuid.uuid4().hex[:6]}")
    org_off = await auth.ensure_org(conn, f"chain-off-{uuid.uuid4().hex[:6]}")
    with_hook = list(demo_sessions(rng, "on", n, now, 30))
    without = list(demo_sessions(rng, "off", n, now, 30))
    t_on = t_off = 0.0
    hooks = vars(ingest)  # the module's globals: IngestBatch.finish looks the hook up there
    real = hooks["on_ingest"]
    for a, b in zip(segments(with_hook, segs), segments(without, segs), strict=False):
        hooks["on_ingest"] = real
        t_on += await ingest_all(pool, org_on, a, BATCH)
        hooks["on_ingest"] = no_hook
        t_off += await ingest_all(pool, org_off, b, BATCH)
    hooks["on_ingest"] = real
    on, off = n / t_on, n / t_off
    print(f"ingest   {n:,} sessions each, batches of {BATCH}, {segs} alternating segments")
    print(f"         with trail+locks {on:,.0f}/s   without {off:,.0f}/s   "
          f"cost {100 * (off - on) / off:.1f}%")  # fmt: skip


async def load(target: str, token: str, stop: asyncio.Event, lat: dict[str, list[float]]) -> None:
    channel = grpc.aio.insecure_channel(target)
    stub = pb_grpc.SessionServiceStub(channel)
    md = (("authorization", f"Bearer {token}"),)
    rng = random.Random()
    now = datetime.now(UTC)

    async def ingest_loop() -> None:
        while not stop.is_set():
            batch = list(demo_sessions(rng, "load", 100, now, 5))
            t0 = time.perf_counter()
            await stub.IngestSessions(pb.IngestSessionsRequest(sessions=batch), metadata=md)
            lat["ingest"].append(time.perf_counter() - t0)

    async def list_loop() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            await stub.ListSessions(pb.ListSessionsRequest(limit=50), metadata=md)
            lat["list"].append(time.perf_counter() - t0)

    await asyncio.gather(ingest_loop(), list_loop(), list_loop())
    await channel.close()


def show(label: str, lat: dict[str, list[float]]) -> None:
    parts = [
        f"{k} p50 {1000 * pct(v, 0.5):.1f} ms p99 {1000 * pct(v, 0.99):.1f} ms (n={len(v)})"
        for k, v in lat.items()
    ]
    print(f"         {label:<15} " + "   ".join(parts))


async def synthetic_chain(conn: asyncpg.Connection, n: int) -> uuid.UUID:
    """An org whose chain has `n` API entries, hashed as the service hashes them."""
    org = await auth.ensure_org(conn, f"chain-{uuid.uuid4().hex[:6]}")
    prev = trail.ZERO
    rows = []
    at = datetime.now(UTC)
    for seq in range(1, n + 1):
        e = trail.Entry(org, seq, at, "bench", "update", "retention_policy", (str(org),), 0,
                        trail.content_digest({"days": seq % 100 + 1}), prev)  # fmt: skip
        h = e.hash()
        rows.append((org, seq, at, "bench", "update", "retention_policy", [str(org)], 0,
                     e.digest, prev, h))  # fmt: skip
        prev = h
    await conn.copy_records_to_table("trail_entries", records=rows, columns=[
        "org_id", "seq", "at", "actor", "kind", "object_type", "object_ids", "items", "digest",
        "prev", "hash"])  # fmt: skip
    await conn.execute("INSERT INTO trail_heads VALUES ($1, $2, $3)", org, n, prev)
    return org


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", type=int, default=1_000_000, help="expired sessions to purge")
    ap.add_argument("--fresh", type=int, default=2_000_000, help="sessions the policy keeps")
    ap.add_argument("--chain-sessions", type=int, default=200_000, help="per side")
    ap.add_argument("--entries", type=int, default=1_000_000, help="synthetic chain length")
    ap.add_argument("--load-seconds", type=float, default=20.0)
    ap.add_argument("--others", type=int, default=0,
                    help="sessions of 4 other orgs, generated in SQL first")  # fmt: skip
    ap.add_argument("--data-dir", type=Path, default=ROOT / ".bench-data-retention")
    ap.add_argument("--reuse", action="store_true",
                    help="add to the database in --data-dir instead of starting afresh "
                         "(e.g. bench_analytics' 10M set; its orgs are not purged)")  # fmt: skip
    ap.add_argument(
        "--only-chain",
        action="store_true",
        help="measure only the trail's ingest cost (with/without), then stop",
    )
    args = ap.parse_args()
    data_dir = args.data_dir
    print(f"machine  {machine()}")
    print(f"date     {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    url = os.environ.get("DATABASE_URL", "")
    embedded = None
    if not url:
        if not args.reuse:
            shutil.rmtree(data_dir, ignore_errors=True)
        embedded = EmbeddedPostgres(data_dir)
        url = embedded.start()
    conn = await db.connect(url)
    await migrate.migrate(conn)
    pool = await db.create_pool(url, 1, 4, json_codec=False)
    srv = None
    try:
        if args.others:
            await load_others(conn, args.others, 4, 365)
        await chain_cost(pool, conn, args.chain_sessions, 10)
        if args.only_chain:
            return

        org = f"purge-{uuid.uuid4().hex[:6]}"
        token = await auth.create_token(conn, org, "admin", "bench@bench.example")
        org_id = await conn.fetchval("SELECT id FROM orgs WHERE name = $1", org)
        rng = random.Random(42)
        now = datetime.now(UTC)
        t = 0.0
        for i in range(0, args.old, 100_000):
            part = list(demo_sessions(rng, org, min(100_000, args.old - i),
                                      now - timedelta(days=60), 30))  # fmt: skip
            t += await ingest_all(pool, org_id, part, 10_000)
        for i in range(0, args.fresh, 100_000):
            part = list(demo_sessions(rng, org, min(100_000, args.fresh - i), now, 25))
            t += await ingest_all(pool, org_id, part, 10_000)
        total = args.old + args.fresh
        print(f"data     {total:,} sessions in one org ({args.old:,} older than 60 days), "
              f"loaded in {t:.0f} s ({total / t:,.0f}/s); "
              f"{await conn.fetchval('SELECT count(*) FROM sessions'):,} in the table")  # fmt: skip
        await conn.execute("VACUUM ANALYZE sessions")
        await conn.execute(
            "INSERT INTO retention_policies (org_id, days, modified_by, next_purge_at)"
            " VALUES ($1, 30, 'bench', 'infinity')", org_id)  # fmt: skip

        srv = ServerProcess(url, data_dir, env_extra={"RETENTION_PURGE": "0"}).start()
        print("purge    30-day policy; concurrent load: 1 gRPC ingest (100/batch) + 2 list loops")
        base: dict[str, list[float]] = {"ingest": [], "list": []}
        stop = asyncio.Event()
        task = asyncio.create_task(load(srv.target, token, stop, base))
        await asyncio.sleep(args.load_seconds)
        stop.set()
        await task
        show("without purge", base)

        during: dict[str, list[float]] = {"ingest": [], "list": []}
        stop = asyncio.Event()
        task = asyncio.create_task(load(srv.target, token, stop, during))
        purge_pool = await db.create_pool(url, 1, 2)
        t0 = time.perf_counter()
        result = await purge.purge_org(purge_pool, org_id, now, interval=3600, batch=1000,
                                       timeout=600, claim=False)  # fmt: skip
        took = time.perf_counter() - t0
        stop.set()
        await task
        await purge_pool.close()
        assert result is not None
        print(f"         deleted {result.sessions:,} sessions in {took:.0f} s "
              f"({result.sessions / took:,.0f}/s, batches of 1000)")  # fmt: skip
        show("during purge", during)

        # A legal hold over every session the org still has (the empty filter matches all):
        # the request works through windows for up to ~24 s of its 30 s deadline, the rest is
        # finished here as the retention task would.
        live = await conn.fetchval("SELECT count(*) FROM sessions WHERE org_id = $1", org_id)
        held: dict[str, list[float]] = {"ingest": [], "list": []}
        stop = asyncio.Event()
        task = asyncio.create_task(load(srv.target, token, stop, held))
        channel = grpc.aio.insecure_channel(srv.target)
        t0 = time.perf_counter()
        reply = await rpb_grpc.RetentionServiceStub(channel).CreateHold(
            rpb.CreateHoldRequest(reason="bench", query_filter=""),
            metadata=(("authorization", f"Bearer {token}"),), timeout=30)  # fmt: skip
        t_req = time.perf_counter() - t0
        await store.apply_pending(conn, org_id, window=HOLD_WINDOW, timeout=600)
        took = time.perf_counter() - t0
        stop.set()
        await task
        await channel.close()
        locked = await conn.fetchval(store.HOLD_COUNT, org_id, int(reply.id))
        print(f"hold     over all {live:,} live sessions, windows of {HOLD_WINDOW:,}: the request answered in "
              f"{t_req:.1f} s (locked {reply.locked:,}, applying={reply.applying}); all "
              f"{locked:,} locked in {took:.0f} s ({locked / took:,.0f}/s)")  # fmt: skip
        show("during hold", held)

        t0 = time.perf_counter()
        verdict = await trail.verify(conn, org_id, 3600)
        live = await conn.fetchval("SELECT count(*) FROM sessions WHERE org_id = $1", org_id)
        print(f"verify   purged org: {verdict.entries:,} entries, {live:,} live sessions: "
              f"ok={verdict.ok} in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        chain_org = await synthetic_chain(conn, args.entries)
        t0 = time.perf_counter()
        verdict = await trail.verify(conn, chain_org, 3600)
        print(f"verify   {verdict.entries:,} entries (no sessions): ok={verdict.ok} in "
              f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    finally:
        if srv is not None:
            srv.stop()
        await pool.close()
        await conn.close()
        if embedded is not None:
            embedded.stop()


if __name__ == "__main__":
    asyncio.run(main())
