"""Retention (issue 15): the policy, locks and legal holds over REST, the purge against a
plain-Python reference (what goes, what stays, and the aggregations over what stays), the
purge beside a concurrent ingest, exactly one purge per org and run across processes, and the
CLI."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from session_audit.analytics import requests, store
from session_audit.analytics.q import parse_q
from session_audit.analytics.timebins import bin_starts
from session_audit.core import auth, db
from session_audit.core.validation import parse_zone
from session_audit.retention import purge
from session_audit.v1 import sessions_pb2 as pb
from tests import analytics_reference as ref
from tests.factories import Spec
from tests.support import Stack, run

NOW = datetime.now(UTC).replace(microsecond=0)


def ok(r: Any) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def bad(r: Any, status: int, *needles: str) -> str:
    assert r.status_code == status, r.text
    message: str = r.json()["message"]
    for n in needles:
        assert n in message, message
    return message


def protos(specs: Iterable[Spec], labelled: set[str] = frozenset()) -> list[pb.Session]:  # type: ignore[assignment]
    out = []
    for s in specs:
        p = s.to_proto()
        if s.id in labelled:
            p.labels.update({"retention_locked": "true"})
        out.append(p)
    return out


def org_id(stack: Stack, org: str) -> uuid.UUID:
    oid: uuid.UUID = stack.sql("SELECT id FROM orgs WHERE name = $1", org)[0]["id"]
    return oid


def locked_ids(stack: Stack, org: str) -> set[str]:
    rows = stack.sql(
        "SELECT s.id FROM sessions s JOIN orgs o ON o.id = s.org_id"
        " WHERE o.name = $1 AND s.retention_locked",
        org,
    )
    return {str(r["id"]) for r in rows}


def stored_ids(stack: Stack, org: str) -> set[str]:
    rows = stack.sql(
        "SELECT s.id FROM sessions s JOIN orgs o ON o.id = s.org_id WHERE o.name = $1", org
    )
    return {str(r["id"]) for r in rows}


def hold_background_purge(stack: Stack, org: str) -> None:
    """The shared server purges due orgs in the background; tests that count what one run
    deletes move their org's next run out of its way."""
    stack.sql(
        "UPDATE retention_policies SET next_purge_at = now() + interval '1 day' WHERE org_id = $1",
        org_id(stack, org),
    )


# -- policy -----------------------------------------------------------------------------------


def test_policy_is_null_by_default_and_set_by_admins_only_with_an_audit_row(stack: Stack) -> None:
    org = stack.new_org("ret")
    admin = stack.token(org, "admin")
    auditor = stack.token(org, "auditor")
    assert ok(stack.rest("GET", "/api/retention", admin)) == {"days": None}
    assert ok(stack.rest("PUT", "/api/retention", admin, json={"days": 30})) == {"days": 30}
    hold_background_purge(stack, org)
    assert ok(stack.rest("GET", "/api/retention", admin)) == {"days": 30}
    assert ok(stack.rest("PUT", "/api/retention", admin, json={"days": 7})) == {"days": 7}
    assert ok(stack.rest("PUT", "/api/retention", admin, json={"days": None})) == {"days": None}
    assert stack.rest("GET", "/api/retention", auditor).status_code == 403
    assert stack.rest("PUT", "/api/retention", auditor, json={"days": 1}).status_code == 403
    rows = stack.sql(
        "SELECT actor, action, object_type, details FROM audit_log WHERE org_id = $1"
        " AND object_type = 'retention_policy' ORDER BY id",
        org_id(stack, org),
    )
    assert [(r["actor"], r["action"], r["details"]["days"]) for r in rows] == [
        (f"admin@{org}.example", "update", 30),
        (f"admin@{org}.example", "update", 7),
        (f"admin@{org}.example", "update", None),
    ]


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        ({"days": 0}, ("days: expected 1..36500", "got 0")),
        ({"days": -5}, ("days: expected 1..36500", "got -5")),
        ({"days": 36501}, ("days: expected 1..36500",)),
        ({"days": 1.5}, ("days: expected an integer",)),
        ({"days": "soon"}, ("days:",)),
        ({"days": 30, "keep": True}, ("keep: unknown field",)),
    ],
)
def test_bad_policy_bodies_are_400(stack: Stack, body: dict[str, Any], needles: Any) -> None:
    org = stack.new_org("ret")
    admin = stack.token(org, "admin")
    bad(stack.rest("PUT", "/api/retention", admin, json=body), 400, *needles)
    assert ok(stack.rest("GET", "/api/retention", admin)) == {"days": None}


