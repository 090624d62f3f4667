"""The fuzz suite's fixed-seed slice (`make fuzz` runs the whole), and the property that reads
are total: whatever ingest accepts at the edges of every domain, every read surface answers."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from session_audit.core import validation as v
from session_audit.v1 import sessions_pb2 as pb
from tests.fuzz import LEAKS, fuzz
from tests.support import Stack, auth_md

SLICE = 300
SEED = 20261128


def test_fixed_seed_slice_of_the_fuzz_suite(stack: Stack) -> None:
    org = stack.new_org("fuzz")
    tokens = {role: stack.token(org, role) for role in ("admin", "auditor", "user", "ingest")}
    tally = fuzz(stack.http, tokens, SLICE, SEED)
    assert tally.total >= SLICE
    assert tally.server_errors == [], tally.summary()
    assert tally.transport_errors == [], tally.summary()
    assert tally.leaks == [], tally.summary()
    # Answers were sorted: both refusals and successes occurred.
    assert tally.by_status[400] > 0 and tally.by_status[200] > 0, tally.summary()


# -- reads are total ------------------------------------------------------------------------------

NOW = datetime.now(UTC)
EDGE_STARTS = [
    v.MIN_INSTANT,
    v.MIN_INSTANT + timedelta(microseconds=1),
    datetime(1, 1, 2, 23, 59, 59, tzinfo=UTC),
    datetime(1, 12, 31, 12, tzinfo=UTC),
    datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(1582, 10, 15, tzinfo=UTC),
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(2000, 2, 29, 12, tzinfo=UTC),
    NOW - timedelta(seconds=1),
]
EDGE_ENDS = [
    v.MAX_INSTANT,
    v.MAX_INSTANT - timedelta(microseconds=1),
    datetime(9999, 12, 30, tzinfo=UTC),
    datetime(9999, 1, 1, tzinfo=UTC),
]
OFFSETS = ["Z", "+14:00", "-12:00", "+05:45", "-00:01"]

safe_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
edge_text = st.one_of(
    safe_text,
    st.sampled_from(
        [
            "x" * 256,
            "é" * 256,
            "😀" * 256,
            "",
            " ",
            "'",
            "\\",
            "%",
            "_",
            "<b>&amp;",
            "=1+1",
            "\u202e",
            "\n\t\r",
        ]
    ),
)
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.sampled_from([1e308, -1e308, 0.5]),
    safe_text,
)


def nested(depth: int, leaf: Any, kind: str) -> Any:
    value = leaf
    for _ in range(depth - 1):
        value = {"k": value} if kind == "dict" else [value]
    return {"k": value} if kind == "dict" else [value]


free_json = st.one_of(
    st.dictionaries(safe_text, json_leaf, max_size=3),
    st.builds(nested, st.integers(1, v.MAX_JSON_DEPTH), json_leaf, st.just("dict")),
)


def _rfc(t: datetime, offset: str) -> str:
    """`t` written in RFC 3339 with `offset` (the same instant; years padded to 4 digits)."""
    delta = timedelta(0)
    if offset != "Z":
        sign = 1 if offset[0] == "+" else -1
        delta = sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6]))
    local = t.astimezone(UTC).replace(tzinfo=None) + delta
    stamp = (
        f"{local.year:04d}-{local.month:02d}-{local.day:02d}T{local.hour:02d}:{local.minute:02d}:"
        f"{local.second:02d}.{local.microsecond:06d}"
    )
    return stamp + offset


@st.composite
def edge_session(draw: st.DrawFn) -> dict[str, Any]:
    start = draw(
        st.one_of(
            st.sampled_from(EDGE_STARTS),
            st.datetimes(
                min_value=v.MIN_INSTANT.replace(tzinfo=None), max_value=NOW.replace(tzinfo=None)
            ).map(lambda d: d.replace(tzinfo=UTC)),
        )
    )
    session: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "start_date": _rfc(start, draw(st.sampled_from(OFFSETS))),
        "user": draw(edge_text),
        "user_id": draw(edge_text),
        "user_name": draw(edge_text),
        "connection": draw(edge_text),
        "type": draw(edge_text),
        "connection_subtype": draw(edge_text),
        "role_name": draw(edge_text),
        "verb": draw(st.sampled_from(["exec", "connect"])),
        "exit_code": draw(st.sampled_from([-(2**31), 2**31 - 1, 0])),
        "event_size": draw(st.sampled_from([0, 2**53 - 1])),
        "metadata": draw(free_json),
        "metrics": draw(free_json),
        "integrations_metadata": draw(free_json),
        "event_stream": draw(
            st.builds(nested, st.integers(1, v.MAX_JSON_DEPTH), json_leaf, st.just("list"))
        ),
        "labels": draw(st.dictionaries(edge_text, edge_text, max_size=2)),
        "redactions": [
            {
                "info_type": draw(st.sampled_from(["EMAIL_ADDRESS", "X" * 64, "A"])),
                "count": draw(st.sampled_from([0, 2**31 - 1])),
                "transformed_bytes": draw(st.sampled_from([0, 2**53 - 1])),
            }
        ],
        "review": {
            "status": draw(st.sampled_from(["APPROVED", "PENDING", "REJECTED"])),
            "created_at": _rfc(draw(st.sampled_from(EDGE_STARTS)), "Z"),
            "review_groups_data": [{"group": "g", "reviewed_by": {"email": draw(edge_text)}}],
        },
        "script": {"data": draw(edge_text)},
    }
    end = draw(st.one_of(st.none(), st.sampled_from(EDGE_ENDS), st.just(start)))
    if end is not None:
        session["end_date"] = _rfc(end, draw(st.sampled_from(OFFSETS)))
    return session


def _ok(r: Any, what: str) -> Any:
    assert r.status_code == 200, f"{what}: {r.status_code} {r.text[:500]}"
    return r.json() if r.headers["content-type"].startswith("application/json") else r.content


def _days(t: datetime) -> dict[str, str]:
    """A one-day report window holding `t`'s day, inside the day domain."""
    d = min(max(t.date(), v.MIN_DAY), v.MAX_DAY - timedelta(days=1))
    return {"start_date": d.isoformat(), "end_date": (d + timedelta(days=1)).isoformat()}


