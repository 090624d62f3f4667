"""Hostile and odd input (issue 10): every reproduction of the report is a regression test.
Nothing a caller sends may crash (5xx), stall, or poison the service; every refusal is a 400
(or 404/405/415) in the `{"message": "<parameter>: …"}` vocabulary, without type names."""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from session_audit import logcap
from session_audit.analytics.q import _glob, wildcard_match
from session_audit.reports.generate import failure_reason
from session_audit.v1 import sessions_pb2 as pb
from tests.support import Stack, auth_md

# Words that must never reach a caller: the contract's type names, protobuf's, exception classes.
LEAKS = re.compile(
    r"session_audit\.v1|google\.protobuf|TYPE_[A-Z0-9]+|DecodeError|Error parsing|Traceback"
    r"|<class|\\u003cclass|RecursionError|OverflowError|DataError|AttributeError|KeyError"
    r"|Could not (find|resolve)|oneof"
)


@pytest.fixture(scope="module")
def org(stack: Stack) -> tuple[str, str, str]:
    """(org, admin token, user token)"""
    name = stack.new_org("hostile")
    return name, stack.token(name, "admin"), stack.token(name, "user")


def _get(stack: Stack, token: str | None, path: str) -> httpx.Response:
    """A GET with the query exactly as written (no re-encoding by the client)."""
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    return httpx.get(stack.http + path, headers=headers, timeout=30)


def _clean(r: httpx.Response) -> str:
    assert r.headers["content-type"].startswith("application/json"), r.text
    body = r.json()
    assert set(body) == {"message"}, body
    message: str = body["message"]
    assert not LEAKS.search(message), message
    return message


def _ingest(stack: Stack, token: str, sessions: list[dict[str, Any]]) -> httpx.Response:
    return stack.rest("POST", "/api/sessions/ingest", token, json={"sessions": sessions})


def _session(**fields: Any) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "start_date": "2026-01-01T10:00:00Z", **fields}


# -- a process stalls ---------------------------------------------------------------------------


def test_many_wildcards_on_an_enum_field_are_bounded_and_do_not_stall(
    stack: Stack, org: tuple[str, str, str]
) -> None:
    _, _, user = org
    base = "/api/audit/sessions/stats?field=protocol&q=review_status:"
    r = _get(stack, user, base + "*" * 26 + "z")
    assert r.status_code == 400
    assert _clean(r).startswith("q: ") and "at most 16 wildcards" in r.json()["message"]
    # At the bound the linear matcher answers (no value matches: a 400 naming the values).
    r = _get(stack, user, base + "*" * 15 + "z")
    assert r.status_code == 400 and "review_status is one of" in _clean(r)
    r = _get(stack, user, base + "*" * 15 + "d")  # approveD, rejecteD, revokeD, executeD
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        ("*", "", True), ("a*", "abc", True), ("*c", "abc", True), ("a?c", "abc", True),
        ("a?c", "ac", False), ("*a*b*", "xaxxb", True), ("*a*b*", "xbxxa", False),
        ("**z", "abc", False), ("\\*", "*", True), ("\\*", "a", False), ("a\\?", "a?", True),
        ("*" * 16 + "z", "a" * 200, False), ("?" * 3, "abcd", False),
    ],
)  # fmt: skip
def test_wildcard_matcher_agrees_with_the_definition(
    pattern: str, text: str, expected: bool
) -> None:
    assert wildcard_match(_glob(pattern), text) is expected


# -- 500 instead of 400 ---------------------------------------------------------------------------

EDGE_DATES = [
    ("/api/sessions?start_date=0001-01-01T00:00:00%2B01:00", "start_date: expected a time from"),
    ("/api/sessions?end_date=9999-12-31T23:59:59-01:00", "end_date: expected a time from"),
    ("/api/reports/sessions?end_date=0001-01-01", "end_date: expected a date from"),
    ("/api/reports/sessions?start_date=9999-12-31", "start_date: expected a date from"),
    ("/api/audit/sessions/histogram?field=protocol&end=0001-01-01", "end: expected a time from"),
    (
        "/api/audit/sessions/histogram?field=protocol&start=9999-12-30&end=9999-12-31T23:59:59"
        "&bin-size=year",
        "end: expected a time from",
    ),
    ("/api/audit/sessions/stats?field=protocol&end=0001-01-01", "end: expected a time from"),
    (
        "/api/audit/sessions/stats?field=protocol&q=start:%5B*%20TO%209999-12-31T23:59:59%5D"
        "&time_zone=Etc/GMT%2B12",
        "q: start: expected a time from",
    ),
]


