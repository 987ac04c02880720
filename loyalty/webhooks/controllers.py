"""Webhook routes (scope `admin`)."""

from __future__ import annotations

from litestar import Controller, delete, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.access import guards
from loyalty.lib.errors import NOT_FOUND, problem_responses
from loyalty.lib.pagination import Cursor, IdPath, Limit, Page
from loyalty.webhooks import schemas, services


class WebhookController(Controller):
    path = "/v1/webhooks"
    tags = ["admin"]
    guards = [guards.admin]

    @post("/", operation_id="CreateWebhook", status_code=HTTP_201_CREATED)
    async def create_webhook(
        self, session: NamedDependency[AsyncSession], data: JSONBody[schemas.WebhookCreate]
    ) -> schemas.WebhookCreated:
        """Register a receiver for event types; the signing `secret` is returned only here."""
        return await services.create_webhook(session, data)

    @get("/", operation_id="ListWebhooks")
    async def list_webhooks(
        self, session: NamedDependency[AsyncSession], limit: Limit = 50, cursor: Cursor = None
    ) -> Page[schemas.Webhook]:
        """Registered webhooks, newest first (without secrets)."""
        return await services.list_webhooks(session, limit, cursor)

    @delete(
        "/{webhook_id:int}",
        operation_id="DeleteWebhook",
        status_code=HTTP_204_NO_CONTENT,
        responses=problem_responses(NOT_FOUND),
    )
    async def delete_webhook(self, session: NamedDependency[AsyncSession], webhook_id: IdPath) -> None:
        """Delete a webhook: deliveries stop and those still open are abandoned."""
        await services.delete_webhook(session, webhook_id)

    @get("/{webhook_id:int}/deliveries", operation_id="ListWebhookDeliveries", responses=problem_responses(NOT_FOUND))
    async def list_deliveries(
        self, session: NamedDependency[AsyncSession], webhook_id: IdPath, limit: Limit = 50, cursor: Cursor = None
    ) -> Page[schemas.Delivery]:
        """A webhook's deliveries, newest first: status, attempts, the last outcome and the next attempt."""
        return await services.list_deliveries(session, webhook_id, limit, cursor)
