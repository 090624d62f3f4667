"""The report filter and order language of the Reports API (seed 002), compiled to SQL.

    query_filter := term ("," term)*              terms are AND-ed
    term         := ["!"] attribute ["." operator "(" [value ("," value)*] ")"]
    query_order  := ["!"] attribute ("," ["!"] attribute)*    "!" = descending

A bare attribute (`retention_locked`) means `attribute.eq(true)` and is allowed for boolean
attributes only. Values are URL-encoded (`%3A` → `:`, `%2C` → `,`, `%28`/`%29` → parentheses);
`+` is a literal plus (so offsets like `+02:00` need no escaping). The grammar is parsed with
lark; attributes come from the published whitelist `ATTRIBUTES` and map to SQL expressions
written here, never to request text. Every value becomes a `$n` parameter.

Semantics (docs/reports.md): a comparison with a missing value (SQL NULL, or an empty
text) is false, so `x.ne(v)` never matches sessions without x; `!term` is the exact complement
of `term`. Text comparisons (lt…ge, order) use code-point order (COLLATE "C"). `user_id`
ordering comparisons need digit strings and compare them as exact integers (no 2^53 limit).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast
from urllib.parse import quote, unquote

from lark import (
    Lark,
    Token,
    Transformer,
    Tree,
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
)
from lark.exceptions import UnexpectedToken, VisitError

from session_audit.core import validation as v
from session_audit.core.errors import InvalidArgument
from session_audit.core.schema import REVIEW_STATUSES
from session_audit.core.sql import Sql, Where, q

MAX_FILTER = 4096
MAX_ORDER = 512
MAX_TERMS = 64
MAX_VALUES = 1000
MAX_VALUE = 1024
MAX_ORDER_KEYS = 8

OPERATORS = ("eq", "ne", "lt", "le", "gt", "ge", "in", "iin", "match", "imatch", "isnull")
_ORDERING = frozenset({"lt", "le", "gt", "ge"})
_SQL_CMP = {"eq": "=", "ne": "<>", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}

# Operators per attribute kind.
_KIND_OPS: dict[str, frozenset[str]] = {
    "string": frozenset(OPERATORS),
    "id": frozenset(OPERATORS),
    "uuid": frozenset({"eq", "ne", "lt", "le", "gt", "ge", "in", "iin", "isnull"}),
    "datetime": frozenset({"eq", "ne", "lt", "le", "gt", "ge", "in", "isnull"}),
    "integer": frozenset({"eq", "ne", "lt", "le", "gt", "ge", "in", "isnull"}),
    "boolean": frozenset({"eq", "ne", "isnull"}),
    "enum": frozenset({"eq", "ne", "in", "iin", "isnull"}),
}
_SQL_TYPES = {
    "string": "text",
    "id": "text",
    "uuid": "uuid",
    "datetime": "timestamptz",
    "integer": "bigint",
    "boolean": "boolean",
    "enum": "text",
}


@dataclass(frozen=True)
class Attribute:
    name: str
    kind: str
    sql: str
    description: str
    # Text columns stored NOT NULL DEFAULT '': the empty text counts as missing.
    empty_is_null: bool = False
    nullable: bool = False
    values: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()

    @property
    def operators(self) -> tuple[str, ...]:
        return tuple(op for op in OPERATORS if op in _KIND_OPS[self.kind])


# The published whitelist (GET /api/v2/report/criteria/attributes). Expressions over sessions
# aliased `s`; they are code, never request text.
ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("id", "uuid", "s.id", "Session id (UUID, any case)."),
    Attribute("user_id", "id", "s.user_id", "The user's subject id. `user` in criteria. "
              "lt/le/gt/ge compare digit strings as exact integers.", empty_is_null=True,
              aliases=("user",)),
    Attribute("user_email", "string", "s.user_email", "The user's e-mail.", empty_is_null=True,
              aliases=("email",)),
    Attribute("user_name", "string", "s.user_name", "The user's display name.",
              empty_is_null=True),
    Attribute("connection", "string", "s.connection", "Connection name (the server).",
              empty_is_null=True, aliases=("server",)),
    Attribute("connection_type", "string", "s.connection_type",
              "Connection type: database, application, custom…", empty_is_null=True,
              aliases=("type",)),
    Attribute("protocol", "string", "s.connection_subtype",
              "Protocol of the connection (postgres, ssh, rdp…). `subprotocol` is a synonym: "
              "this service records one protocol level.", empty_is_null=True,
              aliases=("subprotocol",)),
    Attribute("account", "string", "s.role_name", "Account used on the server (role name).",
              empty_is_null=True, aliases=("role_name",)),
    Attribute("resource_name", "string", "s.resource_name", "Resource name.", nullable=True),
    Attribute("verb", "enum", "s.verb", "connect or exec.", nullable=True,
              values=("connect", "exec")),
    Attribute("session_status", "enum", "s.status", "Session lifecycle: open, ready, done.",
              values=("open", "ready", "done")),
    Attribute("status", "enum", "s.review_status",
              "Approval (review) status of the session; missing when it needed no review.",
              nullable=True, values=REVIEW_STATUSES, aliases=("review_status",)),
    Attribute("created_at", "datetime", "s.start_date", "When the session started.",
              aliases=("start_date",)),
    Attribute("finished_at", "datetime", "s.end_date", "When it ended; missing while open.",
              nullable=True, aliases=("end_date",)),
    Attribute("retention_locked", "boolean", "s.retention_locked",
              "Labelled retention_locked=true by the gateway."),
    Attribute("exit_code", "integer", "s.exit_code", "Exit code, when finished.",
              nullable=True),
    Attribute("event_size", "integer", "s.event_size", "Bytes of recorded events."),
    Attribute("correlation_id", "string", "s.correlation_id", "External workflow id.",
              nullable=True),
    Attribute("jira_issue_key", "string", "s.jira_issue_key", "Jira issue key (lower case).",
              nullable=True),
)  # fmt: skip
BY_NAME: dict[str, Attribute] = {}
for _a in ATTRIBUTES:
    for _n in (_a.name, *_a.aliases):
        BY_NAME[_n] = _a


@dataclass(frozen=True)
class Term:
    attribute: Attribute
    op: str
    values: tuple[Any, ...]
    negated: bool = False
    # 1-based term number and character position in the filter text (0 for criteria).
    number: int = 0
    position: int = 0
    text: str = ""


@dataclass(frozen=True)
class OrderKey:
    attribute: Attribute
    descending: bool


GRAMMAR = r"""
    filter: [term ("," term)*]
    term: NEG? ATTR call?
    call: "." OP "(" [value ("," value)*] ")"
    value: VALUE
    NEG: "!"
    ATTR: /[A-Za-z_][A-Za-z0-9_]*/
    OP: /[A-Za-z_][A-Za-z0-9_]*/
    VALUE: /[^,()]+/
    %ignore /[ \t]+/
