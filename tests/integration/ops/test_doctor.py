"""`loyalty doctor` on SQLite and PostgreSQL: a running shop is clean; each kind of corruption is named.

The shop is generated demo data (dated two hours back, so that nothing in it is "just written"), scored by a full
run, then used the way a live system is: a campaign send, a redemption and a void, a pin, an erasure, a new order,
refund and referral re-scored in real time, a review (not re-scored: stale, not corrupt) and a new profile (not
scored yet). Corruptions are made with plain SQL, as an operator's mistake or a bug around the service would.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from loyalty.cli import main
from loyalty.db.session import transaction
from loyalty.demo.generator import load_demo
from loyalty.lib.clock import utcnow
from loyalty.ops.doctor import CHECK_NAMES, Report, run_doctor, score_bounds
from loyalty.settings import Settings, get_settings
from loyalty.tiers.config import load_tiers, parse_tiers
from tests.integration.offers.test_offers import create_offer, soon

DEMO_CUSTOMERS = 600


@dataclass(frozen=True)
class Shop:
    """What the tests need to know about the running shop."""

    engine: AsyncEngine
    session_maker: async_sessionmaker[AsyncSession]
    settings: Settings
    touched: frozenset[str]  # customers the API steps wrote for, and the code owners: corruptions pick others
    rescored: frozenset[str]  # written after the run: re-scored in real time, stale (the review) or pinned


async def one(session_maker: async_sessionmaker[AsyncSession], sql: str, **params: Any) -> Any:
    async with session_maker() as session:
        row = (await session.execute(text(sql), params)).first()
    assert row is not None, sql
    return row


async def execute(session_maker: async_sessionmaker[AsyncSession], sql: str, **params: Any) -> None:
    async with transaction(session_maker) as session:
        await session.execute(text(sql), params)


async def doctor(shop: Shop, tiers: Any = None) -> Report:
    """The checks in-process, with the shop's settings (the tiers file unless another config is given)."""
    return await run_doctor(
        shop.engine,
        tiers or load_tiers(shop.settings.tiers_file),
        currency=shop.settings.currency,
        model_cache_seconds=shop.settings.poll_seconds,
    )


