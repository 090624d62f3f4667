"""The session fields the histogram, statistics and `q` know: public name → SQL, per source.

A source is where an aggregation reads from: the base table (`s`, sessions) or a rollup (`r`).
A field a source does not carry cannot be answered there (the planner falls back to the base
table). Request text never becomes SQL: it is only ever a key into these dicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from session_audit.core.schema import REVIEW_STATUSES

Kind = Literal["text", "ci_text", "enum", "time", "number", "uuid"]

BASE, CUBE, USER = "base", "cube", "user"
# rollup_values: one field at a time (its name in `r.field`), no `q`; see store.plan.
VALUES = "values"
# rollup_names: role and resource, one field at a time (its name in `r.field`), migration 0055.
NAMES = "names"
# rollup_outcomes: how sessions ended: duration bucket and exit code (migration 0052).
OUTCOMES = "outcomes"
# Duration buckets of rollup_outcomes, in seconds: bucket i (1-based, width_bucket's numbering)
# holds durations in [EDGES[i-1], EDGES[i]); 0 holds negative ones, -1 open sessions. A
# duration comparison on these edges (`>=`/`<` an edge) is answered by the rollup alone; any
# other threshold leaves a bucket or two partial, whose sessions store.count reads from the
# sessions table (q.partial_buckets, index sessions_org_duration).
DURATION_EDGES: tuple[float, ...] = (
    0, 1, 5, 10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 28800, 43200, 86400,
    172800, 604800,
)  # fmt: skip


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind
    # SQL per source; absent when the source cannot answer this field.
    sql: dict[str, str]
    # Enum fields: the allowed values (as stored).
    values: tuple[str, ...] = ()
    # Usable as `field` / `sub_fields` of the histogram and statistics.
    groupable: bool = False
    # What the field is, for error messages and docs/analytics.md.
    doc: str = ""
    # Sources whose SQL for this field is a bucket number over these edges (not the value).
    edges: tuple[float, ...] = ()
    # The value as an interval on the base table, if it is one: a comparison of the field is
    # then made on it, in whole microseconds (q.span_bound), instead of on `sql[BASE]`.
    span: str = ""


def _f(
    name: str, kind: Kind, base: str, rollup: dict[str, str] | None = None, **kw: object
) -> Field:
    return Field(name, kind, {BASE: base, **(rollup or {})}, **kw)  # type: ignore[arg-type]


def _cube(column: str) -> dict[str, str]:
    """A dimension of rollup_sessions, also one of rollup_values' fields."""
    return {CUBE: column, VALUES: "r.value"}


FIELDS: dict[str, Field] = {
    f.name: f
    for f in (
        _f("protocol", "text", "s.connection_subtype", _cube("r.connection_subtype"),
           groupable=True, doc="connection subtype: postgres, ssh, rdp…"),
        _f("connection", "text", "s.connection", _cube("r.connection"),
           groupable=True, doc="connection name"),
        _f("connection_type", "text", "s.connection_type", _cube("r.connection_type"),
           groupable=True, doc="database, application, custom…"),
        _f("user", "ci_text", "lower(s.user_email)", {USER: "r.user_key"},
           groupable=True, doc="user e-mail, case-insensitive (values are lower case)"),
        _f("verb", "enum", "coalesce(s.verb, '')", _cube("r.verb"),
           values=("connect", "exec"), groupable=True, doc="connect or exec"),
        _f("status", "enum", "s.status", _cube("r.status"),
           values=("open", "ready", "done"), groupable=True, doc="open, ready or done"),
        _f("review_status", "enum", "coalesce(s.review_status, '')", _cube("r.review_status"),
           values=REVIEW_STATUSES, groupable=True, doc="the review's status, e.g. APPROVED"),
        _f("id", "uuid", "s.id", doc="session id"),
        _f("user_id", "text", "s.user_id", doc="the user's subject id"),
        _f("role", "text", "s.role_name", {NAMES: "r.value"}, doc="role name"),
        _f("resource", "text", "coalesce(s.resource_name, '')", {NAMES: "r.value"},
           doc="resource name"),
        _f("correlation_id", "text", "coalesce(s.correlation_id, '')", doc="correlation id"),
        _f("start", "time", "s.start_date", doc="start time"),
        _f("end", "time", "s.end_date", doc="end time (open sessions have none)"),
        _f("duration", "number", "extract(epoch FROM s.end_date - s.start_date)",
           {OUTCOMES: "r.duration_bucket"}, edges=DURATION_EDGES,
           span="(s.end_date - s.start_date)",
           doc="seconds from start to end (open sessions have none)"),
        _f("exit_code", "number", "s.exit_code", {OUTCOMES: "nullif(r.exit_code, '')::integer"},
           doc="exit code"),
        _f("event_size", "number", "s.event_size", doc="bytes of recorded events"),
    )
}  # fmt: skip

GROUPABLE = tuple(name for name, f in FIELDS.items() if f.groupable)
# Searching what happened inside sessions (screen content, commands) is not offered.
CONTENT_FIELDS = frozenset(
    {"content", "screen.content", "screen_content", "script", "event_stream"}
)