"""
_PARSER = Lark(GRAMMAR, start="filter", parser="lalr", lexer="contextual",
               propagate_positions=True)  # fmt: skip

ORDER_GRAMMAR = r"""
    order: [key ("," key)*]
    key: NEG? ATTR
    NEG: "!"
    ATTR: /[A-Za-z_][A-Za-z0-9_]*/
    %ignore /[ \t]+/
"""
_ORDER_PARSER = Lark(ORDER_GRAMMAR, start="order", parser="lalr", propagate_positions=True)


def _term_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of the top-level comma-separated terms, for error messages."""
    spans, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "(":
            depth += 1
        elif c == ")":
            depth = max(0, depth - 1)
        elif c == "," and depth == 0:
            spans.append((start, i))
            start = i + 1
    spans.append((start, len(text)))
    return spans


def _where(param: str, text: str, offset: int) -> str:
    """'term 2 'x.eq(1' at position 7' for an error at 0-based `offset`."""
    for number, (start, end) in enumerate(_term_spans(text), 1):
        if start <= offset <= end:
            term = v.truncate(text[start:end].strip(), 60)
            return f"{param}: term {number} {term!r} at position {offset + 1}"
    return f"{param}: at position {offset + 1}"


def _syntax_error(param: str, text: str, exc: UnexpectedInput) -> InvalidArgument:
    if isinstance(exc, UnexpectedEOF) or (
        isinstance(exc, UnexpectedToken) and exc.token.type == "$END"
    ):
        offset = len(text)
        opened = text.count("(") - text.count(")")
        what = "unbalanced parentheses: expected ')'" if opened > 0 else "unexpected end"
        return InvalidArgument(f"{_where(param, text, max(0, offset - 1))}: {what}")
    pos = getattr(exc, "pos_in_stream", None)
    offset = pos if isinstance(pos, int) else 0
    if isinstance(exc, UnexpectedCharacters):
        char = text[offset : offset + 1]
        if char == ")":
            what = "unbalanced parentheses: unexpected ')'"
        elif char == "(":
            what = "unexpected '('; values with parentheses must be URL-encoded (%28, %29)"
        else:
            what = f"unexpected character {char!r}"
        return InvalidArgument(f"{_where(param, text, offset)}: {what}")
    if isinstance(exc, UnexpectedToken):
        tok = exc.token
        offset = tok.start_pos if isinstance(tok.start_pos, int) else offset
        expected = sorted(exc.expected)
        hint = ""
        if tok == "(":
            hint = (
                "; terms are attribute.operator(value), and values holding parentheses or "
                "commas must be URL-encoded (%28, %29, %2C)"
            )
        elif ")" in str(tok) or tok == ")":
            hint = "; unbalanced parentheses"
        return InvalidArgument(
            f"{_where(param, text, offset)}: unexpected {str(tok)!r} "
            f"(expected {', '.join(_pretty(e) for e in expected)}){hint}"
        )
    return InvalidArgument(f"{param}: malformed: {exc}")


