"""Test harness: a real PostgreSQL, the real server in its own process, and real Envoy.

`Stack` starts them once per test session (see conftest.py). Tests create their own orgs with
unique names, so they never see each other's rows.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import httpx

from session_audit import envoy
from session_audit.core import auth, db, migrate
from session_audit.v1 import sessions_pb2 as pb
from session_audit.v1 import sessions_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def _with_conn(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await db.connect(dsn)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows
    finally:
        await conn.close()


def fresh_database(url: str) -> tuple[str, str]:
    """A new, empty database on `url`'s server: (its DSN, its name). With CITUS_WORKER_URLS
    (a Citus cluster, tests/citus_cluster.py) the database is made on every node, with the
    citus extension, and the workers are added to it."""
    name = f"session_audit_test_{uuid.uuid4().hex[:8]}"
    workers = os.environ.get("CITUS_WORKER_URLS", "").split()
    for node in [url, *workers]:
        run(_with_conn(node, f'CREATE DATABASE "{name}"'))
        if workers:
            run(_with_conn(_on(node, name), "CREATE EXTENSION citus"))
    dsn = _on(url, name)
    if workers:
        coordinator = urlsplit(url)
        run(_with_conn(dsn, "SELECT citus_set_coordinator_host($1, $2)",
                       coordinator.hostname, coordinator.port))  # fmt: skip
        for w in workers:
            parts = urlsplit(w)
            run(_with_conn(dsn, "SELECT citus_add_node($1, $2)", parts.hostname, parts.port))
    return dsn, name


def drop_database(url: str, name: str) -> None:
    for node in [url, *os.environ.get("CITUS_WORKER_URLS", "").split()]:
        run(_with_conn(node, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _on(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + database))


def wait_grpc(target: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        grpc.channel_ready_future(ch).result(timeout=max(0.1, deadline - time.monotonic()))


@dataclass
class ServerProcess:
    """`session-audit serve` in a child process against `dsn`."""

    dsn: str
    workdir: Path
    env_extra: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int | None = None) -> ServerProcess:
        self.port = port or envoy.free_port()
        env = {
            **os.environ,
            "DATABASE_URL": self.dsn,
            "GRPC_PORT": str(self.port),
            "HEALTH_INTERVAL_SECONDS": "1",
            # No fixed /metrics port: concurrent servers would collide on the default.
            "METRICS_PORT": "0",
            **self.env_extra,
        }
        log = open(self.workdir / f"server-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "session_audit.cli", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_grpc(self.target)
        except BaseException:
            self.stop()  # not ready in time: no orphan server left behind
            raise
        return self

    def start_envoy(self, http_port: int, workdir: Path, **kw: Any) -> subprocess.Popen[bytes]:
        """Envoy in front of this server (envoy.start's keywords); if Envoy cannot start, the
        server is stopped too, so a failed set-up leaves no orphan process."""
        try:
            return envoy.start(http_port, self.port, workdir, **kw)
        except BaseException:
            self.stop()
            raise

    def children(self) -> list[int]:
        """PIDs of worker processes (when started with WORKERS > 1)."""
        import psutil

        assert self.proc is not None
        children = psutil.Process(self.proc.pid).children()
        return [c.pid for c in children if "spawn_main" in " ".join(c.cmdline())]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@dataclass
class Stack:
    dsn: str
    server: ServerProcess
    http_port: int
    envoy_proc: subprocess.Popen[bytes]
    # The server's /metrics and Envoy's /stats/prometheus listeners.
    metrics_port: int = 0
    envoy_metrics_port: int = 0

    @property
    def grpc_target(self) -> str:
        return self.server.target

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    # -- database helpers -------------------------------------------------------------------
    def sql(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return run(_with_conn(self.dsn, query, *args))

    def token(self, org: str, role: str, email: str = "") -> str:
        async def go() -> str:
            conn = await db.connect(self.dsn)
            try:
                return await auth.create_token(conn, org, role, email or f"{role}@{org}.example")
            finally:
                await conn.close()

        return run(go())

    def new_org(self, prefix: str = "org") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:10]}"

    # -- clients ------------------------------------------------------------------------------
    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.grpc_target)

    def stub(self) -> pb_grpc.SessionServiceStub:
        return pb_grpc.SessionServiceStub(self.channel())

    def rest(self, method: str, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}) or {})
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        return httpx.request(method, self.http + path, headers=headers, timeout=60, **kw)

    def ingest(self, token: str, sessions: Iterable[pb.Session]) -> pb.IngestSessionsResponse:
        stub = self.stub()
        reply: pb.IngestSessionsResponse = stub.IngestSessions(
            pb.IngestSessionsRequest(sessions=list(sessions)),
            metadata=[("authorization", f"Bearer {token}")],
        )
        return reply


def start_stack(dsn: str, workdir: Path) -> Stack:
    run(_migrate(dsn))
    metrics_port, envoy_metrics_port = envoy.free_port(), envoy.free_port()
    server = ServerProcess(dsn, workdir, {"METRICS_PORT": str(metrics_port)}).start()
    http_port = envoy.free_port()
    proxy = server.start_envoy(http_port, workdir, metrics_port=envoy_metrics_port)
    return Stack(dsn, server, http_port, proxy, metrics_port, envoy_metrics_port)


async def _migrate(dsn: str) -> None:
    conn = await db.connect(dsn)
    try:
        await migrate.migrate(conn)
    finally:
        await conn.close()


def auth_md(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]
