"""Customer profile shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import Field, StringConstraints, field_validator

from loyalty.lib.clock import EventTime
from loyalty.lib.schemas import ExternalId, Schema

AttributeValue = str | int | float | bool | None
MAX_ATTRIBUTES = 50


class CustomerUpsert(Schema):
    """Create or update a profile; fields left out keep their stored value."""

    email: Annotated[str, StringConstraints(max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")] | None = None
    joined_at: EventTime | None = None
    attributes: dict[str, AttributeValue] | None = Field(
        default=None, description="Free segmentation attributes (location, device, age band ...); no PII."
    )
    marketing_opt_out: bool | None = None
    referred_by: ExternalId | None = None

    @field_validator("attributes")
    @classmethod
    def _bounded(cls, value: dict[str, AttributeValue] | None) -> dict[str, AttributeValue] | None:
        if value is None:
            return value
        if len(value) > MAX_ATTRIBUTES:
            raise ValueError(f"at most {MAX_ATTRIBUTES} attributes")
        for key, item in value.items():
            if not 1 <= len(key) <= 64:
                raise ValueError("attribute names are 1 to 64 characters")
            if isinstance(item, str) and len(item) > 256:
                raise ValueError(f"attribute {key!r} is longer than 256 characters")
            if isinstance(item, float) and not (abs(item) < 1e15):
                raise ValueError(f"attribute {key!r} must be a finite number below 1e15")
        return value


class Customer(Schema):
    customer_id: str
    email: str | None
    joined_at: datetime | None
    attributes: dict[str, AttributeValue]
    marketing_opt_out: bool
    referred_by: str | None
    created_at: datetime
    updated_at: datetime


class CustomerToken(Schema):
    token: str
    expires_at: datetime


class CustomerPath(Schema):
    customer_id: ExternalId
