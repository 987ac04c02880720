"""Checking API keys on every request: recently verified keys come from memory, for a bounded time."""

from __future__ import annotations

import asyncio

from litestar.testing import AsyncTestClient
from sqlalchemy import update

from loyalty.access.services import KeyPrincipal, VerifiedKeys, create_key, revoke_key, verify_key
from loyalty.app import create_app
from loyalty.db.models import ApiKey
from loyalty.db.session import transaction
from loyalty.lib.clock import utcnow


async def revoke_elsewhere(session_maker, key_id: int) -> None:
    """What `loyalty keys revoke` in another process does: the row changes, this process is not told."""
    async with transaction(session_maker) as session:
        await session.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=utcnow()))


async def test_verify_key_finds_active_keys_only(engine, session_maker) -> None:
    async with transaction(session_maker) as session:
        key, plain = await create_key(session, "checkout", "storefront")
    principal = await verify_key(engine, plain, cache_seconds=0)
    assert principal is not None
    assert (principal.key_id, principal.scope) == (key.id, "storefront")
    assert await verify_key(engine, "lty_" + "x" * 43, cache_seconds=5) is None
    assert await verify_key(engine, "not-a-key", cache_seconds=5) is None
    async with transaction(session_maker) as session:
        await revoke_key(session, key.id)
    assert await verify_key(engine, plain, cache_seconds=5) is None


async def test_a_key_revoked_elsewhere_is_taken_until_the_cache_time_has_passed(settings, session_maker) -> None:
    async with transaction(session_maker) as session:
        key, plain = await create_key(session, "checkout", "storefront")
    headers = {"X-API-Key": plain}
    long_cache = settings.model_copy(update={"api_key_cache_seconds": 30})
    short_cache = settings.model_copy(update={"api_key_cache_seconds": 0.3})
    async with (
        AsyncTestClient(app=create_app(long_cache)) as long_client,
        AsyncTestClient(app=create_app(short_cache)) as short_client,
    ):
        assert (await long_client.get("/v1/tiers", headers=headers)).status_code == 200
        assert (await short_client.get("/v1/tiers", headers=headers)).status_code == 200
        await revoke_elsewhere(session_maker, key.id)
        # The price of not reading the key on every request: this process takes it for the cache time.
        assert (await long_client.get("/v1/tiers", headers=headers)).status_code == 200
        await asyncio.sleep(0.4)
        assert (await short_client.get("/v1/tiers", headers=headers)).status_code == 401


async def test_without_a_cache_time_a_key_revoked_elsewhere_is_refused_at_once(settings, session_maker) -> None:
    async with transaction(session_maker) as session:
        key, plain = await create_key(session, "checkout", "storefront")
    uncached = settings.model_copy(update={"api_key_cache_seconds": 0})
    async with AsyncTestClient(app=create_app(uncached)) as client:
        headers = {"X-API-Key": plain}
        assert (await client.get("/v1/tiers", headers=headers)).status_code == 200
        await revoke_elsewhere(session_maker, key.id)
        assert (await client.get("/v1/tiers", headers=headers)).status_code == 401


async def test_a_new_key_works_at_once_though_an_unknown_one_was_just_tried(client, session_maker) -> None:
    # Only valid keys are remembered, so a refusal is never cached.
    unknown = await client.get("/v1/tiers", headers={"X-API-Key": "lty_" + "y" * 43})
    assert unknown.status_code == 401
    async with transaction(session_maker) as session:
        _key, plain = await create_key(session, "fresh", "storefront")
    assert (await client.get("/v1/tiers", headers={"X-API-Key": plain})).status_code == 200


async def test_a_check_during_a_revocation_does_not_keep_the_key(engine, session_maker) -> None:
    async with transaction(session_maker) as session:
        key, plain = await create_key(session, "checkout", "storefront")
    async with transaction(session_maker) as session:
        await revoke_key(session, key.id)
        # Not committed yet: a request checked now still reads the key as active, and remembers it...
        assert await verify_key(engine, plain, cache_seconds=5) is not None
    # ...until the revocation commits, which forgets it again in this process.
    assert await verify_key(engine, plain, cache_seconds=5) is None


def test_a_lookup_that_began_before_a_revocation_is_not_remembered() -> None:
    verified = VerifiedKeys()
    principal = KeyPrincipal(key_id=1, name="checkout", scope="storefront")
    began_in = verified.generation
    verified.forget(1)  # a revocation lands while the lookup is on its way back from the database
    verified.remember("hash", principal, began_in)
    assert verified.get("hash", 5) is None
    verified.remember("hash", principal, verified.generation)
    assert verified.get("hash", 5) == principal
