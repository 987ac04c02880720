"""Hostile input: every case is a 4xx problem naming the field, or text stored verbatim and read back identical;
never a 500, and a refused request writes nothing (every table's row count is the same before and after).

Bodies over the limit, JSON nested thousands deep, batches over their maximum, SQL-looking text, NUL, unpaired
surrogates, bytes that are not UTF-8, combining marks, right-to-left text, 4-byte emoji, ids at the column limit,
absurd numbers and timestamps out of range.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import func, inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine

from loyalty.access.services import create_key
from loyalty.activity.schemas import MAX_BATCH
from loyalty.app import create_app
from loyalty.db.base import Base
from loyalty.db.session import create_engine, create_session_maker, transaction
from loyalty.settings import PROJECT_ROOT, Settings
from tests.conftest import TEST_SECRET
from tests.support import running_server

EXTREME_TIMES = ["0001-01-01T00:30:00+01:00", "9999-12-31T23:30:00-01:00", "1969-12-31T23:59:59Z"]
ITEM = {"sku": "SKU-1", "category": "tops", "quantity": 1, "unit_price": "10.00"}
ORDER = {
    "order_id": "o-1",
    "customer_id": "c-1",
    "placed_at": "2026-01-01T00:00:00Z",
    "total": "10.00",
    "currency": "USD",
    "items": [ITEM],
}
SQL_TEXTS = ["'; DROP TABLE orders;--", "x'); DROP TABLE customer_order; --", "1' OR '1'='1", '" OR ""="', "%_\\"]
TOO_BIG_FOR_64_BITS = str(2**64)


async def row_counts(engine: AsyncEngine) -> dict[str, int]:
    """Every table's row count, in one statement."""
    tables = Base.metadata.sorted_tables
    counts = select(*(select(func.count()).select_from(table).scalar_subquery() for table in tables))
    async with engine.connect() as connection:
        row = (await connection.execute(counts)).one()
    return {table.name: count for table, count in zip(tables, row, strict=True)}


@asynccontextmanager
async def nothing_written(engine: AsyncEngine, case: object) -> AsyncIterator[None]:
    before = await row_counts(engine)
    yield
    after = await row_counts(engine)
    assert after == before, (
        case,
        {name: (before[name], after[name]) for name in before if before[name] != after[name]},
    )


