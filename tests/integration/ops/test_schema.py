"""The migrations build exactly the schema the models declare, and go down and up again, on both databases."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, text
from sqlalchemy.exc import IntegrityError

from loyalty.db.base import Base
from loyalty.db.migrate import alembic_config, schema_change, upgrade_database
from loyalty.db.models.scoring import REWRITE_FILLFACTOR
from loyalty.db.session import create_engine
from loyalty.demo.generator import load_demo
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


def _downgrade(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.downgrade(config, revision)


_REFUND_OF_NO_ORDER = text(
    "INSERT INTO refund (external_id, order_id, customer_id, amount, refunded_at, content_hash, created_at) "
    "VALUES ('r-nowhere', 999999999, 999999999, 1, :at, 'x', :at)"
)
# Every table the demo fills, and the referring tables the migrations rebuild on SQLite.
_COUNTED = ("customer", "customer_order", "order_item", "refund", "interaction_event", "referral")


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
async def test_a_database_with_orders_goes_down_and_up_again_keeping_every_row(dialect: str, tmp_path: Path) -> None:
    """On SQLite batch mode drops and recreates tables that other rows refer to (an order its items and refunds);
    with foreign keys enforced that drop failed as soon as there was data. Down to before the first kept references
    (0006) and up again, every row stays, the schema is the models' and foreign keys hold again afterwards."""
    if dialect == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'shop.db'}"
    else:
        if not POSTGRES_URL:
            pytest.skip("LOYALTY_TEST_POSTGRES_URL is not set")
        url = await _create_postgres_database()
    engine = create_engine(Settings(database_url=url))

    async def counts() -> dict[str, int]:
        async with engine.connect() as connection:
            return {
                table: (await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
                for table in _COUNTED
            }

    try:
        await upgrade_database(engine)
        await load_demo(engine, customers=300)
        before = await counts()
        assert before["refund"] > 0
        assert before["order_item"] > 0
        async with schema_change(engine) as connection:
            await connection.run_sync(_downgrade, "0005")
        assert await counts() == before
        await upgrade_database(engine)
        assert await counts() == before
        async with engine.connect() as connection:
            assert await connection.run_sync(_differences) == []
            # The migration's connection had foreign keys off; the ones that serve requests have them on.
            with pytest.raises(IntegrityError):
                await connection.execute(_REFUND_OF_NO_ORDER, {"at": datetime(2026, 1, 1, tzinfo=UTC)})
    finally:
        await engine.dispose()
        if dialect == "postgresql":
            await _drop_postgres_database(url)
