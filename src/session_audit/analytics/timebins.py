"""Time for the aggregations: zones, ISO 8601 input, calendar bins, and the split of a time
range into pieces the rollups can answer.

Bins: `second`, `minute` and `hour` bins are fixed lengths, aligned to the wall clock of the
zone at the start of the range. `day`, `week` (from Monday), `month` (from the 1st) and `year`
bins follow the calendar in the zone: each starts at local midnight, so a day on which DST
begins has 23 hours and one on which it ends 25. A local midnight that does not exist (a
zone whose DST starts at 00:00) starts at the first instant after the gap; an ambiguous one
at its first occurrence.

Pieces: rollups hold UTC hours (some), days, weeks (some) and months. `decompose` cuts an
interval into the largest aligned UTC pieces that fit (months inside, then weeks when the
rollup has them, then days, then hours when the rollup has them) and leaves the rest — less
than an hour, or a day, at either end — as raw pieces for the base table. A piece is only
ever a whole UTC unit inside the interval, so a bin in any zone is exact: a week of
Europe/Berlin (Monday 00:00 local, Sunday 23:00 UTC) holds no whole UTC week and is read as
UTC days plus raw hours, like before weeks existed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo

from session_audit.core import validation
from session_audit.core.errors import InvalidArgument
from session_audit.core.validation import truncate

BIN_SIZES = ("second", "minute", "hour", "day", "week", "month", "year")
FIXED = {"second": timedelta(seconds=1), "minute": timedelta(minutes=1), "hour": timedelta(hours=1)}
# The earliest instant a piece starts at ("all of history before T").
EPOCH = datetime(1, 1, 1, tzinfo=UTC)

HOUR, DAY, MONTH, WEEK = 1, 2, 3, 4  # rollup grains as stored (WEEK: ISO, from Monday 00:00 UTC)
RAW = 0  # a piece the rollups cannot answer: read the base table

_ISO = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?"
    r"([Zz]|[+-]\d{2}(?::?\d{2})?)?)?$",
    re.ASCII,
)
_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$", re.ASCII)


def local_to_instant(naive: datetime, zone: tzinfo) -> datetime:
    """The first instant whose wall-clock time in `zone` is `naive` or later: an ambiguous
    time is its first occurrence, a time in a DST gap is the end of the gap."""
    first = naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == naive:
        return first
    # In a gap: the answer lies between the two readings; find the transition.
    lo = naive.replace(tzinfo=zone, fold=1).astimezone(UTC)
    hi = first
    lo, hi = min(lo, hi), max(lo, hi)
    while hi - lo > timedelta(seconds=1):
        mid = lo + (hi - lo) / 2
        if mid.astimezone(zone).replace(tzinfo=None) >= naive:
            hi = mid
        else:
            lo = mid
    return hi.replace(microsecond=0) if hi.microsecond else hi


def parse_instant(param: str, value: str, zone: tzinfo) -> datetime | None:
    """ISO 8601: `2026-03-01`, `2026-03-01T10:00`, `…T10:00:30.5`, with an optional offset
    (`Z`, `+02:00`, `+0200`, `+02`). Without an offset the time is read in `zone`; a date alone
    is its local midnight. A local time that does not exist (DST gap) is refused, and so is an
    instant outside the time domain (core/validation.py)."""
    if value == "":
        return None
    m = _ISO.match(value.strip())
    if m is None:
        hint = ""
        if " " in value.strip() and "+" not in value:
            hint = " (a '+' in a URL query must be sent as %2B; unencoded it arrives as a space)"
        raise InvalidArgument(
            f"{param}: expected an ISO 8601 date or date-time such as 2026-03-01, "
            f"2026-03-01T10:00 or 2026-03-01T10:00:00+01:00, got {truncate(value)!r}{hint}"
        )
    year, month, day, hh, mm, ss, frac, offset = m.groups()
    try:
        naive = datetime(
            int(year), int(month), int(day), int(hh or 0), int(mm or 0), int(ss or 0),
            int(((frac or "") + "000000")[:6]),
        )  # fmt: skip
    except ValueError:
        raise InvalidArgument(f"{param}: not a valid date-time: {truncate(value)!r}") from None
    if offset:
        if offset in ("Z", "z"):
            return naive.replace(tzinfo=UTC)
        sign = -1 if offset[0] == "-" else 1
        digits = offset[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:] or 0)
        if hours > 23 or minutes > 59:
            raise InvalidArgument(f"{param}: offset out of range in {truncate(value)!r}")
        aware = naive.replace(tzinfo=timezone(sign * timedelta(hours=hours, minutes=minutes)))
        return validation.instant(param, aware, value)
    if not validation.MIN_INSTANT.date() <= naive.date() <= validation.MAX_INSTANT.date():
        # Its reading in `zone` could leave Python's range; the domain refuses it anyway.
        raise InvalidArgument(
            f"{param}: expected a time from {validation.TIME_RANGE}, got {truncate(value)!r}"
        )
    instant = validation.instant(param, local_to_instant(naive, zone), value)
    if instant.astimezone(zone).replace(tzinfo=None) != naive:
        raise InvalidArgument(
            f"{param}: {truncate(value)!r} does not exist in {zone} (a daylight-saving gap)"
        )
    return instant


def parse_day(param: str, value: str) -> date | None:
    """A calendar day, exactly `YYYY-MM-DD`."""
    if value == "":
        return None
    m = _DATE.match(value)
    if m is None:
        raise InvalidArgument(f"{param}: expected a date YYYY-MM-DD, got {truncate(value)!r}")
    try:
        parsed = date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        raise InvalidArgument(f"{param}: not a valid date: {truncate(value)!r}") from None
    return validation.day(param, parsed)


def day_start(day: date, zone: tzinfo) -> datetime:
    """The instant a calendar day begins in `zone`, clamped to the time domain (the first and
    last days of the calendar begin outside it in some zones)."""
    if not validation.MIN_DAY <= day <= validation.MAX_DAY:
        return validation.MIN_INSTANT if day < validation.MIN_DAY else validation.MAX_INSTANT
    return validation.clamp(local_to_instant(datetime(day.year, day.month, day.day), zone))


def format_instant(instant: datetime, zone: tzinfo) -> str:
    """ISO 8601 in `zone` with milliseconds and the offset, `Z` when it is zero:
    2026-03-29T00:00:00.000+01:00."""
    local = instant.astimezone(zone)
    offset = local.utcoffset() or timedelta(0)
    # Not strftime: glibc's %Y does not pad years below 1000.
    text = (
        f"{local.year:04d}-{local.month:02d}-{local.day:02d}T{local.hour:02d}:"
        f"{local.minute:02d}:{local.second:02d}.{local.microsecond // 1000:03d}"
    )
    if offset == timedelta(0):
        return text + "Z"
    sign = "-" if offset < timedelta(0) else "+"
    seconds = int(abs(offset).total_seconds())
    hh, rest = divmod(seconds, 3600)
    mm, ss = divmod(rest, 60)
    return text + f"{sign}{hh:02d}:{mm:02d}" + (f":{ss:02d}" if ss else "")


def add_months(day: date, months: int) -> date:
    """The first of the month `months` after `day`'s (ValueError beyond the calendar)."""
    index = day.year * 12 + day.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def _calendar_floor(day: date, size: str) -> date:
    if size == "week":
        return day - timedelta(days=day.weekday())
    if size == "month":
        return day.replace(day=1)
    if size == "year":
        return day.replace(month=1, day=1)
    return day