# -- locks and holds --------------------------------------------------------------------------


def test_lock_and_unlock_one_session_and_404_for_another_orgs(stack: Stack) -> None:
    org, other = stack.new_org("ret"), stack.new_org("ret")
    admin, auditor = stack.token(org, "admin"), stack.token(org, "auditor")
    other_admin = stack.token(other, "admin")
    a, b = Spec(start=NOW - timedelta(days=3)), Spec(start=NOW - timedelta(days=2))
    stack.ingest(admin, protos([a]))
    stack.ingest(other_admin, protos([b]))
    path = f"/api/sessions/{a.id}/retention_lock"
    r = ok(stack.rest("PUT", path, auditor, json={"locked": True, "reason": "case 7"}))
    assert r == {"id": a.id, "locked": True, "holds": []}
    assert locked_ids(stack, org) == {a.id}
    r = ok(stack.rest("PUT", path, admin, json={"locked": False}))
    assert r["locked"] is False
    assert locked_ids(stack, org) == set()
    # Another org's session is not found (and stays unlocked), whoever asks.
    bad(stack.rest("PUT", f"/api/sessions/{b.id}/retention_lock", admin, json={"locked": True}),
        404, b.id)  # fmt: skip
    assert locked_ids(stack, other) == set()
    bad(stack.rest("PUT", "/api/sessions/nope/retention_lock", admin, json={"locked": True}),
        400, "id: expected a session UUID")  # fmt: skip
    bad(stack.rest("PUT", path, admin, json={"locked": True, "why": "x"}), 400, "why: unknown")
    bad(stack.rest("PUT", path, admin, json={"locked": "yes"}), 400, "locked:")
    user = stack.token(org, "user")
    assert stack.rest("PUT", path, user, json={"locked": True}).status_code == 403
    rows = stack.sql(
        "SELECT actor, details->>'retention_lock' AS l FROM audit_log"
        " WHERE org_id = $1 AND object_type = 'session' ORDER BY id",
        org_id(stack, org),
    )
    assert [(r["actor"], r["l"]) for r in rows] == [
        (f"auditor@{org}.example", "true"),
        (f"admin@{org}.example", "false"),
    ]


def test_holds_lock_matches_now_and_on_ingest_and_release_only_their_own(stack: Stack) -> None:
    org = stack.new_org("ret")
    admin = stack.token(org, "admin")
    t = NOW - timedelta(days=5)
    ana = [Spec(start=t, email="ana@x.example", subtype="ssh") for _ in range(3)]
    bob = [Spec(start=t, email="bob@x.example", subtype="ssh") for _ in range(2)]
    eve = [Spec(start=t, email="eve@x.example", subtype="postgres") for _ in range(2)]
    labelled = Spec(start=t, email="ana@x.example")
    stack.ingest(admin, protos([*ana, *bob, *eve, labelled], {labelled.id}))
    assert locked_ids(stack, org) == {labelled.id}

    h1 = ok(stack.rest("POST", "/api/holds", admin,
                       json={"reason": "case 1", "query_filter": "user_email.eq(ana@x.example)"}))  # fmt: skip
    assert h1["locked"] == 4  # ana's three and the labelled one
    h2 = ok(stack.rest("POST", "/api/holds", admin,
                       json={"reason": "case 2", "query_filter": "protocol.eq(ssh)"}))  # fmt: skip
    assert h2["locked"] == 5  # ana's and bob's
    manual = eve[0]
    ok(stack.rest("PUT", f"/api/sessions/{manual.id}/retention_lock", admin,
                  json={"locked": True, "reason": "manual"}))  # fmt: skip
    everyone = {s.id for s in [*ana, *bob, manual, labelled]}
    assert locked_ids(stack, org) == everyone

    # Sessions arriving later are locked when a hold matches them.
    late_ana, late_eve = Spec(start=t, email="ana@x.example", subtype="rdp"), Spec(start=t)
    stack.ingest(admin, protos([late_ana, late_eve]))
    assert locked_ids(stack, org) == everyone | {late_ana.id}

    listed = ok(stack.rest("GET", "/api/holds", admin))["holds"]
    assert [(h["id"], h["reason"], h["locked"]) for h in listed] == [
        (h2["id"], "case 2", 5), (h1["id"], "case 1", 5),
    ]  # fmt: skip
    assert listed[1]["query_filter"] == "user_email.eq(ana@x.example)"

    # Releasing hold 1 unlocks only what nothing else holds: ana's rdp session.
    r = ok(stack.rest("DELETE", f"/api/holds/{h1['id']}", admin))
    assert r == {"id": h1["id"], "released": 1}
    assert locked_ids(stack, org) == everyone
    r = ok(stack.rest("DELETE", f"/api/holds/{h2['id']}", admin))
    assert r["released"] == 5
    assert locked_ids(stack, org) == {manual.id, labelled.id}
    bad(stack.rest("DELETE", f"/api/holds/{h2['id']}", admin), 404, "not found")
    assert ok(stack.rest("GET", "/api/holds", admin)) == {"holds": []}
    actions = stack.sql(
        "SELECT action FROM audit_log WHERE org_id = $1 AND object_type = 'hold' ORDER BY id",
        org_id(stack, org),
    )
    assert [r["action"] for r in actions] == ["create", "create", "delete", "delete"]


