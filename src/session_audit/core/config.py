"""Configuration: one frozen dataclass built from an injectable environ."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """An environment variable is missing or malformed."""


def _int(environ: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}: expected {lo}..{hi}, got {value}")
    return value


# The server's garbage-collector thresholds (gc.set_threshold) unless GC_THRESHOLDS says
# otherwise. Python's (700, 10, 10) ran a full collection every ~10,000 sessions of ingest,
# each walking every live object for 60-100 ms with the event loop held (docs/reliability.md,
# "The event loop"); these run generation 0 after 10,000 net allocations and the full pass
# ten times less often. Reference cycles are rare here (objects go by reference counting).
GC_THRESHOLDS = (10_000, 20, 100)


def _thresholds(environ: Mapping[str, str], name: str) -> tuple[int, int, int]:
    raw = environ.get(name)
    if raw is None or raw == "":
        return GC_THRESHOLDS
    expected = (
        f"{name}: expected three integers as gen0,gen1,gen2 such as 10000,20,100 "
        f"(gen0 1..1000000, gen1 and gen2 1..10000), got {raw!r}"
    )
    try:
        values = tuple(int(part) for part in raw.split(","))
    except ValueError:
        raise ConfigError(expected) from None
    if len(values) != 3 or not 1 <= values[0] <= 1_000_000:
        raise ConfigError(expected)
    if not all(1 <= v <= 10_000 for v in values[1:]):
        raise ConfigError(expected)
    return values[0], values[1], values[2]


def project_root() -> Path:
    """The checkout holding pyproject.toml (the package is installed editable)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists():
            return parent
    return Path.cwd()


@dataclass(frozen=True)
class Config:
    # Empty means: start the embedded PostgreSQL in data_dir.
    database_url: str
    data_dir: Path
    grpc_host: str
    grpc_port: int
    http_port: int
    workers: int
    pool_min: int
    pool_max: int
    # Largest gRPC message accepted, in bytes.
    max_request_bytes: int
    # Bound on a query when the caller sent no deadline, in seconds.
    default_query_timeout: float
    # Seconds given to in-flight RPCs on SIGTERM.
    shutdown_grace: float
    # Seconds between database probes of the health service.
    health_interval: float
    # Seconds a call waits for a pooled connection before UNAVAILABLE (bounded by its deadline).
    pool_acquire_timeout: float = 5.0
    # PostgreSQL ends a transaction of ours left idle this long (idle_in_transaction_session_
    # timeout); longer than stream_idle, which ends an idle stream first.
    idle_in_transaction: float = 60.0
    # An ingest stream that sends nothing for stream_idle seconds, or runs longer than
    # stream_max, is ended (DEADLINE_EXCEEDED; what it had not committed is not stored).
    stream_idle: float = 30.0
    stream_max: float = 900.0
    # Concurrent StreamIngestSessions per org and server process (RESOURCE_EXHAUSTED beyond).
    streams_per_org: int = 4
    # A streaming standby for read-only calls (core/reads.py); empty: all reads on the primary.
    database_read_url: str = ""
    # A standby further behind than this is not read from.
    read_max_lag: float = 10.0
    # Loopback port of the server's Prometheus /metrics (0: none).
    metrics_port: int = 9464
    # Loopback port where Envoy's /stats/prometheus is served, and nothing else of its admin
    # interface (0: none).
    envoy_metrics_port: int = 9465
    # Log event-loop stalls longer than this many ms, with what held the loop (0: off;
    # loopwatch.py).
    loop_stall_ms: int = 0
    # gc.set_threshold once the server is set up (GC_THRESHOLDS above).
    gc_thresholds: tuple[int, int, int] = GC_THRESHOLDS

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Config:
        env = os.environ if environ is None else environ
        root = project_root()
        return cls(
            database_url=env.get("DATABASE_URL", ""),
            data_dir=Path(env.get("SESSION_AUDIT_DATA_DIR", str(root / ".data"))),
            grpc_host="127.0.0.1",
            grpc_port=_int(env, "GRPC_PORT", 50051, 0, 65535),
            http_port=_int(env, "HTTP_PORT", 8080, 0, 65535),
            workers=_int(env, "WORKERS", 1, 1, 64),
            pool_min=_int(env, "DB_POOL_MIN", 2, 1, 100),
            pool_max=_int(env, "DB_POOL_MAX", 10, 1, 500),
            max_request_bytes=_int(env, "MAX_REQUEST_BYTES", 16 * 1024 * 1024, 1024, 1 << 30),
            default_query_timeout=float(_int(env, "QUERY_TIMEOUT_SECONDS", 30, 1, 3600)),
            shutdown_grace=float(_int(env, "SHUTDOWN_GRACE_SECONDS", 10, 0, 600)),
            health_interval=float(_int(env, "HEALTH_INTERVAL_SECONDS", 2, 1, 60)),
            pool_acquire_timeout=float(_int(env, "POOL_ACQUIRE_TIMEOUT_SECONDS", 5, 1, 600)),
            idle_in_transaction=float(_int(env, "IDLE_IN_TRANSACTION_SECONDS", 60, 5, 86400)),
            stream_idle=float(_int(env, "STREAM_IDLE_SECONDS", 30, 1, 3600)),
            stream_max=float(_int(env, "STREAM_MAX_SECONDS", 900, 1, 86400)),
            streams_per_org=_int(env, "INGEST_STREAMS_PER_ORG", 4, 1, 1000),
            database_read_url=env.get("DATABASE_READ_URL", ""),
            read_max_lag=float(_int(env, "READ_MAX_LAG_SECONDS", 10, 0, 86400)),
            metrics_port=_int(env, "METRICS_PORT", 9464, 0, 65535),
            envoy_metrics_port=_int(env, "ENVOY_METRICS_PORT", 9465, 0, 65535),
            loop_stall_ms=_int(env, "LOOP_STALL_MS", 0, 0, 60000),
            gc_thresholds=_thresholds(env, "GC_THRESHOLDS"),
        )
