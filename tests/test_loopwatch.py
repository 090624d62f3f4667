"""The event-loop stall watch (LOOP_STALL_MS, loopwatch.py) and the REST ingest body read off
the loop (issue 11: CPU-heavy steps must not hold the event loop)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from session_audit.core import json_body
from session_audit.core.errors import InvalidArgument
from session_audit.loopwatch import LoopWatch
from session_audit.v1 import sessions_pb2 as pb


def _spin(seconds: float) -> None:
    """Holds the loop on CPU (a busy loop, not a sleep)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_step_holding_the_loop_is_logged_with_its_cpu_and_where(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> LoopWatch:
        watch = LoopWatch(threshold=0.02)
        watch.start()
        await asyncio.sleep(0.05)

        async def culprit() -> None:
            await asyncio.sleep(0)
            _spin(0.4)  # long enough for the watchdog thread to sample it on a busy machine
            await asyncio.sleep(0.03)

        await asyncio.create_task(culprit())
        await asyncio.sleep(0.05)
        await watch.stop()
        return watch

    with caplog.at_level(logging.WARNING, logger="session_audit.loop"):
        watch = asyncio.run(scenario())
    steps = [r for r in caplog.records if hasattr(r, "step_ms")]
    stalls = [r for r in caplog.records if hasattr(r, "stall_ms")]
    assert len(steps) == 1, [r.getMessage() for r in caplog.records]
    step = steps[0]
    assert 380 <= step.step_cpu_ms <= step.step_ms  # type: ignore[attr-defined]
    assert "culprit" in step.step  # type: ignore[attr-defined]
    assert "_spin" in step.held_by  # type: ignore[attr-defined]
    # The ticker was held up as long: one stall of at least the spin.
    assert stalls and max(r.stall_ms for r in stalls) >= 380
    assert watch.longest_step >= 0.38
    # Stopped: asyncio's Handle._run is asyncio's again.
    assert asyncio.events.Handle._run.__module__ == "asyncio.events"


def test_quick_steps_are_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        watch = LoopWatch(threshold=0.02)
        watch.start()
        for _ in range(20):
            _spin(0.002)
            await asyncio.sleep(0.005)
        await watch.stop()

    with caplog.at_level(logging.WARNING, logger="session_audit.loop"):
        asyncio.run(scenario())
    assert not [r for r in caplog.records if hasattr(r, "step_ms")]


def _body(n: int) -> bytes:
    sessions = [{"id": f"00000000-0000-4000-8000-{i:012d}", "start_date": "2026-03-01T10:00:00Z",
                 "connection": "pg", "labels": {"n": str(i)}} for i in range(n)]  # fmt: skip
    return json.dumps({"sessions": sessions}).encode()


def test_a_large_body_is_read_off_the_loop_with_the_same_result_and_errors() -> None:
    big = _body(400)
    assert len(big) > json_body.OFF_LOOP_BYTES
    got = asyncio.run(json_body.parse_strict_off_loop(big, pb.IngestSessionsRequest))
    assert got == json_body.parse_strict(big, pb.IngestSessionsRequest)
    assert len(got.sessions) == 400 and got.sessions[399].labels["n"] == "399"
    # A mistake deep in a large body is the same 400, raised through the thread.
    bad = big.replace(b'"connection": "pg", "labels": {"n": "399"}', b'"conection": "pg"')
    with pytest.raises(InvalidArgument) as err:
        asyncio.run(json_body.parse_strict_off_loop(bad, pb.IngestSessionsRequest))
    assert "sessions[399].conection" in err.value.message
