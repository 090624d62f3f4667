"""Hostile-input fuzzing of the REST surface against a real stack (server + Envoy + PostgreSQL).

Requests come from schemathesis (positive and negative cases of every operation in
envoy/openapi.json) and from hypothesis strategies written here for every query parameter
(edge times and days, odd zones, integers as text, raw percent-encoded bytes), both filter
languages (`q`, `query_filter`), ingest bodies (sessions at and beyond every domain edge, deep
JSON, duplicate keys, wrong content types) and the Reports API bodies. Every answer must be
below 500, arrive within SLOW seconds, and an error must be `{"message"}` without type names.

    make fuzz                              # >= 20,000 requests, own stack, prints counts
    make fuzz FUZZ_ARGS="--requests 50000 --seed 7"

`tests/test_fuzz.py` runs a fixed-seed slice of the same suite in `make test`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

from session_audit.analytics.fields import FIELDS
from session_audit.reports.filters import ATTRIBUTES, OPERATORS

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "envoy" / "openapi.json"
SLOW = 1.0
LEAKS = re.compile(
    r"session_audit\.v1|google\.protobuf|TYPE_[A-Z0-9]+|DecodeError|Error parsing|Traceback"
    r"|<class|\\u003cclass|RecursionError|OverflowError|DataError|AttributeError|KeyError"
    r"|Could not (find|resolve)|oneof"
)

# -- values at and beyond every domain's edges ----------------------------------------------------

RFC_TIMES = [
    "0001-01-02T00:00:00Z",
    "9999-12-30T23:59:59.999999Z",
    "0001-01-01T23:59:59Z",
    "9999-12-31T00:00:00Z",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999Z",
    "1970-01-01T00:00:00Z",
    "2026-03-29T02:30:00+01:00",
    "2024-02-29T12:00:00.123456789-05:30",
    "2023-02-29T00:00:00Z",
    "2026-01-01T00:00:00+23:59",
    "2026-01-01t10:00:00z",
    "2026-01-01 10:00:00Z",
    "2026-01-01T10:00:00 01:00",
    "+002026-01-01T00:00:00Z",
    "٢٠٢٦-01-01T00:00:00Z",
]
ISO_TIMES = [
    "0001-01-01",
    "0001-01-02",
    "0001-01-03",
    "9999-12-29",
    "9999-12-30",
    "9999-12-31",
    "0100-01-01",
    "2026-03-29T02:30",
    "2026-10-25T02:30",
    "2026-01-01T10:00:00,5+0100",
    "9999-12-30T23:59:59",
    "0001-01-02T00:00:00+14:00",
    "2026-13-01",
    "2026-02-30",
]
DAYS = [
    "0001-01-01",
    "0001-01-02",
    "0001-01-03",
    "9999-12-28",
    "9999-12-29",
    "9999-12-30",
    "9999-12-31",
    "2024-02-29",
    "2023-02-29",
    "2026-1-1",
    "20260101",
]
ZONES = [
    "Etc/UTC",
    "UTC",
    "Pacific/Kiritimati",
    "Etc/GMT+12",
    "Etc/GMT-14",
    "Asia/Manila",
    "America/Metlakatla",
    "Europe/Berlin",
    "America/Sao_Paulo",
    "Bad/Zone",
    "../etc",
    "europe/berlin",
    "",
]
INT_TEXT = [
    "0",
    "1",
    "-1",
    "100",
    "101",
    "10000",
    "10001",
    "2147483647",
    "2147483648",
    "-2147483649",
    "9223372036854775808",
    "--1",
    "²",
    "1e3",
    "0x10",
    " 1",
    "1.5",
    "",
    "١",
    "1_0",
    "abc",
]
BIN_SIZES = ["second", "minute", "hour", "day", "week", "month", "year", "decade", "Day"]

text = st.text(max_size=40)
wild_text = st.one_of(
    text,
    st.text(alphabet=st.characters(codec="utf-8"), max_size=300),
    st.sampled_from(
        [
            "\x00",
            "a\x00b",
            "' OR 1=1 --",
            "%",
            "_",
            "\\",
            "*" * 30,
            "x" * 5000,
            "😀",
            "\u202e",
            "\ud7ff",
            "null",
            "[]",
            "{}",
        ]
    ),
)


def _pick(values: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(values), text)


# -- the two filter languages -------------------------------------------------------------------

Q_VALUES = [
    "*",
    "a*",
    "*z",
    "?",
    "pg-prod",
    '"quoted phrase"',
    "*" * 17 + "z",
    "*" * 16 + "d",
    "[* TO 2026-01-01]",
    "[0001-01-01 TO 9999-12-31T23:59:59]",
    "{2026-01-01 TO *}",
    "[0001-01-02 TO 9999-12-30]",
    ">=10",
    "<5",
    "[1 TO 2]",
    "APPROVED",
    "ExEc",
    "00000000-0000-0000-0000-000000000000",
    "1e308",
    "-0",
    "\\*",
    "a\\ b",
    "(a OR b)",
]
q_term = st.builds(
    lambda f, v: f"{f}:{v}",
    st.sampled_from([*FIELDS, "content", "unknown", ""]),
    st.one_of(st.sampled_from(Q_VALUES), st.from_regex(r"[A-Za-z0-9*?._@-]{1,12}", fullmatch=True)),
)
q_expr = st.recursive(
    q_term,
    lambda inner: st.one_of(
        st.builds(
            lambda a, b, op: f"{a} {op} {b}", inner, inner, st.sampled_from(["AND", "OR", "&&", ""])
        ),
        st.builds(lambda a: f"NOT {a}", inner),
        st.builds(lambda a: f"({a})", inner),
    ),
    max_leaves=12,
)
q_strategy = st.one_of(
    q_expr,
    wild_text,
    st.integers(1, 1200).map(lambda n: "(" * n + "status:open" + ")" * n),
    st.integers(1, 600).map(lambda n: "NOT " * n + "status:open"),
    st.integers(100, 300).map(lambda n: " OR ".join(["user:a"] * n)),
)

_VALUES = [
    "true",
    "false",
    "0001-01-02T00:00:00Z",
    "0001-01-01T00:00:00%2B01:00",
    "9999-12-31T23:59:59Z",
    "2026-01-01T00:00:00Z",
    "-9223372036854775809",
    "42",
    "00000000-0000-0000-0000-000000000000",
    "APPROVED",
    "exec",
    "a%2Cb",
    "%FF",
    "%28",
    "",
    "x" * 1100,
    "ssh",
]
filter_term = st.builds(
    lambda neg, attr, op, values: f"{neg}{attr}.{op}({','.join(values)})",
    st.sampled_from(["", "!"]),
    st.sampled_from([a.name for a in ATTRIBUTES] + ["colour", "user", "email"]),
    st.sampled_from([*OPERATORS, "like"]),
    st.lists(
        st.one_of(st.sampled_from(_VALUES), st.from_regex(r"[a-z0-9:.@-]{1,10}", fullmatch=True)),
        max_size=3,
    ),
)
filter_strategy = st.one_of(
    st.lists(filter_term, min_size=1, max_size=6).map(",".join),
    st.just("retention_locked"),
    wild_text,
    st.integers(60, 200).map(lambda n: ",".join(["verb.eq(exec)"] * n)),
    st.integers(1, 300).map(lambda n: "id.eq(" + "(" * n),
)
order_strategy = st.one_of(
    st.lists(
        st.builds(
            lambda neg, a: neg + a,
            st.sampled_from(["", "!"]),
            st.sampled_from([a.name for a in ATTRIBUTES] + ["nope"]),
        ),
        max_size=10,
    ).map(",".join),
    wild_text,
)

# -- query parameters per path ------------------------------------------------------------------


def _param_value(name: str) -> st.SearchStrategy[Any]:
    if name in ("start_date", "end_date") or name.endswith("_date"):
        return st.one_of(_pick(RFC_TIMES), _pick(DAYS))
    if name in ("start", "end"):
        return _pick(ISO_TIMES + RFC_TIMES)
    if name == "time_zone":
        return _pick(ZONES)
    if name in ("limit", "offset", "size"):
        return st.one_of(st.sampled_from(INT_TEXT), st.integers(-(2**40), 2**40).map(str))
    if name == "q":
        return q_strategy
    if name in ("field", "sub_fields"):
        return _pick([*FIELDS, "content", "protocol,user", ""])
    if name == "bin-size":
        return _pick(BIN_SIZES)
    if name == "page_token":
        return st.one_of(
            text,
            st.builds(
                _forged_token,
                st.sampled_from(RFC_TIMES),
                st.one_of(st.uuids().map(str), st.integers()),
            ),
        )
    return wild_text


def _forged_token(when: str, sid: Any) -> str:
    import base64

    raw = json.dumps({"t": when, "i": sid, "f": "0" * 12}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# -- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    method: str
    path: str  # may carry a raw query string
    params: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    content_type: str | None = "application/json"
    role: str = "admin"

    def label(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.params)
        return f"{self.method} {self.path}{'?' + query if query else ''}"[:300]


def _query(names: list[str]) -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    if not names:
        return st.just(())
    pairs = st.lists(
        st.sampled_from(names).flatmap(lambda n: st.tuples(st.just(n), _param_value(n).map(str))),
        max_size=len(names) + 1,
    )
    extra = st.lists(
        st.tuples(st.sampled_from(["foo", "review.nope", "LIMIT", "startDate", "bin_size"]), text),
        max_size=1,
    )
    return st.tuples(pairs, extra).map(lambda p: tuple(p[0] + p[1]))


def _role() -> st.SearchStrategy[str]:
    return st.sampled_from(["admin"] * 6 + ["user", "auditor", "ingest", "none"])


def get_requests(doc: dict[str, Any]) -> st.SearchStrategy[Req]:
    """Every GET path with its documented parameters drawn from the edge strategies."""
    options = []
    for path, ops in doc["paths"].items():
        op = ops.get("get")
        if op is None:
            continue
        names = [p["name"] for p in op.get("parameters", []) if p["in"] == "query"]
        segment = st.one_of(
            st.sampled_from(
                [
                    "1",
                    "5",
                    "16",
                    "csv",
                    "pdf",
                    "html",
                    "attributes",
                    "%FF",
                    "%00",
                    "00000000-0000-0000-0000-000000000000",
                    "9" * 30,
                    "..",
                    "%2F",
                ]
            ),
            st.from_regex(r"[A-Za-z0-9._~-]{1,20}", fullmatch=True),
        )
        parts = re.split(r"\{[^}]+\}", path)

        def fill(segments: list[str], parts: list[str] = parts) -> str:
            out = parts[0]
            for seg, rest in zip(segments, parts[1:], strict=True):
                out += seg + rest
            return out

        options.append(
            st.builds(
                lambda p, q, role: Req("GET", p, q, None, None, role),
                st.lists(segment, min_size=len(parts) - 1, max_size=len(parts) - 1).map(fill),
                _query(names),
                _role(),
            )
        )
    return st.one_of(options)


def raw_requests(doc: dict[str, Any]) -> st.SearchStrategy[Req]:
    """Any method on any path with raw bytes in path and query (invalid UTF-8, NUL, …)."""
    paths = [re.sub(r"\{[^}]+\}", "1", p) for p in doc["paths"]]
    junk = st.sampled_from(
        [
            "%FF",
            "%C0%80",
            "%ED%A0%80",
            "%00",
            "%F4%90%80%80",
            "%E2%82",
            "é",
            "%25",
            "+",
            "%2B",
            "a=b",
            "&&",
            "=",
            "%zz",
        ]
    )
    return st.builds(
        lambda method, path, key, value, role: Req(
            method,
            f"{path}?{key}={value}",
            (),
            b"{}" if method in ("POST", "PATCH", "PUT") else None,
            "application/json",
            role,
        ),
        st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
        st.one_of(
            st.sampled_from([*paths, "/api/session", "/", "/api/sessions/ingest/x"]),
            st.builds(lambda p, j: p + "/" + j, st.sampled_from(paths), junk),
        ),
        st.one_of(junk, st.sampled_from(["user", "q", "limit", "time_zone", "id"])),
        junk,
        _role(),
    )


# -- bodies ---------------------------------------------------------------------------------------

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    text,
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
    max_leaves=20,
)


def deep(depth: int, kind: str = "dict") -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value} if kind == "dict" else [value]
    return value


session_strategy = st.fixed_dictionaries(
    {
        "id": st.one_of(
            st.uuids().map(str), st.sampled_from(["", "x", "00000000-0000-0000-0000-000000000000"])
        )
    },
    optional={
        "start_date": _pick(RFC_TIMES),
        "end_date": _pick(RFC_TIMES),
        "user": wild_text,
        "user_id": wild_text,
        "connection": wild_text,
        "type": wild_text,
        "connection_subtype": st.sampled_from(["ssh", "postgres", "rdp", ""]),
        "verb": st.sampled_from(["exec", "connect", "EXEC", 99, "", None]),
        "status": st.sampled_from(["open", "ready", "done", "nope", 7]),
        "exit_code": st.one_of(st.integers(-(2**33), 2**33), st.sampled_from(INT_TEXT)),
        "event_size": st.one_of(
            st.integers(-1, 2**60), st.floats(), st.sampled_from(["1e3", "NaN"])
        ),
        "metadata": st.one_of(json_value, st.integers(1, 40).map(deep)),
        "metrics": json_value,
        "integrations_metadata": json_value,
        "event_stream": st.one_of(
            st.lists(json_value, max_size=4), st.integers(1, 40).map(lambda n: deep(n, "list"))
        ),
        "labels": st.dictionaries(text, text, max_size=3),
        "connection_tags": st.one_of(st.dictionaries(text, text, max_size=3), json_value),
        "review": st.fixed_dictionaries(
            {},
            optional={
                "status": st.sampled_from(["APPROVED", "PENDING", "approved", "x"]),
                "access_duration": st.one_of(st.integers(), st.floats(allow_nan=False)),
                "created_at": _pick(RFC_TIMES),
                "review_groups_data": st.lists(
                    st.fixed_dictionaries(
                        {"group": text, "reviewed_by": st.fixed_dictionaries({"email": wild_text})}
                    ),
                    max_size=2,
                ),
            },
        ),
        "redactions": st.lists(
            st.fixed_dictionaries(
                {
                    "info_type": st.sampled_from(["EMAIL_ADDRESS", "email", "", "X" * 70]),
                    "count": st.integers(-5, 2**40),
                    "transformed_bytes": st.integers(-1, 2**54),
                }
            ),
            max_size=3,
        ),
        "script": st.fixed_dictionaries({"data": wild_text}),
        "unknown_field": text,
    },
)


def _dumps(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    try:
        return json.dumps(value, allow_nan=True, default=str).encode()
    except (ValueError, RecursionError, TypeError):
        return b"{}"


RAW_BODIES = [
    b"",
    b"{",
    b"[]",
    b"null",
    b'{"sessions":[]}',
    b'{"sessions":null}',
    b"\xff\xfe",
    b'{"sessions":[{"id":"a","id":"b"}]}',
    b'{"sessions":[{"start_date":NaN}]}',
    b'{"sessions":' + b"[" * 1500 + b"]" * 1500 + b"}",
    b'{"title":' + b'{"a":' * 900 + b"1" + b"}" * 901,
    b'\xef\xbb\xbf{"sessions":[]}',
    b'{"sessions":[{"user":"\\ud800"}]}',
    b'{"a":1e999}',
]


def ingest_requests() -> st.SearchStrategy[Req]:
    bodies = st.one_of(
        st.lists(session_strategy, min_size=1, max_size=4).map(lambda s: _dumps({"sessions": s})),
        st.sampled_from(RAW_BODIES),
    )
    ctype = st.sampled_from(
        ["application/json"] * 8
        + [
            "application/grpc",
            "text/plain",
            None,
            "application/json; charset=utf-8",
            "application/x-www-form-urlencoded",
        ]
    )
    return st.builds(
        lambda body, ct, role: Req("POST", "/api/sessions/ingest", (), body, ct, role),
        bodies,
        ctype,
        st.sampled_from(["admin", "admin", "ingest", "user", "none"]),
    )


def report_requests() -> st.SearchStrategy[Req]:
    create = st.fixed_dictionaries(
        {},
        optional={
            "defined_report_id": st.one_of(st.sampled_from([str(i) for i in range(4, 18)]), text),
            "title": wild_text,
            "query_filter": filter_strategy,
            "query_order": order_strategy,
            "criteria": st.lists(
                st.fixed_dictionaries(
                    {
                        "field": st.sampled_from([a.name for a in ATTRIBUTES] + ["x"]),
                        "value": st.sampled_from(_VALUES),
                    }
                ),
                max_size=4,
            ),
        },
    )
    defined = st.fixed_dictionaries(
        {},
        optional={
            "title": wild_text,
            "type": st.sampled_from(["sessions", "redactions", "x", ""]),
            "query_filter": filter_strategy,
            "query_order": order_strategy,
        },
    )
    subscription = st.fixed_dictionaries(
        {},
        optional={
            "defined_report_id": st.sampled_from(["5", "16", "0", "x", "99999999999999999999"]),
            "period": st.sampled_from(["day", "week", "month", "quarter", "year", "decade", ""]),
            "time_zone": _pick(ZONES),
        },
    )
    return st.one_of(
        st.builds(
            lambda b, r: Req("POST", "/api/v2/report", (), _dumps(b), "application/json", r),
            create,
            _role(),
        ),
        st.builds(lambda b: Req("POST", "/api/v2/report/defined", (), _dumps(b)), defined),
        st.builds(
            lambda b: Req("POST", "/api/v2/report/subscription", (), _dumps(b)), subscription
        ),
        st.builds(
            lambda i, b: Req("PATCH", f"/api/v2/report/defined/{i}", (), _dumps(b)),
            st.sampled_from(["5", "1", "x", "%FF"]),
            defined,
        ),
    )


def schemathesis_requests(doc: dict[str, Any]) -> st.SearchStrategy[Req]:
    schema = schemathesis.openapi.from_dict(doc)
    options = []
    for result in schema.get_all_operations():
        op = cast(Any, result).ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            options.append(op.as_strategy(generation_mode=mode).map(_from_case))
    return st.one_of(options)


def _from_case(case: Any) -> Req:
    path = case.formatted_path if hasattr(case, "formatted_path") else case.path
    params: list[tuple[str, str]] = []
    for key, value in (case.query or {}).items():
        values = value if isinstance(value, list) else [value]
        params += [(str(key), v if isinstance(v, str) else json.dumps(v)) for v in values]
    body = None
    body_value = getattr(case, "body", None)
    if case.method.upper() in ("POST", "PATCH", "PUT"):
        body = (
            b"{}"
            if body_value is None or type(body_value).__name__ == "NotSet"
            else _dumps(body_value)
        )
    return Req(case.method.upper(), path, tuple(params), body)


# -- the runner ---------------------------------------------------------------------------------


@dataclass
class Tally:
    by_status: Counter[int] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)
    slow: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    total: int = 0
    seconds: float = 0.0

    def failures(self) -> list[str]:
        return [*self.server_errors, *self.transport_errors, *self.slow, *self.leaks]

    def summary(self) -> str:
        counts = ", ".join(f"{status}: {n}" for status, n in sorted(self.by_status.items()))
        return (
            f"{self.total} requests in {self.seconds:.0f} s; by status: {counts}; "
            f"5xx: {len(self.server_errors)}; broken connections: {len(self.transport_errors)}; "
            f"slower than {SLOW:.0f} s: {len(self.slow)}; "
            f"leaks: {len(self.leaks)}"
        )


class Fuzzer:
    def __init__(self, base_url: str, tokens: dict[str, str]) -> None:
        self.base = base_url
        self.tokens = tokens
        self.client = httpx.Client(timeout=30)
        self.tally = Tally()

    def send(self, req: Req) -> None:
        headers = {}
        if req.role != "none":
            headers["authorization"] = f"Bearer {self.tokens[req.role]}"
        if req.content_type is not None and req.body is not None:
            headers["content-type"] = req.content_type
        url = self.base + req.path
        if req.params:
            joiner = "&" if "?" in req.path else "?"
            url += joiner + "&".join(
                f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in req.params
            )
        started = time.monotonic()
        try:
            r = self.client.request(req.method, url, headers=headers, content=req.body)
        except (httpx.RemoteProtocolError, httpx.ReadError):
            # A kept-alive connection that Envoy closed after a refusal (it closes one whose
            # request body it did not read): the same request on a new connection decides.
            self.client.close()
            self.client = httpx.Client(timeout=30)
            started = time.monotonic()
            try:
                r = self.client.request(req.method, url, headers=headers, content=req.body)
            except httpx.HTTPError as exc:
                self.tally.total += 1
                self.tally.transport_errors.append(f"{req.label()}: {type(exc).__name__}")
                return
        except httpx.HTTPError as exc:
            self.tally.total += 1
            self.tally.transport_errors.append(f"{req.label()}: {type(exc).__name__}")
            return
        elapsed = time.monotonic() - started
        t = self.tally
        t.total += 1
        t.by_status[r.status_code] += 1
        if r.status_code >= 500:
            t.server_errors.append(f"{r.status_code} {req.label()} -> {r.text[:300]}")
        if elapsed > SLOW:
            t.slow.append(f"{elapsed:.2f}s {req.label()}")
        if r.status_code >= 400 and req.method != "HEAD":
            try:
                body = r.json()
                ok = isinstance(body, dict) and set(body) == {"message"}
                message = str(body.get("message", "")) if isinstance(body, dict) else ""
            except ValueError:
                ok, message = False, r.text
            if not ok or LEAKS.search(message):
                t.leaks.append(f"{r.status_code} {req.label()} -> {r.text[:300]}")

    def run(self, groups: list[tuple[str, st.SearchStrategy[Req], int]], seed_value: int) -> Tally:
        started = time.monotonic()
        for index, (_, strategy, count) in enumerate(groups):
            if count <= 0:
                continue
            self._drive(strategy, count, seed_value + index)
        self.tally.seconds += time.monotonic() - started
        return self.tally

    def _drive(self, strategy: st.SearchStrategy[Req], count: int, seed_value: int) -> None:
        @seed(seed_value)
        @settings(
            max_examples=count,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(strategy)
        def each(req: Req) -> None:
            self.send(req)

        each()


def groups_for(doc: dict[str, Any], total: int) -> list[tuple[str, st.SearchStrategy[Req], int]]:
    shares: list[tuple[str, Callable[[], st.SearchStrategy[Req]], int]] = [
        ("schemathesis", lambda: schemathesis_requests(doc), 30),
        ("query parameters", lambda: get_requests(doc), 30),
        ("raw bytes and methods", lambda: raw_requests(doc), 10),
        ("ingest bodies", ingest_requests, 18),
        ("reports API bodies", report_requests, 12),
    ]
    whole = sum(w for _, _, w in shares)
    return [(name, make(), max(1, total * w // whole)) for name, make, w in shares]


def fuzz(base_url: str, tokens: dict[str, str], total: int, seed_value: int) -> Tally:
    doc = json.loads(DOC.read_text())
    fuzzer = Fuzzer(base_url, tokens)
    # hypothesis stops a group early when its space is small; go round until `total` is reached.
    rounds = 0
    while fuzzer.tally.total < total and rounds < 5:
        left = total - fuzzer.tally.total
        fuzzer.run(groups_for(doc, left), seed_value + 100 * rounds)
        rounds += 1
    return fuzzer.tally


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="make fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=20261128)
    args = parser.parse_args(argv)
    from session_audit import envoy
    from session_audit.embedded import EmbeddedPostgres
    from tests.support import start_stack

    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        work = Path(tmp)
        pg = EmbeddedPostgres(work / "pg")
        stack = start_stack(pg.start(), work)
        try:
            org = stack.new_org("fuzz")
            tokens = {
                role: stack.token(org, role) for role in ("admin", "auditor", "user", "ingest")
            }
            print(
                f"fuzzing {stack.http} with {args.requests} requests, seed {args.seed}", flush=True
            )
            tally = fuzz(stack.http, tokens, args.requests, args.seed)
            # The server's own account of any internal error (class, SQLSTATE, frames).
            log = (work / f"server-{stack.server.port}.log").read_text(errors="replace")
            errors = [line for line in log.splitlines() if " ERROR " in line]
        finally:
            envoy.stop(stack.envoy_proc)
            stack.server.stop()
            pg.stop()
    print(tally.summary())
    for line in tally.failures()[:50]:
        print("  " + line)
    for line in errors[:20]:
        print("  server log: " + line[:400])
    return 1 if tally.failures() or tally.total < args.requests else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
