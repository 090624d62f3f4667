"""Downloads parsed back and compared with the snapshot: CSV with the csv module, HTML with
html.parser, PDF text with pypdf. Each predefined report type against a plain-Python
computation over the same sessions; hostile values rendered safely; snapshots stay the same
after the sessions change."""

from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass
from datetime import datetime, timedelta
from html.parser import HTMLParser

import grpc
import pypdf
import pytest

from session_audit.reports.types import BY_KEY
from session_audit.v1 import reports_pb2 as rpb
from session_audit.v1 import reports_pb2_grpc
from tests.report_reference import (
    T0,
    RSpec,
    csv_rows,
    expected_rows,
    ok,
    ready_report,
    report_stub,
)
from tests.support import ServerProcess, Stack, auth_md

SCRIPT = "<script>alert('x')</script>"
FORMULA = "=cmd|' /C calc'!A0"
QUOTED = 'O"Brien, Jr.\r\nsecond line'
LONG = "L" * 200 + "-tail-" + "z" * 50
CYRILLIC = "Дмитрий Ελένη Zoë Łukasz"


def specs() -> list[RSpec]:
    def m(n: float) -> datetime:
        return T0 + timedelta(minutes=n)

    return [
        RSpec(start=m(0), end=m(30), email="ana@acme.example", user_id="u-ana", name="Ana",
              connection="pg-prod", protocol="postgres", account="readonly",
              tags={"env": "prod", "team": "pay"}, review_status="APPROVED",
              approvers=("lead@acme.example",), exit_code=0),
        RSpec(start=m(10), email="Ana@acme.example", user_id="u-ana", name="Ana",
              connection=SCRIPT, protocol="ssh", account=FORMULA, review_status="PENDING"),
        RSpec(start=m(20), end=m(21), email="bo@acme.example", user_id="u-bo", name=QUOTED,
              connection=LONG, protocol="rdp", account="+SUM(A1)", type="application",
              review_status="REJECTED", approvers=("lead@acme.example", "sec@acme.example"),
              exit_code=-1, labels={"retention_locked": "true"}),
        RSpec(start=m(60 * 25), end=m(60 * 25 + 5), email="cy@acme.example", user_id="u-cy",
              name=CYRILLIC, connection="сервер-1", protocol="ssh", account="@admin",
              tags={"env": "prod"}, review_status="EXECUTED", approvers=("sec@acme.example",),
              exit_code=2),
        RSpec(start=m(60 * 50), end=m(60 * 51), email="bo@acme.example", user_id="u-bo",
              name=QUOTED, connection="pg-prod", protocol="postgres", account="-rw",
              tags={"env": "prod", "team": "pay"}, exit_code=0, verb="connect"),
    ]  # fmt: skip


@dataclass
class World:
    org: str
    admin: str
    specs: list[RSpec]
    reports: dict[str, str]


SESSION_TYPES = ["session_summary", "sessions_by_server", "server_access", "account_access",
                 "safe_access", "user_access", "user", "session_approvals", "session_sharing"]  # fmt: skip


@pytest.fixture(scope="module")
def world(stack: Stack) -> World:
    org = stack.new_org("downloads")
    admin = stack.token(org, "admin", "admin@acme.example")
    s = specs()
    reply = stack.ingest(admin, [x.to_proto() for x in s])
    assert reply.written == len(s), reply
    reports = {}
    for kind in BY_KEY.values():
        rid, _ = ready_report(stack, admin, defined_report_id=str(kind.predefined_id),
                              title=f"{kind.title} <b>&amp;</b>")  # fmt: skip
        reports[kind.key] = rid
    return World(org, admin, s, reports)


def neutralised(kind: str, rows: list[list[str]]) -> list[list[str]]:
    cols = BY_KEY[kind].columns
    return [
        ["'" + x if c.kind == "text" and x[:1] in ("=", "+", "-", "@", "\t", "\r") else x
         for x, c in zip(row, cols, strict=True)]
        for row in rows
    ]  # fmt: skip


