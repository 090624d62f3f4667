"""Prometheus metrics (prometheus-client): the objects every layer updates.

With several worker processes (`WORKERS > 1`) the parent points PROMETHEUS_MULTIPROC_DIR at a
directory it creates before starting them; prometheus-client then keeps each process's values
in files there and the parent's /metrics endpoint sums them (see observability.py). Gauges say
how: `livesum` adds up the live workers (pool connections), `livemax` takes the largest (a
queue depth every worker reads from the same table, a lag). With one process the default
in-memory registry is used and the modes are ignored.

Label values come from code (method names, pool field names, fixed outcomes), never from
request input, so the number of series is bounded.
"""

from __future__ import annotations

import asyncpg
from prometheus_client import Counter, Gauge, Histogram

# gRPC, with the names and labels of go-grpc-prometheus / py-grpc-prometheus dashboards.
RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
GRPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", RPC_LABELS)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    (*RPC_LABELS, "grpc_code"),
)
GRPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its status, in seconds.",
    (*RPC_LABELS, "grpc_code"),
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

# Database pools, sampled every second per process and summed over the workers.
POOL_SIZE = Gauge(
    "session_audit_db_pool_size", "Open connections in the pool.", ("pool",),
    multiprocess_mode="livesum",
)  # fmt: skip
POOL_MAX = Gauge(
    "session_audit_db_pool_max", "Largest number of connections the pool may open.", ("pool",),
    multiprocess_mode="livesum",
)  # fmt: skip
POOL_IN_USE = Gauge(
    "session_audit_db_pool_in_use", "Connections borrowed from the pool.", ("pool",),
    multiprocess_mode="livesum",
)  # fmt: skip
POOL_WAITING = Gauge(
    "session_audit_db_pool_waiting", "Tasks waiting for a connection from the pool.", ("pool",),
    multiprocess_mode="livesum",
)  # fmt: skip
STATEMENT_TIMEOUTS = Counter(
    "session_audit_db_statement_timeouts_total",
    "Statements cancelled because their deadline passed (the caller's or the configured one).",
    ("source",),
)

# Ingest: what happened to each session sent.
INGEST_SESSIONS = Counter(
    "session_audit_ingest_sessions_total",
    "Ingested sessions by outcome: written (new or changed), unchanged, rejected.",
    ("outcome",),
)

# Reports.
REPORT_QUEUE = Gauge(
    "session_audit_report_queue_depth", "Reports waiting to be generated (status pending).",
    multiprocess_mode="livemax",
)  # fmt: skip
REPORT_SECONDS = Histogram(
    "session_audit_report_generation_seconds",
    "Time to generate one report, by outcome (ready or failed).",
    ("outcome",),
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
REPORT_FAILURES = Counter(
    "session_audit_report_generation_failures_total", "Reports whose generation failed."
)
SCHEDULER_LAG = Gauge(
    "session_audit_scheduler_lag_seconds",
    "At the last scheduler tick: how long the oldest due subscription had been due.",
    multiprocess_mode="livemax",
)

# The event loop (loopwatch.py, only while LOOP_STALL_MS is set): how late its ticker woke.
EVENT_LOOP_LAG = Histogram(
    "session_audit_event_loop_lag_seconds",
    "How late the event loop ran a task due to run: time it spent on something else.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)

# The token cache (core/auth.py).
TOKEN_CACHE_HITS = Counter("session_audit_token_cache_hits_total", "Tokens found in the cache.")
TOKEN_CACHE_MISSES = Counter(
    "session_audit_token_cache_misses_total", "Tokens looked up in the database."
)


def pool_waiting(pool: asyncpg.Pool) -> int:
    """Tasks blocked in `pool.acquire()`. asyncpg has no public count: its holder queue is an
    asyncio.Queue whose pending getters are the waiters (0 if that ever changes)."""
    queue = getattr(pool, "_queue", None)
    getters = getattr(queue, "_getters", ())
    return sum(1 for f in getters if not f.done())


def pool_in_use(pool: asyncpg.Pool) -> int:
    """Connections handed out: the pool's holders not back in its queue."""
    queue = getattr(pool, "_queue", None)
    if queue is None:
        return 0
    return max(0, pool.get_max_size() - int(queue.qsize()))


def sample_pools(pools: dict[str, asyncpg.Pool]) -> None:
    for name, pool in pools.items():
        POOL_SIZE.labels(name).set(pool.get_size())
        POOL_MAX.labels(name).set(pool.get_max_size())
        POOL_IN_USE.labels(name).set(pool_in_use(pool))
        POOL_WAITING.labels(name).set(pool_waiting(pool))


def ingested(written: int, unchanged: int, rejected: int) -> None:
    INGEST_SESSIONS.labels("written").inc(written)
    INGEST_SESSIONS.labels("unchanged").inc(unchanged)
    INGEST_SESSIONS.labels("rejected").inc(rejected)
