"""What an operator sees of the server: per-RPC metrics and access lines, and the /metrics
endpoint.

`Observer` is a grpc.aio server interceptor, registered first (outermost) in server.py so it
sees every RPC's final status, after the error mapping. For each call it
  - takes the request id from the `x-request-id` metadata (Envoy sets it on every REST call;
    a new one is made for direct gRPC callers without one) and returns it to the caller in the
    trailing metadata, and reads a W3C `traceparent` when the caller sent one;
  - binds both to the call's log context, so every line logged while the RPC runs carries
    them; auth adds the org id and role once the token is known;
  - counts grpc_server_started_total / grpc_server_handled_total and observes
    grpc_server_handling_seconds;
  - logs one access line (logger `session_audit.access`): method, org id, role, gRPC status,
    duration, request id, traceparent. Never the token, the request or the response.

The metrics endpoint (`MetricsServer`) is prometheus-client's HTTP server on 127.0.0.1.
With several workers the parent process serves it from PROMETHEUS_MULTIPROC_DIR.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from prometheus_client import CollectorRegistry, multiprocess, start_http_server
from prometheus_client.registry import REGISTRY

from session_audit.core import logs, metrics
from session_audit.core.interceptor import WrapOnce

log = logging.getLogger("session_audit.access")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _meta(context: grpc.aio.ServicerContext) -> tuple[str | None, str | None]:
    """The x-request-id and traceparent metadata, in one pass over the call's metadata."""
    rid = tp = None
    for k, v in context.invocation_metadata() or ():
        if k == "x-request-id":
            rid = v.decode(errors="replace") if isinstance(v, bytes) else str(v)
        elif k == "traceparent":
            tp = v.decode(errors="replace") if isinstance(v, bytes) else str(v)
    return rid, tp


def _code(context: grpc.aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class _Series:
    """One method's labelled metric children, looked up once instead of on every call
    (`labels()` validates, locks and hashes each time). Bounded: methods × status codes."""

    def __init__(self, kind: str, service: str, method: str) -> None:
        self.labels = (kind, service, method)
        self.full = f"/{service}/{method}"
        self.started = metrics.GRPC_STARTED.labels(*self.labels)
        self._ended: dict[str, tuple[Any, Any]] = {}

    def ended(self, code: str) -> tuple[Any, Any]:
        """(grpc_server_handled_total, grpc_server_handling_seconds) children for `code`."""
        found = self._ended.get(code)
        if found is None:
            found = self._ended[code] = (
                metrics.GRPC_HANDLED.labels(*self.labels, code),
                metrics.GRPC_SECONDS.labels(*self.labels, code),
            )
        return found


class _Call:
    """One RPC being observed."""

    __slots__ = ("call", "series", "start", "traceparent")

    def __init__(self, series: _Series) -> None:
        self.series = series

    def begin(self, context: grpc.aio.ServicerContext) -> None:
        self.start = time.perf_counter()
        self.series.started.inc()
        sent_id, sent_parent = _meta(context)
        self.call = logs.Call(logs.request_id(sent_id))
        self.traceparent = logs.traceparent(sent_parent)
        extra = {"traceparent": self.traceparent} if self.traceparent else {}
        logs.bind_call(self.call, method=self.series.full, **extra)
        context.set_trailing_metadata((("x-request-id", self.call.request_id),))

    def end(self, context: grpc.aio.ServicerContext, exc: BaseException | None) -> None:
        seconds = time.perf_counter() - self.start
        name = _code(context, exc).name
        handled, histogram = self.series.ended(name)
        handled.inc()
        histogram.observe(seconds)
        log.info("rpc", extra={"status": name, "duration_ms": round(seconds * 1000, 3)})
        logs.unbind_call()


def _split(full: str) -> tuple[str, str]:
    service, _, method = full.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


class Observer(WrapOnce):
    def wrap(self, method: str, handler: Any) -> Any | None:
        return _observed(handler, method)


def _observed(handler: Any, full: str) -> Any:
    service, method = _split(full)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _unary(handler.unary_unary, "unary", service, method),
            handler.request_deserializer, handler.response_serializer,
        )  # fmt: skip
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _unary(handler.stream_unary, "client_stream", service, method),
            handler.request_deserializer, handler.response_serializer,
        )  # fmt: skip
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _streaming(handler.unary_stream, "server_stream", service, method),
            handler.request_deserializer, handler.response_serializer,
        )  # fmt: skip
    return grpc.stream_stream_rpc_method_handler(
        _streaming(handler.stream_stream, "bidi_stream", service, method),
        handler.request_deserializer, handler.response_serializer,
    )  # fmt: skip


def _unary(behavior: Any, kind: str, service: str, method: str) -> Any:
    series = _Series(kind, service, method)

    async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Call(series)
        call.begin(context)
        failure: BaseException | None = None
        try:
            return await behavior(request, context)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            call.end(context, failure)

    return observed


def _streaming(behavior: Any, kind: str, service: str, method: str) -> Any:
    if not inspect.isasyncgenfunction(behavior):
        # A handler that writes with context.write() and returns.
        return _unary(behavior, kind, service, method)
    series = _Series(kind, service, method)

    async def observed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = _Call(series)
        call.begin(context)
        failure: BaseException | None = None
        try:
            async for item in behavior(request, context):
                yield item
        except BaseException as exc:
            failure = exc
            raise
        finally:
            call.end(context, failure)

    return observed


# -- the pools --------------------------------------------------------------------------------


class PoolSampler:
    """Copies each pool's size / in use / waiting into the gauges every `interval` seconds."""

    def __init__(self, pools: Callable[[], dict[str, asyncpg.Pool]], interval: float = 1.0):
        self.pools = pools
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            metrics.sample_pools(self.pools())
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# -- the endpoint -----------------------------------------------------------------------------


def registry() -> CollectorRegistry:
    """What /metrics shows: this process's metrics, or every worker's in multiprocess mode."""
    if os.environ.get(MULTIPROC_ENV):
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)  # type: ignore[no-untyped-call]
        return reg
    return REGISTRY


def serve_metrics(port: int) -> Any:
    """Start the loopback /metrics endpoint (a daemon thread); None when `port` is 0 or taken
    (logged: the service keeps answering RPCs without it)."""
    if port == 0:
        return None
    try:
        server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry())
    except OSError as exc:
        logging.getLogger(__name__).error(
            "metrics: cannot listen on 127.0.0.1:%d (%s); serving without /metrics", port, exc
        )
        return None
    logging.getLogger(__name__).info("metrics on http://127.0.0.1:%d/metrics", port)
    return server


@contextlib.contextmanager
def multiprocess_dir() -> Iterator[Path]:
    """A fresh PROMETHEUS_MULTIPROC_DIR for the workers about to be spawned (they inherit the
    environment and so write their values there), removed when they are all gone."""
    path = Path(tempfile.mkdtemp(prefix="session-audit-metrics-"))
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = str(path)
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(path, ignore_errors=True)


def worker_gone(pid: int) -> None:
    """Drop a dead worker's live gauges from the sums."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