async def run_cli(settings: Settings, monkeypatch: pytest.MonkeyPatch, *arguments: str) -> Result:
    """The real command line, in a thread: the command runs its own event loop beside the test's."""
    monkeypatch.setenv("LOYALTY_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("LOYALTY_TIERS_FILE", str(settings.tiers_file))
    get_settings.cache_clear()
    try:
        return await asyncio.to_thread(CliRunner().invoke, main, list(arguments))
    finally:
        get_settings.cache_clear()


def problem_examples(report: Report, check: str, problem: str) -> str:
    found = [p for p in report.check(check).as_json()["problems"] if p["problem"] == problem]
    assert found, f"{check} does not report {problem}: {report.render()}"
    return " ".join(found[0]["examples"])


@pytest.fixture
async def shop(engine, session_maker, settings, client, keys, run_due, dispatch_due) -> Shop:
    storefront, marketing, admin = (keys.headers(scope) for scope in ("storefront", "marketing", "admin"))
    await load_demo(engine, customers=DEMO_CUSTOMERS, seed=3, now=utcnow() - timedelta(hours=2))
    assert (await client.post("/v1/recalculations", json={}, headers=marketing)).status_code == 202
    await run_due()

    offer_id = await create_offer(client, marketing, min_order_total="10.00")
    campaign = {
        "name": "spring",
        "offer_id": offer_id,
        "tiers": ["vip", "nurture"],
        "send_at": soon(),
        "holdout_pct": 20,
    }
    assert (await client.post("/v1/campaigns", json=campaign, headers=marketing)).status_code == 201
    await dispatch_due()
    codes = await session_rows(
        session_maker,
        "SELECT ic.code, c.external_id FROM issued_code ic JOIN customer c ON c.id = ic.customer_id "
        "ORDER BY ic.id LIMIT 2",
    )
    assert len(codes) == 2
    for n, (code, owner) in enumerate(codes):
        response = await client.post(
            "/v1/redemptions",
            json={"code": code, "customer_id": owner, "order_id": f"checkout-{n}", "order_total": "90.00"},
            headers=storefront,
        )
        assert response.status_code == 201, response.text
    last_redemption = response.json()["redemption_id"]
    assert (await client.delete(f"/v1/redemptions/{last_redemption}", headers=storefront)).status_code == 204

    # A pin, an erasure, and activity after the run: re-scored in real time, except the review.
    customers = [
        row[0]
        for row in await session_rows(
            session_maker,
            "SELECT c.external_id FROM customer c JOIN customer_score s ON s.customer_id = c.id "
            "WHERE s.paid_orders > 0 AND c.external_id NOT IN (SELECT c2.external_id FROM issued_code ic "
            "JOIN customer c2 ON c2.id = ic.customer_id) ORDER BY c.id LIMIT 6",
        )
    ]
    pinned, erased, buyer, refunded, referrer, reviewer = customers
    until = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    pin = {"tier": "vip", "until": until, "reason": "press partner"}
    assert (await client.put(f"/v1/customers/{pinned}/tier-pin", json=pin, headers=marketing)).status_code == 200
    assert (await client.delete(f"/v1/customers/{erased}", headers=admin)).status_code == 204
    order = {
        "order_id": "after-the-run",
        "customer_id": buyer,
        "placed_at": soon(-60),
        "total": "120.00",
        "currency": "USD",
        "items": [{"sku": "SKU-1", "quantity": 1, "unit_price": "120.00"}],
    }
    assert (await client.post("/v1/orders", json=order, headers=storefront)).status_code == 201
    refunded_order = await one(
        session_maker,
        "SELECT o.external_id, o.total - o.refunded AS left_over FROM customer_order o "
        "JOIN customer c ON c.id = o.customer_id WHERE c.external_id = :customer AND o.total - o.refunded >= 10000 "
        "ORDER BY o.id LIMIT 1",
        customer=refunded,
    )
    refund = {"refund_id": "refund-after-the-run", "amount": "1.00", "refunded_at": soon(-30)}
    response = await client.post(f"/v1/orders/{refunded_order.external_id}/refunds", json=refund, headers=storefront)
    assert response.status_code == 201, response.text
    assert (await client.put("/v1/customers/newcomer", json={}, headers=storefront)).status_code == 201
    referral = {"referrer_id": referrer, "referee_id": "newcomer", "occurred_at": soon(-120)}
    assert (await client.post("/v1/referrals", json=referral, headers=storefront)).status_code == 201
    first_order = {**order, "order_id": "newcomer-first", "customer_id": "newcomer"}
    assert (await client.post("/v1/orders", json=first_order, headers=storefront)).status_code == 201
    assert (await client.put("/v1/customers/browser-only", json={}, headers=storefront)).status_code == 201
    review = {"event_id": "review-1", "customer_id": reviewer, "type": "review", "target": "product:SKU-1",
              "occurred_at": soon(-3600)}  # fmt: skip
    assert (await client.post("/v1/events", json={"events": [review]}, headers=storefront)).status_code == 202

    # A customer in their grace period, as a full run leaves one who has just fallen below their tier: still VIP,
    # qualifying for a lower tier since ten days (of the 30 VIP keeps), the history ending in VIP.
    held = await one(
        session_maker,
        "SELECT t.customer_id FROM customer_tier t JOIN customer c ON c.id = t.customer_id "
        "WHERE t.tier = 'nurture' AND t.pinned_tier IS NULL AND c.external_id NOT IN (:a, :b, :c, :d, :e, :f) "
        "ORDER BY t.customer_id LIMIT 1",
        a=pinned, b=erased, c=buyer, d=refunded, e=referrer, f=reviewer,
    )  # fmt: skip
    await hold_in_grace(session_maker, held.customer_id, days_below=10)
    rescored = frozenset({pinned, buyer, refunded, referrer, reviewer})
    touched = rescored | {erased, *(owner for _code, owner in codes)}
    return Shop(engine, session_maker, settings, frozenset(touched), rescored)


async def session_rows(session_maker: async_sessionmaker[AsyncSession], sql: str, **params: Any) -> list[Any]:
    async with session_maker() as session:
        return list((await session.execute(text(sql), params)).all())


async def hold_in_grace(session_maker: async_sessionmaker[AsyncSession], customer_id: int, days_below: int) -> None:
    """Make a nurture customer a VIP held in grace: what a full run writes for a VIP who qualifies lower now."""
    row = await one(session_maker, "SELECT updated_at FROM customer_tier WHERE customer_id = :id", id=customer_id)
    updated_at = row.updated_at if isinstance(row.updated_at, datetime) else datetime.fromisoformat(row.updated_at)
    below_since = updated_at - timedelta(days=days_below)
    stored = below_since if isinstance(row.updated_at, datetime) else below_since.strftime("%Y-%m-%d %H:%M:%S.%f")
    await execute(
        session_maker,
        "UPDATE customer_tier SET tier = 'vip', below_since = :below_since WHERE customer_id = :id",
        below_since=stored,
        id=customer_id,
    )
    await execute(session_maker, "UPDATE tier_history SET to_tier = 'vip' WHERE customer_id = :id", id=customer_id)


async def table_counts(session_maker: async_sessionmaker[AsyncSession]) -> dict[str, Any]:
    tables = ("customer", "customer_order", "refund", "customer_score", "customer_tier", "tier_history",
              "issued_code", "campaign_member", "redemption", "outbox_event")  # fmt: skip
    counts = {table: (await one(session_maker, f"SELECT COUNT(*) FROM {table}"))[0] for table in tables}
    counts["last score"] = (await one(session_maker, "SELECT MAX(computed_at) FROM customer_score"))[0]
    return counts


async def test_a_running_shop_is_clean(shop: Shop, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    before = await table_counts(shop.session_maker)
    result = await run_cli(settings, monkeypatch, "doctor", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] is True
    assert report["mismatches"] == 0
    assert [check["name"] for check in report["checks"]] == list(CHECK_NAMES)
    for check in report["checks"]:
        assert check["ok"], check
        assert check["rows_checked"] > 0, check
        if check["name"] != "references":  # which covers every table, webhook deliveries (none here) too
            assert all(count > 0 for count in check["checked"].values()), check
    figures = report["checks"][0]
    # The review was not re-scored (events are not): its customer is stale, not corrupt; the two new profiles
    # are not scored yet.
    assert any("stale, awaiting a re-score" in note for note in figures["notes"]), figures["notes"]
    assert any("Not scored yet" in note for note in figures["notes"]), figures["notes"]
    assert await table_counts(shop.session_maker) == before  # read-only

    readable = await run_cli(settings, monkeypatch, "doctor", "--check", "tiers-vs-rules")
    assert readable.exit_code == 0, readable.output
    assert "[OK] tiers-vs-rules" in readable.output
    assert "orders-vs-figures" not in readable.output
    assert "No mismatches in 1 check." in readable.output


async def test_an_edited_tiers_file_is_a_note_until_the_next_run(shop: Shop) -> None:
    shipped = load_tiers(shop.settings.tiers_file).model_dump(mode="json")
    shipped["tier"][0]["any"][0]["gte"] = 95
    stricter = parse_tiers(shipped)
    report = await doctor(shop, stricter)
    assert report.ok, report.render()
    assert any("differs from the one the last recalculation" in note for note in report.check("tiers-vs-rules").notes)


async def delete_around_foreign_keys(shop: Shop, dialect: str, sql: str, row_id: int) -> None:
    """A delete the service's connections would refuse: SQLite's own shell (foreign keys off by default), or a
    PostgreSQL session replicating (which skips the foreign key triggers)."""
    if dialect == "sqlite":
        path = shop.settings.sqlite_path
        assert path is not None
        with sqlite3.connect(path) as connection:
            connection.execute(sql, (row_id,))
        return
    async with transaction(shop.session_maker) as session:
        await session.execute(text("SET LOCAL session_replication_role = replica"))
        await session.execute(text(sql.replace("?", ":id")), {"id": row_id})


async def test_each_corruption_is_named(
    shop: Shop, settings: Settings, database: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    maker = shop.session_maker
    touched = tuple(shop.touched)
    untouched = "c.external_id IS NOT NULL AND c.external_id NOT IN ({})".format(
        ", ".join(f"'{customer}'" for customer in touched)
    )
    buyers = [
        row.external_id
        for row in await session_rows(
            maker,
            "SELECT c.external_id FROM customer c JOIN customer_tier t ON t.customer_id = c.id "
            f"WHERE {untouched} AND t.tier IN ('one_time', 'nurture') AND t.below_since IS NULL "
            "AND NOT EXISTS (SELECT 1 FROM issued_code ic WHERE ic.customer_id = c.id) "
            "AND NOT EXISTS (SELECT 1 FROM refund r WHERE r.customer_id = c.id) "
            "AND NOT EXISTS (SELECT 1 FROM referral f WHERE f.referee_id = c.id) ORDER BY c.id LIMIT 6",
        )
    ]
    figure_changed, score_changed, wrong_tier, made_prospect, tier_deleted, late_downgrade = buyers

    # orders vs figures: a stored figure, a stored score, a refund above its order, an order's `refunded`.
    await execute(
        maker,
        "UPDATE customer_score SET lifetime_spend = lifetime_spend + 100000 "
        "WHERE customer_id = (SELECT id FROM customer WHERE external_id = :id)",
        id=figure_changed,
    )
    score = await one(
        maker,
        "SELECT s.value_score FROM customer_score s JOIN customer c ON c.id = s.customer_id WHERE c.external_id = :id",
        id=score_changed,
    )
    await execute(
        maker,
        "UPDATE customer_score SET value_score = :value WHERE customer_id = (SELECT id FROM customer "
        "WHERE external_id = :id)",
        value=5.0 if score.value_score > 50 else 95.0,
        id=score_changed,
    )
    refunds = await session_rows(
        maker,
        "SELECT r.id, r.order_id, o.external_id, o.total FROM refund r JOIN customer_order o ON o.id = r.order_id "
        "JOIN customer c ON c.id = o.customer_id "
        f"WHERE {untouched} AND r.id IN (SELECT MIN(id) FROM refund GROUP BY order_id) "
        "AND NOT EXISTS (SELECT 1 FROM referral f WHERE f.referee_id = c.id) ORDER BY r.id LIMIT 2",
    )
    over_refunded, refunded_column = refunds
    await execute(maker, "UPDATE refund SET amount = :amount WHERE id = :id", amount=over_refunded.total + 1,
                  id=over_refunded.id)  # fmt: skip
    await execute(maker, "UPDATE customer_order SET refunded = 0 WHERE id = :id", id=refunded_column.order_id)

    # tiers vs rules: a tier above the rules', a prospect with orders, a missing tier row, a missed downgrade.
    for customer, tier in ((wrong_tier, "vip"), (made_prospect, "prospect")):
        await execute(
            maker,
            "UPDATE customer_tier SET tier = :tier "
            "WHERE customer_id = (SELECT id FROM customer WHERE external_id = :id)",
            tier=tier,
            id=customer,
        )
    await execute(
        maker,
        "DELETE FROM customer_tier WHERE customer_id = (SELECT id FROM customer WHERE external_id = :id)",
        id=tier_deleted,
    )
    late = await one(maker, "SELECT id FROM customer WHERE external_id = :id", id=late_downgrade)
    await hold_in_grace(maker, late.id, days_below=40)

    # codes vs campaigns: a deleted code, a duplicated code, a holdout member with a code, an extra redemption.
    codes = await session_rows(
        maker,
        "SELECT ic.id, ic.code, c.external_id, ic.send_id, ic.customer_id FROM issued_code ic "
        f"JOIN customer c ON c.id = ic.customer_id WHERE {untouched} ORDER BY ic.id LIMIT 3",
    )
    deleted_code, duplicated_code, holdout_code = codes
    await execute(maker, "DELETE FROM issued_code WHERE id = :id", id=deleted_code.id)
    await execute(
        maker,
        "INSERT INTO issued_code (code, offer_id, customer_id, campaign_id, send_id, issued_at, expires_at, "
        "uses_left, status) SELECT 'DUPLICATE' || code, offer_id, customer_id, campaign_id, NULL, issued_at, "
        "expires_at, uses_left, status FROM issued_code WHERE id = :id",
        id=duplicated_code.id,
    )
    await execute(
        maker,
        "UPDATE campaign_member SET holdout = :holdout WHERE send_id = :send AND customer_id = :customer",
        holdout=True,
        send=holdout_code.send_id,
        customer=holdout_code.customer_id,
    )
    redeemed = await one(
        maker,
        "SELECT ic.code, r.code_id, r.customer_id FROM redemption r JOIN issued_code ic ON ic.id = r.code_id "
        "WHERE r.voided_at IS NULL",
    )
    await execute(
        maker,
        "INSERT INTO redemption (code_id, customer_id, order_ref, order_total, redeemed_at) "
        "SELECT code_id, customer_id, 'again', order_total, redeemed_at FROM redemption WHERE code_id = :code_id",
        code_id=redeemed.code_id,
    )
    extra_redemption = (await one(maker, "SELECT MAX(id) FROM redemption"))[0]

    # outbox: an event pointing at a history entry that does not exist.
    event = await one(
        maker,
        "SELECT e.id FROM outbox_event e JOIN customer c ON c.id = e.customer_id "
        f"WHERE e.event_type = 'tier.changed' AND {untouched} ORDER BY e.id LIMIT 1",
    )
    await execute(maker, "UPDATE outbox_event SET dedupe_key = 'tier.changed:999999999' WHERE id = :id", id=event.id)

    # references: an order deleted with foreign keys off leaves its items pointing nowhere.
    order = await one(
        maker,
        "SELECT o.id FROM customer_order o JOIN customer c ON c.id = o.customer_id "
        f"WHERE {untouched} AND o.external_id NOT IN (SELECT order_ref FROM redemption) "
        "AND NOT EXISTS (SELECT 1 FROM refund r WHERE r.order_id = o.id) "
        "AND EXISTS (SELECT 1 FROM order_item i WHERE i.order_id = o.id) ORDER BY o.id DESC LIMIT 1",
    )
    await delete_around_foreign_keys(shop, database.dialect, "DELETE FROM customer_order WHERE id = ?", order.id)

    report = await doctor(shop)
    assert not report.ok
    expected = [
        ("orders-vs-figures", "figures-differ", figure_changed),
        ("orders-vs-figures", "scores-differ", score_changed),
        ("orders-vs-figures", "refunds-exceed-order", over_refunded.external_id),
        ("orders-vs-figures", "order-refunded-differs", refunded_column.external_id),
        ("tiers-vs-rules", "hold-without-grace-start", wrong_tier),
        ("tiers-vs-rules", "history-differs-from-tier", wrong_tier),
        ("tiers-vs-rules", "prospect-with-paid-orders", made_prospect),
        ("tiers-vs-rules", "score-without-tier", tier_deleted),
        ("tiers-vs-rules", "customer-without-tier", tier_deleted),
        ("tiers-vs-rules", "history-without-tier", tier_deleted),
        ("tiers-vs-rules", "downgrade-missed", late_downgrade),
        ("codes-vs-campaigns", "member-without-code", deleted_code.external_id),
        ("codes-vs-campaigns", "code-without-source", "DUPLICATE" + duplicated_code.code),
        ("codes-vs-campaigns", "extra-campaign-codes", duplicated_code.external_id),
        ("codes-vs-campaigns", "holdout-member-with-code", holdout_code.code),
        ("codes-vs-campaigns", "send-counts-differ", f"send {holdout_code.send_id} "),
        ("codes-vs-campaigns", "code-over-redeemed", redeemed.code),
        ("codes-vs-campaigns", "uses-left-differ", redeemed.code),
        ("outbox", "outbox-event-dangling", deleted_code.code),
        ("outbox", "outbox-event-dangling", "tier.changed:999999999"),
        ("outbox", "code-unannounced", "DUPLICATE" + duplicated_code.code),
        ("outbox", "redemption-unannounced", f"redemption {extra_redemption} "),
        ("references", "dangling-reference", f"order_id {order.id} is not in customer_order"),
    ]
    for check, problem, identifier in expected:
        assert identifier in problem_examples(report, check, problem), (check, problem, identifier, report.render())
    assert all(not check.ok for check in report.checks)
    # The customers the API wrote for after the run (stale or re-scored) are not among the mismatches.
    mentioned = json.dumps(report.as_json())
    for customer in shop.rescored:
        assert f"customer {customer}:" not in mentioned, customer
        assert f"customer {customer} " not in mentioned, customer

    result = await run_cli(settings, monkeypatch, "doctor")
    assert result.exit_code == 1, result.output
    assert "[FAIL] codes-vs-campaigns" in result.output
    assert f"customer {tier_deleted}" in result.output


async def test_a_kept_reference_pointing_nowhere_is_named(shop: Shop) -> None:
    """A send's rows keep their references without foreign keys (kept_reference); the references check still
    names one that points nowhere, as it does a broken foreign key."""
    maker = shop.session_maker
    member = await one(maker, "SELECT send_id, customer_id FROM campaign_member WHERE holdout ORDER BY customer_id")
    code = await one(maker, "SELECT id FROM issued_code WHERE send_id IS NOT NULL ORDER BY id DESC")
    event = await one(maker, "SELECT id FROM outbox_event WHERE event_type = 'offer.issued' ORDER BY id DESC")
    missing = 999_999_999
    await execute(
        maker,
        "UPDATE campaign_member SET customer_id = :missing WHERE send_id = :send AND customer_id = :customer",
        missing=missing,
        send=member.send_id,
        customer=member.customer_id,
    )
    await execute(maker, "UPDATE issued_code SET offer_id = :missing WHERE id = :id", missing=missing, id=code.id)
    await execute(maker, "UPDATE outbox_event SET customer_id = :missing WHERE id = :id", missing=missing, id=event.id)

    examples = problem_examples(await doctor(shop), "references", "dangling-reference")
    assert f"campaign_member send_id {member.send_id}: customer_id {missing} is not in customer" in examples
    assert f"issued_code id {code.id}: offer_id {missing} is not in offer" in examples
    assert f"outbox_event id {event.id}: customer_id {missing} is not in customer" in examples


async def test_usage_and_unreachable_databases_exit_2(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere.db"
    base = Settings(database_url=f"sqlite+aiosqlite:///{missing}", _env_file=None)  # type: ignore[call-arg]
    unknown = await run_cli(base, monkeypatch, "doctor", "--check", "everything")
    assert unknown.exit_code == 2
    assert "is not one of orders-vs-figures" in unknown.output
    absent = await run_cli(base, monkeypatch, "doctor")
    assert absent.exit_code == 2
    assert "no database at" in absent.output
    assert not missing.exists()  # the doctor did not create it
    refused = base.model_copy(update={"database_url": "postgresql+asyncpg://postgres@127.0.0.1:1/postgres"})
    unreachable = await run_cli(refused, monkeypatch, "doctor")
    assert unreachable.exit_code == 2
    assert "cannot connect to the database" in unreachable.output


def test_score_bounds_span_a_tie_the_recomputation_lands_beside() -> None:
    import numpy as np

    # A population where 40% share one raw value: a recomputation a bit above it must still accept the tie's rank.
    grid = [1.0] * 10 + [2.0] * 40 + [3.0] * 51
    tied = 2.0 * (1 + 1e-12)
    low, high = score_bounds(np.array([tied, 1.0, 3.5]), grid)
    assert low[0] <= 100 * 10 / 101 <= high[0]
    # The lowest value: nobody is strictly below it, and the tie it belongs to is the most it could have passed.
    assert (low[1], high[1]) == (0.0, round(100 * 10 / 101, 2))
    assert low[2] == high[2] == 100.0


def hold_a_rescore_in_flight(url: str, external_id: str, holding: threading.Event, seconds: float) -> None:
    """A re-score as the real-time path holds one: the customer locked, the tier moved and its history entry
    written, then committed after ``seconds``. In a thread with its own event loop: the test client runs a request
    on the test's loop until it answers, so a transaction that request waits for must progress elsewhere."""

    async def rescore() -> None:
        connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            async with connection.transaction():
                customer_id = await connection.fetchval(
                    "SELECT id FROM customer WHERE external_id = $1 FOR NO KEY UPDATE", external_id
                )
                await connection.execute(
                    "UPDATE customer_tier SET tier = 'nurture', since = now(), updated_at = now() "
                    "WHERE customer_id = $1",
                    customer_id,
                )
                await connection.execute(
                    "INSERT INTO tier_history (customer_id, from_tier, to_tier, at, kind, reason) "
                    "VALUES ($1, 'one_time', 'nurture', now(), 'upgrade', 'in flight')",
                    customer_id,
                )
                holding.set()
                await asyncio.sleep(seconds)
        finally:
            await connection.close()

    asyncio.run(rescore())


async def test_a_pin_set_while_a_rescore_is_in_flight_keeps_the_history_a_chain(
    client, keys, engine, settings, database
) -> None:
    """Found by the doctor's history check: a pin read the tier before a concurrent re-score committed its change,
    so its history entry started from the tier before that change."""
    if database.dialect != "postgresql":
        pytest.skip("concurrent writers need PostgreSQL (SQLite writes one transaction at a time)")
    storefront, marketing = keys.headers("storefront"), keys.headers("marketing")
    order = {"order_id": "racer-1", "customer_id": "racer", "placed_at": soon(-60), "total": "30.00", "currency": "USD"}
    assert (await client.post("/v1/orders", json=order, headers=storefront)).status_code == 201
    holding = threading.Event()
    rescore = asyncio.create_task(asyncio.to_thread(hold_a_rescore_in_flight, database.url, "racer", holding, 1.5))
    assert await asyncio.to_thread(holding.wait, 30)
    pin = {"tier": "vip", "until": (datetime.now(UTC) + timedelta(days=7)).isoformat(), "reason": "race"}
    assert (await client.put("/v1/customers/racer/tier-pin", json=pin, headers=marketing)).status_code == 200
    await rescore
    async with engine.connect() as connection:
        history = (
            await connection.execute(
                text(
                    "SELECT h.from_tier, h.to_tier FROM tier_history h JOIN customer c ON c.id = h.customer_id "
                    "WHERE c.external_id = 'racer' ORDER BY h.id"
                )
            )
        ).all()
    assert [tuple(entry) for entry in history] == [(None, "one_time"), ("one_time", "nurture"), ("nurture", "vip")]
    tiers = load_tiers(settings.tiers_file)
    report = await run_doctor(engine, tiers, currency="USD", model_cache_seconds=settings.poll_seconds)
    assert "history-chain-broken" not in report.check("tiers-vs-rules").problems, report.render()
