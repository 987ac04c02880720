"""Webhook endpoints: register, list, delete; and the record of their deliveries."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.db.models import OutboxEvent, WebhookDelivery, WebhookEndpoint
from loyalty.lib.clock import utcnow
from loyalty.lib.errors import NOT_FOUND, ProblemError
from loyalty.lib.pagination import Page, decode_int_cursor, encode_cursor
from loyalty.webhooks import schemas
from loyalty.webhooks.signing import event_id, new_secret

# Deliveries that may still be attempted; deleting their endpoint abandons them.
OPEN_STATUSES = ("pending", "sending", "failed")


def webhook_view(endpoint: WebhookEndpoint) -> schemas.Webhook:
    return schemas.Webhook(
        webhook_id=endpoint.id, url=endpoint.url, events=list(endpoint.events), created_at=endpoint.created_at
    )


async def create_webhook(session: AsyncSession, data: schemas.WebhookCreate) -> schemas.WebhookCreated:
    endpoint = WebhookEndpoint(url=data.url, events=list(data.events), secret=new_secret(), created_at=utcnow())
    session.add(endpoint)
    await session.flush()
    return schemas.WebhookCreated(**webhook_view(endpoint).model_dump(), secret=endpoint.secret)


async def _active_endpoint(session: AsyncSession, webhook_id: int) -> WebhookEndpoint:
    endpoint = await session.get(WebhookEndpoint, webhook_id)
    if endpoint is None or endpoint.deleted_at is not None:
        raise ProblemError(NOT_FOUND, f"No webhook with webhook_id {webhook_id}")
    return endpoint


async def list_webhooks(session: AsyncSession, limit: int, cursor: str | None) -> Page[schemas.Webhook]:
    statement = (
        select(WebhookEndpoint)
        .where(WebhookEndpoint.deleted_at.is_(None))
        .order_by(WebhookEndpoint.id.desc())
        .limit(limit + 1)
    )
    if cursor:
        statement = statement.where(WebhookEndpoint.id < decode_int_cursor(cursor))
    found = list((await session.scalars(statement)).all())
    next_cursor = encode_cursor(str(found[limit - 1].id)) if len(found) > limit else None
    return Page(items=[webhook_view(endpoint) for endpoint in found[:limit]], next_cursor=next_cursor)


async def delete_webhook(session: AsyncSession, webhook_id: int) -> None:
    """Stop deliveries: the endpoint is retired and its open deliveries are abandoned.

    An attempt already under way may still reach the receiver; its outcome is not recorded over `abandoned`.
    The secret is wiped: nothing will be signed with it again.
    """
    now = utcnow()
    endpoint = await _active_endpoint(session, webhook_id)
    endpoint.deleted_at = now
    endpoint.secret = ""
    await session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == webhook_id, WebhookDelivery.status.in_(OPEN_STATUSES))
        .values(status="abandoned", next_attempt_at=None, lease_until=None)
        .execution_options(synchronize_session=False)
    )
    await session.flush()


async def list_deliveries(
    session: AsyncSession, webhook_id: int, limit: int, cursor: str | None
) -> Page[schemas.Delivery]:
    await _active_endpoint(session, webhook_id)
    statement = (
        select(WebhookDelivery, OutboxEvent.event_type)
        .join(OutboxEvent, OutboxEvent.id == WebhookDelivery.outbox_event_id)
        .where(WebhookDelivery.endpoint_id == webhook_id)
        .order_by(WebhookDelivery.id.desc())
        .limit(limit + 1)
    )
    if cursor:
        statement = statement.where(WebhookDelivery.id < decode_int_cursor(cursor))
    found = list((await session.execute(statement)).all())
    next_cursor = encode_cursor(str(found[limit - 1][0].id)) if len(found) > limit else None
    items = [
        schemas.Delivery(
            delivery_id=delivery.id,
            event_id=event_id(delivery.outbox_event_id),
            type=event_type,
            status=delivery.status,
            attempts=delivery.attempts,
            last_status_code=delivery.last_status_code,
            last_error=delivery.last_error,
            last_attempt_at=delivery.last_attempt_at,
            next_attempt_at=delivery.next_attempt_at,
            delivered_at=delivery.delivered_at,
            created_at=delivery.created_at,
        )
        for delivery, event_type in found[:limit]
    ]
    return Page(items=items, next_cursor=next_cursor)