def assert_problem(response: httpx.Response, status: int, field: str | None, case: object = "") -> dict[str, Any]:
    """A problem document with this status, naming ``field`` among its errors (malformed bodies name none)."""
    assert response.status_code == status, (case, response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/problem+json"), case
    problem = dict(response.json())
    if field is not None:
        assert field in [error["field"] for error in problem.get("errors", [])], (case, problem)
    return problem


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


# ---------------------------------------------------------------- timestamps, cursors, ids, control characters


@pytest.mark.parametrize("instant", EXTREME_TIMES)
async def test_timestamps_out_of_range(client, keys, engine, instant: str) -> None:
    storefront, marketing = keys.headers("storefront"), keys.headers("marketing")
    order = {**ORDER, "placed_at": instant}
    async with nothing_written(engine, instant):
        assert_problem(await client.post("/v1/orders", json=order, headers=storefront), 422, "placed_at")
        batch = await client.post("/v1/orders/batch", json={"orders": [order]}, headers=storefront)
        assert batch.status_code == 200
        assert batch.json()["results"][0]["status"] == 422
        event = {"event_id": "e", "customer_id": "c", "type": "review", "target": "p", "occurred_at": instant}
        events = (await client.post("/v1/events", json={"events": [event]}, headers=storefront)).json()
        assert events["rejected"][0]["problem"]["errors"][0]["field"] == "events[0].occurred_at"
        joined = await client.put("/v1/customers/c", json={"joined_at": instant}, headers=storefront)
        assert_problem(joined, 422, "joined_at")
        referral = {"referrer_id": "a", "referee_id": "b", "occurred_at": instant}
        assert_problem(await client.post("/v1/referrals", json=referral, headers=storefront), 422, "occurred_at")
        recalc = await client.post("/v1/recalculations", json={"as_of": instant}, headers=marketing)
        assert_problem(recalc, 422, "as_of")
        campaign = {"name": "c", "offer_id": 1, "tiers": ["vip"], "send_at": instant, "holdout_pct": 0}
        assert_problem(await client.post("/v1/campaigns", json=campaign, headers=marketing), 422, "send_at")
    await client.put("/v1/customers/c", json={}, headers=storefront)
    assert (await client.post("/v1/orders", json=ORDER, headers=storefront)).status_code == 201
    async with nothing_written(engine, instant):
        refund = {"refund_id": "r", "amount": "1.00", "refunded_at": instant}
        assert_problem(await client.post("/v1/orders/o-1/refunds", json=refund, headers=storefront), 422, "refunded_at")
        pin = {"tier": "vip", "until": instant, "reason": "x"}
        assert_problem(await client.put("/v1/customers/c/tier-pin", json=pin, headers=marketing), 422, "until")
    # A campaign planned for the year 9999, even at an instant that fits in UTC, is a typo.
    offer = await client.post("/v1/offers", json={"name": "o", "kind": "gift", "valid_days": 3}, headers=marketing)
    campaign = {**campaign, "offer_id": offer.json()["offer_id"], "send_at": "9999-12-31T23:59:59Z"}
    async with nothing_written(engine, "year 9999"):
        assert_problem(await client.post("/v1/campaigns", json=campaign, headers=marketing), 422, "send_at")


@pytest.mark.parametrize("cursor", [_cursor("²"), _cursor("9" * 30), _cursor("-5"), "%%%", "x" * 199])
async def test_cursors_we_did_not_make(client, keys, cursor: str) -> None:
    marketing = keys.headers("marketing")
    for path in ("/v1/customers", "/v1/recalculations", "/v1/offers", "/v1/campaigns"):
        response = await client.get(path, params={"cursor": cursor}, headers=marketing)
        assert response.status_code == 422, (path, response.text)
        assert response.json()["errors"][0]["field"] == "cursor"


@pytest.mark.parametrize("path", ["/v1/recalculations/99999999999999999999", "/v1/recalculations/0", "/v1/offers/-1"])
async def test_ids_out_of_range(client, keys, path: str) -> None:
    response = await client.get(path, headers=keys.headers("marketing"))
    assert response.status_code in (400, 404, 422), response.text
    assert response.headers["content-type"].startswith("application/problem+json")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/customers/a%00b/tier"),
        ("PUT", "/v1/customers/a%00b"),
        ("POST", "/v1/customers/a%01b/token"),
        ("POST", "/v1/orders/a%00b/refunds"),
        ("GET", "/v1/customers/a%00b"),
    ],
)
async def test_control_characters_in_path_ids(client, keys, method: str, path: str) -> None:
    body = {"refund_id": "r", "amount": "1.00", "refunded_at": "2026-01-01T00:00:00Z"} if "refunds" in path else {}
    response = await client.request(method, path, json=body if method != "GET" else None, headers=keys.headers("admin"))
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/problem+json")


async def test_control_characters_and_odd_amounts_in_bodies(client, keys) -> None:
    storefront = keys.headers("storefront")
    assert (
        await client.put("/v1/customers/c", json={"email": "a\u0000b@example.com"}, headers=storefront)
    ).status_code == 422
    order = {
        "order_id": "o\u0000",
        "customer_id": "c",
        "placed_at": "2026-01-01T00:00:00Z",
        "total": "1.00",
        "currency": "USD",
    }
    assert (await client.post("/v1/orders", json=order, headers=storefront)).status_code == 422
    zero = await client.post("/v1/orders", json={**order, "order_id": "o-zero", "total": "-0"}, headers=storefront)
    assert zero.status_code == 201
    assert zero.json()["total"] == "0.00"
    huge = await client.post("/v1/orders", json={**order, "order_id": "o-huge", "total": "1e15"}, headers=storefront)
    assert huge.status_code == 422


# ---------------------------------------------------------------- oversized bodies and batches


