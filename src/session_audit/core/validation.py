"""Checks shared by every request parser. Each failure raises InvalidArgument naming the
parameter and what was expected."""

from __future__ import annotations

import re
import zoneinfo
from datetime import UTC, datetime
from functools import cache

from session_audit.core.errors import InvalidArgument

MAX_TEXT = 256
# Paging of every list (limit/offset), one definition for all surfaces.
DEFAULT_LIMIT = 20
MAX_LIMIT = 100
MAX_OFFSET = 10_000
# The zone of a request that names none.
DEFAULT_ZONE = "Etc/UTC"
_ZONE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+)*$")

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
)


def text(name: str, value: str, max_len: int = MAX_TEXT) -> str | None:
    """A free-text filter: empty means absent."""
    if value == "":
        return None
    if len(value) > max_len:
        raise InvalidArgument(f"{name}: expected at most {max_len} characters, got {len(value)}")
    if "\x00" in value:
        raise InvalidArgument(f"{name}: must not contain NUL characters")
    return value


def choice(name: str, value: str, allowed: tuple[str, ...], *, upper: bool = False) -> str:
    normal = value.strip().upper() if upper else value.strip().lower()
    if normal not in allowed:
        raise InvalidArgument(
            f"{name}: expected one of {', '.join(allowed)}, got {truncate(value)!r}"
        )
    return normal


def rfc3339(name: str, value: str) -> datetime | None:
    """An RFC 3339 date-time with an explicit offset; honoured, then compared in UTC."""
    if value == "":
        return None
    m = _RFC3339.match(value.strip())
    if m is None:
        raise InvalidArgument(
            f"{name}: expected an RFC 3339 date-time with offset such as "
            f"2024-07-25T15:56:35Z or 2024-07-25T17:56:35+02:00, got {truncate(value)!r}"
        )
    frac = (m.group(7) or "")[:7]  # at most microseconds
    zone = m.group(8).upper()
    iso = f"{m.group(1)}-{m.group(2)}-{m.group(3)}T{m.group(4)}:{m.group(5)}:{m.group(6)}"
    try:
        return datetime.fromisoformat(iso + frac + ("+00:00" if zone == "Z" else zone))
    except ValueError:
        raise InvalidArgument(f"{name}: not a valid date-time: {truncate(value)!r}") from None


@cache
def _zone_names() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def parse_zone(name: str, param: str = "time_zone") -> tuple[str, zoneinfo.ZoneInfo]:
    """(name, zone) for an IANA time zone name (exact spelling); empty means DEFAULT_ZONE."""
    if name == "":
        return DEFAULT_ZONE, zoneinfo.ZoneInfo(DEFAULT_ZONE)
    if len(name) > 64 or not _ZONE_NAME.match(name) or name not in _zone_names():
        raise InvalidArgument(
            f"{param}: expected an IANA time zone name such as Europe/Berlin or Etc/UTC, "
            f"got {truncate(name)!r}"
        )
    return name, zoneinfo.ZoneInfo(name)


def paging(limit_set: bool, limit: int, offset_set: bool, offset: int) -> tuple[int, int]:
    """(limit, offset) of a list request; unset fields take the defaults."""
    lim = int_range("limit", limit, 1, MAX_LIMIT) if limit_set else DEFAULT_LIMIT
    off = int_range("offset", offset, 0, MAX_OFFSET) if offset_set else 0
    return lim, off


def int_range(name: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise InvalidArgument(f"{name}: expected {lo}..{hi}, got {value}")
    return value


def ordered(start_name: str, start: datetime | None, end_name: str, end: datetime | None) -> None:
    if start is not None and end is not None and start > end:
        raise InvalidArgument(
            f"{start_name}: must not be after {end_name} "
            f"({start.astimezone(UTC).isoformat()} > {end.astimezone(UTC).isoformat()})"
        )


def truncate(value: str, limit: int = 80) -> str:
    return value if len(value) <= limit else value[:limit] + "…"
