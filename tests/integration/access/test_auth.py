"""Who may call what: keys and scopes, revocation, customer tokens on the wrong routes, keys at rest."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from loyalty.access.services import hash_key, revoke_key
from loyalty.cli import main
from loyalty.db.models import ApiKey
from loyalty.db.session import transaction
from loyalty.settings import get_settings

ORDER = {
    "order_id": "o-1",
    "customer_id": "c-1",
    "placed_at": "2026-03-01T10:00:00Z",
    "total": "10.00",
    "currency": "USD",
}


async def test_missing_and_unknown_keys_are_401(client) -> None:
    missing = await client.post("/v1/orders", json=ORDER)
    assert missing.status_code == 401
    assert missing.headers["content-type"].startswith("application/problem+json")
    assert missing.json()["type"] == "/problems/unauthenticated"
    unknown = await client.post("/v1/orders", json=ORDER, headers={"X-API-Key": "lty_" + "x" * 43})
    assert unknown.status_code == 401


async def test_wrong_scope_is_403_and_admin_holds_every_scope(client, keys) -> None:
    forbidden = await client.post("/v1/orders", json=ORDER, headers=keys.headers("marketing"))
    assert forbidden.status_code == 403
    assert forbidden.json()["type"] == "/problems/forbidden"
    assert (await client.post("/v1/orders", json=ORDER, headers=keys.headers("admin"))).status_code == 201


async def test_revoked_key_is_401_at_once(client, keys, session_maker) -> None:
    assert (await client.post("/v1/orders", json=ORDER, headers=keys.headers("storefront"))).status_code == 201
    async with session_maker() as session:
        key_id = await session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(keys.storefront)))
    async with transaction(session_maker) as session:
        assert await revoke_key(session, key_id)
    assert (await client.post("/v1/orders", json=ORDER, headers=keys.headers("storefront"))).status_code == 401


async def test_keys_are_stored_only_as_hashes(keys, session_maker) -> None:
    async with session_maker() as session:
        stored = (await session.scalars(select(ApiKey))).all()
    plain = {keys.storefront, keys.marketing, keys.admin}
    assert {key.key_hash for key in stored} == {hash_key(p) for p in plain}
    for key in stored:
        for column in ApiKey.__table__.columns:
            value = str(getattr(key, column.key))
            assert not any(secret in value for secret in plain), column.key


async def test_customer_token_is_the_wrong_credential_for_key_routes(client, storefront) -> None:
    await client.put("/v1/customers/c-1", json={}, headers=storefront)
    token = (await client.post("/v1/customers/c-1/token", headers=storefront)).json()["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    for method, path, body in [
        ("POST", "/v1/orders", ORDER),
        ("PUT", "/v1/customers/c-1", {}),
        ("POST", "/v1/customers/c-1/token", None),
        ("POST", "/v1/events", {"events": []}),
    ]:
        response = await client.request(method, path, json=body, headers=bearer)
        assert response.status_code == 401, (path, response.text)
        assert "customer token" in response.json()["detail"]


def test_cli_keys_create_list_revoke(settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOYALTY_DATABASE_URL", settings.database_url)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        created = runner.invoke(main, ["keys", "create", "--name", "checkout", "--scope", "storefront"])
        assert created.exit_code == 0, created.output
        last_line = created.output.strip().splitlines()[-1]
        assert last_line.startswith("lty_")
        assert len(last_line) >= 40
        listed = runner.invoke(main, ["keys", "list"])
        assert "checkout" in listed.output
        assert last_line not in listed.output
        key_id = next(line.split()[0] for line in listed.output.splitlines() if "checkout" in line)
        assert runner.invoke(main, ["keys", "revoke", key_id]).exit_code == 0
        assert "revoked" in runner.invoke(main, ["keys", "list"]).output
        assert runner.invoke(main, ["keys", "revoke", key_id]).exit_code != 0
        bad_scope = runner.invoke(main, ["keys", "create", "--name", "x", "--scope", "root"])
        assert bad_scope.exit_code != 0
    finally:
        get_settings.cache_clear()