def _calendar_next(day: date, size: str) -> date:
    """The next bin's first day; date.max once past the calendar (its start clamps to the end
    of the time domain, so no bin starts there)."""
    try:
        if size == "day":
            return day + timedelta(days=1)
        if size == "week":
            return day + timedelta(days=7)
        if day.year == 9999 and (size == "year" or day.month == 12):
            return date.max
        if size == "month":
            return add_months(day, 1)
        return date(day.year + 1, 1, 1)
    except OverflowError:
        return date.max


class TooManyBins(Exception):
    """More bins than allowed; carries how many there would be (at least)."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count


def bin_starts(
    start: datetime, end: datetime, size: str, zone: tzinfo, limit: int
) -> list[datetime]:
    """Start instants of the bins that meet [start, end), in order. The first starts at or
    before `start`. Raises TooManyBins past `limit`."""
    if end <= start:
        return []
    if size in FIXED:
        step = FIXED[size]
        local = start.astimezone(zone)
        offset = local.utcoffset() or timedelta(0)
        wall = local.replace(tzinfo=None)
        if size == "hour":
            wall = wall.replace(minute=0, second=0, microsecond=0)
        elif size == "minute":
            wall = wall.replace(second=0, microsecond=0)
        else:
            wall = wall.replace(microsecond=0)
        first = (wall - offset).replace(tzinfo=UTC)
        count = -(-(end - first) // step)
        if count > limit:
            raise TooManyBins(count)
        return [first + i * step for i in range(count)]
    out: list[datetime] = []
    day = _calendar_floor(start.astimezone(zone).date(), size)
    instant = day_start(day, zone)
    while instant < end:
        if len(out) == limit:
            raise TooManyBins(limit + 1)
        if not out or instant > out[-1]:
            out.append(instant)
        if day == date.max:
            break
        day = _calendar_next(day, size)
        instant = day_start(day, zone)
    return out


# -- pieces ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """[lo, hi) of one grain (RAW: base table), counted into bin `bin`, added (sign 1) or
    subtracted (sign -1, see `shorten`)."""

    grain: int
    lo: datetime
    hi: datetime
    bin: int
    sign: int = 1


def _floor(t: datetime, grain: int) -> datetime:
    t = t.astimezone(UTC)
    if grain == HOUR:
        return t.replace(minute=0, second=0, microsecond=0)
    if grain == DAY:
        return t.replace(hour=0, minute=0, second=0, microsecond=0)
    if grain == WEEK:
        # EPOCH (0001-01-01) is a Monday, so no floor leaves the calendar.
        day = t.replace(hour=0, minute=0, second=0, microsecond=0)
        return day - timedelta(days=day.weekday())
    return t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _ceil(t: datetime, grain: int) -> datetime:
    f = _floor(t, grain)
    if f == t:
        return f
    if grain == HOUR:
        return f + timedelta(hours=1)
    if f >= validation.MAX_INSTANT - timedelta(days=32):
        return datetime.max.replace(tzinfo=UTC)  # no aligned piece beyond the time domain
    if grain == DAY:
        return f + timedelta(days=1)
    if grain == WEEK:
        return f + timedelta(days=7)
    nxt = add_months(f.date(), 1)
    return datetime(nxt.year, nxt.month, 1, tzinfo=UTC)


def decompose(
    lo: datetime, hi: datetime, bin_index: int, finest: int | None = HOUR, weeks: bool = False
) -> list[Piece]:
    """Cut [lo, hi) into aligned UTC months, weeks (if `weeks`), days and (if `finest` is HOUR)
    hours, and raw remainders at each end. With `finest` None, the whole interval is one raw
    piece."""
    if hi <= lo:
        return []
    if finest is None:
        return [Piece(RAW, lo, hi, bin_index)]
    levels = [g for g in (MONTH, WEEK, DAY, HOUR) if g != WEEK or weeks]
    return _split(lo, hi, bin_index, tuple(levels[: levels.index(finest) + 1]))


def _split(lo: datetime, hi: datetime, b: int, levels: tuple[int, ...]) -> list[Piece]:
    """Pieces of [lo, hi): the `levels[0]`-aligned middle, the sides split at the finer
    levels."""
    if hi <= lo:
        return []
    if not levels:
        return [Piece(RAW, lo, hi, b)]
    grain, finer = levels[0], levels[1:]
    inner_lo = _ceil(lo, grain)
    inner_hi = _floor(hi, grain)
    if inner_lo > inner_hi or (inner_lo == inner_hi and finer):
        # No whole unit of this grain inside: the finer grains tile it (a week across a
        # month's end stays one week). At the finest grain, one edge inside still cuts the
        # interval in two, so each raw remainder is shorter than that grain.
        return _split(lo, hi, b, finer)
    left = _split(lo, inner_lo, b, finer) if lo < inner_lo else []
    right = _split(inner_hi, hi, b, finer) if inner_hi < hi else []
    middle = [Piece(grain, inner_lo, inner_hi, b)] if inner_lo < inner_hi else []
    return [*left, *middle, *right]


SHORT = timedelta(days=14)
UNIT = {HOUR: timedelta(hours=1), DAY: timedelta(days=1), WEEK: timedelta(days=7)}


def rows_per_value(pieces: Sequence[Piece]) -> int:
    """How many rollup rows the pieces read per value of a dimension (a proxy for their cost:
    each read of a piece walks that many rows per value, or per top value one index range)."""
    n = 0
    for p in pieces:
        if p.grain == MONTH:
            n += (p.hi.year - p.lo.year) * 12 + p.hi.month - p.lo.month
        elif p.grain != RAW:
            n += -(-(p.hi - p.lo) // UNIT[p.grain])
    return n


def cheapest(
    lo: datetime, hi: datetime, bin_index: int, finest: int | None, weeks: bool
) -> list[Piece]:
    """The shortened pieces of [lo, hi) that read the fewest rows: with weeks when the rollup
    keeps them and they help (a calendar week is one row instead of seven days), else without
    (a 30-day window is cheaper as a month minus a few days than as weeks and days)."""
    if not weeks or finest is None or finest == HOUR:
        return shorten(decompose(lo, hi, bin_index, finest))
    weekly = shorten(decompose(lo, hi, bin_index, finest, weeks=True))
    if hi - lo <= SHORT or not any(p.grain == WEEK for p in weekly):
        # Without a week piece the two are the same; and up to two weeks, days alone cannot
        # use a month (that needs more than half of one), so weeks never read more.
        return weekly
    plain = shorten(decompose(lo, hi, bin_index, finest))
    return weekly if rows_per_value(weekly) < rows_per_value(plain) else plain


def _next(t: datetime, grain: int) -> datetime:
    """The start of the `grain` unit after the one starting at `t`."""
    return _ceil(t + timedelta(microseconds=1), grain)


_PARENT = {HOUR: DAY, DAY: MONTH}


def shorten(pieces: list[Piece]) -> list[Piece]:
    """The same sum read from fewer rollup rows: a run of days covering more than half of a
    month becomes the month minus the days it lacks (likewise hours of a day). A 30-day
    window then reads ~7 days and a month instead of 30 days. Exact because a month's rollup
    row is the sum of its days' rows (both are kept from the same sessions)."""
    out: list[Piece] = []
    for piece in pieces:
        parent = _PARENT.get(piece.grain)
        if parent is None or piece.sign != 1:
            out.append(piece)
            continue
        lo = piece.lo
        while lo < piece.hi:
            unit_lo = _floor(lo, parent)
            unit_hi = _next(unit_lo, parent)
            hi = min(piece.hi, unit_hi)
            if (hi - lo) * 2 > unit_hi - unit_lo:
                out.append(Piece(parent, unit_lo, unit_hi, piece.bin))
                for a, b in ((unit_lo, lo), (hi, unit_hi)):
                    if a < b:
                        out.append(Piece(piece.grain, a, b, piece.bin, -1))
            else:
                out.append(Piece(piece.grain, lo, hi, piece.bin))
            lo = hi
    return out
