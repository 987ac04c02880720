"""Alembic, driven from the code: upgrade to head and tell whether a database is current."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from loyalty.db.session import SCHEMA_CHANGE_OPTION
from loyalty.settings import PROJECT_ROOT


def _find_migrations() -> Path:
    """Beside the package in a checkout; in the working directory when installed (as in the container)."""
    for candidate in (PROJECT_ROOT / "migrations", Path.cwd() / "migrations"):
        if (candidate / "env.py").exists():
            return candidate
    return PROJECT_ROOT / "migrations"


MIGRATIONS_DIR = _find_migrations()


def alembic_config(database_url: str | None = None) -> Config:
    ini = MIGRATIONS_DIR.parent / "alembic.ini"
    config = Config(str(ini)) if ini.exists() else Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if database_url:
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


@lru_cache(maxsize=1)
def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _upgrade(connection: Connection, config: Config, revision: str) -> None:
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


@asynccontextmanager
async def schema_change(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection in a transaction for migrations, committed at the end.

    On SQLite, alembic's batch mode changes a table by copying it, dropping it and renaming the copy. With foreign
    keys enforced, dropping a table deletes its rows first: where other rows refer to them (an order's refunds, a
    code's redemptions) the migration failed, and where they cascade (an outbox event's webhook deliveries) they
    were silently deleted with it. Deferring the checks does not help, as SQLite counts those deletions as
    violations still at commit. So the connection runs with foreign keys off, as SQLite's own procedure for changing
    a table says; when a migration was applied, every foreign key is checked before the commit. The connection is
    discarded afterwards, so none with foreign keys off ever serves a request.
    """
    async with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            await connection.execution_options(**{SCHEMA_CHANGE_OPTION: True})
        try:
            async with connection.begin():
                before = await connection.run_sync(_current)
                yield connection
                if sqlite and await connection.run_sync(_current) != before:
                    broken = (await connection.exec_driver_sql("PRAGMA foreign_key_check")).all()
                    if broken:
                        raise RuntimeError(f"the migration left rows whose foreign keys point nowhere: {broken[:5]}")
        finally:
            if sqlite:
                await connection.invalidate()


async def upgrade_database(engine: AsyncEngine, revision: str = "head") -> None:
    """Apply migrations on the given engine (same history for SQLite and PostgreSQL)."""
    async with schema_change(engine) as connection:
        await connection.run_sync(_upgrade, alembic_config(), revision)


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as connection:
        return await connection.run_sync(_current)