@pytest.mark.parametrize(("path", "message"), EDGE_DATES)
def test_dates_beyond_the_time_domain_are_400_on_every_surface(
    stack: Stack, org: tuple[str, str, str], path: str, message: str
) -> None:
    r = _get(stack, org[1], path)
    assert r.status_code == 400, r.text
    assert _clean(r).startswith(message)


EDGE_DATES_INSIDE = [
    "/api/audit/sessions/histogram?field=protocol&end=0001-01-15&bin-size=week",
    "/api/audit/sessions/histogram?field=protocol&start=9999-12-01&end=9999-12-30"
    "&bin-size=month&time_zone=Pacific/Kiritimati",
    "/api/audit/sessions/histogram?field=protocol&start=9999-01-01&end=9999-12-30T11:00:00"
    "&bin-size=year&time_zone=Etc/GMT%2B12",
    "/api/audit/sessions/histogram?field=protocol&start=0001-01-03&end=0001-03-01"
    "&bin-size=week&time_zone=Pacific/Kiritimati",
    "/api/audit/sessions/histogram?field=protocol&start=0001-01-02&end=0001-02-01"
    "&bin-size=month&time_zone=Etc/GMT%2B12",
    "/api/audit/sessions/histogram?field=protocol&end=0001-01-02T00:00:00Z",
    "/api/audit/sessions/stats?field=protocol&end=0001-01-02T12:00:00Z&time_zone=Etc/GMT-14",
    "/api/reports/sessions?end_date=0001-01-03",
    "/api/reports/sessions?start_date=9999-12-29&time_zone=Etc/GMT%2B12",
    "/api/sessions?start_date=0001-01-02T00:00:00Z&end_date=9999-12-30T23:59:59.999999Z",
]


@pytest.mark.parametrize("path", EDGE_DATES_INSIDE)
def test_dates_at_the_edges_of_the_time_domain_answer(
    stack: Stack, org: tuple[str, str, str], path: str
) -> None:
    r = _get(stack, org[1], path)
    assert r.status_code == 200, r.text


def test_histogram_bucket_ids_pad_years_below_1000(stack: Stack, org: tuple[str, str, str]) -> None:
    r = _get(
        stack, org[1],
        "/api/audit/sessions/histogram?field=protocol&start=0100-01-01&end=0100-01-03&bin-size=day",
    )  # fmt: skip
    assert r.status_code == 200, r.text
    ids = [b["id"] for b in r.json()["body"]["buckets"]]
    assert ids == ["0100-01-01T00:00:00.000Z", "0100-01-02T00:00:00.000Z"]


def _token(payload: Any) -> str:
    raw = json.dumps(payload).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "payload",
    [
        {"t": "0001-01-01T00:00:00+01:00", "i": str(uuid.uuid4()), "f": "x"},
        {"t": "9999-12-31T23:59:59-01:00", "i": str(uuid.uuid4()), "f": "x"},
        {"t": "2026-01-01T00:00:00+00:00", "i": 5, "f": "x"},
        {"t": 5, "i": str(uuid.uuid4()), "f": "x"},
        {"t": "2026-01-01T00:00:00+00:00", "i": str(uuid.uuid4()), "f": ["x"]},
        [1, 2, 3],
        "text",
    ],
)
def test_forged_page_tokens_are_400(stack: Stack, org: tuple[str, str, str], payload: Any) -> None:
    r = stack.rest("GET", "/api/sessions", org[1], params={"page_token": _token(payload)})
    assert r.status_code == 400, r.text
    assert _clean(r).startswith("page_token: expected a next_page_token")


def test_q_nested_deeply_is_400(stack: Stack, org: tuple[str, str, str]) -> None:
    for q in ("(" * 990 + "status:open" + ")" * 990, "NOT " * 400 + "status:open"):
        r = stack.rest(
            "GET", "/api/audit/sessions/stats", org[1], params={"field": "protocol", "q": q}
        )
        assert r.status_code == 400, r.text
        assert _clean(r).startswith("q: expected at most 32 levels of nesting")
    many = " OR ".join("user:a" for _ in range(150))
    r = stack.rest(
        "GET", "/api/audit/sessions/stats", org[1], params={"field": "protocol", "q": many}
    )
    assert r.status_code == 400 and _clean(r).startswith("q: expected at most 128 terms")


