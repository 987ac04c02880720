"""The whole API fuzzed against its own OpenAPI document (schemathesis), on a shop with real data; refunds as a
Hypothesis property; regressions for what the fuzzer found.

Every operation in the document, with valid credentials (an admin key, or a customer token for `/v1/me*`; none when
the generator leaves the credential out on purpose): no 5xx, every error an RFC 9457 problem document, and every
response as documented (status code, content type, body schema). Nothing is excluded: the CSV export's stream is
read whole by the in-process client, and the docs UI and the dashboard's sign-in and static files are not in the
document. Generated requests are steered, two times in three, to ids and values that exist (customers, orders,
offers, codes, ...), so that lookups also find things and writes get past validation into the service code.

CI runs a bounded, derandomized sample (25 generated requests per operation, besides the fixed boundary cases);
a longer search: ``LOYALTY_FUZZ_EXAMPLES=500 pytest tests/integration/ops/test_api_fuzz.py``.
"""

from __future__ import annotations

import copy
import os
import tomllib
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar import Litestar
from litestar.testing import AsyncTestClient
from schemathesis.core.parameters import ParameterLocation
from schemathesis.python import asgi as schemathesis_asgi
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.app import create_app
from loyalty.db.models import Customer, IssuedCode
from loyalty.lib.errors import PROBLEM_MEDIA_TYPE
from loyalty.settings import PROJECT_ROOT, Settings
from tests.conftest import Keys

EXAMPLES = int(os.environ.get("LOYALTY_FUZZ_EXAMPLES", "25"))
CUSTOMERS = [f"c-{index}" for index in range(4)]
ERASABLE = ["erase-0", "erase-1"]
TOKEN_CUSTOMER = "c-3"
MONEY_FIELDS = {"total", "amount", "unit_price", "order_total", "value", "min_order_total"}
PAST_FIELDS = {"placed_at", "refunded_at", "occurred_at", "joined_at", "as_of"}
FUTURE_FIELDS = {"until", "send_at"}
SHIPPED_TIERS = tomllib.loads((PROJECT_ROOT / "config" / "tiers.toml").read_text())

schema = schemathesis.pytest.from_fixture("api_schema")


@dataclass(frozen=True)
class Shop:
    """Credentials and the ids of what exists, by the name of the parameter or field that takes them."""

    admin: dict[str, str]
    customer_token: dict[str, str]
    ids: dict[str, list[Any]]


def _instant(days: float) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).isoformat()


