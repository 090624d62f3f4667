"""Every path of the Reports API through Envoy and over gRPC: envelopes, definitions,
subscriptions, reports, attributes, pagination, permissions, the audit log, and bad input."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from session_audit.core import auth, db
from session_audit.v1 import reports_pb2 as rpb
from tests.report_reference import (
    PREDEFINED,
    T0,
    RSpec,
    create_report,
    csv_rows,
    ok,
    ready_report,
    report_stub,
    wait_report,
)
from tests.support import Stack, auth_md

ANA, BRUNO = "ana@acme.example", "bruno@acme.example"


@dataclass
class World:
    org: str
    admin: str
    auditor: str
    ana: str
    bruno: str
    ingest: str
    other: str
    specs: list[RSpec]


@pytest.fixture(scope="module")
def world(stack: Stack) -> World:
    org = stack.new_org("rapi")
    admin = stack.token(org, "admin", "admin@acme.example")
    specs = [
        RSpec(start=T0 + timedelta(minutes=i), email=ANA if i % 2 else "Bruno@acme.example",
              user_id=f"u{i % 2}", protocol="ssh" if i % 3 else "rdp")
        for i in range(8)
    ]  # fmt: skip
    stack.ingest(admin, [s.to_proto() for s in specs])
    return World(
        org=org, admin=admin, auditor=stack.token(org, "auditor", "audit@acme.example"),
        ana=stack.token(org, "user", ANA), bruno=stack.token(org, "user", BRUNO),
        ingest=stack.token(org, "ingest"), other=stack.token(stack.new_org("rapi-other"), "admin"),
        specs=specs,
    )  # fmt: skip


def md(token: str) -> list[tuple[str, str]]:
    return auth_md(token)


# -- definitions ------------------------------------------------------------------------------


def test_predefined_definitions_have_the_documents_ids_and_titles(
    stack: Stack, world: World
) -> None:
    body = ok(stack.rest("GET", "/api/v2/report/defined", world.ana, params={"limit": 100}))
    assert body["result"] == "success"
    predefined = {int(d["id"]): d for d in body["defined_reports"] if d["predefined"]}
    assert {i: d["title"] for i, d in predefined.items()} == PREDEFINED
    for d in predefined.values():
        assert d["editable"] is False and d["user_id"] == ""
        assert isinstance(d["id"], str)
    # Over gRPC too.
    reply = report_stub(stack).ListDefinedReports(
        rpb.ListDefinedReportsRequest(limit=100), metadata=md(world.ana)
    )
    assert {int(d.id): d.title for d in reply.defined_reports if d.predefined} == PREDEFINED


def test_definition_lifecycle_over_rest(stack: Stack, world: World) -> None:
    created = ok(stack.rest("POST", "/api/v2/report/defined", world.ana, json={
        "title": "My RDP", "type": "session_summary", "query_filter": "protocol.iin(rdp)",
        "query_order": "!created_at"}))  # fmt: skip
    assert created["result"] == "success" and set(created["defined_report"]) == {"id"}
    did = created["defined_report"]["id"]
    assert did.isdigit() and int(did) > 2**53  # never collides with 5-16, never a float
    got = ok(stack.rest("GET", f"/api/v2/report/defined/{did}", world.ana))["defined_report"]
    assert got["title"] == "My RDP" and got["type"] == "session_summary"
    assert got["user_id"] == ANA and got["editable"] is True and got["predefined"] is False
    assert got["subscribed"] is False and got["has_reports"] is False
    patched = stack.rest("PATCH", f"/api/v2/report/defined/{did}", world.ana, json={
        "title": "Updated Custom Report", "query_filter": "protocol.iin(ssh)",
        "query_order": "!finished_at"})  # fmt: skip
    assert ok(patched) == {"result": "success"}
    got2 = ok(stack.rest("GET", f"/api/v2/report/defined/{did}", world.ana))["defined_report"]
    assert (got2["title"], got2["query_filter"], got2["query_order"]) == (
        "Updated Custom Report", "protocol.iin(ssh)", "!finished_at")  # fmt: skip
    assert got2["modified_at"] > got2["created_at"] == got["created_at"]
    # Immutable fields: the same value is accepted, another is a 400.
    assert ok(stack.rest("PATCH", f"/api/v2/report/defined/{did}", world.ana,
                         json={"type": "session_summary", "user_id": ANA}))["result"] == "success"  # fmt: skip
    for body, message in (
        ({"type": "user"}, "type: immutable"),
        ({"user_id": BRUNO}, "user_id: immutable"),
        ({}, "body: expected at least one of"),
        ({"query_filter": "nope.eq(1)"}, "query_filter: term 1"),
        ({"title": ""}, "title: expected 1..200"),
        ({"id": "5", "title": "x"}, ""),
    ):
        r = stack.rest("PATCH", f"/api/v2/report/defined/{did}", world.ana, json=body)
        assert r.status_code == 400, (body, r.text)
        assert message in r.json()["message"]
    assert ok(stack.rest("DELETE", f"/api/v2/report/defined/{did}", world.ana)) == {
        "result": "success"
    }
    assert stack.rest("GET", f"/api/v2/report/defined/{did}", world.ana).status_code == 404
    assert stack.rest("DELETE", f"/api/v2/report/defined/{did}", world.ana).status_code == 404


def test_definition_lifecycle_over_grpc(stack: Stack, world: World) -> None:
    stub = report_stub(stack)
    m = md(world.auditor)
    did = stub.CreateDefinedReport(rpb.CreateDefinedReportRequest(
        title="By server", type="sessions_by_server"), metadata=m).defined_report.id  # fmt: skip
    got = stub.GetDefinedReport(rpb.GetDefinedReportRequest(id=did), metadata=m).defined_report
    assert (got.title, got.type, got.user_id) == ("By server", "sessions_by_server",
                                                 "audit@acme.example")  # fmt: skip
    reply = stub.UpdateDefinedReport(
        rpb.UpdateDefinedReportRequest(id=did, title="Renamed"), metadata=m
    )
    assert reply.result == "success"
    assert stub.GetDefinedReport(rpb.GetDefinedReportRequest(id=did), metadata=m).defined_report.title == "Renamed"  # fmt: skip
    listed = stub.ListDefinedReports(
        rpb.ListDefinedReportsRequest(type="sessions_by_server"), metadata=m
    )
    assert {d.id for d in listed.defined_reports} >= {did, "12"}
    assert stub.DeleteDefinedReport(rpb.DeleteDefinedReportRequest(id=did), metadata=m).result == "success"  # fmt: skip
    with pytest.raises(grpc.RpcError) as err:
        stub.GetDefinedReport(rpb.GetDefinedReportRequest(id=did), metadata=m)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("did", range(5, 17))
def test_predefined_definitions_cannot_change(stack: Stack, world: World, did: int) -> None:
    r = stack.rest("PATCH", f"/api/v2/report/defined/{did}", world.admin, json={"title": "x"})
    assert r.status_code == 403 and "predefined" in r.json()["message"]
    r = stack.rest("DELETE", f"/api/v2/report/defined/{did}", world.admin)
    assert r.status_code == 403 and "predefined" in r.json()["message"]
    got = ok(stack.rest("GET", f"/api/v2/report/defined/{did}", world.admin))["defined_report"]
    assert got["title"] == PREDEFINED[did]


def test_deleting_a_definition_removes_its_subscriptions_keeps_reports(
    stack: Stack, world: World
) -> None:
    did = ok(stack.rest("POST", "/api/v2/report/defined", world.bruno, json={
        "title": "mine", "type": "user"}))["defined_report"]["id"]  # fmt: skip
    sid = ok(stack.rest("POST", "/api/v2/report/subscription", world.bruno, json={
        "period": "week", "defined_report_id": did}))["defined_report_subscription"]["id"]  # fmt: skip
    rid, _ = ready_report(stack, world.bruno, defined_report_id=did)
    got = ok(stack.rest("GET", f"/api/v2/report/defined/{did}", world.bruno))["defined_report"]
    assert got["subscribed"] is True and got["has_reports"] is True
    ok(stack.rest("DELETE", f"/api/v2/report/defined/{did}", world.bruno))
    assert stack.rest("GET", f"/api/v2/report/subscription/{sid}", world.bruno).status_code == 404
    report = ok(stack.rest("GET", f"/api/v2/report/{rid}", world.bruno))["report"]
    assert report["defined_report_id"] == did and report["defined_report_title"] == ""


# -- reports ---------------------------------------------------------------------------------


def test_report_lifecycle_over_rest(stack: Stack, world: World) -> None:
    body = {"criteria": [{"field": "protocol", "value": "ssh"}, {"field": "user", "value": "u1"}]}
    created = ok(stack.rest("POST", "/api/v2/report", world.admin, json=body))
    assert set(created) == {"report", "result"} and set(created["report"]) == {"id"}
    rid = created["report"]["id"]
    report = wait_report(stack, world.admin, rid)
    assert report["status"] == "ready" and report["failure"] == ""
    assert report["defined_report_id"] == "11" and report["title"] == "Session summary"
    assert report["query_filter"] == "protocol.eq(ssh),user_id.eq(u1)"
    assert report["generated_at"] >= report["created_at"]
    expected = [s for s in world.specs if s.protocol == "ssh" and s.user_id == "u1"]
    assert report["rows"] == len(expected) > 0
    assert sorted(r[0] for r in csv_rows(stack, world.admin, rid)[1:]) == sorted(
        s.id for s in expected
    )
    listed = ok(stack.rest("GET", "/api/v2/report", world.admin, params={"limit": 100}))
    assert rid in [r["id"] for r in listed["reports"]] and listed["result"] == "success"
    assert ok(stack.rest("DELETE", f"/api/v2/report/{rid}", world.admin)) == {"result": "success"}
    assert stack.rest("GET", f"/api/v2/report/{rid}", world.admin).status_code == 404
    assert stack.rest("GET", f"/api/v2/report/{rid}/csv", world.admin).status_code == 404
    assert stack.rest("DELETE", f"/api/v2/report/{rid}", world.admin).status_code == 404
    assert stack.sql("SELECT count(*) FROM report_rows WHERE report_id = $1", int(rid))[0][0] == 0


def test_report_lifecycle_over_grpc_with_streamed_download(stack: Stack, world: World) -> None:
    stub = report_stub(stack)
    m = md(world.admin)
    rid = stub.CreateReport(rpb.CreateReportRequest(
        defined_report_id="16", title="Users", query_filter="protocol.eq(rdp)"),
        metadata=m).report.id  # fmt: skip
    wait_report(stack, world.admin, rid)
    got = stub.GetReport(rpb.GetReportRequest(id=rid), metadata=m).report
    assert (got.status, got.type, got.title, got.query_filter) == ("ready", "user", "Users",
                                                                   "protocol.eq(rdp)")  # fmt: skip
    call = stub.DownloadReport(rpb.DownloadReportRequest(id=rid, format="csv"), metadata=m)
    chunks = list(call)
    assert chunks[0].content_type == "text/csv; charset=utf-8"
    headers = dict(call.initial_metadata())
    assert headers["content-disposition"] == f'attachment; filename="Users-{rid}.csv"'
    text = b"".join(c.data for c in chunks).decode()
    assert text.startswith("user_email,user_id,user_name,sessions")
    listed = stub.ListReports(rpb.ListReportsRequest(status="ready", defined_report_id="16"),
                              metadata=m)  # fmt: skip
    assert rid in [r.id for r in listed.reports]
    assert stub.DeleteReport(rpb.DeleteReportRequest(id=rid), metadata=m).result == "success"


def test_download_headers_and_errors(stack: Stack, world: World) -> None:
    rid, _ = ready_report(stack, world.admin, title='Q1 "audit"; rm -rf / \u00e9t\u00e9',
                          defined_report_id="12")  # fmt: skip
    for fmt, ctype in (("csv", "text/csv; charset=utf-8"), ("html", "text/html; charset=utf-8"),
                       ("pdf", "application/pdf")):  # fmt: skip
        r = stack.rest("GET", f"/api/v2/report/{rid}/{fmt}", world.admin)
        assert r.status_code == 200
        assert r.headers["content-type"] == ctype
        assert r.headers["content-disposition"] == (
            f'attachment; filename="Q1-audit-rm-rf-ete-{rid}.{fmt}"'
        )
        assert not [h for h in r.headers if h.lower().startswith("grpc-")]
    for path, status, message in (
        (f"/api/v2/report/{rid}/CSV", 400, "format: expected one of csv, pdf, html, got 'CSV'"),
        (f"/api/v2/report/{rid}/xlsx", 400, "format: expected one of csv, pdf, html"),
        ("/api/v2/report/999999999999/csv", 404, "report 999999999999 not found"),
        ("/api/v2/report/abc/csv", 400, "id: expected an id, a string of 1-19 digits"),
        ("/api/v2/report/99999999999999999999/csv", 400, "id: expected an id"),
    ):
        r = stack.rest("GET", path, world.admin)
        assert r.status_code == status, (path, r.text)
        assert r.json() == {"message": r.json()["message"]} and message in r.json()["message"]


def test_pending_report_is_409_then_downloads(stack: Stack, world: World) -> None:
    """A report being generated (here: held locked so no generator can take it) is pending."""

    async def scenario() -> None:
        conn = await db.connect(stack.dsn)
        try:
            org_id = await conn.fetchval("SELECT id FROM orgs WHERE name = $1", world.org)
            rid = await conn.fetchval(
                "INSERT INTO reports (org_id, owner, owner_scope, defined_report_id, type, title)"
                " VALUES ($1, 'admin@acme.example', 'org', 11, 'session_summary', 'held')"
                " RETURNING id", org_id)  # fmt: skip
            async with conn.transaction():
                await conn.execute(
                    "SELECT 1 FROM reports WHERE org_id = $1 AND id = $2 FOR UPDATE", org_id, rid
                )
                await asyncio.sleep(0.3)
                r = await asyncio.to_thread(stack.rest, "GET", f"/api/v2/report/{rid}/csv",
                                            world.admin)  # fmt: skip
                assert r.status_code == 409, r.text
                assert r.json()["message"] == (
                    f"report {rid} is not ready yet (status pending); try again shortly"
                )
                got = await asyncio.to_thread(stack.rest, "GET", f"/api/v2/report/{rid}",
                                              world.admin)  # fmt: skip
                assert got.json()["report"]["status"] == "pending"
                assert "generated_at" not in got.json()["report"]
            report = await asyncio.to_thread(wait_report, stack, world.admin, str(rid))
            assert report["status"] == "ready"
        finally:
            await conn.close()

    asyncio.run(scenario())


def test_failed_report_says_why(stack: Stack, world: World) -> None:
    # A definition stored before a rule changed: its filter no longer compiles.
    rows = stack.sql(
        "INSERT INTO reports (org_id, owner, owner_scope, defined_report_id, type, title,"
        " query_filter) SELECT id, 'admin@acme.example', 'org', 11, 'session_summary', 'old',"
        " 'colour.eq(red)' FROM orgs WHERE name = $1 RETURNING id", world.org)  # fmt: skip
    rid = str(rows[0]["id"])
    report = wait_report(stack, world.admin, rid)
    assert report["status"] == "failed"
    assert "unknown attribute 'colour'" in report["failure"]
    r = stack.rest("GET", f"/api/v2/report/{rid}/pdf", world.admin)
    assert r.status_code == 409 and "failed" in r.json()["message"]


def test_lists_paginate_with_limit_and_offset(stack: Stack, world: World) -> None:
    org = stack.new_org("pages")
    token = stack.token(org, "auditor")
    ids = [create_report(stack, token, defined_report_id="16") for _ in range(5)]
    seen: list[str] = []
    for offset in (0, 2, 4):
        body = ok(stack.rest("GET", "/api/v2/report", token,
                             params={"limit": 2, "offset": offset}))  # fmt: skip
        assert body["total"] == 5
        assert body["has_next_page"] == (offset + 2 < 5)
        seen += [r["id"] for r in body["reports"]]
    assert seen == sorted(ids, key=int, reverse=True)
    body = ok(stack.rest("GET", "/api/v2/report/defined", token, params={"limit": 5}))
    assert [d["id"] for d in body["defined_reports"]] == ["5", "6", "7", "8", "9"]
    assert body["has_next_page"] is True and body["total"] == 12


# -- subscriptions ---------------------------------------------------------------------------


def test_subscription_lifecycle_over_rest(stack: Stack, world: World) -> None:
    created = ok(stack.rest("POST", "/api/v2/report/subscription", world.ana,
                            json={"period": "day", "defined_report_id": "6"}))  # fmt: skip
    assert set(created) == {"defined_report_subscription", "result"}
    sid = created["defined_report_subscription"]["id"]
    assert sid.isdigit()
    got = ok(stack.rest("GET", f"/api/v2/report/subscription/{sid}", world.ana))
    sub = got["defined_report_subscription"]
    assert (sub["period"], sub["defined_report_id"], sub["user_id"], sub["time_zone"]) == (
        "day", "6", ANA, "Etc/UTC")  # fmt: skip
    assert sub["next_period_start"] <= sub["created_at"] < sub["next_run_at"]
    dup = stack.rest("POST", "/api/v2/report/subscription", world.ana,
                     json={"period": "day", "defined_report_id": "6"})  # fmt: skip
    assert dup.status_code == 409 and "already subscribed" in dup.json()["message"]
    listed = ok(stack.rest("GET", "/api/v2/report/subscription", world.ana))
    assert [s["id"] for s in listed["defined_report_subscriptions"]] == [sid]
    defined = ok(stack.rest("GET", "/api/v2/report/defined/6", world.ana))["defined_report"]
    assert defined["subscribed"] is True
    assert ok(stack.rest("DELETE", f"/api/v2/report/subscription/{sid}", world.ana)) == {
        "result": "success"
    }
    assert stack.rest("GET", f"/api/v2/report/subscription/{sid}", world.ana).status_code == 404


def test_subscription_lifecycle_over_grpc(stack: Stack, world: World) -> None:
    stub = report_stub(stack)
    m = md(world.bruno)
    sid = stub.CreateDefinedReportSubscription(rpb.CreateDefinedReportSubscriptionRequest(
        period="quarter", defined_report_id="16", time_zone="Europe/Warsaw"),
        metadata=m).defined_report_subscription.id  # fmt: skip
    sub = stub.GetDefinedReportSubscription(
        rpb.GetDefinedReportSubscriptionRequest(id=sid), metadata=m
    ).defined_report_subscription
    assert (sub.period, sub.time_zone) == ("quarter", "Europe/Warsaw")
    # A quarter in Warsaw starts at local midnight: 23:00 or 22:00 UTC the day before.
    start = sub.next_period_start.ToDatetime()
    assert start.day in (31, 30) and start.hour in (22, 23)
    listed = stub.ListDefinedReportSubscriptions(
        rpb.ListDefinedReportSubscriptionsRequest(defined_report_id="16"), metadata=m
    )
    assert [s.id for s in listed.defined_report_subscriptions] == [sid]
    stub.DeleteDefinedReportSubscription(
        rpb.DeleteDefinedReportSubscriptionRequest(id=sid), metadata=m
    )


# -- attributes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "required", "read_only", "unique"),
    [
        ("/api/v2/report/attributes", set(), {"id", "generated_at", "status", "created_at",
                                              "modified_at", "defined_report_title"}, {"id"}),
        ("/api/v2/report/defined/attributes", {"title", "type"},
         {"id", "created_at", "modified_at", "user_id", "subscribed", "has_reports"}, {"id"}),
        ("/api/v2/report/subscription/attributes", {"period", "defined_report_id"},
         {"id", "created_at", "modified_at", "user_id"}, {"id"}),
    ],
)  # fmt: skip
def test_attribute_requests(
    stack: Stack, world: World, path: str, required: set[str], read_only: set[str],
    unique: set[str],
) -> None:  # fmt: skip
    body = ok(stack.rest("GET", path, world.ana))
    assert body["result"] == "success"
    attrs = {a["name"]: a for a in body["attributes"]}
    assert {n for n, a in attrs.items() if a["required"]} == required
    assert read_only <= {n for n, a in attrs.items() if a["read_only"]}
    assert {n for n, a in attrs.items() if a["unique"]} == unique
    for a in attrs.values():
        assert a["type"] in ("string", "datetime", "boolean", "integer", "array")


def test_criteria_attributes_publish_the_whitelist(stack: Stack, world: World) -> None:
    body = ok(stack.rest("GET", "/api/v2/report/criteria/attributes", world.ana))
    attrs = {a["name"]: a for a in body["attributes"]}
    for name in ("id", "user_id", "user_email", "connection", "protocol", "verb", "status",
                 "created_at", "finished_at", "retention_locked"):  # fmt: skip
        assert name in attrs
    assert "subprotocol" in attrs["protocol"]["aliases"]
    assert attrs["retention_locked"]["operators"] == ["eq", "ne", "isnull"]
    assert body["operators"] == ["eq", "ne", "lt", "le", "gt", "ge", "in", "iin", "match",
                                 "imatch", "isnull"]  # fmt: skip
    reply = report_stub(stack).GetCriteriaAttributes(rpb.ReportAttributesRequest(),
                                                     metadata=md(world.ana))  # fmt: skip
    assert [a.name for a in reply.attributes] == list(attrs)
    for rpc in ("GetReportAttributes", "GetDefinedReportAttributes",
                "GetDefinedReportSubscriptionAttributes"):  # fmt: skip
        reply = getattr(report_stub(stack), rpc)(rpb.ReportAttributesRequest(),
                                                 metadata=md(world.ana))  # fmt: skip
        assert reply.result == "success" and reply.attributes[0].name == "id"


# -- permissions -----------------------------------------------------------------------------


def test_users_see_only_their_own_objects(stack: Stack, world: World) -> None:
    mine = create_report(stack, world.ana, defined_report_id="11")
    theirs = create_report(stack, world.bruno, defined_report_id="11")
    did = ok(stack.rest("POST", "/api/v2/report/defined", world.bruno, json={
        "title": "bruno's", "type": "user"}))["defined_report"]["id"]  # fmt: skip
    sid = ok(stack.rest("POST", "/api/v2/report/subscription", world.bruno, json={
        "period": "month", "defined_report_id": "16"}))["defined_report_subscription"]["id"]  # fmt: skip
    ana_reports = [r["id"] for r in ok(stack.rest("GET", "/api/v2/report", world.ana,
                                                  params={"limit": 100}))["reports"]]  # fmt: skip
    assert mine in ana_reports and theirs not in ana_reports
    for path in (f"/api/v2/report/{theirs}", f"/api/v2/report/{theirs}/csv",
                 f"/api/v2/report/defined/{did}", f"/api/v2/report/subscription/{sid}"):  # fmt: skip
        assert stack.rest("GET", path, world.ana).status_code == 404, path
    for path in (f"/api/v2/report/{theirs}", f"/api/v2/report/defined/{did}",
                 f"/api/v2/report/subscription/{sid}"):  # fmt: skip
        assert stack.rest("DELETE", path, world.ana).status_code == 404, path
    listed = ok(stack.rest("GET", "/api/v2/report/defined", world.ana, params={"limit": 100}))
    assert did not in [d["id"] for d in listed["defined_reports"]]
    assert sid not in [s["id"] for s in ok(stack.rest(
        "GET", "/api/v2/report/subscription", world.ana))["defined_report_subscriptions"]]  # fmt: skip
    # Admin and auditor read everything in the org; only the owner or an admin may delete.
    for reader in (world.admin, world.auditor):
        assert stack.rest("GET", f"/api/v2/report/{theirs}", reader).status_code == 200
        assert stack.rest("GET", f"/api/v2/report/defined/{did}", reader).status_code == 200
        assert stack.rest("GET", f"/api/v2/report/subscription/{sid}", reader).status_code == 200
    wait_report(stack, world.bruno, theirs)
    assert stack.rest("GET", f"/api/v2/report/{theirs}/csv", world.auditor).status_code == 200
    got = ok(stack.rest("GET", f"/api/v2/report/{theirs}", world.auditor))["report"]
    assert got["editable"] is False
    r = stack.rest("DELETE", f"/api/v2/report/{theirs}", world.auditor)
    assert r.status_code == 403 and "only they or an admin" in r.json()["message"]
    r = stack.rest("PATCH", f"/api/v2/report/defined/{did}", world.auditor, json={"title": "x"})
    assert r.status_code == 403
    assert ok(stack.rest("DELETE", f"/api/v2/report/subscription/{sid}", world.admin))
    assert ok(stack.rest("DELETE", f"/api/v2/report/{theirs}", world.admin))


def test_a_users_report_holds_only_their_sessions(stack: Stack, world: World) -> None:
    # Even when the filter asks for someone else's sessions.
    rid, report = ready_report(stack, world.ana, query_filter="user_id.in(u0,u1)")
    ids = {r[0] for r in csv_rows(stack, world.ana, rid)[1:]}
    assert ids == {s.id for s in world.specs if s.email.lower() == ANA}
    rid2, _ = ready_report(stack, world.admin, query_filter="user_id.in(u0,u1)")
    assert len(csv_rows(stack, world.admin, rid2)) - 1 == len(world.specs)
    # The same through a subscription's report: the scope is the subscriber's.
    assert report["user_id"] == ANA


def test_only_admin_and_auditor_may_use_the_system_report(stack: Stack, world: World) -> None:
    for path, body in (
        ("/api/v2/report", {"defined_report_id": "5"}),
        ("/api/v2/report/subscription", {"defined_report_id": "5", "period": "day"}),
        ("/api/v2/report/defined", {"title": "sys", "type": "system"}),
    ):
        r = stack.rest("POST", path, world.ana, json=body)
        assert r.status_code == 403, r.text
        assert "System report" in r.json()["message"]
    rid, _ = ready_report(stack, world.auditor, defined_report_id="5")
    metrics = dict(csv_rows(stack, world.auditor, rid)[1:])
    assert metrics["Sessions"] == str(len(world.specs))
    assert stack.rest("GET", f"/api/v2/report/{rid}", world.ana).status_code == 404


PATHS = [
    ("GET", "/api/v2/report", None), ("POST", "/api/v2/report", {}),
    ("GET", "/api/v2/report/attributes", None), ("GET", "/api/v2/report/criteria/attributes", None),
    ("GET", "/api/v2/report/1152921504606846977", None),
    ("DELETE", "/api/v2/report/1152921504606846977", None),
    ("GET", "/api/v2/report/1152921504606846977/csv", None),
    ("GET", "/api/v2/report/defined", None), ("POST", "/api/v2/report/defined", {}),
    ("GET", "/api/v2/report/defined/attributes", None), ("GET", "/api/v2/report/defined/5", None),
    ("PATCH", "/api/v2/report/defined/5", {"title": "x"}),
    ("DELETE", "/api/v2/report/defined/5", None),
    ("GET", "/api/v2/report/subscription", None), ("POST", "/api/v2/report/subscription", {}),
    ("GET", "/api/v2/report/subscription/attributes", None),
    ("GET", "/api/v2/report/subscription/1", None), ("DELETE", "/api/v2/report/subscription/1", None),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "body"), PATHS, ids=lambda x: str(x)[:40])
def test_every_path_needs_a_reading_role(
    stack: Stack, world: World, method: str, path: str, body: Any
) -> None:
    r = stack.rest(method, path, None, json=body)
    assert r.status_code == 401 and set(r.json()) == {"message"}
    r = stack.rest(method, path, world.ingest, json=body)
    assert r.status_code == 403 and "role 'ingest' may not" in r.json()["message"]


def test_other_orgs_objects_are_404(stack: Stack, world: World) -> None:
    rid = create_report(stack, world.other, defined_report_id="16")
    did = ok(stack.rest("POST", "/api/v2/report/defined", world.other, json={
        "title": "theirs", "type": "user"}))["defined_report"]["id"]  # fmt: skip
    for path in (f"/api/v2/report/{rid}", f"/api/v2/report/{rid}/html",
                 f"/api/v2/report/defined/{did}"):  # fmt: skip
        assert stack.rest("GET", path, world.admin).status_code == 404
    assert stack.rest("DELETE", f"/api/v2/report/{rid}", world.admin).status_code == 404
    r = stack.rest("POST", "/api/v2/report", world.admin, json={"defined_report_id": did})
    assert r.status_code == 404


# -- the audit log and the token reports ------------------------------------------------------


def test_user_activity_report_records_every_change(stack: Stack, world: World) -> None:
    org = stack.new_org("audit")
    admin = stack.token(org, "admin", "boss@acme.example")
    user = stack.token(org, "user", "kim@acme.example")
    did = ok(stack.rest("POST", "/api/v2/report/defined", user, json={
        "title": "k", "type": "user"}))["defined_report"]["id"]  # fmt: skip
    ok(stack.rest("PATCH", f"/api/v2/report/defined/{did}", user, json={"title": "k2"}))
    sid = ok(stack.rest("POST", "/api/v2/report/subscription", user, json={
        "period": "day", "defined_report_id": did}))["defined_report_subscription"]["id"]  # fmt: skip
    ok(stack.rest("DELETE", f"/api/v2/report/subscription/{sid}", user))
    rid = create_report(stack, user, defined_report_id=did)
    wait_report(stack, user, rid)
    ok(stack.rest("DELETE", f"/api/v2/report/{rid}", user))
    ok(stack.rest("DELETE", f"/api/v2/report/defined/{did}", user))

    async def revoke() -> None:
        conn = await db.connect(stack.dsn)
        try:
            token_id = await conn.fetchval(
                "SELECT t.id FROM api_tokens t JOIN orgs o ON o.id = t.org_id"
                " WHERE o.name = $1 AND t.email = 'kim@acme.example'", org)  # fmt: skip
            await auth.revoke_token(conn, str(token_id))
        finally:
            await conn.close()

    rid2, _ = ready_report(stack, admin, defined_report_id="14")
    rows = csv_rows(stack, admin, rid2)
    assert rows[0] == ["at", "actor", "role", "action", "object_type", "object_id", "details"]
    seen = [(r[1], r[3], r[4], r[5]) for r in rows[1:]]
    assert seen[:2] == [("session-audit cli", "create", "token", seen[0][3]),
                        ("session-audit cli", "create", "token", seen[1][3])]  # fmt: skip
    assert seen[2:] == [
        ("kim@acme.example", "create", "defined_report", did),
        ("kim@acme.example", "update", "defined_report", did),
        ("kim@acme.example", "create", "subscription", sid),
        ("kim@acme.example", "delete", "subscription", sid),
        ("kim@acme.example", "create", "report", rid),
        ("kim@acme.example", "delete", "report", rid),
        ("kim@acme.example", "delete", "defined_report", did),
        ("boss@acme.example", "create", "report", rid2),
    ]
    update = json.loads(rows[4][6])
    assert update == {"before": {"title": "k"}, "after": {"title": "k2"}}
    assert [r[0] for r in rows[1:]] == sorted(r[0] for r in rows[1:])
    # A revoked token shows up too; a user's own activity report holds only their changes.
    asyncio.run(revoke())
    rid3, _ = ready_report(stack, admin, defined_report_id="14")
    last = csv_rows(stack, admin, rid3)[-2]
    assert (last[1], last[3], last[4]) == ("session-audit cli", "revoke", "token")
    other_user = stack.token(org, "user", "lee@acme.example")
    rid4, _ = ready_report(stack, other_user, defined_report_id="14")
    assert [r[1] for r in csv_rows(stack, other_user, rid4)[1:]] == ["lee@acme.example"]


def test_user_privilege_report(stack: Stack, world: World) -> None:
    org = stack.new_org("priv")
    admin = stack.token(org, "admin", "Boss@acme.example")
    stack.token(org, "user", "kim@acme.example")
    stack.token(org, "user", "kim@acme.example")
    stack.token(org, "ingest", "bot@acme.example")
    rid, _ = ready_report(stack, admin, defined_report_id="15")
    rows = csv_rows(stack, admin, rid)
    assert rows[0][:4] == ["user_email", "role", "active_tokens", "revoked_tokens"]
    assert [r[:4] for r in rows[1:]] == [
        ["boss@acme.example", "admin", "1", "0"], ["bot@acme.example", "ingest", "1", "0"],
        ["kim@acme.example", "user", "2", "0"],
    ]  # fmt: skip


# -- bad input -------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("GET", "/api/v2/report", {"limit": "0"}, None, "limit: expected 1..100"),
    ("GET", "/api/v2/report", {"limit": "101"}, None, "limit: expected 1..100"),
    ("GET", "/api/v2/report", {"limit": "abc"}, None, "limit"),
    ("GET", "/api/v2/report", {"offset": "-1"}, None, "offset: expected 0..10000"),
    ("GET", "/api/v2/report", {"offset": "10001"}, None, "offset: expected 0..10000"),
    ("GET", "/api/v2/report", {"status": "READY"}, None, "status: expected one of pending"),
    ("GET", "/api/v2/report", {"defined_report_id": "1 OR 1=1"}, None, "defined_report_id: expected an id"),
    ("GET", "/api/v2/report", {"nope": "1"}, None, "nope"),
    ("GET", "/api/v2/report/defined", {"type": "System"}, None, "type: expected one of system"),
    ("GET", "/api/v2/report/defined", {"limit": "99999999999"}, None, "limit"),
    ("GET", "/api/v2/report/subscription", {"defined_report_id": "-5"}, None, "defined_report_id: expected an id"),
    ("GET", "/api/v2/report/0", None, None, "id: expected an id"),
    ("GET", "/api/v2/report/defined/5x", None, None, "id: expected an id"),
    ("GET", "/api/v2/report/subscription/%27%3B--", None, None, "id: expected an id"),
    ("POST", "/api/v2/report", None, {"defined_report_id": "abc"}, "defined_report_id: expected an id"),
    ("POST", "/api/v2/report", None, {"defined_report_id": 6}, "defined_report_id"),
    ("POST", "/api/v2/report", None, {"title": "x" * 201}, "title: expected 1..200"),
    ("POST", "/api/v2/report", None, {"title": "a\nb"}, "title: must not contain control"),
    ("POST", "/api/v2/report", None, {"criteria": [{"field": "colour", "value": "red"}]}, "criteria[0].field: unknown attribute 'colour'"),
    ("POST", "/api/v2/report", None, {"criteria": [{"field": "", "value": "x"}]}, "criteria[0].field: required"),
    ("POST", "/api/v2/report", None, {"criteria": [{"field": "created_at", "value": "today"}]}, "criteria[0].value: expected an RFC 3339"),
    ("POST", "/api/v2/report", None, {"criteria": [{"field": "verb", "value": "EXEC"}]}, "criteria[0].value: expected one of connect, exec"),
    ("POST", "/api/v2/report", None, {"criteria": [{"field": "protocol", "value": "x" * 1025}]}, "criteria[0].value: value longer than 1024"),
    ("POST", "/api/v2/report", None, {"criteria": "protocol=ssh"}, "criteria"),
    ("POST", "/api/v2/report", None, {"criteria": [{"field": "verb", "value": "exec"}] * 65}, "criteria: expected at most 64"),
    ("POST", "/api/v2/report", None, {"defined_report_id": "14", "query_filter": "verb.eq(exec)"}, "query_filter: the user_activity report is not computed from sessions"),
    ("POST", "/api/v2/report/defined", None, {"type": "user"}, "title: required"),
    ("POST", "/api/v2/report/defined", None, {"title": "t"}, "type: required"),
    ("POST", "/api/v2/report/defined", None, {"title": "t", "type": "User"}, "type: expected one of system"),
    ("POST", "/api/v2/report/defined", None, {"title": "t", "type": "user; DROP TABLE x"}, "type: expected one of"),
    ("POST", "/api/v2/report/defined", None, {"title": " ", "type": "user"}, "title: required"),
    ("POST", "/api/v2/report/defined", None, {"title": "t", "type": "user_privilege", "query_order": "created_at"}, "query_order: the user_privilege report"),
    ("POST", "/api/v2/report/defined", None, {"title": "t", "type": "user", "query_order": "x" * 600}, "query_order: expected at most 512"),
    ("POST", "/api/v2/report/subscription", None, {"defined_report_id": "6"}, "period: required"),
    ("POST", "/api/v2/report/subscription", None, {"period": "day"}, "defined_report_id: required"),
    ("POST", "/api/v2/report/subscription", None, {"period": "DAY", "defined_report_id": "6"}, "period: expected one of day, week, month, quarter, year, got 'DAY'"),
    ("POST", "/api/v2/report/subscription", None, {"period": "hourly", "defined_report_id": "6"}, "period: expected one of"),
    ("POST", "/api/v2/report/subscription", None, {"period": "day", "defined_report_id": "6", "time_zone": "Mars/Olympus"}, "time_zone: expected an IANA time zone"),
    ("POST", "/api/v2/report/subscription", None, {"period": "day", "defined_report_id": "6", "time_zone": "../../etc/passwd"}, "time_zone: expected an IANA time zone"),
    ("POST", "/api/v2/report/subscription", None, {"period": "day", "defined_report_id": "6", "time_zone": "+02:00"}, "time_zone:"),
    ("POST", "/api/v2/report/subscription", None, {"period": "day", "defined_report_id": "abc"}, "defined_report_id: expected an id"),
    ("POST", "/api/v2/report/subscription", None, "not json", "body:"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "params", "body", "message"), BAD_REQUESTS,
                         ids=lambda x: str(x)[:30])  # fmt: skip
def test_bad_input_is_400_naming_the_parameter(
    stack: Stack, world: World, method: str, path: str, params: Any, body: Any, message: str
) -> None:
    kw: dict[str, Any] = {"params": params}
    if isinstance(body, str):
        kw["content"] = body
        kw["headers"] = {"content-type": "application/json"}
    elif body is not None:
        kw["json"] = body
    before = stack.sql("SELECT (SELECT count(*) FROM reports) + (SELECT count(*) FROM"
                       " defined_reports) + (SELECT count(*) FROM report_subscriptions)")[0][0]  # fmt: skip
    r = stack.rest(method, path, world.admin, **kw)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    assert set(r.json()) == {"message"}
    assert message in r.json()["message"], r.json()
    after = stack.sql("SELECT (SELECT count(*) FROM reports) + (SELECT count(*) FROM"
                      " defined_reports) + (SELECT count(*) FROM report_subscriptions)")[0][0]  # fmt: skip
    assert after == before


def test_unknown_ids_are_404(stack: Stack, world: World) -> None:
    for method, path in (("GET", "/api/v2/report/123"), ("DELETE", "/api/v2/report/123"),
                         ("GET", "/api/v2/report/defined/17"),
                         ("PATCH", "/api/v2/report/defined/1000"),
                         ("DELETE", "/api/v2/report/defined/9223372036854775807"),
                         ("GET", "/api/v2/report/subscription/4"),
                         ("DELETE", "/api/v2/report/subscription/4")):  # fmt: skip
        r = stack.rest(
            method, path, world.admin, json={"title": "x"} if method == "PATCH" else None
        )
        assert r.status_code == 404, (path, r.text)
        assert r.json()["message"].endswith("not found")
    r = stack.rest("POST", "/api/v2/report/subscription", world.admin,
                   json={"period": "day", "defined_report_id": "17"})  # fmt: skip
    assert r.status_code == 404


def test_grpc_errors_carry_the_status(stack: Stack, world: World) -> None:
    stub = report_stub(stack)
    cases: list[tuple[Callable[[], object], grpc.StatusCode]] = [
        (lambda: stub.GetReport(rpb.GetReportRequest(id="x"), metadata=md(world.admin)),
         grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: stub.GetReport(rpb.GetReportRequest(id="42"), metadata=md(world.admin)),
         grpc.StatusCode.NOT_FOUND),
        (lambda: list(stub.DownloadReport(rpb.DownloadReportRequest(id="42", format="csv"),
                                          metadata=md(world.admin))), grpc.StatusCode.NOT_FOUND),
        (lambda: list(stub.DownloadReport(rpb.DownloadReportRequest(id="42", format="doc"),
                                          metadata=md(world.admin))),
         grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: stub.ListReports(rpb.ListReportsRequest(), metadata=md(world.ingest)),
         grpc.StatusCode.PERMISSION_DENIED),
        (lambda: stub.UpdateDefinedReport(rpb.UpdateDefinedReportRequest(id="5", title="x"),
                                          metadata=md(world.admin)),
         grpc.StatusCode.PERMISSION_DENIED),
    ]  # fmt: skip
    for call, code in cases:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code


def test_failed_generation_leaves_no_partial_rows(stack: Stack, world: World) -> None:
    async def go() -> None:
        conn: asyncpg.Connection = await db.connect(stack.dsn)
        try:
            n = await conn.fetchval(
                "SELECT count(*) FROM report_rows rr"
                " JOIN reports r ON r.org_id = rr.org_id AND r.id = rr.report_id"
                " WHERE r.status <> 'ready'"
            )
            assert n == 0
        finally:
            await conn.close()

    asyncio.run(go())


def test_a_report_whose_generation_keeps_dying_is_failed_not_retried_forever(
    stack: Stack, world: World
) -> None:
    """Each generation that starts is counted outside the generating transaction; a report whose
    earlier generations all died with their process (the count is what they leave behind) is
    failed on the next claim, with the reason. One interrupted attempt less still generates, and
    a finished report leaves no count."""

    async def insert(title: str, attempts: int) -> str:
        # One transaction: no generator may claim the report before its count is there.
        conn = await db.connect(stack.dsn)
        try:
            async with conn.transaction():
                org = await conn.fetchval("SELECT id FROM orgs WHERE name = $1", world.org)
                rid = await conn.fetchval(
                    "INSERT INTO reports (org_id, owner, owner_scope, defined_report_id, type,"
                    " title) VALUES ($1, 'admin@acme.example', 'org', 11, 'session_summary', $2)"
                    " RETURNING id", org, title)  # fmt: skip
                await conn.execute(
                    "INSERT INTO report_attempts (org_id, report_id, attempts) VALUES ($1, $2, $3)",
                    org, rid, attempts)  # fmt: skip
            return str(rid)
        finally:
            await conn.close()

    def pending(title: str, attempts: int) -> str:
        return asyncio.run(insert(title, attempts))

    doomed, survivor = pending("doomed", 3), pending("survivor", 2)
    report = wait_report(stack, world.admin, doomed)
    assert report["status"] == "failed"
    assert report["failure"].startswith("generation was interrupted 3 times")
    assert wait_report(stack, world.admin, survivor)["status"] == "ready"
    left = stack.sql(
        "SELECT count(*) AS n FROM report_attempts WHERE report_id = any($1::bigint[])",
        [int(doomed), int(survivor)],
    )
    assert left[0]["n"] == 0


def test_rest_bodies_refuse_fields_the_request_does_not_have(stack: Stack, world: World) -> None:
    """Envoy's transcoder would drop a misspelt body field (`query_filtr`) and answer 200 with a
    report of everything. Bodies are read strictly: 400 naming the field and what is allowed,
    and nothing is created or changed."""
    org = stack.new_org("strict")
    admin = stack.token(org, "admin", "admin@strict.example")
    did = ok(stack.rest("POST", "/api/v2/report/defined", admin,
                        json={"title": "Mine", "type": "session_summary"}))["defined_report"]["id"]  # fmt: skip

    def counts() -> list[int]:
        lists = ("/api/v2/report", "/api/v2/report/defined", "/api/v2/report/subscription")
        return [int(ok(stack.rest("GET", path, admin))["total"]) for path in lists]

    before = counts()
    cases: list[tuple[str, str, dict[str, Any], str]] = [
        ("POST", "/api/v2/report", {"query_filtr": "protocol.eq(ssh)"},
         "query_filtr: unknown field; expected one of criteria, defined_report_id, query_filter,"
         " query_order, title"),
        ("POST", "/api/v2/report", {"criteria": [{"field": "protocol", "value": "ssh", "op": "ne"}]},
         "criteria[0].op: unknown field; expected one of field, value"),
        ("POST", "/api/v2/report/defined",
         {"title": "t", "type": "session_summary", "query_filtr": "verb.eq(exec)"},
         "query_filtr: unknown field; expected one of query_filter, query_order, title, type"),
        ("PATCH", f"/api/v2/report/defined/{did}", {"title": "Renamed", "query_ordr": "!created_at"},
         "query_ordr: unknown field"),
        ("PATCH", f"/api/v2/report/defined/{did}", {"id": "5", "title": "Renamed"},
         f"id: given in the path ({did}); leave it out of the body"),
        ("POST", "/api/v2/report/subscription",
         {"period": "day", "defined_report_id": did, "time_zon": "Europe/Warsaw"},
         "time_zon: unknown field; expected one of defined_report_id, period, time_zone"),
        ("POST", "/api/v2/report/subscription", {"period": "day", "defined_report_id": 11},
         "defined_report_id: expected a string, got 11"),
    ]  # fmt: skip
    for method, path, body, message in cases:
        r = stack.rest(method, path, admin, json=body)
        assert r.status_code == 400, (path, body, r.text)
        assert r.json()["message"].startswith(message), (message, r.json())
    assert counts() == before
    got = ok(stack.rest("GET", f"/api/v2/report/defined/{did}", admin))["defined_report"]
    assert got["title"] == "Mine"
    # The same bodies without the typo work; an id in the body equal to the path's is fine.
    ok(stack.rest("PATCH", f"/api/v2/report/defined/{did}", admin,
                  json={"id": did, "title": "Renamed", "query_order": "!created_at"}))  # fmt: skip
    got = ok(stack.rest("GET", f"/api/v2/report/defined/{did}", admin))["defined_report"]
    assert (got["title"], got["query_order"]) == ("Renamed", "!created_at")
    ok(stack.rest("POST", "/api/v2/report/subscription", admin,
                  json={"period": "day", "defined_report_id": did, "time_zone": "Europe/Warsaw"}))  # fmt: skip
    assert counts() == [before[0], before[1], before[2] + 1]
    # Unauthenticated callers hear 401 before anything about their body.
    r = stack.rest("POST", "/api/v2/report", "sat_unknown", json={"query_filtr": "x"})
    assert r.status_code == 401
