"""Read replicas (core/reads.py, docs/scaling.md): a real streaming standby of the embedded
primary (pg_basebackup + streaming replication with the pgserver binaries). Reads go to the
standby; a caller reads its own writes; a standby lagging more than READ_MAX_LAG_SECONDS, or
down, sends reads to the primary in the same request."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest

from session_audit.v1 import sessions_pb2 as pb
from session_audit.v1 import sessions_pb2_grpc as pb_grpc
from tests.factories import T0, Spec
from tests.support import ServerProcess, Stack, _with_conn, auth_md, run

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("DATABASE_URL")), reason="needs the embedded primary (its binaries)"
)
MAX_LAG = 6


def _bin() -> Path:
    import pgserver

    return Path(pgserver.__file__).parent / "pginstall" / "bin"


def _as_server_user(cmd: list[str]) -> None:
    user = "pgserver" if os.geteuid() == 0 else None
    subprocess.run(cmd, check=True, user=user, stdout=subprocess.DEVNULL)


@pytest.fixture()
def standby(stack: Stack, workdir: Path) -> Iterator[str]:
    """A hot standby of the stack's embedded primary; its DSN (the same database)."""
    socket_dir = parse_qs(urlsplit(stack.dsn).query)["host"][0]
    pgdata = workdir / "pg" / "pgdata"
    port = (pgdata / "postmaster.pid").read_text().splitlines()[3].strip()
    data = workdir / f"standby-{uuid.uuid4().hex[:6]}"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(data, "pgserver", "pgserver")
    data.chmod(0o700)
    _as_server_user([str(_bin() / "pg_basebackup"), "-D", str(data), "-R", "-X", "stream",
                     "-h", socket_dir, "-p", port, "-U", "postgres", "-c", "fast"])  # fmt: skip
    for copied in data.glob(".s.PGSQL.*"):  # the primary's socket lock, in its data folder
        copied.unlink()
    options = (f"-p {port} -k {data} -h '' -c shared_buffers=128MB -c hot_standby=on"
               " -c max_standby_streaming_delay=-1")  # fmt: skip
    _as_server_user([str(_bin() / "pg_ctl"), "-D", str(data), "-o", options,
                     "-l", str(data / "log"), "-w", "start"])  # fmt: skip
    try:
        yield stack.dsn.replace(f"host={socket_dir}", f"host={data}")
    finally:
        subprocess.run(
            [str(_bin() / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            user="pgserver" if os.geteuid() == 0 else None,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        shutil.rmtree(data, ignore_errors=True)


def _until(check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


def test_reads_go_to_the_standby_unless_stale_down_or_the_callers_own_write(
    stack: Stack, workdir: Path, standby: str
) -> None:
    org = stack.new_org("replica")
    writer = stack.token(org, "admin", "writer@replica.example")
    reader = stack.token(org, "auditor", "reader@replica.example")
    server = ServerProcess(
        stack.dsn, workdir, {"DATABASE_READ_URL": standby, "READ_MAX_LAG_SECONDS": str(MAX_LAG)}
    ).start()
    stub = pb_grpc.SessionServiceStub(grpc.insecure_channel(server.target))

    def ids(token: str) -> set[str]:
        reply = stub.ListSessions(pb.ListSessionsRequest(), metadata=auth_md(token))
        return {s.id for s in reply.data}

    def on_standby(sid: str) -> bool:
        rows = run(_with_conn(standby, "SELECT count(*) FROM sessions WHERE id = $1",
                              uuid.UUID(sid)))  # fmt: skip
        return bool(rows[0][0])

    try:
        first, second = Spec(start=T0), Spec(start=T0.replace(hour=13))
        stub.IngestSessions(pb.IngestSessionsRequest(sessions=[first.to_proto()]),
                            metadata=auth_md(writer))  # fmt: skip
        assert first.id in ids(writer)  # its own write, at once
        _until(lambda: on_standby(first.id))
        _until(lambda: first.id in ids(reader))
        # Replay stops: the standby holds `first` but will not get `second`.
        run(_with_conn(standby, "SELECT pg_wal_replay_pause()"))
        stub.IngestSessions(pb.IngestSessionsRequest(sessions=[second.to_proto()]),
                            metadata=auth_md(writer))  # fmt: skip
        t_written = time.monotonic()
        assert ids(writer) == {first.id, second.id}  # read-your-writes: the primary
        # Another caller reads the standby (still within the lag bound): not there yet.
        seen_by_reader = ids(reader)
        assert time.monotonic() - t_written < MAX_LAG - 1, "too slow to observe the standby"
        assert seen_by_reader == {first.id}
        # Once the standby is further behind than READ_MAX_LAG_SECONDS: the primary.
        time.sleep(MAX_LAG + 1.5)
        assert ids(reader) == {first.id, second.id}
        # Caught up again: the standby serves, and has everything.
        run(_with_conn(standby, "SELECT pg_wal_replay_resume()"))
        _until(lambda: on_standby(second.id))
        assert ids(reader) == {first.id, second.id}
        # The standby goes away: reads still answer, from the primary, in the same request.
        subprocess.run(
            [str(_bin() / "pg_ctl"), "-D", str(Path(standby.split("host=")[1])), "-m",
             "immediate", "-w", "stop"],
            user="pgserver" if os.geteuid() == 0 else None, check=True,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        for token in (reader, writer, reader):
            assert ids(token) == {first.id, second.id}
        got = stub.GetSession(pb.GetSessionRequest(id=second.id), metadata=auth_md(reader))
        assert got.id == second.id
    finally:
        server.stop()