def snapshot(stack: Stack, rid: str) -> list[list[str]]:
    rows = stack.sql("SELECT cells FROM report_rows WHERE report_id = $1 ORDER BY n", int(rid))
    return [list(r["cells"]) for r in rows]


@pytest.mark.parametrize("kind", SESSION_TYPES)
def test_csv_of_each_type_matches_reference(stack: Stack, world: World, kind: str) -> None:
    rid = world.reports[kind]
    rows = csv_rows(stack, world.admin, rid)
    assert rows[0] == [c.key for c in BY_KEY[kind].columns]
    expected = expected_rows(kind, world.specs)
    assert rows[1:] == neutralised(kind, expected)
    # The snapshot holds the raw values; the CSV differs only by the neutralising apostrophe.
    assert snapshot(stack, rid) == expected


def test_system_report_figures(stack: Stack, world: World) -> None:
    metrics = dict(csv_rows(stack, world.admin, world.reports["system"])[1:])
    s = world.specs
    assert metrics["Sessions"] == str(len(s))
    assert metrics["Open sessions"] == str(sum(1 for x in s if x.end is None))
    assert metrics["Users"] == str(len({x.email.lower() for x in s}))
    assert metrics["Servers"] == str(len({x.connection for x in s}))
    assert metrics["Approved"] == "1" and metrics["Rejected"] == "1"
    assert metrics["Retention-locked sessions"] == "1"
    assert metrics["Active API tokens"] == "1" and metrics["Admin tokens"] == "1"


def test_csv_is_rfc4180_with_formulas_neutralised(stack: Stack, world: World) -> None:
    r = stack.rest("GET", f"/api/v2/report/{world.reports['session_summary']}/csv", world.admin)
    raw = r.content.decode()
    assert raw.endswith("\r\n") and raw.count("\r\n") >= 6
    # Quotes doubled, and the field holding a separator, quote or line break is quoted.
    assert '"O""Brien, Jr.\r\nsecond line"' not in raw  # names are not in the summary
    rows = list(csv.reader(io.StringIO(raw, newline="")))
    accounts = {row[8] for row in rows[1:]}
    assert {"'=cmd|' /C calc'!A0", "'+SUM(A1)", "'@admin", "'-rw"} <= accounts
    assert "-1" in {row[13] for row in rows[1:]}  # numbers are not neutralised
    users = csv_rows(stack, world.admin, world.reports["user"])
    assert QUOTED in {row[2] for row in users[1:]}
    raw_users = stack.rest("GET", f"/api/v2/report/{world.reports['user']}/csv",
                           world.admin).content.decode()  # fmt: skip
    assert '"O""Brien, Jr.\r\nsecond line"' in raw_users


