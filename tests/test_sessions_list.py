"""ListSessions / GetSession through Envoy and over gRPC, against a hand-built fixture."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import grpc
import pytest

from session_audit.v1 import sessions_pb2 as pb
from tests.factories import T0, Spec, minutes, reference_list
from tests.support import Stack, auth_md

ANA, BRUNO, CHEN = "ana@acme.example", "bruno@acme.example", "chen@acme.example"


@dataclass
class World:
    org: str
    specs: list[Spec]
    admin: str
    auditor: str
    ana: str
    ingest: str
    other_admin: str
    other_ids: list[str]


def fixture_specs() -> list[Spec]:
    """14 sessions with every filterable attribute varied; two share a start time."""
    same = T0 + minutes(300)
    return [
        Spec(start=T0, end=T0 + minutes(30), user_id="sub-ana", email=ANA, jira="SEC-1",
             review_status="APPROVED", approvers=("Lead@Acme.example",), correlation_id="task-1",
             script="SELECT 1", redactions=(("EMAIL_ADDRESS", 3, 60),)),
        Spec(start=T0 + minutes(10), user_id="sub-bruno", email=BRUNO, connection="pg-staging",
             jira="sec-2", review_status="PENDING"),
        Spec(start=T0 + minutes(20), end=T0 + minutes(21), user_id="sub-chen", email=CHEN,
             connection="bastion", type="custom", subtype="ssh", verb="connect",
             review_status="REJECTED", approvers=("lead@acme.example", "sec@acme.example")),
        Spec(start=T0 + minutes(60), user_id="sub-ana", email=ANA, connection="bastion",
             type="custom", subtype="ssh", verb="connect", correlation_id="task-1"),
        Spec(start=T0 + minutes(90), end=T0 + minutes(95), user_id="sub-ana", email=ANA,
             jira="OPS-7", review_status="EXECUTED", approvers=("sec@acme.example",)),
        Spec(start=T0 + minutes(120), user_id="sub-bruno", email=BRUNO, connection="win",
             type="application", subtype="rdp", verb="connect"),
        Spec(start=T0 + minutes(150), end=T0 + minutes(200), user_id="sub-chen", email=CHEN,
             correlation_id="task-2", review_status="APPROVED", approvers=("lead@acme.example",)),
        Spec(start=T0 + minutes(180), user_id="sub-ana", email="ANA@acme.example", jira="SEC-1"),
        Spec(start=T0 + minutes(240), end=T0 + minutes(241), user_id="sub-bruno", email=BRUNO,
             review_status="REVOKED"),
        Spec(start=same, user_id="sub-chen", email=CHEN, connection="pg-staging"),
        Spec(start=same, user_id="sub-ana", email=ANA, connection="pg-staging"),
        Spec(start=T0 + minutes(400), end=T0 + minutes(401), user_id="sub-ana", email=ANA,
             review_status="UNKNOWN"),
        Spec(start=T0 + timedelta(days=1), user_id="sub-bruno", email=BRUNO, jira="SEC-3",
             correlation_id="task-3"),
        Spec(start=T0 + timedelta(days=2), end=T0 + timedelta(days=2, minutes=5),
             user_id="sub-chen", email=CHEN, review_status="PROCESSING"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def world(stack: Stack) -> World:
    org, other = stack.new_org("acme"), stack.new_org("globex")
    specs = fixture_specs()
    admin = stack.token(org, "admin", "admin@acme.example")
    reply = stack.ingest(admin, [s.to_proto() for s in specs])
    assert (reply.accepted, reply.written, reply.rejected) == (len(specs), len(specs), 0)
    other_admin = stack.token(other, "admin")
    other_specs = [Spec(start=T0 + minutes(5), email=ANA, user_id="sub-ana")]
    stack.ingest(other_admin, [s.to_proto() for s in other_specs])
    return World(
        org=org,
        specs=specs,
        admin=admin,
        auditor=stack.token(org, "auditor"),
        ana=stack.token(org, "user", ANA),
        ingest=stack.token(org, "ingest"),
        other_admin=other_admin,
        other_ids=[s.id for s in other_specs],
    )


def rest_ids(stack: Stack, token: str, params: dict[str, Any]) -> list[str]:
    r = stack.rest("GET", "/api/sessions", token, params={"limit": 100, **params})
    assert r.status_code == 200, r.text
    return [d["id"] for d in r.json()["data"]]


SINGLE_FILTERS: list[dict[str, str]] = [
    {},
    {"user": "sub-ana"},
    {"user": "SUB-ANA"},
    {"connection": "pg-staging"},
    {"connection": "bastion"},
    {"type": "custom"},
    {"type": "application"},
    {"review.status": "APPROVED"},
    {"review.status": "approved"},
    {"review.status": "PENDING"},
    {"review.approver": "lead@acme.example"},
    {"review.approver": "SEC@ACME.EXAMPLE"},
    {"review.approver": "nobody@acme.example"},
    {"correlation_id": "task-1"},
    {"jira_issue_key": "sec-1"},
    {"jira_issue_key": "SEC-2, ops-7 ,"},
    {"start_date": "2026-03-01T13:00:00Z"},
    {"end_date": "2026-03-01T13:00:00Z"},
    # Offsets are honoured: 15:00+02:00 is 13:00Z.
    {"end_date": "2026-03-01T15:00:00+02:00"},
    {"start_date": "2026-03-01T12:00:00Z", "end_date": "2026-03-01T12:00:00Z"},
]


@pytest.mark.parametrize("params", SINGLE_FILTERS, ids=lambda p: "&".join(p) or "none")
def test_each_filter_matches_reference(stack: Stack, world: World, params: dict[str, str]) -> None:
    assert rest_ids(stack, world.admin, params) == reference_list(world.specs, params)


COMBINABLE = [
    ("user", "sub-ana"),
    ("connection", "pg-prod"),
    ("type", "database"),
    ("review.status", "APPROVED"),
    ("jira_issue_key", "SEC-1,sec-3"),
    ("start_date", "2026-03-01T12:30:00Z"),
    ("end_date", "2026-03-02T00:00:00Z"),
    ("correlation_id", "task-1"),
]


@pytest.mark.parametrize("combo", list(itertools.combinations(COMBINABLE, 2)))
def test_filter_pairs_match_reference(
    stack: Stack, world: World, combo: tuple[tuple[str, str], ...]
) -> None:
    params = dict(combo)
    assert rest_ids(stack, world.admin, params) == reference_list(world.specs, params)


def test_three_filters_combined(stack: Stack, world: World) -> None:
    params = {"type": "database", "user": "sub-ana", "start_date": "2026-03-01T12:00:00Z"}
    expected = reference_list(world.specs, params)
    assert len(expected) >= 3
    assert rest_ids(stack, world.admin, params) == expected


def test_ties_on_start_date_order_by_id_desc(stack: Stack, world: World) -> None:
    tied = sorted((s.id for s in world.specs if s.start == T0 + minutes(300)), reverse=True)
    ids = rest_ids(stack, world.admin, {"connection": "pg-staging"})
    assert [i for i in ids if i in tied] == tied


def test_offset_pages_cover_the_list_once(stack: Stack, world: World) -> None:
    expected = reference_list(world.specs, {})
    seen: list[str] = []
    for offset in range(0, len(expected) + 5, 5):
        r = stack.rest("GET", "/api/sessions", world.admin, params={"limit": 5, "offset": offset})
        body = r.json()
        seen += [d["id"] for d in body["data"]]
        assert body["has_next_page"] == (offset + 5 < len(expected))
    assert seen == expected


def test_exactly_full_last_page_has_no_next(stack: Stack, world: World) -> None:
    # 14 sessions: limit 7 → two full pages, the second must say there is nothing after it.
    body = stack.rest("GET", "/api/sessions", world.admin, params={"limit": 7, "offset": 7}).json()
    assert len(body["data"]) == 7
    assert body["has_next_page"] is False
    assert body["next_page_token"] == ""


def test_cursor_pages_match_offset_pages(stack: Stack, world: World) -> None:
    params = {"type": "database", "limit": 3}
    expected = reference_list(world.specs, {"type": "database"})
    seen: list[str] = []
    token = ""
    while True:
        q = {**params, **({"page_token": token} if token else {})}
        body = stack.rest("GET", "/api/sessions", world.admin, params=q).json()
        seen += [d["id"] for d in body["data"]]
        token = body["next_page_token"]
        assert body["has_next_page"] == bool(token)
        if not token:
            break
    assert seen == expected


def test_cursor_rejected_with_other_filters_or_offset(stack: Stack, world: World) -> None:
    body = stack.rest("GET", "/api/sessions", world.admin, params={"limit": 2}).json()
    token = body["next_page_token"]
    r = stack.rest("GET", "/api/sessions", world.admin, params={"page_token": token, "type": "x"})
    assert r.status_code == 400 and r.json()["message"].startswith("page_token:")
    r = stack.rest("GET", "/api/sessions", world.admin, params={"page_token": token, "offset": 2})
    assert r.status_code == 400 and r.json()["message"].startswith("page_token:")
    r = stack.rest("GET", "/api/sessions", world.admin, params={"page_token": "garbage!!"})
    assert r.status_code == 400 and r.json()["message"].startswith("page_token:")


def test_count_modes(stack: Stack, world: World) -> None:
    n = len(world.specs)
    for mode, total in (("exact", n), ("capped", n), (None, n)):
        params: dict[str, Any] = {"limit": 1, **({"count": mode} if mode else {})}
        body = stack.rest("GET", "/api/sessions", world.admin, params=params).json()
        assert body["total"] == total and body["total_is_capped"] is False
    body = stack.rest("GET", "/api/sessions", world.admin, params={"count": "none"}).json()
    assert body["total"] is None
    body = stack.rest("GET", "/api/sessions", world.admin, params={"count": "EXACT"}).json()
    assert body["total"] == n


def test_total_comes_with_an_empty_page(stack: Stack, world: World) -> None:
    """The page and its total are read in one statement: a page past the end (no row) still
    says how many sessions match, and a filter matching nothing says 0."""
    n = len(world.specs)
    for mode in ("exact", "capped"):
        params: dict[str, Any] = {"offset": n, "count": mode}
        body = stack.rest("GET", "/api/sessions", world.admin, params=params).json()
        assert body["data"] == [] and body["has_next_page"] is False
        assert body["total"] == n and body["total_is_capped"] is False
        params = {"connection": "no-such-connection", "count": mode}
        body = stack.rest("GET", "/api/sessions", world.admin, params=params).json()
        assert body["data"] == [] and body["total"] == 0 and body["has_next_page"] is False
    # The last page: its rows, in order, and the total beside them.
    params = {"offset": n - 2, "limit": 5, "count": "exact"}
    body = stack.rest("GET", "/api/sessions", world.admin, params=params).json()
    everything = stack.rest("GET", "/api/sessions", world.admin, params={"limit": n}).json()
    assert [s["id"] for s in body["data"]] == [s["id"] for s in everything["data"]][-2:]
    assert body["total"] == n and body["has_next_page"] is False


def test_list_has_script_size_but_not_script_get_has_script(stack: Stack, world: World) -> None:
    with_script = next(s for s in world.specs if s.script)
    listed = stack.rest("GET", "/api/sessions", world.admin, params={"correlation_id": "task-1"})
    row = next(d for d in listed.json()["data"] if d["id"] == with_script.id)
    assert "script" not in row
    assert row["script_size"] == len(with_script.script or "")
    got = stack.rest("GET", f"/api/sessions/{with_script.id.upper()}", world.admin).json()
    assert got["script"] == {"data": with_script.script}
    assert got["redactions"] == [
        {"info_type": "EMAIL_ADDRESS", "count": 3, "transformed_bytes": 60}
    ]


def test_json_types_follow_the_document(stack: Stack, world: World) -> None:
    first = world.specs[0]
    got = stack.rest("GET", f"/api/sessions/{first.id}", world.admin).json()
    assert got["start_date"] == "2026-03-01T12:00:00Z"
    assert got["end_date"] == "2026-03-01T12:30:00Z"
    assert got["status"] == "done" and got["verb"] == "exec"
    assert isinstance(got["event_size"], int) and isinstance(got["exit_code"], int)
    assert got["review"]["status"] == "APPROVED"
    assert got["integrations_metadata"] == {"jira_issue_key": "SEC-1"}
    open_one = stack.rest("GET", f"/api/sessions/{world.specs[1].id}", world.admin).json()
    assert open_one["status"] == "open" and "end_date" not in open_one


def test_org_isolation(stack: Stack, world: World) -> None:
    mine = set(rest_ids(stack, world.admin, {}))
    theirs = set(rest_ids(stack, world.other_admin, {}))
    assert theirs == set(world.other_ids)
    assert not mine & theirs
    r = stack.rest("GET", f"/api/sessions/{world.specs[0].id}", world.other_admin)
    assert r.status_code == 404 and r.json() == {"message": r.json()["message"]}


def test_the_same_id_in_two_orgs_is_two_sessions(stack: Stack) -> None:
    """Session ids are unique per org (key (org_id, id)): an org sending an id another org
    uses stores its own session, and neither org can tell the other's exists."""
    a = stack.token(stack.new_org("twin-a"), "admin", "admin@a.example")
    b = stack.token(stack.new_org("twin-b"), "admin", "admin@b.example")
    theirs = Spec(email="ana@a.example", connection="db-a", end=T0 + timedelta(minutes=5))
    mine = replace(theirs, email="bob@b.example", connection="db-b", end=None)
    assert stack.ingest(a, [theirs.to_proto()]).written == 1
    reply = stack.ingest(b, [mine.to_proto()])
    assert (reply.accepted, reply.written, reply.rejected) == (1, 1, 0)
    got_a = stack.rest("GET", f"/api/sessions/{theirs.id}", a).json()
    got_b = stack.rest("GET", f"/api/sessions/{theirs.id}", b).json()
    assert (got_a["user"], got_a["connection"], got_a["status"]) == (
        "ana@a.example",
        "db-a",
        "done",
    )
    assert (got_b["user"], got_b["connection"], got_b["status"]) == (
        "bob@b.example",
        "db-b",
        "open",
    )
    assert rest_ids(stack, a, {}) == rest_ids(stack, b, {}) == [theirs.id]
    # An update from b changes b's session only.
    stack.ingest(b, [replace(mine, end=T0 + timedelta(hours=1)).to_proto()])
    assert (
        stack.rest("GET", f"/api/sessions/{theirs.id}", a).json()["end_date"] == (got_a["end_date"])
    )
    assert stack.rest("GET", f"/api/sessions/{theirs.id}", b).json()["status"] == "done"


