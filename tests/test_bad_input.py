"""Every parameter of List/Get, bad: 400 with a message naming it; or, where the document
allows, a normal answer. Also the error shape of Envoy's own replies."""

from __future__ import annotations

import pytest

from tests.support import Stack


@pytest.fixture(scope="module")
def token(stack: Stack) -> str:
    return stack.token(stack.new_org("bad"), "auditor")


BAD_LIST_PARAMS = [
    ({"limit": "abc"}, "limit"),
    ({"limit": "0"}, "limit: expected 1..100"),
    ({"limit": "101"}, "limit: expected 1..100"),
    ({"limit": "-1"}, "limit: expected 1..100"),
    ({"limit": "1.5"}, "limit"),
    ({"limit": "99999999999"}, "limit"),
    ({"offset": "-1"}, "offset: expected 0..10000"),
    ({"offset": "10001"}, "offset: expected 0..10000"),
    ({"offset": "x"}, "offset"),
    ({"count": "most"}, "count: expected one of capped, exact, none"),
    ({"start_date": "2024-13-01T00:00:00Z"}, "start_date:"),
    ({"start_date": "2024-07-25"}, "start_date: expected an RFC 3339 date-time"),
    ({"start_date": "2024-07-25T15:56:35"}, "start_date: expected an RFC 3339 date-time"),
    ({"start_date": "yesterday"}, "start_date: expected an RFC 3339 date-time"),
    ({"end_date": "' OR 1=1 --"}, "end_date: expected an RFC 3339 date-time"),
    (
        {"start_date": "2024-07-26T00:00:00Z", "end_date": "2024-07-26T01:00:00+02:00"},
        "start_date: must not be after end_date",
    ),
    ({"review.status": "DONE"}, "review.status: expected one of PENDING"),
    ({"review.status": "x" * 1000}, "review.status: expected one of"),
    ({"user": "x" * 300}, "user: expected at most 256 characters"),
    ({"connection": "a\x00b"}, "connection: must not contain NUL"),
    ({"type": "y" * 257}, "type: expected at most 256"),
    ({"correlation_id": "z" * 257}, "correlation_id: expected at most 256"),
    ({"review.approver": "a" * 321}, "review.approver: expected at most 320"),
    ({"jira_issue_key": ",, ,"}, "jira_issue_key: expected one or more"),
    ({"page_token": "%%%"}, "page_token:"),
    ({"unknown": "1"}, "unknown"),
    ({"review.nope": "1"}, "nope"),
]


@pytest.mark.parametrize(("params", "message"), BAD_LIST_PARAMS, ids=lambda x: str(x)[:40])
def test_bad_list_parameter_is_400_naming_it(
    stack: Stack, token: str, params: dict[str, str], message: str
) -> None:
    r = stack.rest("GET", "/api/sessions", token, params=params)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"message"}
    assert message in body["message"]
    assert not [h for h in r.headers if h.lower().startswith("grpc-")]


ACCEPTED_LIST_PARAMS = [
    {"review.status": "pending"},
    {"user": "' OR '1'='1"},
    {"connection": "pg-prod; DROP TABLE sessions"},
    {"jira_issue_key": "SEC-1,SEC-1"},
    {"start_date": "2024-07-25T15:56:35.123456789+05:30"},
    {"start_date": "2024-07-25t15:56:35z"},
    {"count": ""},
    {"limit": "100", "offset": "10000"},
]


@pytest.mark.parametrize("params", ACCEPTED_LIST_PARAMS, ids=lambda x: str(x)[:40])
def test_odd_but_valid_parameters_answer_normally(
    stack: Stack, token: str, params: dict[str, str]
) -> None:
    r = stack.rest("GET", "/api/sessions", token, params=params)
    assert r.status_code == 200, r.text
    assert r.json()["data"] == []


def test_get_session_bad_and_unknown_ids(stack: Stack, token: str) -> None:
    r = stack.rest("GET", "/api/sessions/not-a-uuid", token)
    assert r.status_code == 400 and r.json()["message"].startswith("id: expected a session UUID")
    r = stack.rest("GET", "/api/sessions/00000000-0000-0000-0000-000000000000", token)
    assert r.status_code == 404 and r.json()["message"].startswith("session ")


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/api/nothing", 404),
        ("GET", "/", 404),
        ("DELETE", "/api/sessions", 405),
        ("PUT", "/api/sessions/ingest", 405),
    ],
)
def test_envoy_own_errors_have_the_same_shape(
    stack: Stack, token: str, method: str, path: str, status: int
) -> None:
    r = stack.rest(method, path, token)
    assert r.status_code == status
    assert set(r.json()) == {"message"} and r.json()["message"]
    assert not [h for h in r.headers if h.lower().startswith("grpc-")]
