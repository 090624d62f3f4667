"""Logging: one formatter for every stdlib logger, structured with structlog.

`LOG_FORMAT=json` prints one JSON object per line (`timestamp`, `level`, `logger`, `event`,
plus the fields of the current call); `text` prints aligned `key=value` lines for a terminal.
Unset, it is `text` when stderr is a terminal and `json` otherwise (a service manager, a
container, a file). The code keeps using `logging.getLogger(__name__)`; structlog's
ProcessorFormatter renders those records, and the fields bound with `bind_call` (request id,
trace id, method, org, role) are merged into every line logged while the RPC runs.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import uuid
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import structlog

FORMATS = ("json", "text")


def log_format(environ: Mapping[str, str] | None = None, stream: Any = None) -> str:
    env = os.environ if environ is None else environ
    raw = env.get("LOG_FORMAT", "").strip().lower()
    if raw in FORMATS:
        return raw
    if raw:
        raise ValueError(f"LOG_FORMAT: expected json or text, got {raw!r}")
    out = sys.stderr if stream is None else stream
    return "text" if hasattr(out, "isatty") and out.isatty() else "json"


def configure(level: int = logging.INFO, fmt: str | None = None) -> None:
    """Route every stdlib logger through structlog's formatter on stderr."""
    fmt = fmt or log_format()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


# -- the current call ------------------------------------------------------------------------


@dataclass
class Call:
    """What the access line says about the RPC in progress; auth fills in org and role."""

    request_id: str
    org_id: str = ""
    role: str = ""


CALL: ContextVar[Call | None] = ContextVar("session_audit_call", default=None)

_ID = re.compile(r"[a-zA-Z0-9\-_.:]{1,128}")
_HEX = frozenset("0123456789abcdef")


def request_id(sent: str | None) -> str:
    """The caller's (Envoy's) x-request-id when it is a sane token, else a new one."""
    if sent and _ID.fullmatch(sent):
        return sent
    return str(uuid.uuid4())


def traceparent(sent: str | None) -> str | None:
    """A W3C traceparent (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`), or None
    when absent or malformed (an all-zero trace or parent id is invalid)."""
    if not sent or len(sent) != 55:
        return None
    parts = sent.split("-")
    if [len(p) for p in parts] != [2, 32, 16, 2] or parts[0] == "ff":
        return None
    if not all(set(p) <= _HEX for p in parts):
        return None
    if set(parts[1]) == {"0"} or set(parts[2]) == {"0"}:
        return None
    return sent


def bind_call(call: Call, **fields: Any) -> None:
    CALL.set(call)
    structlog.contextvars.bind_contextvars(request_id=call.request_id, **fields)


def unbind_call() -> None:
    CALL.set(None)
    structlog.contextvars.clear_contextvars()


def note_caller(org_id: object, role: str) -> None:
    """Called by auth once the token is known: the access line names who called."""
    call = CALL.get()
    if call is not None:
        call.org_id = str(org_id)
        call.role = role
        structlog.contextvars.bind_contextvars(org_id=call.org_id, role=role)
