"""The webhook poll jobs: `webhooks.fan_out` and `webhooks.deliver`."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.db.session import transaction
from loyalty.lib.clock import utcnow
from loyalty.ops import metrics
from loyalty.scheduling.leases import WORKER_ID
from loyalty.scheduling.timer import Job
from loyalty.webhooks.delivery import Outcome, claim_deliveries, fan_out, new_client, record_outcomes, send

FAN_OUT_BATCH = 1000
# Bound one poll's work (fan-out batches, deliveries claimed), so a large backlog is taken in steps and never
# holds the timer for long.
MAX_BATCHES_PER_POLL = 20
MAX_CLAIMED_PER_POLL = 1000


@dataclass(frozen=True)
class WebhookJobs:
    session_maker: async_sessionmaker[AsyncSession]
    # The whole of one attempt (connect, send, answer) must fit in this, or it counts as a failed attempt.
    timeout_seconds: float = 5.0
    max_attempts: int = 12
    batch_size: int = 50
    per_endpoint: int = 10
    lease_seconds: float = 60.0
    # How often to look for newly due deliveries while attempts are in flight: the timer's poll interval.
    poll_seconds: float = 5.0

    def __post_init__(self) -> None:
        # An attempt is recorded within a timeout of its end, so within two of its claim; a lease running out
        # before that would let another replica send the same delivery again.
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
        """`webhooks.deliver`: claim due deliveries, send them concurrently, record the outcomes, claim again.

        No send waits for another: while attempts are in flight, the outcomes of those that ended are recorded
        and due deliveries claimed again every `poll_seconds` (at most every `timeout_seconds`), and at once when
        every attempt in flight has ended. A receiver that hangs holds only its own attempts, for at most the
        timeout, and deliveries to everyone else, including events that arrive meanwhile, go out at once. At most
        `batch_size` attempts are in flight, at most `per_endpoint` of them to one endpoint.
        """
        worker = f"{WORKER_ID}:{uuid.uuid4().hex[:8]}"
        interval = min(self.poll_seconds, self.timeout_seconds)
        counts: dict[str, int] = {}
        # Each attempt in flight, with its endpoint.
        in_flight: dict[asyncio.Task[Outcome], int] = {}
        claimed = 0
        client: httpx.AsyncClient | None = None
        try:
            while True:
                room = min(self.batch_size - len(in_flight), MAX_CLAIMED_PER_POLL - claimed)
                if room > 0:
                    async with transaction(self.session_maker) as session:
                        attempts = await claim_deliveries(
                            session,
                            worker,
                            utcnow(),
                            lease_seconds=self.lease_seconds,
                            per_endpoint=self.per_endpoint,
                            batch_size=room,
                            in_flight=Counter(in_flight.values()),
                        )
                    claimed += len(attempts)
                    for attempt in attempts:
                        client = client or new_client(self.timeout_seconds, self.batch_size)
                        in_flight[asyncio.create_task(send(client, attempt, self.timeout_seconds))] = (
                            attempt.endpoint_id
                        )
                if not in_flight:
                    break
                done, _pending = await asyncio.wait(in_flight, timeout=interval)
                if not done:
                    continue
                for task in done:
                    del in_flight[task]
                async with transaction(self.session_maker) as session:
                    recorded = await record_outcomes(
                        session, worker, [task.result() for task in done], self.max_attempts
                    )
                for status, number in recorded.items():
                    counts[status] = counts.get(status, 0) + number
                    metrics.record_webhook_attempts(status, number)
        finally:
            # Cancelled (the process is stopping): the attempts not recorded stay leased and are sent again once
            # their lease runs out; delivery is at least once.
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            if client is not None:
                await client.aclose()
        return counts

    def poll_jobs(self) -> list[Job]:
        return [Job("webhooks.fan_out", self.fan_out), Job("webhooks.deliver", self.deliver)]
