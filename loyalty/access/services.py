"""API keys: 256-bit random secrets shown once, stored and looked up only by their SHA-256."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.db.models import ApiKey
from loyalty.lib.clock import utcnow

Scope = Literal["storefront", "marketing", "admin"]
SCOPES: tuple[Scope, ...] = ("storefront", "marketing", "admin")
KEY_PREFIX = "lty_"


@dataclass(frozen=True)
class KeyPrincipal:
    """The caller behind a valid API key."""

    key_id: int
    name: str
    scope: str

    def allows(self, scope: str) -> bool:
        return self.scope == "admin" or self.scope == scope


def hash_key(plain: str) -> str:
    return hashlib.sha256(plain.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


async def create_key(session: AsyncSession, name: str, scope: str) -> tuple[ApiKey, str]:
    """Store a new key and return it with its secret, which is never retrievable again."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    if not name.strip():
        raise ValueError("name must not be empty")
    plain = generate_key()
    key = ApiKey(name=name.strip(), scope=scope, key_hash=hash_key(plain), prefix=plain[:10])
    session.add(key)
    await session.flush()
    return key, plain


async def list_keys(session: AsyncSession) -> list[ApiKey]:
    return list((await session.scalars(select(ApiKey).order_by(ApiKey.id))).all())


async def revoke_key(session: AsyncSession, key_id: int) -> bool:
    """Revoke a key; False when there is no such active key."""
    result = await session.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    return bool(getattr(result, "rowcount", 0))


async def authenticate_key(session: AsyncSession, plain: str) -> KeyPrincipal | None:
    """The principal for an active key, or None.

    The lookup is by hash in a unique index, so nothing secret is compared byte by byte in Python; the stored
    value is a hash an attacker cannot steer, which is what keeps timing from leaking the key.
    """
    if not plain.startswith(KEY_PREFIX) or len(plain) > 100:
        return None
    row = (
        await session.execute(
            select(ApiKey.id, ApiKey.name, ApiKey.scope).where(
                ApiKey.key_hash == hash_key(plain), ApiKey.revoked_at.is_(None)
            )
        )
    ).first()
    return KeyPrincipal(key_id=row.id, name=row.name, scope=row.scope) if row else None
