"""The embedded PostgreSQL: a local cluster from the pgserver wheel, data in a project folder.

Used when DATABASE_URL is not set. pgserver runs the server as an unprivileged system user when
we are root, listens on a Unix socket inside the data folder (no TCP port), and the cluster is
stopped explicitly by `stop()`.
"""

from __future__ import annotations

import logging
import subprocess
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DATABASE = "session_audit"

# Applied once per cluster with ALTER SYSTEM. JIT compilation never paid for itself on these
# queries (50 ms - 1.2 s of compile time per query); the rest sizes a 2-core, 24 GiB machine.
SETTINGS: dict[str, str] = {
    "jit": "off",
    "shared_buffers": "2GB",
    "effective_cache_size": "12GB",
    "work_mem": "64MB",
    "maintenance_work_mem": "1GB",
    "max_wal_size": "8GB",
    "random_page_cost": "1.1",
    "max_connections": "200",
}


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._server: Any = None
        self._socket_dir = ""

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    def start(self) -> str:
        """Start (or attach to) the cluster; return a DSN for the service's database."""
        # pgserver's platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); the
        # fallback it takes is fine, and the warning would clutter `make run`'s banner.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import pgserver

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = pgserver.get_server(  # type: ignore[attr-defined]
            self.pgdata, cleanup_mode=None
        )
        self._socket_dir = str(self._server.get_postmaster_info().socket_dir)
        if self._apply_settings():
            self._restart()
        if DATABASE not in self._server.psql("SELECT datname FROM pg_database;"):
            self._server.psql(f"CREATE DATABASE {DATABASE};")
        dsn: str = self._server.get_uri(database=DATABASE)
        return dsn

    def _apply_settings(self) -> bool:
        wanted = "\n".join(f"ALTER SYSTEM SET {k} = '{v}';" for k, v in SETTINGS.items())
        self._server.psql(wanted + "\nSELECT pg_reload_conf();")
        pending = self._server.psql("SELECT count(*) FROM pg_settings WHERE pending_restart;")
        return any(line.strip().isdigit() and int(line) > 0 for line in pending.splitlines())

    def _restart(self) -> None:
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        log.info("restarting embedded PostgreSQL to apply settings")
        pg_ctl(["-w", "restart"], pgdata=self.pgdata, user=self._server.system_user, timeout=60)
        self._server.ensure_postgres_running()

    def pg_ctl(self, action: str) -> None:
        """Run `pg_ctl -w stop|start|restart` as the cluster's system user (tests use it to
        take the database away and bring it back)."""
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        if action == "stop":
            args = ["-w", "-m", "fast", "stop"]
        else:
            args = ["-w", "-o", '-h ""', "-o", f"-k {self._socket_dir}"]
            args += ["-l", str(self.pgdata / "log"), action]
        pg_ctl(args, pgdata=self.pgdata, user=self._server.system_user, timeout=60)

    def stop(self) -> None:
        if self._server is None:
            return
        try:
            self.pg_ctl("stop")
        except subprocess.CalledProcessError:
            log.warning("embedded PostgreSQL was not running")
        self._server = None
