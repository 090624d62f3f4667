"""What a log line may say about an exception: its class, PostgreSQL's SQLSTATE and constraint
name, and where it was raised (file:line per frame). Never its message: asyncpg's carries the
DETAIL and HINT lines, and PostgreSQL puts the failing row's values there (e-mails, connection
names), and other messages quote request text, which can hold a token."""

from __future__ import annotations

import traceback

import asyncpg


def describe(exc: BaseException) -> str:
    """`Class [SQLSTATE …, constraint …] at file:line < file:line …` (innermost first)."""
    parts = [type(exc).__name__]
    if isinstance(exc, asyncpg.PostgresError):
        extra = [f"SQLSTATE {exc.sqlstate}"]
        constraint = getattr(exc, "constraint_name", None)
        if constraint:
            extra.append(f"constraint {constraint}")
        parts.append("[" + ", ".join(extra) + "]")
    frames = traceback.extract_tb(exc.__traceback__)[::-1][:12]
    if frames:
        parts.append(
            "at " + " < ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in frames)
        )
    return " ".join(parts)
