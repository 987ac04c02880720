"""From outbox to receiver: fan-out into delivery rows, leased claims, signed sends, recorded outcomes.

Every step is idempotent or leased, so any number of replicas may run it: fan-out inserts one delivery per
(endpoint, event) under a unique key; a claim takes due deliveries under a lease (SKIP LOCKED on PostgreSQL);
an outcome is written only by the claimant still holding it. Delivery is at least once: a crash between a send
and its record sends again once the lease runs out, with the same event id for the receiver to deduplicate.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

import httpx
from sqlalchemy import Table, bindparam, literal, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty import __version__
from loyalty.db.base import BigIntPK
from loyalty.db.dialect import insert_ignoring_conflicts, is_postgres
from loyalty.db.models import OutboxEvent, WebhookDelivery, WebhookEndpoint
from loyalty.db.types import DateTimeUTC
from loyalty.lib.clock import utcnow
from loyalty.ops import metrics
from loyalty.webhooks.signing import delivery_body, event_id, signature_header

logger = logging.getLogger("loyalty.webhooks")

FIRST_RETRY_SECONDS = 10.0
MAX_RETRY_SECONDS = 3600.0
MAX_ERROR_LENGTH = 500
USER_AGENT = f"Loyalty-Webhooks/{__version__}"


async def fan_out(session: AsyncSession, now: datetime, batch_size: int) -> tuple[int, int]:
    """Turn up to ``batch_size`` outbox events into deliveries for the endpoints subscribed to their type.

    ``OutboxEvent.delivered_at`` means "handed to webhook fan-out": an event is fanned out once, to the endpoints
    registered at that moment (an endpoint registered later receives events from then on). Answers (events,
    deliveries created).
    """
    pending = (
        select(OutboxEvent.id).where(OutboxEvent.delivered_at.is_(None)).order_by(OutboxEvent.id).limit(batch_size)
    )
    if is_postgres(session):
        # Another replica fanning out at the same time takes other events instead of waiting for these.
        pending = pending.with_for_update(skip_locked=True)
    event_ids = list((await session.scalars(pending)).all())
    if not event_ids:
        return 0, 0
    endpoints = (
        await session.execute(
            select(WebhookEndpoint.id, WebhookEndpoint.events).where(WebhookEndpoint.deleted_at.is_(None))
        )
    ).all()
    created = 0
    # Endpoints are few: one INSERT ... SELECT each keeps type matching a plain IN on both databases, where
    # a JSON containment join would need a different operator per dialect.
    for endpoint_id, events in endpoints:
        rows = select(
            literal(endpoint_id, BigIntPK),
            OutboxEvent.id,
            literal("pending"),
            literal(0),
            literal(now, DateTimeUTC()),
            literal(now, DateTimeUTC()),
        ).where(OutboxEvent.id.in_(event_ids), OutboxEvent.event_type.in_(list(events)))
        statement = insert_ignoring_conflicts(session, WebhookDelivery, ["endpoint_id", "outbox_event_id"]).from_select(
            ["endpoint_id", "outbox_event_id", "status", "attempts", "next_attempt_at", "created_at"], rows
        )
        result = await session.execute(statement)
        created += max(int(getattr(result, "rowcount", 0) or 0), 0)
    await session.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id.in_(event_ids))
        .values(delivered_at=now)
        .execution_options(synchronize_session=False)
    )
    return len(event_ids), created


@dataclass(frozen=True)
class Attempt:
    """A claimed delivery, with everything needed to send it outside any transaction."""

    delivery_id: int
    endpoint_id: int
    attempts: int
    url: str
    secret: str
    event_id: str
    body: bytes


@dataclass(frozen=True)
class Outcome:
    delivery_id: int
    endpoint_id: int
    attempts: int
    status_code: int | None
    error: str | None
    finished_at: datetime

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


async def claim_deliveries(
    session: AsyncSession,
    worker: str,
    now: datetime,
    *,
    lease_seconds: float,
    per_endpoint: int,
    batch_size: int,
    in_flight: Mapping[int, int] | None = None,
) -> list[Attempt]:
    """Lease due deliveries (new, due for a retry, or left behind by a claimant whose lease ran out).

    At most ``per_endpoint`` from each endpoint, less those of its attempts the claimant still has in flight
    (``in_flight``: endpoint id to count), so a backlog or a hanging receiver at one endpoint never takes the whole
    batch from the others; endpoints are visited in random order so none is always served last.
    """
    busy = in_flight or {}
    endpoint_ids = list(
        (await session.scalars(select(WebhookEndpoint.id).where(WebhookEndpoint.deleted_at.is_(None)))).all()
    )
    random.shuffle(endpoint_ids)
    due = (WebhookDelivery.status.in_(("pending", "failed")) & (WebhookDelivery.next_attempt_at <= now)) | (
        (WebhookDelivery.status == "sending") & (WebhookDelivery.lease_until < now)
    )
    claimed: list[int] = []
    for endpoint_id in endpoint_ids:
        if len(claimed) >= batch_size:
            break
        room = min(per_endpoint - busy.get(endpoint_id, 0), batch_size - len(claimed))
        if room <= 0:
            continue
        candidates = (
            select(WebhookDelivery.id)
            .where(WebhookDelivery.endpoint_id == endpoint_id, due)
            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
            .limit(room)
        )
        if is_postgres(session):
            candidates = candidates.with_for_update(skip_locked=True)
        result = await session.scalars(
            update(WebhookDelivery)
            .where(WebhookDelivery.id.in_(candidates.scalar_subquery()))
            .values(
                status="sending",
                claimed_by=worker,
                lease_until=now + timedelta(seconds=lease_seconds),
                # Counted when claimed, so a delivery whose sender keeps crashing still runs out of attempts.
                attempts=WebhookDelivery.attempts + 1,
                last_attempt_at=now,
            )
            .returning(WebhookDelivery.id)
            .execution_options(synchronize_session=False)
        )
        claimed.extend(result.all())
    if not claimed:
        return []
    rows = (
        await session.execute(
            select(
                WebhookDelivery.id,
                WebhookDelivery.endpoint_id,
                WebhookDelivery.attempts,
                WebhookEndpoint.url,
                WebhookEndpoint.secret,
                OutboxEvent.id,
                OutboxEvent.event_type,
                OutboxEvent.occurred_at,
                OutboxEvent.payload,
            )
            .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
            .join(OutboxEvent, OutboxEvent.id == WebhookDelivery.outbox_event_id)
            .where(WebhookDelivery.id.in_(claimed))
            .order_by(WebhookDelivery.id)
        )
    ).all()
    return [
        Attempt(
            delivery_id=delivery_id,
            endpoint_id=endpoint_id,
            attempts=attempts,
            url=url,
            secret=secret,
            event_id=event_id(outbox_id),
            body=delivery_body(outbox_id, event_type, occurred_at, payload),
        )
        for delivery_id, endpoint_id, attempts, url, secret, outbox_id, event_type, occurred_at, payload in rows
    ]


def new_client(timeout_seconds: float, max_connections: int) -> httpx.AsyncClient:
    """An HTTP client that goes only where it is told: no redirects, and no proxy taken from the environment."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_seconds),
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(max_connections=max_connections),
        headers={"User-Agent": USER_AGENT},
    )


