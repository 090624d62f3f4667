"""Ingest validation has two paths (sessions/rows.py): a fast path for valid sessions and the
reference (`checked_item`), which words every rejection. The fast path must give exactly the
reference's item whenever it gives one, and leave everything else to the reference; these
tests generate sessions at and beyond every domain edge and compare the two."""

from __future__ import annotations

import math
import random
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf import timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from session_audit.core import validation
from session_audit.core.schema import INGEST_COLUMNS
from session_audit.seed import demo_sessions
from session_audit.sessions import rows
from session_audit.sessions.rows import ItemError
from session_audit.v1 import sessions_pb2 as pb

ORG = uuid.UUID("6f1c2d4e-0a7b-4c3d-9e8f-112233445566")
NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)
NOW_S = int((NOW - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds())

# Each domain as (valid values, values at or beyond its edges): a generated session is either
# friendly (every field valid, so the fast path must take it) or hostile (each field beyond
# its edge with a chance of one in four or one in 41).
VALID_IDS = [
    "815ef6d1-3b8f-4a18-b7f8-a88b17fc695a",
    " 815ef6d1-3b8f-4a18-b7f8-a88b17fc695a\n",
    "815EF6D1-3B8F-4A18-B7F8-A88B17FC695A",
    "{815ef6d1-3b8f-4a18-b7f8-a88b17fc695a}",
    "urn:uuid:815ef6d1-3b8f-4a18-b7f8-a88b17fc695a",
    "815ef6d13b8f4a18b7f8a88b17fc695a",
]
BAD_IDS = [
    "815ef6d1-3b8f-4a18-b7f8-a88b17fc695",
    "815ef6d1-3b8f-4a18-b7f8-a88b17fc695 ",
    "",
    "x",
    "815ef6d1_3b8f_4a18_b7f8_a88b17fc695a",
]
ids = (st.sampled_from(VALID_IDS), st.sampled_from(BAD_IDS))
orgs = (
    st.sampled_from(["", str(ORG), str(ORG).upper(), f" {ORG} "]),
    st.sampled_from([str(uuid.UUID(int=7)), "x"]),
)
seconds = (
    st.integers(NOW_S - 400 * 86400, NOW_S),
    st.sampled_from(
        [
            validation.MIN_SECONDS,
            validation.MIN_SECONDS - 1,
            validation.MAX_SECONDS,
            validation.MAX_SECONDS + 1,
            NOW_S + 86400,
            NOW_S + 86401,
            0,
            -1,
            -62135596800,
            253402300799,
        ]
    ),
)
NANOS = [0, 1, 999, 1000, 123000, 999999, 1_000_000, 120_000_000, 999_999_999]
nanos = (st.sampled_from(NANOS), st.sampled_from([1_000_000_000, -1]))
text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
names = (
    st.one_of(text, st.sampled_from(["", "x" * 256, "ü" * 256, "ops@example.com"])),
    st.sampled_from(["a\x00b", "x" * 257]),
)
floats = (
    st.one_of(st.integers(0, 2**53 - 1).map(float), st.sampled_from([0.0, -0.0, 1.0, 2.0**53 - 1])),
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([1.5, 2.0**53, -1.0, 1e300, math.nan, math.inf]),
    ),
)
finite = st.floats(allow_nan=False, allow_infinity=False)
json_scalars = (
    st.one_of(st.none(), st.booleans(), finite, st.integers(-(2**60), 2**60).map(float), text),
    st.sampled_from([math.nan, math.inf, -math.inf, "nul\x00"]),
)


def json_values(scalars: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.dictionaries(text.map(lambda t: t[:4]), inner, max_size=3),
        ),
        max_leaves=12,
    )


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


structs = (
    st.one_of(st.dictionaries(text, json_values(json_scalars[0]), max_size=4), st.just(nested(20))),
    st.one_of(
        st.tuples(
            st.dictionaries(text, json_values(json_scalars[0]), max_size=3),
            json_scalars[1],
            st.booleans(),
        ).map(lambda t: {**t[0], "z": [{"y": t[1]}] if t[2] else t[1]}),
        st.just(nested(21)),
    ),
)


