"""Operations routes and cross-cutting HTTP behaviour: health, metrics, docs, request ids, limits, errors."""

from __future__ import annotations

from litestar.testing import AsyncTestClient
from sqlalchemy import text

from loyalty.app import create_app
from loyalty.db.session import create_engine


async def test_live_and_ready(client) -> None:
    assert (await client.get("/health/live")).json() == {"status": "ok"}
    ready = await client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["database"] == "reachable"


async def test_ready_is_503_when_the_database_is_behind(settings, engine) -> None:
    async with engine.begin() as connection:
        await connection.execute(text("UPDATE alembic_version SET version_num = 'older'"))
    try:
        async with AsyncTestClient(app=create_app(settings)) as client:
            response = await client.get("/health/ready")
        assert response.status_code == 503
        assert response.json()["migration"] == "older"
    finally:
        async with engine.begin() as connection:
            await connection.execute(text("UPDATE alembic_version SET version_num = (:head)"), {"head": _head()})


async def test_ready_is_503_when_the_database_is_unreachable(settings) -> None:
    unreachable = settings.model_copy(
        update={
            "database_url": "postgresql+asyncpg://nobody@127.0.0.1:1/none",
            "secret_key": settings.secret_key,
            "db_timeout_seconds": 2.0,
        }
    )
    async with AsyncTestClient(app=create_app(unreachable)) as client:
        response = await client.get("/health/ready")
    assert response.status_code == 503
    assert response.json()["database"] == "unreachable"


def _head() -> str:
    from loyalty.db.migrate import head_revision

    head = head_revision()
    assert head is not None
    return head


async def test_metrics_and_schema(client, storefront) -> None:
    await client.put("/v1/customers/c-1", json={}, headers=storefront)
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert "loyalty_requests_total" in metrics.text
    schema = await client.get("/schema/openapi.json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert {"/v1/orders", "/v1/orders/batch", "/v1/events", "/v1/referrals", "/health/ready"} <= set(paths)
    assert "/problems/refund-exceeds-total" in schema.json()["info"]["description"]
    ui = await client.get("/schema")
    assert ui.status_code == 200
    assert "/schema-assets/swagger-ui/swagger-ui-bundle.js" in ui.text
    bundle = await client.get("/schema-assets/swagger-ui/swagger-ui-bundle.js")
    assert bundle.status_code == 200
    assert bundle.headers["content-encoding"] == "gzip"
    assert bundle.headers["content-type"].startswith("text/javascript")
    assert "SwaggerUIBundle" in bundle.text
    css = await client.get("/schema-assets/swagger-ui/swagger-ui.css")
    assert css.headers["content-type"].startswith("text/css")
    for missing in ("nothing.js", "LICENSE", "..%2Fassets.py"):
        assert (await client.get(f"/schema-assets/swagger-ui/{missing}")).status_code == 404


async def test_request_id_is_echoed_or_made(client) -> None:
    given = await client.get("/health/live", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = await client.get("/health/live", headers={"X-Request-ID": "bad id with spaces"})
    assert len(made.headers["x-request-id"]) == 32


async def test_body_above_limit_is_413(client, storefront) -> None:
    response = await client.post(
        "/v1/orders", content=b"{" + b" " * 1_100_000 + b"}", headers={**storefront, "content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.headers["content-type"].startswith("application/problem+json")


async def test_unknown_route_and_method_are_problems(client, storefront) -> None:
    missing = await client.get("/v1/nothing-here", headers=storefront)
    assert missing.status_code == 404
    assert missing.json()["type"] == "/problems/not-found"
    wrong_method = await client.delete("/v1/orders", headers=storefront)
    assert wrong_method.status_code == 405
    assert wrong_method.headers["content-type"].startswith("application/problem+json")


async def test_problem_types_are_documented(client) -> None:
    listing = (await client.get("/problems")).json()["items"]
    assert {"type": "/problems/validation", "title": "Invalid request", "status": 422} in [
        {key: item[key] for key in ("type", "title", "status")} for item in listing
    ]
    assert (await client.get("/problems/referral-cycle")).json()["status"] == 422
    assert (await client.get("/problems/no-such-thing")).status_code == 404


async def test_rate_limit_per_key(settings, keys) -> None:
    limited = settings.model_copy(update={"rate_limit": 3})
    async with AsyncTestClient(app=create_app(limited)) as client:
        statuses = [
            (await client.put("/v1/customers/c-1", json={}, headers=keys.headers("storefront"))).status_code
            for _ in range(4)
        ]
        assert statuses[:3] == [201, 200, 200]
        assert statuses[3] == 429
        refused = await client.put("/v1/customers/c-1", json={}, headers=keys.headers("storefront"))
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert int(refused.headers["retry-after"]) >= 1
        # Another key has its own budget.
        other = await client.put("/v1/customers/c-1", json={}, headers=keys.headers("admin"))
        assert other.status_code == 200
        assert (await client.get("/health/live")).status_code == 200


def test_engine_factory_sets_sqlite_pragmas(settings) -> None:
    engine = create_engine(settings)
    assert engine.dialect.name in ("sqlite", "postgresql")
