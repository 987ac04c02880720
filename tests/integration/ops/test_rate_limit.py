"""The per-key rate limit: a count per fixed window, announced in RateLimit headers, 429 with Retry-After past it."""

from __future__ import annotations

import time
from typing import Any

import pytest
from litestar.stores.file import FileStore
from litestar.testing import AsyncTestClient

from loyalty.access.services import hash_key
from loyalty.app import create_app
from loyalty.lib import middleware
from tests.integration.ops.test_secrets_not_logged import captured_logs


async def test_rate_limit_headers_count_down_and_refuse_past_the_limit(settings, keys) -> None:
    limited = settings.model_copy(update={"rate_limit": 3})
    async with AsyncTestClient(app=create_app(limited)) as client:
        headers = keys.headers("storefront")
        answers = [await client.get("/v1/tiers", headers=headers) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert [a.headers["ratelimit-remaining"] for a in answers] == ["2", "1", "0", "0"]
        for answer in answers:
            assert answer.headers["ratelimit-limit"] == "3"
            assert answer.headers["ratelimit-policy"] == "3; w=60"
            assert 0 < int(answer.headers["ratelimit-reset"]) <= 60
        assert 1 <= int(answers[3].headers["retry-after"]) <= 60
        # Operations routes are not counted.
        for _ in range(5):
            assert (await client.get("/health/live")).status_code == 200


def _assert_refused(response: Any) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"] == "/problems/rate-limited"
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert response.headers["x-request-id"]


async def test_one_key_at_its_limit_leaves_the_others_served(settings, keys, client) -> None:
    limited = settings.model_copy(update={"rate_limit": 3})
    async with AsyncTestClient(app=create_app(limited)) as limited_client:
        key_a, key_b, key_c = keys.headers("storefront"), keys.headers("marketing"), keys.headers("admin")
        for _ in range(3):
            assert (await limited_client.get("/v1/tiers", headers=key_a)).status_code == 200
        for _ in range(3):
            _assert_refused(await limited_client.get("/v1/tiers", headers=key_a))
            # Key B is served all the while, up to its own limit, and is then refused on its own account.
            assert (await limited_client.get("/v1/tiers", headers=key_b)).status_code == 200
        _assert_refused(await limited_client.get("/v1/tiers", headers=key_b))
        assert (await limited_client.get("/v1/tiers", headers=key_c)).status_code == 200
        # A refused request was refused before any work: key A's refusals wrote nothing and reached no handler.
        refused_write = await limited_client.put("/v1/customers/c-1", json={}, headers=key_a)
        _assert_refused(refused_write)
    assert (await client.get("/v1/customers/c-1", headers=keys.headers("marketing"))).status_code == 404


class _Clock:
    """The `time` module as the limiter reads it, standing at a chosen instant: a window ends without the test
    waiting for it, and no request crosses a second boundary by chance (windows count whole seconds)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return time.perf_counter()


async def test_the_window_resets(settings, keys, monkeypatch: pytest.MonkeyPatch) -> None:
    limited = settings.model_copy(update={"rate_limit": 2})
    # Mid-second: with the real clock, a first request late in a second left the window under 59 s (a flaky test).
    started = 1_000_000.5
    clock = _Clock(started)
    monkeypatch.setattr(middleware, "time", clock)
    async with AsyncTestClient(app=create_app(limited)) as client:
        headers = keys.headers("storefront")
        assert [(await client.get("/v1/tiers", headers=headers)).status_code for _ in range(3)] == [200, 200, 429]
        clock.now = started + 59
        _assert_refused(await client.get("/v1/tiers", headers=headers))
        clock.now = started + 61
        renewed = await client.get("/v1/tiers", headers=headers)
        assert renewed.status_code == 200
        assert renewed.headers["ratelimit-remaining"] == "1"
        assert int(renewed.headers["ratelimit-reset"]) == 60
        assert (await client.get("/v1/tiers", headers=headers)).status_code == 200
        _assert_refused(await client.get("/v1/tiers", headers=headers))


def _tier_requests(metrics: str, status: int) -> float:
    """`loyalty_requests_total` of GET /v1/tiers for one status (one registry serves every app in the process)."""
    labels = f'method="GET",path="/v1/tiers",status_code="{status}"'
    for line in metrics.splitlines():
        if line.startswith("loyalty_requests_total{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_refusal_is_logged_and_counted_as_429(settings, keys) -> None:
    limited = settings.model_copy(update={"rate_limit": 1})
    async with AsyncTestClient(app=create_app(limited)) as client:
        headers = keys.headers("storefront")
        before = (await client.get("/metrics")).text
        with captured_logs("loyalty.access") as logs:
            assert (await client.get("/v1/tiers", headers=headers)).status_code == 200
            refused = await client.get("/v1/tiers", headers=headers)
        _assert_refused(refused)
        after = (await client.get("/metrics")).text
    access = [line for line in logs.lines if '"path": "/v1/tiers"' in line]
    assert len(access) == 2
    assert '"status": 200' in access[0]
    # The client got a 429; the access log once said 500 and the metrics 200 (the refusal was raised past both).
    assert '"status": 429' in access[1]
    assert refused.headers["x-request-id"] in access[1]
    assert _tier_requests(after, 429) - _tier_requests(before, 429) == 1
    assert _tier_requests(after, 200) - _tier_requests(before, 200) == 1


async def test_made_up_keys_count_against_their_address_and_real_keys_keep_their_own(
    settings, keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    limited = settings.model_copy(update={"rate_limit": 3})
    async with AsyncTestClient(app=create_app(limited)) as client:
        real = keys.headers("storefront")
        assert (await client.get("/v1/tiers", headers=real)).status_code == 200
        # Each invented key would otherwise open a bucket of its own, and each costs a database read.
        lookups = 0
        counted_verify = middleware.verify_key

        async def counting_verify(*args: Any, **kwargs: Any) -> Any:
            nonlocal lookups
            lookups += 1
            return await counted_verify(*args, **kwargs)

        monkeypatch.setattr(middleware, "verify_key", counting_verify)
        made_up = [await client.get("/v1/tiers", headers={"X-API-Key": f"lty_invented{i}"}) for i in range(8)]
        assert [answer.status_code for answer in made_up] == [401, 401, 401] + [429] * 5
        _assert_refused(made_up[-1])
        # Past the address's window an invented key is refused before its lookup.
        assert lookups == 3
        # The real key, known to this process, still counts on its own: two of its three requests are left.
        assert [(await client.get("/v1/tiers", headers=real)).status_code for _ in range(3)] == [200, 200, 429]


async def test_a_shared_store_holds_the_windows_for_every_replica(settings, keys, tmp_path) -> None:
    """With a store other than the in-process one (Redis, say), the windows live there: replicas share them."""
    limited = settings.model_copy(update={"rate_limit": 3})
    shared = FileStore(tmp_path / "rate-limit", create_directories=True)
    replicas = [create_app(limited), create_app(limited)]
    for replica in replicas:
        replica.stores.register(middleware.RATE_LIMIT_STORE, shared, allow_override=True)
    headers = keys.headers("storefront")
    async with AsyncTestClient(app=replicas[0]) as first, AsyncTestClient(app=replicas[1]) as second:
        answers = [await first.get("/v1/tiers", headers=headers) for _ in range(2)]
        answers.append(await second.get("/v1/tiers", headers=headers))
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert [a.headers["ratelimit-remaining"] for a in answers] == ["2", "1", "0"]
        _assert_refused(await first.get("/v1/tiers", headers=headers))
        _assert_refused(await second.get("/v1/tiers", headers=headers))
    assert await shared.get(f"KeyRateLimitMiddleware::key:{hash_key(headers['X-API-Key'])[:32]}") is not None


async def test_ended_windows_are_dropped_once_many_are_held(settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process windows are bounded: past a count, the ones whose minute is over are swept."""
    monkeypatch.setattr(middleware.KeyRateLimiter, "SWEEP_AT", 4)
    app = create_app(settings)
    limiter = app.state.rate_limiter
    async with AsyncTestClient(app=app) as client:
        # Each bearer token is a bucket of its own (the tokens are invalid: 401, but counted all the same).
        for i in range(3):
            answer = await client.get("/v1/me", headers={"Authorization": f"Bearer made-up-{i}"})
            assert answer.headers["ratelimit-remaining"] == str(settings.rate_limit - 1)
        assert len(limiter._windows) == 3
        monkeypatch.setattr(middleware, "time", _Clock(time.time() + 61))
        await client.get("/v1/me", headers={"Authorization": "Bearer made-up-3"})
        assert len(limiter._windows) == 1
        # A window swept away starts afresh: nothing of the old count is left.
        renewed = await client.get("/v1/me", headers={"Authorization": "Bearer made-up-0"})
        assert renewed.headers["ratelimit-remaining"] == str(settings.rate_limit - 1)
