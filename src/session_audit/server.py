"""grpc.aio server bootstrap: services, health, reflection, graceful shutdown, workers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import queue
import signal
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import asyncpg
import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from session_audit import loopwatch, observability
from session_audit.analytics.service import AnalyticsService
from session_audit.core import db, logs, migrate
from session_audit.core.app import App
from session_audit.core.auth import TokenCache
from session_audit.core.config import Config
from session_audit.core.decode import DecodeGuard
from session_audit.core.reads import Reads
from session_audit.core.rpc import Guard
from session_audit.reports.config import ReportConfig
from session_audit.reports.service import ReportService
from session_audit.retention.service import RetentionService
from session_audit.sessions.service import SessionService
from session_audit.v1 import (
    analytics_pb2,
    analytics_pb2_grpc,
    reports_pb2,
    reports_pb2_grpc,
    retention_pb2,
    retention_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
)

log = logging.getLogger(__name__)

# Every service this server answers for, registered with the guard (core.rpc: auth and error
# mapping), health and reflection. Later surfaces append their (descriptor, add_to_server,
# servicer factory) here.
ServiceEntry = tuple[
    ServiceDescriptor, Callable[[Any, grpc.aio.Server], None], Callable[[App], Any]
]
SERVICES: list[ServiceEntry] = [
    (
        sessions_pb2.DESCRIPTOR.services_by_name["SessionService"],
        sessions_pb2_grpc.add_SessionServiceServicer_to_server,
        SessionService,
    ),
    (
        reports_pb2.DESCRIPTOR.services_by_name["ReportService"],
        reports_pb2_grpc.add_ReportServiceServicer_to_server,
        ReportService,
    ),
    (
        analytics_pb2.DESCRIPTOR.services_by_name["AnalyticsService"],
        analytics_pb2_grpc.add_AnalyticsServiceServicer_to_server,
        AnalyticsService,
    ),
    (
        retention_pb2.DESCRIPTOR.services_by_name["RetentionService"],
        retention_pb2_grpc.add_RetentionServiceServicer_to_server,
        RetentionService,
    ),
]


class Health:
    """Reports NOT_SERVING while PostgreSQL is unreachable and SERVING once it answers again."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        names: list[str],
        interval: float,
        tokens: TokenCache | None = None,
        dsn: str = "",
    ) -> None:
        self.servicer = health.aio.HealthServicer()
        self.pool = pool
        # The token cache's listening connection is (re)opened here whenever the database
        # answers; until then the cache stays disabled.
        self.tokens = tokens
        self.dsn = dsn
        self._listener: asyncpg.Connection | None = None
        self.names = ["", *names]
        self.interval = interval
        self.serving: bool | None = None
        self._task: asyncio.Task[None] | None = None

    async def set(self, serving: bool) -> None:
        if serving == self.serving:
            return
        self.serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self.names:
            await self.servicer.set(name, status)
        log.info("health: %s", "SERVING" if serving else "NOT_SERVING")

    async def probe(self) -> bool:
        """One `SELECT 1` on the probe's own pool (a busy RPC pool is not an outage)."""
        try:
            async with asyncio.timeout(max(1.0, self.interval)):
                await self.pool.fetchval("SELECT 1")
            return True
        except Exception:
            return False

    async def _keep_listening(self) -> None:
        """Keep the token cache's LISTEN connection alive, and prove it: a half-open TCP
        connection looks open but hears nothing, so it must answer `SELECT 1` in time, else
        the cache is disabled (every call looks its token up) until a new one listens."""
        if self.tokens is None:
            return
        listener = self._listener
        if listener is not None and not listener.is_closed():
            try:
                async with asyncio.timeout(max(1.0, self.interval)):
                    await listener.fetchval("SELECT 1")
                return
            except Exception as exc:
                log.warning("token cache disabled: its listening connection is silent: %s", exc)
                self.tokens.disable()
                listener.terminate()
                self._listener = None
        try:
            async with asyncio.timeout(max(1.0, self.interval)):
                self._listener = await self.tokens.listen(self.dsn)
        except Exception as exc:
            self.tokens.disable()
            log.warning("token cache disabled: cannot listen for token changes: %s", exc)

    async def _watch(self) -> None:
        while True:
            serving = await self.probe()
            if serving:
                await self._keep_listening()
            elif self.tokens is not None:
                self.tokens.disable()
            await self.set(serving)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.servicer.enter_graceful_shutdown()
        if self._listener is not None:
            if self.tokens is not None:
                self.tokens.disable()
            await self._listener.close()


