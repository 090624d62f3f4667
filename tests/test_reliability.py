"""Concurrency and faults (issue 11), against the real server, Envoy and PostgreSQL.

Each test names the finding it guards. Long runs (60 s of concurrent clients, kill -9, a
frozen PostgreSQL under load) are in tests/soak/ (`make soak`)."""

from __future__ import annotations

import functools
import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from session_audit.analytics import rollups
from session_audit.core import db
from session_audit.core.errors import status_for
from session_audit.v1 import sessions_pb2 as pb
from tests.factories import T0, Spec
from tests.report_reference import ok, wait_report
from tests.support import Stack, auth_md, run
from tests.test_analytics_properties import snapshot


@pytest.fixture()
def org_admin(stack: Stack) -> tuple[str, str]:
    org = stack.new_org("rel")
    return org, stack.token(org, "admin")


def _rest_ingest(stack: Stack, token: str, sessions: list[dict[str, Any]]) -> dict[str, Any]:
    return ok(stack.rest("POST", "/api/sessions/ingest", token, json={"sessions": sessions}))


def _stored(stack: Stack, ids: list[str]) -> dict[str, Any]:
    rows = stack.sql(
        "SELECT id::text, start_date, end_date, status FROM sessions WHERE id = any($1::uuid[])",
        ids,
    )
    return {r["id"]: r for r in rows}


# -- finding 1: overlapping batches in opposite orders --------------------------------------


def test_overlapping_streams_in_opposite_order_neither_deadlock_nor_fail(
    stack: Stack, org_admin: tuple[str, str]
) -> None:
    """Two streams carrying the same 2,000 new ids in opposite orders, started together, five
    times: both succeed every time (one writes, the other finds them written)."""
    _, token = org_admin
    for _trial in range(5):
        specs = [Spec(start=T0 + timedelta(seconds=i)) for i in range(2000)]
        msgs = [s.to_proto() for s in specs]
        orders = [msgs, msgs[::-1]]
        barrier = threading.Barrier(2)

        def send(
            order: list[pb.Session], barrier: threading.Barrier = barrier
        ) -> pb.IngestSessionsResponse:
            def chunks() -> Any:
                barrier.wait()
                for i in range(0, len(order), 500):
                    yield pb.IngestSessionsRequest(sessions=order[i : i + 500])

            reply: pb.IngestSessionsResponse = stack.stub().StreamIngestSessions(
                chunks(), metadata=auth_md(token), timeout=60
            )
            return reply

        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(send, orders))
        assert [(r.accepted, r.rejected) for r in replies] == [(2000, 0), (2000, 0)]
        # Identical content: each session was written by whichever stream came to it first and
        # left unchanged by the other (a stream's first chunk is 1,000 items, so each may
        # have come first to half of them).
        assert sum(r.written for r in replies) == 2000
        assert [r.written + r.unchanged for r in replies] == [2000, 2000]
        assert len(_stored(stack, [s.id for s in specs])) == 2000


def _rollups_equal_a_rebuild(stack: Stack, org: str) -> None:
    async def go() -> None:
        conn = await db.connect(stack.dsn)
        try:
            org_id = await conn.fetchval("SELECT id FROM orgs WHERE name = $1", org)
            before = {f.table: await snapshot(conn, f, org_id) for f in rollups.FAMILIES}
            await rollups.rebuild(conn, org_id)
            after = {f.table: await snapshot(conn, f, org_id) for f in rollups.FAMILIES}
            assert before == after
        finally:
            await conn.close()

    run(go())


