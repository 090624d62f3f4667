"""Report, histogram and statistics through Envoy (REST) and gRPC, on fixtures whose answers
were worked out by hand (comments show the arithmetic)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import orjson
import pytest
from google.protobuf import json_format

from session_audit.v1 import analytics_pb2 as apb
from session_audit.v1 import analytics_pb2_grpc as apb_grpc
from tests.factories import Spec
from tests.support import Stack, auth_md

REPORT = "/api/reports/sessions"
HISTOGRAM = "/api/audit/sessions/histogram"
STATS = "/api/audit/sessions/stats"
ANA, BO, CY = "ana@acme.example", "bo@acme.example", "cy@acme.example"


def at(day: int, hour: int, minute: int = 0, month: int = 3) -> datetime:
    return datetime(2026, month, day, hour, minute, tzinfo=UTC)


def get(stack: Stack, path: str, token: str, **params: Any) -> dict[str, Any]:
    r = stack.rest("GET", path, token, params=params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def items(body: dict[str, Any]) -> list[tuple[str, str, int, int]]:
    return [
        (i["resource"], i["info_type"], i["redact_total"], i["transformed_bytes"])
        for i in body["items"]
    ]


# -- the worked example ----------------------------------------------------------------


@pytest.fixture(scope="module")
def three(stack: Stack) -> str:
    """ssh 14:30-16:10, rdp from 15:10 still open, ssh 16:05-16:20."""
    token = stack.token(stack.new_org("three"), "admin")
    stack.ingest(token, [
        Spec(start=at(2, 14, 30), end=at(2, 16, 10), subtype="ssh", connection="bastion",
             type="custom", verb="connect").to_proto(),
        Spec(start=at(2, 15, 10), subtype="rdp", connection="win", type="application",
             verb="connect").to_proto(),
        Spec(start=at(2, 16, 5), end=at(2, 16, 20), subtype="ssh", connection="bastion",
             type="custom", verb="connect").to_proto(),
    ])  # fmt: skip
    return token


def test_three_sessions_hourly_from_14_to_17(stack: Stack, three: str) -> None:
    body = get(stack, HISTOGRAM, three, field="protocol", **{"bin-size": "hour"},
               start="2026-03-02T14:00:00Z", end="2026-03-02T17:00:00Z")  # fmt: skip
    assert body["key"] == "histogram"
    buckets = body["body"]["buckets"]
    assert [b["id"] for b in buckets] == [
        "2026-03-02T14:00:00.000Z",
        "2026-03-02T15:00:00.000Z",
        "2026-03-02T16:00:00.000Z",
    ]
    assert [b["start_count"] for b in buckets] == [1, 1, 1]
    assert [b["active_count"] for b in buckets] == [1, 2, 3]
    meta = body["meta"]
    assert meta == {
        "bin_size": "hour",
        "field": "protocol",
        "href": "/api/audit/sessions/histogram",
        "parent": "/api/audit/sessions",
        "remaining_seconds": meta["remaining_seconds"],
        "time_zone": "Etc/UTC",
        "start": "2026-03-02T14:00:00.000Z",
        "end": "2026-03-02T17:00:00.000Z",
    }
    assert 0 < meta["remaining_seconds"] <= 60


def test_three_sessions_over_grpc_with_size_and_q(stack: Stack, three: str) -> None:
    stub = apb_grpc.AnalyticsServiceStub(stack.channel())
    req = apb.HistogramRequest(field="protocol", bin_size="hour", start="2026-03-02T14:00Z",
                               end="2026-03-02T17:00Z", size=1)  # fmt: skip
    reply = stub.GetSessionHistogram(req, metadata=auth_md(three))
    # ssh started twice, rdp once: ssh is the top value; only ssh sessions are counted.
    assert [(b.start_count, b.active_count) for b in reply.body.buckets] == [(1, 1), (0, 1), (1, 2)]
    assert [[(v.value, v.start_count, v.active_count) for v in b.values]
            for b in reply.body.buckets] == [[("ssh", 1, 1)], [("ssh", 0, 1)], [("ssh", 1, 2)]]  # fmt: skip
    assert reply.meta.size == 1
    req = apb.HistogramRequest(field="protocol", bin_size="hour", start="2026-03-02T14:00Z",
                               end="2026-03-02T17:00Z", q="NOT protocol:ssh")  # fmt: skip
    reply = stub.GetSessionHistogram(req, metadata=auth_md(three))
    assert [(b.start_count, b.active_count) for b in reply.body.buckets] == [(0, 0), (1, 1), (0, 1)]


def test_minute_bins_and_partial_edge_buckets(stack: Stack, three: str) -> None:
    # 16:09:30 → 16:12:00 by minute: the first bucket starts at 16:09 but counts from 16:09:30.
    body = get(stack, HISTOGRAM, three, field="verb", **{"bin-size": "minute"},
               start="2026-03-02T16:09:30Z", end="2026-03-02T16:12:00Z")  # fmt: skip
    buckets = body["body"]["buckets"]
    assert [b["id"] for b in buckets] == [
        "2026-03-02T16:09:00.000Z",
        "2026-03-02T16:10:00.000Z",
        "2026-03-02T16:11:00.000Z",
    ]
    # Open during 16:09-16:10: all three. 16:10-16:11: the first ended exactly at 16:10, which
    # is not before the bin's start, so it still counts. 16:11-16:12: rdp and the last ssh.
    assert [b["active_count"] for b in buckets] == [3, 3, 2]
    assert [b["start_count"] for b in buckets] == [0, 0, 0]


# -- calendar bins in a time zone --------------------------------------------------------------


@pytest.fixture(scope="module")
def berlin(stack: Stack) -> str:
    token = stack.token(stack.new_org("berlin"), "admin")
    stack.ingest(token, [
        # 00:30 CET on the 29th, for an hour.
        Spec(start=at(28, 23, 30), end=at(29, 0, 30)).to_proto(),
        # 23:59 CEST on the 29th, ending exactly when the 30th begins (22:00Z).
        Spec(start=datetime(2026, 3, 29, 21, 59, tzinfo=UTC), end=at(29, 22)).to_proto(),
        # 00:30 CEST on the 30th, still open.
        Spec(start=at(29, 22, 30)).to_proto(),
    ])  # fmt: skip
    return token


def test_day_bins_follow_berlin_dst(stack: Stack, berlin: str) -> None:
    body = get(stack, HISTOGRAM, berlin, field="protocol", **{"bin-size": "day"},
               start="2026-03-28", end="2026-03-31", time_zone="Europe/Berlin")  # fmt: skip
    buckets = body["body"]["buckets"]
    assert [b["id"] for b in buckets] == [
        "2026-03-28T00:00:00.000+01:00",
        "2026-03-29T00:00:00.000+01:00",  # 23 hours long
        "2026-03-30T00:00:00.000+02:00",
    ]
    assert [b["start_count"] for b in buckets] == [0, 2, 1]
    assert [b["active_count"] for b in buckets] == [0, 2, 2]
    assert body["meta"]["time_zone"] == "Europe/Berlin"
    assert body["meta"]["start"] == "2026-03-28T00:00:00.000+01:00"
    assert body["meta"]["end"] == "2026-03-31T00:00:00.000+02:00"
    # The same sessions in UTC days: both 23:30Z and 21:59Z starts fall on other days.
    body = get(stack, HISTOGRAM, berlin, field="protocol", **{"bin-size": "day"},
               start="2026-03-28", end="2026-03-31")  # fmt: skip
    assert [b["start_count"] for b in body["body"]["buckets"]] == [1, 2, 0]
    assert [b["active_count"] for b in body["body"]["buckets"]] == [1, 3, 1]


def test_week_and_month_bins(stack: Stack, berlin: str) -> None:
    body = get(stack, HISTOGRAM, berlin, field="status", **{"bin-size": "week"},
               start="2026-03-25T00:00:00Z", end="2026-04-08T00:00:00Z")  # fmt: skip
    assert [b["id"] for b in body["body"]["buckets"]] == [
        "2026-03-23T00:00:00.000Z",
        "2026-03-30T00:00:00.000Z",
        "2026-04-06T00:00:00.000Z",
    ]
    assert [b["start_count"] for b in body["body"]["buckets"]] == [3, 0, 0]
    assert [b["active_count"] for b in body["body"]["buckets"]] == [3, 1, 1]
    body = get(stack, HISTOGRAM, berlin, field="status", start="2026-02-15", end="2026-04-15")
    assert body["meta"]["bin_size"] == "month"
    assert [b["id"][:10] for b in body["body"]["buckets"]] == [
        "2026-02-01",
        "2026-03-01",
        "2026-04-01",
    ]
    assert [b["start_count"] for b in body["body"]["buckets"]] == [0, 3, 0]


def test_default_range_is_the_month_before_now(stack: Stack, berlin: str) -> None:
    before = datetime.now(UTC)
    meta = get(stack, HISTOGRAM, berlin, field="status")["meta"]
    end = datetime.fromisoformat(meta["end"])
    assert before - timedelta(seconds=1) <= end <= datetime.now(UTC) + timedelta(seconds=1)
    start = datetime.fromisoformat(meta["start"])
    assert timedelta(days=28) <= end - start <= timedelta(days=31)
    assert (start.day, start.hour, start.minute) == (min(end.day, start.day), end.hour, end.minute)


# -- top values, ties, statistics --------------------------------------------------------------


@pytest.fixture(scope="module")
def protocols(stack: Stack) -> tuple[str, str]:
    org = stack.new_org("top")
    token = stack.token(org, "admin")
    day = at(5, 9)
    specs = [
        Spec(start=day, end=day + timedelta(hours=1), subtype="ssh", connection="bastion", email=ANA),
        Spec(start=day + timedelta(hours=2), subtype="ssh", connection="jump", email=BO),
        Spec(start=day + timedelta(hours=1), end=day + timedelta(hours=2), subtype="rdp",
             connection="win", email=ANA),
        Spec(start=day + timedelta(hours=3), end=day + timedelta(days=1, hours=3), subtype="rdp",
             connection="win", email=CY),
        Spec(start=day + timedelta(hours=4), end=day + timedelta(hours=5), subtype="postgres",
             connection="pg-prod", email=ANA),
    ]  # fmt: skip
    stack.ingest(token, [s.to_proto() for s in specs])
    return token, stack.token(org, "user", ANA)


def test_size_keeps_the_top_values_ties_broken_by_value(
    stack: Stack, protocols: tuple[str, str]
) -> None:
    token, _ = protocols
    body = get(stack, HISTOGRAM, token, field="protocol", **{"bin-size": "day"}, size=2,
               start="2026-03-05", end="2026-03-07")  # fmt: skip
    # ssh 2, rdp 2, postgres 1: the two tied values win; rdp before ssh (by value).
    buckets = body["body"]["buckets"]
    assert [[v["value"] for v in b["values"]] for b in buckets] == [["rdp", "ssh"], ["rdp", "ssh"]]
    assert [(b["start_count"], b["active_count"]) for b in buckets] == [(4, 4), (0, 2)]
    assert [[(v["start_count"], v["active_count"]) for v in b["values"]] for b in buckets] == [
        [(2, 2), (2, 2)],
        # Day 2: the rdp session ending on the 6th, and ssh still open.
        [(0, 1), (0, 1)],
    ]
    one = get(stack, HISTOGRAM, token, field="protocol", **{"bin-size": "day"}, size=1,
              start="2026-03-05", end="2026-03-07")  # fmt: skip
    assert [v["value"] for v in one["body"]["buckets"][0]["values"]] == ["rdp"]


def test_stats_counts_percentages_and_sub_field(stack: Stack, protocols: tuple[str, str]) -> None:
    token, ana = protocols
    body = get(stack, STATS, token, field="protocol", sub_fields="connection", size=2,
               start="2026-03-05", end="2026-03-06")  # fmt: skip
    assert body["key"] == "stats"
    assert body["body"] == {
        "total": 5,
        "values": [
            {"value": "rdp", "count": 2, "percent": 40, "sub_other_count": 0,
             "sub_values": [{"value": "win", "count": 2, "percent": 100}]},
            {"value": "ssh", "count": 2, "percent": 40, "sub_other_count": 0,
             "sub_values": [{"value": "bastion", "count": 1, "percent": 50},
                            {"value": "jump", "count": 1, "percent": 50}]},
        ],
        "other_count": 1,
    }  # fmt: skip
    assert body["meta"]["sub_fields"] == "connection" and body["meta"]["size"] == 2
    # A user token counts only their own sessions: ana has ssh, rdp and postgres.
    mine = get(stack, STATS, ana, field="protocol", start="2026-03-05", end="2026-03-06")
    assert mine["body"]["total"] == 3
    assert [(v["value"], v["count"]) for v in mine["body"]["values"]] == [
        ("postgres", 1), ("rdp", 1), ("ssh", 1)
    ]  # fmt: skip
    by_user = get(stack, STATS, token, field="user", size=1, start="2026-03-05", end="2026-03-06")
    assert [(v["value"], v["count"], v["percent"]) for v in by_user["body"]["values"]] == [
        (ANA, 3, 60)
    ]
    assert by_user["body"]["other_count"] == 2


# -- session report ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(stack: Stack) -> dict[str, Any]:
    org = stack.new_org("report")
    token = stack.token(org, "admin")
    a = Spec(
        start=at(2, 10),
        end=at(2, 10, 30),
        email=ANA,
        connection="pg-prod",
        verb="exec",
        redactions=(("EMAIL_ADDRESS", 3, 60), ("PHONE_NUMBER", 2, 20)),
    )
    b = Spec(
        start=at(2, 11),
        end=at(2, 11, 5),
        email=BO,
        connection="pg-prod",
        verb="connect",
        redactions=(("EMAIL_ADDRESS", 1, 10),),
    )
    c = Spec(
        start=at(2, 12),
        end=at(2, 12, 10),
        email=ANA,
        connection="bastion",
        type="custom",
        subtype="ssh",
        verb="connect",
        redactions=(("EMAIL_ADDRESS", 5, 100),),
    )
    # Open: not reported yet.
    d = Spec(start=at(2, 13), email=CY, redactions=(("EMAIL_ADDRESS", 7, 70),))
    # Started on the 1st, ended on the 2nd: reported on the 2nd.
    e = Spec(
        start=at(1, 23),
        end=at(2, 0, 30),
        email="ANA@acme.example",
        redactions=(("IBAN_CODE", 4, 40),),
    )
    # Ended 23:30Z on the 2nd: the 2nd in UTC, the 3rd in Berlin.
    g = Spec(
        start=at(2, 23),
        end=at(2, 23, 30),
        email=BO,
        connection="pg-stg",
        redactions=(("PHONE_NUMBER", 6, 66),),
    )
    specs = [a, b, c, d, e, g]
    stack.ingest(token, [s.to_proto() for s in specs])
    other = stack.token(stack.new_org("report-other"), "admin")
    stack.ingest(other, [Spec(start=at(2, 10), end=at(2, 11),
                              redactions=(("EMAIL_ADDRESS", 100, 1000),)).to_proto()])  # fmt: skip
    return {"token": token, "ana": stack.token(org, "user", ANA), "a": a,
            "ingest": stack.token(org, "ingest"), "auditor": stack.token(org, "auditor")}  # fmt: skip


DAY2 = {"start_date": "2026-03-02", "end_date": "2026-03-03"}


def test_report_by_connection_worked_by_hand(stack: Stack, report: dict[str, Any]) -> None:
    body = get(stack, REPORT, report["token"], **DAY2)
    assert items(body) == [
        ("bastion", "EMAIL_ADDRESS", 5, 100),
        ("pg-prod", "EMAIL_ADDRESS", 3 + 1, 60 + 10),
        ("pg-prod", "IBAN_CODE", 4, 40),
        ("pg-prod", "PHONE_NUMBER", 2, 20),
        ("pg-stg", "PHONE_NUMBER", 6, 66),
    ]
    # Totals are the items' sums: a's 80 bytes count once (60 + 20), not once per info type.
    assert body["total_redact_count"] == 5 + 4 + 4 + 2 + 6
    assert body["total_transformed_bytes"] == 100 + 70 + 40 + 20 + 66
    assert get(stack, REPORT, report["auditor"], **DAY2) == body


def test_report_other_group_bys_and_filters(stack: Stack, report: dict[str, Any]) -> None:
    token, a = report["token"], report["a"]
    assert items(get(stack, REPORT, token, group_by="connection_type", **DAY2)) == [
        ("custom", "EMAIL_ADDRESS", 5, 100),
        ("database", "EMAIL_ADDRESS", 4, 70),
        ("database", "IBAN_CODE", 4, 40),
        ("database", "PHONE_NUMBER", 8, 86),
    ]
    assert items(get(stack, REPORT, token, group_by="user_email", **DAY2)) == [
        (ANA, "EMAIL_ADDRESS", 8, 160),
        (ANA, "IBAN_CODE", 4, 40),  # ANA@… and ana@… are one user
        (ANA, "PHONE_NUMBER", 2, 20),
        (BO, "EMAIL_ADDRESS", 1, 10),
        (BO, "PHONE_NUMBER", 6, 66),
    ]
    assert items(get(stack, REPORT, token, group_by="id", id=a.id.upper(), **DAY2)) == [
        (a.id, "EMAIL_ADDRESS", 3, 60),
        (a.id, "PHONE_NUMBER", 2, 20),
    ]
    assert items(get(stack, REPORT, token, verb="exec", **DAY2)) == [
        ("pg-prod", "EMAIL_ADDRESS", 3, 60),
        ("pg-prod", "IBAN_CODE", 4, 40),
        ("pg-prod", "PHONE_NUMBER", 2, 20),
        ("pg-stg", "PHONE_NUMBER", 6, 66),
    ]
    assert items(get(stack, REPORT, token, connection_name="bastion", **DAY2)) == [
        ("bastion", "EMAIL_ADDRESS", 5, 100)
    ]
    assert items(get(stack, REPORT, token, user_email="Bo@Acme.Example", group_by="user_email",
                     **DAY2)) == [(BO, "EMAIL_ADDRESS", 1, 10), (BO, "PHONE_NUMBER", 6, 66)]  # fmt: skip
    assert items(get(stack, REPORT, token, connection_name="pg-prod", group_by="user_email",
                     **DAY2)) == [(ANA, "EMAIL_ADDRESS", 3, 60), (ANA, "IBAN_CODE", 4, 40),
                                  (ANA, "PHONE_NUMBER", 2, 20), (BO, "EMAIL_ADDRESS", 1, 10)]  # fmt: skip


def test_report_days_in_a_time_zone(stack: Stack, report: dict[str, Any]) -> None:
    # Berlin's 2 March is [1 March 23:00Z, 2 March 23:00Z): g (ended 23:30Z) belongs to the 3rd.
    body = get(stack, REPORT, report["token"], time_zone="Europe/Berlin", **DAY2)
    assert ("pg-stg", "PHONE_NUMBER", 6, 66) not in items(body)
    assert body["total_redact_count"] == 15 and body["total_transformed_bytes"] == 230
    nxt = get(stack, REPORT, report["token"], time_zone="Europe/Berlin",
              start_date="2026-03-03", end_date="2026-03-04")  # fmt: skip
    assert items(nxt) == [("pg-stg", "PHONE_NUMBER", 6, 66)]


def test_report_user_token_sees_own_sessions_only(stack: Stack, report: dict[str, Any]) -> None:
    assert items(get(stack, REPORT, report["ana"], **DAY2)) == [
        ("bastion", "EMAIL_ADDRESS", 5, 100),
        ("pg-prod", "EMAIL_ADDRESS", 3, 60),
        ("pg-prod", "IBAN_CODE", 4, 40),
        ("pg-prod", "PHONE_NUMBER", 2, 20),
    ]
    r = stack.rest("GET", REPORT, report["ingest"], params=DAY2)
    assert r.status_code == 403 and set(r.json()) == {"message"}
    for path in (HISTOGRAM, STATS):
        r = stack.rest("GET", path, report["ingest"], params={"field": "protocol"})
        assert r.status_code == 403
        assert stack.rest("GET", path, None, params={"field": "protocol"}).status_code == 401
    assert stack.rest("GET", REPORT, None, params=DAY2).status_code == 401


def test_report_defaults_and_empty_windows(stack: Stack, report: dict[str, Any]) -> None:
    # Defaults: today → tomorrow (nothing ended today in this org).
    assert get(stack, REPORT, report["token"]) == {
        "items": [],
        "total_redact_count": 0,
        "total_transformed_bytes": 0,
    }
    assert (
        get(stack, REPORT, report["token"], start_date="2026-03-02", end_date="2026-03-02")["items"]
        == []
    )
    # A lone end_date is the day before it; a lone start_date runs to tomorrow.
    day2 = get(stack, REPORT, report["token"], **DAY2)
    assert get(stack, REPORT, report["token"], end_date="2026-03-03") == day2
    assert get(stack, REPORT, report["token"], start_date="2026-03-02") == day2
    # The longest window is 366 days.
    get(stack, REPORT, report["token"], start_date="2024-01-01", end_date="2025-01-01")


BAD_REPORT = [
    (
        {"group_by": "bogus"},
        "group_by: expected one of connection, connection_type, id, user_email",
    ),
    ({"group_by": "CONNECTION"}, "group_by: expected one of"),
    ({"group_by": "connection_name"}, "group_by: expected one of"),
    ({"verb": "EXEC"}, "verb: expected one of exec, connect"),
    ({"verb": "drop"}, "verb: expected one of exec, connect"),
    ({"start_date": "2026-02-30"}, "start_date: not a valid date"),
    ({"start_date": "2026-03-01T00:00:00Z"}, "start_date: expected a date YYYY-MM-DD"),
    ({"end_date": "03/01/2026"}, "end_date: expected a date YYYY-MM-DD"),
    ({"end_date": "' OR 1=1 --"}, "end_date: expected a date YYYY-MM-DD"),
    (
        {"start_date": "2026-03-05", "end_date": "2026-03-04"},
        "start_date: must not be after end_date",
    ),
    (
        {"start_date": "2024-01-01", "end_date": "2025-01-02"},
        "end_date: the window is at most 366 days",
    ),
    ({"id": "not-a-uuid"}, "id: expected a session UUID"),
    ({"id": "'; DROP TABLE sessions; --"}, "id: expected a session UUID"),
    ({"user_email": "x" * 300}, "user_email: expected at most 256 characters"),
    ({"connection_name": "a\x00b"}, "connection_name: must not contain NUL"),
    ({"time_zone": "Mars/Olympus"}, "time_zone: expected an IANA time zone name"),
    ({"time_zone": "+02:00"}, "time_zone: expected an IANA time zone name"),
    ({"nope": "1"}, "nope"),
]


@pytest.mark.parametrize(("params", "message"), BAD_REPORT, ids=lambda x: str(x)[:40])
def test_bad_report_parameter_is_400_naming_it(
    stack: Stack, report: dict[str, Any], params: dict[str, str], message: str
) -> None:
    r = stack.rest("GET", REPORT, report["token"], params=params)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    assert set(r.json()) == {"message"} and message in r.json()["message"]
    assert not [h for h in r.headers if h.lower().startswith("grpc-")]


# -- histogram and stats errors ----------------------------------------------------------------

BAD_HISTOGRAM = [
    ({}, "field: required"),
    ({"field": "nope"}, "field: expected one of protocol, connection"),
    ({"field": "Protocol"}, "field: expected one of"),
    ({"field": "protocol", "bin-size": "fortnight"}, "bin-size: expected one of second, minute"),
    ({"field": "protocol", "bin-size": "DAY"}, "bin-size: expected one of"),
    ({"field": "protocol", "start": "yesterday"}, "start: expected an ISO 8601"),
    ({"field": "protocol", "end": "2026-03-01T25:00"}, "end: "),
    (
        {"field": "protocol", "start": "2026-03-02", "end": "2026-03-01"},
        "start: must not be after end",
    ),
    (
        {"field": "protocol", "start": "2026-03-29T02:30", "time_zone": "Europe/Berlin"},
        "does not exist",
    ),
    ({"field": "protocol", "size": "0"}, "size: expected 1..100"),
    ({"field": "protocol", "size": "101"}, "size: expected 1..100"),
    ({"field": "protocol", "size": "abc"}, "size"),
    ({"field": "protocol", "time_zone": "europe/berlin"}, "time_zone: expected an IANA"),
    ({"field": "protocol", "q": "protocol:ssh AND"}, "q: not a valid search"),
    ({"field": "protocol", "q": "(protocol:ssh"}, "q: not a valid search"),
    ({"field": "protocol", "q": "ssh"}, "q: 'ssh': a term needs a field"),
    ({"field": "protocol", "q": "colour:red"}, "q: 'colour:red': unknown field 'colour'"),
    ({"field": "protocol", "q": "protocol:ssh user:x"}, "write AND or OR between terms"),
    ({"field": "protocol", "q": "protocol:ssh~"}, "fuzzy"),
    ({"field": "protocol", "q": "protocol:/s+h/"}, "regular expressions"),
    ({"field": "protocol", "q": "protocol:ssh^2"}, "boosts"),
    ({"field": "protocol", "q": "+protocol:ssh"}, "+ and -"),
    ({"field": "protocol", "q": "verb:drop"}, "'verb:drop': verb is one of connect, exec"),
    ({"field": "protocol", "q": "protocol:[a TO b]"}, "ranges apply to times and numbers"),
    ({"field": "protocol", "q": "start:2026-03-01"}, "start takes a range"),
    ({"field": "protocol", "q": "start:[2026-13-01 TO *]"}, "q: start: "),
    ({"field": "protocol", "q": "duration:[5 TO 1]"}, "low end is above its high end"),
    ({"field": "protocol", "q": "exit_code:abc"}, "expected a number"),
    ({"field": "protocol", "q": "x" * 2001}, "q: expected at most 2000 characters"),
]


BAD_BY_PATH = [
    (path, params, message)
    for path in (HISTOGRAM, STATS)
    for params, message in BAD_HISTOGRAM
    if path == HISTOGRAM or "bin-size" not in params  # statistics have no bins
]


@pytest.mark.parametrize(("path", "params", "message"), BAD_BY_PATH, ids=lambda x: str(x)[:40])
def test_bad_histogram_and_stats_parameters(
    stack: Stack, three: str, path: str, params: dict[str, str], message: str
) -> None:
    r = stack.rest("GET", path, three, params=params)
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"message"} and message in r.json()["message"], r.json()


@pytest.mark.parametrize("path", [HISTOGRAM, STATS])
@pytest.mark.parametrize(
    "params",
    [{"content": "password"}, {"q": "content:password"}, {"q": "protocol:ssh AND screen.content:x"},
     {"q": "NOT script:*DROP*"}],
)  # fmt: skip
def test_content_search_is_not_supported(
    stack: Stack, three: str, path: str, params: dict[str, str]
) -> None:
    r = stack.rest("GET", path, three, params={"field": "protocol", **params})
    assert r.status_code == 400
    assert r.json()["message"].startswith("NotSupportedContentOption: ")


def test_too_many_buckets_exactly_at_the_limit_succeeds(stack: Stack, three: str) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ok = {
        "field": "protocol",
        "bin-size": "hour",
        "start": start.isoformat().replace("+00:00", "Z"),
    }
    end = start + timedelta(hours=1000)
    body = get(stack, HISTOGRAM, three, **ok, end=end.isoformat().replace("+00:00", "Z"))
    assert len(body["body"]["buckets"]) == 1000
    over = (end + timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
    r = stack.rest("GET", HISTOGRAM, three, params={**ok, "end": over})
    assert r.status_code == 400
    assert r.json()["message"].startswith("TooMuchBucketsInResult: bin-size: ")
    r = stack.rest("GET", HISTOGRAM, three, params={"field": "protocol", "bin-size": "second"})
    assert r.json()["message"].startswith("TooMuchBucketsInResult")


def test_odd_but_valid_parameters(stack: Stack, three: str) -> None:
    for params in (
        {"field": "user", "q": "user:\"' OR '1'='1\""},
        {"field": "connection", "q": "connection:pg\\-prod\\%"},
        {"field": "protocol", "bin_size": "day"},
        {"field": "protocol", "start": "2026-03-02T14:00:00.123456789+05:30"},
        {"field": "protocol", "q": 'start:["2026-03-02T14:00:00+01:00" TO *] AND duration:>=0'},
        {"field": "protocol", "size": "100"},
    ):
        get(stack, HISTOGRAM, three, **params)


def test_grpc_errors_carry_invalid_argument(stack: Stack, three: str) -> None:
    stub = apb_grpc.AnalyticsServiceStub(stack.channel())
    with pytest.raises(grpc.RpcError) as err:
        stub.GetSessionReport(apb.SessionReportRequest(group_by="x"), metadata=auth_md(three))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("group_by: expected one of")
    with pytest.raises(grpc.RpcError) as err:
        stub.GetSessionStats(apb.SessionStatsRequest(field="protocol", sub_fields="verb,status"),
                             metadata=auth_md(three))  # fmt: skip
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("sub_fields: expected one field")
    with pytest.raises(grpc.RpcError) as err:
        stub.GetSessionStats(apb.SessionStatsRequest(field="protocol"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


# -- the published contract -------------------------------------------------------------------


def test_report_responses_match_the_published_contract(
    stack: Stack, report: dict[str, Any]
) -> None:
    from tests.test_contract import _spec, validator

    ok = validator("openapi.SessionReport")
    for group_by in ("connection", "connection_type", "id", "user_email"):
        for extra in ({}, {"verb": "exec"}, {"start_date": "2030-01-01", "end_date": "2030-01-02"}):
            body = get(stack, REPORT, report["token"], group_by=group_by, **{**DAY2, **extra})
            assert [e.message for e in ok.iter_errors(body)] == []
            assert set(body) == {"items", "total_redact_count", "total_transformed_bytes"}
    error = validator("openapi.HTTPError")
    bad = stack.rest("GET", REPORT, report["token"], params={"verb": "x"})
    assert bad.status_code == 400 and [e.message for e in error.iter_errors(bad.json())] == []
    examples = {"start_date": "2026-03-02", "end_date": "2026-03-03", "group_by": "id",
                "verb": "connect", "id": report["a"].id}  # fmt: skip
    parameters = _spec()["paths"]["/reports/sessions"]["get"]["parameters"]
    assert {p["name"] for p in parameters} == {
        "connection_name", "end_date", "group_by", "id", "start_date", "user_email", "verb"
    }  # fmt: skip
    for p in parameters:
        r = stack.rest(
            "GET", REPORT, report["token"], params={p["name"]: examples.get(p["name"], "x")}
        )
        assert r.status_code == 200, (p["name"], r.text)
        assert [e.message for e in ok.iter_errors(r.json())] == []


def test_grpcurl_reaches_the_analytics_service(stack: Stack, report: dict[str, Any]) -> None:
    import json

    from tests.test_contract import grpcurl

    target = stack.grpc_target
    assert "session_audit.v1.AnalyticsService" in grpcurl("-plaintext", target, "list").stdout
    described = grpcurl("-plaintext", target, "describe", "session_audit.v1.AnalyticsService")
    assert "/api/reports/sessions" in described.stdout
    assert "/api/audit/sessions/histogram" in described.stdout
    called = grpcurl(
        "-plaintext", "-H", f"authorization: Bearer {report['token']}",
        "-d", json.dumps({**DAY2, "group_by": "connection_type"}),
        target, "session_audit.v1.AnalyticsService/GetSessionReport",
    )  # fmt: skip
    assert called.returncode == 0, called.stderr
    body = json.loads(called.stdout)
    assert body["total_redact_count"] == 21, body


def test_buckets_carry_values_only_with_size(stack: Stack, three: str) -> None:
    """The histogram document (seeds/003) shows buckets as {active_count, id, start_count}:
    without `size` a bucket has no `values` key (not `values: []`); with it, every bucket has
    its per-value counts."""
    window = {"bin-size": "hour", "start": "2026-03-02T14:00:00Z", "end": "2026-03-02T17:00:00Z"}
    plain = get(stack, HISTOGRAM, three, field="protocol", **window)["body"]["buckets"]
    assert [sorted(b) for b in plain] == [["active_count", "id", "start_count"]] * 3
    sized = get(stack, HISTOGRAM, three, field="protocol", size=1, **window)["body"]["buckets"]
    assert [sorted(b) for b in sized] == [["active_count", "id", "start_count", "values"]] * 3


REST_VS_GRPC = [
    {"field": "protocol", "bin_size": "hour", "start": "2026-03-02T14:00:00Z",
     "end": "2026-03-02T17:00:00Z"},
    {"field": "connection", "bin_size": "hour", "start": "2026-03-02T12:00:00Z",
     "end": "2026-03-02T18:00:00Z", "size": 5},
    {"field": "protocol", "bin_size": "day", "start": "2026-03-01", "end": "2026-03-04",
     "time_zone": "Europe/Berlin", "size": 1, "q": "NOT verb:exec"},
    # Sized, but nothing matches: every bucket has an empty `values`.
    {"field": "protocol", "bin_size": "hour", "start": "2026-03-02T14:00:00Z",
     "end": "2026-03-02T16:00:00Z", "size": 3, "q": "protocol:telnet"},
]  # fmt: skip


@pytest.mark.parametrize("params", REST_VS_GRPC, ids=range(len(REST_VS_GRPC)))
def test_the_rest_histogram_is_the_grpc_answer_as_json(
    stack: Stack, three: str, params: dict[str, Any]
) -> None:
    """REST's answer is rendered by the service (GetSessionHistogramJson), gRPC's is the
    message; the reference is protobuf's own JSON mapping of the gRPC reply with the
    transcoder's print options (proto field names, zero counts printed), minus the empty
    `values` of buckets when there is no `size`."""
    assert_rest_is_grpc_as_json(stack, three, params)


def test_a_large_histogram_built_off_the_loop_is_the_same_answer(stack: Stack) -> None:
    """1,000 hourly bins × 5 top values: over analytics.service.OFF_LOOP_COUNTS, so both
    answers are built in a worker thread."""
    from session_audit.analytics.service import OFF_LOOP_COUNTS

    token = stack.token(stack.new_org("large"), "admin")
    stack.ingest(token, [
        Spec(start=at(1 + k, 3 * k), end=at(2 + k, k), connection=f"c{k}").to_proto()
        for k in range(6)
    ])  # fmt: skip
    params = {"field": "connection", "bin_size": "hour", "size": 5,
              "start": "2026-03-01T00:00:00Z", "end": "2026-04-11T16:00:00Z"}  # fmt: skip
    assert 1000 * (1 + 5) >= OFF_LOOP_COUNTS
    got = assert_rest_is_grpc_as_json(stack, token, params)
    buckets = got["body"]["buckets"]
    assert len(buckets) == 1000 and all(len(b["values"]) == 5 for b in buckets)
    # c0 … c5 started once each; ties are ranked by value, so c5 is not a top value.
    assert [v["value"] for v in buckets[0]["values"]] == ["c0", "c1", "c2", "c3", "c4"]
    assert sum(b["start_count"] for b in buckets) == 5


def assert_rest_is_grpc_as_json(stack: Stack, token: str, params: dict[str, Any]) -> Any:
    from google.protobuf import json_format

    stub = apb_grpc.AnalyticsServiceStub(stack.channel())
    reply = stub.GetSessionHistogram(apb.HistogramRequest(**params), metadata=auth_md(token))
    expected = json_format.MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    if "size" not in params:
        for bucket in expected["body"]["buckets"]:
            assert bucket.pop("values") == []
    rest = {k.replace("bin_size", "bin-size"): v for k, v in params.items()}
    r = stack.rest("GET", HISTOGRAM, token, params=rest)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    got = r.json()
    for answer in (got, expected):
        assert 0 < answer["meta"].pop("remaining_seconds") <= 60
    assert got == expected
    assert list(got) == ["key", "body", "meta"]
    return got


def test_a_q_pinned_to_one_user_id_counts_ends_of_long_sessions(stack: Stack) -> None:
    """`q=user_id:…` (or correlation_id) reads the key's own index, bounded by start: a
    session ending in a bin either started at most a day before it, or is one of the few long
    ones read apart (store.PINNED). E and A end long after they started; D is another user's."""
    token = stack.token(stack.new_org("pinned"), "admin")

    def nine(start: datetime, end: datetime | None, subtype: str = "ssh") -> Any:
        return Spec(start=start, end=end, subtype=subtype, user_id="sub-9",
                    correlation_id="corr-9").to_proto()  # fmt: skip

    stack.ingest(token, [
        nine(at(10, 10), at(12, 12)),  # A, 50 h
        nine(at(11, 23), at(12, 1)),  # B
        nine(at(12, 5), None, "rdp"),  # C, still open
        Spec(start=at(12, 2), end=at(12, 3), subtype="ssh", user_id="sub-8",
             correlation_id="corr-8").to_proto(),  # D
        nine(at(1, 0), at(13, 6)),  # E, 12 days
    ])  # fmt: skip
    window = {"bin-size": "day", "start": "2026-03-11T00:00:00Z", "end": "2026-03-15T00:00:00Z"}

    def buckets(q: str) -> list[tuple[int, int]]:
        body = get(stack, HISTOGRAM, token, field="protocol", q=q, **window)
        return [(b["start_count"], b["active_count"]) for b in body["body"]["buckets"]]

    # Open at 11 Mar 00:00: A, E. Started: B (11th), C (12th). Ended: A, B (12th), E (13th).
    # Active = open at start + started by the bin's end - ended before its start:
    # 11th 2+1-0, 12th 2+2-0, 13th 2+2-2, 14th 2+2-3.
    expected = [(1, 3), (1, 4), (0, 2), (0, 1)]
    assert buckets("user_id:sub-9") == expected
    assert buckets("correlation_id:corr-9") == expected
    assert buckets("user_id:(sub-9 OR sub-7)") == expected
    # Only ssh (A, B, E): 11th 2+1-0, 12th 2+1-0, 13th 2+1-2, 14th 2+1-3.
    assert buckets("user_id:sub-9 AND protocol:ssh") == [(1, 3), (0, 3), (0, 1), (0, 0)]


