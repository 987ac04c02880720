"""Outgoing webhooks end to end: registration, fan-out, signed delivery to a real local receiver, retries,
dead letters, a hanging receiver, leases under concurrency, deletion and erasure."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import time
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from loyalty.db.models import OutboxEvent, WebhookDelivery, WebhookEndpoint
from loyalty.db.session import transaction
from loyalty.lib.clock import utcnow
from loyalty.webhooks.delivery import claim_deliveries
from loyalty.webhooks.jobs import WebhookJobs
from tests.integration.offers.test_offers import soon
from tests.integration.offers.test_redemptions import issued_code, redemption


async def register(client: Any, keys: Any, url: str, events: list[str]) -> dict[str, Any]:
    response = await client.post("/v1/webhooks", json={"url": url, "events": events}, headers=keys.headers("admin"))
    assert response.status_code == 201, response.text
    return dict(response.json())


async def place_order(client: Any, keys: Any, order_id: str, customer_id: str) -> None:
    body = {
        "order_id": order_id,
        "customer_id": customer_id,
        "placed_at": soon(-60),
        "total": "20.00",
        "currency": "USD",
    }
    response = await client.post("/v1/orders", json=body, headers=keys.headers("storefront"))
    assert response.status_code == 201, response.text


async def deliveries(client: Any, keys: Any, webhook_id: int) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/webhooks/{webhook_id}/deliveries", headers=keys.headers("admin"))
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


async def make_due_now(session_maker: Any) -> None:
    """Stand in for waiting out the back-off."""
    async with transaction(session_maker) as session:
        await session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.status == "failed")
            .values(next_attempt_at=utcnow() - timedelta(seconds=1))
        )


def verify_signature(secret: str, header: str, body: bytes) -> int:
    fields = dict(part.split("=", 1) for part in header.split(","))
    expected = hmac.new(secret.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(fields["v1"], expected), "signature does not verify"
    return int(fields["t"])


async def test_subscribed_events_arrive_once_signed(client, keys, session_maker, dispatch_due, receiver) -> None:
    server = await receiver()
    webhook = await register(client, keys, server.url, ["tier.changed", "offer.issued"])
    assert webhook["secret"].startswith("whsec_")
    assert webhook["events"] == ["tier.changed", "offer.issued"]
    # A tier change (the first order), an offer issued by a campaign, and a redemption nobody subscribed to.
    code, customer = await issued_code(client, keys, dispatch_due, session_maker)
    redeemed = await client.post("/v1/redemptions", json=redemption(code), headers=keys.headers("storefront"))
    assert redeemed.status_code == 201

    jobs = WebhookJobs(session_maker, timeout_seconds=2, lease_seconds=10)
    assert await jobs.fan_out() == {"events": 3, "deliveries": 2}
    assert await jobs.fan_out() == {}
    # Even if the outbox were fanned out again (a crash before its marks committed), no delivery is duplicated.
    async with transaction(session_maker) as session:
        await session.execute(update(OutboxEvent).values(delivered_at=None))
    assert await jobs.fan_out() == {"events": 3, "deliveries": 0}
    async with session_maker() as session:
        assert await session.scalar(select(func.count()).select_from(WebhookDelivery)) == 2

    assert await jobs.deliver() == {"delivered": 2}
    assert await jobs.deliver() == {}
    assert len(server.requests) == 2
    bodies = [json.loads(request.body) for request in server.requests]
    assert sorted(body["type"] for body in bodies) == ["offer.issued", "tier.changed"]
    assert len({body["event_id"] for body in bodies}) == 2
    for request, body in zip(server.requests, bodies, strict=True):
        assert request.path == "/hooks/loyalty"
        assert request.headers["content-type"] == "application/json"
        assert request.headers["loyalty-event-id"] == body["event_id"]
        assert body["event_id"].startswith("evt_")
        assert set(body) == {"event_id", "type", "occurred_at", "data"}
        assert datetime.fromisoformat(body["occurred_at"]).tzinfo is not None
        assert body["data"]["customer_id"] == customer
        signed_at = verify_signature(webhook["secret"], request.headers["loyalty-signature"], request.body)
        assert abs(signed_at - time.time()) < 60
    tier_changed = next(body for body in bodies if body["type"] == "tier.changed")
    assert tier_changed["data"]["to"] in ("one_time", "nurture")
    assert next(body for body in bodies if body["type"] == "offer.issued")["data"]["code"] == code

    items = await deliveries(client, keys, webhook["webhook_id"])
    assert [item["status"] for item in items] == ["delivered", "delivered"]
    assert items[0]["delivery_id"] > items[1]["delivery_id"]
    assert {item["event_id"] for item in items} == {body["event_id"] for body in bodies}
    for item in items:
        assert item["attempts"] == 1
        assert item["last_status_code"] == 200
        assert item["last_error"] is None
        assert item["delivered_at"] is not None
        assert item["next_attempt_at"] is None


async def test_failures_back_off_then_dead(client, keys, session_maker, receiver) -> None:
    server = await receiver(status=500)
    webhook = await register(client, keys, server.url, ["tier.changed"])
    await place_order(client, keys, "o-1", "c-1")
    jobs = WebhookJobs(session_maker, timeout_seconds=2, lease_seconds=10)
    await jobs.fan_out()
    delays = []
    for attempt in range(1, jobs.max_attempts + 1):
        summary = await jobs.deliver()
        [item] = await deliveries(client, keys, webhook["webhook_id"])
        assert item["attempts"] == attempt
        assert item["last_status_code"] == 500
        assert item["last_error"] == "HTTP 500"
        if attempt < jobs.max_attempts:
            assert summary == {"failed": 1}
            assert item["status"] == "failed"
            next_at = datetime.fromisoformat(item["next_attempt_at"])
            delays.append((next_at - datetime.fromisoformat(item["last_attempt_at"])).total_seconds())
            # Not due before its back-off: a poll now sends nothing.
            assert await jobs.deliver() == {}
            await make_due_now(session_maker)
        else:
            assert summary == {"dead": 1}
            assert item["status"] == "dead"
            assert item["next_attempt_at"] is None
    assert len(server.requests) == jobs.max_attempts
    assert 8 <= delays[0] <= 11
    # Doubling until the hour's cap (10 s x 2^8 = 2560 s is the last delay below it).
    assert all(later > earlier for earlier, later in itertools.pairwise(delays[:9]))
    assert all(delay <= 3600 + 5 for delay in delays)
    await make_due_now(session_maker)
    assert await jobs.deliver() == {}
    assert len(server.requests) == jobs.max_attempts


async def test_receiver_that_recovers_gets_the_event(client, keys, session_maker, receiver) -> None:
    server = await receiver(status=503)
    webhook = await register(client, keys, server.url, ["tier.changed"])
    await place_order(client, keys, "o-1", "c-1")
    jobs = WebhookJobs(session_maker, timeout_seconds=2, lease_seconds=10)
    await jobs.fan_out()
    assert await jobs.deliver() == {"failed": 1}
    await make_due_now(session_maker)
    assert await jobs.deliver() == {"failed": 1}
    server.status = 204
    await make_due_now(session_maker)
    assert await jobs.deliver() == {"delivered": 1}
    [item] = await deliveries(client, keys, webhook["webhook_id"])
    assert (item["status"], item["attempts"], item["last_status_code"]) == ("delivered", 3, 204)
    assert item["last_error"] is None
    # Every attempt carried the same event id, so the receiver can tell a retry from a new event.
    assert len({request.headers["loyalty-event-id"] for request in server.requests}) == 1


async def test_redirects_and_unreachable_receivers_are_failed_attempts(client, keys, session_maker, receiver) -> None:
    redirecting = await receiver(status=302)
    closed = await receiver()
    await closed.close()
    redirect_hook = await register(client, keys, redirecting.url, ["tier.changed"])
    closed_hook = await register(client, keys, closed.url, ["tier.changed"])
    await place_order(client, keys, "o-1", "c-1")
    jobs = WebhookJobs(session_maker, timeout_seconds=2, lease_seconds=10)
    await jobs.fan_out()
    assert await jobs.deliver() == {"failed": 2}
    [redirected] = await deliveries(client, keys, redirect_hook["webhook_id"])
    assert redirected["last_status_code"] == 302
    assert "redirects are not followed" in redirected["last_error"]
    [refused] = await deliveries(client, keys, closed_hook["webhook_id"])
    assert refused["last_status_code"] is None
    assert refused["last_error"].startswith("ConnectError")


async def test_hanging_receiver_does_not_stall_the_others(client, keys, session_maker, receiver) -> None:
    hanging = await receiver(hang=True)
    healthy = await receiver()
    hanging_hook = await register(client, keys, hanging.url, ["tier.changed"])
    healthy_hook = await register(client, keys, healthy.url, ["tier.changed"])
    await place_order(client, keys, "o-1", "c-1")
    jobs = WebhookJobs(session_maker, timeout_seconds=1, lease_seconds=10)
    await jobs.fan_out()
    started = time.perf_counter()
    assert await jobs.deliver() == {"delivered": 1, "failed": 1}
    elapsed = time.perf_counter() - started
    assert elapsed < 1 + 2.0, elapsed
    [received] = healthy.requests
    assert received.at - started < 1.0
    assert len(hanging.requests) == 1
    [delivered] = await deliveries(client, keys, healthy_hook["webhook_id"])
    assert delivered["status"] == "delivered"
    [timed_out] = await deliveries(client, keys, hanging_hook["webhook_id"])
    assert timed_out["status"] == "failed"
    assert timed_out["last_status_code"] is None
    assert timed_out["last_error"].startswith("timeout")


async def test_concurrent_deliver_runs_send_each_delivery_once(client, keys, session_maker, receiver) -> None:
    server = await receiver()
    await register(client, keys, server.url, ["tier.changed"])
    orders = [
        {"order_id": f"o-{i}", "customer_id": f"c-{i}", "placed_at": soon(-60), "total": "20.00", "currency": "USD"}
        for i in range(30)
    ]
    response = await client.post("/v1/orders/batch", json={"orders": orders}, headers=keys.headers("storefront"))
    assert response.json()["failed"] == 0
    fan_out = WebhookJobs(session_maker, timeout_seconds=2, lease_seconds=10)
    assert (await fan_out.fan_out())["deliveries"] == 30
    runs = [WebhookJobs(session_maker, timeout_seconds=2, lease_seconds=10, per_endpoint=5) for _ in range(2)]
    summaries = await asyncio.gather(*(run.deliver() for run in runs))
    assert sum(summary.get("delivered", 0) for summary in summaries) == 30
    event_ids = [request.headers["loyalty-event-id"] for request in server.requests]
    assert len(event_ids) == 30
    assert len(set(event_ids)) == 30


async def test_claims_skip_deliveries_leased_by_another_transaction(client, keys, session_maker, database, receiver):
    if database.dialect != "postgresql":
        pytest.skip("SKIP LOCKED is PostgreSQL's; SQLite has one writer at a time")
    server = await receiver()
    await register(client, keys, server.url, ["tier.changed"])
    for i in range(4):
        await place_order(client, keys, f"o-{i}", f"c-{i}")
    await WebhookJobs(session_maker).fan_out()
    claim = {"lease_seconds": 30, "per_endpoint": 10, "batch_size": 50}
    async with session_maker() as first, session_maker() as second:
        held = await claim_deliveries(first, "first", utcnow(), **claim)
        assert len(held) == 4
        # The first claim is not committed: its rows are locked, and the second claimant passes them by at once.
        async with asyncio.timeout(5):
            assert await claim_deliveries(second, "second", utcnow(), **claim) == []
        await second.rollback()
        await first.commit()
    async with session_maker() as session:
        claimants = (await session.scalars(select(WebhookDelivery.claimed_by))).all()
    assert claimants == ["first"] * 4


async def test_delete_abandons_deliveries_and_erasure_removes_them(client, keys, session_maker, receiver) -> None:
    admin = keys.headers("admin")
    server = await receiver()
    kept = await register(client, keys, server.url, ["tier.changed"])
    dropped = await register(client, keys, server.url + "/other", ["tier.changed"])
    await place_order(client, keys, "o-1", "c-1")
    await place_order(client, keys, "o-2", "c-2")
    jobs = WebhookJobs(session_maker, timeout_seconds=2, lease_seconds=10)
    assert (await jobs.fan_out())["deliveries"] == 4
    assert (await client.delete(f"/v1/webhooks/{dropped['webhook_id']}", headers=admin)).status_code == 204
    assert (await client.delete(f"/v1/webhooks/{dropped['webhook_id']}", headers=admin)).status_code == 404
    assert (await client.get(f"/v1/webhooks/{dropped['webhook_id']}/deliveries", headers=admin)).status_code == 404
    listed = (await client.get("/v1/webhooks", headers=admin)).json()
    assert [item["webhook_id"] for item in listed["items"]] == [kept["webhook_id"]]
    async with session_maker() as session:
        statuses = (
            await session.scalars(
                select(WebhookDelivery.status).where(WebhookDelivery.endpoint_id == dropped["webhook_id"])
            )
        ).all()
        secret = await session.scalar(select(WebhookEndpoint.secret).where(WebhookEndpoint.id == dropped["webhook_id"]))
    assert statuses == ["abandoned", "abandoned"]
    assert secret == ""
    # Erasing a customer deletes the events about them, and with them their undelivered deliveries.
    assert (await client.delete("/v1/customers/c-2", headers=admin)).status_code == 204
    assert await jobs.deliver() == {"delivered": 1}
    [received] = server.requests
    assert received.path == "/hooks/loyalty"
    assert json.loads(received.body)["data"]["customer_id"] == "c-1"
    assert len(await deliveries(client, keys, kept["webhook_id"])) == 1


async def test_only_admins_manage_webhooks(client, keys) -> None:
    body = {"url": "https://hooks.example.com/loyalty", "events": ["tier.changed"]}
    routes = [("post", "/v1/webhooks"), ("get", "/v1/webhooks"), ("delete", "/v1/webhooks/1")]
    routes.append(("get", "/v1/webhooks/1/deliveries"))
    for method, path in routes:
        options: dict[str, Any] = {"json": body} if method == "post" else {}
        assert (await getattr(client, method)(path, **options)).status_code == 401, path
        for scope in ("storefront", "marketing"):
            response = await getattr(client, method)(path, headers=keys.headers(scope), **options)
            assert response.status_code == 403, (path, scope)
            assert response.headers["content-type"].startswith("application/problem+json")


async def test_validation_and_secret_never_listed(client, keys) -> None:
    admin = keys.headers("admin")
    good = {"url": "https://hooks.example.com/loyalty?tenant=7", "events": ["offer.redeemed", "offer.redeemed"]}
    for body, field in [
        ({**good, "url": "ftp://hooks.example.com/x"}, "url"),
        ({**good, "url": "javascript:alert(1)"}, "url"),
        ({**good, "url": "http://"}, "url"),
        ({**good, "url": "hooks.example.com/loyalty"}, "url"),
        ({**good, "url": "https://hooks.example.com/a b"}, "url"),
        ({**good, "url": "https://hooks.example.com/\x01"}, "url"),
        ({**good, "url": "https://hooks.example.com:99999/"}, "url"),
        ({**good, "url": "https://hooks.example.com/" + "a" * 2048}, "url"),
        ({"events": ["tier.changed"]}, "url"),
        ({**good, "events": []}, "events"),
        ({**good, "events": ["order.created"]}, "events[0]"),
        ({"url": good["url"]}, "events"),
        ({**good, "secret": "mine"}, "secret"),
    ]:
        response = await client.post("/v1/webhooks", json=body, headers=admin)
        assert response.status_code == 422, (body, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert field in [error["field"] for error in response.json()["errors"]], response.json()
    created = await client.post("/v1/webhooks", json=good, headers=admin)
    assert created.status_code == 201
    assert created.json()["url"] == good["url"]
    assert created.json()["events"] == ["offer.redeemed"]
    secret = created.json()["secret"]
    listed = await client.get("/v1/webhooks", headers=admin)
    assert listed.status_code == 200
    assert secret not in listed.text
    assert "secret" not in listed.json()["items"][0]
    assert listed.json()["next_cursor"] is None
    assert (await client.get("/v1/webhooks/999999/deliveries", headers=admin)).status_code == 404
    missing = await client.delete("/v1/webhooks/999999", headers=admin)
    assert missing.status_code == 404
    assert missing.json()["type"] == "/problems/not-found"
    webhook_id = created.json()["webhook_id"]
    empty = (await client.get(f"/v1/webhooks/{webhook_id}/deliveries", headers=admin)).json()
    assert empty == {"items": [], "next_cursor": None}
    schema = (await client.get("/schema/openapi.json")).text
    assert "ListWebhookDeliveries" in schema
