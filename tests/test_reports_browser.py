"""A generated report as its readers see it: the HTML download in headless Chromium (console
clean, chart drawn, table complete) and page 1 of the PDF rendered by poppler's pdftoppm.
Screenshots are kept in test-artifacts/report-browser/ (git-ignored) for a human to look at."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from session_audit.client import Client
from tests.browser import chromium, open_page
from tests.factories import T0, Spec
from tests.support import ROOT, Stack

ARTIFACTS = ROOT / "test-artifacts" / "report-browser"
BAR_BLUE = (0x09, 0x69, 0xDA)
needs_chromium = pytest.mark.skipif(
    chromium() is None, reason="chromium is not installed (.ci/run installs Debian's package)"
)
needs_pdftoppm = pytest.mark.skipif(
    shutil.which("pdftoppm") is None,
    reason="pdftoppm is not installed (.ci/run installs Debian's poppler-utils)",
)


def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def spread() -> list[Spec]:
    """Sessions on 6 of 10 days, 1 to 6 per day, so the chart has bars of different heights."""
    out = []
    for day, n in ((0, 3), (1, 1), (3, 6), (4, 2), (7, 4), (9, 5)):
        for k in range(n):
            start = T0 + timedelta(days=day, minutes=17 * k)
            out.append(Spec(start=start, end=start + timedelta(minutes=3), connection=f"db-{k}",
                            email=f"user{k}@example.com"))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def downloads(stack: Stack) -> tuple[list[Spec], Path, Path]:
    org = stack.new_org("browser")
    token = stack.token(org, "admin")
    sessions = spread()
    out = artifacts()
    with Client(stack.grpc_target, token=token, timeout=60) as c:
        assert c.ingest(s.to_proto() for s in sessions).written == len(sessions)
        rid = c.create_report(title="Browser check")
        assert c.wait_report(rid, poll=0.1).rows == len(sessions)
        html = c.download_report(rid, "html", out / "report.html")
        pdf = c.download_report(rid, "pdf", out / "report.pdf")
    return sessions, html, pdf


def variance(image: Image.Image) -> float:
    stddev: float = ImageStat.Stat(image.convert("L")).stddev[0]
    return stddev**2


def inked(image: Image.Image) -> float:
    """Share of pixels that are not (near) white."""
    gray = image.convert("L")
    dark = sum(gray.histogram()[:235])
    return dark / (gray.width * gray.height)


def blue_pixels(image: Image.Image) -> int:
    """Pixels within a small distance of the chart's bar colour."""
    data = image.convert("RGB").tobytes()
    r0, g0, b0 = BAR_BLUE
    return sum(
        1
        for i in range(0, len(data), 3)
        if abs(data[i] - r0) <= 24 and abs(data[i + 1] - g0) <= 24 and abs(data[i + 2] - b0) <= 24
    )


# What the page shows, read in the browser: the chart's box (page coordinates), each bar's
# tooltip ("<bucket>: <n>") and drawn height, the table's headers and first column.
FACTS = """(() => {
  const svg = document.querySelector('svg');
  const r = svg ? svg.getBoundingClientRect() : null;
  const bars = [...document.querySelectorAll('svg rect.bar')];
  return {
    chart: r && {x: r.x, y: r.y + window.scrollY, width: r.width, height: r.height},
    bars: bars.map(b => b.querySelector('title').textContent),
    heights: bars.map(b => b.getBoundingClientRect().height),
    headers: [...document.querySelectorAll('table.rows thead th')].map(
      th => th.textContent.trim()),
    ids: [...document.querySelectorAll('table.rows tbody tr')].map(
      tr => tr.cells[0].textContent.trim()),
  };
})()"""


@dataclass
class Facts:
    chart: dict[str, float] | None
    bars: list[str]
    heights: list[float]
    headers: list[str]
    ids: list[str]


@needs_chromium
def test_html_report_in_chromium(downloads: tuple[list[Spec], Path, Path]) -> None:
    sessions, html, _ = downloads

    async def look() -> tuple[Facts, list[str]]:
        async with open_page(html.resolve().as_uri()) as page:
            facts = Facts(**await page.evaluate(FACTS))
            await page.screenshot(artifacts() / "report.png")
            assert facts.chart is not None, "the report has no chart"
            await page.screenshot(artifacts() / "chart.png", clip=facts.chart)
            await asyncio.sleep(0.2)  # late console messages
            return facts, page.console_errors()

    facts, errors = asyncio.run(look())
    assert errors == []
    # The table: every session once, under the report's column headers.
    assert facts.headers[:3] == ["Session id", "Started", "Finished"]
    assert sorted(facts.ids) == sorted(s.id for s in sessions)
    # The chart's bars add up to the sessions, and they were drawn with a height.
    counts = [int(t.rsplit(": ", 1)[1]) for t in facts.bars]
    assert sum(counts) == len(sessions)
    assert max(facts.heights) > 10
    # And the pixels in the chart's box are not blank: bars in the bar colour.
    chart = Image.open(artifacts() / "chart.png")
    assert chart.width > 100 and chart.height > 50
    assert variance(chart) > 100
    assert blue_pixels(chart) > 200
    assert Image.open(artifacts() / "report.png").height > chart.height


@needs_chromium
def test_console_check_sees_errors(tmp_path: Path) -> None:
    """The console check above can fail: a page that logs an error and throws is caught."""
    page_file = tmp_path / "bad.html"
    page_file.write_text(
        "<!DOCTYPE html><p>x</p><script>console.error('boom');undefinedFunction();</script>"
    )

    async def look() -> list[str]:
        async with open_page(page_file.as_uri()) as page:
            await asyncio.sleep(0.2)
            return page.console_errors()

    errors = asyncio.run(look())
    assert any("boom" in e for e in errors), errors
    assert any("undefinedFunction" in e for e in errors), errors


def pdf_page_one(pdf: Path, out: Path) -> Image.Image:
    subprocess.run(
        ["pdftoppm", "-png", "-r", "72", "-f", "1", "-l", "1", "-singlefile", str(pdf),
         str(out.with_suffix(""))],
        check=True, timeout=60,
    )  # fmt: skip
    return Image.open(out)


@needs_pdftoppm
def test_pdf_page_one_is_not_blank(downloads: tuple[list[Spec], Path, Path]) -> None:
    _, _, pdf = downloads
    page = pdf_page_one(pdf, artifacts() / "report-page1.png")
    # A4 or Letter at 72 dpi, portrait or landscape.
    assert sorted(page.size)[0] > 500
    assert variance(page) > 100
    assert 0.005 < inked(page) < 0.9
    # The chart's bars, in the bar colour (the PDF draws the HTML's chart).
    assert blue_pixels(page) > 50


@needs_pdftoppm
def test_blank_check_can_fail(tmp_path: Path) -> None:
    from fpdf import FPDF

    blank = FPDF()
    blank.add_page()
    path = tmp_path / "blank.pdf"
    blank.output(str(path))
    page = pdf_page_one(path, tmp_path / "blank.png")
    assert variance(page) < 1 and inked(page) == 0
