"""Ordered SQL migrations, applied under an advisory lock so concurrent starters serialise.

Each applied migration is recorded with the sha256 of its file. A migration is never edited
after it was applied: on start, a recorded checksum that differs from the file's stops the
start (`EditedMigration`, naming the file); a change to the schema is a new migration. A
database migrated before checksums were recorded gets them on its first start with this code
(from the files as they are then), and is checked from then on.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources

import asyncpg
import sqlparse

log = logging.getLogger(__name__)

# Any constant unique to this service; every process that migrates takes the same lock.
MIGRATION_LOCK = 0x5E55_A0D1

CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    checksum    text
);
ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum text;
"""
APPLIED = "SELECT version, name, checksum FROM schema_migrations"
RECORD = "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"
RECORD_CHECKSUM = "UPDATE schema_migrations SET checksum = $2 WHERE version = $1"


class EditedMigration(Exception):
    """An applied migration's file no longer matches what was applied."""


@dataclass(frozen=True, order=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    """Every migration shipped with the package, in order."""
    out = []
    for entry in resources.files("session_audit.core.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            out.append(Migration(version, entry.name, entry.read_bytes().decode()))
    return sorted(out)


HAS_CITUS = "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')"
SEQUENTIAL = "SET LOCAL citus.multi_shard_modify_mode TO 'sequential'"


def statements(sql: str) -> list[str]:
    """A migration file's statements, one by one (dollar-quoted bodies kept whole). Citus
    forwards some DDL on a distributed table to the workers as the original query string,
    and refuses it when that string holds several commands; one statement per call works on
    both engines."""
    return [s for s in sqlparse.split(sql) if sqlparse.format(s, strip_comments=True).strip()]


async def migrate(conn: asyncpg.Connection, shipped: list[Migration] | None = None) -> list[str]:
    """Apply pending migrations, each in its own transaction, after checking the applied ones
    against their files. Returns the names applied."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(CREATE_LEDGER)
        done = {r["version"]: r for r in await conn.fetch(APPLIED)}
        migrations = available() if shipped is None else shipped
        for m in migrations:
            row = done.get(m.version)
            if row is None:
                continue
            if row["checksum"] is None:
                await conn.execute(RECORD_CHECKSUM, m.version, m.checksum)
                log.info("recorded the checksum of %s (applied before checksums)", m.name)
            elif row["checksum"] != m.checksum:
                raise EditedMigration(
                    f"migration {m.name} was edited after it was applied to this database "
                    f"(sha256 applied {row['checksum'][:12]}…, file now {m.checksum[:12]}…); "
                    "restore the file and put the change in a new migration"
                )
        citus = await conn.fetchval(HAS_CITUS)
        for m in migrations:
            if m.version in done:
                continue
            async with conn.transaction():
                if citus:
                    # Citus runs DDL on a distributed table over parallel connections and then
                    # refuses DDL on a reference table in the same transaction; one connection
                    # per worker (sequential mode) lets a migration touch both.
                    await conn.execute(SEQUENTIAL)
                for statement in statements(m.sql):
                    await conn.execute(statement)
                await conn.execute(RECORD, m.version, m.name, m.checksum)
            log.info("applied migration %s", m.name)
            applied_now.append(m.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied_now
