"""The migrations build exactly the schema the models declare, and go down and up again, on both databases."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, text

from loyalty.db.base import Base
from loyalty.db.migrate import alembic_config, upgrade_database
from loyalty.db.models.scoring import REWRITE_FILLFACTOR
from loyalty.db.session import create_engine
from loyalty.settings import Settings
from tests.conftest import POSTGRES_URL, TestDatabase, _create_postgres_database, _drop_postgres_database


def _differences(connection: Connection) -> list[Any]:
    return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


async def test_the_migrated_schema_is_the_models_schema(database: TestDatabase) -> None:
    engine = create_engine(Settings(database_url=database.url))
    try:
        async with engine.connect() as connection:
            assert await connection.run_sync(_differences) == []
    finally:
        await engine.dispose()


async def test_tables_every_run_rewrites_leave_room_for_in_place_updates(database: TestDatabase) -> None:
    if database.dialect != "postgresql":
        pytest.skip("a storage parameter of PostgreSQL only")
    engine = create_engine(Settings(database_url=database.url))
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(
                text(
                    "SELECT relname, reloptions FROM pg_class "
                    "WHERE relname IN ('customer_score', 'customer_tier') AND relkind = 'r'"
                )
            )
            options = {name: list(reloptions or []) for name, reloptions in rows}
    finally:
        await engine.dispose()
    assert options == {
        "customer_score": [f"fillfactor={REWRITE_FILLFACTOR}"],
        "customer_tier": [f"fillfactor={REWRITE_FILLFACTOR}"],
    }


def _down_and_up(connection: Connection) -> list[Any]:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.downgrade(config, "base")
    # Only alembic's own bookkeeping stays.
    assert [name for name in inspect(connection).get_table_names() if name != "alembic_version"] == []
    command.upgrade(config, "head")
    return _differences(connection)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
async def test_every_migration_goes_down_and_up_again(dialect: str, tmp_path: Path) -> None:
    if dialect == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / f'{uuid.uuid4().hex}.db'}"
    else:
        if not POSTGRES_URL:
            pytest.skip("LOYALTY_TEST_POSTGRES_URL is not set")
        url = await _create_postgres_database()
    engine = create_engine(Settings(database_url=url))
    try:
        await upgrade_database(engine)
        async with engine.begin() as connection:
            assert await connection.run_sync(_down_and_up) == []
    finally:
        await engine.dispose()
        if dialect == "postgresql":
            await _drop_postgres_database(url)
