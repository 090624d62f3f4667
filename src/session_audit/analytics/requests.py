"""Report, histogram and statistics requests → validated queries (no SQL, no I/O).

Every failure is an InvalidArgument naming the parameter; the histogram's bucket limit and
content search answer with the document's codes (`TooMuchBucketsInResult`,
`NotSupportedContentOption`) at the start of the message.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo

from session_audit.analytics import timebins as tb
from session_audit.analytics.fields import FIELDS, GROUPABLE
from session_audit.analytics.q import Query, content_refused, parse_q
from session_audit.core import validation as v
from session_audit.core.errors import InvalidArgument
from session_audit.v1 import analytics_pb2 as pb

GROUP_BYS = ("connection", "connection_type", "id", "user_email")
VERBS = ("exec", "connect")
# The longest report window, in days (a whole leap year fits).
MAX_REPORT_DAYS = 366
# The most buckets a histogram answers with; more is TooMuchBucketsInResult.
MAX_BUCKETS = 1000
MAX_SIZE = 100
DEFAULT_STATS_SIZE = 10
TOO_MANY_BUCKETS = "TooMuchBucketsInResult"


@dataclass(frozen=True)
class ReportQuery:
    group_by: str
    connection: str | None
    user_email: str | None  # lower case
    verb: str | None
    session_id: uuid.UUID | None
    # The window [start, end): sessions that ENDED in it.
    start: datetime
    end: datetime
    zone: str


@dataclass(frozen=True)
class HistogramQuery:
    field: str
    bin_size: str
    start: datetime
    end: datetime
    zone_name: str
    zone: tzinfo
    size: int | None
    q: Query | None
    # Start instants of the bins meeting [start, end); the first may be before `start`.
    bins: tuple[datetime, ...]

    def intervals(self) -> list[tuple[datetime, datetime]]:
        """Each bin clipped to [start, end): what its counts cover."""
        if not self.bins:  # an empty range (start == end) has no bins
            return []
        edges = [*self.bins[1:], self.end]
        return [
            (max(b, self.start), min(e, self.end)) for b, e in zip(self.bins, edges, strict=True)
        ]


@dataclass(frozen=True)
class StatsQuery:
    field: str
    sub_field: str | None
    size: int
    start: datetime
    end: datetime
    zone_name: str
    zone: tzinfo
    q: Query | None


def _choice(name: str, value: str, allowed: tuple[str, ...], default: str | None) -> str | None:
    """Exact, lower-case document values; empty means the default."""
    if value == "":
        return default
    if value not in allowed:
        raise InvalidArgument(
            f"{name}: expected one of {', '.join(allowed)}, got {v.truncate(value)!r}"
        )
    return value


def parse_report(req: pb.SessionReportRequest, now: datetime) -> ReportQuery:
    zone_name, zone = v.parse_zone(req.time_zone)
    group_by = _choice("group_by", req.group_by, GROUP_BYS, "connection")
    verb = _choice("verb", req.verb, VERBS, None)
    session_id = None
    if req.id:
        try:
            session_id = uuid.UUID(req.id.strip())
        except ValueError:
            raise InvalidArgument(
                f"id: expected a session UUID, got {v.truncate(req.id)!r}"
            ) from None
    email = v.text("user_email", req.user_email.strip())
    # Documented defaults: today and today + 1. A lone date keeps the window valid: start
    # defaults to the earlier of today and the day before end_date, end to the later of
    # tomorrow and the day after start_date.
    today = now.astimezone(zone).date()
    one = timedelta(days=1)
    first = tb.parse_day("start_date", req.start_date)
    last = tb.parse_day("end_date", req.end_date)
    # Defaults stay inside the day domain (a window may be empty at its edges).
    if first is None:
        first = today if last is None else max(v.MIN_DAY, min(today, last - one))
    if last is None:
        last = max(today + one, min(first + one, v.MAX_DAY))
    if first > last:
        raise InvalidArgument(
            f"start_date: must not be after end_date ({first.isoformat()} > {last.isoformat()})"
        )
    if (last - first).days > MAX_REPORT_DAYS:
        raise InvalidArgument(
            f"end_date: the window is at most {MAX_REPORT_DAYS} days, got "
            f"{(last - first).days} ({first.isoformat()} to {last.isoformat()})"
        )
    assert group_by is not None
    return ReportQuery(
        group_by=group_by,
        connection=v.text("connection_name", req.connection_name),
        user_email=email.lower() if email else None,
        verb=verb,
        session_id=session_id,
        start=tb.day_start(first, zone),
        end=tb.day_start(last, zone),
        zone=zone_name,
    )


def _field(name: str, value: str, *, required: bool) -> str | None:
    if value == "":
        if required:
            raise InvalidArgument(f"{name}: required; one of {', '.join(GROUPABLE)}")
        return None
    if value not in GROUPABLE:
        raise InvalidArgument(
            f"{name}: expected one of {', '.join(GROUPABLE)}, got {v.truncate(value)!r}"
        )
    return value


def _size(has: bool, value: int, default: int | None) -> int | None:
    if not has:
        return default
    return v.int_range("size", value, 1, MAX_SIZE)


def _range(start_raw: str, end_raw: str, zone: tzinfo, now: datetime) -> tuple[datetime, datetime]:
    end = tb.parse_instant("end", end_raw, zone) or now
    start = tb.parse_instant("start", start_raw, zone)
    if start is None:
        # One month before `end` on the local calendar; at the first month of the calendar,
        # the start of the time domain.
        local = end.astimezone(zone)
        if local.year == 1 and local.month == 1:
            start = v.MIN_INSTANT
        else:
            prev = tb.add_months(local.date(), -1)
            day = min(local.day, _month_length(prev))
            start = v.clamp(
                tb.local_to_instant(
                    local.replace(tzinfo=None, year=prev.year, month=prev.month, day=day), zone
                )
            )
    if start > end:
        raise InvalidArgument(
            f"start: must not be after end ({start.astimezone(UTC).isoformat()} > "
            f"{end.astimezone(UTC).isoformat()})"
        )
    return start, end


def _month_length(first: date) -> int:
    return (tb.add_months(first, 1) - first).days


def parse_histogram(req: pb.HistogramRequest, now: datetime) -> HistogramQuery:
    if req.content:
        raise content_refused("content")
    field = _field("field", req.field, required=True)
    assert field is not None
    bin_size = _choice("bin-size", req.bin_size, tb.BIN_SIZES, "month")
    assert bin_size is not None
    zone_name, zone = v.parse_zone(req.time_zone)
    size = _size(req.HasField("size"), req.size, None)
    q = parse_q(req.q, zone)
    start, end = _range(req.start, req.end, zone, now)
    try:
        bins = tb.bin_starts(start, end, bin_size, zone, MAX_BUCKETS)
    except tb.TooManyBins as exc:
        raise InvalidArgument(
            f"{TOO_MANY_BUCKETS}: bin-size: {bin_size} bins over this range give "
            f"{'more than ' if exc.count > MAX_BUCKETS else ''}{exc.count:,} buckets; at most "
            f"{MAX_BUCKETS} are allowed (use a larger bin-size or a shorter range)"
        ) from None
    return HistogramQuery(field, bin_size, start, end, zone_name, zone, size, q, tuple(bins))


def parse_stats(req: pb.SessionStatsRequest, now: datetime) -> StatsQuery:
    if req.content:
        raise content_refused("content")
    field = _field("field", req.field, required=True)
    assert field is not None
    if "," in req.sub_fields:
        raise InvalidArgument(f"sub_fields: expected one field, got {v.truncate(req.sub_fields)!r}")
    sub = _field("sub_fields", req.sub_fields.strip(), required=False)
    zone_name, zone = v.parse_zone(req.time_zone)
    size = _size(req.HasField("size"), req.size, DEFAULT_STATS_SIZE)
    assert size is not None
    q = parse_q(req.q, zone)
    start, end = _range(req.start, req.end, zone, now)
    return StatsQuery(field, sub, size, start, end, zone_name, zone, q)


assert set(GROUPABLE) <= set(FIELDS)
