"""The q compiler: what each supported form becomes, that request text only ever reaches SQL
as a parameter, and what is refused (its meaning over real rows is checked against a
reference in test_analytics_properties.py)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from session_audit.analytics.fields import BASE, CUBE, USER
from session_audit.analytics.q import (
    SPAN_LIMIT,
    ContentSearch,
    Match,
    compile_q,
    parse_q,
    pinned_by,
    sources_for,
    span_bound,
)
from session_audit.core.errors import InvalidArgument

UTCZ = ZoneInfo("Etc/UTC")


def sql(q: str, source: str = BASE) -> tuple[str, list[Any]]:
    parsed = parse_q(q, UTCZ)
    return compile_q(parsed, source).render()


def test_values_are_parameters_never_sql() -> None:
    text, args = sql('connection:"pg\'; DROP TABLE sessions; --"')
    assert "DROP" not in text and args == ["pg'; DROP TABLE sessions; --"]
    assert text == "s.connection = $1::text"


def test_wildcards_become_escaped_like_patterns() -> None:
    assert sql("connection:pg*")[1] == ["pg%"]
    assert sql("connection:pg?prod")[1] == ["pg_prod"]
    # % and _ are literal; an escaped * is literal too.
    assert sql("connection:100%_x*")[1] == ["100\\%\\_x%"]
    assert sql("connection:a\\*b*")[1] == ["a*b%"]
    text, _ = sql("connection:pg*")
    assert "LIKE $1::text ESCAPE '\\'" in text
    # A quoted phrase is exact, stars and all.
    assert sql('connection:"pg*"') == ("s.connection = $1::text", ["pg*"])


def test_user_and_enums_ignore_case() -> None:
    assert sql("user:Ana@X.Example")[1] == ["ana@x.example"]
    assert sql("user:ANA*", USER) == (
        "r.user_key LIKE $1::text ESCAPE '\\'",
        ["ana%"],
    )
    assert sql("verb:EXEC", CUBE) == ("r.verb = any($1::text[])", [["exec"]])
    assert sql("review_status:app*")[1] == [["APPROVED"]]
    assert sql("status:*")[0] == "s.status <> ''"


def test_comparisons_with_null_are_false_only_under_not() -> None:
    """Outside NOT a comparison stays bare (NULL and false select the same rows of a WHERE,
    and an index on the column can serve it); under NOT a NULL must count as false, so that
    `NOT exit_code:0` keeps the sessions without an exit code."""
    assert sql("user_id:sub-7 AND exit_code:0")[0] == (
        "((s.user_id = $1::text) AND (s.exit_code = $2::float8))"
    )
    assert sql("NOT exit_code:0")[0] == "NOT (coalesce(s.exit_code = $1::float8, false))"
    assert sql("protocol:ssh OR NOT (exit_code:0 AND end:*)")[0] == (
        "((s.connection_subtype = $1::text) OR (NOT (((coalesce(s.exit_code = $2::float8, false))"
        " AND (coalesce(s.end_date IS NOT NULL, false))))))"
    )


@pytest.mark.parametrize(
    ("q", "pinned"),
    [
        ("user_id:sub-1", True),
        ("user_id:sub-1 AND protocol:ssh", True),
        ("user_id:(sub-1 OR sub-2)", True),
        ("id:00000000-0000-0000-0000-000000000001 OR correlation_id:c", True),
        ("(user_id:a OR user_id:b) AND NOT exit_code:0", True),
        ("user_id:sub-1*", False),
        ("user_id:*", False),
        ("user_id:sub-1 OR protocol:ssh", False),
        ("NOT user_id:sub-1", False),
        ("protocol:ssh", False),
    ],
)
def test_which_queries_pin_a_key(q: str, pinned: bool) -> None:
    """A pinned query matches only sessions with one of a few values of an indexed key, so
    store.count may read them through that key's index (store.PINNED)."""
    keys = frozenset({"id", "user_id", "correlation_id"})
    assert pinned_by(parse_q(q, UTCZ), keys) is pinned


def test_boolean_structure_and_field_groups() -> None:
    text, args = sql("protocol:ssh AND NOT (user:root OR connection:(a OR b))")
    assert text.count(" AND ") == 1 and text.count(" OR ") == 2 and "NOT (" in text
    assert args == ["ssh", "root", "a", "b"]


