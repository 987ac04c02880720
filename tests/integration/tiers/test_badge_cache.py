"""The badge cache against a real database: badges are served from memory on PostgreSQL and forgotten when
PostgreSQL announces their change, whoever wrote it; a process reads its own writes back at once; a lost
notification connection empties the cache; a full run announces itself once, not per row. On SQLite every badge
is read from the database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from litestar import Litestar
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from loyalty.db.models import Customer, CustomerTier
from loyalty.db.session import connect_outside_pool
from loyalty.recalc.runs import enqueue_run
from loyalty.tiers.badge_cache import CHANNEL, note_changed
from tests.integration.recalc.test_recalculation import order, seed_shop
from tests.support import wait_for


@pytest.fixture
async def badge_client(app: Litestar, concurrent_client: httpx.AsyncClient, database: Any) -> AsyncIterator[Any]:
    """The app on the test's own loop with its badge listener running (as its lifespan runs it) and listening."""
    listener = app.state.badge_listener
    if database.dialect == "postgresql":
        assert listener is not None
        listener.start()

        async def listening() -> bool:
            return bool(app.state.badges.listening)

        await wait_for(listening, "the badge cache listening", within=10)
    else:
        assert listener is None
    try:
        yield concurrent_client
    finally:
        if listener is not None:
            await listener.stop()


async def _badge(client: Any, headers: dict[str, str], external_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/customers/{external_id}/tier", headers=headers)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def _settled(app: Litestar, engine: AsyncEngine) -> None:
    """Wait until the app's cache has heard every notification committed so far: they arrive in commit order, so
    once it has heard one sent now, nothing written before can still come and make it forget something."""
    if app.state.badge_listener is None:
        return
    generation = app.state.badges.generation
    async with engine.begin() as connection:
        # An id no customer has: forgets nothing, but moves the cache's generation when heard.
        await connection.execute(text(f"SELECT pg_notify('{CHANNEL}', '-1')"))

    async def heard() -> bool:
        return bool(app.state.badges.generation > generation)

    await wait_for(heard, "the app's cache hearing a notification", within=5)


async def _held(
    app: Litestar, client: Any, engine: AsyncEngine, headers: dict[str, str], external_id: str
) -> dict[str, Any]:
    """The badge, read once every earlier notification was heard, so that the cache keeps it until something new
    is written."""
    await _settled(app, engine)
    badge = await _badge(client, headers, external_id)
    assert app.state.badges.get(external_id) is not None
    return badge


async def _ordered_and_held(
    app: Litestar, client: Any, engine: AsyncEngine, headers: dict[str, str], database: Any
) -> dict[str, Any]:
    """Customer c-1, placed by an order, with its badge held in memory (PostgreSQL: SQLite keeps none)."""
    if database.dialect != "postgresql":
        pytest.skip("SQLite keeps no badges in memory")
    await client.post("/v1/orders", json=order("o-1", "c-1", 1, "30.00"), headers=headers)
    return await _held(app, client, engine, headers, "c-1")


async def _write_unannounced(executor: AsyncSession | AsyncConnection, customer_id: int, tier: str) -> None:
    """A tier change whose notification never comes: in its transaction the triggers take it as announced."""
    await executor.execute(text("SELECT set_config('loyalty.badges', 'announced', true)"))
    await executor.execute(update(CustomerTier).where(CustomerTier.customer_id == customer_id).values(tier=tier))


async def _internal_id(engine: AsyncEngine, external_id: str) -> int:
    async with engine.connect() as connection:
        customer_id = await connection.scalar(select(Customer.id).where(Customer.external_id == external_id))
    assert customer_id is not None
    return int(customer_id)


async def test_a_badge_is_served_from_memory_until_another_process_changes_it(
    app, badge_client, engine, storefront, database
) -> None:
    response = await badge_client.post("/v1/orders", json=order("o-1", "c-1", 1, "30.00"), headers=storefront)
    assert response.status_code == 201, response.text
    badges = app.state.badges
    postgres = database.dialect == "postgresql"
    first = await (
        _held(app, badge_client, engine, storefront, "c-1") if postgres else _badge(badge_client, storefront, "c-1")
    )
    hits = badges.hits
    assert await _badge(badge_client, storefront, "c-1") == first
    assert badges.hits == hits + (1 if postgres else 0)
    # Another process (this test's own engine, not the app's) pins the customer to VIP, writing the row directly.
    customer_id = await _internal_id(engine, "c-1")
    async with engine.begin() as connection:
        await connection.execute(update(CustomerTier).where(CustomerTier.customer_id == customer_id).values(tier="vip"))
    if postgres:
        # Well within the entries' lifetime (60 s): it is the change's notification that reached the cache.
        async def changed() -> bool:
            return (await _badge(badge_client, storefront, "c-1"))["tier"] == "vip"

        await wait_for(changed, "the badge changed by another process", within=5)
    else:
        assert (await _badge(badge_client, storefront, "c-1"))["tier"] == "vip"
    metrics = (await badge_client.get("/metrics")).text
    assert 'loyalty_badge_cache_reads_total{result="hit"}' in metrics
    assert f"loyalty_badge_cache_listening {1.0 if postgres else 0.0}" in metrics


async def test_the_process_forgets_its_own_writes_when_they_commit(
    app, badge_client, engine, storefront, database
) -> None:
    before = await _ordered_and_held(app, badge_client, engine, storefront, database)
    customer_id = await _internal_id(engine, "c-1")

    async def write_quietly(tier: str, *, note: bool) -> None:
        # Only the process's own note of what it changed can make the cache forget this write.
        async with app.state.session_maker() as session:
            await _write_unannounced(session, customer_id, tier)
            if note:
                note_changed(session, [customer_id])
            await session.commit()

    # The control: without a note the cache still answers what it held, so it is serving from memory.
    await write_quietly("nurture", note=False)
    assert (await _badge(badge_client, storefront, "c-1")) == before
    await write_quietly("vip", note=True)
    assert (await _badge(badge_client, storefront, "c-1"))["tier"] == "vip"


async def test_writes_through_the_api_are_read_back_at_once(app, badge_client, keys, storefront) -> None:
    marketing, admin = keys.headers("marketing"), keys.headers("admin")
    await badge_client.post("/v1/orders", json=order("o-1", "c-1", 1, "30.00"), headers=storefront)
    placed = await _badge(badge_client, storefront, "c-1")
    # An order: the badge answered next is the one the order's response names.
    response = await badge_client.post("/v1/orders", json=order("o-2", "c-1", 0, "9000.00"), headers=storefront)
    assert (await _badge(badge_client, storefront, "c-1"))["tier"] == response.json()["tier"]
    # A pin, and its removal.
    pin = {"tier": "vip", "until": "2099-01-01T00:00:00Z", "reason": "press"}
    pinning = await badge_client.put("/v1/customers/c-1/tier-pin", json=pin, headers=marketing)
    assert pinning.status_code == 200
    pinned = await _badge(badge_client, storefront, "c-1")
    # Byte for byte what the API's own encoding of the same badge gives (the pin answers with it), read from the
    # database and then again from memory.
    for _read in range(2):
        answered = await badge_client.get("/v1/customers/c-1/tier", headers=storefront)
        assert answered.content == pinning.content
        assert answered.headers["content-type"] == pinning.headers["content-type"]
    assert pinned["tier"] == "vip"
    assert pinned["pinned_until"].startswith("2099-01-01T00:00:00")
    assert (await badge_client.delete("/v1/customers/c-1/tier-pin", headers=marketing)).status_code == 204
    assert (await _badge(badge_client, storefront, "c-1"))["pinned_until"] is None
    assert placed["customer_id"] == "c-1"
    # An erasure unlinks the storefront id: no badge answers under it any more.
    assert (await badge_client.delete("/v1/customers/c-1", headers=admin)).status_code == 204
    assert (await badge_client.get("/v1/customers/c-1/tier", headers=storefront)).status_code == 404


async def test_a_lost_notification_connection_empties_the_cache(
    app, badge_client, engine, storefront, database
) -> None:
    await _ordered_and_held(app, badge_client, engine, storefront, database)
    customer_id = await _internal_id(engine, "c-1")
    first_pid = app.state.badge_listener.server_pid
    async with engine.begin() as connection:
        # A change whose notification is lost, as if sent while the connection was down.
        await _write_unannounced(connection, customer_id, "vip")
    assert first_pid is not None
    assert (await _badge(badge_client, storefront, "c-1"))["tier"] != "vip"
    async with engine.connect() as connection:
        await connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first_pid})

    async def listening_again() -> bool:
        pid = app.state.badge_listener.server_pid
        return pid is not None and pid != first_pid and bool(app.state.badges.listening)

    await wait_for(listening_again, "the badge listener back on a new connection", within=10)
    # What was held before the loss is gone: the badge is read again.
    assert (await _badge(badge_client, storefront, "c-1"))["tier"] == "vip"


