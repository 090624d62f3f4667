"""A small builder for dynamic WHERE clauses that numbers `$n` parameters as it goes.

Column and table names never come from request text: callers pass SQL fragments written in
the code (or looked up in a whitelist dict), and every value goes through `param`.
"""

from __future__ import annotations

from typing import Any


class Params:
    """Collects positional parameters for asyncpg."""

    def __init__(self, start: list[Any] | None = None) -> None:
        self.args: list[Any] = list(start or [])

    def __call__(self, value: Any) -> str:
        self.args.append(value)
        return f"${len(self.args)}"


class Where:
    """AND-ed conditions with their parameters: `w.add("connection = {}", name)`."""

    def __init__(self, params: Params | None = None) -> None:
        self.params = params or Params()
        self.conditions: list[str] = []

    def add(self, template: str, *values: Any) -> Where:
        self.conditions.append(template.format(*(self.params(v) for v in values)))
        return self

    def sql(self) -> str:
        return " AND ".join(f"({c})" for c in self.conditions) if self.conditions else "TRUE"

    @property
    def args(self) -> list[Any]:
        return self.params.args
