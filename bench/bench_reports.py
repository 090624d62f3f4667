"""Reports benchmark (issue 4). Not a test: prints figures, asserts only that things worked.

    make bench-reports                                   # 10k, 100k and 1M sessions
    .venv/bin/python bench/bench_reports.py --sizes 10000,100000 --formats csv,html
    .venv/bin/python bench/bench_reports.py --sizes 1000000 --formats pdf --pdf-max-rows 1000000

One run, one machine: a fresh embedded PostgreSQL in .bench-data-reports/ (or DATABASE_URL's
server), the real server process and Envoy. One org per size holds exactly that many sessions
(one year, 50 users, 7 connections), loaded by one INSERT … SELECT. For each size it prints
  * generation: POST /api/v2/report (Session summary over the whole org: one row per session)
    until status ready, and the same for the Sessions-by-server aggregate;
  * each download format through Envoy (REST, streamed to a counting sink): time to the first
    byte, total time, size, throughput;
  * peak RSS of the server process during each step (sampled every 10 ms), next to its RSS
    before the step: the delta is what the step costs in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_sessions import machine
from session_audit import envoy
from session_audit.core import auth, db, migrate
from session_audit.embedded import EmbeddedPostgres
from tests.support import ServerProcess

LOAD = """
INSERT INTO sessions (id, org_id, start_date, end_date, status, verb, user_id, user_email,
                      user_name, connection, connection_type, connection_subtype, role_name,
                      exit_code, event_size, review_status, review_approvers, connection_tags,
                      labels)
SELECT gen_random_uuid(), $1, t.start,
       CASE WHEN i % 20 = 0 THEN NULL ELSE t.start + (30 + i % 3600) * interval '1 second' END,
       CASE WHEN i % 20 = 0 THEN 'open' ELSE 'done' END,
       CASE WHEN i % 3 = 0 THEN 'connect' ELSE 'exec' END,
       'sub-' || (i % 50), 'user' || (i % 50) || '@bench.example', 'User ' || (i % 50),
       c.name, c.type, c.subtype, c.name || '-rw',
       CASE WHEN i % 20 = 0 THEN NULL ELSE (i % 7 = 0)::int END,
       200 + i % 200000,
       (ARRAY[NULL, NULL, 'APPROVED', 'PENDING', 'REJECTED', 'EXECUTED'])[1 + i % 6],
       CASE WHEN i % 6 IN (2, 4, 5) THEN ARRAY['lead' || (i % 5) || '@bench.example'] END,
       c.tags, CASE WHEN i % 10 = 0 THEN '{"retention_locked": "true"}'::jsonb END
  FROM generate_series(1, $2::int) AS i
 CROSS JOIN LATERAL (SELECT $3::timestamptz - (i::float8 / $2 * 365) * interval '1 day'
                       AS start) t
 CROSS JOIN LATERAL (SELECT * FROM (VALUES
        (0, 'pg-prod', 'database', 'postgres', '{"env": "prod", "team": "pay"}'::jsonb),
        (1, 'pg-staging', 'database', 'postgres', '{"env": "staging", "team": "pay"}'),
        (2, 'mysql-crm', 'database', 'mysql', '{"env": "prod", "team": "sales"}'),
        (3, 'bastion-ssh', 'custom', 'ssh', '{"env": "prod", "team": "sre"}'),
        (4, 'win-jump', 'application', 'rdp', '{"env": "prod", "team": "it"}'),
        (5, 'k8s-admin', 'custom', 'tcp', '{"env": "prod", "team": "platform"}'),
        (6, 'mongo-events', 'database', 'mongodb', '{"env": "prod", "team": "data"}')
      ) v(k, name, type, subtype, tags) WHERE v.k = i % 7) c
"""


class RssSampler:
    """Peak resident set size of a process while a step runs (VmRSS every 10 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def __enter__(self) -> RssSampler:
        self.before = self.rss()
        self.peak = self.before
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, self.rss())
                time.sleep(0.01)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.rss())


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


@dataclass
class Row:
    size: int
    step: str
    seconds: float
    first_byte: float | None
    nbytes: int | None
    rss_before: int
    rss_peak: int

    def print(self) -> None:
        fb = f"{self.first_byte * 1000:8.0f}" if self.first_byte is not None else f"{'':>8}"
        size = mb(self.nbytes) if self.nbytes is not None else ""
        rate = (
            f"{self.nbytes / self.seconds / 2**20:7.1f} MB/s"
            if self.nbytes is not None and self.seconds > 0
            else ""
        )
        print(
            f"  {self.size:>9,}  {self.step:<28}{self.seconds:9.2f}{fb}  {size:>9} {rate:>12}"
            f"  {mb(self.rss_before):>8} → {mb(self.rss_peak):>8}"
            f"  (+{mb(self.rss_peak - self.rss_before)})"
        )


