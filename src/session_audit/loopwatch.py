"""Event-loop stall watch, on when LOOP_STALL_MS is set (issue 11: no request may hold the
event loop for more than ~20 ms at a time; docs/reliability.md, `make bench-loop`).

A task on the loop wakes every `tick` seconds; how late it wakes is the loop's lag: the time
the loop spent on something else (a callback, a step of another task) or could not run at all.
Each lag is observed in `session_audit_event_loop_lag_seconds`. A lag above the threshold is
logged (logger `session_audit.loop`, warning) with:
  * `loop_cpu_ms`, the loop thread's own CPU time over the stall: close to the stall itself
    when code on the loop held it; far below it when the loop thread was waiting, for the GIL
    (held by a thread of ours: PDF building, gRPC's) or for a CPU (a loaded machine);
  * `process_cpu_ms`, every thread of this process over the stall (loop_cpu_ms included):
    above loop_cpu_ms when other threads of ours ran meanwhile;
  * `held_by`: where the loop thread was while the stall lasted, taken by a watchdog thread
    every `tick` (innermost frames of this package first, the innermost frame of all last) —
    the code that held the loop, when loop_cpu_ms says it did.

A stall may add up several callbacks run in one turn of the loop (ten batches' steps, say).
So every callback the loop runs is also timed on its own (asyncio's Handle._run, wrapped while
the watch runs, about a microsecond each): one that keeps the loop thread on CPU longer than
the threshold is logged as a slow step with `step_ms`, `step_cpu_ms` (the loop thread's CPU
during it: the hold a quiet machine would see), `step` (the task's coroutine, the RPC it
served, where it paused next) and `held_by` (the watchdog's samples taken during it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
import traceback
from collections import Counter, deque
from types import FrameType
from typing import Any

from session_audit.core import metrics

log = logging.getLogger("session_audit.loop")
PACKAGE = "session_audit"


def where(frame: FrameType | None, depth: int = 4) -> str:
    """What the loop thread runs: the innermost `depth` frames of this package above the event
    loop's own frames (the callback or task step being run), innermost first, then the
    innermost frame of all in brackets (a library, or `select` when the loop waits for I/O)."""
    if frame is None:
        return "?"
    stack = traceback.extract_stack(frame)
    # Frames below the loop's Handle._run are the loop itself (run_forever, serve, cli).
    runs = [i for i, f in enumerate(stack) if f.name == "_run" and "asyncio" in f.filename]
    step = stack[runs[-1] + 1 :] if runs else stack
    inner = stack[-1]
    label = f"[{inner.filename.rsplit('/', 1)[-1]}:{inner.lineno} {inner.name}]"
    if not step:
        return f"loop {label}"
    ours = [f for f in reversed(step) if f"/{PACKAGE}/" in f.filename][:depth]
    parts = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in ours]
    if not ours or ours[0] is not inner:
        parts.append(label)
    return " < ".join(parts)


def _paused_at(coro: Any) -> str:
    """Where a task's coroutine waits now: the innermost coroutine of its await chain."""
    spot = "?"
    for _ in range(50):
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is None:
            break
        spot = f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}"
        nxt = getattr(coro, "cr_await", None)
        if nxt is None or not hasattr(nxt, "cr_frame"):
            break
        coro = nxt
    return spot


def describe(handle: asyncio.Handle) -> str:
    """What a loop callback was: a task's step (its coroutine, where it paused next) or the
    callback itself."""
    callback = getattr(handle, "_callback", None)
    task = getattr(callback, "__self__", None)
    # The RPC it served, from the log context the step ran in (observability binds it).
    context = getattr(handle, "_context", None)
    method = next((v for k, v in (context or {}).items() if k.name == "structlog_method"), None)
    rpc = f" of {method}" if method else ""
    if isinstance(task, asyncio.Task):
        coro = task.get_coro()
        name = getattr(coro, "__qualname__", type(coro).__name__)
        return f"task {name}{rpc}, then paused at {_paused_at(coro)}"
    return f"{repr(callback)[:160]}{rpc}"


class LoopWatch:
    def __init__(self, threshold: float, tick: float = 0.005) -> None:
        self.threshold = threshold
        self.tick = tick
        self.longest = 0.0
        self._beat = time.monotonic()
        self._samples: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._loop_thread = 0
        self.longest_step = 0.0
        # (time.monotonic(), where the loop thread was) while the beat was late.
        self._spots: deque[tuple[float, str]] = deque(maxlen=2000)
        self._original_run: Any = None

    def start(self) -> None:
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        self._time_steps()
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._thread = threading.Thread(target=self._watch, name="loop-watch", daemon=True)
        self._thread.start()

    def _time_steps(self) -> None:
        original = self._original_run = asyncio.events.Handle._run
        watch = self

        def timed_run(handle: asyncio.Handle) -> None:
            t0, c0 = time.monotonic(), time.thread_time()
            original(handle)
            took = time.monotonic() - t0
            # Only steps that held the loop on CPU that long: a step merely stretched by a
            # busy machine (or the GIL held elsewhere) shows in the stalls above.
            if took > watch.threshold and time.thread_time() - c0 > watch.threshold:
                watch._slow_step(handle, t0, took, time.thread_time() - c0)

        asyncio.events.Handle._run = timed_run  # type: ignore[method-assign,assignment]

    def _slow_step(self, handle: asyncio.Handle, t0: float, took: float, cpu: float) -> None:
        self.longest_step = max(self.longest_step, took)
        with self._lock:
            spots = Counter(w for at, w in self._spots if at >= t0)
        log.warning(
            "event loop step took %.0f ms", 1000 * took,
            extra={"step_ms": round(1000 * took, 1), "step_cpu_ms": round(1000 * cpu, 1),
                   "step": describe(handle),
                   "held_by": "; ".join(f"{n}× {w}" for w, n in spots.most_common(3)) or "?"},
        )  # fmt: skip

    async def stop(self) -> None:
        self._stop.set()
        if self._original_run is not None:
            asyncio.events.Handle._run = self._original_run  # type: ignore[method-assign]
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 1.0)

    async def _run(self) -> None:
        cpu, proc = time.thread_time(), time.process_time()
        while True:
            before = time.monotonic()
            with self._lock:
                self._beat = before
                self._samples.clear()
            await asyncio.sleep(self.tick)
            now = time.monotonic()
            lag = max(0.0, now - before - self.tick)
            metrics.EVENT_LOOP_LAG.observe(lag)
            cpu_now, proc_now = time.thread_time(), time.process_time()
            if lag > self.threshold:
                with self._lock:
                    held = "; ".join(f"{n}× {w}" for w, n in self._samples.most_common(3))
                self.longest = max(self.longest, lag)
                log.warning(
                    "event loop stalled %.0f ms", 1000 * lag,
                    extra={"stall_ms": round(1000 * lag, 1),
                           "loop_cpu_ms": round(1000 * (cpu_now - cpu), 1),
                           "process_cpu_ms": round(1000 * (proc_now - proc), 1),
                           "held_by": held or "?"},
                )  # fmt: skip
            cpu, proc = cpu_now, proc_now

    def _watch(self) -> None:
        """Samples where the loop thread is while its beat is late."""
        while not self._stop.wait(self.tick):
            with self._lock:
                late = time.monotonic() - self._beat > self.tick + self.threshold / 2
            if not late:
                continue
            frame = sys._current_frames().get(self._loop_thread)
            spot = where(frame)
            del frame
            with self._lock:
                self._samples[spot] += 1
                self._spots.append((time.monotonic(), spot))
