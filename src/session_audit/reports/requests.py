"""Reports API requests → validated values. Every failure is an InvalidArgument naming the
parameter and what was expected."""

from __future__ import annotations

import re
from dataclasses import dataclass

from session_audit.core import validation as v
from session_audit.core.errors import InvalidArgument
from session_audit.reports import filters as rf
from session_audit.reports.periods import PERIODS
from session_audit.reports.types import BY_KEY, TYPES
from session_audit.v1 import reports_pb2 as pb

MAX_TITLE = 200
MAX_CRITERIA = 64
STATUSES = ("pending", "ready", "failed")
FORMATS = ("csv", "pdf", "html")
_DIGITS = re.compile(r"^[0-9]{1,19}$")
_MAX_ID = 2**63 - 1


def object_id(name: str, raw: str) -> int:
    """Ids are strings of digits (64-bit)."""
    if not _DIGITS.match(raw) or int(raw) > _MAX_ID or int(raw) == 0:
        raise InvalidArgument(
            f"{name}: expected an id, a string of 1-19 digits, got {v.truncate(raw, 40)!r}"
        )
    return int(raw)


def optional_id(name: str, raw: str) -> int | None:
    return None if raw == "" else object_id(name, raw)


def choice(name: str, raw: str, allowed: tuple[str, ...]) -> str:
    """Exact (lower-case) values only: 'CSV' is refused, not guessed."""
    if raw not in allowed:
        raise InvalidArgument(
            f"{name}: expected one of {', '.join(allowed)}, got {v.truncate(raw, 40)!r}"
        )
    return raw


def report_type(raw: str) -> str:
    return choice("type", raw, tuple(t.key for t in TYPES))


def title(raw: str) -> str:
    text = raw.strip()
    if not 1 <= len(text) <= MAX_TITLE:
        raise InvalidArgument(f"title: expected 1..{MAX_TITLE} characters, got {len(text)}")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise InvalidArgument("title: must not contain control characters (newlines, tabs…)")
    return text


def time_zone(raw: str) -> str:
    return v.parse_zone(raw)[0]


@dataclass(frozen=True)
class Definition:
    title: str
    type: str
    query_filter: str
    query_order: str


def check_filter_and_order(type_: str, query_filter: str, query_order: str) -> None:
    """Both must compile, and apply to the type."""
    terms = rf.parse_filter(query_filter)
    keys = rf.parse_order(query_order)
    kind = BY_KEY[type_]
    if terms and not kind.uses_filter:
        raise InvalidArgument(
            f"query_filter: the {type_} report is not computed from sessions; leave it empty"
        )
    if keys and not kind.uses_filter:
        raise InvalidArgument(
            f"query_order: the {type_} report is not computed from sessions; leave it empty"
        )


def create_definition(req: pb.CreateDefinedReportRequest) -> Definition:
    if req.title.strip() == "":
        raise InvalidArgument("title: required")
    if req.type == "":
        raise InvalidArgument(f"type: required, one of {', '.join(t.key for t in TYPES)}")
    d = Definition(title(req.title), report_type(req.type), req.query_filter, req.query_order)
    check_filter_and_order(d.type, d.query_filter, d.query_order)
    return d


@dataclass(frozen=True)
class DefinitionChanges:
    id: int
    changes: dict[str, str]
    type: str | None
    user_id: str | None


def update_definition(req: pb.UpdateDefinedReportRequest) -> DefinitionChanges:
    id_ = object_id("id", req.id)
    changes: dict[str, str] = {}
    if req.HasField("title"):
        changes["title"] = title(req.title)
    if req.HasField("query_filter"):
        rf.parse_filter(req.query_filter)
        changes["query_filter"] = req.query_filter
    if req.HasField("query_order"):
        rf.parse_order(req.query_order)
        changes["query_order"] = req.query_order
    type_ = req.type if req.HasField("type") else None
    owner = req.user_id if req.HasField("user_id") else None
    if not changes and type_ is None and owner is None:
        raise InvalidArgument("body: expected at least one of title, query_filter, query_order")
    return DefinitionChanges(id_, changes, type_, owner)


@dataclass(frozen=True)
class OnDemand:
    defined_report_id: int | None
    title: str | None
    # Filter text from the request: criteria rendered, AND-ed with query_filter.
    extra_filter: str
    query_order: str | None


def criteria_terms(criteria: list[pb.Criterion]) -> list[rf.Term]:
    """Same field several times: any of the values (in); different fields: all (AND)."""
    if len(criteria) > MAX_CRITERIA:
        raise InvalidArgument(f"criteria: expected at most {MAX_CRITERIA}, got {len(criteria)}")
    grouped: dict[str, tuple[rf.Attribute, list[str], str]] = {}
    for i, c in enumerate(criteria):
        where = f"criteria[{i}]"
        if c.field == "":
            raise InvalidArgument(f"{where}.field: required")
        attr = rf.resolve(f"{where}.field", c.field)
        if attr.kind == "boolean" and c.value == "":
            raise InvalidArgument(f"{where}.value: expected true or false")
        if attr.name in grouped:
            grouped[attr.name][1].append(c.value)
        else:
            grouped[attr.name] = (attr, [c.value], f"{where}.value")
    terms = []
    for attr, values, where in grouped.values():
        op = "eq" if len(values) == 1 else "in"
        if attr.kind == "boolean" and len(values) > 1:
            raise InvalidArgument(f"{where}: {attr.name} given more than once")
        terms.append(rf.make_term(where, attr, op, values))
    return terms


def create_report(req: pb.CreateReportRequest) -> OnDemand:
    definition = optional_id("defined_report_id", req.defined_report_id)
    extra = rf.render_filter(criteria_terms(list(req.criteria)))
    rf.parse_filter(req.query_filter)
    rf.parse_order(req.query_order)
    return OnDemand(
        defined_report_id=definition,
        title=title(req.title) if req.title.strip() else None,
        extra_filter=rf.join_filters(req.query_filter, extra),
        query_order=req.query_order if req.query_order.strip() else None,
    )


@dataclass(frozen=True)
class NewSubscription:
    defined_report_id: int
    period: str
    time_zone: str


def create_subscription(req: pb.CreateDefinedReportSubscriptionRequest) -> NewSubscription:
    if req.period == "":
        raise InvalidArgument(f"period: required, one of {', '.join(PERIODS)}")
    if req.defined_report_id == "":
        raise InvalidArgument("defined_report_id: required (5-16 or a custom definition's id)")
    return NewSubscription(
        object_id("defined_report_id", req.defined_report_id),
        choice("period", req.period, PERIODS),
        time_zone(req.time_zone),
    )


def download(req: pb.DownloadReportRequest) -> tuple[int, str]:
    return object_id("id", req.id), choice("format", req.format, FORMATS)
