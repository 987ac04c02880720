"""The webhook poll jobs: `webhooks.fan_out` and `webhooks.deliver`."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.db.session import transaction
from loyalty.lib.clock import utcnow
from loyalty.ops import metrics
from loyalty.recalc.runs import WORKER_ID
from loyalty.scheduling.timer import Job
from loyalty.webhooks.delivery import claim_deliveries, fan_out, new_client, record_outcomes, send

FAN_OUT_BATCH = 1000
# Bounds one poll's work, so a large backlog is taken in steps and never holds the timer for long.
MAX_BATCHES_PER_POLL = 20


@dataclass(frozen=True)
class WebhookJobs:
    session_maker: async_sessionmaker[AsyncSession]
    # The whole of one attempt (connect, send, answer) must fit in this, or it counts as a failed attempt.
    timeout_seconds: float = 5.0
    max_attempts: int = 12
    batch_size: int = 50
    per_endpoint: int = 10
    lease_seconds: float = 60.0

    def __post_init__(self) -> None:
        # A batch is sent all at once and recorded when its slowest attempt ends, within one timeout; a lease
        # running out before that would let another replica send the same deliveries again.
        if self.lease_seconds <= 2 * self.timeout_seconds:
            raise ValueError("lease_seconds must exceed twice timeout_seconds")

    async def fan_out(self) -> dict[str, Any]:
        """`webhooks.fan_out`: one delivery per new outbox event and subscribed endpoint."""
        events = deliveries = 0
        for _ in range(MAX_BATCHES_PER_POLL):
            async with transaction(self.session_maker) as session:
                taken, created = await fan_out(session, utcnow(), FAN_OUT_BATCH)
            events, deliveries = events + taken, deliveries + created
            if taken < FAN_OUT_BATCH:
                break
        return {"events": events, "deliveries": deliveries} if events else {}

    async def deliver(self) -> dict[str, Any]:
        """`webhooks.deliver`: claim due deliveries in batches, send each batch concurrently, record outcomes.

        Batches follow one another until nothing is due (or the poll's bound is reached): each endpoint gets at
        most `per_endpoint` of a batch, so a short batch does not mean nothing else is due.
        """
        worker = f"{WORKER_ID}:{uuid.uuid4().hex[:8]}"
        counts: dict[str, int] = {}
        client = None
        try:
            for _ in range(MAX_BATCHES_PER_POLL):
                async with transaction(self.session_maker) as session:
                    attempts = await claim_deliveries(
                        session,
                        worker,
                        utcnow(),
                        lease_seconds=self.lease_seconds,
                        per_endpoint=self.per_endpoint,
                        batch_size=self.batch_size,
                    )
                if not attempts:
                    break
                client = client or new_client(self.timeout_seconds, self.batch_size)
                # The batch is at most `batch_size` sends, all in flight together: a hanging receiver costs one
                # timeout for its own attempts and delays no one else's.
                outcomes = await asyncio.gather(*(send(client, attempt, self.timeout_seconds) for attempt in attempts))
                async with transaction(self.session_maker) as session:
                    recorded = await record_outcomes(session, worker, outcomes, self.max_attempts)
                for status, number in recorded.items():
                    counts[status] = counts.get(status, 0) + number
                    metrics.record_webhook_attempts(status, number)
        finally:
            if client is not None:
                await client.aclose()
        return counts

    def poll_jobs(self) -> list[Job]:
        return [Job("webhooks.fan_out", self.fan_out), Job("webhooks.deliver", self.deliver)]
