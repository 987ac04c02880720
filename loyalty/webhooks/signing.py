"""The delivery body and its signature: what a receiver verifies."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from datetime import datetime
from typing import Any

SECRET_PREFIX = "whsec_"  # noqa: S105 - the public prefix that marks a webhook secret, not a secret


def new_secret() -> str:
    """A prefixed 256-bit random signing secret."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def event_id(outbox_event_id: int) -> str:
    """The stable id of an event: the same on every attempt and every endpoint, so receivers can deduplicate."""
    return f"evt_{outbox_event_id}"


def delivery_body(outbox_event_id: int, event_type: str, occurred_at: datetime, data: dict[str, Any]) -> bytes:
    document = {
        "event_id": event_id(outbox_event_id),
        "type": event_type,
        "occurred_at": occurred_at.isoformat(),
        "data": data,
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def signature_header(secret: str, body: bytes, timestamp: int) -> str:
    """``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``: the timestamp lets receivers refuse replays."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"
