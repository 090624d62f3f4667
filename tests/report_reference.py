"""Reports tests: sessions as plain Python, a plain-Python reference of the filter language and
of each report type, written from docs/reports.md's semantics (not from the service's code), and
helpers to drive the Reports API through Envoy."""

from __future__ import annotations

import csv
import io
import re
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from session_audit.v1 import sessions_pb2 as pb
from tests.support import Stack

T0 = datetime(2026, 1, 5, 9, 30, tzinfo=UTC)


@dataclass
class RSpec:
    """A session with every attribute the filter language can see."""

    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    start: datetime = T0
    end: datetime | None = None
    user_id: str = "sub-1"
    email: str = "ana@acme.example"
    name: str = "Ana"
    connection: str = "pg-prod"
    type: str = "database"
    protocol: str = "postgres"
    account: str = "readonly"
    resource: str | None = None
    verb: str | None = "exec"
    review_status: str | None = None
    approvers: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    exit_code: int | None = None
    event_size: int = 100
    correlation_id: str | None = None
    jira: str | None = None

    def to_proto(self) -> pb.Session:
        s = pb.Session(
            id=self.id, user_id=self.user_id, user=self.email, user_name=self.name,
            connection=self.connection, type=self.type, connection_subtype=self.protocol,
            role_name=self.account, event_size=float(self.event_size),
        )  # fmt: skip
        if self.verb is not None:
            s.verb = pb.SessionVerb.Value.Value(self.verb)
        if self.resource is not None:
            s.resource_name = self.resource
        s.start_date.FromDatetime(self.start)
        if self.end is not None:
            s.end_date.FromDatetime(self.end)
        if self.exit_code is not None:
            s.exit_code = self.exit_code
        if self.review_status is not None:
            s.review.status = pb.ReviewStatus.Value.Value(self.review_status)
            for email in self.approvers:
                s.review.review_groups_data.add(group="sre").reviewed_by.email = email
        s.labels.update(self.labels)
        s.connection_tags.update(self.tags)
        if self.correlation_id is not None:
            s.correlation_id = self.correlation_id
        if self.jira is not None:
            s.integrations_metadata.update({"jira_issue_key": self.jira})
        return s

    # The value of each filter attribute, as docs/reports.md defines it: None = SQL NULL.
    def value(self, attr: str) -> Any:
        return {
            "id": uuid.UUID(self.id),
            "user_id": self.user_id,
            "user_email": self.email,
            "user_name": self.name,
            "connection": self.connection,
            "connection_type": self.type,
            "protocol": self.protocol,
            "account": self.account,
            "resource_name": self.resource,
            "verb": self.verb,
            "session_status": "done" if self.end is not None else "open",
            "status": self.review_status,
            "created_at": self.start,
            "finished_at": self.end,
            "retention_locked": self.labels.get("retention_locked", "").lower() == "true",
            "exit_code": self.exit_code,
            "event_size": self.event_size,
            "correlation_id": self.correlation_id,
            "jira_issue_key": self.jira.lower() if self.jira is not None else None,
        }[attr]


# -- the filter language, in Python ----------------------------------------------------------

KINDS = {
    "id": "uuid", "user_id": "id", "user_email": "string", "user_name": "string",
    "connection": "string", "connection_type": "string", "protocol": "string",
    "account": "string", "resource_name": "string", "verb": "enum",
    "session_status": "enum", "status": "enum", "created_at": "datetime",
    "finished_at": "datetime", "retention_locked": "boolean", "exit_code": "integer",
    "event_size": "integer", "correlation_id": "string", "jira_issue_key": "string",
}  # fmt: skip
# Text attributes stored as '' when unknown: '' counts as missing.
EMPTY_IS_NULL = {"user_id", "user_email", "user_name", "connection", "connection_type",
                 "protocol", "account"}  # fmt: skip
ALIASES = {"user": "user_id", "email": "user_email", "server": "connection",
           "type": "connection_type", "subprotocol": "protocol", "role_name": "account",
           "review_status": "status", "start_date": "created_at", "end_date": "finished_at"}  # fmt: skip