def _batch(count: int) -> dict[str, Any]:
    return {"orders": [{**ORDER, "order_id": f"o-{n}", "customer_id": f"c-{n}"} for n in range(count)]}


def test_the_body_limit_is_a_setting_and_a_full_batch_fits_under_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOYALTY_MAX_BODY_BYTES", raising=False)
    default = Settings(_env_file=None).max_body_bytes  # type: ignore[call-arg]
    assert default == 1_048_576  # LOYALTY_MAX_BODY_BYTES, as API.md and the README document it
    # The documented batch maximum must be reachable: 1000 orders with an item each, ids of 36 characters.
    full = {"orders": [{**ORDER, "order_id": f"{n:036d}", "customer_id": f"{n:036d}"} for n in range(MAX_BATCH)]}
    assert len(json.dumps(full).encode()) < default


async def test_a_body_over_the_limit_is_413_and_writes_nothing(settings, keys, engine) -> None:
    limit = 4096
    async with AsyncTestClient(app=create_app(settings.model_copy(update={"max_body_bytes": limit}))) as client:
        headers = {**keys.headers("storefront"), "content-type": "application/json"}
        over = json.dumps(_batch(40)).encode()
        assert len(over) > limit
        async with nothing_written(engine, "batch over the limit"):
            problem = assert_problem(await client.post("/v1/orders/batch", content=over, headers=headers), 413, None)
            assert problem["type"] == "/problems/body-too-large"
            attributes = {"attributes": {f"k{n}": "v" * 200 for n in range(25)}}
            put = await client.put("/v1/customers/c-1", content=json.dumps(attributes), headers=headers)
            assert_problem(put, 413, None)
        # At the limit exactly, the body is read.
        at_limit = b'{"orders": []}'.ljust(limit)
        assert (await client.post("/v1/orders/batch", content=at_limit, headers=headers)).status_code == 200
        assert (await client.post("/v1/orders/batch", content=at_limit + b" ", headers=headers)).status_code == 413


