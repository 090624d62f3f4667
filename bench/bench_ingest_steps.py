"""Where ingest's time goes (issue 14 goal 6). Not a test: prints figures, asserts nothing.

    .venv/bin/python bench/bench_ingest_steps.py --sessions 100000 --rounds 3 [--days 15 --sorted]

A fresh embedded PostgreSQL in .bench-data-ingest/ (or DATABASE_URL's server), migrated. Each
round, alternating: a raw asyncpg binary COPY of prebuilt records into a copy of the sessions
table (same indexes: the baseline), then the same sessions (new ids, a fresh org) through the
servicer's write path (`IngestBatch.on_pool`, as a stream uses it: chunks, the writer task,
per-chunk transactions, rollups, retention hook, trail) on a connection that times every
statement; and, the baseline of issue 14 goal 6 ("a raw COPY into the same table with rollups
on"), the same sessions COPYed into `sessions` itself for an org of their own, then that org's
rollups computed in SQL (`rollups.rebuild`). It prints rows/s of the three, and the time per
kind of statement, the Python time (validation, folding, encoding) per session, and the CPU
per session of the embedded PostgreSQL and of this process during the ingest (which side
bounds the pipeline: the busier one). The
process runs with the server's garbage-collector settings (`--gc python`: Python's own).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import random
import shutil
import statistics
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from session_audit.analytics import rollups
from session_audit.core import auth, db, migrate
from session_audit.core.config import GC_THRESHOLDS
from session_audit.core.schema import INGEST_COLUMNS
from session_audit.embedded import EmbeddedPostgres
from session_audit.seed import demo_sessions
from session_audit.sessions.ingest import IngestBatch
from session_audit.sessions.rows import item_from_proto

try:  # the loop watch (loopwatch.py) is there on main since issue 11
    from session_audit.loopwatch import LoopWatch
except ImportError:  # pragma: no cover
    LoopWatch = None  # type: ignore[assignment,misc]


class Collections:
    """The garbage collector's passes (a pass holds the GIL, so the loop too): per generation,
    how many and the longest, in ms."""

    def __init__(self) -> None:
        self.times: dict[int, list[float]] = defaultdict(list)
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.times[info["generation"]].append(1000 * (time.perf_counter() - self._t0))


class SlowSteps(logging.Handler):
    """Collects the loop watch's slow steps: (CPU ms, what held the loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        cpu = getattr(record, "step_cpu_ms", None)
        if cpu is not None:
            self.steps.append((float(cpu), str(getattr(record, "held_by", "?"))))


STEPS = (
    ("CREATE TEMP", "delta tables"),
    ("WITH src AS MATERIALIZED (SELECT org_id, start_date, end_date, connection, connection_type",
     "rollups: capture"),
    ("INSERT INTO rollup_values", "rollups: apply rollup_values"),
    ("INSERT INTO rollup_sessions_user ", "rollups: apply rollup_sessions_user"),
    ("INSERT INTO rollup_names ", "rollups: apply rollup_names"),
    ("INSERT INTO rollup_", "rollups: apply (other tables)"),
    ("COPY", "COPY sessions"),
    ("SAVEPOINT", "savepoint"),
    ("RELEASE", "savepoint"),
    ("BEGIN", "begin/commit"),
    ("COMMIT", "begin/commit"),
    ("SELECT h.id", "retention: active holds"),
    ("UPDATE sessions s SET retention_locked", "retention: lock arrived"),
    ("INSERT INTO trail_heads", "trail: lock head"),
    ("SELECT s.id AS session_id", "trail: digest rows"),
    ("INSERT INTO trail_items", "trail: items"),
    ("WITH d AS MATERIALIZED ( SELECT s.id", "trail: digest rows + items"),
    ("WITH e AS", "trail: entry"),
)  # fmt: skip


