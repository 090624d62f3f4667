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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
import traceback
from collections import Counter
from types import FrameType

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

    def start(self) -> None:
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._thread = threading.Thread(target=self._watch, name="loop-watch", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
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