async def test_a_streamed_body_over_the_limit_is_413_from_a_real_server(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a Content-Length (chunked), the limit holds as the body streams in; the test client cannot stream.

    The limit is the server's, not the database's: one embedded database (which `serve` migrates) serves.
    """
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'loyalty.db'}",
        secret_key=TEST_SECRET,
        tiers_file=PROJECT_ROOT / "config" / "tiers.toml",
        _env_file=None,  # type: ignore[call-arg]
    )
    monkeypatch.setenv("LOYALTY_MAX_BODY_BYTES", "4096")
    body = json.dumps(_batch(40)).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    async with running_server(settings, tmp_path / "serve.log") as base, httpx.AsyncClient(base_url=base) as client:
        engine = create_engine(settings)
        try:
            async with transaction(create_session_maker(engine)) as session:
                _key, key = await create_key(session, "checkout", "storefront")
            headers = {"X-API-Key": key, "content-type": "application/json"}
            async with nothing_written(engine, "streamed batch"):
                response = await client.post("/v1/orders/batch", content=chunks(), headers=headers)
                assert "content-length" not in response.request.headers
                assert_problem(response, 413, None)
            assert (await client.post("/v1/orders/batch", json=_batch(1), headers=headers)).status_code == 200
        finally:
            await engine.dispose()


async def test_batches_over_their_maximum_are_refused_whole(client, keys, engine) -> None:
    storefront, marketing, admin = keys.headers("storefront"), keys.headers("marketing"), keys.headers("admin")
    event = {
        "event_id": "e",
        "customer_id": "c",
        "type": "review",
        "target": "p",
        "occurred_at": "2026-01-01T00:00:00Z",
    }
    items = [{"sku": f"S{n}", "quantity": 1, "unit_price": "0.01"} for n in range(MAX_BATCH + 1)]
    cases = [
        ("POST", "/v1/orders/batch", _batch(MAX_BATCH + 1), storefront, "orders"),
        (
            "POST",
            "/v1/events",
            {"events": [{**event, "event_id": f"e-{n}"} for n in range(MAX_BATCH + 1)]},
            storefront,
            "events",
        ),
        ("POST", "/v1/orders", {**ORDER, "total": "10.01", "items": items}, storefront, "items"),
        ("POST", "/v1/webhooks", {"url": "https://h.example/x", "events": ["tier.changed"] * 4}, admin, "events"),
        (
            "POST",
            "/v1/campaigns",
            {"name": "c", "offer_id": 1, "tiers": ["vip"] * 5, "send_at": "2030-01-01T00:00:00Z", "holdout_pct": 0},
            marketing,
            "tiers",
        ),
        ("GET", "/v1/customers?limit=501", None, marketing, "limit"),
    ]
    for method, path, body, headers, field in cases:
        async with nothing_written(engine, path):
            response = await client.request(method, path, json=body, headers=headers)
            assert_problem(response, 422, field, path)


# ---------------------------------------------------------------- nesting


def _nested_array(depth: int, leaf: str = '"x"') -> str:
    return "[" * depth + leaf + "]" * depth


def _nested_object(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


NESTED_BODIES = [
    ("POST", "/v1/orders", "storefront", lambda d: '{"order_id": ' + _nested_array(d) + "}"),
    ("PUT", "/v1/customers/c-1", "storefront", lambda d: '{"attributes": {"k": ' + _nested_object(d) + "}}"),
    ("POST", "/v1/orders/batch", "storefront", lambda d: '{"orders": [' + _nested_array(d, "{}") + "]}"),
    ("POST", "/v1/events", "storefront", lambda d: '{"events": ' + _nested_array(d, "{}") + "}"),
    ("POST", "/v1/tiers/preview", "marketing", lambda d: '{"tier": ' + _nested_array(d, "{}") + "}"),
    ("POST", "/v1/campaigns", "marketing", lambda d: '{"filters": ' + _nested_object(d) + "}"),
    ("POST", "/v1/webhooks", "admin", lambda d: '{"url": "https://h.example/x", "events": ' + _nested_array(d) + "}"),
]


async def test_deeply_nested_json_is_a_400_not_a_recursion_error(client, keys, engine) -> None:
    for method, path, scope, body in NESTED_BODIES:
        headers = {**keys.headers(scope), "content-type": "application/json"}
        for depth in (2_000, 10_000, 100_000):
            async with nothing_written(engine, (path, depth)):
                response = await client.request(method, path, content=body(depth), headers=headers)
                problem = assert_problem(response, 400, None, (path, depth))
                assert problem["type"] == "/problems/malformed-request"
                assert "nested too deeply" in problem["detail"]
        # Shallow enough to decode, the same shape is an invalid field, named.
        async with nothing_written(engine, (path, 50)):
            response = await client.request(method, path, content=body(50), headers=headers)
            assert response.status_code in (200, 202, 422), (path, response.text)
            assert "errors" in json.dumps(response.json())


# ---------------------------------------------------------------- SQL-looking text


async def test_sql_looking_text_is_stored_verbatim_and_the_tables_stay(client, keys, engine) -> None:
    storefront, marketing = keys.headers("storefront"), keys.headers("marketing")
    for n, sql in enumerate(SQL_TEXTS):
        path = f"/v1/customers/{quote(sql, safe='')}"
        assert (await client.put(path, json={"attributes": {sql: sql}}, headers=storefront)).status_code == 201
        order = {
            **ORDER,
            "order_id": sql,
            "customer_id": sql,
            "channel": sql,
            "items": [{"sku": sql, "category": sql, "quantity": 1, "unit_price": "10.00"}],
        }
        created = await client.post("/v1/orders", json=order, headers=storefront)
        assert created.status_code == 201, created.text
        assert {key: created.json()[key] for key in ("order_id", "customer_id", "channel")} == dict.fromkeys(
            ("order_id", "customer_id", "channel"), sql
        )
        assert created.json()["items"][0]["sku"] == sql
        assert (await client.post("/v1/orders", json=order, headers=storefront)).status_code == 200
        event = {
            "event_id": sql,
            "customer_id": sql,
            "type": "review",
            "target": sql,
            "occurred_at": ORDER["placed_at"],
        }
        assert (await client.post("/v1/events", json={"events": [event]}, headers=storefront)).json()["accepted"] == 1
        customer = (await client.get(path, headers=marketing)).json()
        assert (customer["customer_id"], customer["attributes"]) == (sql, {sql: sql})
        offer = await client.post(
            "/v1/offers", json={"name": f"{n} {sql}", "kind": "gift", "valid_days": 3}, headers=marketing
        )
        assert offer.status_code == 201, offer.text
        read = await client.get(f"/v1/offers/{offer.json()['offer_id']}", headers=marketing)
        assert read.json()["name"] == f"{n} {sql}"
        pin = {"tier": "vip", "until": "2030-01-01T00:00:00Z", "reason": sql}
        assert (await client.put(f"{path}/tier-pin", json=pin, headers=marketing)).status_code == 200
        async with nothing_written(engine, sql):
            listed = await client.get("/v1/customers", params={"tier": sql}, headers=marketing)
            assert_problem(listed, 422, "tier", sql)
            code = await client.get(f"/v1/codes/{quote(sql, safe='')}", params={"customer_id": sql}, headers=storefront)
            assert code.status_code in (404, 422), code.text
            redeem = {"code": sql[:32], "customer_id": sql, "order_id": sql, "order_total": "1.00"}
            assert_problem(await client.post("/v1/redemptions", json=redeem, headers=storefront), 404, "code")
    async with engine.connect() as connection:
        tables = set(await connection.run_sync(lambda sync: inspect(sync).get_table_names()))
    assert {table.name for table in Base.metadata.sorted_tables} <= tables
    counts = await row_counts(engine)
    assert (counts["customer"], counts["customer_order"], counts["order_item"]) == (len(SQL_TEXTS),) * 3
    assert (counts["interaction_event"], counts["offer"]) == (len(SQL_TEXTS),) * 2


# ---------------------------------------------------------------- unicode


NUL = "a\u0000b"
NUL_CASES = [
    ("PUT", "/v1/customers/c-1", "storefront", {"referred_by": NUL}, "referred_by"),
    ("PUT", "/v1/customers/c-1", "storefront", {"email": f"{NUL}@example.com"}, "email"),
    ("POST", "/v1/orders", "storefront", {**ORDER, "customer_id": NUL}, "customer_id"),
    ("POST", "/v1/orders", "storefront", {**ORDER, "channel": NUL}, "channel"),
    ("POST", "/v1/orders", "storefront", {**ORDER, "items": [{**ITEM, "sku": NUL}]}, "items[0].sku"),
    (
        "POST",
        "/v1/orders",
        "storefront",
        {**ORDER, "items": [{**ITEM, "category": NUL}]},
        "items[0].category",
    ),
    (
        "POST",
        "/v1/orders/o-1/refunds",
        "storefront",
        {"refund_id": NUL, "amount": "1.00", "refunded_at": "2026-01-02T00:00:00Z"},
        "refund_id",
    ),
    (
        "POST",
        "/v1/referrals",
        "storefront",
        {"referrer_id": NUL, "referee_id": "c-2", "occurred_at": "2026-01-02T00:00:00Z"},
        "referrer_id",
    ),
    (
        "POST",
        "/v1/redemptions",
        "storefront",
        {"code": NUL, "customer_id": "c-1", "order_id": "o-9", "order_total": "1.00"},
        "code",
    ),
    (
        "POST",
        "/v1/redemptions",
        "storefront",
        {"code": "AB", "customer_id": NUL, "order_id": "o-9", "order_total": "1.00"},
        "customer_id",
    ),
    ("POST", "/v1/offers", "marketing", {"name": NUL, "kind": "gift", "valid_days": 3}, "name"),
    (
        "POST",
        "/v1/campaigns",
        "marketing",
        {"name": NUL, "offer_id": 1, "tiers": ["vip"], "send_at": "2030-01-01T00:00:00Z", "holdout_pct": 0},
        "name",
    ),
    (
        "PUT",
        "/v1/customers/c-1/tier-pin",
        "marketing",
        {"tier": "vip", "until": "2030-01-01T00:00:00Z", "reason": NUL},
        "reason",
    ),
    ("POST", "/v1/webhooks", "admin", {"url": f"https://h.example/{NUL}", "events": ["tier.changed"]}, "url"),
]


async def test_nul_in_text_is_a_422_naming_the_field(client, keys, engine) -> None:
    """PostgreSQL text cannot hold NUL: it must be refused as input, not fail in the database as a 500."""
    storefront = keys.headers("storefront")
    await client.put("/v1/customers/c-1", json={}, headers=storefront)
    assert (await client.post("/v1/orders", json=ORDER, headers=storefront)).status_code == 201
    for method, path, scope, body, field in NUL_CASES:
        async with nothing_written(engine, (path, field)):
            response = await client.request(method, path, json=body, headers=keys.headers(scope))
            assert_problem(response, 422, field, (path, field))
    async with nothing_written(engine, "query and items"):
        check = await client.get("/v1/codes/AB", params={"customer_id": NUL}, headers=storefront)
        assert_problem(check, 422, "customer_id")
        event = {
            "event_id": "e",
            "customer_id": "c",
            "type": "review",
            "target": NUL,
            "occurred_at": ORDER["placed_at"],
        }
        events = (await client.post("/v1/events", json={"events": [event]}, headers=storefront)).json()
        assert events["rejected"][0]["problem"]["errors"][0]["field"] == "events[0].target"
        batch = await client.post("/v1/orders/batch", json={"orders": [{**ORDER, "order_id": NUL}]}, headers=storefront)
        assert batch.json()["results"][0]["status"] == 422
        assert batch.json()["results"][0]["problem"]["errors"][0]["field"] == "orders[0].order_id"


async def test_unpaired_surrogates_and_bytes_that_are_not_utf8_are_a_400(client, keys, engine) -> None:
    headers = {**keys.headers("storefront"), "content-type": "application/json"}
    rest = b', "customer_id": "c", "placed_at": "2026-01-01T00:00:00Z", "total": "1.00", "currency": "USD"}'
    for order_id in (b'"\\ud800"', b'"a\\udc00b"', b'"\\ud800\\u0041"', b'"\xed\xa0\x80"', b'"\xff"', b'"\xc0\xaf"'):
        async with nothing_written(engine, order_id):
            problem = assert_problem(
                await client.post("/v1/orders", content=b'{"order_id": ' + order_id + rest, headers=headers), 400, None
            )
            assert problem["type"] == "/problems/malformed-request", order_id
            attributes = b'{"attributes": {"k": ' + order_id + b"}}"
            assert_problem(await client.put("/v1/customers/c", content=attributes, headers=headers), 400, None)


UNICODE_IDS = [
    "e\u0301\u0301\u0301",  # combining marks piled on one letter
    "\u00e9",  # é precomposed: a different id from e + U+0301, never normalised into it
    "e\u0301",
    "\u202egnp.exe",  # a right-to-left override
    "\u05e9\u05dc\u05d5\u05dd-\u0645\u0631\u062d\u0628\u0627",  # Hebrew and Arabic
    "\U0001f469\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466",  # 4-byte emoji joined by ZWJ
    "\ufeffbom",
    "\uffff",
    "\U0001f600" * 255,  # the 255-character limit in 4-byte characters (1020 bytes)
]


async def test_unicode_ids_are_stored_and_read_back_verbatim(client, keys, engine) -> None:
    storefront, marketing = keys.headers("storefront"), keys.headers("marketing")
    for n, text in enumerate(UNICODE_IDS):
        path = f"/v1/customers/{quote(text, safe='')}"
        put = await client.put(path, json={"attributes": {"name": text}}, headers=storefront)
        assert put.status_code == 201, (text, put.text)
        order = {**ORDER, "order_id": f"o-{n}", "customer_id": text, "items": [{**ITEM, "sku": text}]}
        created = await client.post("/v1/orders", json=order, headers=storefront)
        assert created.status_code == 201, (text, created.text)
        assert (created.json()["customer_id"], created.json()["items"][0]["sku"]) == (text, text)
        assert (await client.post("/v1/orders", json=order, headers=storefront)).status_code == 200
        customer = (await client.get(path, headers=marketing)).json()
        assert (customer["customer_id"], customer["attributes"]["name"]) == (text, text)
        assert (await client.get(f"{path}/tier", headers=storefront)).json()["customer_id"] == text
    assert (await row_counts(engine))["customer"] == len(UNICODE_IDS)
    too_long = "\U0001f600" * 256
    async with nothing_written(engine, "256 characters"):
        assert_problem(
            await client.post("/v1/orders", json={**ORDER, "customer_id": too_long}, headers=storefront),
            422,
            "customer_id",
        )
        put = await client.put(f"/v1/customers/{quote(too_long)}", json={}, headers=storefront)
        assert_problem(put, 422, "customer_id")


async def test_nul_in_free_attributes_is_stored_and_read_back_verbatim(client, keys) -> None:
    """Attributes are a JSON document, where NUL is an escape like any other: kept, not refused."""
    attributes = {"a\u0000b": "c\u0000d"}
    assert (
        await client.put("/v1/customers/c-1", json={"attributes": attributes}, headers=keys.headers("storefront"))
    ).status_code == 201
    customer = (await client.get("/v1/customers/c-1", headers=keys.headers("marketing"))).json()
    assert customer["attributes"] == attributes


# ---------------------------------------------------------------- absurd numbers


NUMBER = "<number>"
CAMPAIGN = {"name": "c", "tiers": ["vip"], "send_at": "2030-01-01T00:00:00Z", "offer_id": 1}
# (method, path, scope, field, body with NUMBER where the number goes, the numbers: raw JSON text)
NUMBER_FIELDS: list[tuple[str, str, str, str, dict[str, Any], list[str]]] = [
    ("POST", "/v1/orders", "storefront", "total", {**ORDER, "order_id": "o-2", "items": [], "total": NUMBER},
     ["1e308", "-1e308", '"1e308"', '"NaN"', '"Infinity"', '"-Infinity"', '"sNaN"', "1e-400", '"1e-400"',
      TOO_BIG_FOR_64_BITS, f'"{TOO_BIG_FOR_64_BITS}"', '"-1"', "12.5"]),
    ("POST", "/v1/orders", "storefront", "items[0].quantity",
     {**ORDER, "order_id": "o-2", "items": [{"sku": "S", "quantity": NUMBER, "unit_price": "10.00"}]},
     ["1e308", TOO_BIG_FOR_64_BITS, f"-{TOO_BIG_FOR_64_BITS}", '"NaN"', "1e-400", "1.5", '"-0"', "0"]),
    ("POST", "/v1/orders/o-1/refunds", "storefront", "amount",
     {"refund_id": "r", "refunded_at": "2026-01-02T00:00:00Z", "amount": NUMBER},
     ["1e308", '"NaN"', '"Infinity"', TOO_BIG_FOR_64_BITS, '"0"', '"-0"']),
    ("POST", "/v1/offers", "marketing", "valid_days", {"name": "n", "kind": "gift", "valid_days": NUMBER},
     ["1e308", TOO_BIG_FOR_64_BITS, f"-{TOO_BIG_FOR_64_BITS}", '"NaN"', "1e-400", "0"]),
    ("POST", "/v1/offers", "marketing", "uses_per_code",
     {"name": "n", "kind": "gift", "valid_days": 1, "uses_per_code": NUMBER},
     [TOO_BIG_FOR_64_BITS, "1e308", '"Infinity"']),
    ("POST", "/v1/offers", "marketing", "value", {"name": "n", "kind": "amount_off", "valid_days": 1, "value": NUMBER},
     ["1e308", '"1e308"', '"NaN"', TOO_BIG_FOR_64_BITS, "1e-400"]),
    ("POST", "/v1/campaigns", "marketing", "offer_id", {**CAMPAIGN, "offer_id": NUMBER},
     [TOO_BIG_FOR_64_BITS, f'"{TOO_BIG_FOR_64_BITS}"', "1e308", '"NaN"', "-1", "1.5"]),
    ("POST", "/v1/campaigns", "marketing", "holdout_pct", {**CAMPAIGN, "holdout_pct": NUMBER},
     ["1e308", "-1e308", '"NaN"', '"Infinity"', TOO_BIG_FOR_64_BITS]),
    ("POST", "/v1/campaigns", "marketing", "filters.min_value_score",
     {**CAMPAIGN, "filters": {"min_value_score": NUMBER}}, ["1e308", '"NaN"', "-1", TOO_BIG_FOR_64_BITS]),
    ("PUT", "/v1/customers/c-1", "storefront", "attributes", {"attributes": {"k": NUMBER}},
     ["1e308", "-1e308", "1e15"]),
    ("POST", "/v1/redemptions", "storefront", "order_total",
     {"code": "AB", "customer_id": "c", "order_id": "o", "order_total": NUMBER},
     ["1e308", '"NaN"', TOO_BIG_FOR_64_BITS, '"-1"']),
]  # fmt: skip


def with_number(body: dict[str, Any], number: str) -> bytes:
    return json.dumps(body).replace(json.dumps(NUMBER), number).encode()


async def test_absurd_numbers_in_bodies_are_a_422_naming_the_field(client, keys, engine) -> None:
    storefront = keys.headers("storefront")
    assert (await client.post("/v1/orders", json=ORDER, headers=storefront)).status_code == 201
    for method, path, scope, field, body, numbers in NUMBER_FIELDS:
        headers = {**keys.headers(scope), "content-type": "application/json"}
        for number in numbers:
            async with nothing_written(engine, (field, number)):
                response = await client.request(method, path, content=with_number(body, number), headers=headers)
                assert_problem(response, 422, field, (path, field, number))
        # Not JSON at all (JSON has no NaN, no Infinity, no number beyond a double): malformed, no field to name.
        for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
            async with nothing_written(engine, (field, literal)):
                response = await client.request(method, path, content=with_number(body, literal), headers=headers)
                assert_problem(response, 400, None, (path, field, literal))


async def test_absurd_numbers_in_queries_and_paths_are_a_422_naming_them(client, keys) -> None:
    storefront, marketing, admin = keys.headers("storefront"), keys.headers("marketing"), keys.headers("admin")
    for number in (TOO_BIG_FOR_64_BITS, "99999999999999999999999999999", "-1", "0", "1e308", "NaN", "-0"):
        for path in ("/v1/customers", "/v1/offers", "/v1/campaigns", "/v1/recalculations"):
            assert_problem(await client.get(path, params={"limit": number}, headers=marketing), 422, "limit", number)
    for number in (TOO_BIG_FOR_64_BITS, "1e308", "NaN", "-1", "Infinity"):
        listed = await client.get("/v1/customers", params={"min_value_score": number}, headers=marketing)
        assert_problem(listed, 422, "min_value_score", number)
        check = await client.get("/v1/codes/AB", params={"order_total": number}, headers=storefront)
        assert_problem(check, 422, "order_total", number)
    for number in (TOO_BIG_FOR_64_BITS, str(2**63), "99999999999999999999999999999"):
        for method, path, field, headers in [
            ("GET", "/v1/offers/{}", "offer_id", marketing),
            ("GET", "/v1/campaigns/{}", "campaign_id", marketing),
            ("GET", "/v1/campaigns/{}/results", "campaign_id", marketing),
            ("POST", "/v1/campaigns/{}/cancel", "campaign_id", marketing),
            ("GET", "/v1/recalculations/{}", "run_id", marketing),
            ("DELETE", "/v1/redemptions/{}", "redemption_id", storefront),
            ("DELETE", "/v1/webhooks/{}", "webhook_id", admin),
            ("GET", "/v1/webhooks/{}/deliveries", "webhook_id", admin),
        ]:
            response = await client.request(method, path.format(number), headers=headers)
            assert_problem(response, 422, field, (path, number))
