"""Graceful shutdown of `session-audit run` (issue 11, findings 10-11): on SIGTERM the server
turns NOT_SERVING, Envoy drains, and a slow client's download and a long ingest stream both
complete within the grace period; the banner's admin token is reused, not minted per start;
Envoy's admin interface is a 0600 Unix socket."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx

from session_audit.envoy import admin_socket, free_port
from session_audit.v1 import sessions_pb2 as pb
from session_audit.v1 import sessions_pb2_grpc as pb_grpc
from tests.factories import T0, Spec
from tests.support import auth_md
from tests.test_run import empty_database, listening, read_banner  # noqa: F401 - fixture

ROWS = 40_000


def _start(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    log = open(Path(env["SESSION_AUDIT_DATA_DIR"]) / "run.log", "a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "session_audit.cli", "run"], env=env, stdout=subprocess.PIPE,
        stderr=log, text=True, start_new_session=True,
    )  # fmt: skip
    lines = read_banner(proc)
    token = next(x for x in lines if "export TOKEN=" in x).split("TOKEN=", 1)[1]
    return proc, token


def _slow_get(port: int, path: str, token: str, seconds: float, size: int) -> bytes:
    """GET over a socket with a small receive buffer, read at size/seconds bytes/s: the
    response cannot sit whole in kernel buffers, Envoy has to keep sending it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 "Connection: close\r\n\r\n".encode())  # fmt: skip
    pace = 16384 / (size / seconds)
    data = bytearray()
    while True:
        chunk = sock.recv(16384)
        if not chunk:
            break
        data += chunk
        time.sleep(pace)
    sock.close()
    return bytes(data)


def _dechunk(body: bytes) -> bytes:
    """The payload of a `transfer-encoding: chunked` body."""
    out, rest = bytearray(), body
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += rest[:size]
        rest = rest[size + 2 :]


def test_sigterm_drains_a_slow_download_and_a_stream_then_exits(
    empty_database: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    grpc_port, http_port = free_port(), free_port()
    env = {**os.environ, "DATABASE_URL": empty_database, "GRPC_PORT": str(grpc_port),
           "HTTP_PORT": str(http_port), "SESSION_AUDIT_DATA_DIR": str(tmp_path),
           "SHUTDOWN_GRACE_SECONDS": "15", "METRICS_PORT": str(free_port()),
           "ENVOY_METRICS_PORT": str(free_port())}  # fmt: skip
    proc, token = _start(env)
    try:
        sock = admin_socket(tmp_path, http_port)
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        # Enough sessions for a report far larger than socket buffers.
        specs = [Spec(start=T0 + timedelta(seconds=i), script="x" * 40) for i in range(ROWS)]
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            stub = pb_grpc.SessionServiceStub(ch)
            reqs = (pb.IngestSessionsRequest(sessions=[s.to_proto() for s in specs[i : i + 1000]])
                    for i in range(0, ROWS, 1000))  # fmt: skip
            assert stub.StreamIngestSessions(reqs, metadata=auth_md(token)).written == ROWS
        base = f"http://127.0.0.1:{http_port}"
        auth = {"authorization": f"Bearer {token}"}
        rid = httpx.post(f"{base}/api/v2/report", headers=auth, json={}, timeout=30).json()[
            "report"]["id"]  # fmt: skip
        deadline = time.monotonic() + 120
        while httpx.get(f"{base}/api/v2/report/{rid}", headers=auth,
                        timeout=30).json()["report"]["status"] == "pending":  # fmt: skip
            assert time.monotonic() < deadline
            time.sleep(0.2)
        full = httpx.get(f"{base}/api/v2/report/{rid}/html", headers=auth, timeout=60).content
        assert len(full) > 8_000_000

        results: dict[str, Any] = {}

        def download() -> None:
            raw = _slow_get(http_port, f"/api/v2/report/{rid}/html", token, 5.0, len(full))
            results["download"] = _dechunk(raw.partition(b"\r\n\r\n")[2])

        extra = [Spec(start=T0 - timedelta(seconds=i + 1)) for i in range(1000)]

        def stream() -> None:
            def gen() -> Iterator[pb.IngestSessionsRequest]:
                for i in range(0, 1000, 100):
                    yield pb.IngestSessionsRequest(
                        sessions=[s.to_proto() for s in extra[i : i + 100]]
                    )
                    time.sleep(0.4)

            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
                results["stream"] = pb_grpc.SessionServiceStub(ch).StreamIngestSessions(
                    gen(), metadata=auth_md(token), timeout=60
                )

        threads = [threading.Thread(target=download), threading.Thread(target=stream)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert results["stream"].written == 1000
        assert results["download"] == full
        assert proc.wait(30) == 0
        assert time.monotonic() - t0 < 15 + 5
        assert not listening(grpc_port) and not listening(http_port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    # The next start prints the same admin token (no new token per start).
    again, token2 = _start(env)
    try:
        assert token2 == token
        assert stat.S_IMODE((tmp_path / "banner-token").stat().st_mode) == 0o600
    finally:
        os.killpg(again.pid, signal.SIGINT)
        assert again.wait(60) == 0