# The two ssh sessions of `three` lasted 6,000 s (14:30-16:10) and 900 s (16:05-16:20); the rdp
# one is open (no duration). Thresholds at the ends of what `q` accepts (|x| <= 2^53) and a
# microsecond either side of a duration.
EXTREME_DURATIONS = [
    ('duration:>"-9007199254740992"', 2),  # a negative number is quoted (Lucene's "-")
    ("duration:>=9007199254740992", 0),
    ("duration:<9007199254740992", 2),
    ("duration:[0.000001 TO *]", 2),
    ("duration:6000", 1),
    ("duration:{5999.999999 TO 6000.000001}", 1),
    ("duration:{6000 TO 6000.000001}", 0),
    ("duration:>899.999999 AND duration:<900.000001", 1),
    ("NOT duration:>=9007199254740992", 3),  # the open session has no duration: NOT matches it
]


@pytest.mark.parametrize(("q", "started"), EXTREME_DURATIONS)
def test_duration_thresholds_at_the_extremes_and_the_microsecond(
    stack: Stack, three: str, q: str, started: int
) -> None:
    """Counted by hand; the base table compares `end - start` in whole microseconds
    (q.span_bound), the rollup by buckets: both must agree with the seconds."""
    window = {"start": "2026-03-02T14:00:00Z", "end": "2026-03-02T17:00:00Z"}
    body = get(stack, HISTOGRAM, three, field="protocol", q=q, **{"bin-size": "hour"}, **window)
    assert sum(b["start_count"] for b in body["body"]["buckets"]) == started
    stats = get(stack, STATS, three, field="protocol", q=q, **window)
    assert stats["body"]["total"] == started, stats


