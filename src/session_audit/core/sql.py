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
from functools import lru_cache
from typing import Any

_SLOT = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_POSITIONAL = re.compile(r"\$[0-9]")


class _Bound:
    """One bound value; the same object appearing twice renders as one `$n`."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class Sql:
    """An immutable SQL fragment: `texts` interleaved with bound values
    (texts[0] v[0] texts[1] v[1] … texts[-1])."""

    __slots__ = ("_texts", "_values")

    def __init__(self, text: str = "") -> None:
        if "$" in text and (_POSITIONAL.search(text) or _SLOT.search(text)):
            raise ValueError(f"parameter marker in plain SQL text (use Template): {text!r}")
        self._texts: tuple[str, ...] = (text,)
        self._values: tuple[_Bound, ...] = ()

    @classmethod
    def _of(cls, texts: tuple[str, ...], values: tuple[_Bound, ...]) -> Sql:
        out = cls.__new__(cls)
        out._texts = texts
        out._values = values
        return out

    def __add__(self, other: Sql | str) -> Sql:
        o = other if isinstance(other, Sql) else Sql(other)
        texts = (*self._texts[:-1], self._texts[-1] + o._texts[0], *o._texts[1:])
        return Sql._of(texts, self._values + o._values)

    def __radd__(self, other: str) -> Sql:
        return Sql(other) + self

    def __bool__(self) -> bool:
        return bool(self._values) or self._texts != ("",)

    def __repr__(self) -> str:
        text, args = self.render()
        return f"Sql({text!r}, {args!r})"

    def render(self) -> tuple[str, list[Any]]:
        """The statement text with `$1…$n` and its arguments, in order of appearance."""
        if not self._values:
            return self._texts[0], []
        out = [self._texts[0]]
        args: list[Any] = []
        numbers: dict[int, int] = {}
        for bound, text in zip(self._values, self._texts[1:], strict=True):
            n = numbers.get(id(bound))
            if n is None:
                args.append(bound.value)
                n = numbers[id(bound)] = len(args)
            out.append(f"${n}")
            out.append(text)
        return "".join(out), args


def param(value: Any) -> Sql:
    """A fragment that is one bound value (reuse the fragment to reuse the parameter)."""
    return Sql._of(("", ""), (_Bound(value),))


def join(separator: str, parts: Iterable[Sql]) -> Sql:
    """`parts` with `separator` (code) between them."""
    texts: list[str] = [""]
    values: list[_Bound] = []
    for i, part in enumerate(parts):
        if i:
            texts[-1] += separator
        texts[-1] += part._texts[0]
        texts.extend(part._texts[1:])
        values.extend(part._values)
    return Sql._of(tuple(texts), tuple(values))


class Template:
    """SQL text with named `$slot`s, parsed once."""

    __slots__ = ("_slots", "_texts")

    def __init__(self, text: str) -> None:
        if _POSITIONAL.search(text):
            raise ValueError(f"positional parameter in SQL template: {text!r}")
        pieces = _SLOT.split(text)
        self._texts: tuple[str, ...] = tuple(pieces[0::2])
        self._slots: tuple[str, ...] = tuple(pieces[1::2])

    @property
    def slots(self) -> frozenset[str]:
        return frozenset(self._slots)

    def __call__(self, **fill: Any) -> Sql:
        if fill.keys() != set(self._slots):
            missing = set(self._slots) - fill.keys()
            extra = fill.keys() - set(self._slots)
            raise TypeError(f"SQL template slots: missing {sorted(missing)}, extra {sorted(extra)}")
        bound = {k: v if isinstance(v, Sql) else param(v) for k, v in fill.items()}
        texts: list[str] = [self._texts[0]]
        values: list[_Bound] = []
        for name, text in zip(self._slots, self._texts[1:], strict=True):
            frag = bound[name]
            texts[-1] += frag._texts[0]
            texts.extend(frag._texts[1:])
            values.extend(frag._values)
            texts[-1] += text
        return Sql._of(tuple(texts), tuple(values))


@lru_cache(maxsize=1024)
def template(text: str) -> Template:
    """The parsed template of `text` (cached: call sites pass code constants)."""
    return Template(text)


def q(text: str, **fill: Any) -> Sql:
    """`Template(text)(**fill)` with the parse cached: `q("s.connection = $v", v=name)`."""
    return template(text)(**fill)


TRUE = Sql("TRUE")


class Where:
    """AND-ed conditions: `w.add("s.connection = $name", name=value)`; `w.sql()` is the
    fragment (TRUE when empty)."""

    __slots__ = ("conditions",)

    def __init__(self) -> None:
        self.conditions: list[Sql] = []

    def add(self, condition: str | Sql, **fill: Any) -> Where:
        self.conditions.append(condition if isinstance(condition, Sql) else q(condition, **fill))
        return self

    def sql(self) -> Sql:
        if not self.conditions:
            return TRUE
        return join(" AND ", ("(" + c + ")" for c in self.conditions))