@pytest.fixture
async def shop(
    app: Litestar,
    keys: Keys,
    run_due: Any,
    dispatch_due: Any,
    session_maker: async_sessionmaker[AsyncSession],
) -> Shop:
    """Customers with 0-3 orders, a refund, a referral, an event, a finished run, an offer sent by a campaign (its
    codes issued, one redeemed), two webhooks, a pin, and customers kept for erasure."""
    admin = {"X-API-Key": keys.admin}
    async with AsyncTestClient(app=app) as client:

        async def call(method: str, path: str, expected: int, body: Any = None) -> Any:
            response = await client.request(method, path, json=body, headers=admin)
            assert response.status_code == expected, (method, path, response.text)
            return response.json() if response.content else None

        orders = []
        for count, customer in enumerate(CUSTOMERS):
            await call("PUT", f"/v1/customers/{customer}", 201, {"email": f"{customer}@example.com"})
            for number in range(count):
                order = {
                    "order_id": f"{customer}-o{number}",
                    "customer_id": customer,
                    "placed_at": _instant(-30 * number - 1),
                    "total": f"{20 * (number + 1)}.50",
                    "currency": "USD",
                    "items": [{"sku": "TEE", "category": "tops", "quantity": 1, "unit_price": "20.50"}],
                }
                orders.append((await call("POST", "/v1/orders", 201, order))["order_id"])
        refund = {"refund_id": "r-1", "amount": "5.00", "refunded_at": _instant(-0.5)}
        await call("POST", "/v1/orders/c-3-o0/refunds", 201, refund)
        referral = {"referrer_id": "c-3", "referee_id": "c-1", "occurred_at": _instant(-90)}
        await call("POST", "/v1/referrals", 201, referral)
        event = {"event_id": "e-1", "customer_id": "c-2", "type": "review", "target": "p", "occurred_at": _instant(-2)}
        await call("POST", "/v1/events", 202, {"events": [event]})
        run_id = (await call("POST", "/v1/recalculations", 202, {}))["run_id"]
        await run_due()
        offer = {"name": "ten", "kind": "amount_off", "value": "10", "valid_days": 30}
        offer_id = (await call("POST", "/v1/offers", 201, offer))["offer_id"]
        campaign = {
            "name": "everyone",
            "offer_id": offer_id,
            "tiers": ["vip", "nurture", "one_time"],
            "send_at": _instant(0),
            "holdout_pct": 0,
        }
        campaign_id = (await call("POST", "/v1/campaigns", 201, campaign))["campaign_id"]
        await dispatch_due()
        async with session_maker() as session:
            issued = await session.execute(
                select(Customer.external_id, IssuedCode.code).join(IssuedCode, IssuedCode.customer_id == Customer.id)
            )
            codes: dict[str, str] = dict(issued.all())
        redemption = {"code": codes["c-1"], "customer_id": "c-1", "order_id": "checkout-1", "order_total": "30.00"}
        redemption_id = (await call("POST", "/v1/redemptions", 201, redemption))["redemption_id"]
        webhook_ids = [
            (await call("POST", "/v1/webhooks", 201, {"url": f"https://example.com/{n}", "events": ["offer.issued"]}))[
                "webhook_id"
            ]
            for n in range(2)
        ]
        await call("PUT", "/v1/customers/c-2/tier-pin", 200, {"tier": "vip", "until": _instant(30), "reason": "press"})
        for customer in ERASABLE:
            await call("PUT", f"/v1/customers/{customer}", 201, {})
        token = (await call("POST", f"/v1/customers/{TOKEN_CUSTOMER}/token", 200))["token"]
    ids = {
        "customer_id": CUSTOMERS,
        "referrer_id": CUSTOMERS,
        "referee_id": CUSTOMERS,
        "referred_by": CUSTOMERS,
        "order_id": orders,
        "offer_id": [offer_id],
        "campaign_id": [campaign_id],
        "run_id": [run_id],
        "code": list(codes.values()),
        "redemption_id": [redemption_id],
        "webhook_id": webhook_ids,
        "slug": ["validation", "not-found"],
    }
    return Shop(admin, {"Authorization": f"Bearer {token}"}, ids)


@pytest.fixture
def api_schema(request: pytest.FixtureRequest, settings: Settings, shop: Shop) -> Iterator[schemathesis.BaseSchema]:
    """The document a second instance of the app serves at /schema/openapi.json, fuzzed in-process on
    schemathesis' own event loop (a second instance, because the first one's engine belongs to the test's loop)."""
    # schemathesis 4.32 labels each operation's subtest through `Function._nodeid`, which pytest 9.2 renamed.
    request.node._nodeid = request.node.nodeid
    config = schemathesis.Config.from_dict(
        {
            "seed": 20261124,
            "generation": {"max-examples": EXAMPLES, "deterministic": True, "database": "none"},
            # Hypothesis' health checks time data generation, which a loaded machine slows: no flaky failures.
            "suppress-health-check": ["all"],
            "checks": {
                # Valid by the schema is not valid by the rules: an unknown cursor, a refund above the order total,
                # a code of another customer are 422s by API.md.
                "positive_data_acceptance": {"enabled": False},
                # Litestar 2 answers OPTIONS with only the first handler's method in `Allow` on paths with several
                # (litestar-org/litestar#4169, fixed in Litestar 3); OPTIONS is not part of the API.
                "allow_header_conformance": {"enabled": False},
                # The service takes JSON values pydantic converts exactly (0 and "yes" for a boolean, "5" for an
                # integer), which the generator counts as violations. Such requests still have to be answered with
                # 2xx or a 4xx problem, never a 5xx: the other checks hold for them.
                "negative_data_rejection": {"enabled": False},
            },
        }
    )
    yield schemathesis.openapi.from_asgi("/schema/openapi.json", create_app(settings), config=config)
    schemathesis_asgi.shutdown_lifespans()


def _digest(generated: Any) -> int:
    return zlib.crc32(repr(generated).encode())


def _steered(generated: Any) -> bool:
    """Two times in three, decided by the generated value itself, so a derandomized run is the same every time."""
    return _digest(generated) % 3 != 0


def _pick(generated: Any, real: list[Any]) -> Any:
    """A real value instead of the generated one, two times in three."""
    return real[_digest(generated) % len(real)] if _steered(generated) else generated


def _money(generated: Any) -> str:
    return f"{_digest(generated) % 20000 / 100:.2f}"


