"""Settings of the purge job, from an injectable environ."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from session_audit.core.config import _int

Clock = Callable[[], datetime]
# Sessions a legal hold looks at per transaction: a window's row locks, and the moment the
# org's trail head is held for its entry, stay as short as an ingest chunk's.
HOLD_WINDOW = 5000


def system_clock() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class RetentionConfig:
    # Whether this process runs the background purge (RETENTION_PURGE=0 turns it off).
    enabled: bool
    # Seconds between two purge runs of an org.
    interval: float
    # Seconds between checks for orgs that are due.
    tick: float
    # Sessions (or reports) deleted per transaction.
    batch: int
    # Sessions a legal hold looks at per transaction while it locks what is stored.
    hold_window: int = HOLD_WINDOW
    clock: Clock = system_clock

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> RetentionConfig:
        env = os.environ if environ is None else environ
        interval = float(_int(env, "RETENTION_PURGE_INTERVAL_SECONDS", 3600, 1, 7 * 86_400))
        return cls(
            enabled=_int(env, "RETENTION_PURGE", 1, 0, 1) == 1,
            interval=interval,
            tick=min(interval, 60.0),
            batch=_int(env, "RETENTION_PURGE_BATCH", 1000, 1, 100_000),
            hold_window=_int(env, "RETENTION_HOLD_WINDOW", HOLD_WINDOW, 1, 1_000_000),
        )