def server_cpu(data_dir: Path | None) -> float:
    """CPU seconds so far of the embedded PostgreSQL: the postmaster and every process it
    started (backends, WAL writer, checkpointer); 0 with DATABASE_URL's server."""
    if data_dir is None:
        return 0.0
    pid_file = data_dir / "pgdata" / "postmaster.pid"
    if not pid_file.exists():
        pid_file = next(data_dir.rglob("postmaster.pid"), pid_file)
    try:
        main = psutil.Process(int(pid_file.read_text().split()[0]))
        total = 0.0
        for p in [main, *main.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total
    except (OSError, ValueError, psutil.Error):
        return 0.0


def step_of(sql: str) -> str:
    s = " ".join(sql.split())
    for prefix, name in STEPS:
        if s.startswith(prefix):
            return name
    return s[:60]


class Timed:
    """A connection that adds the time of every statement to `times` (by kind of statement)."""

    def __init__(self, conn: Any, times: dict[str, float], counts: dict[str, int]) -> None:
        self._conn = conn
        self._times = times
        self._counts = counts

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._conn, name)
        if name not in ("execute", "fetch", "fetchrow", "fetchval", "copy_records_to_table"):
            return attr

        async def timed(*args: Any, **kw: Any) -> Any:
            key = "COPY" if name == "copy_records_to_table" else step_of(args[0])
            t = time.perf_counter()
            try:
                return await attr(*args, **kw)
            finally:
                self._times[key] += time.perf_counter() - t
                self._counts[key] += 1

        return timed

    def transaction(self, **kw: Any) -> Any:
        times, tx = self._times, self._conn.transaction(**kw)

        class Tx:
            async def __aenter__(self) -> Any:
                t = time.perf_counter()
                await tx.__aenter__()
                times["savepoint/begin"] += time.perf_counter() - t
                return self

            async def __aexit__(self, *exc: Any) -> Any:
                t = time.perf_counter()
                try:
                    return await tx.__aexit__(*exc)
                finally:
                    times["commit/release"] += time.perf_counter() - t

        return Tx()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument(
        "--sorted",
        action="store_true",
        help="send in start order (as live gateways do) instead of random order",
    )
    ap.add_argument("--data-dir", type=Path, default=ROOT / ".bench-data-ingest")
    ap.add_argument(
        "--step-ms",
        type=float,
        default=5.0,
        help="report event-loop steps of the ingest that held the loop's CPU longer than this",
    )
    ap.add_argument(
        "--gc",
        choices=("server", "python"),
        default="server",
        help="the server's garbage-collector settings (freeze after set-up, GC_THRESHOLDS's "
        "default) or Python's own",
    )
    args = ap.parse_args()
    slow = SlowSteps()
    collections = Collections()
    logging.getLogger("session_audit.loop").addHandler(slow)
    logging.getLogger("session_audit.loop").propagate = False
    n = args.sessions
    url = os.environ.get("DATABASE_URL", "")
    embedded = None
    if not url:
        shutil.rmtree(args.data_dir, ignore_errors=True)
        embedded = EmbeddedPostgres(args.data_dir)
        url = embedded.start()
    conn = await db.connect(url)
    await migrate.migrate(conn)
    # As the server does: on Citus the rollups get the copied sessions' values, not a read-back.
    citus = bool(await conn.fetchval(migrate.HAS_CITUS))
    await conn.execute("DROP TABLE IF EXISTS copy_baseline")
    await conn.execute("CREATE TABLE copy_baseline (LIKE sessions INCLUDING ALL)")
    raw = await asyncpg.connect(url)
    pool = await db.create_pool(url, 1, 2, json_codec=False, name="ingest")
    rng = random.Random(42)
    now = datetime.now(UTC)
    sessions = list(demo_sessions(rng, "bench", n, now, args.days))
    if args.sorted:
        sessions.sort(key=lambda s: s.start_date.ToDatetime())
    order = "start order" if args.sorted else "random order"
    if args.gc == "server":  # as server.serve does once it is set up
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
    print(f"data     {n:,} sessions per round over {args.days} days ({order}), one org per round; "
          f"gc thresholds {gc.get_threshold()}; {'Citus' if citus else 'one node'}; "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    copy_rates: list[float] = []
    rolled_rates: list[float] = []
    rates: list[float] = []
    times: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    walls: list[float] = []
    cpu_pg = cpu_py = 0.0
    try:
        for r in range(args.rounds):
            org_id = await auth.ensure_org(conn, f"bench-steps-{uuid.uuid4().hex[:8]}")
            for s in sessions:
                s.id = str(uuid.uuid4())
            records = [item_from_proto(s, org_id, now).record() for s in sessions]
            t = time.perf_counter()
            await raw.copy_records_to_table(
                "copy_baseline", records=records, columns=INGEST_COLUMNS
            )
            copy_rates.append(n / (time.perf_counter() - t))
            # Issue 14 goal 6's baseline, "a raw COPY into the same table with rollups on": the
            # same rows COPYed into `sessions` itself (every index) for an org of their own,
            # then that org's rollups computed from them in SQL (rollups.rebuild), no Python.
            copy_org = await auth.ensure_org(conn, f"bench-steps-copy-{uuid.uuid4().hex[:8]}")
            for s in sessions:
                s.id = str(uuid.uuid4())
            records = [item_from_proto(s, copy_org, now).record() for s in sessions]
            t = time.perf_counter()
            await raw.copy_records_to_table("sessions", records=records, columns=INGEST_COLUMNS)
            await rollups.rebuild(raw, copy_org)
            rolled_rates.append(n / (time.perf_counter() - t))
            del records
            for s in sessions:
                s.id = str(uuid.uuid4())

            @contextlib.asynccontextmanager
            async def opener() -> AsyncIterator[Any]:
                async with pool.acquire() as c:
                    timed = Timed(c, times, counts)
                    async with timed.transaction():
                        yield timed

            watch = LoopWatch(args.step_ms / 1000) if LoopWatch is not None else None
            if watch is not None:
                watch.start()
            gc.callbacks.append(collections)
            pg0, py0 = server_cpu(args.data_dir if embedded else None), time.process_time()
            t = time.perf_counter()
            batch = IngestBatch.on_pool(opener, org_id, 600, actor="bench", read_back=not citus)
            async with batch:
                for s in sessions:
                    await batch.add(s)
                result = await batch.finish()
            wall = time.perf_counter() - t
            cpu_py += time.process_time() - py0
            cpu_pg += server_cpu(args.data_dir if embedded else None) - pg0
            gc.callbacks.remove(collections)
            if watch is not None:
                await watch.stop()
            walls.append(wall)
            assert result.written == n, result
            rates.append(n / wall)
            of_copy, of_rolled = rates[-1] / copy_rates[-1], rates[-1] / rolled_rates[-1]
            print(f"  round {r + 1}: raw COPY {copy_rates[-1]:>8,.0f}/s   COPY + rollups "
                  f"{rolled_rates[-1]:>8,.0f}/s   ingest {rates[-1]:>8,.0f}/s  ({of_copy:.0%} / "
                  f"{of_rolled:.0%})   load {os.getloadavg()[0]:.2f}")  # fmt: skip
            sys.stdout.flush()
        c, i = statistics.median(copy_rates), statistics.median(rates)
        cr = statistics.median(rolled_rates)
        print(f"median   raw COPY {c:,.0f}/s, raw COPY into sessions + rollups (SQL) {cr:,.0f}/s, "
              f"ingest {i:,.0f}/s = {i / c:.0%} of raw COPY, {i / cr:.0%} of COPY + rollups "
              "(goal 6: ≥ 90%)")  # fmt: skip
        steps = sorted(slow.steps, reverse=True)
        print(f"event-loop steps over {args.step_ms:g} ms of CPU during ingest, all rounds: "
              f"{len(steps)}" + (f", longest {steps[0][0]:.1f} ms" if steps else ""))  # fmt: skip
        for cpu, held_by in steps[:5]:
            print(f"  {cpu:6.1f} ms  {held_by[:150]}")
        print("garbage collections during ingest, all rounds: " + ", ".join(
            f"gen{g} {len(v)}× longest {max(v):.1f} ms" for g, v in sorted(collections.times.items())
        ))  # fmt: skip
        total_sql = sum(times.values())
        wall = sum(walls)
        per = 1e6 / (n * args.rounds)
        print(f"time per session (µs), all rounds: wall {wall * per:.1f}, SQL {total_sql * per:.1f} "
              f"(the writer overlaps Python's validation of the next chunk)")  # fmt: skip
        if embedded:  # which side bounds the pipeline: busy µs per session of each
            print(f"CPU per session (µs), all rounds: PostgreSQL {cpu_pg * per:.1f} "
                  f"({cpu_pg / wall:.0%} of the wall), this process {cpu_py * per:.1f} "
                  f"({cpu_py / wall:.0%})")  # fmt: skip
        t = time.perf_counter()
        items = [item_from_proto(s, org_id, now) for s in sessions]
        validate = time.perf_counter() - t
        t = time.perf_counter()
        for it in items:
            it.record()
        record = time.perf_counter() - t
        print(
            f"  Python alone: validation {validate * 1e6 / n:.1f} µs/session, "
            f"record building {record * 1e6 / n:.1f} µs/session"
        )
        for key, v in sorted(times.items(), key=lambda kv: -kv[1]):
            print(
                f"  {key:<40} {v * per:7.2f} µs/session  {counts.get(key, 0) / args.rounds:6.1f} calls/round"
            )
    finally:
        await raw.execute("DROP TABLE IF EXISTS copy_baseline")
        await raw.close()
        await pool.close()
        await conn.close()
        if embedded is not None:
            embedded.stop()


if __name__ == "__main__":
    asyncio.run(main())
