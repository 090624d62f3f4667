"""Settings of the reports surface, from an injectable environ (README "Configuration")."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from session_audit.core.config import ConfigError, _int
from session_audit.core.errors import InvalidArgument
from session_audit.core.validation import rfc3339

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


def file_clock(path: Path) -> Clock:
    """A clock that reads 'now' (RFC 3339) from a file on every call: tests move time for
    several server processes at once by rewriting it."""

    def now() -> datetime:
        try:
            value = rfc3339("REPORT_CLOCK_FILE", path.read_text().strip())
        except InvalidArgument as exc:
            raise ConfigError(f"{exc.message} (in {path})") from None
        if value is None:
            raise ConfigError(f"REPORT_CLOCK_FILE: {path} must hold a time with an offset")
        return value

    return now


@dataclass(frozen=True)
class ReportConfig:
    # Seconds between scheduler ticks (each tick generates every elapsed period).
    scheduler_interval: float
    # Seconds between polls for pending reports (new ones in this process start at once).
    poll_interval: float
    # Reports generated at the same time per server process.
    generators: int
    # Bound on one report's generation; past it the report fails with that reason.
    generation_timeout: float
    # Largest number of table rows a PDF carries; longer reports are cut with a note
    # (CSV and HTML always carry every row).
    pdf_max_rows: int
    # Where 'now' comes from (REPORT_CLOCK_FILE, for tests; else the system clock).
    clock: Clock
    scheduler_enabled: bool
    # PDFs built at the same time per server process (each holds its document in memory,
    # up to ~140 MB at pdf_max_rows); more downloads wait for a slot.
    pdf_builders: int = 2

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ReportConfig:
        env = os.environ if environ is None else environ
        clock_file = env.get("REPORT_CLOCK_FILE", "")
        return cls(
            scheduler_interval=_int(env, "REPORT_SCHEDULER_INTERVAL_MS", 30_000, 50, 3_600_000)
            / 1000,
            poll_interval=_int(env, "REPORT_POLL_INTERVAL_MS", 2_000, 50, 600_000) / 1000,
            generators=_int(env, "REPORT_GENERATORS", 2, 1, 16),
            generation_timeout=float(
                _int(env, "REPORT_GENERATION_TIMEOUT_SECONDS", 1800, 1, 86_400)
            ),
            pdf_max_rows=_int(env, "REPORT_PDF_MAX_ROWS", 100_000, 1, 10_000_000),
            clock=file_clock(Path(clock_file)) if clock_file else system_clock,
            scheduler_enabled=_int(env, "REPORT_SCHEDULER", 1, 0, 1) == 1,
            pdf_builders=_int(env, "REPORT_PDF_BUILDERS", 2, 1, 64),
        )