@pytest.mark.parametrize("other", ["stream", "unary"])
def test_long_overlapping_streams_in_opposite_order_never_abort(stack: Stack, other: str) -> None:
    """Two writers of the same 12,000 new sessions in opposite orders, started together
    (twice; once against unary batches): a stream (three chunks of 5,000 and one of 2,000) against another stream, or
    against unary batches of 1,000. One sends each session open, the other closed; applied in
    any order they merge to the closed row (an open report never reopens a closed session),
    so the sequential model is: every session closed, every close written, every open report
    written exactly when it came first. Neither deadlocks: no ABORTED, no INTERNAL."""
    org = stack.new_org(f"rel-long-{other}")
    token = stack.token(org, "ingest")
    n = 12_000
    for trial in range(2 if other == "stream" else 1):
        t0 = T0 + timedelta(days=trial)
        specs = [Spec(start=t0 + timedelta(seconds=i), email=f"u{i % 13}@x.example")
                 for i in range(n)]  # fmt: skip
        opened = [s.to_proto() for s in specs]
        for s in specs:
            s.end = s.start + timedelta(minutes=1 + s.start.second % 7)
        closed = [s.to_proto() for s in specs][::-1]
        barrier = threading.Barrier(2)

        def stream(msgs: list[pb.Session], barrier: threading.Barrier = barrier) -> list[Any]:
            def chunks() -> Any:
                barrier.wait()
                for i in range(0, len(msgs), 1000):
                    yield pb.IngestSessionsRequest(sessions=msgs[i : i + 1000])

            reply = stack.stub().StreamIngestSessions(
                chunks(), metadata=auth_md(token), timeout=120
            )
            return [reply]

        def unary(msgs: list[pb.Session], barrier: threading.Barrier = barrier) -> list[Any]:
            barrier.wait()
            return [stack.stub().IngestSessions(pb.IngestSessionsRequest(sessions=msgs[i : i + 1000]),
                                                metadata=auth_md(token), timeout=120)
                    for i in range(0, len(msgs), 1000)]  # fmt: skip

        with ThreadPoolExecutor(2) as pool:
            opens = pool.submit(stream, opened)
            closes = pool.submit(stream if other == "stream" else unary, closed)
            # An ABORTED or INTERNAL raises here (grpc.RpcError) and fails the test.
            open_replies, close_replies = opens.result(), closes.result()
        o = [sum(getattr(r, k) for r in open_replies) for k in ("accepted", "written", "rejected")]
        c = [sum(getattr(r, k) for r in close_replies) for k in ("accepted", "written", "rejected")]
        assert (o[0], o[2], c) == (n, 0, [n, n, 0])
        stored = stack.sql("SELECT id::text, start_date, end_date FROM sessions"
                           " WHERE id = any($1::uuid[])", [s.id for s in specs])  # fmt: skip
        assert {r["id"]: (r["start_date"], r["end_date"]) for r in stored} == {
            s.id: (s.start, s.end) for s in specs}  # fmt: skip
    _rollups_equal_a_rebuild(stack, org)


# -- finding 2: one id several times in a batch ----------------------------------------------


def test_a_report_after_the_sessions_end_is_rejected_alone(
    stack: Stack, org_admin: tuple[str, str]
) -> None:
    _, token = org_admin
    x, y = str(uuid.uuid4()), str(uuid.uuid4())
    batch = [
        {"id": y, "start_date": "2026-02-01T09:00:00Z"},
        {"id": x, "start_date": "2026-02-01T10:00:00Z", "end_date": "2026-02-01T11:00:00Z"},
        {"id": x, "start_date": "2026-02-01T12:00:00Z"},
    ]
    first = _rest_ingest(stack, token, batch)
    assert (first["accepted"], first["written"], first["unchanged"], first["rejected"]) == (
        2, 2, 0, 1)  # fmt: skip
    assert [(r["index"], r["id"]) for r in first["rejections"]] == [(2, x)]
    assert "after the session's end_date" in first["rejections"][0]["reason"]
    stored = _stored(stack, [x, y])
    assert set(stored) == {x, y}
    assert stored[x]["end_date"] - stored[x]["start_date"] == timedelta(hours=1)
    # Re-sending changes nothing and answers the same per item.
    again = _rest_ingest(stack, token, batch)
    assert (again["accepted"], again["written"], again["unchanged"], again["rejected"]) == (
        2, 0, 2, 1)  # fmt: skip
    # The same late report against the stored session: rejected alone as well.
    late = _rest_ingest(stack, token, [batch[2], {"id": str(uuid.uuid4()),
                                                  "start_date": "2026-02-01T12:00:00Z"}])  # fmt: skip
    assert (late["accepted"], late["written"], late["rejected"]) == (1, 1, 1)
    assert late["rejections"][0]["index"] == 0


