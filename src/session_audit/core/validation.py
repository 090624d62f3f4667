"""The domain of every value kind, checked where a value enters (REST, gRPC, `q`,
`query_filter`, cursors, ingest): one validator per kind, shared by every surface. Each failure
raises InvalidArgument `<parameter>: <what was expected>, got …`. The table of domains is
docs/input-domains.md; keep the two in step.

- Time: an instant from 0001-01-02T00:00:00Z to 9999-12-30T23:59:59.999999Z. Python and
  PostgreSQL both hold every such instant in every time zone (offsets reach ±16 h in tzdata's
  early local mean times), and neither end is asyncpg's ±infinity (datetime.min/max).
- Calendar day (report windows): 0001-01-03 .. 9999-12-29, so its local midnight in any zone
  is a time of the domain.
- Integer: within its column or proto field; decimal ASCII digits with an optional `-` only
  (`²`, `--1`, `1_0` are not integers).
- Text: at most a documented length, no NUL.
- JSON: objects nested at most MAX_JSON_DEPTH levels (what every read path renders: Envoy's
  transcoder and protobuf's recursion limits), keys unique, numbers finite.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from functools import cache
from typing import Any

from session_audit.core.errors import InvalidArgument

MAX_TEXT = 256
# Paging of every list (limit/offset), one definition for all surfaces.
DEFAULT_LIMIT = 20
MAX_LIMIT = 100
MAX_OFFSET = 10_000
# The zone of a request that names none.
DEFAULT_ZONE = "Etc/UTC"
_ZONE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+)*$")

# -- time ----------------------------------------------------------------------------------------
MIN_INSTANT = datetime(1, 1, 2, tzinfo=UTC)
MAX_INSTANT = datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC)
MIN_DAY = date(1, 1, 3)
MAX_DAY = date(9999, 12, 29)
TIME_RANGE = "0001-01-02T00:00:00Z to 9999-12-30T23:59:59.999999Z"
DAY_RANGE = "0001-01-03 to 9999-12-29"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The same bounds as google.protobuf.Timestamp seconds (whole seconds; nanos 0..999999999).
MIN_SECONDS = (MIN_INSTANT - _EPOCH) // timedelta(seconds=1)
MAX_SECONDS = (MAX_INSTANT - _EPOCH) // timedelta(seconds=1)


def in_time_domain(value: datetime) -> bool:
    """Aware `value` between MIN_INSTANT and MAX_INSTANT (compared without converting, so an
    instant outside Python's range in UTC is refused, not an OverflowError)."""
    return MIN_INSTANT <= value <= MAX_INSTANT


def instant(name: str, value: datetime, shown: str | None = None) -> datetime:
    """`value` (aware) if it is in the time domain, in UTC."""
    if not in_time_domain(value):
        raise InvalidArgument(
            f"{name}: expected a time from {TIME_RANGE}, got {truncate(shown or str(value))!r}"
        )
    return value.astimezone(UTC)


def timestamp_seconds(name: str, seconds: int, nanos: int) -> datetime:
    """A google.protobuf.Timestamp's (seconds, nanos) in the time domain, as a UTC datetime."""
    if not (MIN_SECONDS <= seconds <= MAX_SECONDS and 0 <= nanos < 1_000_000_000):
        raise InvalidArgument(
            f"{name}: expected a time from {TIME_RANGE}, got seconds={seconds} nanos={nanos}"
        )
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)


def day(name: str, value: date) -> date:
    if not MIN_DAY <= value <= MAX_DAY:
        raise InvalidArgument(f"{name}: expected a date from {DAY_RANGE}, got {value.isoformat()}")
    return value


def clamp(value: datetime) -> datetime:
    """The nearest instant of the time domain (for computed edges, never for input)."""
    return max(MIN_INSTANT, min(MAX_INSTANT, value))


# -- integers ------------------------------------------------------------------------------------
# A decimal integer as text (query parameters, proto3 JSON's integers-as-strings, cursors):
# ASCII digits with an optional leading '-' ('²', '--1', '١', '1_0', ' 1' are not integers).
DECIMAL = re.compile(r"-?[0-9]{1,20}", re.ASCII)


# -- JSON ----------------------------------------------------------------------------------------
# Free-form JSON (metadata, metrics, integrations_metadata, event_stream): at most this many
# nested objects/lists, the value itself included. Measured on this stack: metadata nested 35
# levels makes Envoy's transcoder answer 502 "allowed depth exceeded" on GetSession, and a
# Python gRPC client fails to decode the reply (each JSON level is two messages, Struct →
# Value, and upb stops at 100 levels of messages in all); 34 still renders. 20 leaves room
# for the envelope (ListSessionsResponse → data → Session) and for clients in other languages.
MAX_JSON_DEPTH = 20


def json_depth(value: Any, stop_above: int = 1 << 30) -> int:
    """Nesting depth of a plain JSON value (a scalar is 0, `{}` and `[]` are 1), without
    recursion; stops counting once it exceeds `stop_above`."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Iterator[Any] = iter(item.values())
        elif isinstance(item, list):
            children = iter(item)
        else:
            continue
        level += 1
        if level > deepest:
            deepest = level
            if deepest > stop_above:
                return deepest
        stack.extend((child, level) for child in children)
    return deepest


def json_value(name: str, value: Any, max_depth: int = MAX_JSON_DEPTH) -> Any:
    if json_depth(value, max_depth) > max_depth:
        raise InvalidArgument(
            f"{name}: expected JSON nested at most {max_depth} levels, got deeper"
        )
    return value


_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$",
    re.ASCII,
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
    """An RFC 3339 date-time with an explicit offset, in the time domain; returned in UTC."""
    if value == "":
        return None
    m = _RFC3339.match(value.strip())
    if m is None:
        hint = ""
        if " " in value.strip() and "+" not in value:
            hint = " (a '+' in a URL query must be sent as %2B; unencoded it arrives as a space)"
        raise InvalidArgument(
            f"{name}: expected an RFC 3339 date-time with offset such as "
            f"2024-07-25T15:56:35Z or 2024-07-25T17:56:35+02:00, got {truncate(value)!r}{hint}"
        )
    frac = (m.group(7) or "")[:7]  # at most microseconds
    zone = m.group(8).upper()
    iso = f"{m.group(1)}-{m.group(2)}-{m.group(3)}T{m.group(4)}:{m.group(5)}:{m.group(6)}"
    try:
        parsed = datetime.fromisoformat(iso + frac + ("+00:00" if zone == "Z" else zone))
    except ValueError:
        raise InvalidArgument(f"{name}: not a valid date-time: {truncate(value)!r}") from None
    return instant(name, parsed, value)


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