async def generate(http: httpx.AsyncClient, body: dict[str, str]) -> tuple[str, int]:
    r = await http.post("/api/v2/report", json=body)
    assert r.status_code == 200, r.text
    rid = r.json()["report"]["id"]
    while True:
        report = (await http.get(f"/api/v2/report/{rid}")).json()["report"]
        if report["status"] == "ready":
            return rid, report["rows"]
        assert report["status"] == "pending", report
        await asyncio.sleep(0.05)


async def download(http: httpx.AsyncClient, rid: str, fmt: str) -> tuple[float, float, int]:
    """(seconds to the first byte, total seconds, bytes), streamed to a counter."""
    t = time.perf_counter()
    first: float | None = None
    n = 0
    async with http.stream("GET", f"/api/v2/report/{rid}/{fmt}") as r:
        assert r.status_code == 200, await r.aread()
        async for chunk in r.aiter_raw():
            if first is None:
                first = time.perf_counter() - t
            n += len(chunk)
    return first or 0.0, time.perf_counter() - t, n


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--formats", default="csv,html,pdf")
    ap.add_argument("--pdf-max-rows", type=int, default=100_000,
                    help="REPORT_PDF_MAX_ROWS of the server (its default is 100000)")  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep .bench-data-reports afterwards")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    formats = args.formats.split(",")
    data_dir = ROOT / ".bench-data-reports"

    print(f"machine  {machine()}")
    print(f"data     orgs of {', '.join(f'{n:,}' for n in sizes)} sessions (one year, 50 users, "
          f"7 connections); REPORT_PDF_MAX_ROWS={args.pdf_max_rows:,}")  # fmt: skip
    url = os.environ.get("DATABASE_URL", "")
    embedded = None
    if not url:
        shutil.rmtree(data_dir, ignore_errors=True)
        embedded = EmbeddedPostgres(data_dir)
        url = embedded.start()
    conn = await db.connect(url)
    await migrate.migrate(conn)
    tokens: dict[int, str] = {}
    for n in sizes:
        org = f"bench-{n}-{uuid.uuid4().hex[:6]}"
        tokens[n] = await auth.create_token(conn, org, "admin", "bench@bench.example")
        org_id = await conn.fetchval("SELECT id FROM orgs WHERE name = $1", org)
        t = time.perf_counter()
        await conn.execute(LOAD, org_id, n, datetime.now(UTC), timeout=3600)
        print(f"load     {n:>9,} sessions in {time.perf_counter() - t:.1f} s (INSERT … SELECT)")
    await conn.execute("VACUUM ANALYZE sessions")

    env = {"REPORT_PDF_MAX_ROWS": str(args.pdf_max_rows), "REPORT_SCHEDULER": "0",
           "REPORT_POLL_INTERVAL_MS": "100", "QUERY_TIMEOUT_SECONDS": "3600"}  # fmt: skip
    srv = ServerProcess(url, data_dir, env_extra=env).start()
    http_port = envoy.free_port()
    proxy = srv.start_envoy(http_port, data_dir)
    assert srv.proc is not None
    sampler = RssSampler(srv.proc.pid)
    rows: list[Row] = []
    print("\n== report generation and downloads (server process RSS: before → peak)")
    print(f"  {'sessions':>9}  {'step':<28}{'seconds':>9}{'1st ms':>8}  {'size':>9} "
          f"{'rate':>12}  {'server RSS':>21}")  # fmt: skip
    try:
        for n in sizes:
            http = httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{http_port}",
                headers={"authorization": f"Bearer {tokens[n]}"},
                timeout=httpx.Timeout(3600),
            )
            for title, did in (("generate Session summary", "11"),
                               ("generate Sessions by server", "12")):  # fmt: skip
                with sampler:
                    t = time.perf_counter()
                    rid, count = await generate(http, {"defined_report_id": did})
                    seconds = time.perf_counter() - t
                row = Row(n, title, seconds, None, None, sampler.before, sampler.peak)
                row.print()
                rows.append(row)
                if did == "11":
                    assert count == n, (count, n)
                    summary = rid
            for fmt in formats:
                with sampler:
                    first, seconds, nbytes = await download(http, summary, fmt)
                step = f"download {fmt}" + (
                    f" ({min(n, args.pdf_max_rows):,} rows)" if fmt == "pdf" else ""
                )
                row = Row(n, step, seconds, first, nbytes, sampler.before, sampler.peak)
                row.print()
                rows.append(row)
            await http.aclose()
    finally:
        envoy.stop(proxy)
        srv.stop()
        await conn.close()
        if embedded is not None:
            embedded.stop()
            if not args.keep:
                shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
