"""Ordered plain-SQL migrations, applied once each and recorded with a checksum.

Files are ``NNN_name.sql`` in a service's ``migrations/`` folder (plus the kit's own tables,
applied first). A file that was applied and has changed since is refused loudly: migrations are
history, a fix is a new file. An advisory lock makes concurrent starts of replicas safe.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog

from shared.kit.db import Connection

log = structlog.get_logger(__name__)

KIT_MIGRATIONS = Path(__file__).parent / "migrations"
_NAME = re.compile(r"^(\d{3,})_[a-z0-9_]+\.sql$")
_LOCK_ID = 0x4E49_4348  # "NICH": one lock for migrations in every service database


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Migration:
    version: str  # "kit:001" or "service:001"
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(folder: Path, namespace: str) -> list[Migration]:
    migrations: list[Migration] = []
    seen: set[str] = set()
    for path in sorted(folder.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path}: migration files are named NNN_lower_snake.sql")
        number = match.group(1)
        if number in seen:
            raise MigrationError(f"{path}: two migrations share number {number}")
        seen.add(number)
        migrations.append(Migration(f"{namespace}:{number}", path.name, path.read_text(encoding="utf-8")))
    return migrations


async def apply_migrations(conn: Connection, migrations: list[Migration]) -> list[str]:
    """Apply what is new, in order, each in its own transaction; return the names applied."""
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version     text PRIMARY KEY,
                name        text NOT NULL,
                checksum    text NOT NULL,
                applied_at  timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        applied = {
            row["version"]: row for row in await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
        }
        done: list[str] = []
        for migration in migrations:
            previous = applied.get(migration.version)
            if previous is not None:
                if previous["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.name} ({migration.version}) changed after it was applied: "
                        "write a new migration instead of editing an applied one"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version, migration.name, migration.checksum,
                )
            log.info("migration applied", migration=migration.name, version=migration.version)
            done.append(migration.name)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)


async def ensure_database(admin_dsn: str, database: str) -> bool:
    """Create the database if it does not exist; True if it was created."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if exists:
            return False
        try:
            await conn.execute(f'CREATE DATABASE "{database}"')
        except asyncpg.DuplicateDatabaseError:
            return False  # a replica created it at the same moment
        return True
    finally:
        await conn.close()


async def migrate_service(dsn: str, admin_dsn: str, database: str, service_folder: Path) -> list[str]:
    """Create the service's database if needed and apply the kit's and the service's migrations."""
    await ensure_database(admin_dsn, database)
    migrations = load_migrations(KIT_MIGRATIONS, "kit") + load_migrations(service_folder, "service")
    conn = await asyncpg.connect(dsn)
    try:
        return await apply_migrations(conn, migrations)
    finally:
        await conn.close()