# -- REST answers the service renders: byte for byte what the transcoder prints ----------------

# Text and numbers the transcoder prints its own way: protobuf's JSON writer escapes `<`, `>`,
# DEL, C1 controls and invisible characters (JSON requires none of that), and prints a double
# with %.15g, or %.17g when that does not read back.
ODD_NAME = 'a<b>&"q"\\ \t\x01\x7f\x85\xad\u2028\u202e\ufeff é 漢 \U0001d173 \U000e0041'
ODD_BYTES = (2**53 - 1, 10**15, 1234567890123456, 123456789012345, 0)
# As protobuf prints them, worked out by hand from that rule: 2^53 - 1 and 1234567890123456
# have 16 digits (%.15g rounds them, so %.17g), 10^15 is 1e+15 under %.15g; the total,
# 11365223933876792 (a double exactly: even, under 2^54), has 17 digits.
ODD_BYTES_TEXT = (b"9007199254740991", b"1e+15", b"1234567890123456", b"123456789012345", b"0")
ODD_TOTAL_TEXT = b"11365223933876792"


@pytest.fixture(scope="module")
def odd(stack: Stack) -> tuple[str, str]:
    token = stack.token(stack.new_org("odd"), "admin")
    spec = Spec(start=at(3, 10), end=at(3, 11), connection=ODD_NAME,
                redactions=tuple((f"T{k}", 1, b) for k, b in enumerate(ODD_BYTES)))  # fmt: skip
    assert not stack.ingest(token, [spec.to_proto()]).rejections
    return token, spec.id