async def test_a_full_run_is_announced_once_and_orders_per_customer(
    app, badge_client, engine, session_maker, settings, storefront, run_due, database
) -> None:
    if database.dialect != "postgresql":
        pytest.skip("SQLite has no notifications")
    await seed_shop(badge_client, storefront)
    heard: list[str] = []
    listener = await connect_outside_pool(engine, settings, "test-listener")
    await listener.add_listener(CHANNEL, lambda *arguments: heard.append(arguments[-1]))
    try:
        before = await _held(app, badge_client, engine, storefront, "c-002")
        heard.clear()
        # Another process's run (the CLI's, say): queued and run on the test's own engine.
        async with session_maker() as session:
            await enqueue_run(session, trigger="manual")
            await session.commit()
        assert (await run_due())["status"] == "succeeded"

        async def run_heard() -> bool:
            return "*" in heard

        await wait_for(run_heard, "the full run's notification", within=5)
        # Every tier row of the shop was written, yet one notification stood for them all (a -1 is a wait for
        # earlier notifications, `_settled`).
        assert [payload for payload in heard if payload != "-1"] == ["*"]

        # The app's own cache hears it too, and then holds nothing from before the run.
        async def emptied() -> bool:
            return len(app.state.badges) == 0

        await wait_for(emptied, "the app's cache emptied by the run", within=5)
        assert (await _badge(badge_client, storefront, "c-002"))["customer_id"] == before["customer_id"]
        # A single order announces its own customer, by internal id.
        heard.clear()
        await badge_client.post("/v1/orders", json=order("o-new", "c-002", 0, "45.00"), headers=storefront)
        customer_id = await _internal_id(engine, "c-002")

        async def order_heard() -> bool:
            return str(customer_id) in heard

        await wait_for(order_heard, "the order's notification", within=5)
    finally:
        await listener.close()
