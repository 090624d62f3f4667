"""Calendar periods of subscriptions: day, week (from Monday), month, quarter, year, in the
subscriber's time zone (DST-aware through zoneinfo). Pure functions, no I/O."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

PERIODS = ("day", "week", "month", "quarter", "year")


def _local_midnight(d: date, zone: ZoneInfo) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=zone).astimezone(UTC)


def _first_day(period: str, d: date) -> date:
    if period == "day":
        return d
    if period == "week":
        return d - timedelta(days=d.weekday())
    if period == "month":
        return d.replace(day=1)
    if period == "quarter":
        return date(d.year, 3 * ((d.month - 1) // 3) + 1, 1)
    if period == "year":
        return date(d.year, 1, 1)
    raise ValueError(period)


def _next_first_day(period: str, first: date) -> date:
    if period == "day":
        return first + timedelta(days=1)
    if period == "week":
        return first + timedelta(days=7)
    months = {"month": 1, "quarter": 3, "year": 12}[period]
    m = first.month - 1 + months
    return date(first.year + m // 12, m % 12 + 1, 1)


def period_containing(period: str, zone: ZoneInfo, instant: datetime) -> tuple[datetime, datetime]:
    """[start, end) in UTC of the calendar period that contains `instant`."""
    local = instant.astimezone(zone).date()
    first = _first_day(period, local)
    return _local_midnight(first, zone), _local_midnight(_next_first_day(period, first), zone)


def next_period(period: str, zone: ZoneInfo, start: datetime) -> tuple[datetime, datetime]:
    """The period right after the one starting at `start`."""
    _, end = period_containing(period, zone, start)
    return period_containing(period, zone, end)


def label(period: str, zone: ZoneInfo, start: datetime) -> str:
    """2026-01-05, 2026-W02, 2026-01, 2026-Q1, 2026."""
    d = start.astimezone(zone).date()
    if period == "day":
        return d.isoformat()
    if period == "week":
        year, week, _ = d.isocalendar()
        return f"{year}-W{week:02d}"
    if period == "month":
        return f"{d.year}-{d.month:02d}"
    if period == "quarter":
        return f"{d.year}-Q{(d.month - 1) // 3 + 1}"
    return str(d.year)
