"""The per-key rate limit: a count per fixed window, announced in RateLimit headers, 429 with Retry-After past it."""

from __future__ import annotations

from litestar.testing import AsyncTestClient

from loyalty.app import create_app


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
