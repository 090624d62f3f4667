"""The server's Python CPU per ingested session, without PostgreSQL (issue 14 goal 6). Not a
test: prints figures, asserts nothing.

    .venv/bin/python bench/bench_validation.py --sessions 20000 --rounds 5 [--ref main]

Sessions are built like bench_ingest_steps' (seed.demo_sessions over a year). Per round, in a
fresh interpreter, each tree's code runs them through

  * `item_from_proto` (validation into column values), and
  * `IngestBatch.add` for all of them (validation, grouping by id) with every chunk folded and
    turned into COPY records as the writer does before its COPY (`_fold`, `record()`), with
    no database behind it;

and prints µs of CPU per session (process time; the median of the rounds). `--ref REF` also
runs the tree of git revision REF (extracted with `git archive` into a temporary directory),
alternating with this tree round by round, so both see the same load on the shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def measure(n: int, days: int) -> dict[str, float]:
    """One round in this interpreter (imports come from PYTHONPATH's tree)."""
    from session_audit.seed import demo_sessions
    from session_audit.sessions import ingest
    from session_audit.sessions.rows import item_from_proto

    now = datetime(2026, 11, 28, tzinfo=UTC)
    sessions = list(demo_sessions(random.Random(42), "bench", n, now, days))
    org_id = uuid.uuid4()

    t = time.process_time()
    for s in sessions:
        item_from_proto(s, org_id, now)
    validate = time.process_time() - t

    class NoDb(ingest.IngestBatch):
        """The writer's Python part only: fold each id's reports, make the COPY records."""

        async def flush(self, *, durable: bool = True) -> None:
            pending, self._pending, self._pending_items = self._pending, {}, 0
            order = getattr(ingest, "_in_id_order", sorted)  # the writer's, in either tree
            self.records = [
                ingest._fold(pending[sid].reports)[0].record() for sid in order(pending)
            ]

    @contextlib.asynccontextmanager
    async def opener() -> AsyncIterator[Any]:
        yield None

    async def add_all() -> float:
        batch = NoDb.on_pool(opener, org_id, 60.0)
        batch.now = now
        t = time.process_time()
        for s in sessions:
            await batch.add(s)
        await batch.flush()
        return time.process_time() - t

    pipeline = asyncio.run(add_all())
    return {"validate": 1e6 * validate / n, "pipeline": 1e6 * pipeline / n}


def run_child(tree: Path, n: int, days: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--sessions", str(n), "--days", str(days)],
        env=env, capture_output=True, text=True, check=True, timeout=900,
    ).stdout  # fmt: skip
    found: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--ref", help="git revision to compare with (e.g. main)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.sessions, args.days)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this tree": ROOT}
        if args.ref:
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.ref, "src"],
                capture_output=True, check=True,
            ).stdout  # fmt: skip
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            trees = {args.ref: Path(tmp), **trees}
        figures: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        load = os.getloadavg()
        for _ in range(args.rounds):
            for name, tree in trees.items():
                figures[name].append(run_child(tree, args.sessions, args.days))
        load_after = os.getloadavg()
    print(
        f"{args.sessions:,} sessions over {args.days} days, {args.rounds} rounds per tree "
        f"(alternating); load average {load[0]:.1f} before, {load_after[0]:.1f} after"
    )
    print(f"{'µs of CPU per session (median, min–max)':44s} {'validate':>20s} {'pipeline':>20s}")
    for name, rounds in figures.items():
        cells = []
        for key in ("validate", "pipeline"):
            values = [r[key] for r in rounds]
            cells.append(f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})")
        print(f"{name:44s} {cells[0]:>20s} {cells[1]:>20s}")


if __name__ == "__main__":
    main()