def test_user_role_sees_only_own_sessions(stack: Stack, world: World) -> None:
    own = [s for s in world.specs if s.email.lower() == ANA]
    expected = reference_list(own, {})
    assert rest_ids(stack, world.ana, {}) == expected
    bruno_session = next(s for s in world.specs if s.email == BRUNO)
    assert stack.rest("GET", f"/api/sessions/{bruno_session.id}", world.ana).status_code == 404
    # Filters narrow within what the user may see; they never widen it.
    assert rest_ids(stack, world.ana, {"user": "sub-bruno"}) == []


def test_auditor_reads_whole_org(stack: Stack, world: World) -> None:
    assert rest_ids(stack, world.auditor, {}) == reference_list(world.specs, {})


def test_ingest_token_cannot_read(stack: Stack, world: World) -> None:
    r = stack.rest("GET", "/api/sessions", world.ingest)
    assert r.status_code == 403
    assert "ingest" in r.json()["message"]
    with pytest.raises(grpc.RpcError) as err:
        stack.stub().ListSessions(pb.ListSessionsRequest(), metadata=auth_md(world.ingest))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("role", ["auditor", "user"])
def test_readers_cannot_ingest(stack: Stack, world: World, role: str) -> None:
    token = world.auditor if role == "auditor" else world.ana
    r = stack.rest("POST", "/api/sessions/ingest", token, json={"sessions": [{"id": "x"}]})
    assert r.status_code == 403


