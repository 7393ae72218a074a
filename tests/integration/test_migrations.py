from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from shared.kit.migrations import MigrationError, apply_migrations, load_migrations
from shared.kit.settings import Settings
from tests.support import fresh_database


async def test_migrations_apply_once_in_order_and_refuse_checksum_drift(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "001_people.sql").write_text("CREATE TABLE people (id int PRIMARY KEY);")
    (tmp_path / "002_names.sql").write_text("ALTER TABLE people ADD COLUMN name text;")
    conn = await asyncpg.connect(await fresh_database(settings, "mig"))
    try:
        assert await apply_migrations(conn, load_migrations(tmp_path, "svc")) == ["001_people.sql", "002_names.sql"]
        assert await apply_migrations(conn, load_migrations(tmp_path, "svc")) == []
        await conn.execute("INSERT INTO people VALUES (1, 'a')")  # both applied

        (tmp_path / "002_names.sql").write_text("ALTER TABLE people ADD COLUMN full_name text;")
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await apply_migrations(conn, load_migrations(tmp_path, "svc"))
        columns = await conn.fetch("SELECT column_name FROM information_schema.columns WHERE table_name = 'people'")
        assert {r["column_name"] for r in columns} == {"id", "name"}
    finally:
        await conn.close()


async def test_a_failing_migration_leaves_nothing_half_applied(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "001_ok.sql").write_text("CREATE TABLE ok (id int);")
    (tmp_path / "002_broken.sql").write_text("CREATE TABLE half (id int); SELECT no_such_function();")
    conn = await asyncpg.connect(await fresh_database(settings, "mig"))
    try:
        with pytest.raises(asyncpg.UndefinedFunctionError):
            await apply_migrations(conn, load_migrations(tmp_path, "svc"))
        assert await conn.fetchval("SELECT to_regclass('half')") is None
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations WHERE version LIKE 'svc:%'") == 1
    finally:
        await conn.close()


def test_badly_named_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "init.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="NNN_lower_snake"):
        load_migrations(tmp_path, "svc")
