"""A local Citus cluster (a coordinator and N workers on loopback) for `make test-citus`, the
router-plan test and the Citus bench.

    python -m tests.citus_cluster run [--workers N] [--dir DIR [--keep]] -- COMMAND...

starts the cluster, runs COMMAND with DATABASE_URL (the coordinator's `session_audit`
database, citus created and the workers added) and CITUS_WORKER_URLS, and stops the cluster
whatever COMMAND does. The binaries come from CITUS_PG_BIN, else from
`../shared/citus/build-citus` (built once into its cache) when that script exists.

Each node is its own `initdb`-ed cluster with `shared_preload_libraries = 'citus'`, run as the
unprivileged `pgserver` user when we are root (PostgreSQL refuses to run as root), like the
pgserver wheel does for the embedded database.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Distinct ports for the nodes: the kernel may hand the same free port to two binds in a row.
from session_audit.envoy import free_port

DATABASE = "session_audit"
SYSTEM_USER = "pgserver"
ROOT = Path(__file__).resolve().parents[1]
# `../shared` beside the clone (CI), or two levels up from a worktree in `wt/NAME`.
_BUILD_CANDIDATES = [
    ROOT.parent / "shared/citus/build-citus",
    ROOT.parents[1] / "shared/citus/build-citus",
]
BUILD_SCRIPT = next((p for p in _BUILD_CANDIDATES if p.exists()), _BUILD_CANDIDATES[0])
PG_CONFIG = ROOT / ".venv/lib/python3.11/site-packages/pgserver/pginstall/bin/pg_config"

# Small, fast, test-only settings (fsync off: a crashed test cluster is simply thrown away).
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "shared_preload_libraries": "'citus'",
    "max_connections": "300",
    "shared_buffers": "256MB",
    "work_mem": "32MB",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "jit": "off",
    "max_prepared_transactions": "100",
    "citus.shard_count": "32",
    "citus.max_adaptive_executor_pool_size": "8",
    # The router-plan test reads its statements from the coordinator's log by role name.
    "log_line_prefix": "'%m [%p] %u: '",
}


def citus_bin() -> Path:
    """Where the Citus-enabled PostgreSQL binaries are: CITUS_PG_BIN, else a build."""
    env = os.environ.get("CITUS_PG_BIN", "")
    if env:
        return Path(env)
    if not BUILD_SCRIPT.exists():
        raise SystemExit("no Citus: set CITUS_PG_BIN or provide ../shared/citus/build-citus")
    out = subprocess.run(
        [str(BUILD_SCRIPT), str(PG_CONFIG)], check=True, stdout=subprocess.PIPE, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def available() -> bool:
    return bool(os.environ.get("CITUS_PG_BIN")) or BUILD_SCRIPT.exists()


def _as_root() -> bool:
    return os.geteuid() == 0


def _run_as(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    user = SYSTEM_USER if _as_root() else None
    return subprocess.run(cmd, check=True, text=True, user=user, **kw)  # type: ignore[call-overload, no-any-return]


def _ensure_user() -> None:
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "-s", "/bin/bash", SYSTEM_USER], check=True)


@dataclass
class Node:
    name: str
    pgdata: Path
    port: int

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


@dataclass
class Cluster:
    bin_dir: Path
    base: Path
    workers: int = 2
    extra_settings: dict[str, str] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)

    @property
    def coordinator(self) -> Node:
        return self.nodes[0]

    def start(self) -> str:
        """Start every node, create the database with citus, add the workers; the
        coordinator's URL. A folder that already holds a cluster (kept with `--keep`) is
        started again as it is, on the ports it was created with."""
        if _as_root():
            _ensure_user()
        state = self.base / "cluster.json"
        if state.exists():
            self.nodes = [Node(n, self.base / n, p) for n, p in json.loads(state.read_text())]
            for node in self.nodes:
                self.pg_ctl(node, "start")
            return self.coordinator.url()
        self.base.mkdir(parents=True, exist_ok=True)
        if _as_root():
            shutil.chown(self.base, SYSTEM_USER, SYSTEM_USER)
            # The server user must reach its data folder and the binaries (a build in
            # ~/.cache): traversal (x) on every parent, as pgserver does for its data folder.
            for start in (self.base, self.bin_dir):
                p = start
                while p != p.parent:
                    p.chmod(p.stat().st_mode | 0o011)
                    p = p.parent
        names = ["coordinator", *(f"worker{i}" for i in range(1, self.workers + 1))]
        self.nodes = [Node(n, self.base / n, free_port()) for n in names]
        for node in self.nodes:
            self._init(node)
        for node in self.nodes:
            self._psql(node, "postgres", f"CREATE DATABASE {DATABASE}")
            self._psql(node, DATABASE, "CREATE EXTENSION citus")
        c = self.coordinator
        self._psql(c, DATABASE, f"SELECT citus_set_coordinator_host('127.0.0.1', {c.port})")
        for w in self.nodes[1:]:
            self._psql(c, DATABASE, f"SELECT citus_add_node('127.0.0.1', {w.port})")
        state.write_text(json.dumps([[n.name, n.port] for n in self.nodes]))
        return c.url()

    def _init(self, node: Node) -> None:
        _run_as(
            [str(self.bin_dir / "initdb"), "-D", str(node.pgdata), "-U", "postgres",
             "--auth=trust", "--encoding=utf8", "--no-sync"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        settings = {**SETTINGS, **self.extra_settings, "port": str(node.port),
                    "unix_socket_directories": f"'{node.pgdata}'"}  # fmt: skip
        conf = "\n".join(f"{k} = {v}" for k, v in settings.items())
        with (node.pgdata / "postgresql.conf").open("a") as f:
            f.write("\n" + conf + "\n")
        self.pg_ctl(node, "start")

    def pg_ctl(self, node: Node, action: str) -> None:
        args = [str(self.bin_dir / "pg_ctl"), "-D", str(node.pgdata), "-w", "-t", "60"]
        if action == "stop":
            args += ["-m", "fast"]
        else:
            args += ["-l", str(node.pgdata / "log")]
        _run_as([*args, action], stdout=subprocess.DEVNULL)

    def _psql(self, node: Node, database: str, sql: str) -> str:
        out = _run_as(
            [str(self.bin_dir / "psql"), "-X", "-q", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", "127.0.0.1", "-p", str(node.port), "-U", "postgres", "-d", database,
             "-c", sql],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        return out.stdout

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if (node.pgdata / "postmaster.pid").exists():
                try:
                    self.pg_ctl(node, "stop")
                except subprocess.CalledProcessError:
                    print(f"citus_cluster: {node.name} did not stop cleanly", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="start a cluster, run COMMAND against it, stop it")
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--dir", type=Path, default=None, help="data folder (default: a temp dir)")
    r.add_argument("--keep", action="store_true", help="keep the data folder afterwards")
    r.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    command = [c for c in args.command if c != "--"] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("run: COMMAND is required")
    bin_dir = citus_bin()
    base = args.dir or Path(tempfile.mkdtemp(prefix="citus-cluster-"))
    cluster = Cluster(bin_dir, base, args.workers)
    try:
        t0 = time.monotonic()
        url = cluster.start()
        print(f"citus_cluster: coordinator + {args.workers} workers up in "
              f"{time.monotonic() - t0:.1f} s at {url}", file=sys.stderr)  # fmt: skip
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "CITUS_PG_BIN": str(bin_dir),
            "CITUS_WORKER_URLS": " ".join(n.url() for n in cluster.nodes[1:]),
            "CITUS_COORDINATOR_LOG": str(cluster.coordinator.pgdata / "log"),
        }
        return subprocess.run(command, env=env).returncode
    finally:
        cluster.stop()
        if not args.keep and args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
