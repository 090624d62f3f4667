"""The `make run` banner's Reports commands work as pasted: run through bash and the real curl
against the test stack, they list definitions, generate a report, wait for it and download it."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from session_audit.cli import _print_banner
from session_audit.core.config import Config
from tests.report_reference import RSpec
from tests.support import Stack

HEAD = "Reports (API v2): list definitions, generate a report, wait until ready, download it:"


def reports_block(stack: Stack, org: str, token: str) -> list[str]:
    config = replace(Config.from_environ({}), http_port=stack.http_port)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _print_banner(config, stack.server.port, org, token)
    lines = out.getvalue().splitlines()
    block = lines[lines.index(HEAD) + 1 :]
    return block[: block.index("")]


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl binary on this machine")
def test_banner_reports_commands_work_as_pasted(stack: Stack, tmp_path: Path) -> None:
    org = stack.new_org("banner")
    token = stack.token(org, "admin", "admin@banner.example")
    stack.ingest(token, [RSpec(protocol="ssh").to_proto(), RSpec(protocol="rdp").to_proto()])
    script = "set -euo pipefail\n" + "\n".join(reports_block(stack, org, token)) + "\n"
    done = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env={**os.environ, "TOKEN": token},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, (script, done.stdout, done.stderr)
    assert done.stdout.startswith('{"defined_reports":[{"id":"5","title":"System report"')
    files = list(tmp_path.glob("Session-summary-*.html"))
    assert len(files) == 1, list(tmp_path.iterdir())
    html = files[0].read_text()
    assert html.startswith("<!DOCTYPE html>") and "protocol.eq(ssh)" in html
    assert "Rows (1)" in html
