"""A webhook receiver that accepts and never answers does not hold up deliveries to the others.

The app runs with its timer, as a replica does (fan-out and delivery every poll, the production attempt timeout of
5 s), and two real local receivers: one that reads each request and never answers, one that answers 200. Events
that happen while the hanging receiver holds its attempt open still reach the other receiver at once; the hanging
attempt times out and is retried by the service's back-off.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import update

from loyalty.app import create_app
from loyalty.db.models import WebhookDelivery
from loyalty.db.session import transaction
from loyalty.lib.clock import utcnow
from loyalty.webhooks.delivery import FIRST_RETRY_SECONDS
from loyalty.webhooks.jobs import WebhookJobs
from tests.integration.webhooks.conftest import Receiver
from tests.integration.webhooks.test_webhooks import deliveries, place_order, register
from tests.support import wait_for

POLL_SECONDS = 0.2
# The attempt timeout the app's timer uses; the hanging receiver's attempt ends only when it runs out.
ATTEMPT_TIMEOUT = WebhookJobs.timeout_seconds


@pytest.fixture
async def receivers() -> AsyncIterator[tuple[Receiver, Receiver]]:
    hanging, healthy = Receiver(hang=True), Receiver()
    await hanging.start()
    await healthy.start()
    yield hanging, healthy
    for server in (hanging, healthy):
        if server._server is not None and server._server.is_serving():
            await server.close()


def _event_ids(receiver: Receiver) -> list[str]:
    return [request.headers["loyalty-event-id"] for request in receiver.requests]


async def _delivery(client: Any, keys: Any, webhook: dict[str, Any], event_id: str) -> dict[str, Any]:
    [delivery] = [d for d in await deliveries(client, keys, webhook["webhook_id"]) if d["event_id"] == event_id]
    return delivery


async def test_a_hanging_receiver_does_not_hold_up_the_others_and_is_retried(
    settings, engine, session_maker, keys, receivers
) -> None:
    hanging, healthy = receivers
    app = create_app(settings.model_copy(update={"scheduler_enabled": True, "poll_seconds": POLL_SECONDS}))
    async with AsyncTestClient(app=app) as client:
        hanging_hook = await register(client, keys, hanging.url, ["tier.changed"])
        healthy_hook = await register(client, keys, healthy.url, ["tier.changed"])

        # A first event: the hanging receiver takes its delivery and keeps the attempt open.
        await place_order(client, keys, "o-1", "c-1")
        await wait_for(lambda: _at_least(hanging, 1), "the first delivery to the hanging receiver", within=30)
        hung_at = hanging.requests[0].at
        [first_event] = _event_ids(hanging)

        # Events that happen while it hangs reach the other receiver at once, not after the hanging attempt.
        await place_order(client, keys, "o-2", "c-2")
        await place_order(client, keys, "o-3", "c-3")
        await wait_for(lambda: _at_least(healthy, 3), "three deliveries to the healthy receiver", within=30)
        assert healthy.requests[-1].at - hung_at < ATTEMPT_TIMEOUT, "the healthy receiver waited for the hanging one"
        hung = await _delivery(client, keys, hanging_hook, first_event)
        assert (hung["status"], hung["attempts"]) == ("sending", 1), "the hanging attempt ended before the others"
        assert len(set(_event_ids(healthy))) == 3

        # The hanging attempt runs out of time: a failed attempt, retried after the first back-off.
        async def timed_out() -> dict[str, Any] | None:
            delivery = await _delivery(client, keys, hanging_hook, first_event)
            return delivery if delivery["status"] == "failed" else None

        failed = await wait_for(timed_out, "the hanging attempt to time out", within=ATTEMPT_TIMEOUT + 30)
        assert failed["attempts"] == 1
        assert failed["last_status_code"] is None
        assert failed["last_error"].startswith("timeout")
        tried = datetime.fromisoformat(failed["last_attempt_at"])
        retry = datetime.fromisoformat(failed["next_attempt_at"])
        # The attempt took the timeout, then the back-off: the first delay shortened by at most a fifth of jitter.
        after = (retry - tried).total_seconds() - ATTEMPT_TIMEOUT
        assert 0.8 * FIRST_RETRY_SECONDS - 0.5 <= after <= FIRST_RETRY_SECONDS + 5, after
        assert _event_ids(hanging).count(first_event) == 1, "retried before its back-off"

        # Due again (standing in for the back-off's wait): the timer sends it a second time.
        async with transaction(session_maker) as session:
            await session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == failed["delivery_id"])
                .values(next_attempt_at=utcnow() - timedelta(seconds=1))
            )
        await wait_for(lambda: _event_sent(hanging, first_event, 2), "the retry of the hanging delivery", within=30)
        retried = await _delivery(client, keys, hanging_hook, first_event)
        assert (retried["status"], retried["attempts"]) == ("sending", 2)

        # Every event reached the healthy receiver once, at the first attempt.
        delivered = await deliveries(client, keys, healthy_hook["webhook_id"])
        assert [(d["status"], d["attempts"]) for d in delivered] == [("delivered", 1)] * 3

        # The hanging receiver goes away: its open attempts end, and are recorded before the app stops.
        await hanging.close()

        async def settled() -> bool:
            return all(d["status"] != "sending" for d in await deliveries(client, keys, hanging_hook["webhook_id"]))

        await wait_for(settled, "the open attempts to be recorded", within=ATTEMPT_TIMEOUT + 30)


async def _at_least(receiver: Receiver, count: int) -> bool:
    return len(receiver.requests) >= count


async def _event_sent(receiver: Receiver, event_id: str, times: int) -> bool:
    return _event_ids(receiver).count(event_id) >= times