def _pretty(terminal: str) -> str:
    return {
        "COMMA": "','",
        "LPAR": "'('",
        "RPAR": "')'",
        "DOT": "'.'",
        "NEG": "'!'",
        "ATTR": "an attribute",
        "OP": "an operator",
        "VALUE": "a value",
        "$END": "end of text",
    }.get(terminal, terminal)


def _check_text(param: str, text: str, limit: int) -> None:
    if len(text) > limit:
        raise InvalidArgument(f"{param}: expected at most {limit} characters, got {len(text)}")
    if any(ord(c) < 32 and c not in " \t" for c in text):
        raise InvalidArgument(f"{param}: must not contain control characters")


def resolve(param: str, name: str) -> Attribute:
    attr = BY_NAME.get(name)
    if attr is None:
        raise InvalidArgument(
            f"{param}: unknown attribute {v.truncate(name, 40)!r}; expected one of "
            f"{', '.join(a.name for a in ATTRIBUTES)}"
        )
    return attr


_INT = re.compile(r"^[+-]?[0-9]{1,19}$")
_DIGITS = re.compile(r"^[0-9]{1,40}$")
_INT64 = (-(2**63), 2**63 - 1)


def parse_value(where: str, attr: Attribute, op: str, raw: str) -> Any:
    """One decoded value, typed for its attribute; errors name `where`."""
    if raw == "":
        raise InvalidArgument(f"{where}: expected a value")
    if len(raw) > MAX_VALUE:
        raise InvalidArgument(f"{where}: value longer than {MAX_VALUE} characters")
    if "\x00" in raw:
        raise InvalidArgument(f"{where}: value must not contain NUL characters")
    kind = attr.kind
    shown = v.truncate(raw, 40)
    if kind in ("string", "id"):
        if kind == "id" and op in _ORDERING and not _DIGITS.match(raw):
            raise InvalidArgument(
                f"{where}: {op} on {attr.name} compares ids as integers; expected digits, "
                f"got {shown!r}"
            )
        return raw
    if kind == "uuid":
        try:
            return uuid.UUID(raw)
        except ValueError:
            raise InvalidArgument(f"{where}: expected a UUID, got {shown!r}") from None
    if kind == "datetime":
        # Same syntax and time domain as every other time parameter.
        return v.rfc3339(where, raw)
    if kind == "integer":
        if not _INT.match(raw) or not _INT64[0] <= int(raw) <= _INT64[1]:
            raise InvalidArgument(f"{where}: expected a 64-bit integer, got {shown!r}")
        return int(raw)
    if kind == "boolean":
        if raw.lower() not in ("true", "false"):
            raise InvalidArgument(f"{where}: expected true or false, got {shown!r}")
        return raw.lower() == "true"
    # enum: exact values; iin compares case-insensitively.
    allowed = attr.values
    if op == "iin":
        if raw.lower() not in {a.lower() for a in allowed}:
            raise InvalidArgument(f"{where}: expected one of {', '.join(allowed)}, got {shown!r}")
        return next(a for a in allowed if a.lower() == raw.lower())
    if raw not in allowed:
        hint = (
            "; use iin for a case-insensitive match"
            if raw.lower() in {a.lower() for a in allowed}
            else ""
        )
        raise InvalidArgument(f"{where}: expected one of {', '.join(allowed)}, got {shown!r}{hint}")
    return raw


