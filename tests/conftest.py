"""Session-wide fixtures: PostgreSQL (DATABASE_URL's server, else an embedded cluster), the
server process and Envoy, started once and shared; tests isolate themselves by org."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from session_audit import envoy
from session_audit.embedded import EmbeddedPostgres
from tests.support import Stack, drop_database, fresh_database, start_stack


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def database(workdir: Path) -> Iterator[str]:
    url = os.environ.get("DATABASE_URL", "")
    if url:
        dsn, name = fresh_database(url)
        yield dsn
        drop_database(url, name)
        return
    embedded = EmbeddedPostgres(workdir / "pg")
    yield embedded.start()
    embedded.stop()


@pytest.fixture(scope="session")
def stack(database: str, workdir: Path) -> Iterator[Stack]:
    s = start_stack(database, workdir)
    yield s
    envoy.stop(s.envoy_proc)
    s.server.stop()
