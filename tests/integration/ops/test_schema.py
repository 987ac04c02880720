"""The migrations build exactly the schema the models declare, and go down and up again, on both databases."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from loyalty.db.base import Base
from loyalty.db.migrate import alembic_config, current_revision, head_revision, schema_change, upgrade_database
from loyalty.db.models import OutboxEvent, WebhookDelivery, WebhookEndpoint
from loyalty.db.models.scoring import REWRITE_FILLFACTOR
from loyalty.db.session import create_engine, create_session_maker, transaction
from loyalty.demo.generator import load_demo
from loyalty.recalc import runs
from loyalty.recalc.full import execute_run
from loyalty.settings import Settings
from loyalty.tiers.config import load_tiers
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


@asynccontextmanager
async def _scratch_database(dialect: str, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty database of that kind, of this test's own (a PostgreSQL one is dropped afterwards)."""
    if dialect == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / f'{uuid.uuid4().hex}.db'}"
        return
    if not POSTGRES_URL:
        pytest.skip("LOYALTY_TEST_POSTGRES_URL is not set")
    url = await _create_postgres_database()
    try:
        yield url
    finally:
        await _drop_postgres_database(url)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
async def test_every_migration_goes_down_and_up_again(dialect: str, tmp_path: Path) -> None:
    async with _scratch_database(dialect, tmp_path) as url:
        engine = create_engine(Settings(database_url=url))
        try:
            await upgrade_database(engine)
            async with engine.begin() as connection:
                assert await connection.run_sync(_down_and_up) == []
        finally:
            await engine.dispose()


def _downgrade(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.downgrade(config, revision)


_REFUND_OF_NO_ORDER = text(
    "INSERT INTO refund (external_id, order_id, customer_id, amount, refunded_at, content_hash, created_at) "
    "VALUES ('r-nowhere', 999999999, 999999999, 1, :at, 'x', :at)"
)
# Every table the demo, a full run and a webhook fill: the migrations rebuild them on SQLite, or tables they refer
# to. On SQLite with foreign keys on, rebuilding outbox_event (0006) deleted every webhook delivery (ON DELETE
# CASCADE) without a word, and rebuilding customer_order (0008) failed on its refunds.
_COUNTED = (
    "customer",
    "customer_order",
    "order_item",
    "refund",
    "interaction_event",
    "referral",
    "customer_score",
    "customer_tier",
    "tier_history",
    "outbox_event",
    "webhook_endpoint",
    "webhook_delivery",
)


async def _full_run(engine: AsyncEngine, settings: Settings) -> None:
    session_maker = create_session_maker(engine)
    async with transaction(session_maker) as session:
        assert await runs.enqueue_run(session, trigger="manual", as_of=None, dry_run=False) is not None
    async with transaction(session_maker) as session:
        claimed = await runs.claim_next_run(session, settings.recalc_lease_seconds)
    assert claimed is not None
    await execute_run(session_maker, claimed.id, load_tiers(settings.tiers_file), settings.recalc_lease_seconds)


async def _webhook_deliveries(engine: AsyncEngine) -> None:
    """An endpoint with a pending delivery of every outbox event (as the delivery job would queue them)."""
    async with transaction(create_session_maker(engine)) as session:
        endpoint = WebhookEndpoint(url="https://shop.example/hooks", events=["tier.changed"], secret="s" * 32)
        session.add(endpoint)
        await session.flush()
        events = (await session.scalars(select(OutboxEvent.id))).all()
        session.add_all(WebhookDelivery(endpoint_id=endpoint.id, outbox_event_id=event) for event in events)


@asynccontextmanager
async def _shop(dialect: str, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A migrated database of either kind with a shop's data: demo orders, a full run's placements, webhooks."""
    async with _scratch_database(dialect, tmp_path) as url:
        settings = Settings(database_url=url)
        engine = create_engine(settings)
        try:
            await upgrade_database(engine)
            await load_demo(engine, customers=300)
            await _full_run(engine, settings)
            await _webhook_deliveries(engine)
            yield engine
        finally:
            await engine.dispose()


async def _counts(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as connection:
        # Only this module's own table names are interpolated.
        return {
            table: (await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one() for table in _COUNTED
        }


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
async def test_a_shop_goes_down_and_up_again_keeping_every_row(dialect: str, tmp_path: Path) -> None:
    """A shop with orders, a full run's scores, tiers and history, and webhook deliveries goes down to before the
    first kept references (0006) and up again: every row stays, the schema is the models' and foreign keys hold
    again afterwards."""
    async with _shop(dialect, tmp_path) as engine:
        before = await _counts(engine)
        assert all(before.values()), before
        async with schema_change(engine) as connection:
            await connection.run_sync(_downgrade, "0005")
        assert await _counts(engine) == before
        await upgrade_database(engine)
        assert await _counts(engine) == before
        async with engine.connect() as connection:
            assert await connection.run_sync(_differences) == []
            # The migration's connection had foreign keys off; the ones that serve requests have them on.
            with pytest.raises(IntegrityError):
                await connection.execute(_REFUND_OF_NO_ORDER, {"at": datetime(2026, 1, 1, tzinfo=UTC)})


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
async def test_a_migration_that_would_leave_a_reference_pointing_nowhere_changes_nothing(
    dialect: str, tmp_path: Path
) -> None:
    """An item of a missing order (possible since 0008 keeps that reference, written around the service) makes the
    downgrade that restores the foreign key fail as a whole: PostgreSQL refuses the constraint, SQLite's check
    before the commit (schema_change) refuses the rebuilt table, and the database stays as it was."""
    async with _shop(dialect, tmp_path) as engine:
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO order_item (order_id, line_no, sku, quantity, unit_price) "
                    "VALUES (999999999, 0, 'SKU-NOWHERE', 1, 10000)"
                )
            )
        before = await _counts(engine)
        with pytest.raises((IntegrityError, RuntimeError), match=r"(?i)foreign"):
            async with schema_change(engine) as connection:
                await connection.run_sync(_downgrade, "0007")
        assert await current_revision(engine) == head_revision()
        assert await _counts(engine) == before