def test_counts_add_up_per_item(stack: Stack, org_admin: tuple[str, str]) -> None:
    _, token = org_admin
    other_org = stack.new_org("rel-other")
    theirs = str(uuid.uuid4())
    _rest_ingest(stack, stack.token(other_org, "admin"),
                 [{"id": theirs, "start_date": "2026-02-01T09:00:00Z"}])  # fmt: skip
    # Ids are unique per org: another org's id, twice, is a new session of ours, per item.
    body = _rest_ingest(stack, token, [
        {"id": theirs, "start_date": "2026-02-01T09:00:00Z"},
        {"id": theirs, "start_date": "2026-02-01T09:00:00Z", "connection": "pg"},
    ])  # fmt: skip
    assert (body["accepted"], body["written"], body["unchanged"], body["rejected"]) == (
        2, 2, 0, 0)  # fmt: skip
    # Two reports of one session: each changed it, as two separate requests would have.
    sid = str(uuid.uuid4())
    two = _rest_ingest(stack, token, [
        {"id": sid, "start_date": "2026-02-01T10:00:00Z", "connection": "pg"},
        {"id": sid, "start_date": "2026-02-01T10:00:00Z", "end_date": "2026-02-01T10:01:00Z"},
        {"id": sid, "start_date": "2026-02-01T10:00:00Z", "connection": "pg"},
    ])  # fmt: skip
    assert (two["accepted"], two["written"], two["unchanged"]) == (3, 2, 1)
    assert _stored(stack, [sid])[sid]["status"] == "done"
    # A stored session reported again as stored, then ended: the first item changed nothing.
    opened = {"id": str(uuid.uuid4()), "start_date": "2026-02-01T10:00:00Z", "connection": "pg",
              "labels": {"team": "a"}}  # fmt: skip
    _rest_ingest(stack, token, [opened])
    again = _rest_ingest(stack, token, [opened, {**opened, "end_date": "2026-02-01T10:05:00Z"}])
    assert (again["accepted"], again["written"], again["unchanged"]) == (2, 1, 1)


def test_uuid_spellings_are_one_session(stack: Stack, org_admin: tuple[str, str]) -> None:
    _, token = org_admin
    u = uuid.uuid4()
    spellings = [f"{{{u}}}", f"urn:uuid:{u}", u.hex, str(u).upper()]
    body = _rest_ingest(
        stack, token, [{"id": s, "start_date": "2026-02-01T10:00:00Z"} for s in spellings]
    )
    assert (body["accepted"], body["written"], body["unchanged"], body["rejected"]) == (
        4, 1, 3, 0)  # fmt: skip
    assert list(_stored(stack, [str(u)])) == [str(u)]
    got = stack.rest("GET", f"/api/sessions/{u}", token)
    assert got.status_code == 200 and got.json()["id"] == str(u)


# -- finding 3: races on reports, definitions, subscriptions ---------------------------------


def _race(calls: list[Any], workers: int = 8) -> Counter[int]:
    with ThreadPoolExecutor(workers) as pool:
        return Counter(r.status_code for r in pool.map(lambda f: f(), calls))


def test_concurrent_deletes_of_a_report_one_wins_the_rest_404(
    stack: Stack, org_admin: tuple[str, str]
) -> None:
    _, token = org_admin
    stack.ingest(token, [Spec(start=T0 + timedelta(minutes=i)).to_proto() for i in range(3)])
    rids = [ok(stack.rest("POST", "/api/v2/report", token, json={}))["report"]["id"]
            for _ in range(12)]  # fmt: skip
    for rid in rids:
        assert wait_report(stack, token, rid)["status"] == "ready"
    calls = [
        (lambda rid=rid: stack.rest("DELETE", f"/api/v2/report/{rid}", token))
        for rid in rids for _ in range(8)
    ]  # fmt: skip
    assert _race(calls, 16) == {200: 12, 404: 84}


def test_delete_racing_patch_of_a_definition_never_500(
    stack: Stack, org_admin: tuple[str, str]
) -> None:
    _, token = org_admin
    dids = [
        ok(stack.rest("POST", "/api/v2/report/defined", token, json={
            "title": f"d{i}", "type": "session_summary", "query_filter": "protocol.iin(rdp)",
            "query_order": "!created_at"}))["defined_report"]["id"]
        for i in range(8)
    ]  # fmt: skip

    def patch(did: str, i: int) -> Any:
        return stack.rest("PATCH", f"/api/v2/report/defined/{did}", token, json={"title": f"t{i}"})

    def delete(did: str) -> Any:
        return stack.rest("DELETE", f"/api/v2/report/defined/{did}", token)

    calls: list[Any] = []
    for did in dids:
        for i in range(4):
            calls += [functools.partial(patch, did, i), functools.partial(delete, did)]
    got = _race(calls)
    assert set(got) <= {200, 404}, got
    # Every definition was deleted exactly once.
    assert stack.sql("SELECT count(*) FROM defined_reports WHERE id = any($1::bigint[])",
                     [int(d) for d in dids])[0][0] == 0  # fmt: skip


