"""`q`: the Lucene-style search of the histogram and statistics, parsed with luqum and compiled
to parameterized SQL over the field whitelist (fields.py).

Supported: `field:value`, `field:"quoted phrase"`, `*` and `?` wildcards in values,
`field:*` (has a value), `AND`, `OR`, `NOT`, parentheses, `field:(a OR b)`, ranges
`[a TO b]` / `{a TO b}` / mixed, open ends `*`, and `field:>a` `>=` `<` `<=`, on times and
numbers. Anything else (bare words, fuzzy `~`, proximity, boosts `^`, regular expressions,
`+`/`-`, `&&`/`||`, operators left implicit) is refused with a 400 naming the term.

Matching: text fields exactly and case-sensitively (like the list filters); `user` without
regard to case; enum fields (verb, status, review_status) without regard to case, against
their known values; times as ISO 8601 (a date alone is local midnight in `time_zone`);
numbers as decimals.

Bounds (docs/input-domains.md): at most MAX_Q characters, MAX_DEPTH levels of nesting
(parentheses, groups, NOT), MAX_TERMS terms and MAX_WILDCARDS `*`/`?` per value. Wildcards on
enum fields are matched by a linear-time matcher here, on text fields by SQL LIKE; no regular
expression is ever built from the query text.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import timedelta, tzinfo
from typing import Any

from luqum import tree
from luqum.exceptions import ParseError
from luqum.parser import parser

from session_audit.analytics.fields import BASE, CONTENT_FIELDS, FIELDS, Field
from session_audit.analytics.timebins import parse_instant
from session_audit.core.errors import InvalidArgument
from session_audit.core.sql import TRUE, Sql, join, q
from session_audit.core.validation import truncate

MAX_Q = 2000
MAX_DEPTH = 32
MAX_TERMS = 128
MAX_WILDCARDS = 16
NOT_SUPPORTED_CONTENT = "NotSupportedContentOption"
# Lucene reads a leading "-" as NOT: a negative number is written in quotes.
NEGATIVE_HINT = ' (a negative number goes in quotes: exit_code:"-1", duration:["-5" TO 5])'


class ContentSearch(InvalidArgument):
    """A search in the content of sessions, which this service does not index."""


def content_refused(param: str) -> ContentSearch:
    return ContentSearch(
        f"{NOT_SUPPORTED_CONTENT}: {param}: searching the content of sessions (screen "
        f"content, commands) is not supported; filter on session fields instead"
    )


# -- the parsed form ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """One leaf: `field` compared with `op`."""

    field: Field
    op: str  # eq | like | in | exists | range
    value: Any = None
    # range: (low, high, include_low, include_high); None = open
    bounds: tuple[Any, Any, bool, bool] | None = None


@dataclass(frozen=True)
class BoolOp:
    op: str  # and | or | not
    items: tuple[Node, ...]


Node = Match | BoolOp


@dataclass(frozen=True)
class Query:
    text: str
    root: Node

    @property
    def fields(self) -> frozenset[str]:
        out: set[str] = set()

        def walk(n: Node) -> None:
            if isinstance(n, Match):
                out.add(n.field.name)
            else:
                for item in n.items:
                    walk(item)

        walk(self.root)
        return frozenset(out)


def parse_q(text: str, zone: tzinfo, param: str = "q") -> Query | None:
    """Validate `q` completely (syntax, fields, values); empty means no filter."""
    if text.strip() == "":
        return None
    if len(text) > MAX_Q:
        raise InvalidArgument(f"{param}: expected at most {MAX_Q} characters, got {len(text)}")
    if "\x00" in text:
        raise InvalidArgument(f"{param}: must not contain NUL characters")
    _check_nesting(param, text)
    try:
        parsed = parser.parse(text)
    except (ParseError, ValueError, TypeError) as exc:
        detail = str(exc).replace("Syntax error in input : ", "")
        raise InvalidArgument(f"{param}: not a valid search: {truncate(detail, 200)}") from None
    except RecursionError:
        raise _too_deep(param) from None
    _check_tree(param, parsed)
    return Query(text, _Converter(param, zone).node(parsed, None))


def _too_deep(param: str) -> InvalidArgument:
    return InvalidArgument(
        f"{param}: expected at most {MAX_DEPTH} levels of nesting (parentheses, NOT), got more"
    )


def _check_nesting(param: str, text: str) -> None:
    """Parentheses and brackets outside quotes nest at most MAX_DEPTH deep (before parsing:
    the parser and the tree walks below are recursive)."""
    depth, quoted, escaped = 0, False, False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif ch in "([{":
            depth += 1
            if depth > MAX_DEPTH:
                raise _too_deep(param)
        elif ch in ")]}":
            depth -= 1


def _check_tree(param: str, root: Any) -> None:
    """Depth and number of terms of the parsed tree, walked without recursion."""
    terms = 0
    stack = [(root, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _too_deep(param)
        children = list(getattr(item, "children", ()))
        if not children:
            terms += 1
            if terms > MAX_TERMS:
                raise InvalidArgument(f"{param}: expected at most {MAX_TERMS} terms, got more")
        stack.extend((child, depth + 1) for child in children)


class _Converter:
    def __init__(self, param: str, zone: tzinfo) -> None:
        self.param = param
        self.zone = zone

    def bad(self, item: Any, why: str, field: Field | None = None) -> InvalidArgument:
        term = str(item).strip()
        if field is not None:
            term = f"{field.name}:{term}"
        return InvalidArgument(f"{self.param}: {truncate(term, 60)!r}: {why}")

    def node(self, item: Any, field: Field | None) -> Node:
        if isinstance(item, tree.Group | tree.FieldGroup):
            return self.node(item.expr, field)
        if isinstance(item, tree.AndOperation | tree.OrOperation):
            op = "and" if isinstance(item, tree.AndOperation) else "or"
            return BoolOp(op, tuple(self.node(c, field) for c in item.children))
        if isinstance(item, tree.Not):
            return BoolOp("not", (self.node(item.a, field),))
        if isinstance(item, tree.SearchField):
            if field is not None:
                raise self.bad(item, "a field inside another field's group")
            return self.node(item.expr, self.field(item))
        if isinstance(item, tree.UnknownOperation):
            raise self.bad(item, "write AND or OR between terms (&& and || are not supported)")
        if isinstance(item, tree.Prohibit | tree.Plus):
            raise self.bad(item, f"+ and - are not supported; use AND / NOT{NEGATIVE_HINT}")
        if isinstance(item, tree.Fuzzy | tree.Proximity):
            raise self.bad(item, "fuzzy and proximity search (~) are not supported")
        if isinstance(item, tree.Boost):
            raise self.bad(item, "boosts (^) are not supported")
        if isinstance(item, tree.Regex):
            raise self.bad(item, "regular expressions are not supported; use * and ?")
        if field is None:
            raise self.bad(item, "a term needs a field, e.g. connection:pg-prod")
        if isinstance(item, tree.Range):
            return self.range(item, field, item.low, item.high, item.include_low, item.include_high)
        if isinstance(item, tree.From):
            return self.range(item, field, item.a, None, item.include, False)
        if isinstance(item, tree.To):
            return self.range(item, field, None, item.a, False, item.include)
        if isinstance(item, tree.Phrase):
            return self.value(item, field, _unescape(item.value[1:-1]), literal=True)
        if isinstance(item, tree.Word):
            return self.value(item, field, item.value, literal=False)
        raise self.bad(item, "unsupported syntax")

    def field(self, item: tree.SearchField) -> Field:
        name = item.name
        if name in CONTENT_FIELDS:
            raise content_refused(self.param)
        f = FIELDS.get(name)
        if f is None:
            raise self.bad(item, f"unknown field {truncate(name, 40)!r}; expected one of "
                                 f"{', '.join(FIELDS)}")  # fmt: skip
        return f

    def value(self, item: Any, f: Field, raw: str, *, literal: bool) -> Match:
        if not literal and raw == "*":
            return Match(f, "exists")
        wild = not literal and _has_wildcard(raw)
        if wild and _wildcards(raw) > MAX_WILDCARDS:
            raise self.bad(item, f"at most {MAX_WILDCARDS} wildcards (* and ?) per value", f)
        text = raw if literal else _unescape(raw)
        if f.kind in ("time",):
            example = f"{f.name}:[2026-03-01 TO 2026-04-01}}"
            raise self.bad(item, f"{f.name} takes a range, e.g. {example}", f)
        if f.kind == "number":
            if wild:
                raise self.bad(item, f"{f.name} is a number; wildcards do not apply", f)
            return Match(f, "eq", self.number(item, text, f))
        if f.kind == "uuid":
            if wild:
                raise self.bad(item, "session ids cannot take wildcards", f)
            return Match(f, "eq", self.uuid(item, text, f))
        if f.kind == "enum":
            return self.enum(item, f, raw if wild else text, wild)
        if f.kind == "ci_text":
            pattern = raw.lower() if wild else text.lower()
        else:
            pattern = raw if wild else text
        if len(text) > 256:
            raise self.bad(item, "values are at most 256 characters", f)
        if wild:
            return Match(f, "like", _like_pattern(pattern))
        return Match(f, "eq", pattern)

    def enum(self, item: Any, f: Field, raw: str, wild: bool) -> Match:
        if wild:
            pattern = _glob(raw.lower())
            chosen = [v for v in f.values if wildcard_match(pattern, v.lower())]
        else:
            chosen = [v for v in f.values if v.lower() == raw.lower()]
        if not chosen:
            raise self.bad(item, f"{f.name} is one of {', '.join(f.values)}", f)
        return Match(f, "in", tuple(chosen))

    def range(self, item: Any, f: Field, low: Any, high: Any, inc_lo: bool, inc_hi: bool) -> Match:
        if f.kind not in ("time", "number"):
            raise self.bad(item, f"ranges apply to times and numbers, not to {f.name}", f)

        def bound(b: Any) -> Any:
            if b is None or (isinstance(b, tree.Word) and b.value == "*"):
                return None
            if not isinstance(b, tree.Word | tree.Phrase):
                raise self.bad(item, f"range bounds must be plain values{NEGATIVE_HINT}", f)
            text = b.value[1:-1] if isinstance(b, tree.Phrase) else _unescape(b.value)
            if f.kind == "time":
                return parse_instant(f"{self.param}: {f.name}", text, self.zone)
            return self.number(item, text, f)

        lo, hi = bound(low), bound(high)
        if lo is None and hi is None:
            return Match(f, "exists")
        if lo is not None and hi is not None and lo > hi:
            raise self.bad(item, "the range's low end is above its high end", f)
        return Match(f, "range", bounds=(lo, hi, inc_lo, inc_hi))

    def number(self, item: Any, text: str, f: Field) -> float:
        if _NUMBER.fullmatch(text) is None:
            raise self.bad(item, "expected a number", f)
        value = float(text)
        if value != value or value in (float("inf"), float("-inf")) or abs(value) > 2**53:
            raise self.bad(item, "expected a finite number up to 2^53", f)
        return value

    def uuid(self, item: Any, text: str, f: Field) -> str:
        try:
            return str(uuid.UUID(text))
        except ValueError:
            raise self.bad(item, "expected a session UUID", f) from None


_NUMBER = re.compile(
    r"[+-]?(?:[0-9]{1,20}(?:\.[0-9]{0,20})?|\.[0-9]{1,20})(?:[eE][+-]?[0-9]{1,3})?", re.ASCII
)


def _has_wildcard(raw: str) -> bool:
    escaped = False
    for ch in raw:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in "*?":
            return True
    return False


def _unescape(raw: str) -> str:
    out, escaped = [], False
    for ch in raw:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        else:
            out.append(ch)
    return "".join(out)


def _like_pattern(raw: str) -> str:
    """Lucene wildcards → LIKE (escape character \\): * → %, ? → _, the rest literal."""
    out, escaped = [], False
    for ch in raw:
        if escaped:
            out.append("\\" + ch if ch in "%_\\" else ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in "%_\\":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def _wildcards(raw: str) -> int:
    count, escaped = 0, False
    for ch in raw:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in "*?":
            count += 1
    return count


# A wildcard pattern as a list of items: a literal character, or ANY_ONE (?) / ANY_RUN (*).
ANY_ONE, ANY_RUN = object(), object()


def _glob(raw: str) -> list[object]:
    out: list[object] = []
    escaped = False
    for ch in raw:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "*":
            if not out or out[-1] is not ANY_RUN:  # ** is *
                out.append(ANY_RUN)
        elif ch == "?":
            out.append(ANY_ONE)
        else:
            out.append(ch)
    return out


def wildcard_match(pattern: list[object], text: str) -> bool:
    """Whole-value wildcard match without backtracking blow-up: the greedy two-pointer walk
    that returns to the last `*` only, O(len(pattern) × len(text)) at worst."""
    p = t = 0
    star, mark = -1, 0
    while t < len(text):
        if p < len(pattern) and (pattern[p] is ANY_ONE or pattern[p] == text[t]):
            p += 1
            t += 1
        elif p < len(pattern) and pattern[p] is ANY_RUN:
            star, mark = p, t
            p += 1
        elif star >= 0:
            p = star + 1
            mark += 1
            t = mark
        else:
            return False
    while p < len(pattern) and pattern[p] is ANY_RUN:
        p += 1
    return p == len(pattern)


# -- SQL ---------------------------------------------------------------------------------------


def sources_for(query: Query | None) -> set[str]:
    """Sources that carry every field `query` uses."""
    from session_audit.analytics.fields import CUBE, USER

    out = {BASE, CUBE, USER}
    if query is not None:
        for name in query.fields:
            out &= set(FIELDS[name].sql)
    return out


def buckets_of(edges: tuple[float, ...]) -> dict[int, tuple[float, float]]:
    """Each bucket over `edges` as its interval [low, high) of values, numbered as width_bucket
    does: 0 below the first edge, len(edges) from the last one on (-1, no value, is apart)."""
    bounds = (float("-inf"), *edges, float("inf"))
    return {i: (bounds[i], bounds[i + 1]) for i in range(len(edges) + 1)}


def _meets(m: Match, low: float, high: float) -> bool:
    """Whether some value in [low, high) satisfies the comparison `m` (a range or equality)."""
    if m.op == "exists":
        return True
    if m.op == "eq":
        return bool(low <= m.value < high)
    assert m.bounds is not None
    lo, hi, inc_lo, inc_hi = m.bounds
    # The intersection [low, high) ∩ m is an interval [a, b] whose ends may be open.
    a, a_closed = low, True
    if lo is not None and (lo > a or (lo == a and not inc_lo)):
        a, a_closed = lo, inc_lo
    b, b_closed = high, False
    if hi is not None and hi < b:
        b, b_closed = hi, inc_hi
    return bool(a < b or (a == b and a_closed and b_closed))


def _holds_throughout(m: Match, low: float, high: float) -> bool:
    """Whether every value in [low, high) satisfies `m`."""
    if m.op == "exists":
        return True
    if m.op == "eq":
        return False  # an interval of positive length holds more than one value
    assert m.bounds is not None
    lo, hi, inc_lo, _ = m.bounds
    above = lo is None or low > lo or (low == lo and inc_lo)
    below = hi is None or high <= hi  # [low, high) never reaches high itself
    return above and below


def bucket_split(m: Match) -> tuple[frozenset[int], frozenset[int]]:
    """For a comparison of a bucketed field: the buckets all of whose values match, and the
    *partial* buckets, whose values compare both ways (the threshold falls inside, or on the
    lower edge with `>`, the upper with `<=`...). The other buckets match nowhere; so does -1
    (no value)."""
    whole, partial = set(), set()
    for bucket, (low, high) in buckets_of(m.field.edges).items():
        if _holds_throughout(m, low, high):
            whole.add(bucket)
        elif _meets(m, low, high):
            partial.add(bucket)
    return frozenset(whole), frozenset(partial)


def partial_buckets(query: Query | None) -> tuple[int, ...]:
    """The buckets in which some comparison of a bucketed field of `query` is partial: a rollup
    of buckets cannot say which of their sessions match (store.count reads those sessions from
    the sessions table, the other buckets from the rollup). Empty when every comparison falls
    on bucket edges (`duration:>=E`, `<E`, `[E1 TO E2}`, `*`)."""
    out: set[int] = set()

    def walk(n: Node) -> None:
        if isinstance(n, BoolOp):
            for item in n.items:
                walk(item)
        elif n.field.edges:
            out.update(bucket_split(n)[1])

    if query is not None:
        walk(query.root)
    return tuple(sorted(out))


def exact_on(query: Query | None, source: str) -> bool:
    """Whether `source` answers `query` exactly: it carries every field. (A comparison of a
    bucketed field that does not fall on bucket edges is still exact: store.count takes the
    partial buckets' sessions from the sessions table, `partial_buckets`.)"""
    if query is None:
        return True

    def walk(n: Node) -> bool:
        if isinstance(n, BoolOp):
            return all(walk(i) for i in n.items)
        return source in n.field.sql

    return walk(query.root)


def pinned_by(query: Query | None, names: frozenset[str]) -> bool:
    """Whether every match of `query` has one of a few given values of fields in `names`: an
    equality (or a list of values) on such a field, an AND with such a part, or an OR all of
    whose parts are such (`user_id:(a OR b)`)."""

    def pinned(n: Node) -> bool:
        if isinstance(n, Match):
            return n.op in ("eq", "in") and n.field.name in names
        if n.op == "and":
            return any(pinned(i) for i in n.items)
        return n.op == "or" and all(pinned(i) for i in n.items)

    return query is not None and pinned(query.root)


# More microseconds than any two timestamps are apart (PostgreSQL's timestamptz range spans
# under 300,000 years): a bound beyond it holds for every session or for none.
SPAN_LIMIT = 110_000_000 * 86_400 * 10**6


def span_bound(t: float, *, strict: bool) -> int:
    """The fewest whole microseconds d whose seconds, as a float8, are >= t (> t if `strict`):
    what a comparison of `extract(epoch FROM end - start)` with t decides, since that numeric
    is converted to the nearest double, a non-decreasing function of d (Python's int / int is
    correctly rounded too). SPAN_LIMIT + 1 when no duration qualifies, -SPAN_LIMIT - 1 when
    every one does. So `duration >= t` is exactly `end - start >= d` microseconds: an
    interval comparison (integer arithmetic), not a numeric per session made a float (at 10M
    sessions that conversion was half of a 30-day statistic with a `duration` q)."""

    def holds(d: int) -> bool:
        x = d / 10**6
        return x > t if strict else x >= t

    lo, hi = -SPAN_LIMIT - 1, SPAN_LIMIT + 1
    if holds(lo):
        return lo
    if not holds(hi):
        return hi
    while hi - lo > 1:  # holds(hi) and not holds(lo)
        mid = (lo + hi) // 2
        if holds(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _micros(d: int) -> timedelta:
    return timedelta(microseconds=d)


def _span_condition(n: Match) -> Sql:
    """A comparison of an interval-valued field (`duration`) on its interval, exactly."""
    span = n.field.span
    if n.op == "exists":
        return Sql(f"{span} IS NOT NULL")
    if n.op == "eq":
        lo, hi, inc_lo, inc_hi = float(n.value), float(n.value), True, True
    else:
        assert n.bounds is not None
        lo, hi, inc_lo, inc_hi = n.bounds
    parts = []
    if lo is not None:
        parts.append(q(f"{span} >= $v::interval", v=_micros(span_bound(lo, strict=not inc_lo))))
    if hi is not None:
        parts.append(q(f"{span} < $v::interval", v=_micros(span_bound(hi, strict=inc_hi))))
    return join(" AND ", parts)


def compile_q(query: Query | None, source: str) -> Sql:
    """A SQL condition over `source` (which must carry every field of the query), for a WHERE
    clause (a row matches when it is true; NULL counts as false)."""
    if query is None:
        return TRUE
    return _sql(query.root, source, negated=False)


def _sql(n: Node, source: str, *, negated: bool) -> Sql:
    """`negated`: whether `n` sits under a NOT. Only there must a comparison with NULL (no end,
    no exit code…) be made false: `NOT exit_code:0` matches the sessions without one. Outside
    any NOT, AND/OR of NULL and false select the same rows in a WHERE clause, so the bare
    comparison is kept — which lets the planner use an index on its column
    (`user_id = $1`, not `coalesce(user_id = $1, false)`)."""
    if isinstance(n, BoolOp):
        if n.op == "not":
            return "NOT (" + _sql(n.items[0], source, negated=True) + ")"
        joiner = " AND " if n.op == "and" else " OR "
        each = ("(" + _sql(i, source, negated=negated) + ")" for i in n.items)
        return "(" + join(joiner, each) + ")"
    col = n.field.sql[source]
    kind = n.field.kind
    if n.field.edges and source != BASE:
        # True in the buckets all of whose values match. Partial buckets are left out of the
        # rollup's count by the caller (partial_buckets); -1 (no value) never matches.
        whole, _ = bucket_split(n)
        return q(f"{col} = any($v::int[])", v=sorted(whole))
    if n.field.span and source == BASE and n.op in ("exists", "eq", "range"):
        cond = _span_condition(n)
    elif n.op == "exists":
        cond = Sql(f"{col} IS NOT NULL" if kind in ("time", "number", "uuid") else f"{col} <> ''")
    elif n.op == "eq":
        typ = {"uuid": "uuid", "number": "float8"}.get(kind, "text")
        cond = q(f"{col} = $v::{typ}", v=n.value)
    elif n.op == "in":
        cond = q(f"{col} = any($v::text[])", v=list(n.value))
    elif n.op == "like":
        cond = q(f"{col} LIKE $v::text ESCAPE '\\'", v=n.value)
    else:
        assert n.bounds is not None
        lo, hi, inc_lo, inc_hi = n.bounds
        cast = "timestamptz" if kind == "time" else "float8"
        parts = []
        if lo is not None:
            parts.append(q(f"{col} {'>=' if inc_lo else '>'} $v::{cast}", v=lo))
        if hi is not None:
            parts.append(q(f"{col} {'<=' if inc_hi else '<'} $v::{cast}", v=hi))
        cond = join(" AND ", parts)
    # NULL (no end, no exit code…) is "does not match", so NOT x matches those sessions.
    return "coalesce(" + cond + ", false)" if negated else cond