def _realistic(value: Any, ids: dict[str, list[Any]]) -> Any:
    """The body with ids, amounts and times that exist or make sense, two times in three, at any depth."""
    if isinstance(value, list):
        return [_realistic(item, ids) for item in value]
    if not isinstance(value, dict):
        return value
    steered: dict[str, Any] = {}
    for name, item in value.items():
        if name in ids and name != "order_id":  # an order id in a body is a new order's (or a checkout's)
            steered[name] = _pick(item, ids[name])
        elif name in MONEY_FIELDS:
            steered[name] = _pick(item, [_money(item)])
        elif name == "currency":
            steered[name] = _pick(item, ["USD"])
        elif name == "url":
            steered[name] = _pick(item, ["https://example.com/hook"])
        elif name in PAST_FIELDS | FUTURE_FIELDS:
            days = _digest(item) % 300 / 10
            steered[name] = _pick(item, [_instant(days if name in FUTURE_FIELDS else -days)])
        else:
            steered[name] = _realistic(item, ids)
    return steered


def problem_details(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Every error is an RFC 9457 problem document with its members."""
    if response.status_code < 400:
        return
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith(PROBLEM_MEDIA_TYPE), f"{response.status_code} answered as {content_type!r}"
    body = response.json()
    assert isinstance(body, dict), body
    assert body.get("status") == response.status_code, body
    for member in ("type", "title", "detail"):
        assert isinstance(body.get(member), str), body
        assert body[member], body
    assert body["type"].startswith("/problems/"), body


def _steer(case: schemathesis.Case, shop: Shop) -> None:
    """Point a generated request at real data, leaving alone any part generated to be invalid."""

    def valid(location: ParameterLocation) -> bool:
        return case.meta is None or not case.meta.is_negative_at(location)

    erasure = case.method.upper() == "DELETE" and case.path == "/v1/customers/{customer_id}"
    if case.path_parameters and valid(ParameterLocation.PATH):
        for name, value in case.path_parameters.items():
            if erasure:
                # Erasure gets customers of its own, so the others (and the customer token's) stay for the rest.
                case.path_parameters[name] = _pick(value, ERASABLE)
            elif name in shop.ids:
                case.path_parameters[name] = _pick(value, shop.ids[name])
    if isinstance(case.query, dict) and "customer_id" in case.query and valid(ParameterLocation.QUERY):
        case.query["customer_id"] = _pick(case.query["customer_id"], CUSTOMERS)
    if isinstance(case.body, dict | list) and valid(ParameterLocation.BODY):
        body = _realistic(case.body, shop.ids)
        if case.path == "/v1/campaigns" and isinstance(body, dict):
            _schedule(body)
        if case.path == "/v1/tiers/preview" and _steered(body):
            body = _candidate_tiers(_digest(body))
        case.body = body


def _candidate_tiers(digest: int) -> dict[str, Any]:
    """The shipped tiers config with another VIP threshold, and every other time another scoring window."""
    candidate = copy.deepcopy(SHIPPED_TIERS)
    candidate["tier"][0]["any"][0]["gte"] = digest % 101
    if digest % 2:
        candidate["scoring"]["window_days"] = 30 + digest % 700
    return candidate


def _schedule(campaign: dict[str, Any]) -> None:
    """`send_at` and `cron` are both optional in the schema, and exactly one is required."""
    if {"send_at", "cron"}.isdisjoint(campaign) and _steered(campaign):
        campaign["send_at"] = _instant(1)


@schema.parametrize()
def test_every_operation_keeps_to_the_document(case: schemathesis.Case, shop: Shop) -> None:
    _steer(case, shop)
    credentials = shop.customer_token if case.path.startswith("/v1/me") else shop.admin
    if case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER):
        credentials = {}  # a request generated without (or with a broken) credential must be refused with a 401
    case.call_and_validate(headers=credentials, additional_checks=[problem_details])


# --- Refunds, as a property --------------------------------------------------------------------------------------


@st.composite
def an_order_and_refunds(draw: st.DrawFn) -> tuple[int, list[int]]:
    """An order total and refunds of it, in cents: each at most the total, together often past it."""
    total = draw(st.integers(1, 10**8))
    return total, draw(st.lists(st.integers(1, total), max_size=5))


def _dollars(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    # The client and the database are shared by the examples on purpose; each example has an order of its own.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=an_order_and_refunds())
async def test_refunds_never_take_an_order_below_zero(client, keys, case: tuple[int, list[int]]) -> None:
    """Each refund is taken exactly while the refunds together stay within the order's total, to the cent, and
    refused with `refund-exceeds-total` past it; the order's refunded amount is the sum of those taken."""
    storefront = keys.headers("storefront")
    total, refunds = case
    order_id = f"o-{uuid.uuid4().hex}"
    order = {"order_id": order_id, "customer_id": "c-1", "placed_at": _instant(-1), "total": _dollars(total)}
    created = await client.post("/v1/orders", json={**order, "currency": "USD"}, headers=storefront)
    assert created.status_code == 201, created.text
    taken = 0
    for number, amount in enumerate(refunds):
        refund = {"refund_id": f"{order_id}-r{number}", "amount": _dollars(amount), "refunded_at": _instant(-0.5)}
        response = await client.post(f"/v1/orders/{order_id}/refunds", json=refund, headers=storefront)
        if taken + amount <= total:
            assert response.status_code == 201, response.text
            taken += amount
        else:
            assert response.status_code == 422, response.text
            assert response.json()["type"] == "/problems/refund-exceeds-total"
    replay = await client.post("/v1/orders", json={**order, "currency": "USD"}, headers=storefront)
    assert replay.status_code == 200, replay.text
    assert replay.json()["refunded"] == _dollars(taken)


# --- Regressions: what the fuzzer and the property tests found ---------------------------------------------------


async def test_a_body_key_that_reads_as_a_digit_is_named_in_the_problem(client, keys) -> None:
    """`"²".isdigit()` is true, and turning the field path `²` into a list index raised: a 500."""
    offer = {"name": "ten", "kind": "amount_off", "value": "10", "valid_days": 30}
    for key in ("²", "³", "٣"):
        response = await client.post("/v1/offers", json={**offer, key: 1}, headers=keys.headers("marketing"))
        assert response.status_code == 422, response.text
        assert response.json()["errors"] == [{"field": key, "message": "Extra inputs are not permitted"}]


async def test_a_missing_body_is_named_body(client, keys) -> None:
    """Without a body the problem named the handler's parameter, `data`, with the message `'data'`."""
    for path in ("/v1/orders", "/v1/offers", "/v1/campaigns"):
        response = await client.post(path, headers=keys.headers("admin"))
        assert response.status_code == 422, response.text
        assert response.json()["errors"] == [{"field": "body", "message": "a JSON body is required"}]


@pytest.mark.parametrize(
    ("total", "message"),
    [
        ("1e999999999", "must not exceed 1000000000"),  # decimal.Overflow: a 500
        ("1.00000000000000000000000000001", "has more than 2 decimal places for USD"),  # stored as 1.00
        ("1e-999999999", "has more than 2 decimal places for USD"),  # stored as 0.00
    ],
)
async def test_an_amount_is_refused_not_rounded_or_a_500(client, keys, total: str, message: str) -> None:
    order = {"order_id": "o-1", "customer_id": "c-1", "placed_at": _instant(-1), "total": total, "currency": "USD"}
    response = await client.post("/v1/orders", json=order, headers=keys.headers("storefront"))
    assert response.status_code == 422, response.text
    assert response.json()["errors"] == [{"field": "total", "message": message}]


async def test_the_document_tells_how_each_operation_answers(client) -> None:
    """Errors documented as problems on every operation (they were undocumented, or in Litestar's own shape), the
    credential each needs, the other success statuses, the real media types, and the optional body."""
    document = (await client.get("/schema/openapi.json")).json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            for status, response in responses.items():
                if int(status) >= 400 and (path, status) != ("/health/ready", "503"):
                    assert list(response["content"]) == [PROBLEM_MEDIA_TYPE], (method, path, status)
            assert "500" in responses, (method, path)
            if path.startswith("/v1/"):
                assert {"401", "429", "503"} <= set(responses), (method, path)
                credential = "CustomerToken" if path.startswith("/v1/me") else "ApiKey"
                assert operation["security"] == [{credential: []}], (method, path)
    paths = document["paths"]
    assert {"200", "201", "409"} <= set(paths["/v1/orders"]["post"]["responses"])
    assert {"200", "201"} <= set(paths["/v1/customers/{customer_id}"]["put"]["responses"])
    assert "404" in paths["/v1/customers/{customer_id}/tier"]["get"]["responses"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert list(paths["/dashboard"]["get"]["responses"]["200"]["content"]) == ["text/html"]
    assert "303" in paths["/dashboard"]["get"]["responses"]
    assert paths["/v1/recalculations"]["post"]["requestBody"]["required"] is False
    assert document["components"]["schemas"]["Problem"]["required"] == ["detail", "status", "title", "type"]