def make_term(
    where: str,
    attr: Attribute,
    op: str | None,
    raw_values: list[str],
    *,
    negated: bool = False,
    number: int = 0,
    position: int = 0,
    text: str = "",
) -> Term:
    """Check the operator and values of one term; `where` prefixes every error message."""
    if op is None:
        if attr.kind != "boolean":
            raise InvalidArgument(
                f"{where}: a bare attribute is only allowed for boolean attributes; "
                f"write {attr.name}.operator(value)"
            )
        return Term(attr, "eq", (True,), negated, number, position, text)
    if op not in OPERATORS:
        raise InvalidArgument(
            f"{where}: unknown operator {v.truncate(op, 20)!r}; expected one of "
            f"{', '.join(OPERATORS)}"
        )
    if op not in _KIND_OPS[attr.kind]:
        raise InvalidArgument(
            f"{where}: operator {op} does not apply to {attr.name} ({attr.kind}); expected one "
            f"of {', '.join(attr.operators)}"
        )
    if op == "isnull":
        if raw_values:
            raise InvalidArgument(f"{where}: isnull takes no value")
        return Term(attr, op, (), negated, number, position, text)
    if not raw_values:
        raise InvalidArgument(f"{where}: expected a value")
    if op not in ("in", "iin") and len(raw_values) != 1:
        raise InvalidArgument(
            f"{where}: {op} takes one value, got {len(raw_values)}; use in(…) for a list"
        )
    if len(raw_values) > MAX_VALUES:
        raise InvalidArgument(f"{where}: expected at most {MAX_VALUES} values")
    values = tuple(parse_value(where, attr, op, raw) for raw in raw_values)
    return Term(attr, op, values, negated, number, position, text)


class _Build(Transformer[Token, list[Term]]):
    def __init__(self, param: str, text: str) -> None:
        super().__init__()
        self.param = param
        self.text = text
        self.count = 0

    def value(self, items: list[Token]) -> Token:
        return items[0]

    def call(self, items: list[Any]) -> tuple[str, list[Token]]:
        op, *values = items
        return str(op), [t for t in values if t is not None]

    def term(self, items: list[Any]) -> Term:
        self.count += 1
        neg = len(items) > 0 and isinstance(items[0], Token) and items[0].type == "NEG"
        rest = items[1:] if neg else items
        name_tok: Token = rest[0]
        call = rest[1] if len(rest) > 1 else None
        start = (items[0] if neg else name_tok).start_pos or 0
        where = _where(self.param, self.text, start)
        attr = resolve(where, str(name_tok))
        op, raw = (None, []) if call is None else call
        try:
            decoded = [unquote(str(t).strip(), errors="strict") for t in raw]
        except UnicodeDecodeError:
            raise InvalidArgument(f"{where}: a value is not valid URL-encoded UTF-8") from None
        spans = _term_spans(self.text)
        text = next((self.text[a:b].strip() for a, b in spans if a <= start <= b), "")
        return make_term(
            where, attr, op, decoded, negated=neg, number=self.count, position=start + 1,
            text=text,
        )  # fmt: skip

    def filter(self, items: list[Term | None]) -> list[Term]:
        return [t for t in items if t is not None]


def parse_filter(text: str, param: str = "query_filter") -> list[Term]:
    """Parse and check a query_filter; an empty text is no filter."""
    _check_text(param, text, MAX_FILTER)
    if not text.strip():
        return []
    try:
        tree = _PARSER.parse(text)
    except UnexpectedInput as exc:
        raise _syntax_error(param, text, exc) from None
    try:
        terms = _Build(param, text).transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, InvalidArgument):
            raise exc.orig_exc from None
        raise
    if len(terms) > MAX_TERMS:
        raise InvalidArgument(f"{param}: expected at most {MAX_TERMS} terms, got {len(terms)}")
    return terms


