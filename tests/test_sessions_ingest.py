"""Ingest over REST and gRPC: upsert by id, idempotency, partly-bad batches, limits."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from session_audit.v1 import sessions_pb2 as pb
from tests.factories import T0, Spec, minutes
from tests.support import Stack, auth_md


@pytest.fixture()
def org_admin(stack: Stack) -> tuple[str, str]:
    org = stack.new_org("ing")
    return org, stack.token(org, "admin")


def rest_ingest(stack: Stack, token: str, sessions: list[dict[str, Any]]) -> dict[str, Any]:
    r = stack.rest("POST", "/api/sessions/ingest", token, json={"sessions": sessions})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_open_then_closed_report_updates_one_row(stack: Stack, org_admin: tuple[str, str]) -> None:
    _, token = org_admin
    sid = str(uuid.uuid4())
    opened = {"id": sid, "start_date": "2026-02-01T10:00:00Z", "connection": "pg", "verb": "exec",
              "user": "ana@x.example", "script": {"data": "SELECT 1"}}  # fmt: skip
    first = rest_ingest(stack, token, [opened])
    assert (first["accepted"], first["written"], first["unchanged"]) == (1, 1, 0)
    got = stack.rest("GET", f"/api/sessions/{sid}", token).json()
    assert got["status"] == "open" and "end_date" not in got

    closed = {"id": sid, "start_date": "2026-02-01T10:00:00Z", "end_date": "2026-02-01T10:05:00Z",
              "exit_code": 0, "metrics": {"event_size": 10},
              "redactions": [{"info_type": "EMAIL_ADDRESS", "count": 2, "transformed_bytes": 30}]}  # fmt: skip
    second = rest_ingest(stack, token, [closed])
    assert (second["written"], second["unchanged"]) == (1, 0)
    got = stack.rest("GET", f"/api/sessions/{sid}", token).json()
    assert got["status"] == "done"
    assert got["end_date"] == "2026-02-01T10:05:00Z"
    assert got["exit_code"] == 0
    # Fields the closing report did not send are kept.
    assert got["connection"] == "pg" and got["script"] == {"data": "SELECT 1"}
    assert got["redactions"] == [
        {"info_type": "EMAIL_ADDRESS", "count": 2, "transformed_bytes": 30}
    ]
    # A late "open" report cannot reopen it.
    rest_ingest(stack, token, [opened])
    assert stack.rest("GET", f"/api/sessions/{sid}", token).json()["status"] == "done"


def test_resending_a_batch_changes_nothing(stack: Stack, org_admin: tuple[str, str]) -> None:
    _, token = org_admin
    batch = [Spec(start=T0 + minutes(i), end=T0 + minutes(i + 1)).to_proto() for i in range(20)]
    first = stack.ingest(token, batch)
    assert (first.written, first.unchanged) == (20, 0)
    ids = [s.id for s in batch]
    before = stack.sql(
        "SELECT id, updated_at, xmin::text AS x FROM sessions WHERE id = any($1::uuid[]) ORDER BY id",
        ids,
    )
    again = stack.ingest(token, batch)
    assert (again.accepted, again.written, again.unchanged) == (20, 0, 20)
    after = stack.sql(
        "SELECT id, updated_at, xmin::text AS x FROM sessions WHERE id = any($1::uuid[]) ORDER BY id",
        ids,
    )
    assert [tuple(r) for r in before] == [tuple(r) for r in after]


def test_partly_bad_batch_stores_the_valid_items(stack: Stack, org_admin: tuple[str, str]) -> None:
    _, token = org_admin
    good = [str(uuid.uuid4()) for _ in range(3)]
    items: list[dict[str, Any]] = [
        {"id": good[0], "start_date": "2026-02-01T10:00:00Z"},
        {"id": "not-a-uuid", "start_date": "2026-02-01T10:00:00Z"},
        {"id": good[1], "start_date": "2026-02-01T11:00:00Z"},
        {"id": str(uuid.uuid4())},
        {"id": str(uuid.uuid4()), "start_date": "2026-02-01T10:00:00Z",
         "end_date": "2026-02-01T09:00:00Z"},
        {"id": str(uuid.uuid4()), "start_date": "2026-02-01T10:00:00Z",
         "redactions": [{"info_type": "bad type!", "count": 1}]},
        {"id": str(uuid.uuid4()), "start_date": "2026-02-01T10:00:00Z", "status": "done"},
        {"id": str(uuid.uuid4()), "start_date": "2099-01-01T00:00:00Z"},
        {"id": str(uuid.uuid4()), "start_date": "2026-02-01T10:00:00Z", "connection": "a\u0000b"},
        {"id": str(uuid.uuid4()), "start_date": "2026-02-01T10:00:00Z", "event_size": -1},
        {"id": str(uuid.uuid4()), "start_date": "2026-02-01T10:00:00Z", "connection": "x" * 300},
        {"id": str(uuid.uuid4()), "start_date": "2026-02-01T10:00:00Z",
         "metadata": {"k": "nul\u0000"}},
        {"id": good[2], "start_date": "2026-02-01T12:00:00Z", "connection": "'; DROP TABLE x;--"},
    ]  # fmt: skip
    body = rest_ingest(stack, token, items)
    assert (body["accepted"], body["written"], body["rejected"]) == (3, 3, 10)
    reasons = {r["index"]: r["reason"] for r in body["rejections"]}
    assert sorted(reasons) == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    expected_prefix = {1: "id:", 3: "start_date:", 4: "end_date:", 5: "redactions[0].info_type:",
                       6: "end_date:", 7: "start_date:", 8: "connection:", 9: "event_size:",
                       10: "connection:", 11: "metadata:"}  # fmt: skip
    for index, prefix in expected_prefix.items():
        assert reasons[index].startswith(prefix), (index, reasons[index])
    stored = stack.sql("SELECT id::text, connection FROM sessions WHERE id = any($1::uuid[])", good)
    assert {r["id"] for r in stored} == set(good)
    assert "'; DROP TABLE x;--" in {r["connection"] for r in stored}


def test_batch_limits(stack: Stack, org_admin: tuple[str, str]) -> None:
    _, token = org_admin
    r = stack.rest("POST", "/api/sessions/ingest", token, json={"sessions": []})
    assert r.status_code == 400 and r.json()["message"].startswith("sessions:")
    too_many = [{"id": str(uuid.uuid4()), "start_date": "2026-02-01T10:00:00Z"}] * 1001
    r = stack.rest("POST", "/api/sessions/ingest", token, json={"sessions": too_many})
    assert r.status_code == 400 and "at most 1000" in r.json()["message"]
    r = stack.rest(
        "POST", "/api/sessions/ingest", token, content=b"not json",
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert r.status_code == 400 and r.json()["message"].startswith("body:")
    r = stack.rest("POST", "/api/sessions/ingest", token, json={"sessions": [{"status": "weird"}]})
    assert r.status_code == 400 and "status" in r.json()["message"]
    r = stack.rest("POST", "/api/sessions/ingest", token, json={"sessions": [{"event_size": "x"}]})
    assert r.status_code == 400 and "event_size" in r.json()["message"]
    huge = b'{"sessions":[{"script":{"data":"' + b"a" * (9 * 1024 * 1024) + b'"}}]}'
    r = stack.rest(
        "POST", "/api/sessions/ingest", token, content=huge,
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert r.status_code == 413 and set(r.json()) == {"message"}


def test_grpc_message_over_the_limit_is_resource_exhausted(
    stack: Stack, org_admin: tuple[str, str]
) -> None:
    _, token = org_admin
    big = Spec(script="a" * (17 * 1024 * 1024)).to_proto()
    with pytest.raises(grpc.RpcError) as err:
        stack.stub().IngestSessions(
            pb.IngestSessionsRequest(sessions=[big]), metadata=auth_md(token)
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_same_id_twice_in_a_batch_merges_in_order(stack: Stack, org_admin: tuple[str, str]) -> None:
    _, token = org_admin
    sid = str(uuid.uuid4())
    body = rest_ingest(stack, token, [
        {"id": sid, "start_date": "2026-02-01T10:00:00Z", "connection": "pg"},
        {"id": sid, "start_date": "2026-02-01T10:00:00Z", "end_date": "2026-02-01T10:01:00Z"},
    ])  # fmt: skip
    # Per item, as two separate reports would: both changed the session.
    assert (body["accepted"], body["written"], body["unchanged"]) == (2, 2, 0)
    got = stack.rest("GET", f"/api/sessions/{sid}", token).json()
    assert (got["connection"], got["status"]) == ("pg", "done")


def _chunks(specs: list[Spec], size: int) -> Iterator[pb.IngestSessionsRequest]:
    for i in range(0, len(specs), size):
        yield pb.IngestSessionsRequest(sessions=[s.to_proto() for s in specs[i : i + size]])


def test_stream_ingest_commits_whole_chunks(stack: Stack, org_admin: tuple[str, str]) -> None:
    _, token = org_admin
    base = datetime(2026, 1, 1, tzinfo=UTC)
    specs = [Spec(start=base + timedelta(seconds=i)) for i in range(12_000)]
    specs[7000].id = "broken"
    reply = stack.stub().StreamIngestSessions(_chunks(specs, 1000), metadata=auth_md(token))
    assert (reply.accepted, reply.written, reply.rejected) == (11_999, 11_999, 1)
    assert reply.rejections[0].index == 7000
    total = stack.rest("GET", "/api/sessions", token, params={"count": "exact", "limit": 1})
    assert total.json()["total"] == 11_999
    capped = stack.rest("GET", "/api/sessions", token, params={"limit": 1}).json()
    assert (capped["total"], capped["total_is_capped"]) == (10_000, True)

    # A stream the client abandons within its first chunk (5,000 items, one transaction)
    # stores nothing.
    fresh = [Spec(start=base + timedelta(seconds=i)) for i in range(3000)]

    def abandoned() -> Iterator[pb.IngestSessionsRequest]:
        yield from _chunks(fresh[:2000], 1000)
        raise RuntimeError("client gives up")

    with pytest.raises(grpc.RpcError):
        stack.stub().StreamIngestSessions(abandoned(), metadata=auth_md(token))
    ids = [s.id for s in fresh[:2000]]
    assert (
        stack.sql("SELECT count(*) AS n FROM sessions WHERE id = any($1::uuid[])", ids)[0]["n"] == 0
    )


def test_a_stream_ending_on_a_full_chunk_is_stored_before_the_reply(
    stack: Stack, org_admin: tuple[str, str]
) -> None:
    """Exactly 10,000 items: both chunks commit as they fill, without waiting for the disk
    (more may follow), so the reply waits for a WAL flush of its own; every session is there
    when it arrives, with its rollups (the report counts them)."""
    _, token = org_admin
    base = datetime(2026, 3, 1, tzinfo=UTC)
    specs = [Spec(start=base + timedelta(seconds=i), end=base + timedelta(seconds=i + 60))
             for i in range(10_000)]  # fmt: skip
    reply = stack.stub().StreamIngestSessions(_chunks(specs, 1000), metadata=auth_md(token))
    assert (reply.accepted, reply.written, reply.rejected) == (10_000, 10_000, 0)
    stored = stack.sql("SELECT count(*) FROM sessions WHERE id = any($1::uuid[])",
                       [s.id for s in specs])[0][0]  # fmt: skip
    assert stored == 10_000
    starts = stack.sql(
        "SELECT sum(starts) FROM rollup_sessions_total r JOIN orgs o ON o.id = r.org_id"
        " WHERE o.name = $1 AND r.grain = 1",
        org_admin[0],
    )[0][0]
    assert starts == 10_000


def test_unrepresentable_values_reject_the_item_not_the_batch(
    stack: Stack, org_admin: tuple[str, str]
) -> None:
    """JSON has no NaN or Infinity, PostgreSQL no year 10000, the contract no enum number 99; a
    gRPC client can still send them (in a Struct, a double, a Timestamp, an open enum). Such an
    item is rejected naming the field, and the rest of the batch is stored."""
    _, token = org_admin
    good = Spec(start=T0).to_proto()
    in_metrics = Spec(start=T0).to_proto()
    in_metrics.metrics.update({"data_masking": {"ratio": float("nan")}})
    in_review = Spec(start=T0, review_status="APPROVED").to_proto()
    in_review.review.access_duration = float("inf")
    in_list = Spec(start=T0).to_proto()
    in_list.metadata.update({"samples": [1, float("-inf")]})
    far_start = Spec(start=T0).to_proto()
    far_start.start_date.seconds = 10**13
    bad_nanos = Spec(start=T0, end=T0 + minutes(1)).to_proto()
    bad_nanos.end_date.nanos = -1
    nested_time = Spec(start=T0, review_status="APPROVED").to_proto()
    nested_time.review.created_at.seconds = -(10**13)
    odd_verb = Spec(start=T0).to_proto()
    odd_verb.verb = 99  # type: ignore[assignment]  # proto3 enums are open on the wire
    odd_review = Spec(start=T0, review_status="APPROVED").to_proto()
    odd_review.review.type = 42  # type: ignore[assignment]
    batch = [good, in_metrics, in_review, in_list, far_start, bad_nanos, nested_time, odd_verb,
             odd_review]  # fmt: skip
    reply = stack.ingest(token, batch)
    assert (reply.accepted, reply.written, reply.rejected) == (1, 1, 8)
    reasons = {r.index: r.reason for r in reply.rejections}
    assert reasons[1].startswith("metrics.data_masking.ratio: expected a finite number")
    assert reasons[2].startswith("review.access_duration: expected a finite number")
    assert reasons[3].startswith("metadata.samples[1]: expected a finite number")
    assert reasons[4].startswith("start_date: expected a time from 0001-01-02T00:00:00Z to 9999")
    assert reasons[5].startswith("end_date: expected a time from")
    assert reasons[6].startswith("review.created_at: expected a time from")
    assert reasons[7] == "verb: expected one of connect, exec, got 99"
    assert reasons[8] == "review.type: expected one of onetime, jit"
    assert stack.rest("GET", f"/api/sessions/{good.id}", token).status_code == 200
    for rejected in batch[1:]:
        assert stack.rest("GET", f"/api/sessions/{rejected.id}", token).status_code == 404


def test_rest_ingest_refuses_fields_the_contract_does_not_have(
    stack: Stack, org_admin: tuple[str, str]
) -> None:
    """Envoy's transcoder drops unknown body fields; on ingest that would store a misspelt
    `end_dat` as a still-open session and answer 200. The REST body is parsed strictly: an
    unknown field anywhere is a 400 naming its path and what is allowed there, and nothing of
    the request is stored (the caller fixes it and re-sends; ingest is idempotent)."""
    _, token = org_admin
    sid = str(uuid.uuid4())
    ok = {"id": sid, "start_date": "2026-02-01T10:00:00Z"}
    closed = {**ok, "id": str(uuid.uuid4())}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"sessions": [ok, {**closed, "end_dat": "2026-02-01T11:00:00Z"}]},
         "sessions[1].end_dat: unknown field; expected one of ai_analysis, connection,"),
        ({"sessions": [ok], "dry_run": True}, "dry_run: unknown field; expected one of sessions"),
        ({"session": [ok]}, "session: unknown field; expected one of sessions"),
        ({"sessions": [{**ok, "review": {"status": "APPROVED", "statsu": "REJECTED"}}]},
         "sessions[0].review.statsu: unknown field; expected one of access_duration,"),
        ({"sessions": [{**ok, "redactions": [{"info_type": "EMAIL_ADDRESS", "bytes": 3}]}]},
         "sessions[0].redactions[0].bytes: unknown field; expected one of count, info_type,"
         " transformed_bytes"),
        ({"sessions": [{**ok, "script": {"data": "select 1", "lang": "sql"}}]},
         "sessions[0].script.lang: unknown field; expected one of data"),
        ({"sessions": [{**ok, "Connection": "pg"}]}, "sessions[0].Connection: unknown field"),
    ]  # fmt: skip
    for body, prefix in cases:
        r = stack.rest("POST", "/api/sessions/ingest", token, json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["message"].startswith(prefix), (prefix, r.json())
    for stored_id in (sid, closed["id"]):
        assert stack.rest("GET", f"/api/sessions/{stored_id}", token).status_code == 404

    # Free-form objects keep whatever keys they carry; proto3's lowerCamel names are accepted
    # beside the document's names, as the JSON mapping says; a wrong JSON type names the field.
    free = {**ok, "metadata": {"any key": {"nested": [1, "two"]}}, "connectionSubtype": "postgres",
            "labels": {"team": "db"}, "metrics": {"data_masking": {"k": 1}}}  # fmt: skip
    reply = rest_ingest(stack, token, [free])
    assert (reply["accepted"], reply["written"]) == (1, 1)
    got = stack.rest("GET", f"/api/sessions/{sid}", token).json()
    assert got["metadata"] == {"any key": {"nested": [1, "two"]}}
    assert (got["connection_subtype"], got["labels"]) == ("postgres", {"team": "db"})
    r = stack.rest(
        "POST", "/api/sessions/ingest", token, json={"sessions": [{**ok, "exit_code": "zero"}]}
    )
    assert r.status_code == 400 and r.json()["message"].startswith("sessions[0].exit_code:")
    for not_an_object in (b"[]", b'"sessions"', b"null"):
        r = stack.rest(
            "POST", "/api/sessions/ingest", token, content=not_an_object,
            headers={"content-type": "application/json"},
        )  # fmt: skip
        assert r.status_code == 400 and r.json()["message"].startswith("body: expected a JSON")
