"""The one SQL fragment builder: code text plus bound values, numbered `$n` only when rendered.

    GET = Template('''
    SELECT s.id FROM sessions s WHERE s.id = $id AND $scope
    ''')
    text, args = GET(id=session_id, scope=where.sql()).render()

A `Template` is SQL written in the code with named slots `$name` (a letter after the `$`;
PostgreSQL's own `$1` positional markers are refused, so no position is ever implied by the
order of calls). Filling a slot with a `Sql` fragment inlines that fragment (its values come
along); filling it with anything else binds that value as a parameter. One slot named twice in a
template binds one parameter. `render()` numbers the parameters in the order they appear in the
final text and returns `(sql, args)` for asyncpg.

Identifiers never come from request text: a fragment's text is code (a module constant, or a
name looked up in a whitelist dict); every value from a request goes through a slot or `param`.
Templates are parsed once (module constants, or `q()`'s cache), so building a statement per
request costs a few list concatenations.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

_SLOT = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_POSITIONAL = re.compile(r"\$[0-9]")


class _Bound:
    """One bound value; the same object appearing twice renders as one `$n`."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


_Part = str | _Bound
_new = tuple.__new__


class Sql(tuple[_Part, ...]):
    """An immutable SQL fragment: code text and bound values, in order (a tuple of parts)."""

    __slots__ = ()

    def __new__(cls, text: str = "") -> Sql:
        return _new(cls, (_code(text),))

    def __add__(self, other: Sql | str) -> Sql:  # type: ignore[override]
        if type(other) is Sql:
            return _new(Sql, (*self, *other))
        return _new(Sql, (*self, _code(other)))  # type: ignore[arg-type]

    def __radd__(self, other: str) -> Sql:
        return _new(Sql, (_code(other), *self))

    def __repr__(self) -> str:
        text, args = self.render()
        return f"Sql({text!r}, {args!r})"

    def render(self) -> tuple[str, list[Any]]:
        """The statement text with `$1…$n` and its arguments, in order of appearance."""
        out: list[str] = []
        args: list[Any] = []
        numbers: dict[int, str] = {}
        for part in self:
            if type(part) is str:
                out.append(part)
                continue
            marker = numbers.get(id(part))
            if marker is None:
                args.append(part.value)  # type: ignore[union-attr]
                marker = numbers[id(part)] = f"${len(args)}"
            out.append(marker)
        return "".join(out), args


def _code(text: str) -> str:
    if "$" in text and (_POSITIONAL.search(text) or _SLOT.search(text)):
        raise ValueError(f"parameter marker in plain SQL text (use Template): {text!r}")
    return text


def param(value: Any) -> Sql:
    """A fragment that is one bound value (reuse the fragment to reuse the parameter)."""
    return _new(Sql, (_Bound(value),))


def join(separator: str, parts: Iterable[Sql]) -> Sql:
    """`parts` with `separator` (code) between them."""
    out: list[_Part] = []
    for i, part in enumerate(parts):
        if i:
            out.append(separator)
        out.extend(part)
    return _new(Sql, out)


class Template:
    """SQL text with named `$slot`s, parsed once."""

    __slots__ = ("_first", "_one", "_rest", "_slots")

    def __init__(self, text: str) -> None:
        if _POSITIONAL.search(text):
            raise ValueError(f"positional parameter in SQL template: {text!r}")
        pieces = _SLOT.split(text)
        self._first = pieces[0]
        # (slot name, the text after it)
        self._rest = tuple(zip(pieces[1::2], pieces[2::2], strict=True))
        self._slots = frozenset(pieces[1::2])
        self._one = len(self._rest) == 1

    @property
    def slots(self) -> frozenset[str]:
        return self._slots

    def __call__(self, **fill: Any) -> Sql:
        return self.fill(fill)

    def fill(self, fill: dict[str, Any]) -> Sql:
        """The fragment with `fill[name]` in each slot (`fill` is consumed)."""
        if fill.keys() != self._slots:
            missing = sorted(self._slots - fill.keys())
            extra = sorted(fill.keys() - self._slots)
            raise TypeError(f"SQL template slots: missing {missing}, extra {extra}")
        if self._one:  # the common `column = $value`
            name, text = self._rest[0]
            v = fill[name]
            if type(v) is Sql:
                return _new(Sql, (self._first, *v, text))
            return _new(Sql, (self._first, _Bound(v), text))
        out: list[_Part] = [self._first]
        for name, text in self._rest:
            v = fill[name]
            if type(v) is Sql:
                out.extend(v)
            elif type(v) is _Bound:
                out.append(v)
            else:
                v = fill[name] = _Bound(v)  # bound once, however often the slot appears
                out.append(v)
            out.append(text)
        return _new(Sql, out)


_TEMPLATES: dict[str, Template] = {}


def template(text: str) -> Template:
    """The parsed template of `text`, cached (call sites pass code, a bounded set of texts)."""
    found = _TEMPLATES.get(text)
    if found is None:
        if len(_TEMPLATES) >= 4096:
            _TEMPLATES.clear()
        found = _TEMPLATES[text] = Template(text)
    return found


def q(text: str, **fill: Any) -> Sql:
    """`Template(text)(**fill)` with the parse cached: `q("s.connection = $v", v=name)`."""
    return template(text).fill(fill)


TRUE = Sql("TRUE")


class Where:
    """AND-ed conditions: `w.add("s.connection = $name", name=value)`; `w.sql()` is the
    fragment (TRUE when empty)."""

    __slots__ = ("conditions",)

    def __init__(self) -> None:
        self.conditions: list[Sql] = []

    def add(self, condition: str | Sql, **fill: Any) -> Where:
        if type(condition) is Sql:
            self.conditions.append(condition)
        else:
            self.conditions.append(template(condition).fill(fill))  # type: ignore[arg-type]
        return self

    def sql(self) -> Sql:
        if not self.conditions:
            return TRUE
        out: list[_Part] = []
        for i, c in enumerate(self.conditions):
            out.append(") AND (" if i else "(")
            out.extend(c)
        out.append(")")
        return _new(Sql, out)