ENUMS = {
    "verb": ("connect", "exec"),
    "session_status": ("open", "ready", "done"),
    "status": ("PENDING", "APPROVED", "REJECTED", "REVOKED", "PROCESSING", "EXECUTED", "UNKNOWN"),
}
OPS_BY_KIND = {
    "string": {"eq", "ne", "lt", "le", "gt", "ge", "in", "iin", "match", "imatch", "isnull"},
    "id": {"eq", "ne", "lt", "le", "gt", "ge", "in", "iin", "match", "imatch", "isnull"},
    "uuid": {"eq", "ne", "lt", "le", "gt", "ge", "in", "iin", "isnull"},
    "datetime": {"eq", "ne", "lt", "le", "gt", "ge", "in", "isnull"},
    "integer": {"eq", "ne", "lt", "le", "gt", "ge", "in", "isnull"},
    "boolean": {"eq", "ne", "isnull"},
    "enum": {"eq", "ne", "in", "iin", "isnull"},
}


DIGITS = re.compile(r"[0-9]{1,40}")


@dataclass(frozen=True)
class T:
    """One term as test data: attribute (or alias), operator (None = bare), raw values."""

    attr: str
    op: str | None
    values: tuple[str, ...] = ()
    neg: bool = False

    def text(self) -> str:
        head = ("!" if self.neg else "") + self.attr
        if self.op is None:
            return head
        return f"{head}.{self.op}({','.join(quote(v, safe='') for v in self.values)})"


def filter_text(terms: Iterable[T]) -> str:
    return ",".join(t.text() for t in terms)


def _typed(kind: str, raw: str) -> Any:
    """The raw value typed, or raise ValueError when docs/reports.md says it is invalid."""
    if raw == "":
        raise ValueError("empty")
    if kind in ("string", "id"):
        return raw
    if kind == "uuid":
        return uuid.UUID(raw)
    if kind == "datetime":
        m = re.fullmatch(
            r"([0-9-]{10})[Tt ]([0-9:]{8})(\.[0-9]{1,6})?([Zz]|[+-][0-9]{2}:[0-9]{2})", raw
        )
        if m is None:
            raise ValueError("not an RFC 3339 date-time with offset")
        zone = "+00:00" if m.group(4) in ("Z", "z") else m.group(4)
        return datetime.fromisoformat(f"{m.group(1)}T{m.group(2)}{m.group(3) or ''}{zone}")
    if kind == "integer":
        if not re.fullmatch(r"[+-]?[0-9]{1,19}", raw) or not -(2**63) <= int(raw) < 2**63:
            raise ValueError("not int64")
        return int(raw)
    if kind == "boolean":
        if raw.lower() not in ("true", "false"):
            raise ValueError("not a boolean")
        return raw.lower() == "true"
    raise AssertionError(kind)


def valid(t: T) -> bool:
    """Whether the service must accept the term (else: 400)."""
    attr = ALIASES.get(t.attr, t.attr)
    if attr not in KINDS:
        return False
    kind = KINDS[attr]
    if t.op is None:
        return kind == "boolean" and not t.values
    if t.op not in OPS_BY_KIND[kind]:
        return False
    if t.op == "isnull":
        return not t.values
    if not t.values or (t.op not in ("in", "iin") and len(t.values) != 1):
        return False
    for raw in t.values:
        if kind == "enum":
            ok = (
                (raw.lower() in {v.lower() for v in ENUMS[attr]})
                if t.op == "iin"
                else (raw in ENUMS[attr])
            )
            if not ok:
                return False
            continue
        if kind == "id" and t.op in ("lt", "le", "gt", "ge") and not DIGITS.fullmatch(raw):
            return False
        try:
            _typed(kind, raw)
        except ValueError:
            return False
    return True