def _error_text(error: BaseException) -> str:
    detail = str(error).strip()
    return f"{type(error).__name__}: {detail}"[:MAX_ERROR_LENGTH] if detail else type(error).__name__


async def send(client: httpx.AsyncClient, attempt: Attempt, timeout_seconds: float) -> Outcome:
    """POST one signed delivery; the whole attempt is bounded by ``timeout_seconds``, whatever the receiver does."""
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "Loyalty-Event-Id": attempt.event_id,
        "Loyalty-Signature": signature_header(attempt.secret, attempt.body, timestamp),
    }
    status_code: int | None = None
    error: str | None = None
    began = time.perf_counter()
    try:
        # httpx's timeouts bound each phase; this bounds their sum, so a receiver trickling bytes cannot hold on.
        async with asyncio.timeout(timeout_seconds):
            # Streamed and closed unread: only the status matters, and a receiver's large body is never loaded.
            async with client.stream("POST", attempt.url, content=attempt.body, headers=headers) as response:
                status_code = response.status_code
    except (TimeoutError, httpx.TimeoutException):
        error = f"timeout: no answer within {timeout_seconds:g} s"
    except httpx.HTTPError as failure:
        error = _error_text(failure)
    except Exception as failure:
        # One malformed exchange must not lose the outcomes of the rest of the batch.
        logger.exception("unexpected webhook send error", extra={"delivery_id": attempt.delivery_id})
        error = _error_text(failure)
    metrics.record_webhook_duration(time.perf_counter() - began)
    if status_code is not None and not 200 <= status_code < 300:
        error = f"HTTP {status_code}: redirects are not followed" if 300 <= status_code < 400 else f"HTTP {status_code}"
    return Outcome(
        delivery_id=attempt.delivery_id,
        endpoint_id=attempt.endpoint_id,
        attempts=attempt.attempts,
        status_code=status_code,
        error=error,
        finished_at=utcnow(),
    )


def retry_delay(attempts: int) -> timedelta:
    """10 s after the first failure, doubling each time, at most an hour.

    Each delay is shortened by a random fifth at most, so deliveries that failed together (a receiver outage)
    come back spread out rather than all at once; consecutive delays still always grow until the cap.
    """
    seconds = min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** max(attempts - 1, 0))
    return timedelta(seconds=seconds * random.uniform(0.8, 1.0))


async def record_outcomes(
    session: AsyncSession, worker: str, outcomes: Sequence[Outcome], max_attempts: int
) -> dict[str, int]:
    """Write each outcome, only where this claimant still holds the delivery (a deleted webhook abandoned it)."""
    # The Core table, for one executemany UPDATE whose WHERE names the claimant as well as the id.
    table = cast(Table, WebhookDelivery.__table__)
    statement = (
        update(table)
        .where(
            table.c.id == bindparam("b_id"),
            table.c.status == "sending",
            table.c.claimed_by == bindparam("b_worker"),
        )
        .values(
            status=bindparam("b_status"),
            next_attempt_at=bindparam("b_next", type_=DateTimeUTC()),
            delivered_at=bindparam("b_delivered", type_=DateTimeUTC()),
            last_status_code=bindparam("b_code"),
            last_error=bindparam("b_error"),
            lease_until=None,
        )
    )
    counts: dict[str, int] = {}
    rows = []
    for outcome in outcomes:
        if outcome.delivered:
            status, next_attempt = "delivered", None
        elif outcome.attempts >= max_attempts:
            status, next_attempt = "dead", None
        else:
            status, next_attempt = "failed", outcome.finished_at + retry_delay(outcome.attempts)
        counts[status] = counts.get(status, 0) + 1
        rows.append(
            {
                "b_id": outcome.delivery_id,
                "b_worker": worker,
                "b_status": status,
                "b_next": next_attempt,
                "b_delivered": outcome.finished_at if outcome.delivered else None,
                "b_code": outcome.status_code,
                "b_error": outcome.error,
            }
        )
        if status == "dead":
            logger.warning(
                "webhook delivery dead after its last attempt",
                extra={"delivery_id": outcome.delivery_id, "endpoint_id": outcome.endpoint_id, "error": outcome.error},
            )
    if rows:
        await session.execute(statement, rows)
    return counts