async def serve(
    config: Config,
    dsn: str,
    *,
    reuse_port: bool = False,
    on_ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
    on_stopping: Callable[[], None] | None = None,
    metrics_endpoint: bool = True,
) -> None:
    """Run until SIGTERM/SIGINT (or `stop` is set), then drain: health turns NOT_SERVING
    first, `on_stopping` runs (`run` starts Envoy's drain there), new RPCs are refused and
    in-flight ones get SHUTDOWN_GRACE_SECONDS. The /metrics endpoint is this process's unless
    a parent serves it for all workers."""
    # Separate pools, so no setting starves one use of connections with another: RPCs,
    # ingest (a stream holds one for its transaction), report generation (each generator
    # holds one for a generation and briefly takes a second; plus the scheduler), the probe.
    wait, idle = config.pool_acquire_timeout, config.idle_in_transaction
    pool = await db.create_pool(
        dsn, config.pool_min, config.pool_max, name="RPC", acquire_timeout=wait,
        idle_in_transaction=idle,
    )  # fmt: skip
    ingest_pool = await db.create_pool(
        dsn, 1, max(2, config.pool_max // 2), json_codec=False, name="ingest",
        acquire_timeout=wait, idle_in_transaction=idle,
    )  # fmt: skip
    generators = ReportConfig.from_environ().generators
    report_pool = await db.create_pool(
        dsn, 1, 2 * generators + 1, name="report generation", acquire_timeout=60.0,
        idle_in_transaction=config.idle_in_transaction,
    )  # fmt: skip
    probe_pool = await db.create_pool(
        dsn, 1, 1, name="health probe", acquire_timeout=max(1.0, config.health_interval)
    )
    standby = None
    if config.database_read_url:
        # No connection at start: a standby that is down must not keep the service down.
        standby = await db.create_pool(
            config.database_read_url, 0, config.pool_max, name="standby", acquire_timeout=wait,
            idle_in_transaction=idle,
        )  # fmt: skip
    reads = Reads(pool, standby, config.read_max_lag)
    distributed = bool(await pool.fetchval(migrate.HAS_CITUS, timeout=config.default_query_timeout))
    app = App(
        config, pool, ingest_pool, report_pool=report_pool, reads=reads, distributed=distributed
    )
    guard = Guard(app)
    server = grpc.aio.server(
        # Observer first: outermost, so it sees the status the Guard settled on; DecodeGuard
        # innermost, answering an undecodable request once the caller is known.
        interceptors=[observability.Observer(), guard, DecodeGuard()],
        options=[
            ("grpc.max_receive_message_length", config.max_request_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
    )
    names = []
    # A servicer may carry `background_tasks` (start()/async stop()): run while serving.
    background: list[Any] = [observability.PoolSampler(app.pools)]
    if config.loop_stall_ms:
        background.append(loopwatch.LoopWatch(config.loop_stall_ms / 1000))
    for service, add, factory in SERVICES:
        servicer = factory(app)
        guard.register(service, servicer)
        add(servicer, server)
        names.append(service.full_name)
        background += getattr(servicer, "background_tasks", [])
    checker = Health(probe_pool, names, config.health_interval, app.tokens, dsn)
    health_pb2_grpc.add_HealthServicer_to_server(checker.servicer, server)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    port = server.add_insecure_port(f"{config.grpc_host}:{config.grpc_port}")
    await checker.set(await checker.probe())
    checker.start()
    # Everything built so far (modules, descriptors, pools) lives as long as the process: out
    # of the collector's way, so its full collections no longer walk it on every request burst.
    gc.collect()
    gc.freeze()
    gc.set_threshold(*config.gc_thresholds)
    await server.start()
    log.info("gRPC listening on %s:%d (pid %d)", config.grpc_host, port, os.getpid())
    for task in background:
        task.start()
    reads.start()
    metrics_server = observability.serve_metrics(config.metrics_port) if metrics_endpoint else None
    # Handlers first: a Ctrl-C right after the banner (printed by on_ready) stops cleanly.
    done = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, done.set)
    if on_ready is not None:
        on_ready(port)
    await done.wait()
    log.info("shutting down: refusing new RPCs, draining for %.0fs", config.shutdown_grace)
    await checker.shutdown()
    if on_stopping is not None:
        await asyncio.to_thread(on_stopping)
    await server.stop(config.shutdown_grace)
    for task in background:
        await task.stop()
    await reads.stop()
    if standby is not None:
        await standby.close()
    for p in (pool, ingest_pool, report_pool, probe_pool):
        await p.close()
    if metrics_server is not None:
        metrics_server.shutdown()


def _worker(config: Config, dsn: str, log_format: str, ready: Any = None) -> None:
    logs.configure(logging.INFO, log_format)

    def on_ready(_port: int) -> None:
        if ready is not None:
            ready.put(os.getpid())

    asyncio.run(serve(config, dsn, reuse_port=True, on_ready=on_ready, metrics_endpoint=False))


def serve_workers(
    config: Config,
    dsn: str,
    *,
    on_ready: Callable[[int], None] | None = None,
    on_stopping: Callable[[], None] | None = None,
) -> None:
    """Several processes on one port (SO_REUSEPORT); the kernel spreads connections.
    `on_ready(port)` runs in this process once every worker listens; `on_stopping()` when
    the stop begins (see serve)."""
    if config.workers == 1:
        asyncio.run(serve(config, dsn, on_ready=on_ready, on_stopping=on_stopping))
        return
    if config.grpc_port == 0:
        raise SystemExit("GRPC_PORT: several workers need a fixed port, not 0")
    with observability.multiprocess_dir():
        _run_workers(config, dsn, on_ready, on_stopping)


def _run_workers(
    config: Config,
    dsn: str,
    on_ready: Callable[[int], None] | None,
    on_stopping: Callable[[], None] | None = None,
) -> None:
    # The workers write their metrics to PROMETHEUS_MULTIPROC_DIR; this process serves the sum.
    metrics_server = observability.serve_metrics(config.metrics_port)
    ctx = multiprocessing.get_context("spawn")
    fmt = logs.log_format()
    ready = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker, args=(replace(config, workers=1), dsn, fmt, ready), daemon=False
        )
        for _ in range(config.workers)
    ]
    for p in procs:
        p.start()

    def forward(signum: int, _frame: Any) -> None:
        if on_stopping is not None:
            on_stopping()
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    listening = 0
    while listening < len(procs):
        try:
            ready.get(timeout=0.5)
            listening += 1
        except queue.Empty:
            if any(not p.is_alive() for p in procs):
                forward(signal.SIGTERM, None)
                for p in procs:
                    p.join()
                raise SystemExit("a worker exited before listening") from None
    if on_ready is not None:
        on_ready(config.grpc_port)
    for p in procs:
        p.join()
        if p.pid is not None:
            observability.worker_gone(p.pid)
    if metrics_server is not None:
        metrics_server.shutdown()