@pytest.mark.parametrize(
    ("body", "status", "needles"),
    [
        ({"reason": "x", "query_filter": "user_email.eq("}, 400, ("query_filter",)),
        ({"reason": "x", "query_filter": "nosuch.eq(1)"}, 400, ("query_filter", "nosuch")),
        ({"query_filter": "protocol.eq(ssh)"}, 400, ("reason: expected",)),
        ({"reason": "x", "filter": "protocol.eq(ssh)"}, 400, ("filter: unknown field",)),
        ({"reason": "x", "report_ids": ["abc"]}, 400, ("report_ids[0]",)),
    ],
)
def test_bad_holds_are_400(stack: Stack, body: dict[str, Any], status: int, needles: Any) -> None:
    org = stack.new_org("ret")
    admin = stack.token(org, "admin")
    bad(stack.rest("POST", "/api/holds", admin, json=body), status, *needles)
    assert ok(stack.rest("GET", "/api/holds", admin)) == {"holds": []}


def test_hold_ids_are_per_org(stack: Stack) -> None:
    org, other = stack.new_org("ret"), stack.new_org("ret")
    admin, other_admin = stack.token(org, "admin"), stack.token(other, "admin")
    h = ok(stack.rest("POST", "/api/holds", admin, json={"reason": "x", "query_filter": ""}))
    bad(stack.rest("DELETE", f"/api/holds/{h['id']}", other_admin), 404)
    bad(stack.rest("DELETE", "/api/holds/12x", admin), 400, "id: expected a hold id")
    assert len(ok(stack.rest("GET", "/api/holds", admin))["holds"]) == 1


# -- purge ------------------------------------------------------------------------------------


