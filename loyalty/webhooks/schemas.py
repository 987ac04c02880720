"""Webhook endpoint and delivery shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from urllib.parse import urlsplit

import httpx
from pydantic import Field, field_validator

from loyalty.lib.schemas import Schema

EventType = Literal["tier.changed", "offer.issued", "offer.redeemed"]
DeliveryStatus = Literal["pending", "sending", "failed", "delivered", "dead", "abandoned"]
MAX_URL_LENGTH = 2048


class WebhookBase(Schema):
    url: str = Field(
        min_length=1, max_length=MAX_URL_LENGTH, description="An http(s) URL; deliveries never follow redirects."
    )
    events: list[EventType] = Field(min_length=1, max_length=3, description="The event types to receive.")


class WebhookCreate(WebhookBase):
    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        # Checked as sent, and stored as sent: deliveries go to exactly the URL the admin registered.
        if any(ord(char) <= 0x20 or ord(char) == 0x7F for char in value):
            raise ValueError("must not contain spaces or control characters")
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - reading the port validates it
            httpx.URL(value)
        except (ValueError, httpx.InvalidURL):
            raise ValueError("is not a valid URL") from None
        if parts.scheme.lower() not in ("http", "https"):
            raise ValueError("must be an http or https URL")
        if not parts.hostname:
            raise ValueError("must name a host")
        return value

    @field_validator("events")
    @classmethod
    def _distinct(cls, value: list[EventType]) -> list[EventType]:
        return list(dict.fromkeys(value))


class Webhook(WebhookBase):
    webhook_id: int
    created_at: datetime


class WebhookCreated(Webhook):
    secret: str = Field(
        description="Signs every delivery (`Loyalty-Signature`); shown only in this response, so keep it now."
    )


class Delivery(Schema):
    delivery_id: int
    event_id: str = Field(description="The `event_id` sent in the body and `Loyalty-Event-Id`; deduplicate by it.")
    type: EventType
    status: DeliveryStatus = Field(
        description="pending: not tried yet; sending: an attempt is under way; failed: retried at next_attempt_at; "
        "delivered; dead: every attempt failed; abandoned: the webhook was deleted first."
    )
    attempts: int
    last_status_code: int | None
    last_error: str | None
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    created_at: datetime
