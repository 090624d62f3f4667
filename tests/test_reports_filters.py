"""The filter and order language end to end: every operator alone and combined, orders, aliases,
the document's example, and malformed filters — each through POST /api/v2/report (Envoy),
generation, and the CSV download, against the plain-Python reference over the same sessions.
Also property tests: random filters either agree with the reference or get a 400."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from session_audit.core.errors import InvalidArgument
from session_audit.reports import filters as rf
from tests.report_reference import (
    T0,
    RSpec,
    T,
    filter_text,
    reference_ids,
    summary_ids,
    valid,
)
from tests.support import Stack

BIG = "1224979098644774913"  # beyond 2^53: 1224979098644774912 is a float neighbour
SCRIPT = "<script>alert('x')</script>"
FORMULA = "=cmd|' /C calc'!A0"
ODD = "a,b(c)%41 x"


def h(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def fixture_specs() -> list[RSpec]:
    doc_start = datetime(2025, 12, 20, 10, 0, tzinfo=UTC)
    return [
        # The document's example matches this one (and the next differs only in user_id).
        RSpec(start=doc_start, end=doc_start + timedelta(minutes=30), user_id=BIG,
              email="ana@acme.example", connection="win-jump", type="application",
              protocol="rdp", account="Administrator", verb="connect", review_status="APPROVED",
              approvers=("lead@acme.example",), labels={"retention_locked": "true"},
              tags={"env": "prod", "team": "it"}, exit_code=0, event_size=5000),
        RSpec(start=doc_start + timedelta(hours=1), end=doc_start + timedelta(hours=2),
              user_id="1224979098644774912", email="bruno@acme.example", connection="win-jump",
              type="application", protocol="RDP", account="Administrator", verb="connect",
              review_status="APPROVED", labels={"retention_locked": "TRUE"}, exit_code=0),
        RSpec(start=doc_start + timedelta(days=1), user_id=BIG, email="ana@acme.example",
              connection="win-jump", type="application", protocol="rdp", verb="connect",
              review_status="APPROVED", labels={"retention_locked": "true"}),
        RSpec(start=datetime(2026, 1, 11, tzinfo=UTC), end=datetime(2026, 1, 11, 1, tzinfo=UTC),
              user_id=BIG, email="ANA@acme.example", protocol="rdp", review_status="approved".upper(),
              labels={"retention_locked": "true"}, exit_code=2),
        RSpec(start=h(0), end=h(0.5), user_id="9007199254740993", email="chen@acme.example",
              connection=SCRIPT, account=FORMULA, name='O"Brien, Jr.\nsecond line',
              review_status="REJECTED", approvers=("lead@acme.example", "sec@acme.example"),
              exit_code=1, event_size=9007199254740991, correlation_id="task-1", jira="SEC-1"),
        RSpec(start=h(1), end=h(1.25), user_id="9007199254740992", email="chen@acme.example",
              connection=ODD, protocol="ssh", type="custom", account="root", exit_code=-1,
              event_size=0, resource="db1", jira="ops-7"),
        RSpec(start=h(2), user_id="sub-x", email="dara@acme.example", name="Zoë Łukasz Дмитрий",
              connection="сервер-1", protocol="ssh", type="custom", verb=None,
              review_status="PENDING", tags={"env": "staging"}, correlation_id="task-2"),
        RSpec(start=h(3), end=h(5), user_id="", email="", name="", connection="x" * 256,
              protocol="", account="", review_status="EXECUTED", approvers=("SEC@acme.example",),
              labels={"retention_locked": "false"}, exit_code=127, event_size=77),
        RSpec(start=h(3), end=h(3.1), user_id="42", email="eli@acme.example", verb="exec",
              review_status="REVOKED", exit_code=0, event_size=100, tags={"team": "data"}),
        RSpec(start=h(4), user_id="0042", email="eli@acme.example", connection="pg-staging",
              review_status="PROCESSING", event_size=101),
        RSpec(start=h(6), end=h(6.5), user_id="7", email="fatima@acme.example",
              connection="mysql-crm", protocol="mysql", review_status="UNKNOWN",
              labels={"retention_locked": "yes"}, exit_code=0, event_size=99),
        RSpec(start=h(7), end=h(9), user_id="1224979098644774913", email="ana@acme.example",
              connection="bastion", protocol="ssh", type="custom", verb="connect", exit_code=0,
              tags={"env": "prod", "team": "sre"}),
    ]  # fmt: skip


@dataclass
class World:
    specs: list[RSpec]
    admin: str


@pytest.fixture(scope="module")
def world(stack: Stack) -> World:
    org = stack.new_org("filters")
    admin = stack.token(org, "admin", "admin@acme.example")
    specs = fixture_specs()
    reply = stack.ingest(admin, [s.to_proto() for s in specs])
    assert (reply.written, reply.rejected) == (len(specs), 0), reply
    # Another org's session that would match everything: never in a report.
    other = stack.token(stack.new_org("filters-other"), "admin")
    stack.ingest(other, [RSpec(start=h(1), user_id=BIG).to_proto()])
    return World(specs, admin)


S = fixture_specs()
UUID0 = str(uuid.UUID(int=1))

SINGLE: list[T] = [
    # user_id: text equality, integer ordering of digit strings (exact beyond 2^53)
    T("user_id", "eq", (BIG,)),
    T("user_id", "ne", (BIG,)),
    T("user_id", "in", (BIG, "9007199254740993", "nobody")),
    T("user_id", "gt", ("9007199254740992",)),
    T("user_id", "ge", ("9007199254740993",)),
    T("user_id", "lt", ("1224979098644774913",)),
    T("user_id", "le", ("42",)),
    T("user_id", "isnull"),
    T("user_id", "isnull", neg=True),
    T("user_id", "match", ("4774",)),
    T("user_id", "imatch", ("SUB-",)),
    T("user_id", "iin", ("SUB-X",)),
    T("user", "eq", ("9007199254740992",)),
    # text attributes
    T("user_email", "eq", ("ana@acme.example",)),
    T("user_email", "iin", ("ANA@ACME.EXAMPLE", "Eli@Acme.Example")),
    T("user_email", "imatch", ("ANA",)),
    T("user_email", "match", ("ANA",)),
    T("user_email", "lt", ("c",)),
    T("user_email", "isnull"),
    T("connection", "eq", (SCRIPT,)),
    T("connection", "match", ("(c)%",)),
    T("connection", "in", (ODD, "bastion")),
    T("connection", "ne", ("win-jump",)),
    T("connection", "ge", ("z",)),
    T("server", "iin", ("WIN-JUMP",)),
    T("connection_type", "eq", ("application",)),
    T("type", "ne", ("database",)),
    T("protocol", "eq", ("rdp",)),
    T("protocol", "iin", ("rdp",)),
    T("subprotocol", "iin", ("rdp", "SSH")),
    T("protocol", "isnull"),
    T("account", "eq", (FORMULA,)),
    T("account", "match", ("cmd",)),
    T("user_name", "imatch", ("łukasz",)),
    T("user_name", "match", ('"Brien',)),
    T("resource_name", "isnull"),
    T("resource_name", "eq", ("db1",)),
    # enums
    T("verb", "eq", ("connect",)),
    T("verb", "ne", ("exec",)),
    T("verb", "in", ("connect", "exec")),
    T("verb", "iin", ("EXEC",)),
    T("verb", "isnull"),
    T("session_status", "eq", ("open",)),
    T("session_status", "eq", ("done",), neg=True),
    T("status", "eq", ("APPROVED",)),
    T("status", "iin", ("approved", "Rejected")),
    T("status", "in", ("PENDING", "PROCESSING")),
    T("status", "isnull"),
    T("status", "isnull", neg=True),
    T("status", "ne", ("APPROVED",)),
    T("status", "eq", ("APPROVED",), neg=True),
    T("review_status", "eq", ("EXECUTED",)),
    # times, with offsets honoured
    T("created_at", "ge", ("2025-12-09T12:00:51.564Z",)),
    T("created_at", "lt", ("2026-01-05T11:30:00+02:00",)),
    T("created_at", "le", ("2026-01-05T11:30:00+02:00",)),
    T("created_at", "eq", ("2026-01-05T12:30:00Z",)),
    T("created_at", "ne", ("2026-01-05T12:30:00Z",)),
    T("created_at", "in", ("2026-01-05T12:30:00Z", "2026-01-05T14:30:00+01:00")),
    T("created_at", "gt", ("2026-01-05T10:30:00-00:30",)),
    T("start_date", "le", ("2025-12-31T23:59:59.999999Z",)),
    T("finished_at", "isnull"),
    T("finished_at", "isnull", neg=True),
    T("finished_at", "gt", ("2026-01-05T10:00:00Z",)),
    T("end_date", "le", ("2026-01-05T10:00:00+00:00",)),
    # booleans
    T("retention_locked", None),
    T("retention_locked", None, neg=True),
    T("retention_locked", "eq", ("false",)),
    T("retention_locked", "eq", ("TRUE",)),
    T("retention_locked", "ne", ("true",)),
    T("retention_locked", "isnull"),
    # integers
    T("exit_code", "eq", ("0",)),
    T("exit_code", "ne", ("0",)),
    T("exit_code", "lt", ("1",)),
    T("exit_code", "ge", ("-1",)),
    T("exit_code", "in", ("1", "2", "127")),
    T("exit_code", "isnull"),
    T("event_size", "gt", ("9007199254740990",)),
    T("event_size", "eq", ("9007199254740991",)),
    T("event_size", "le", ("100",)),
    T("event_size", "ne", ("+100",)),
    # other text
    T("correlation_id", "eq", ("task-1",)),
    T("correlation_id", "isnull"),
    T("jira_issue_key", "eq", ("sec-1",)),
    T("jira_issue_key", "iin", ("SEC-1", "OPS-7")),
    # uuid
    T("id", "eq", (S[4].id,)),
    T("id", "iin", (S[4].id.upper(), S[5].id)),
    T("id", "in", (S[0].id, S[1].id)),
    T("id", "ne", (S[0].id,)),
    T("id", "lt", (UUID0,)),
    T("id", "ge", (UUID0,)),
    T("id", "isnull"),
]


def test_every_operator_is_covered() -> None:
    used = {t.op for t in SINGLE}
    assert set(rf.OPERATORS) <= used
    canonical = {rf.BY_NAME[t.attr].name for t in SINGLE}
    assert canonical == {a.name for a in rf.ATTRIBUTES}


@pytest.mark.parametrize("term", SINGLE, ids=lambda t: t.text()[:50])
def test_single_term_matches_reference(stack: Stack, world: World, term: T) -> None:
    assert valid(term), term
    expected = reference_ids(world.specs, [term])
    assert summary_ids(stack, world.admin, term.text()) == expected


COMBINABLE = [
    T("protocol", "iin", ("rdp",)),
    T("retention_locked", None),
    T("finished_at", "isnull", neg=True),
    T("status", "iin", ("approved",)),
    T("user_id", "in", (BIG,)),
    T("exit_code", "eq", ("0",)),
    T("created_at", "ge", ("2026-01-01T00:00:00Z",)),
    T("user_email", "imatch", ("ACME",)),
]


@pytest.mark.parametrize("pair", list(itertools.combinations(COMBINABLE, 2)),
                         ids=lambda p: "&".join(t.attr for t in p))  # fmt: skip
def test_term_pairs_match_reference(stack: Stack, world: World, pair: tuple[T, T]) -> None:
    expected = reference_ids(world.specs, list(pair))
    assert summary_ids(stack, world.admin, filter_text(pair)) == expected


def test_the_document_example_parses_and_runs(stack: Stack, world: World) -> None:
    example = (
        "created_at.ge(2025-12-09T12%3A00%3A51.564Z),created_at.le(2026-01-10T12%3A00%3A51.564Z),"
        "subprotocol.iin(rdp),user_id.in(1224979098644774913),retention_locked,"
        "!finished_at.isnull(),status.iin(approved)"
    )
    got = summary_ids(stack, world.admin, example, "!finished_at")
    # Only the first fixture session: the second differs by one in a 64-bit user id, the third
    # is unfinished, the fourth is after the period.
    assert got == [world.specs[0].id]
    # As a definition too (the document's request, type system as in its example).
    r = stack.rest("POST", "/api/v2/report/defined", world.admin, json={
        "title": "TestingAAA", "type": "system", "query_filter": example,
        "query_order": "!finished_at"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["defined_report"]["id"].isdigit()


def test_negation_is_the_exact_complement(stack: Stack, world: World) -> None:
    for term in (T("status", "eq", ("APPROVED",)), T("exit_code", "lt", ("1",)),
                 T("user_id", "gt", ("100",))):  # fmt: skip
        yes = set(summary_ids(stack, world.admin, term.text()))
        neg = T(term.attr, term.op, term.values, neg=True)
        no = set(summary_ids(stack, world.admin, neg.text()))
        assert yes.isdisjoint(no)
        assert yes | no == {s.id for s in world.specs}


ORDERS: list[list[tuple[str, bool]]] = [
    [("finished_at", True)],
    [("finished_at", False)],
    [("user_id", False)],
    [("exit_code", True), ("created_at", False)],
    [("connection", False)],
    [("retention_locked", True), ("user_email", False)],
    [("event_size", True)],
    [("status", False), ("created_at", True)],
    [("id", False)],
    [("end_date", True)],
]


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: ",".join(("!" if d else "") + a
                                                                   for a, d in o))  # fmt: skip
def test_order_matches_reference_nulls_last(
    stack: Stack, world: World, order: list[tuple[str, bool]]
) -> None:
    text = ",".join(("!" if desc else "") + attr for attr, desc in order)
    assert summary_ids(stack, world.admin, "", text) == reference_ids(world.specs, [], order)


def test_filter_and_order_together(stack: Stack, world: World) -> None:
    terms = [T("user_email", "imatch", ("acme",)), T("exit_code", "isnull", neg=True)]
    order = [("exit_code", False), ("user_id", True)]
    got = summary_ids(stack, world.admin, filter_text(terms), "exit_code,!user_id")
    assert got == reference_ids(world.specs, terms, order)


BAD_FILTERS = [
    ("nope.eq(1)", "query_filter: term 1 'nope.eq(1)' at position 1: unknown attribute 'nope'"),
    ("status.iin(approved),foo", "term 2 'foo' at position 22: unknown attribute"),
    ("status.like(x)", "term 1 'status.like(x)' at position 1: unknown operator 'like'"),
    ("verb.gt(exec)", "operator gt does not apply to verb"),
    ("retention_locked.match(t)", "operator match does not apply to retention_locked"),
    ("status.eq(APPROVED", "unbalanced parentheses"),
    ("status.eq(APPROVED))", "unbalanced parentheses"),
    (
        "created_at.ge(2025-12-09)",
        "term 1 'created_at.ge(2025-12-09)' at position 1: expected an RFC 3339 date-time",
    ),
    ("created_at.ge(yesterday)", "expected an RFC 3339 date-time"),
    ("exit_code.eq(one)", "expected a 64-bit integer, got 'one'"),
    ("exit_code.eq(99999999999999999999)", "expected a 64-bit integer"),
    ("id.eq(1)", "expected a UUID"),
    ("retention_locked.eq(maybe)", "expected true or false"),
    ("status.eq(approved)", "use iin for a case-insensitive match"),
    ("status", "a bare attribute is only allowed for boolean attributes"),
    ("user_id.gt(abc)", "compares ids as integers; expected digits"),
    ("status.eq()", "expected a value"),
    ("status.isnull(x)", "isnull takes no value"),
    ("status.eq(A,B)", "eq takes one value"),
    ("connection.eq(a(b))", "URL-encoded"),
    ("connection.eq(x),,verb.eq(exec)", "term 2"),
    ("connection.eq(%FF)", "not valid URL-encoded UTF-8"),
    ("!", "query_filter:"),
    ("' OR 1=1 --", "unexpected"),
    ("connection.eq(x);DROP TABLE sessions", "unexpected"),
    ("a" * 5000, "query_filter: expected at most 4096 characters"),
    ("connection.eq(a\nb)", "control characters"),
    (",".join(["verb.eq(exec)"] * 65), "expected at most 64 terms"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILTERS, ids=lambda x: str(x)[:30])
def test_bad_filter_is_400_naming_term_and_position(
    stack: Stack, world: World, text: str, message: str
) -> None:
    for path, body in (
        ("/api/v2/report", {"query_filter": text}),
        ("/api/v2/report/defined", {"title": "t", "type": "session_summary", "query_filter": text}),
    ):
        r = stack.rest("POST", path, world.admin, json=body)
        assert r.status_code == 400, r.text
        assert set(r.json()) == {"message"}
        assert r.json()["message"].startswith("query_filter:"), r.json()
        assert message in r.json()["message"]


BAD_ORDERS = [
    ("nope", "query_order: key 1 'nope' at position 1: unknown attribute"),
    ("created_at,!created_at", "appears twice"),
    ("!!created_at", "query_order:"),
    ("created_at.eq(1)", "query_order:"),
    ("created_at desc", "query_order:"),
    (",".join(a.name for a in rf.ATTRIBUTES[:9]), "expected at most 8 keys"),
]


@pytest.mark.parametrize(("text", "message"), BAD_ORDERS)
def test_bad_order_is_400(stack: Stack, world: World, text: str, message: str) -> None:
    r = stack.rest("POST", "/api/v2/report", world.admin, json={"query_order": text})
    assert r.status_code == 400, r.text
    assert message in r.json()["message"]


def test_criteria_are_anded_across_fields_and_ored_within(stack: Stack, world: World) -> None:
    criteria = [{"field": "protocol", "value": "ssh"}, {"field": "protocol", "value": "rdp"},
                {"field": "user", "value": BIG}]  # fmt: skip
    rid = ready_summary(stack, world, {"criteria": criteria})
    expected = reference_ids(world.specs, [T("protocol", "in", ("ssh", "rdp")),
                                           T("user_id", "eq", (BIG,))])  # fmt: skip
    assert rid == expected


def ready_summary(stack: Stack, world: World, body: dict[str, object]) -> list[str]:
    from tests.report_reference import csv_rows, ready_report

    rid, _ = ready_report(stack, world.admin, **body)
    return [r[0] for r in csv_rows(stack, world.admin, rid)[1:]]


# -- properties ------------------------------------------------------------------------------

VALUES = [BIG, "1224979098644774912", "9007199254740993", "42", "0042", "sub-x", "", "x",
          "ana@acme.example", "ANA", "acme", "rdp", "RDP", "ssh", SCRIPT, FORMULA, ODD,
          "APPROVED", "approved", "connect", "EXEC", "open", "done", "true", "false", "0", "-1",
          "127", "9007199254740991", "2026-01-05T10:00:00Z", "2026-01-05T11:30:00+02:00",
          "2025-12-20T10:00:00.000Z", "2026-01-05", "not a date", S[0].id, S[4].id.upper(),
          "Zoë", "сервер-1", "%", "(", ",", "a b"]  # fmt: skip
NAMES = [*rf.BY_NAME, "nope", "Status"]


@st.composite
def terms(draw: st.DrawFn) -> T:
    attr = draw(st.sampled_from(NAMES))
    op = draw(st.sampled_from([*rf.OPERATORS, None, "like"]))
    if op is None:
        values: tuple[str, ...] = ()
    elif op == "isnull":
        values = draw(st.sampled_from([(), ("x",)]))
    else:
        n = draw(st.sampled_from([1, 1, 1, 2, 3])) if op in ("in", "iin") else 1
        values = tuple(draw(st.sampled_from(VALUES)) for _ in range(n))
    return T(attr, op, values, draw(st.booleans()))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(terms(), min_size=1, max_size=3))
def test_random_filters_agree_with_reference_or_are_400(
    stack: Stack, world: World, filt: list[T]
) -> None:
    text = filter_text(filt)
    if all(valid(t) for t in filt):
        assert summary_ids(stack, world.admin, text) == reference_ids(world.specs, filt), text
    else:
        r = stack.rest("POST", "/api/v2/report", world.admin, json={"query_filter": text})
        assert r.status_code == 400, (text, r.text)
        assert r.json()["message"].startswith("query_filter:")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("abz_.,()!%3A0 eqinulsgt\t")), max_size=40))
def test_parser_never_fails_other_than_invalid_argument(text: str) -> None:
    try:
        terms_ = rf.parse_filter(text)
    except InvalidArgument as exc:
        assert exc.message.startswith("query_filter:")
    else:
        # Whatever parses renders back to a filter that parses to the same terms.
        again = rf.parse_filter(rf.render_filter(terms_))
        assert [(t.attribute, t.op, t.values, t.negated) for t in again] == [
            (t.attribute, t.op, t.values, t.negated) for t in terms_
        ]


POOLS = {
    "string": ["ana@acme.example", "acme", "rdp", "RDP", "ssh", SCRIPT, FORMULA, ODD, "win-jump",
               "x", "Zoë", "a b", "%", "db1", "task-1", "sec-1", "bastion", "mysql"],
    "id": [BIG, "1224979098644774912", "9007199254740993", "9007199254740992", "42", "0042",
           "7", "sub-x"],
    "uuid": [s.id for s in S[:6]] + [UUID0],
    "datetime": ["2025-12-20T10:00:00Z", "2026-01-05T09:30:00Z", "2026-01-05T11:30:00+02:00",
                 "2026-01-05T12:30:00.5Z", "2026-01-11T00:00:00-05:00", "2024-01-01T00:00:00Z"],
    "integer": ["0", "1", "-1", "2", "127", "99", "100", "9007199254740991", "9007199254740990"],
    "boolean": ["true", "false", "TRUE"],
}  # fmt: skip


@st.composite
def typed_terms(draw: st.DrawFn) -> T:
    """Terms built to be valid most of the time, so the property compares results."""
    attr = draw(st.sampled_from(sorted(rf.BY_NAME)))
    a = rf.BY_NAME[attr]
    op = draw(st.sampled_from([*a.operators, *([None] if a.kind == "boolean" else [])]))
    if op is None or op == "isnull":
        return T(attr, op, (), draw(st.booleans()))
    pool = [*a.values, *(v.lower() for v in a.values)] if a.kind == "enum" else POOLS[a.kind]
    n = draw(st.integers(1, 3)) if op in ("in", "iin") else 1
    return T(attr, op, tuple(draw(st.sampled_from(pool)) for _ in range(n)), draw(st.booleans()))


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(typed_terms(), min_size=1, max_size=3))
def test_random_typed_filters_agree_with_reference(
    stack: Stack, world: World, filt: list[T]
) -> None:
    text = filter_text(filt)
    if all(valid(t) for t in filt):
        assert summary_ids(stack, world.admin, text) == reference_ids(world.specs, filt), text
    else:
        r = stack.rest("POST", "/api/v2/report", world.admin, json={"query_filter": text})
        assert r.status_code == 400, (text, r.text)