class Page(HTMLParser):
    """Collects what a reader sees: title, headings, the meta list, tables, SVG bars, and
    every tag and attribute (to prove nothing from the data became markup)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.text: dict[str, list[str]] = {"title": [], "h1": [], "h2": [], "dd": []}
        self.tables: list[list[list[str]]] = []
        self.bars = 0
        self._stack: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))
        self._stack.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "rect":
            self.bars += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self.tables:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None
        if self._stack and self._stack[-1] == tag:
            self._stack.pop()

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        else:
            owner = next((t for t in reversed(self._stack) if t in self.text), None)
            if owner is not None and data.strip():
                self.text[owner].append(data)


def parse_html(stack: Stack, token: str, rid: str) -> Page:
    r = stack.rest("GET", f"/api/v2/report/{rid}/html", token)
    assert r.status_code == 200
    page = Page()
    page.feed(r.content.decode())
    page.close()
    return page


@pytest.mark.parametrize("kind", ["session_summary", "user", "safe_access", "session_approvals"])
def test_html_matches_snapshot_and_escapes_everything(
    stack: Stack, world: World, kind: str
) -> None:
    rid = world.reports[kind]
    page = parse_html(stack, world.admin, rid)
    title = f"{BY_KEY[kind].title} <b>&amp;</b>"
    assert page.text["title"][0] == title and page.text["h1"] == [title]
    report = ok(stack.rest("GET", f"/api/v2/report/{rid}", world.admin))["report"]
    assert "all time (only the filter applies)" in page.text["dd"]
    assert "none (all sessions)" in page.text["dd"]
    summary, rows_table = page.tables[0], page.tables[-1]
    assert dict(summary)["Sessions"] == str(len(world.specs))
    assert dict(summary)["Rows"] == str(report["rows"])
    assert rows_table[0] == [c.label for c in BY_KEY[kind].columns]
    assert rows_table[1:] == snapshot(stack, rid) == expected_rows(kind, world.specs)
    # Data never became markup: only the template's own tags, no scripts, no external refs.
    tags = {t for t, _ in page.tags}
    assert tags <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "dl", "dt",
                    "dd", "code", "p", "table", "tr", "th", "td", "thead", "tbody", "svg",
                    "line", "text", "rect"}  # fmt: skip
    for _, attrs in page.tags:
        for name, value in attrs:
            assert name not in ("src", "href", "onload", "onerror"), (name, value)
    assert "Sessions over time (per hour)" in page.text["h2"] or any(
        h.startswith("Sessions over time") for h in page.text["h2"]
    )
    assert page.bars >= 2


def test_html_chart_counts_sessions_per_bucket(stack: Stack, world: World) -> None:
    r = stack.rest("GET", f"/api/v2/report/{world.reports['session_summary']}/html", world.admin)
    html = r.content.decode()
    # The sessions span 50 hours: more than 2 days, so one bar per day (docs/reports.md), zero-filled;
    # each bar's <title> says "<day>: <count>".
    counts: dict[str, int] = {}
    for s in world.specs:
        key = s.start.strftime("%Y-%m-%d")
        counts[key] = counts.get(key, 0) + 1
    assert "Sessions over time (per day)" in html
    for label, n in counts.items():
        assert f"<title>{label}: {n}</title>" in html
    assert html.count("<rect ") == 3


def pdf_text(stack: Stack, token: str, rid: str) -> tuple[str, pypdf.PdfReader]:
    r = stack.rest("GET", f"/api/v2/report/{rid}/pdf", token)
    assert r.status_code == 200 and r.content.startswith(b"%PDF-")
    reader = pypdf.PdfReader(io.BytesIO(r.content))
    return "\n".join(p.extract_text() for p in reader.pages), reader


def test_pdf_has_the_same_content(stack: Stack, world: World) -> None:
    rid = world.reports["user"]
    text, reader = pdf_text(stack, world.admin, rid)
    flat = " ".join(text.split())
    assert "User report <b>&amp;</b>" in flat
    for label in ("Filter", "none (all sessions)", "Period", "Summary", "Sessions over time",
                  "Rows (3)", "User e-mail", "First session"):  # fmt: skip
        assert label in flat, label
    for row in expected_rows("user", world.specs):
        assert row[0] in flat and row[1] in flat
    # Non-Latin text survives (DejaVu), control characters print as spaces.
    assert CYRILLIC in flat
    assert 'O"Brien, Jr. second line' in flat
    assert reader.metadata is not None and reader.metadata.title == "User report <b>&amp;</b>"


def test_pdf_hostile_and_long_values(stack: Stack, world: World) -> None:
    text, _ = pdf_text(stack, world.admin, world.reports["session_summary"])
    flat = "".join(text.split())
    assert SCRIPT.replace(" ", "") in flat
    assert FORMULA.replace(" ", "") in flat  # a PDF is not a spreadsheet: shown as is
    assert "LLLLLLLLLL" in flat and "…" in flat  # long value wrapped then cut
    assert "-tail-" not in flat


def test_pdf_and_html_paginate_long_tables(stack: Stack) -> None:
    org = stack.new_org("longpdf")
    admin = stack.token(org, "admin")
    many = [RSpec(start=T0 + timedelta(seconds=i), user_id=f"u{i:03d}") for i in range(150)]
    stack.ingest(admin, [s.to_proto() for s in many])
    rid, report = ready_report(stack, admin)
    assert report["rows"] == 150
    text, reader = pdf_text(stack, admin, rid)
    assert len(reader.pages) >= 3
    for page in reader.pages[1:]:
        assert "Session id" in page.extract_text()  # the header repeats on every page
    assert f"page {len(reader.pages)}/{len(reader.pages)}" in text
    flat = "".join(text.split())
    assert all(s.id[:8] in flat for s in many)


def test_snapshot_does_not_change_when_sessions_do(stack: Stack, world: World) -> None:
    rid = world.reports["session_summary"]
    before = {f: stack.rest("GET", f"/api/v2/report/{rid}/{f}", world.admin).content
              for f in ("csv", "html", "pdf")}  # fmt: skip
    old = world.specs[1]
    changed = dataclasses.replace(old, end=old.start + timedelta(minutes=3), connection="renamed")
    extra = RSpec(start=T0 + timedelta(minutes=5), email="new@acme.example")
    reply = stack.ingest(world.admin, [changed.to_proto(), extra.to_proto()])
    assert reply.written == 2
    after = {f: stack.rest("GET", f"/api/v2/report/{rid}/{f}", world.admin).content
             for f in ("csv", "html", "pdf")}  # fmt: skip
    assert after == before
    # A new report sees the change.
    rid2, _ = ready_report(stack, world.admin)
    rows = csv_rows(stack, world.admin, rid2)
    assert len(rows) - 1 == len(world.specs) + 1
    assert "renamed" in {r[6] for r in rows}


def test_a_report_without_data_source_still_generates(stack: Stack, world: World) -> None:
    rid = world.reports["session_sharing"]
    report = ok(stack.rest("GET", f"/api/v2/report/{rid}", world.admin))["report"]
    assert report["status"] == "ready" and report["rows"] == 0
    assert csv_rows(stack, world.admin, rid) == [["user_email", "invited", "session_id",
                                                  "invited_at"]]  # fmt: skip
    page = parse_html(stack, world.admin, rid)
    html = stack.rest("GET", f"/api/v2/report/{rid}/html", world.admin).content.decode()
    assert "No data source: this service does not record session sharing invites" in html
    assert page.tables[-1] == [["User e-mail", "Invited user", "Session id", "Invited at"]]
    text, _ = pdf_text(stack, world.admin, rid)
    assert "No data source" in " ".join(text.split())


def test_pdf_row_cap_is_announced(stack: Stack, world: World) -> None:
    server = ServerProcess(stack.dsn, stack.server.workdir,
                           env_extra={"REPORT_PDF_MAX_ROWS": "2", "REPORT_SCHEDULER": "0"}).start()  # fmt: skip
    try:
        with grpc.insecure_channel(server.target) as ch:
            stub = reports_pb2_grpc.ReportServiceStub(ch)
            chunks = list(stub.DownloadReport(rpb.DownloadReportRequest(
                id=world.reports["session_summary"], format="pdf"),
                metadata=auth_md(world.admin)))  # fmt: skip
    finally:
        server.stop()
    assert chunks[0].content_type == "application/pdf"
    reader = pypdf.PdfReader(io.BytesIO(b"".join(c.data for c in chunks)))
    flat = " ".join(" ".join(p.extract_text() for p in reader.pages).split())
    assert "This PDF shows the first 2 of 5 rows" in flat
    newest = sorted(world.specs[:5], key=lambda s: s.start, reverse=True)
    assert newest[0].id[:8] in flat.replace(" ", "") and newest[2].id[:8] not in flat.replace(
        " ", ""
    )


def test_grpc_download_streams_chunks(stack: Stack, world: World) -> None:
    stub = report_stub(stack)
    call = stub.DownloadReport(
        rpb.DownloadReportRequest(id=world.reports["session_summary"], format="html"),
        metadata=auth_md(world.admin),
    )
    chunks = list(call)
    assert chunks[0].content_type == "text/html; charset=utf-8"
    assert all(c.content_type == "" for c in chunks[1:])
    rest = stack.rest("GET", f"/api/v2/report/{world.reports['session_summary']}/html",
                      world.admin).content  # fmt: skip
    assert b"".join(c.data for c in chunks) == rest
