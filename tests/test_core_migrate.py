"""Migrations against the real embedded PostgreSQL: each applied migration is recorded with the
sha256 of its file; an applied migration whose file was edited stops the start, naming the
file; a database migrated before checksums existed gets them recorded on its first start."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import session_audit.core.migrations
from session_audit.core import db, migrate
from tests.support import Stack, _with_conn, fresh_database, run

FILES = sorted(Path(session_audit.core.migrations.__file__).parent.glob("*.sql"))


@pytest.fixture()
def empty_database(stack: Stack) -> Iterator[str]:
    dsn, name = fresh_database(stack.dsn)
    yield dsn
    run(_with_conn(stack.dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def migrate_with(dsn: str, shipped: list[migrate.Migration] | None = None) -> list[str]:
    async def go() -> list[str]:
        conn = await db.connect(dsn)
        try:
            return await migrate.migrate(conn, shipped)
        finally:
            await conn.close()

    return run(go())


def ledger(dsn: str) -> dict[str, str | None]:
    rows = run(_with_conn(dsn, "SELECT name, checksum FROM schema_migrations ORDER BY version"))
    return {r["name"]: r["checksum"] for r in rows}


def test_every_applied_migration_records_the_sha256_of_its_file(empty_database: str) -> None:
    applied = migrate_with(empty_database)
    assert applied == [f.name for f in FILES]
    assert ledger(empty_database) == {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in FILES
    }
    assert migrate_with(empty_database) == []  # unchanged files: nothing to do, no error


def test_an_edited_migration_stops_the_start_naming_the_file(empty_database: str) -> None:
    migrate_with(empty_database)
    before = ledger(empty_database)
    shipped = migrate.available()
    edited = [
        migrate.Migration(m.version, m.name, m.sql + "\n-- edited\n")
        if m.name.startswith("0010_")
        else m
        for m in shipped
    ]
    pending = migrate.Migration(99, "0099_never.sql", "CREATE TABLE never_applied (x int);")
    with pytest.raises(migrate.EditedMigration, match=r"^migration 0010_analytics_rollups\.sql "):
        migrate_with(empty_database, [*edited, pending])
    # Checked before anything is applied: the pending migration did not run.
    assert ledger(empty_database) == before
    exists = run(_with_conn(empty_database, "SELECT to_regclass('never_applied') IS NOT NULL"))
    assert exists[0][0] is False


def test_the_server_refuses_to_start_on_an_edited_migration(empty_database: str) -> None:
    """What an operator sees: `session-audit serve` (and migrate) exits with the file named."""
    migrate_with(empty_database)
    # The file on disk cannot be edited in an installed package; changing the recorded checksum
    # is the same mismatch seen from the other side.
    run(_with_conn(empty_database,
                   "UPDATE schema_migrations SET checksum = repeat('0', 64) WHERE version = 20"))  # fmt: skip
    env = {**os.environ, "DATABASE_URL": empty_database, "GRPC_PORT": "0"}
    for command in ("migrate", "serve"):
        done = subprocess.run(
            [sys.executable, "-m", "session_audit.cli", command],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 1, (command, done.stderr)
        assert "Error: migration 0020_reports.sql was edited after it was applied" in done.stderr


def test_a_database_migrated_before_checksums_gets_them_on_first_start(
    empty_database: str,
) -> None:
    migrate_with(empty_database)
    # The ledger as the code before checksums left it: no checksum column.
    run(_with_conn(empty_database, "ALTER TABLE schema_migrations DROP COLUMN checksum"))
    assert migrate_with(empty_database) == []
    assert ledger(empty_database) == {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in FILES
    }