def test_service_rendered_json_is_what_the_transcoder_prints(
    stack: Stack, odd: tuple[str, str]
) -> None:
    """GetSession is transcoded by Envoy: its raw body is the reference for how a string and a
    double print. The report and the histogram, rendered by the service (…Json RPCs), print
    the same name and numbers with the same bytes, and parse to the gRPC answers."""
    from session_audit.analytics.rows import proto_double, proto_json

    token, session_id = odd
    name = proto_json({"connection": ODD_NAME})[1:-1]  # "connection":"…"
    assert b"\\u003c" in name and b"\\u2028" in name and b"\\udb40\\udc41" in name
    envoy = stack.rest("GET", f"/api/sessions/{session_id}", token)
    assert envoy.status_code == 200, envoy.text
    assert name in envoy.content
    for size, text in zip(ODD_BYTES, ODD_BYTES_TEXT, strict=True):
        assert orjson.dumps(proto_double(float(size))) == text
        assert b'"transformed_bytes":' + text in envoy.content

    window = {"start_date": "2026-03-03", "end_date": "2026-03-04", "group_by": "connection"}
    report = stack.rest("GET", REPORT, token, params=window)
    assert report.status_code == 200, report.text
    assert report.headers["content-type"] == "application/json"
    resource = name.replace(b'"connection":', b'"resource":')
    assert report.content.count(resource) == len(ODD_BYTES)
    for text in ODD_BYTES_TEXT:
        assert b'"transformed_bytes":' + text in report.content
    assert b'"total_transformed_bytes":' + ODD_TOTAL_TEXT + b"}" in report.content
    stub = apb_grpc.AnalyticsServiceStub(stack.channel())
    reply = stub.GetSessionReport(apb.SessionReportRequest(**window), metadata=auth_md(token))
    assert report.json() == json_format.MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )

    histogram = stack.rest("GET", HISTOGRAM, token, params={
        "field": "connection", "bin-size": "day", "size": 1,
        "start": "2026-03-03T00:00:00Z", "end": "2026-03-04T00:00:00Z",
    })  # fmt: skip
    assert histogram.status_code == 200, histogram.text
    assert name.replace(b'"connection":', b'"value":') in histogram.content


