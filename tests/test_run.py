"""`session-audit run` (what `make run` starts): on an empty database it loads demo data, prints
an admin token and commands that work as pasted, and Ctrl-C stops everything it started."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from session_audit.envoy import free_port
from tests.support import Stack, _with_conn, fresh_database, run

BANNER_END = "Ctrl-C stops everything."


@pytest.fixture()
def empty_database(stack: Stack) -> Iterator[str]:
    dsn, name = fresh_database(stack.dsn)
    yield dsn
    run(_with_conn(stack.dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def read_banner(proc: subprocess.Popen[str], timeout: float = 120) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"run exited early ({proc.poll()}): {''.join(lines)}")
        lines.append(line.rstrip("\n"))
        if line.strip() == BANNER_END:
            return lines
    raise AssertionError("no banner in time")


def commands(lines: list[str]) -> list[str]:
    """The commands under 'Try:', backslash continuations joined."""
    block = lines[lines.index("Try:") + 1 :]
    block = block[: block.index("")]
    joined, current = [], ""
    for line in block:
        current += line.strip().removesuffix("\\").strip() + " "
        if not line.endswith("\\"):
            joined.append(current.strip())
            current = ""
    return joined


def demo_data_shown(body: dict[str, Any]) -> bool:
    """Each banner curl answers from the demo data: sessions listed, a report with items, a
    histogram with sessions in some bucket, statistics over some sessions."""
    if "data" in body:
        return bool(body["data"])
    if "items" in body:
        return bool(body["items"]) and int(body["total_redact_count"]) > 0
    if body.get("key") == "histogram":
        return any(int(b["start_count"]) > 0 for b in body["body"]["buckets"])
    if body.get("key") == "stats":
        return int(body["body"]["total"]) > 0 and bool(body["body"]["values"])
    return False


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_run_prints_commands_that_work_and_ctrl_c_stops_everything(
    empty_database: str, tmp_path: Path
) -> None:
    grpc_port, http_port, metrics_port, envoy_metrics_port = (free_port() for _ in range(4))
    env = {**os.environ, "DATABASE_URL": empty_database, "GRPC_PORT": str(grpc_port),
           "HTTP_PORT": str(http_port), "SESSION_AUDIT_DATA_DIR": str(tmp_path),
           "METRICS_PORT": str(metrics_port),
           "ENVOY_METRICS_PORT": str(envoy_metrics_port)}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "session_audit.cli", "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        lines = read_banner(proc)
        token = next(x for x in lines if "export TOKEN=" in x).split("TOKEN=", 1)[1]
        cmds = commands(lines)
        assert [c.split()[0].rsplit("/", 1)[-1] for c in cmds] == [
            "curl", "curl", "curl", "curl", "curl", "grpcurl", "grpcurl",
        ]  # fmt: skip
        for cmd in cmds:
            argv = shlex.split(cmd.replace("$TOKEN", token))
            if argv[0] == "curl":
                # Performed as curl would (the machine may have no curl binary).
                header = argv[argv.index("-H") + 1]
                name, value = header.split(": ", 1)
                r = httpx.get(argv[-1], headers={name: value}, timeout=30)
                assert r.status_code == 200, (cmd, r.text)
                assert demo_data_shown(r.json()), f"{cmd}: the demo data does not show: {r.text}"
            else:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, (cmd, done.stderr)
                assert "session_audit.v1.SessionService" in done.stdout or '"data"' in done.stdout
        # The metrics line's endpoints answer, and counted the calls just made.
        (line,) = [x for x in lines if x.strip().startswith("metrics ")]
        server_url, envoy_url = line.split()[1:]
        assert server_url == f"http://127.0.0.1:{metrics_port}/metrics"
        assert envoy_url == f"http://127.0.0.1:{envoy_metrics_port}/stats/prometheus"
        assert 'grpc_method="ListSessions"' in httpx.get(server_url, timeout=10).text
        assert "envoy_http_downstream_rq_total" in httpx.get(envoy_url, timeout=10).text
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(60)
    assert code == 0
    assert not listening(grpc_port) and not listening(http_port)


def test_run_honours_workers(stack: Stack, tmp_path: Path) -> None:
    """WORKERS=2: `run` starts two server processes on the gRPC port, Envoy in front of them
    once both listen, and Ctrl-C still stops everything."""
    import psutil

    grpc_port, http_port = free_port(), free_port()
    env = {**os.environ, "DATABASE_URL": stack.dsn, "GRPC_PORT": str(grpc_port),
           "HTTP_PORT": str(http_port), "SESSION_AUDIT_DATA_DIR": str(tmp_path),
           "WORKERS": "2"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "session_audit.cli", "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        lines = read_banner(proc)
        token = next(x for x in lines if "export TOKEN=" in x).split("TOKEN=", 1)[1]
        workers = [
            c for c in psutil.Process(proc.pid).children()
            if "spawn_main" in " ".join(c.cmdline())
        ]  # fmt: skip
        assert len(workers) == 2
        assert all(
            any(c.laddr.port == grpc_port and c.status == psutil.CONN_LISTEN
                for c in w.net_connections("tcp"))
            for w in workers
        )  # fmt: skip
        for _ in range(6):
            r = httpx.get(f"http://127.0.0.1:{http_port}/api/sessions?limit=1",
                          headers={"authorization": f"Bearer {token}"}, timeout=30)  # fmt: skip
            assert r.status_code == 200, r.text
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(60)
    assert code == 0
    assert not listening(grpc_port) and not listening(http_port)
