"""Alembic, driven from the code: upgrade to head and tell whether a database is current."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

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


async def upgrade_database(engine: AsyncEngine, revision: str = "head") -> None:
    """Apply migrations on the given engine (same history for SQLite and PostgreSQL)."""
    config = alembic_config()
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade, config, revision)


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as connection:
        return await connection.run_sync(_current)