def enum_of(enum: Any) -> tuple[st.SearchStrategy[int], st.SearchStrategy[int]]:
    defined = sorted(v.number for v in enum.DESCRIPTOR.values)
    return st.sampled_from(defined), st.sampled_from([-1, max(defined) + 1, 99])


def stamp(ts: timestamp_pb2.Timestamp, sec: int, nano: int) -> None:
    ts.seconds, ts.nanos = sec, nano


TARGETS = ["id", "org", "start", "end", "end.order", "status", "verb", "identity", "name",
           "event_size", "script_size", "script", "review.id", "review.status", "review.type",
           "review.duration", "review.created", "review.window", "group.name", "group.status",
           "group.date", "redaction.info", "redaction.count", "redaction.bytes", "ai.summary",
           "ai.action", "ai.step", "guard.message", "guard.direction", "guard.type", "tags",
           "labels", "struct", "stream"]  # fmt: skip


@st.composite
def sessions(draw: st.DrawFn, target: str = "") -> pb.Session:
    """Friendly (no `target`), or hostile: the `target` field always beyond its edge, and with
    `odds` 3 any other field beyond its edge with a chance of one in four."""
    hostile = bool(target)
    odds = draw(st.sampled_from([3, 10**9, 10**9, 10**9]))

    def bad(label: str) -> bool:
        return label == target or (hostile and draw(st.integers(0, odds)) == 0)

    def pick(domain: tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]], label: str) -> Any:
        return draw(domain[1] if bad(label) else domain[0])

    def maybe(*labels: str) -> bool:
        return any(target.startswith(label) for label in labels) or draw(st.booleans())

    s = pb.Session(id=pick(ids, "id"), org_id=pick(orgs, "org"))
    if target != "start":
        stamp(s.start_date, pick(seconds, "?"), pick(nanos, "?"))
    else:  # missing, in the future (more than a day ahead), or outside the time domain
        how = draw(st.sampled_from(["missing", "future", "domain"]))
        if how == "future":
            stamp(s.start_date, NOW_S + 86400 + draw(st.integers(1, 3 * 86400)), 0)
        elif how == "domain":
            stamp(s.start_date, pick(seconds, "start"), pick(nanos, "start"))
    if maybe("end"):
        lag = draw(st.integers(-5, -1) if bad("end.order") else st.integers(1, 90000))
        if bad("end"):
            stamp(s.end_date, draw(seconds[1]), draw(nanos[0]))
        else:
            stamp(s.end_date, s.start_date.seconds + lag, pick(nanos, "?"))
    if maybe("status"):
        if bad("status"):
            # A status that contradicts end_date (done without one, open/ready with one) or
            # an undefined number.
            unfit = ["open", "ready"] if s.HasField("end_date") else ["done"]
            number: int = pb.SessionStatus.Value.Value(draw(st.sampled_from(unfit)))
            if draw(st.booleans()):
                number = draw(enum_of(pb.SessionStatus.Value)[1])
            setattr(s, "status", number)  # noqa: B010 (an int, maybe undefined)
        elif maybe():
            s.status = pb.SessionStatus.Value.Value("done" if s.HasField("end_date") else "open")
    if maybe("verb"):
        s.verb = pick(enum_of(pb.SessionVerb.Value), "verb")
    if maybe("identity"):
        s.identity_type = pick(enum_of(pb.IdentityType.Value), "identity")
    fields = ["user", "user_id", "user_name", "connection", "connection_subtype", "type",
              "role_name", *rows._OPTIONAL_NAMES]  # fmt: skip
    broken = draw(st.sampled_from(fields))
    for field in fields:
        if maybe() or (target == "name" and field == broken):
            setattr(s, field, pick(names, "name" if field == broken else "?"))
    if maybe():
        s.exit_code = draw(st.integers(-(2**31), 2**31 - 1))
    s.event_size = pick(floats, "event_size")
    if maybe("script_size"):
        s.script_size = pick(floats, "script_size")
    if maybe("script"):
        s.script.data = pick((text, st.just("a\x00")), "script")
    if maybe("review", "group"):
        r = s.review
        r.id = pick(names, "review.id")
        if maybe("review.status"):
            r.status = pick(enum_of(pb.ReviewStatus.Value), "review.status")
        if maybe("review.type"):
            r.type = pick(enum_of(pb.ReviewType.Value), "review.type")
        if maybe("review.duration"):
            r.access_duration = pick(
                (finite, st.sampled_from([math.nan, math.inf, -math.inf])), "review.duration"
            )
        r.min_approvals = draw(st.integers(-3, 3))
        r.force_approval_groups.extend(draw(st.lists(text, max_size=2)))
        if maybe("review.created"):
            stamp(r.created_at, pick(seconds, "review.created"), pick(nanos, "?"))
        if maybe("review.window"):
            r.time_window.configuration.update(draw(st.dictionaries(text, text, max_size=2)))
            if maybe("review.window"):
                r.time_window.type = pick(enum_of(pb.ReviewTimeWindow.Kind.Value), "review.window")
        for _ in range(draw(st.integers(1 if target.startswith("group") else 0, 2))):
            g = r.review_groups_data.add(group=pick(names, "group.name"), forced_review=maybe())
            g.reviewed_by.email = draw(st.sampled_from(["", " A@x.io ", "a@x.io", "b@x.io", " "]))
            if maybe("group.status"):
                g.status = pick(enum_of(pb.ReviewRequestStatus.Value), "group.status")
            if maybe("group.date"):
                stamp(g.review_date, pick(seconds, "group.date"), pick(nanos, "?"))
    info_types = draw(st.lists(st.sampled_from(["EMAIL", " iban_code ", "X_1"]), unique=True,
                               min_size=1 if target.startswith("redaction") else 0,
                               max_size=3))  # fmt: skip
    for info in info_types:
        s.redactions.add(
            info_type=pick(
                (st.just(info), st.sampled_from(["EMAIL", "BAD-TYPE", ""])), "redaction.info"
            ),
            count=pick((st.integers(0, 50), st.just(-1)), "redaction.count"),
            transformed_bytes=pick(floats, "redaction.bytes"),
        )
    if target == "redaction.info" and len(s.redactions) == 1:
        s.redactions.add(info_type=s.redactions[0].info_type.lower())  # the same type again
    if maybe("ai"):
        a = s.ai_analysis
        a.summary = pick(names, "ai.summary")
        if maybe("ai.action"):
            a.action = pick(enum_of(pb.AIAnalysis.Action.Value), "ai.action")
        for _ in range(draw(st.integers(1 if target == "ai.step" else 0, 2))):
            a.steps.add(tool_name=pick(names, "ai.step"), is_error=maybe())
    for _ in range(draw(st.integers(1 if target.startswith("guard") else 0, 2))):
        guard = s.guardrails_info.add(message=pick(names, "guard.message"))
        if maybe("guard.direction"):
            guard.direction = pick(enum_of(pb.GuardRailsInfo.Direction.Value), "guard.direction")
        if maybe("guard.type"):
            guard.rule.words.extend(draw(st.lists(text, max_size=2)))
            if maybe("guard.type"):
                guard.rule.type = pick(enum_of(pb.GuardRailMatchedRule.Kind.Value), "guard.type")
    for field in ("connection_tags", "labels"):
        label = "tags" if field == "connection_tags" else "labels"
        if maybe(label):
            for _ in range(draw(st.integers(1, 3))):
                getattr(s, field)[pick(names, label)] = pick(names, label)
    broken = draw(st.sampled_from(rows._FREE_STRUCTS))
    for field in rows._FREE_STRUCTS:
        label = "struct" if field == broken else "?"
        if maybe(label):
            getattr(s, field).update(pick(structs, label))
    if maybe("stream"):
        s.event_stream.extend(draw(st.lists(json_values(json_scalars[0]), max_size=3)))
        if bad("stream"):
            beyond = st.one_of(json_scalars[1], structs[1], st.just(nested(21)["n"]))
            extra: list[Any] = [draw(st.one_of(json_scalars[1], beyond))]
            s.event_stream.extend(extra)
        if maybe():
            s.event_stream.values.add()  # a Value with no kind set
    return s


