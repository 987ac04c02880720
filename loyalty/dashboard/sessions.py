"""Dashboard sessions: a small HMAC-signed cookie naming the API key that signed in and when it expires.

The cookie holds no secret (only the key's id), so nothing server-side needs storing and several replicas
share sessions through the app's secret key alone. The key is re-checked on every page load, so revoking it
ends its sessions at once.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.db.models import ApiKey

COOKIE_NAME = "loyalty_dashboard"
LIFETIME = timedelta(hours=8)
DASHBOARD_SCOPES = ("marketing", "admin")
# Separates these signatures from anything else signed with the same secret (customer tokens, webhooks).
_PURPOSE = b"loyalty.dashboard.session.v1:"


def _signature(payload: str, secret_key: str) -> str:
    return hmac.new(secret_key.encode(), _PURPOSE + payload.encode(), hashlib.sha256).hexdigest()


def issue_session(key_id: int, secret_key: str, now: datetime) -> str:
    payload = f"{key_id}.{int((now + LIFETIME).timestamp())}"
    return f"{payload}.{_signature(payload, secret_key)}"


def session_key_id(cookie: str | None, secret_key: str, now: datetime) -> int | None:
    """The key id of a genuine, unexpired session cookie, else None."""
    if not cookie or len(cookie) > 200:
        return None
    payload, _sep, signature = cookie.rpartition(".")
    if not hmac.compare_digest(signature, _signature(payload, secret_key)):
        return None
    key_id, _sep, expires = payload.partition(".")
    if not (key_id.isdigit() and expires.isdigit()) or int(expires) <= now.timestamp():
        return None
    return int(key_id)


async def key_may_view(session: AsyncSession, key_id: int) -> bool:
    """Whether the key is still active and still holds a dashboard scope."""
    scope = await session.scalar(select(ApiKey.scope).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)))
    return scope in DASHBOARD_SCOPES