def test_integers_beyond_64_bits_are_400(stack: Stack, org: tuple[str, str, str]) -> None:
    """Found by `make fuzz`: the message showing the value failed on a 70-bit integer (500)."""
    r = _ingest(stack, org[1], [_session(exit_code=2**70)])
    assert r.status_code == 400, r.text
    assert _clean(r).startswith("sessions[0].exit_code: expected an integer from -2147483648")
    r = _ingest(stack, org[1], [_session(verb=2**70)])
    assert r.status_code == 400 and _clean(r).startswith("body: ")
    r = _ingest(stack, org[1], [_session(event_size=-(2**70))])
    assert r.status_code == 200 and r.json()["rejected"] == 1, r.text
    assert r.json()["rejections"][0]["reason"].startswith("event_size: expected a whole number")


@pytest.mark.parametrize("code", ["--1", "²", "1_0", "١", " 1", "0x10", "1e3"])
def test_exit_codes_that_are_not_integers_are_400(
    stack: Stack, org: tuple[str, str, str], code: str
) -> None:
    r = _ingest(stack, org[1], [_session(exit_code=code)])
    assert r.status_code == 400, r.text
    assert _clean(r).startswith("sessions[0].exit_code: expected an integer")


@pytest.mark.parametrize(
    "path",
    [
        "/api/sessions?user=%FF",
        "/api/sessions/%FF",
        "/api/v2/report/%FF",
        "/api/audit/sessions/stats?field=protocol&q=%FF",
        "/api/audit/sessions/stats?field=protocol&time_zone=%FF",
        "/api/sessions?user=%C0%80",  # overlong NUL
        "/api/sessions?user=%ED%A0%80",  # a surrogate
        "/api/sessions?%FF=1",
    ],
)
def test_invalid_utf8_is_400_without_a_token(stack: Stack, path: str) -> None:
    r = _get(stack, None, path)
    assert r.status_code == 400, r.text
    assert "UTF-8" in _clean(r)