def reference(s: pb.Session) -> rows.IngestItem | str:
    try:
        return rows.checked_item(s, ORG, NOW)
    except ItemError as exc:
        return f"ItemError: {exc}"


def same(a: Any, b: Any) -> bool:
    """Equal, with equal types all the way down (1 and 1.0 are not the same stored value)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


def check_paths_agree(s: pb.Session) -> None:
    expected = reference(s)
    try:
        fast = rows._fast_item(s, ORG, NOW)
    except (rows._Slow, KeyError):
        fast = None
    if fast is not None:
        # Whatever the fast path accepts, the reference accepts, with the same values.
        assert not isinstance(expected, str), (expected, s)
        assert same(fast, expected), (fast, expected)
        assert list(fast.values) == list(INGEST_COLUMNS)
        assert same(fast.record(), expected.record())
    # The entry point answers as the reference does, either way.
    try:
        got: rows.IngestItem | str = rows.item_from_proto(s, ORG, NOW)
    except ItemError as exc:
        got = f"ItemError: {exc}"
    assert same(got, expected)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions())
def test_the_fast_path_gives_the_reference_item(s: pb.Session) -> None:
    check_paths_agree(s)
    rows._fast_item(s, ORG, NOW)  # every friendly session is the fast path's


@pytest.mark.parametrize("target", TARGETS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_session_beyond_an_edge_is_left_to_the_reference(
    target: str, data: st.DataObject
) -> None:
    check_paths_agree(data.draw(sessions(target)))


def test_the_fast_path_takes_every_plausible_session() -> None:
    """The bench's sessions (seed.demo_sessions: reviews, redactions, metrics, scripts) never
    fall back to the reference: otherwise the property above would compare nothing."""
    sessions = list(demo_sessions(random.Random(3), "fast", 400, NOW, days=365))
    for s in sessions:
        assert same(rows._fast_item(s, ORG, NOW), rows.checked_item(s, ORG, NOW))


@given(st.integers(validation.MIN_SECONDS, validation.MAX_SECONDS),
       st.one_of(st.integers(0, 999_999_999), nanos[0]))  # fmt: skip
def test_timestamp_text_is_the_library_s(sec: int, nano: int) -> None:
    ts = timestamp_pb2.Timestamp(seconds=sec, nanos=nano)
    assert rows._ts_text(ts) == ts.ToJsonString()


def test_deep_and_non_finite_json_are_worded_by_the_reference() -> None:
    """Hand-written cases: the first bad value of a session decides its message, as before."""
    s = next(demo_sessions(random.Random(1), "x", 1, NOW))
    s.metadata.update(nested(21))
    s.metrics.update({"a": math.nan})
    with_deep = reference(s)
    assert with_deep == "ItemError: metadata: expected JSON nested at most 20 levels"
    s.metadata.Clear()
    s.metadata.update(nested(20))
    assert (
        reference(s)
        == "ItemError: metrics.a: expected a finite number (JSON has no NaN or Infinity)"
    )
    s.metrics.Clear()
    item = rows.item_from_proto(s, ORG, NOW)
    assert item.values["metadata"].count("{") == 20
    stream: list[Any] = [{"x": [1.0, 2.5, 2.0**53]}]
    s.event_stream.extend(stream)
    s.event_stream.values.add()
    item = rows.item_from_proto(s, ORG, NOW)
    assert item.values["event_stream"] == '[{"x":[1,2.5,9007199254740992.0]},null]'
