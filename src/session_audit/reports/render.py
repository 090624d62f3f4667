"""Downloads: the report as a document (header, summary, chart, table), rendered as CSV or
HTML in streamed chunks (PDF: report_pdf.py). Rows arrive in batches from the snapshot, so a
million-row report never sits whole in memory.

Escaping: HTML goes through jinja2 with autoescape (and markupsafe.escape for the streamed
rows); CSV is RFC 4180 (csv module: quotes doubled, fields with separators, quotes or line
breaks quoted, CRLF rows) and text cells that a spreadsheet would run as a formula (starting
with = + - @, tab or CR) get a leading apostrophe.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any

import jinja2
from markupsafe import escape

from session_audit.reports.types import Column

CHUNK = 256 * 1024
CONTENT_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "html": "text/html; charset=utf-8",
    "pdf": "application/pdf",
}
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

Batches = AsyncIterator[list[list[str]]]


@dataclass(frozen=True)
class ReportDoc:
    id: int
    title: str
    type_title: str
    query_filter: str
    query_order: str
    period: str
    time_zone: str
    generated_at: datetime
    owner: str
    columns: tuple[Column, ...]
    summary: list[list[str]]
    chart: dict[str, Any] | None
    note: str
    row_count: int
    notices: list[str] = field(default_factory=list)

    @property
    def generated(self) -> str:
        return self.generated_at.strftime("%Y-%m-%dT%H:%M:%SZ")


def file_name(doc: ReportDoc, fmt: str) -> str:
    """ASCII letters, digits, '.', '_' and '-' only: safe in any header or file system."""
    folded = unicodedata.normalize("NFKD", doc.title).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", folded)
    slug = re.sub(r"[-.]{2,}", "-", slug).strip("-.")[:60].strip("-.")
    return f"{slug or 'report'}-{doc.id}.{fmt}"


def content_disposition(doc: ReportDoc, fmt: str) -> str:
    return f'attachment; filename="{file_name(doc, fmt)}"'


def neutralise(cell: str) -> str:
    """A cell a spreadsheet would evaluate as a formula becomes text."""
    return "'" + cell if cell.startswith(FORMULA_START) else cell


async def csv_chunks(doc: ReportDoc, batches: Batches) -> AsyncIterator[bytes]:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow([c.key for c in doc.columns])
    text_cols = [c.kind == "text" for c in doc.columns]
    async for batch in batches:
        writer.writerows(
            [neutralise(x) if t else x for x, t in zip(row, text_cols, strict=True)]
            for row in batch
        )
        if buf.tell() >= CHUNK:
            yield buf.getvalue().encode()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue().encode()


# -- HTML -------------------------------------------------------------------------------------

_ENV = jinja2.Environment(
    loader=jinja2.FunctionLoader(
        lambda name: resources.files("session_audit.reports.templates").joinpath(name).read_text()
    ),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
_ROWS_MARK = "\x00rows\x00"
CHART_W, CHART_H, CHART_PAD = 960, 220, 40


def chart_geometry(chart: dict[str, Any] | None) -> dict[str, Any] | None:
    """Bars of an inline SVG chart: x, y, width, height per bucket, plus axis labels."""
    if chart is None:
        return None
    buckets = chart.get("buckets", [])
    peak = max((int(n) for _, n in buckets), default=0)
    plot_w, plot_h = CHART_W - 2 * CHART_PAD, CHART_H - 2 * CHART_PAD
    width = plot_w / max(1, len(buckets))
    bars, labels = [], []
    every = max(1, len(buckets) // 8)
    for i, (label, n) in enumerate(buckets):
        h = 0.0 if peak == 0 else plot_h * int(n) / peak
        x = CHART_PAD + i * width
        bars.append({"x": round(x + width * 0.1, 2), "y": round(CHART_PAD + plot_h - h, 2),
                     "w": round(max(width * 0.8, 0.5), 2), "h": round(h, 2), "label": label,
                     "n": n})  # fmt: skip
        if i % every == 0:
            labels.append({"x": round(x, 2), "text": label})
    return {
        "title": chart.get("title", "Sessions over time"), "unit": chart.get("unit", "day"),
        "bars": bars, "labels": labels, "peak": peak, "width": CHART_W, "height": CHART_H,
        "pad": CHART_PAD, "base": CHART_PAD + plot_h, "empty": not buckets,
    }  # fmt: skip


def _html_parts(doc: ReportDoc) -> tuple[str, str]:
    page = _ENV.get_template("report.html.j2").render(
        doc=doc, chart=chart_geometry(doc.chart), rows=_ROWS_MARK
    )
    head, tail = page.split(_ROWS_MARK)
    return head, tail


def _html_row(row: list[str], classes: list[str]) -> str:
    cells = "".join(f"<td{c}>{escape(x)}</td>" for x, c in zip(row, classes, strict=True))
    return f"<tr>{cells}</tr>\n"


async def html_chunks(doc: ReportDoc, batches: Batches) -> AsyncIterator[bytes]:
    head, tail = _html_parts(doc)
    classes = [' class="num"' if c.kind == "integer" else "" for c in doc.columns]
    parts: list[str] = [head]
    size = len(head)
    async for batch in batches:
        for row in batch:
            text = _html_row(row, classes)
            parts.append(text)
            size += len(text)
        if size >= CHUNK:
            yield "".join(parts).encode()
            parts, size = [], 0
    parts.append(tail)
    yield "".join(parts).encode()