def holds(t: T, s: RSpec) -> bool:
    attr = ALIASES.get(t.attr, t.attr)
    kind = KINDS[attr]
    v = s.value(attr)
    missing = v is None or (attr in EMPTY_IS_NULL and v == "")
    if t.op is None:
        result = v is True
    elif t.op == "isnull":
        result = missing
    elif missing:
        result = False
    else:
        xs = [_typed(kind, raw) if kind != "enum" else raw for raw in t.values]
        if t.op == "eq":
            result = v == xs[0]
        elif t.op == "ne":
            result = v != xs[0]
        elif t.op in ("lt", "le", "gt", "ge"):
            a, b = v, xs[0]
            if kind == "id":
                if not DIGITS.fullmatch(a):
                    return t.neg
                a, b = int(a), int(b)
            result = {"lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b}[t.op]
        elif t.op == "in":
            result = v in xs
        elif t.op == "iin":
            result = str(v).lower() in {str(x).lower() for x in xs}
        elif t.op == "match":
            result = xs[0] in v
        elif t.op == "imatch":
            result = xs[0].lower() in v.lower()
        else:
            raise AssertionError(t.op)
    return result != t.neg


def newest_first(specs: list[RSpec]) -> list[RSpec]:
    return sorted(specs, key=lambda s: (s.start, uuid.UUID(s.id)), reverse=True)


def reference_ids(
    specs: list[RSpec], terms: list[T], order: list[tuple[str, bool]] | None = None
) -> list[str]:
    """Ids the Session summary of `terms` lists, in order: the order keys with NULLs last in
    both directions, then newest first (start, then id, descending)."""
    kept = newest_first([s for s in specs if all(holds(t, s) for t in terms)])
    for attr, desc in reversed(order or []):
        name = ALIASES.get(attr, attr)
        present = [s for s in kept if s.value(name) is not None]
        absent = [s for s in kept if s.value(name) is None]
        present.sort(key=lambda s: s.value(name), reverse=desc)
        kept = present + absent
    return [s.id for s in kept]


# -- report types, in Python -----------------------------------------------------------------


def ts(t: datetime | None) -> str:
    return "" if t is None else t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _group(specs: list[RSpec], key: Callable[[RSpec], tuple[str, ...]]) -> dict[Any, list[RSpec]]:
    groups: dict[Any, list[RSpec]] = defaultdict(list)
    for s in specs:
        groups[key(s)].append(s)
    return groups


def _span(ss: list[RSpec]) -> list[str]:
    return [ts(min(s.start for s in ss)), ts(max(s.start for s in ss))]


def expected_rows(kind: str, specs: list[RSpec]) -> list[list[str]]:
    """The rows each predefined type must hold for `specs` (no filter, no period)."""
    if kind == "session_summary":
        return [
            [s.id, ts(s.start), ts(s.end),
             "" if s.end is None else str(int((s.end - s.start).total_seconds())),
             s.email, s.user_id, s.connection, s.protocol, s.account, s.verb or "",
             s.value("session_status"), s.review_status or "",
             "true" if s.value("retention_locked") else "false",
             "" if s.exit_code is None else str(s.exit_code)]
            for s in newest_first(specs)
        ]  # fmt: skip
    if kind == "sessions_by_server":
        g = _group(specs, lambda s: (s.connection, s.type, s.protocol))
        rows = [
            [*k, str(len(ss)), str(len({s.email.lower() for s in ss})),
             str(sum(1 for s in ss if s.end is None)), *_span(ss),
             str(sum(int((s.end - s.start).total_seconds()) for s in ss if s.end))]
            for k, ss in g.items()
        ]  # fmt: skip
        return sorted(rows, key=lambda r: (-int(r[3]), r[0], r[1], r[2]))
    if kind == "server_access":
        g = _group(specs, lambda s: (s.connection, s.protocol, s.email.lower()))
        return sorted([*k, str(len(ss)), *_span(ss)] for k, ss in g.items())
    if kind == "account_access":
        g = _group(specs, lambda s: (s.account, s.connection, s.email.lower()))
        return sorted([*k, str(len(ss)), *_span(ss)] for k, ss in g.items())
    if kind == "safe_access":
        pairs = [
            (f"{k}={v}", s) for s in specs for k, v in (s.tags.items() or [("", "")])
        ]  # fmt: skip
        g2: dict[tuple[str, str], list[RSpec]] = defaultdict(list)
        for safe, s in pairs:
            g2[(safe if safe != "=" else "(untagged)", s.email.lower())].append(s)
        return sorted(
            [*k, str(len({s.connection for s in ss})), str(len(ss)), *_span(ss)]
            for k, ss in g2.items()
        )
    if kind == "user_access":
        g = _group(specs, lambda s: (s.email.lower(), s.user_id, s.connection, s.protocol))
        return sorted([*k, str(len(ss)), *_span(ss)] for k, ss in g.items())
    if kind == "user":
        g = _group(specs, lambda s: (s.email.lower(), s.user_id))
        return sorted(
            [*k, max(s.name for s in ss), str(len(ss)), str(len({s.connection for s in ss})),
             str(sum(1 for s in ss if s.end is None)), *_span(ss)]
            for k, ss in g.items()
        )  # fmt: skip
    if kind == "session_approvals":
        g3: dict[str, list[RSpec]] = defaultdict(list)
        for s in specs:
            if s.review_status is None:
                continue
            for a in sorted({a.lower() for a in s.approvers}) or ["(none)"]:
                g3[a].append(s)

        def n(ss: list[RSpec], *st: str) -> str:
            return str(sum(1 for s in ss if s.review_status in st))

        return sorted(
            [a, str(len(ss)), n(ss, "APPROVED"), n(ss, "EXECUTED"), n(ss, "REJECTED"),
             n(ss, "REVOKED"), n(ss, "PENDING"), n(ss, "PROCESSING", "UNKNOWN"), *_span(ss)]
            for a, ss in g3.items()
        )  # fmt: skip
    if kind == "session_sharing":
        return []
    raise AssertionError(kind)


# -- driving the API -------------------------------------------------------------------------


def ok(r: Any, status: int = 200) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    return body


def create_report(stack: Stack, token: str, **body: Any) -> str:
    reply = ok(stack.rest("POST", "/api/v2/report", token, json=body))
    assert reply["result"] == "success"
    rid: str = reply["report"]["id"]
    assert rid.isdigit()
    return rid


def wait_report(stack: Stack, token: str, rid: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        report: dict[str, Any] = ok(stack.rest("GET", f"/api/v2/report/{rid}", token))["report"]
        if report["status"] != "pending":
            return report
        if time.monotonic() > deadline:
            raise AssertionError(f"report {rid} still pending after {timeout}s")
        time.sleep(0.05)


def ready_report(stack: Stack, token: str, **body: Any) -> tuple[str, dict[str, Any]]:
    rid = create_report(stack, token, **body)
    report = wait_report(stack, token, rid)
    assert report["status"] == "ready", report
    return rid, report


def csv_rows(stack: Stack, token: str, rid: str) -> list[list[str]]:
    r = stack.rest("GET", f"/api/v2/report/{rid}/csv", token)
    assert r.status_code == 200, r.text
    return list(csv.reader(io.StringIO(r.content.decode(), newline="")))


def summary_ids(stack: Stack, token: str, query_filter: str, query_order: str = "") -> list[str]:
    _, report = ready_report(stack, token, query_filter=query_filter, query_order=query_order)
    rows = csv_rows(stack, token, report["id"])
    assert rows[0][0] == "id"
    return [r[0] for r in rows[1:]]


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)


def report_stub(stack: Stack) -> Any:
    from session_audit.v1 import reports_pb2_grpc

    return reports_pb2_grpc.ReportServiceStub(stack.channel())


PREDEFINED = {
    5: "System report", 6: "Account access report", 7: "Safe access report",
    8: "Server access report", 9: "Session approvals by user",
    10: "Session sharing invites by user", 11: "Session summary",
    12: "Sessions by server report", 13: "User access report", 14: "User activity report",
    15: "User privilege report", 16: "User report",
}  # fmt: skip