def test_invalid_utf8_over_grpc_is_invalid_argument(
    stack: Stack, org: tuple[str, str, str]
) -> None:
    with stack.channel() as channel:
        call = channel.unary_unary(
            "/session_audit.v1.SessionService/GetSession",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as err:
            call(b"\x0a\x01\xff", metadata=auth_md(org[1]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("request: expected a valid protobuf message")
    assert "session_audit" not in err.value.details()


def _nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def test_deep_bodies_are_400(stack: Stack, org: tuple[str, str, str]) -> None:
    r = stack.rest(
        "POST", "/api/sessions/ingest", org[1],
        content=b'{"sessions":[' + b"[" * 1000 + b"]" * 1000 + b"]}",
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert r.status_code == 400 and _clean(r).startswith("body: ")
    r = stack.rest(
        "POST", "/api/sessions/ingest", org[1],
        content=b'{"sessions":[{"metadata":' + b'{"a":' * 1000 + b"1" + b"}" * 1002 + b"]}",
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert r.status_code == 400 and _clean(r).startswith("body: ")
    deep = b'{"a":' * 900 + b"1" + b"}" * 900
    for body, message in (
        (b'{"title":' + deep + b"}", "title: expected a string, got {…}"),
        (b'{"criteria":[' + deep + b"]}", "criteria[0].a: unknown field"),
    ):
        r = stack.rest(
            "POST", "/api/v2/report", org[1], content=body,
            headers={"content-type": "application/json"},
        )  # fmt: skip
        assert r.status_code == 400 and _clean(r).startswith(message)


# -- accepted, then broken later (poison) --------------------------------------------------------


def test_times_outside_the_domain_reject_the_item_not_the_batch(
    stack: Stack, org: tuple[str, str, str]
) -> None:
    _, admin, _ = org
    good = _session()
    items = [
        good,
        _session(start_date="0001-01-01T00:00:00Z"),
        _session(start_date="0001-01-01T00:00:00+01:00"),
        _session(end_date="9999-12-31T23:59:59.999999Z"),
        _session(end_date="9999-12-31T00:00:00Z"),
    ]
    r = _ingest(stack, admin, items)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["accepted"], body["rejected"]) == (1, 4)
    reasons = {x["index"]: x["reason"] for x in body["rejections"]}
    for index in (1, 2):
        assert reasons[index].startswith("start_date: expected a time from 0001-01-02T00:00:00Z")
    for index in (3, 4):
        assert reasons[index].startswith("end_date: expected a time from")
    assert stack.rest("GET", f"/api/sessions/{good['id']}", admin).status_code == 200


def test_json_deeper_than_every_reader_takes_is_rejected_and_the_limit_reads_back(
    stack: Stack, org: tuple[str, str, str]
) -> None:
    _, admin, _ = org
    at_limit = _session(metadata=_nested(19, "x"), event_stream=[_nested(19)])
    items = [
        at_limit,
        _session(metadata=_nested(40)),
        _session(event_stream=[_nested(60)]),
        _session(metrics=_nested(21)),
    ]
    r = _ingest(stack, admin, items)
    assert r.status_code == 400 and _clean(r).startswith("sessions[1].metadata: expected JSON")
    r = _ingest(stack, admin, [items[0]])
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    for bad, field in ((items[1], "metadata"), (items[2], "event_stream"), (items[3], "metrics")):
        r = _ingest(stack, admin, [bad])
        assert r.status_code == 400
        assert _clean(r).startswith(f"sessions[0].{field}: expected JSON nested at most 20")
    # gRPC ingest checks the same depth per item.
    deep = pb.Session(id=str(uuid.uuid4()), user="d@example.com")
    deep.start_date.FromJsonString("2026-01-01T10:00:00Z")
    deep.metadata.update(_nested(25))
    reply = stack.ingest(admin, [deep])
    assert reply.rejected == 1
    assert reply.rejections[0].reason.startswith("metadata: expected JSON nested at most 20")
    # What was accepted reads back on every path, REST and gRPC.
    r = stack.rest("GET", f"/api/sessions/{at_limit['id']}", admin)
    assert r.status_code == 200, r.text
    assert r.json()["metadata"] == _nested(19, "x")
    assert stack.rest("GET", "/api/sessions", admin, params={"limit": 100}).status_code == 200
    got = stack.stub().GetSession(pb.GetSessionRequest(id=at_limit["id"]), metadata=auth_md(admin))
    assert got.id == at_limit["id"]


def test_report_filter_with_an_edge_date_is_400(stack: Stack, org: tuple[str, str, str]) -> None:
    for value in ("0001-01-01T00:00:00%2B01:00", "9999-12-31T23:59:59Z"):
        r = stack.rest(
            "POST", "/api/v2/report", org[1], json={"query_filter": f"created_at.gt({value})"}
        )
        assert r.status_code == 400, r.text
        assert "expected a time from 0001-01-02T00:00:00Z" in _clean(r)


def test_a_report_failure_never_names_an_exception_class() -> None:
    for exc in (ValueError("x"), KeyError("k"), RuntimeError()):
        reason = failure_reason(exc, 60)
        assert type(exc).__name__ not in reason and "internal error" in reason


# -- silently wrong -----------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/grpc", "text/plain", "", "application/x"])
def test_rest_ingest_demands_json(
    stack: Stack, org: tuple[str, str, str], content_type: str
) -> None:
    s = _session()
    headers = {"content-type": content_type} if content_type else {}
    r = stack.rest(
        "POST", "/api/sessions/ingest", org[1],
        content=json.dumps({"sessions": [s]}).encode(), headers=headers,
    )  # fmt: skip
    assert r.status_code == 415, r.text
    assert _clean(r).startswith("content-type: expected application/json")
    assert stack.rest("GET", f"/api/sessions/{s['id']}", org[1]).status_code == 404


def test_json_with_charset_is_json(stack: Stack, org: tuple[str, str, str]) -> None:
    r = stack.rest(
        "POST", "/api/sessions/ingest", org[1],
        content=json.dumps({"sessions": [_session()]}).encode(),
        headers={"content-type": "Application/JSON; charset=utf-8"},
    )  # fmt: skip
    assert r.status_code == 200, r.text


def test_duplicate_keys_are_400(stack: Stack, org: tuple[str, str, str]) -> None:
    sid = str(uuid.uuid4())
    body = (
        '{"sessions":[{"id":"' + sid + '","start_date":"2026-01-01T10:00:00Z",'
        '"user":"a@example.com","user":"b@example.com"}]}'
    )
    r = stack.rest(
        "POST", "/api/sessions/ingest", org[1], content=body.encode(),
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert r.status_code == 400
    assert _clean(r) == "body: expected unique keys in every object, got 'user' twice"
    r = stack.rest(
        "POST", "/api/v2/report", org[1], content=b'{"title":"a","title":"b"}',
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert r.status_code == 400 and "unique keys" in _clean(r)


# -- Envoy's edges -------------------------------------------------------------------------------

EDGES = [
    ("GET", "/api/sessions?foo=1", 400, "foo: unknown query parameter 'foo'; expected one of"),
    ("GET", "/api/sessions?review.nope=1", 400, "review.nope: unknown query parameter"),
    ("GET", "/api/sessions?limit=abc", 400, 'limit: expected an integer from -2147483648 to 2147483647, got "abc"'),
    ("GET", "/api/audit/sessions/histogram?field=user&size=x", 400, "size: expected an integer"),
    ("GET", "/api/sessions?offset=1&offset=2", 400, "offset: given more than once"),
    ("GET", "/api/sessions?user=a&user=b", 400, "user: given more than once"),
    ("GET", "/api/v2/report/attributes?x=1", 400, "x: unknown query parameter 'x'; this path takes none"),
    ("GET", "/api/session", 404, "path: no such REST path: /api/session"),
    ("GET", "/", 404, "path: no such REST path: /"),
    ("DELETE", "/api/sessions", 405, "method: DELETE is not allowed on this path; expected GET"),
    ("PUT", "/api/sessions/ingest", 405, "method: PUT is not allowed"),
    ("POST", "/api/v2/report/attributes", 405, "method: POST is not allowed"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "status", "message"), EDGES)
def test_envoy_answers_in_the_service_vocabulary(
    stack: Stack, org: tuple[str, str, str], method: str, path: str, status: int, message: str
) -> None:
    r = httpx.request(
        method, stack.http + path, headers={"authorization": f"Bearer {org[1]}"}, timeout=30
    )
    assert r.status_code == status, r.text
    assert _clean(r).startswith(message)
    assert not [h for h in r.headers if h.lower().startswith("grpc-")]
    if status == 405:
        allowed = {m.strip() for m in r.headers["allow"].split(",")}
        assert method not in allowed and allowed <= {"GET", "HEAD", "POST", "PATCH", "DELETE"}


def test_logs_stay_quiet_and_carry_no_session_content(
    stack: Stack, org: tuple[str, str, str]
) -> None:
    """After this module's hostile requests: Envoy's log has no Lua scope errors, the server's
    log no traceback and none of the session data sent above."""
    _, admin, _ = org
    secret = f"secret-{uuid.uuid4().hex[:8]}@example.com"
    _ingest(stack, admin, [_session(user=secret, start_date="0001-01-01T00:00:00Z")])
    _ingest(stack, admin, [_session(user=secret, end_date="2025-01-01T00:00:00Z")])
    for _ in range(3):
        _get(stack, None, "/api/sessions")  # 401s
    workdir: Path = stack.server.workdir
    envoy_log = (workdir / f"envoy-{stack.http_port}.log").read_text(errors="replace")
    assert "outside of proper scope" not in envoy_log
    assert "[error]" not in envoy_log, envoy_log[-2000:]
    server_log = (workdir / f"server-{stack.server.port}.log").read_text(errors="replace")
    assert "Traceback" not in server_log, server_log[-3000:]
    assert secret not in server_log and admin not in server_log


def test_envoy_log_is_rotated_at_its_cap(tmp_path: Path) -> None:
    path = tmp_path / "envoy.log"
    lines = [f"[warning] line {i} {'x' * 50}\n".encode() for i in range(400)]
    logcap.copy(iter(lines), path, 4096)
    rotated = path.with_name("envoy.log.1")
    assert path.stat().st_size <= 4096 and rotated.stat().st_size <= 4096
    # The newest lines are kept, in order, across the two files.
    kept = (rotated.read_bytes() + path.read_bytes()).splitlines(keepends=True)
    assert kept == lines[-len(kept) :] and len(kept) > 4096 // 80


def test_head_answers_the_get_headers_without_a_body(
    stack: Stack, org: tuple[str, str, str]
) -> None:
    _, admin, _ = org
    created = stack.rest("POST", "/api/v2/report", admin, json={"defined_report_id": "5"})
    rid = created.json()["report"]["id"]
    for _ in range(600):
        report = stack.rest("GET", f"/api/v2/report/{rid}", admin).json()["report"]
        if report["status"] != "pending":
            break
        time.sleep(0.05)
    assert report["status"] == "ready", report
    for path in (f"/api/v2/report/{rid}/csv", f"/api/v2/report/{rid}/pdf", "/api/sessions"):
        got = stack.rest("GET", path, admin)
        head = stack.rest("HEAD", path, admin)
        assert (head.status_code, head.content) == (200, b"")
        assert head.headers["content-length"] == str(len(got.content))
        assert head.headers["content-type"] == got.headers["content-type"]
    r = stack.rest("POST", "/api/sessions", admin, json={})
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