def spread(n: int, seed: int) -> list[Spec]:
    """Sessions over the last 90 days, some still open, a few open for weeks."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        start = NOW - timedelta(days=rnd.uniform(0.5, 90))
        if rnd.random() < 0.15:
            end = None
        else:
            end = min(start + timedelta(hours=rnd.uniform(0, 24 * rnd.choice([0.1, 1, 20]))),
                      NOW - timedelta(minutes=1))  # fmt: skip
        out.append(Spec(
            start=start, end=end, email=rnd.choice(["ana@x.example", "bob@x.example"]),
            connection=rnd.choice(["pg-prod", "ssh-a"]), subtype=rnd.choice(["ssh", "postgres"]),
            redactions=(("EMAIL_ADDRESS", rnd.randint(1, 5), rnd.randint(1, 100)),)
            if end is not None and rnd.random() < 0.5 else (),
        ))  # fmt: skip
    return out


def expired(s: Spec, cutoff: datetime) -> bool:
    """The policy, written from the issue: end before the cutoff, or start when still open."""
    return (s.end if s.end is not None else s.start) < cutoff


async def _purge(dsn: str, org: uuid.UUID, now: datetime, batch: int) -> purge.PurgeResult | None:
    pool = await db.create_pool(dsn, 1, 2)
    try:
        return await purge.purge_org(pool, org, now, interval=3600, batch=batch, timeout=60,
                                     claim=False)  # fmt: skip
    finally:
        await pool.close()


def aggregations(stack: Stack, org: uuid.UUID, force_base: bool) -> tuple[Any, Any, Any]:
    """Histogram, stats and report from the rollups (or the base table with `force_base`)."""
    opts = store.Options(force_base=force_base)

    async def go() -> tuple[Any, Any, Any]:
        conn = await db.connect(stack.dsn)
        try:
            who = auth.Principal(0, org, "admin", "admin@x.example")
            _, zone = parse_zone("")
            start = (NOW - timedelta(days=100)).replace(hour=0, minute=0, second=0)
            end = start + timedelta(days=102)
            bins = tuple(bin_starts(start, end, "day", zone, 1000))
            hq = requests.HistogramQuery("protocol", "day", start, end, "Etc/UTC", zone, 2,
                                         parse_q("", zone), bins)  # fmt: skip
            h = await store.histogram(conn, who, hq, 30, opts)
            sq = requests.StatsQuery("connection", "protocol", 5, start, end, "Etc/UTC", zone,
                                     parse_q("", zone))  # fmt: skip
            st = await store.stats(conn, who, sq, 30, opts)
            rq = requests.ReportQuery(group_by="connection", connection=None, user_email=None,
                                      verb=None, session_id=None, start=start, end=end,
                                      zone="Etc/UTC")  # fmt: skip
            rp = await store.report(conn, who, rq, 30, opts)
            return (h.buckets, h.top, h.by_value), (st.total, st.values, st.other), rp.items
        finally:
            await conn.close()

    return run(go())


def reference_aggregations(specs: list[Spec]) -> tuple[Any, Any, Any]:
    _, zone = parse_zone("")
    start = (NOW - timedelta(days=100)).replace(hour=0, minute=0, second=0)
    end = start + timedelta(days=102)
    bins = bin_starts(start, end, "day", zone, 1000)
    return (
        ref.histogram(specs, bins, start, end, "protocol", 2, lambda s: True),
        ref.stats(specs, start, end, "connection", "protocol", 5, lambda s: True),
        ref.report(specs, start, end, "connection"),
    )


def test_a_30_day_policy_deletes_exactly_the_expired_unlocked_sessions(stack: Stack) -> None:
    org = stack.new_org("purge")
    admin = stack.token(org, "admin")
    oid = org_id(stack, org)
    specs = spread(300, seed=15)
    cutoff = NOW - timedelta(days=30)
    old = [s for s in specs if expired(s, cutoff)]
    labelled = {s.id for s in old[:5]}
    manual = old[5:10]
    for i in range(0, len(specs), 100):
        stack.ingest(admin, protos(specs[i : i + 100], labelled))
    for s in manual:
        ok(stack.rest("PUT", f"/api/sessions/{s.id}/retention_lock", admin,
                      json={"locked": True, "reason": "manual"}))  # fmt: skip
    held_user = "bob@x.example"
    ok(stack.rest("POST", "/api/holds", admin,
                  json={"reason": "case", "query_filter": f"user_email.eq({held_user}),protocol.eq(ssh)"}))  # fmt: skip
    ok(stack.rest("PUT", "/api/retention", admin, json={"days": 30}))
    hold_background_purge(stack, org)

    def kept(s: Spec) -> bool:
        held = s.email == held_user and s.subtype == "ssh"
        return not expired(s, cutoff) or s.id in labelled or s in manual or held

    expected_gone = {s.id for s in specs if not kept(s)}
    assert len(expected_gone) > 100  # the fixture has plenty to delete, and plenty to keep
    assert len(specs) - len(expected_gone) > 80
    result = run(_purge(stack.dsn, oid, NOW, batch=37))
    assert result is not None
    assert result.sessions == len(expected_gone)
    remaining = [s for s in specs if kept(s)]
    assert stored_ids(stack, org) == {s.id for s in remaining}
    # The answers over what stays equal a plain-Python reference over what stays.
    expected = reference_aggregations(remaining)
    assert aggregations(stack, oid, force_base=False) == expected
    assert aggregations(stack, oid, force_base=True) == expected
    # Counted (not listed) in the audit log, with the window.
    rows = stack.sql(
        "SELECT actor, action, details FROM audit_log WHERE org_id = $1"
        " AND object_type = 'sessions'",
        oid,
    )
    assert [(r["actor"], r["action"], r["details"]["sessions"], r["details"]["days"])
            for r in rows] == [("retention purge", "delete", len(expected_gone), 30)]  # fmt: skip
    # A second run finds nothing more.
    again = run(_purge(stack.dsn, oid, NOW, batch=37))
    assert again is not None and again.sessions == 0


def test_purge_beside_a_concurrent_ingest_loses_no_new_session(stack: Stack) -> None:
    org = stack.new_org("purge")
    admin = stack.token(org, "admin")
    oid = org_id(stack, org)
    old = [Spec(start=NOW - timedelta(days=60 + i / 100), end=NOW - timedelta(days=59))
           for i in range(1500)]  # fmt: skip
    for i in range(0, len(old), 500):
        stack.ingest(admin, protos(old[i : i + 500]))
    ok(stack.rest("PUT", "/api/retention", admin, json={"days": 30}))
    hold_background_purge(stack, org)
    new: list[Spec] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            batch = [Spec(start=NOW - timedelta(minutes=random.randint(1, 600))) for _ in range(20)]
            stack.ingest(admin, protos(batch))
            new.extend(batch)

    t = threading.Thread(target=load)
    t.start()
    try:
        result = run(_purge(stack.dsn, oid, NOW, batch=50))
    finally:
        stop.set()
        t.join()
    assert result is not None and result.sessions == len(old)
    assert len(new) > 0
    assert stored_ids(stack, org) == {s.id for s in new}


def test_exactly_one_process_purges_an_org_per_run(stack: Stack) -> None:
    org = stack.new_org("purge")
    admin = stack.token(org, "admin")
    oid = org_id(stack, org)
    old = [Spec(start=NOW - timedelta(days=40), end=NOW - timedelta(days=40)) for _ in range(50)]
    stack.ingest(admin, protos(old))
    ok(stack.rest("PUT", "/api/retention", admin, json={"days": 30}))
    stack.sql("UPDATE retention_policies SET next_purge_at = $2 WHERE org_id = $1",
              oid, NOW - timedelta(seconds=1))  # fmt: skip

    async def go() -> list[list[purge.PurgeResult]]:
        pools = [await db.create_pool(stack.dsn, 1, 2) for _ in range(4)]
        try:
            return await asyncio.gather(*(
                purge.run_due(p, NOW, interval=86_400, batch=10, timeout=60) for p in pools))  # fmt: skip
        finally:
            for p in pools:
                await p.close()

    results = run(go())
    mine = [r for rs in results for r in rs if r.org_id == oid]
    assert len(mine) == 1 and mine[0].sessions == 50
    runs = stack.sql("SELECT count(*) AS n FROM audit_log WHERE org_id = $1"
                     " AND object_type = 'sessions'", oid)  # fmt: skip
    assert runs[0]["n"] == 1
    # The next run is a day later: nothing is due now.
    again = run(go())
    assert all(r.org_id != oid for rs in again for r in rs)


def test_old_reports_are_purged_unless_a_hold_names_them(stack: Stack) -> None:
    org = stack.new_org("purge")
    admin = stack.token(org, "admin")
    oid = org_id(stack, org)
    stack.ingest(admin, protos([Spec(start=NOW - timedelta(days=1))]))
    ids = []
    for _ in range(3):
        r = stack.rest("POST", "/api/v2/report", admin, json={"criteria": []})
        ids.append(ok(r)["report"]["id"])
    # Two were made long ago, one of them named by a hold; the third is recent.
    stack.sql("UPDATE reports SET status = 'ready', created_at = $2, generated_at = $2"
              " WHERE org_id = $1 AND id = any($3::bigint[])",
              oid, NOW - timedelta(days=45), [int(ids[0]), int(ids[1])])  # fmt: skip
    ok(stack.rest("POST", "/api/holds", admin,
                  json={"reason": "keep", "query_filter": "id.eq(" + str(uuid.uuid4()) + ")",
                        "report_ids": [ids[1]]}))  # fmt: skip
    ok(stack.rest("PUT", "/api/retention", admin, json={"days": 30}))
    hold_background_purge(stack, org)
    result = run(_purge(stack.dsn, oid, NOW, batch=10))
    assert result is not None and result.reports == 1
    left = stack.sql("SELECT id FROM reports WHERE org_id = $1 ORDER BY id", oid)
    assert [str(r["id"]) for r in left] == [ids[1], ids[2]]


def test_cli_purge_prints_what_it_deleted(stack: Stack) -> None:
    org = stack.new_org("purge")
    admin = stack.token(org, "admin")
    old = [Spec(start=NOW - timedelta(days=20), end=NOW - timedelta(days=19)) for _ in range(7)]
    recent = [Spec(start=NOW - timedelta(days=2), end=NOW - timedelta(days=2)) for _ in range(3)]
    stack.ingest(admin, protos(old + recent))
    ok(stack.rest("PUT", "/api/retention", admin, json={"days": 10}))
    hold_background_purge(stack, org)
    out = subprocess.run(
        [sys.executable, "-m", "session_audit.cli", "retention", "purge", "--org", org],
        env={**_env(), "DATABASE_URL": stack.dsn}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"{org}: deleted 7 session(s) and 0 report(s) older than 10 day(s)" in out.stdout
    assert stored_ids(stack, org) == {s.id for s in recent}
    out = subprocess.run(
        [sys.executable, "-m", "session_audit.cli", "retention", "purge", "--org", "nosuch-org"],
        env={**_env(), "DATABASE_URL": stack.dsn}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0 and "no org named" in out.stderr


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