REPORTS_REST_VS_GRPC = [
    {"start_date": "2026-03-01", "end_date": "2026-03-05", "group_by": group}
    for group in ("connection", "connection_type", "user_email", "id")
] + [
    # Nothing in the window: `items` is printed empty, the totals as 0.
    {"start_date": "2025-03-01", "end_date": "2025-03-05", "group_by": "connection"},
]


@pytest.mark.parametrize("params", REPORTS_REST_VS_GRPC, ids=range(len(REPORTS_REST_VS_GRPC)))
def test_the_rest_report_is_the_grpc_answer_as_json(
    stack: Stack, odd: tuple[str, str], params: dict[str, Any]
) -> None:
    token, _ = odd
    stub = apb_grpc.AnalyticsServiceStub(stack.channel())
    reply = stub.GetSessionReport(apb.SessionReportRequest(**params), metadata=auth_md(token))
    expected = json_format.MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    r = stack.rest("GET", REPORT, token, params=params)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got == expected
    assert list(got) == ["items", "total_redact_count", "total_transformed_bytes"]
    if params["start_date"].startswith("2025"):
        assert r.content == b'{"items":[],"total_redact_count":0,"total_transformed_bytes":0}'
    else:
        assert len(got["items"]) == len(ODD_BYTES)


def test_a_large_report_built_off_the_loop_is_the_same_answer(stack: Stack) -> None:
    """5,000 sessions with group_by=id: 5,000 items, over analytics.service.OFF_LOOP_COUNTS,
    so both answers are rendered in a worker thread. Sums by hand: session k redacted k + 1
    items of one info type and 10 bytes each."""
    from session_audit.analytics.service import OFF_LOOP_COUNTS

    n = 5_000
    assert n >= OFF_LOOP_COUNTS
    token = stack.token(stack.new_org("large-report"), "admin")
    specs = [Spec(start=at(4, 1), end=at(4, 2), redactions=(("EMAIL", k + 1, 10),))
             for k in range(n)]  # fmt: skip
    for chunk in range(0, n, 1000):
        assert not stack.ingest(
            token, [s.to_proto() for s in specs[chunk : chunk + 1000]]
        ).rejections
    params = {"start_date": "2026-03-04", "end_date": "2026-03-05", "group_by": "id"}
    r = stack.rest("GET", REPORT, token, params=params)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["items"]) == n
    assert body["total_redact_count"] == n * (n + 1) // 2
    assert body["total_transformed_bytes"] == 10 * n
    assert [i["resource"] for i in body["items"]] == sorted(s.id for s in specs)
    stub = apb_grpc.AnalyticsServiceStub(stack.channel())
    reply = stub.GetSessionReport(apb.SessionReportRequest(**params), metadata=auth_md(token))
    assert body == json_format.MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
