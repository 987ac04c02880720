"""API keys: 256-bit random secrets shown once, stored and looked up only by their SHA-256."""

from __future__ import annotations

import hashlib
import secrets
import time
import weakref
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import Engine, event, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from loyalty.db.models import ApiKey
from loyalty.db.session import single_statement
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
    forget_key(key_id)
    # Once more after the commit: a check in between read the row as still active and may have cached it again.
    event.listen(session.sync_session, "after_commit", lambda _session: forget_key(key_id), once=True)
    return bool(getattr(result, "rowcount", 0))


def forget_key(key_id: int) -> None:
    """Drop a key from this process's verified keys (every database's), so its next use is read again."""
    for verified in list(_verified_keys.values()):
        verified.forget(key_id)


async def authenticate_key(session: AsyncSession | AsyncConnection, plain: str) -> KeyPrincipal | None:
    """The principal for an active key, or None.

    The lookup is by hash in a unique index, so nothing secret is compared byte by byte in Python; the stored
    value is a hash an attacker cannot steer, which is what keeps timing from leaking the key.
    """
    if not _well_formed(plain):
        return None
    return await _active_key(session, hash_key(plain))


def _well_formed(plain: str) -> bool:
    return plain.startswith(KEY_PREFIX) and len(plain) <= 100


async def _active_key(database: AsyncSession | AsyncConnection, key_hash: str) -> KeyPrincipal | None:
    row = (
        await database.execute(
            select(ApiKey.id, ApiKey.name, ApiKey.scope).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
        )
    ).first()
    return KeyPrincipal(key_id=row.id, name=row.name, scope=row.scope) if row else None


class VerifiedKeys:
    """Keys this process found active within the last seconds, by hash, so most requests skip reading the key.

    Only active keys are remembered, so a key works the moment it is created; a revocation made in this process
    forgets its key at once, one made elsewhere (another worker, `loyalty keys revoke`) within the cache time.
    Entries are few (one per key in use), so the map is simply emptied should it ever grow past a bound.
    """

    MAX_ENTRIES = 10_000

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, KeyPrincipal]] = {}
        # When each key was last found active, whatever the cache time: the rate limiter's test of whether a key
        # is a real one (see `recently_verified`).
        self._verified_at: dict[str, float] = {}
        # Bumped by every revocation: a lookup that began before one must not put its (possibly revoked) key back.
        self.generation = 0

    def get(self, key_hash: str, max_age: float) -> KeyPrincipal | None:
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        verified_at, principal = entry
        if time.monotonic() - verified_at >= max_age:
            del self._entries[key_hash]
            return None
        return principal

    def found_active(self, key_hash: str) -> None:
        if len(self._verified_at) >= self.MAX_ENTRIES:
            self._verified_at.clear()
        self._verified_at[key_hash] = time.monotonic()

    def verified_within(self, key_hash: str, seconds: float) -> bool:
        verified_at = self._verified_at.get(key_hash)
        return verified_at is not None and time.monotonic() - verified_at < seconds

    def remember(self, key_hash: str, principal: KeyPrincipal, read_in_generation: int) -> None:
        if read_in_generation != self.generation:
            return
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries.clear()
        self._entries[key_hash] = (time.monotonic(), principal)

    def forget(self, key_id: int) -> None:
        self.generation += 1
        for key_hash in [h for h, (_at, principal) in self._entries.items() if principal.key_id == key_id]:
            del self._entries[key_hash]


# One per database this process talks to (tests run several apps side by side), dropped with its engine.
_verified_keys: weakref.WeakKeyDictionary[Engine, VerifiedKeys] = weakref.WeakKeyDictionary()


def _verified_keys_for(engine: AsyncEngine) -> VerifiedKeys:
    verified = _verified_keys.get(engine.sync_engine)
    if verified is None:
        verified = _verified_keys[engine.sync_engine] = VerifiedKeys()
    return verified


async def verify_key(engine: AsyncEngine, plain: str, cache_seconds: float) -> KeyPrincipal | None:
    """`authenticate_key` for every request: from memory when verified within ``cache_seconds``, else one read.

    The key is checked on each request before the request's own transaction exists; a cache hit saves a round
    trip to the database, which costs more than the rest of the check together.
    """
    if not _well_formed(plain):
        return None
    key_hash = hash_key(plain)
    verified = _verified_keys_for(engine)
    principal = verified.get(key_hash, cache_seconds) if cache_seconds > 0 else None
    if principal is None:
        generation = verified.generation
        async with single_statement(engine) as connection:
            principal = await _active_key(connection, key_hash)
        if principal is not None:
            verified.found_active(key_hash)
            if cache_seconds > 0:
                verified.remember(key_hash, principal, generation)
    return principal


def recently_verified(engine: AsyncEngine, key_hash: str, seconds: float) -> bool:
    """Whether this process found the key active within ``seconds``: a real key, as far as anyone can tell
    without a database read."""
    return _verified_keys_for(engine).verified_within(key_hash, seconds)
