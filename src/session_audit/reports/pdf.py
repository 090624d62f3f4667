"""PDF downloads with fpdf2: the same content as the HTML (header, summary, chart, table),
A4 landscape, the table paginated with its header repeated on every page.

Text uses DejaVu Sans Condensed (shipped in session_audit/fonts/, Bitstream Vera licence):
fpdf2's core fonts are Latin-1 only, DejaVu covers Latin, Greek, Cyrillic and more (not CJK:
characters it lacks print as blanks). Values never become PDF syntax (fpdf2 encodes text as
glyph ids). Control characters print as spaces; a value wider than its column wraps onto at
most MAX_LINES lines and is cut with "…" (the CSV and HTML carry it whole).

fpdf2 builds the document in memory, so the table is capped at REPORT_PDF_MAX_ROWS rows (a
notice says so); rendering runs in a worker thread so the server's event loop stays free.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any

from fpdf import FPDF

from session_audit.reports.render import ReportDoc, chart_geometry

FONT = "dejavu"
SIZE = 6.5
LINE = 3.0
MAX_LINES = 3
MARGIN = 10.0
_WIDTHS = {"time": 27.0, "integer": 15.0, "boolean": 14.0}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_WORDS = re.compile(r"\S+\s*|\s+")


def _font_path(name: str) -> str:
    return str(resources.files("session_audit.reports.fonts").joinpath(name))


class _Pdf(FPDF):
    doc_title = ""

    def footer(self) -> None:
        self.set_y(-8)
        self.set_font(FONT, size=6)
        self.set_text_color(110)
        self.cell(0, 4, f"{self.doc_title} · page {self.page_no()}/{{nb}}", align="R")
        self.set_text_color(0)


class PdfBuilder:
    """Feed rows with add_rows(); output() returns the document. Not thread-safe: one thread
    at a time (the service awaits each call in turn)."""

    def __init__(self, doc: ReportDoc, max_rows: int) -> None:
        self.doc = doc
        self.max_rows = max_rows
        self.rows_written = 0
        pdf = _Pdf(orientation="L", unit="mm", format="A4")
        pdf.doc_title = _clean(doc.title)[:80]
        pdf.set_creation_date(doc.generated_at)
        pdf.set_title(_clean(doc.title))
        pdf.set_producer("session-audit")
        pdf.set_margins(MARGIN, MARGIN, MARGIN)
        pdf.set_auto_page_break(False)
        pdf.add_font(FONT, "", _font_path("DejaVuSansCondensed.ttf"))
        pdf.add_font(FONT, "B", _font_path("DejaVuSansCondensed-Bold.ttf"))
        self.pdf = pdf
        self.bottom = pdf.h - MARGIN - 6
        self.widths = self._column_widths()
        pdf.set_font(FONT, size=SIZE)
        self._cw = functools.cache(lambda c: pdf.get_string_width(c))
        self._front_matter()

    # -- layout ----------------------------------------------------------------------------

    def _column_widths(self) -> list[float]:
        usable = self.pdf.w - 2 * MARGIN
        fixed = [_WIDTHS.get(c.kind) for c in self.doc.columns]
        rest = usable - sum(w for w in fixed if w is not None)
        weights = sum(c.weight for c, w in zip(self.doc.columns, fixed, strict=True) if w is None)
        unit = rest / weights if weights else 0.0
        return [
            w if w is not None else unit * c.weight
            for c, w in zip(self.doc.columns, fixed, strict=True)
        ]

    def _width(self, text: str) -> float:
        cw = self._cw
        return float(sum(cw(c) for c in text))

    def _fit(self, text: str, width: float) -> list[str]:
        """Lines of `text` within `width`: wrapped at spaces (long words broken), at most
        MAX_LINES, the last cut with … when more would follow."""
        text = _clean(text)
        room = width - 1.2
        if self._width(text) <= room:
            return [text]
        lines: list[str] = []
        current = ""
        for word in _WORDS.findall(text):
            if self._width(current + word) <= room:
                current += word
                continue
            if current.strip():
                lines.append(current.rstrip())
            current = word
            while self._width(current) > room:
                cut = self._prefix(current, room)
                lines.append(current[:cut])
                current = current[cut:]
            if len(lines) > MAX_LINES:
                break
        if current.strip():
            lines.append(current.rstrip())
        if len(lines) <= MAX_LINES:
            return lines
        last = lines[MAX_LINES - 1]
        while last and self._width(last + "…") > room:
            last = last[:-1]
        return [*lines[: MAX_LINES - 1], last + "…"]

    def _prefix(self, text: str, room: float) -> int:
        """How many leading characters of `text` fit in `room` (at least one)."""
        used = 0.0
        for i, ch in enumerate(text):
            used += self._cw(ch)
            if used > room:
                return max(1, i)
        return len(text)

    def _front_matter(self) -> None:
        pdf, doc = self.pdf, self.doc
        pdf.add_page()
        pdf.set_font(FONT, "B", 14)
        pdf.multi_cell(0, 7, _clean(doc.title), new_x="LMARGIN", new_y="NEXT")
        pdf.set_font(FONT, size=8)
        meta = [
            ("Report", f"{doc.type_title} · id {doc.id}"),
            ("Filter", doc.query_filter or "none (all sessions)"),
            ("Order", doc.query_order or "default"),
            ("Period", doc.period),
            ("Time zone", doc.time_zone),
            ("Generated", doc.generated),
            ("For", doc.owner),
        ]
        for label, value in meta:
            pdf.set_text_color(90)
            pdf.cell(24, 4, label)
            pdf.set_text_color(0)
            pdf.multi_cell(0, 4, _clean(value), new_x="LMARGIN", new_y="NEXT")
        for text in [doc.note, *doc.notices]:
            if text:
                pdf.ln(1)
                pdf.set_fill_color(255, 248, 197)
                pdf.multi_cell(0, 4.5, _clean(text), fill=True, new_x="LMARGIN", new_y="NEXT")
        pdf.ln(2)
        pdf.set_font(FONT, "B", 10)
        pdf.cell(0, 6, "Summary", new_x="LMARGIN", new_y="NEXT")
        pdf.set_font(FONT, size=8)
        for label, value in doc.summary:
            pdf.set_text_color(90)
            pdf.cell(40, 4, _clean(label))
            pdf.set_text_color(0)
            pdf.cell(0, 4, _clean(value), new_x="LMARGIN", new_y="NEXT")
        self._chart()
        pdf.ln(2)
        pdf.set_font(FONT, "B", 10)
        pdf.cell(0, 6, f"Rows ({doc.row_count})", new_x="LMARGIN", new_y="NEXT")
        self.y = pdf.get_y()
        self._table_header()

    def _chart(self) -> None:
        geo = chart_geometry(self.doc.chart)
        if geo is None:
            return
        pdf = self.pdf
        pdf.ln(2)
        pdf.set_font(FONT, "B", 10)
        pdf.cell(0, 6, f"{geo['title']} (per {geo['unit']})", new_x="LMARGIN", new_y="NEXT")
        pdf.set_font(FONT, size=6)
        if geo["empty"]:
            pdf.cell(0, 4, "No data in this period.", new_x="LMARGIN", new_y="NEXT")
            return
        top = pdf.get_y()
        height, width = 40.0, pdf.w - 2 * MARGIN - 12
        scale_x = width / geo["width"]
        scale_y = height / geo["height"]
        left = MARGIN + 10
        pdf.set_draw_color(200)
        pdf.line(left, top + geo["base"] * scale_y, left + width, top + geo["base"] * scale_y)
        pdf.set_fill_color(9, 105, 218)
        for b in geo["bars"]:
            if b["h"] > 0:
                pdf.rect(left + b["x"] * scale_x, top + b["y"] * scale_y,
                         max(b["w"] * scale_x, 0.2), b["h"] * scale_y, style="F")  # fmt: skip
        pdf.set_text_color(90)
        pdf.text(MARGIN, top + geo["pad"] * scale_y + 1, str(geo["peak"]))
        pdf.text(MARGIN, top + geo["base"] * scale_y, "0")
        for lab in geo["labels"]:
            pdf.text(left + lab["x"] * scale_x, top + (geo["base"] + 12) * scale_y,
                     _clean(lab["text"]))  # fmt: skip
        pdf.set_text_color(0)
        pdf.set_y(top + height + 2)

    def _table_header(self) -> None:
        pdf = self.pdf
        pdf.set_font(FONT, "B", SIZE)
        fitted = [self._fit(c.label, w) for c, w in zip(self.doc.columns, self.widths, strict=True)]
        height = max(len(f) for f in fitted) * LINE + 1
        pdf.set_fill_color(240, 242, 245)
        pdf.rect(MARGIN, self.y, sum(self.widths), height, style="F")
        self._put(fitted, height)
        pdf.set_font(FONT, size=SIZE)

    def _put(self, fitted: list[list[str]], height: float) -> None:
        pdf = self.pdf
        x = MARGIN
        for lines, w in zip(fitted, self.widths, strict=True):
            for i, line in enumerate(lines):
                if line:
                    pdf.text(x + 0.6, self.y + LINE * (i + 1) - 0.6, line)
            x += w
        self.y += height
        pdf.set_draw_color(225)
        pdf.line(MARGIN, self.y, MARGIN + sum(self.widths), self.y)

    # -- rows -----------------------------------------------------------------------------

    def add_rows(self, rows: list[list[str]]) -> None:
        for row in rows:
            if self.rows_written >= self.max_rows:
                return
            fitted = [self._fit(x, w) for x, w in zip(row, self.widths, strict=True)]
            height = max(len(f) for f in fitted) * LINE + 0.8
            if self.y + height > self.bottom:
                self.pdf.add_page()
                self.y = MARGIN
                self._table_header()
            self._put(fitted, height)
            self.rows_written += 1

    @property
    def full(self) -> bool:
        return self.rows_written >= self.max_rows

    def output(self) -> bytes:
        if self.doc.row_count == 0:
            self.pdf.set_y(self.y + 2)
            self.pdf.cell(0, 4, "No rows.")
        return bytes(self.pdf.output())


def _clean(text: Any) -> str:
    return _CONTROL.sub(" ", str(text))


def pdf_notice(row_count: int, max_rows: int) -> str | None:
    if row_count <= max_rows:
        return None
    return (
        f"This PDF shows the first {max_rows:,} of {row_count:,} rows "
        "(REPORT_PDF_MAX_ROWS); the CSV and HTML downloads carry every row."
    )