def test_parallel_deletes_of_a_subscription_one_wins(
    stack: Stack, org_admin: tuple[str, str]
) -> None:
    _, token = org_admin
    sids = []
    for period, did in (("day", "6"), ("week", "6"), ("month", "6"), ("day", "7"), ("day", "8")):
        created = ok(stack.rest("POST", "/api/v2/report/subscription", token,
                                json={"period": period, "defined_report_id": did}))  # fmt: skip
        sids.append(created["defined_report_subscription"]["id"])
    calls = [
        (lambda sid=sid: stack.rest("DELETE", f"/api/v2/report/subscription/{sid}", token))
        for sid in sids for _ in range(8)
    ]  # fmt: skip
    assert _race(calls) == {200: 5, 404: 35}


# -- finding 8: error classes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (asyncpg.InterfaceError("invalid input for query argument $1"), "INTERNAL"),
        (asyncpg.DeadlockDetectedError("deadlock detected"), "ABORTED"),
        (asyncpg.SerializationError("could not serialize access"), "ABORTED"),
        (
            asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
            "DEADLINE_EXCEEDED",
        ),
        (TimeoutError(), "DEADLINE_EXCEEDED"),
        (asyncpg.ConnectionDoesNotExistError("connection was closed"), "UNAVAILABLE"),
        (asyncpg.AdminShutdownError("terminating connection"), "UNAVAILABLE"),
        # asyncpg's words for a pooled connection lost (PostgreSQL stopping) before it was used.
        (
            asyncpg.InterfaceError(
                "cannot call Transaction.start(): the underlying connection is closed"
            ),
            "UNAVAILABLE",
        ),
        (asyncpg.InterfaceError("cannot perform operation: connection is closed"), "UNAVAILABLE"),
        (
            asyncpg.InternalClientError(
                'cannot switch to state 15; protocol is in the "failed" state'
            ),
            "UNAVAILABLE",
        ),
        # Our misuse stays INTERNAL.
        (
            asyncpg.InterfaceError(
                "cannot call Transaction.start(): the underlying connection has been released "
                "back to the pool"
            ),
            "INTERNAL",
        ),
        (
            asyncpg.InternalClientError(
                "cannot switch to state 1; another operation (2) is in progress"
            ),
            "UNAVAILABLE",
        ),
        (ConnectionRefusedError(111, "Connection refused"), "UNAVAILABLE"),
        (FileNotFoundError(2, "No such file or directory", "/srv/template.html"), "INTERNAL"),
        (KeyError("status"), "INTERNAL"),
    ],
)
def test_errors_map_to_what_happened(exc: Exception, code: str) -> None:
    got, message = status_for("Call", exc)
    assert got == getattr(grpc.StatusCode, code)
    assert message.startswith("Call: ")


# -- finding 9: group_by=id does not materialise an unbounded answer ---------------------------


def test_session_report_by_id_is_bounded_with_a_400_pointing_to_the_export(
    stack: Stack, org_admin: tuple[str, str]
) -> None:
    _, token = org_admin
    day = T0.replace(hour=0, minute=0)
    specs = [
        Spec(start=day + timedelta(seconds=i), end=day + timedelta(seconds=i + 60),
             connection="a" if i % 2 else "b", redactions=(("EMAIL_ADDRESS", 1, 10),))
        for i in range(10_001)
    ]  # fmt: skip
    reply = stack.stub().StreamIngestSessions(
        (pb.IngestSessionsRequest(sessions=[s.to_proto() for s in specs[i : i + 1000]])
         for i in range(0, len(specs), 1000)),
        metadata=auth_md(token),
    )  # fmt: skip
    assert reply.written == 10_001
    window = {"start_date": day.date().isoformat(),
              "end_date": (day + timedelta(days=1)).date().isoformat()}  # fmt: skip
    r = stack.rest("GET", "/api/reports/sessions", token, params={**window, "group_by": "id"})
    assert r.status_code == 400, r.text
    message = r.json()["message"]
    assert (
        message.startswith("group_by: id lists at most 10000 items") and "/api/v2/report" in message
    )
    narrowed = stack.rest("GET", "/api/reports/sessions", token,
                          params={**window, "group_by": "id", "connection_name": "b"})  # fmt: skip
    assert narrowed.status_code == 200, narrowed.text
    assert len(narrowed.json()["items"]) == 5001
    by_connection = ok(stack.rest("GET", "/api/reports/sessions", token, params=window))
    assert sorted((i["resource"], i["redact_total"]) for i in by_connection["items"]) == [
        ("a", 5000), ("b", 5001)]  # fmt: skip