def test_whatever_ingest_accepts_every_read_surface_answers(stack: Stack) -> None:
    org = stack.new_org("edges")
    admin = stack.token(org, "admin")
    stub = stack.stub()

    @settings(
        max_examples=12,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(edge_session(), min_size=1, max_size=3))
    def ingest_and_read(sessions: list[dict[str, Any]]) -> None:
        r = stack.rest("POST", "/api/sessions/ingest", admin, json={"sessions": sessions})
        body = _ok(r, "ingest")
        assert body["rejected"] == 0, body["rejections"]
        for s in sessions:
            got = _ok(stack.rest("GET", f"/api/sessions/{s['id']}", admin), "get")
            assert got["id"] == s["id"]
            stub.GetSession(pb.GetSessionRequest(id=s["id"]), metadata=auth_md(admin))
            start = datetime.fromisoformat(got["start_date"].replace("Z", "+00:00"))
            end = (
                start + timedelta(days=1)
                if start < v.MAX_INSTANT - timedelta(days=2)
                else v.MAX_INSTANT
            )
            _ok(
                stack.rest(
                    "GET",
                    "/api/sessions",
                    admin,
                    params={"start_date": got["start_date"], "limit": 100},
                ),
                "list",
            )
            for zone in ("Pacific/Kiritimati", "Etc/GMT+12"):
                window = {"start": got["start_date"], "end": end.isoformat(), "time_zone": zone}
                for size in ("hour", "week", "year"):
                    h = _ok(
                        stack.rest(
                            "GET",
                            "/api/audit/sessions/histogram",
                            admin,
                            params={**window, "field": "connection", "bin-size": size, "size": 3},
                        ),
                        "histogram",
                    )
                    assert all(
                        len(b["id"]) >= 24 and b["id"][:4].isdigit() for b in h["body"]["buckets"]
                    )
                _ok(
                    stack.rest(
                        "GET",
                        "/api/audit/sessions/stats",
                        admin,
                        params={**window, "field": "protocol", "sub_fields": "user"},
                    ),
                    "stats",
                )
                _ok(
                    stack.rest(
                        "GET",
                        "/api/reports/sessions",
                        admin,
                        params={
                            **_days(start),
                            "time_zone": zone,
                            "group_by": "user_email",
                        },
                    ),
                    "report",
                )
        _ok(stack.rest("GET", "/api/sessions", admin, params={"limit": 100}), "list all")
        reply = stub.ListSessions(pb.ListSessionsRequest(limit=100), metadata=auth_md(admin))
        assert len(reply.data) >= 1

    ingest_and_read()

    # Every report type over everything ingested above: ready, and downloadable in 3 formats.
    ids = []
    for kind in range(5, 17):
        body = _ok(
            stack.rest("POST", "/api/v2/report", admin, json={"defined_report_id": str(kind)}),
            "create",
        )
        ids.append(body["report"]["id"])
    deadline = time.monotonic() + 120
    for rid in ids:
        while True:
            report = _ok(stack.rest("GET", f"/api/v2/report/{rid}", admin), "report")["report"]
            if report["status"] != "pending" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert report["status"] == "ready", report
        assert not LEAKS.search(report.get("failure", ""))
        for fmt in ("csv", "pdf", "html"):
            content = _ok(stack.rest("GET", f"/api/v2/report/{rid}/{fmt}", admin), f"{rid} {fmt}")
            assert len(content) > 0
