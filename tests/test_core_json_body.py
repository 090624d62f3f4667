"""The strict reader of REST ingest bodies agrees with protobuf's own JSON mapping on every
well-formed body, and refuses what the mapping (or the transcoder) would drop or reject,
naming the place."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from google.protobuf import json_format

from session_audit.core.errors import InvalidArgument
from session_audit.core.json_body import parse_strict
from session_audit.seed import demo_sessions
from session_audit.v1 import sessions_pb2 as pb


@pytest.mark.parametrize("proto_names", [True, False], ids=["proto names", "lowerCamel names"])
def test_demo_sessions_read_as_protobuf_reads_them(proto_names: bool) -> None:
    sessions = list(demo_sessions(random.Random(7), "org", 400, datetime.now(UTC), 90))
    body = orjson.dumps(
        {"sessions": [json_format.MessageToDict(s, preserving_proto_field_name=proto_names)
                      for s in sessions]}
    )  # fmt: skip
    reference = json_format.Parse(body, pb.IngestSessionsRequest())
    assert parse_strict(body, pb.IngestSessionsRequest) == reference
    assert list(reference.sessions) == sessions  # the fixture survives the round trip at all


@pytest.mark.parametrize(
    "value",
    ["2026-01-01T10:00:00Z", "2026-01-01T10:00:00.5+02:00", "2026-01-01T10:00:00.123456789-05:30",
     "1969-12-31T23:59:59.999999Z", "2024-02-29T23:59:59Z"],
)  # fmt: skip
def test_times_with_offsets_and_fractions(value: str) -> None:
    body = orjson.dumps({"sessions": [{"start_date": value, "review": {"created_at": value}}]})
    got = parse_strict(body, pb.IngestSessionsRequest)
    assert got == json_format.Parse(body, pb.IngestSessionsRequest())


def test_numbers_as_strings_enum_numbers_and_nulls_follow_the_json_mapping() -> None:
    item: dict[str, Any] = {"exit_code": "-3", "event_size": "NaN", "script_size": 12,
                            "verb": 2, "status": None, "labels": {"a": "b"}, "connection": None}  # fmt: skip
    body = orjson.dumps({"sessions": [item]})
    got = parse_strict(body, pb.IngestSessionsRequest).sessions[0]
    reference = json_format.Parse(body, pb.IngestSessionsRequest()).sessions[0]
    assert math.isnan(got.event_size) and math.isnan(reference.event_size)
    got.ClearField("event_size")
    reference.ClearField("event_size")  # NaN != NaN; the rest must be equal
    assert got == reference
    assert (got.exit_code, got.verb, got.script_size, got.HasField("status")) == (-3, 2, 12, False)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"end_dat": "x"}, "sessions[0].end_dat: unknown field; expected one of ai_analysis,"),
        ({"review": {"statsu": "x"}}, "sessions[0].review.statsu: unknown field"),
        (
            {"review": {"review_groups_data": [{}, {"grp": 1}]}},
            "sessions[0].review.review_groups_data[1].grp: unknown field",
        ),
        ({"status": "OPEN"}, "sessions[0].status: expected one of open, ready, done, got 'OPEN'"),
        ({"verb": True}, "sessions[0].verb: expected one of connect, exec, got true"),
        ({"exit_code": 1.5}, "sessions[0].exit_code: expected an integer, got 1.5"),
        ({"exit_code": 2**31}, "sessions[0].exit_code: expected an integer from -2147483648 to"),
        ({"exit_code": True}, "sessions[0].exit_code: expected an integer, got true"),
        ({"event_size": "big"}, "sessions[0].event_size: expected a number, got 'big'"),
        ({"connection": 5}, "sessions[0].connection: expected a string, got 5"),
        ({"labels": ["a"]}, 'sessions[0].labels: expected an object, got ["a"]'),
        ({"labels": {"team": {"x": 1}}}, "sessions[0].labels.team: expected a string"),
        ({"metadata": "text"}, "sessions[0].metadata: expected an object, got 'text'"),
        ({"event_stream": {"a": 1}}, "sessions[0].event_stream: expected a list"),
        ({"redactions": {"info_type": "EMAIL"}}, "sessions[0].redactions: expected a list"),
        ({"start_date": "2026-01-01"}, "sessions[0].start_date: expected an RFC 3339 time"),
        ({"start_date": "2026-01-01T10:00:00"}, "sessions[0].start_date: expected an RFC 3339"),
        ({"start_date": "2026-02-30T10:00:00Z"}, "sessions[0].start_date: expected an RFC 3339"),
        ({"start_date": 1767254400}, "sessions[0].start_date: expected an RFC 3339 time"),
        ({"script": "select 1"}, "sessions[0].script: expected an object, got 'select 1'"),
    ],
)
def test_refusals_name_the_place_and_the_expectation(item: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_strict(orjson.dumps({"sessions": [item]}), pb.IngestSessionsRequest)
    assert err.value.message.startswith(message), err.value.message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "body: expected a JSON object matching the request;"),
        (b"{", "body: expected a JSON object matching the request;"),
        (b"[1]", "body: expected a JSON object matching the request, got [1]"),
        (b'{"sessions": 5}', "sessions: expected a list, got 5"),
        (b'{"sessions": [], "extra": 1}', "extra: unknown field; expected one of sessions"),
        (b'{"' + b"k" * 500 + b'": 1}', "k" * 200 + "…: unknown field"),
    ],
)
def test_bodies_that_are_not_the_request(body: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_strict(body, pb.IngestSessionsRequest)
    assert err.value.message.startswith(message), err.value.message