@pytest.mark.parametrize(
    "header",
    [None, "Bearer", "Bearer nope", "Basic abc", "bearer sat_unknown", ""],
)
def test_missing_or_unknown_token_is_401(stack: Stack, header: str | None) -> None:
    headers = {} if header is None else {"authorization": header}
    r = stack.rest("GET", "/api/sessions", headers=headers)
    assert r.status_code == 401
    assert set(r.json()) == {"message"}
    assert not [h for h in r.headers if h.lower().startswith("grpc-")]


def test_revoked_token_stops_at_once(stack: Stack) -> None:
    org = stack.new_org()
    token = stack.token(org, "auditor")
    assert stack.rest("GET", "/api/sessions", token).status_code == 200
    stack.sql("UPDATE api_tokens SET revoked_at = now() WHERE prefix = $1", token[:10])
    assert stack.rest("GET", "/api/sessions", token).status_code == 401
    with pytest.raises(grpc.RpcError) as err:
        stack.stub().ListSessions(pb.ListSessionsRequest(), metadata=auth_md(token))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_grpc_list_matches_rest(stack: Stack, world: World) -> None:
    reply = stack.stub().ListSessions(
        pb.ListSessionsRequest(type="database", limit=100), metadata=auth_md(world.admin)
    )
    assert [s.id for s in reply.data] == reference_list(world.specs, {"type": "database"})
    assert reply.total.number_value == len(reply.data)
    got = stack.stub().GetSession(
        pb.GetSessionRequest(id=world.specs[0].id), metadata=auth_md(world.admin)
    )
    assert got.script.data == "SELECT 1"
