"""timebins: ISO 8601 input, calendar bins in a zone (DST days of 23/25 hours), and the split
of ranges into rollup pieces."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from session_audit.analytics import timebins as tb
from session_audit.core.errors import InvalidArgument
from session_audit.core.validation import parse_zone

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
KOLKATA = ZoneInfo("Asia/Kolkata")
UTCZ = ZoneInfo("Etc/UTC")


def utc(year: int, month: int, day: int, *hms: int) -> datetime:
    h, m, sec, us = (*hms, 0, 0, 0, 0)[:4]
    return datetime(year, month, day, h, m, sec, us, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "zone", "expected"),
    [
        ("2026-03-01", UTCZ, utc(2026, 3, 1)),
        ("2026-03-01", BERLIN, utc(2026, 2, 28, 23)),
        ("2026-07-01T10:00", BERLIN, utc(2026, 7, 1, 8)),
        ("2026-07-01T10:00:30.250", UTCZ, utc(2026, 7, 1, 10, 0, 30, 250000)),
        ("2026-07-01T10:00:00Z", BERLIN, utc(2026, 7, 1, 10)),
        ("2026-07-01T10:00:00+05:30", UTCZ, utc(2026, 7, 1, 4, 30)),
        ("2026-07-01T10:00:00-0700", UTCZ, utc(2026, 7, 1, 17)),
        ("2026-07-01T10:00+02", UTCZ, utc(2026, 7, 1, 8)),
        # Fall back in Berlin: 02:30 happens twice; the first (summer time) is taken.
        ("2026-10-25T02:30", BERLIN, utc(2026, 10, 25, 0, 30)),
    ],
)
def test_parse_instant(text: str, zone: ZoneInfo, expected: datetime) -> None:
    assert tb.parse_instant("start", text, zone) == expected


@pytest.mark.parametrize(
    "text",
    ["2026-13-01", "2026-02-30", "yesterday", "2026-03-01 10:00", "2026-03-01T25:00",
     "2026-03-01T10:00+24:00", "20260301", "2026-03-01Z", "' OR 1=1 --", "2026-03-01T10"],
)  # fmt: skip
def test_parse_instant_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^start: "):
        tb.parse_instant("start", text, UTCZ)


def test_local_time_in_a_dst_gap_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="does not exist"):
        tb.parse_instant("end", "2026-03-29T02:30", BERLIN)
    # With an explicit offset it is just an instant.
    assert tb.parse_instant("end", "2026-03-29T02:30+01:00", BERLIN) == utc(2026, 3, 29, 1, 30)


def test_zone_names_are_exact_iana_names() -> None:
    assert parse_zone("Europe/Berlin")[0] == "Europe/Berlin"
    assert parse_zone("")[0] == "Etc/UTC"
    for bad in ("europe/berlin", "Mars/Base", "../../etc/passwd", "UTC+1", "x" * 100, "Europe/"):
        with pytest.raises(InvalidArgument, match=r"^time_zone: expected an IANA"):
            parse_zone(bad)


def test_berlin_day_bins_follow_dst() -> None:
    # 00:00Z on the 27th is 01:00 in Berlin: the first bin starts before the range.
    bins = tb.bin_starts(utc(2026, 3, 27), utc(2026, 3, 30, 22), "day", BERLIN, 100)
    local = [tb.format_instant(b, BERLIN) for b in bins]
    assert local == [
        "2026-03-27T00:00:00.000+01:00",
        "2026-03-28T00:00:00.000+01:00",
        "2026-03-29T00:00:00.000+01:00",
        "2026-03-30T00:00:00.000+02:00",
    ]
    lengths = [(b - a) / timedelta(hours=1) for a, b in itertools.pairwise(bins)]
    assert lengths == [24, 24, 23]  # 29 March 2026 has 23 hours in Berlin
    autumn = tb.bin_starts(utc(2026, 10, 24, 22), utc(2026, 10, 26, 23), "day", BERLIN, 100)
    assert (autumn[1] - autumn[0]) == timedelta(hours=25)


def test_new_york_day_and_hour_bins_on_dst_days() -> None:
    # 8 March 2026: clocks jump 02:00 → 03:00 in New York.
    days = tb.bin_starts(utc(2026, 3, 8, 5), utc(2026, 3, 9, 4), "day", NEW_YORK, 10)
    assert [tb.format_instant(d, NEW_YORK) for d in days] == ["2026-03-08T00:00:00.000-05:00"]
    hours = tb.bin_starts(utc(2026, 3, 8, 5), utc(2026, 3, 9, 4), "hour", NEW_YORK, 100)
    assert len(hours) == 23
    assert tb.format_instant(hours[2], NEW_YORK) == "2026-03-08T03:00:00.000-04:00"
    # 1 November 2026: 01:00-02:00 happens twice; hour bins keep both.
    hours = tb.bin_starts(utc(2026, 11, 1, 4), utc(2026, 11, 2, 5), "hour", NEW_YORK, 100)
    assert len(hours) == 25
    assert [tb.format_instant(h, NEW_YORK) for h in hours[1:3]] == [
        "2026-11-01T01:00:00.000-04:00",
        "2026-11-01T01:00:00.000-05:00",
    ]


def test_weeks_start_monday_months_on_the_first_years_on_january_first() -> None:
    weeks = tb.bin_starts(utc(2026, 3, 4), utc(2026, 3, 20), "week", UTCZ, 10)
    assert [w.date() for w in weeks] == [date(2026, 3, 2), date(2026, 3, 9), date(2026, 3, 16)]
    assert all(w.weekday() == 0 for w in weeks)
    # April begins at 22:00Z on 31 March in Berlin: an end there excludes April.
    months = tb.bin_starts(utc(2026, 1, 31), utc(2026, 3, 31, 22), "month", BERLIN, 10)
    assert [tb.format_instant(m, BERLIN) for m in months] == [
        "2026-01-01T00:00:00.000+01:00",
        "2026-02-01T00:00:00.000+01:00",
        "2026-03-01T00:00:00.000+01:00",
    ]
    years = tb.bin_starts(utc(2025, 6, 1), utc(2027, 1, 1), "year", UTCZ, 10)
    assert [y.year for y in years] == [2025, 2026]


def test_sub_hour_offsets_align_hour_bins_to_local_hours() -> None:
    hours = tb.bin_starts(utc(2026, 3, 1, 0, 10), utc(2026, 3, 1, 2), "hour", KOLKATA, 10)
    assert [tb.format_instant(h, KOLKATA) for h in hours] == [
        "2026-03-01T05:00:00.000+05:30",
        "2026-03-01T06:00:00.000+05:30",
        "2026-03-01T07:00:00.000+05:30",
    ]


def test_bucket_limit_counts_exactly() -> None:
    start = utc(2026, 1, 1)
    assert len(tb.bin_starts(start, start + timedelta(hours=1000), "hour", UTCZ, 1000)) == 1000
    with pytest.raises(tb.TooManyBins):
        tb.bin_starts(start, start + timedelta(hours=1000, seconds=1), "hour", UTCZ, 1000)
    assert len(tb.bin_starts(start, utc(2028, 9, 27), "day", UTCZ, 1000)) == 1000
    with pytest.raises(tb.TooManyBins):
        tb.bin_starts(start, utc(2028, 9, 27, 0, 0, 1), "day", UTCZ, 1000)
    assert tb.bin_starts(start, start, "day", UTCZ, 1000) == []


def test_format_instant() -> None:
    assert tb.format_instant(utc(2026, 3, 28, 23), BERLIN) == "2026-03-29T00:00:00.000+01:00"
    assert tb.format_instant(utc(2026, 3, 1, 12, 0, 0, 123456), UTCZ) == "2026-03-01T12:00:00.123Z"
    assert tb.format_instant(utc(2026, 3, 1), NEW_YORK) == "2026-02-28T19:00:00.000-05:00"


# -- pieces ------------------------------------------------------------------------------------

instants = st.datetimes(
    min_value=datetime(2024, 1, 1), max_value=datetime(2027, 12, 31), timezones=st.just(UTC)
)


@settings(max_examples=300, deadline=None)
@given(instants, instants, st.sampled_from([tb.HOUR, tb.DAY]))
def test_pieces_tile_the_interval_with_aligned_rollup_grains(
    a: datetime, b: datetime, finest: int
) -> None:
    lo, hi = min(a, b), max(a, b)
    pieces = tb.decompose(lo, hi, 7, finest)
    covered = sorted(pieces, key=lambda p: p.lo)
    cursor = lo
    for p in covered:
        assert p.lo == cursor and p.lo < p.hi and p.bin == 7
        cursor = p.hi
        if p.grain == tb.HOUR:
            assert p.lo.minute == p.lo.second == p.lo.microsecond == 0 == p.hi.minute
        if p.grain == tb.DAY:
            assert p.lo.time() == p.hi.time() == datetime.min.time()
        if p.grain == tb.MONTH:
            assert p.lo.day == p.hi.day == 1 and p.lo.time() == datetime.min.time()
        if p.grain == tb.RAW:
            assert p.hi - p.lo < (timedelta(hours=1) if finest == tb.HOUR else timedelta(days=1))
        assert p.grain == tb.RAW or p.grain >= finest
    assert cursor == hi or (lo == hi and not pieces)
    assert sum(1 for p in pieces if p.grain == tb.RAW) <= 2


def test_pieces_from_the_beginning_of_time() -> None:
    pieces = tb.decompose(tb.EPOCH, utc(2026, 3, 17, 5, 30), -1)
    assert [(p.grain, p.lo, p.hi) for p in pieces] == [
        (tb.MONTH, tb.EPOCH, utc(2026, 3, 1)),
        (tb.DAY, utc(2026, 3, 1), utc(2026, 3, 17)),
        (tb.HOUR, utc(2026, 3, 17), utc(2026, 3, 17, 5)),
        (tb.RAW, utc(2026, 3, 17, 5), utc(2026, 3, 17, 5, 30)),
    ]
    assert tb.decompose(utc(2026, 1, 1), utc(2026, 2, 1), 0, None) == [
        tb.Piece(tb.RAW, utc(2026, 1, 1), utc(2026, 2, 1), 0)
    ]
    # Without hours, what is left of a day at each end is raw.
    assert [(p.grain, p.lo, p.hi) for p in tb.decompose(
        utc(2026, 1, 30, 5), utc(2026, 3, 2, 7), 0, tb.DAY)] == [
        (tb.RAW, utc(2026, 1, 30, 5), utc(2026, 1, 31)),
        (tb.DAY, utc(2026, 1, 31), utc(2026, 2, 1)),
        (tb.MONTH, utc(2026, 2, 1), utc(2026, 3, 1)),
        (tb.DAY, utc(2026, 3, 1), utc(2026, 3, 2)),
        (tb.RAW, utc(2026, 3, 2), utc(2026, 3, 2, 7)),
    ]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(instants, instants, st.sampled_from([tb.HOUR, tb.DAY]))
def test_shortened_pieces_add_up_to_the_interval(a: datetime, b: datetime, finest: int) -> None:
    """Signed pieces (a month minus the days it lacks…) still count every instant of the
    interval exactly once and nothing outside it, each piece aligned to its grain."""
    lo, hi = min(a, b), max(a, b)
    pieces = tb.decompose(lo, hi, 7, finest)
    short = tb.shorten(pieces)
    edges = sorted({lo, hi, *(p.lo for p in short), *(p.hi for p in short)})
    for x, y in itertools.pairwise(edges):
        signed = sum(p.sign for p in short if p.lo <= x and y <= p.hi)
        assert signed == (1 if lo <= x and y <= hi else 0), (x, y, short)
    for p in short:
        assert p.bin == 7 and p.lo < p.hi and p.sign in (1, -1)
        assert p.sign == 1 or p.grain in (tb.HOUR, tb.DAY)
        if p.grain == tb.MONTH and p.lo != tb.EPOCH:
            assert p.lo.day == p.hi.day == 1 and p.lo.time() == datetime.min.time()
        if p.grain == tb.DAY:
            assert p.lo.time() == p.hi.time() == datetime.min.time()
    # Never more rollup rows to read: count the finest units each piece spans.
    unit = timedelta(hours=1) if finest == tb.HOUR else timedelta(days=1)

    def rows(ps: list[tb.Piece], grain: int) -> int:
        return sum(-(-(p.hi - p.lo) // unit) for p in ps if p.grain == grain)

    assert rows(short, finest) <= rows(pieces, finest)


def test_a_month_minus_its_missing_days() -> None:
    pieces = tb.shorten(tb.decompose(utc(2026, 10, 29), utc(2026, 11, 28), 0, tb.DAY))
    assert [(p.grain, p.lo, p.hi, p.sign) for p in pieces] == [
        (tb.DAY, utc(2026, 10, 29), utc(2026, 11, 1), 1),
        (tb.MONTH, utc(2026, 11, 1), utc(2026, 12, 1), 1),
        (tb.DAY, utc(2026, 11, 28), utc(2026, 12, 1), -1),
    ]


# -- weeks (the per-user rollup keeps UTC ISO weeks) -------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    instants,
    st.one_of(
        st.timedeltas(timedelta(0), timedelta(days=3)),
        st.timedeltas(timedelta(0), timedelta(days=40)),
        st.timedeltas(timedelta(0), timedelta(days=800)),
    ),
    st.booleans(),
)
def test_pieces_with_weeks_tile_the_interval(lo: datetime, length: timedelta, short: bool) -> None:
    hi = lo + length
    pieces = tb.decompose(lo, hi, 7, tb.DAY, weeks=True)
    if short:
        pieces = tb.cheapest(lo, hi, 7, tb.DAY, weeks=True)
    edges = sorted({lo, hi, *(p.lo for p in pieces), *(p.hi for p in pieces)})
    for x, y in itertools.pairwise(edges):
        signed = sum(p.sign for p in pieces if p.lo <= x and y <= p.hi)
        assert signed == (1 if lo <= x and y <= hi else 0), (x, y, pieces)
    for p in pieces:
        if p.grain == tb.WEEK:
            # Monday 00:00 UTC to Monday 00:00 UTC, whole weeks, inside the interval.
            assert p.lo.weekday() == p.hi.weekday() == 0 and p.sign == 1
            assert p.lo.time() == p.hi.time() == datetime.min.time()
            assert lo <= p.lo and p.hi <= hi
        if p.grain == tb.RAW:
            assert p.hi - p.lo < timedelta(days=1)
    # Never more rows than without weeks.
    plain = tb.cheapest(lo, hi, 7, tb.DAY, weeks=False)
    assert tb.rows_per_value(tb.cheapest(lo, hi, 7, tb.DAY, weeks=True)) <= tb.rows_per_value(plain)


def test_weeks_where_they_save_rows() -> None:
    # A UTC calendar week (Monday 2026-11-16): one week row instead of seven days.
    assert tb.cheapest(utc(2026, 11, 16), utc(2026, 11, 23), 3, tb.DAY, weeks=True) == [
        tb.Piece(tb.WEEK, utc(2026, 11, 16), utc(2026, 11, 23), 3)
    ]
    # One day edge inside and no whole day: two raw remainders, each under a day.
    assert [(p.grain, p.lo, p.hi) for p in tb.cheapest(
        utc(2026, 1, 31, 5), utc(2026, 2, 1, 7), 0, tb.DAY, weeks=True)] == [
        (tb.RAW, utc(2026, 1, 31, 5), utc(2026, 2, 1)),
        (tb.RAW, utc(2026, 2, 1), utc(2026, 2, 1, 7)),
    ]  # fmt: skip
    # A week across a month's end is still one week row (the month edge does not cut it).
    assert tb.cheapest(utc(2026, 9, 28), utc(2026, 10, 5), 3, tb.DAY, weeks=True) == [
        tb.Piece(tb.WEEK, utc(2026, 9, 28), utc(2026, 10, 5), 3)
    ]
    # The same week without weeks in the rollup: seven days.
    assert tb.cheapest(utc(2026, 11, 16), utc(2026, 11, 23), 3, tb.DAY, weeks=False) == [
        tb.Piece(tb.DAY, utc(2026, 11, 16), utc(2026, 11, 23), 3)
    ]
    # Three weeks and the days around them, from a Thursday to a Saturday.
    assert [(p.grain, p.lo, p.hi) for p in tb.decompose(
        utc(2026, 10, 1, 6), utc(2026, 10, 31), 0, tb.DAY, weeks=True)] == [
        (tb.RAW, utc(2026, 10, 1, 6), utc(2026, 10, 2)),
        (tb.DAY, utc(2026, 10, 2), utc(2026, 10, 5)),
        (tb.WEEK, utc(2026, 10, 5), utc(2026, 10, 26)),
        (tb.DAY, utc(2026, 10, 26), utc(2026, 10, 31)),
    ]  # fmt: skip
    # ... but 30 days are cheaper as a month minus a few days (7 rows) than as weeks and days
    # (12): cheapest keeps the month.
    assert tb.cheapest(utc(2026, 10, 29), utc(2026, 11, 28), 0, tb.DAY, weeks=True) == (
        tb.shorten(tb.decompose(utc(2026, 10, 29), utc(2026, 11, 28), 0, tb.DAY))
    )
    # History before a Wednesday: months, the week days of the month before it, and days.
    assert [(p.grain, p.lo, p.hi) for p in tb.cheapest(
        tb.EPOCH, utc(2026, 3, 18), -1, tb.DAY, weeks=True)] == [
        (tb.MONTH, tb.EPOCH, utc(2026, 3, 1)),
        (tb.DAY, utc(2026, 3, 1), utc(2026, 3, 2)),
        (tb.WEEK, utc(2026, 3, 2), utc(2026, 3, 16)),
        (tb.DAY, utc(2026, 3, 16), utc(2026, 3, 18)),
    ]  # fmt: skip


def test_a_berlin_week_reads_no_utc_week() -> None:
    """Weekly bins in Europe/Berlin start at Monday 00:00 local = Sunday 23:00 (22:00 in
    summer) UTC: no whole UTC week lies inside, so the bin is read from UTC days and raw
    hours, exactly."""
    starts = tb.bin_starts(utc(2026, 3, 1), utc(2026, 4, 20), "week", BERLIN, 100)
    for lo, hi in itertools.pairwise(starts):
        pieces = tb.cheapest(lo, hi, 0, tb.DAY, weeks=True)
        assert all(p.grain != tb.WEEK for p in pieces)
        assert pieces == tb.cheapest(lo, hi, 0, tb.DAY, weeks=False)
    assert starts[0] == utc(2026, 2, 22, 23) and starts[5] == utc(2026, 3, 29, 22)  # DST 03-29