def test_ranges_on_times_and_numbers() -> None:
    text, args = sql("start:[2026-03-01 TO 2026-04-01} AND duration:>=60 AND exit_code:<2")
    start, end = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)
    assert args == [start, end, timedelta(seconds=60), 2.0]
    assert "s.start_date >= $1::timestamptz AND s.start_date < $2::timestamptz" in text
    assert "(s.end_date - s.start_date) >= $3::interval" in text
    assert "s.exit_code < $4::float8" in text
    berlin = parse_q("start:[2026-03-01 TO *]", ZoneInfo("Europe/Berlin"))
    assert berlin is not None
    assert compile_q(berlin, BASE).render()[1] == [datetime(2026, 2, 28, 23, tzinfo=UTC)]
    assert sql("end:[* TO *]")[0] == "s.end_date IS NOT NULL"


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize(
    "t", [0.0, 0.1, 1e-7, -0.1, 59.9999995, 3600.0, 3600.0000005, 86400.1, 2.0**40 + 0.3, 1e12]
)
def test_a_duration_bound_is_the_first_microsecond_the_float_comparison_takes(
    t: float, strict: bool
) -> None:
    """`duration >= t` on the base table is `end - start >= span_bound(t)` microseconds: the
    same sessions as comparing their seconds as a float8 (what the rollup's buckets and the
    plain-Python reference do). Reference here: decimal division (correctly rounded to a
    double by another path), scanning the microseconds around t * 10^6. Near 2^40 s a double
    is 244 µs wide, so the answer is not simply ceil(t * 10^6)."""

    def holds(d: int) -> bool:
        x = float(Decimal(d) / Decimal(10**6))
        return x > t if strict else x >= t

    c = math.ceil(Fraction(t) * 10**6)
    first = next(d for d in range(c - 5000, c + 5000) if holds(d))
    assert not holds(c - 5000)
    assert span_bound(t, strict=strict) == first
    if t == 2.0**40 + 0.3:
        assert abs(first - c) > 100


def test_a_duration_bound_past_any_span_matches_all_or_nothing() -> None:
    assert span_bound(1e15, strict=False) == SPAN_LIMIT + 1
    assert span_bound(-1e15, strict=True) == -SPAN_LIMIT - 1
    # PostgreSQL's timestamptz runs from 4714 BC to 294276 AD: under 298,991 years of 366 days.
    assert SPAN_LIMIT > 298_991 * 366 * 86_400 * 10**6


def test_sources_that_can_answer() -> None:
    def srcs(q: str) -> set[str]:
        return sources_for(parse_q(q, UTCZ))

    assert srcs("protocol:ssh AND verb:exec") == {BASE, CUBE}
    assert srcs("user:ana*") == {BASE, USER}
    assert srcs("user:ana AND protocol:ssh") == {BASE}
    assert srcs("duration:>5") == {BASE}
    assert sources_for(None) == {BASE, CUBE, USER}


@pytest.mark.parametrize(
    ("q", "message"),
    [
        ("protocol:", "not a valid search"),
        ("a:b OR", "not a valid search"),
        ("protocol:(ssh user:x)", "write AND or OR"),
        ("protocol:ssh && verb:exec", "write AND or OR"),
        ("-protocol:ssh", "+ and -"),
        ('"ssh x"~2', "proximity"),
        ("verb:(exec OR drop)", "'verb:drop'"),
        ("id:not-a-uuid", "'id:not-a-uuid': expected a session UUID"),
        ("id:1234*", "session ids cannot take wildcards"),
        ("exit_code:1*", "wildcards do not apply"),
        ("duration:[a TO 5]", "expected a number"),
        ("duration:[1 TO 1e400]", "expected a finite number"),
        ("exit_code:-1", 'a negative number goes in quotes: exit_code:"-1"'),
        ("duration:[-5 TO 5]", "range bounds must be plain values (a negative number goes in"),
        ("protocol:(connection:x)", "a field inside another field's group"),
        ("connection:" + "x" * 300, "values are at most 256 characters"),
    ],
)
def test_refused_with_the_term_named(q: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_q(q, UTCZ)
    assert err.value.message.startswith("q: ") and message in err.value.message


def test_a_quoted_negative_number_is_a_number() -> None:
    """What the refusal of `exit_code:-1` (Lucene's NOT) tells the caller to write instead."""
    eq = parse_q('exit_code:"-1"', UTCZ)
    assert eq is not None and isinstance(eq.root, Match)
    assert (eq.root.op, eq.root.value) == ("eq", -1.0)
    rng = parse_q('duration:["-5" TO 5]', UTCZ)
    assert rng is not None and isinstance(rng.root, Match)
    assert rng.root.bounds == (-5.0, 5.0, True, True)


@pytest.mark.parametrize("q", ["content:x", "screen.content:*", "script:DROP*", "event_stream:x"])
def test_content_fields_are_not_supported(q: str) -> None:
    with pytest.raises(ContentSearch, match=r"^NotSupportedContentOption: q: "):
        parse_q(q, UTCZ)


def test_empty_q_is_no_filter() -> None:
    assert parse_q("   ", UTCZ) is None
    assert compile_q(None, BASE).render() == ("TRUE", [])