def parse_order(text: str, param: str = "query_order") -> list[OrderKey]:
    _check_text(param, text, MAX_ORDER)
    if not text.strip():
        return []
    try:
        tree = _ORDER_PARSER.parse(text)
    except UnexpectedInput as exc:
        raise _syntax_error(param, text, exc) from None
    keys: list[OrderKey] = []
    seen: set[str] = set()
    for number, node in enumerate(tree.children, 1):
        if node is None:
            continue
        toks = cast(list[Token], list(cast(Tree[Token], node).children))
        neg = toks[0].type == "NEG"
        name = toks[-1]
        where = f"{param}: key {number} {str(name)!r} at position {(toks[0].start_pos or 0) + 1}"
        attr = resolve(where, str(name))
        if attr.name in seen:
            raise InvalidArgument(f"{where}: {attr.name} appears twice")
        seen.add(attr.name)
        keys.append(OrderKey(attr, neg))
    if len(keys) > MAX_ORDER_KEYS:
        raise InvalidArgument(f"{param}: expected at most {MAX_ORDER_KEYS} keys, got {len(keys)}")
    return keys


# -- SQL --------------------------------------------------------------------------------------


# Digit strings (user ids) compare as exact integers; a constant so no brace needs escaping.
_DIGITS_SQL = "'^[0-9]{1,40}$'"


def _condition(t: Term) -> Sql:
    a, op = t.attribute, t.op
    col = a.sql
    typ = _SQL_TYPES[a.kind]
    if op == "isnull":
        return Sql(f"({col} IS NULL OR {col} = '')" if a.empty_is_null else f"{col} IS NULL")
    present = f"{col} <> '' AND " if a.empty_is_null else ""
    if op in ("eq", "ne"):
        return q(f"{present}{col} {_SQL_CMP[op]} $v::{typ}", v=t.values[0])
    if op in _ORDERING:
        if a.kind == "id":
            # Digit strings compare as exact integers (numeric has no 2^53 limit).
            return q(
                f"{col} ~ {_DIGITS_SQL} AND {col}::numeric {_SQL_CMP[op]} $v::numeric",
                v=str(t.values[0]),
            )
        collate = ' COLLATE "C"' if typ == "text" else ""
        return q(f"{present}{col}{collate} {_SQL_CMP[op]} $v::{typ}", v=t.values[0])
    if op == "in":
        return q(f"{present}{col} = any($v::{typ}[])", v=list(t.values))
    if op == "iin":
        if a.kind == "uuid":
            return q(f"{col} = any($v::uuid[])", v=list(t.values))
        return q(
            f"{present}lower({col}) IN (SELECT lower(x) FROM unnest($v::text[]) x)",  # noqa: S608
            v=list(t.values),
        )
    if op == "match":
        return q(f"{present}strpos({col}, $v::text) > 0", v=t.values[0])
    if op == "imatch":
        return q(f"{present}strpos(lower({col}), lower($v::text)) > 0", v=t.values[0])
    raise AssertionError(op)


def apply_filter(where: Where, terms: list[Term]) -> Where:
    """AND every term into `where`. A term is true or false, never NULL, so `!` complements."""
    for t in terms:
        cond = "coalesce((" + _condition(t) + "), false)"
        where.add("NOT " + cond if t.negated else cond)
    return where


def order_sql(keys: list[OrderKey]) -> Sql:
    """ORDER BY list: the keys (NULLs last in both directions), then newest first by id."""
    parts = []
    for k in keys:
        collate = ' COLLATE "C"' if _SQL_TYPES[k.attribute.kind] == "text" else ""
        direction = "DESC" if k.descending else "ASC"
        parts.append(f"{k.attribute.sql}{collate} {direction} NULLS LAST")
    parts += ["s.start_date DESC", "s.id DESC"]
    return Sql(", ".join(parts))


# -- rendering --------------------------------------------------------------------------------

_SAFE = "-._~:@+"


def render_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return quote(value.isoformat().replace("+00:00", "Z"), safe=_SAFE)
    return quote(str(value), safe=_SAFE)


def render_term(t: Term) -> str:
    head = ("!" if t.negated else "") + t.attribute.name
    if t.attribute.kind == "boolean" and t.op == "eq" and t.values == (True,):
        return head
    return f"{head}.{t.op}({','.join(render_value(x) for x in t.values)})"


def render_filter(terms: list[Term]) -> str:
    """Canonical text of terms (round-trips through parse_filter)."""
    return ",".join(render_term(t) for t in terms)


def join_filters(*texts: str) -> str:
    return ",".join(t.strip() for t in texts if t.strip())
