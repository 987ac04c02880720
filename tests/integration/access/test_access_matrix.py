"""Every route x every kind of credential against the status API.md gives, and a guard that no route ships without
an entry here.

The table is written from API.md (../shared/design/API.md), not read from the service's guards: a route under
"Storefront" takes a key with scope `storefront`, and so on; "Missing or invalid credentials, or the wrong kind of
credential for the route: 401. A valid key without the scope: 403. A customer token only ever reaches `/v1/me*`."
Admin keys hold every scope; operations routes take no credential; the dashboard takes a browser session.

Each request is harmless: an unknown id, or a body that fails validation, so an admitted credential gets a 404 or
422 from the handler itself and nothing is written. Admitted means exactly that status, so a path that does not
reach its route (a 404 from routing) cannot pass for an admitted one.
"""

from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass, field
from typing import Any

import jwt.algorithms
import pytest
from litestar.routes import HTTPRoute

from loyalty.settings import PACKAGE_ROOT

CREDENTIALS = ("none", "unknown_key", "storefront", "marketing", "admin", "customer", "other_customer")
ADMITTED = 0  # in a policy: the credential reaches the handler, which answers with the route's `admitted` status

# One policy per section of API.md, every cell written out.
STOREFRONT = {
    "none": 401, "unknown_key": 401, "storefront": ADMITTED, "marketing": 403, "admin": ADMITTED,
    "customer": 401, "other_customer": 401,
}  # fmt: skip
MARKETING = {
    "none": 401, "unknown_key": 401, "storefront": 403, "marketing": ADMITTED, "admin": ADMITTED,
    "customer": 401, "other_customer": 401,
}  # fmt: skip
# GET /v1/customers/{customer_id}: listed under Marketing, "(also storefront)".
STOREFRONT_OR_MARKETING = {
    "none": 401, "unknown_key": 401, "storefront": ADMITTED, "marketing": ADMITTED, "admin": ADMITTED,
    "customer": 401, "other_customer": 401,
}  # fmt: skip
# GET /v1/tiers is listed under Storefront, but the service admits every key on purpose: the tier list holds no
# customer data and marketing integrations show it too. An addition to API.md (which lists no 403 for it).
ANY_KEY = STOREFRONT_OR_MARKETING
ADMIN = {
    "none": 401, "unknown_key": 401, "storefront": 403, "marketing": 403, "admin": ADMITTED,
    "customer": 401, "other_customer": 401,
}  # fmt: skip
# A customer's own rewards: any valid customer token (each reads its own customer), never an API key.
CUSTOMER = {
    "none": 401, "unknown_key": 401, "storefront": 401, "marketing": 401, "admin": 401,
    "customer": ADMITTED, "other_customer": ADMITTED,
}  # fmt: skip
OPERATIONS = dict.fromkeys(CREDENTIALS, ADMITTED)
# The dashboard is for a browser with a session cookie (signed in with a marketing or admin key on its sign-in
# page, tests/integration/dashboard); an API credential in a header is the wrong kind of credential.
BROWSER = {"none": ADMITTED} | dict.fromkeys(CREDENTIALS[1:], 401)


@dataclass(frozen=True)
class Entry:
    method: str
    route: str  # the route's path as the app names it
    policy: dict[str, int]
    admitted: int  # what the harmless request gets from the handler once the credential is admitted
    path: str = ""  # a concrete path; the route's own when it has no parameter
    body: Any = None
    params: dict[str, str] = field(default_factory=dict)
    form: bool = False  # the body is a sign-in form carrying the marketing key

    @property
    def url(self) -> str:
        return self.path or self.route


INVALID = {"unknown_field": 1}  # a body every route refuses with 422 before doing anything
ACCESS: list[Entry] = [
    # Storefront
    Entry("PUT", "/v1/customers/{customer_id:str}", STOREFRONT, 422, "/v1/customers/a", INVALID),
    Entry("POST", "/v1/orders", STOREFRONT, 422, body=INVALID),
    Entry("POST", "/v1/orders/batch", STOREFRONT, 422, body=INVALID),
    Entry("POST", "/v1/orders/{order_id:str}/refunds", STOREFRONT, 422, "/v1/orders/nope/refunds", INVALID),
    Entry("POST", "/v1/events", STOREFRONT, 422, body=INVALID),
    Entry("POST", "/v1/referrals", STOREFRONT, 422, body=INVALID),
    Entry("GET", "/v1/customers/{customer_id:str}/tier", STOREFRONT, 404, "/v1/customers/nobody/tier"),
    Entry("GET", "/v1/tiers", ANY_KEY, 200),
    Entry("POST", "/v1/customers/{customer_id:str}/token", STOREFRONT, 404, "/v1/customers/nobody/token"),
    Entry("GET", "/v1/codes/{code:str}", STOREFRONT, 404, "/v1/codes/NOPE"),
    Entry("POST", "/v1/redemptions", STOREFRONT, 422, body=INVALID),
    Entry("DELETE", "/v1/redemptions/{redemption_id:int}", STOREFRONT, 404, "/v1/redemptions/999"),
    # Marketing
    Entry("GET", "/v1/customers", MARKETING, 200),
    Entry("GET", "/v1/customers/{customer_id:str}", STOREFRONT_OR_MARKETING, 404, "/v1/customers/nobody"),
    Entry("GET", "/v1/exports/customers", MARKETING, 200),
    Entry("PUT", "/v1/customers/{customer_id:str}/tier-pin", MARKETING, 422, "/v1/customers/a/tier-pin", INVALID),
    Entry("DELETE", "/v1/customers/{customer_id:str}/tier-pin", MARKETING, 404, "/v1/customers/nobody/tier-pin"),
    Entry("GET", "/v1/segments", MARKETING, 200),
    Entry("POST", "/v1/tiers/preview", MARKETING, 422, body={"tier": []}),
    Entry("POST", "/v1/offers", MARKETING, 422, body=INVALID),
    Entry("GET", "/v1/offers", MARKETING, 200),
    Entry("GET", "/v1/offers/{offer_id:int}", MARKETING, 404, "/v1/offers/999"),
    Entry("POST", "/v1/campaigns", MARKETING, 422, body=INVALID),
    Entry("GET", "/v1/campaigns", MARKETING, 200),
    Entry("GET", "/v1/campaigns/{campaign_id:int}", MARKETING, 404, "/v1/campaigns/999"),
    Entry("POST", "/v1/campaigns/{campaign_id:int}/cancel", MARKETING, 404, "/v1/campaigns/999/cancel"),
    Entry("GET", "/v1/campaigns/{campaign_id:int}/results", MARKETING, 404, "/v1/campaigns/999/results"),
    Entry("POST", "/v1/recalculations", MARKETING, 422, body=INVALID),
    Entry("GET", "/v1/recalculations", MARKETING, 200),
    Entry("GET", "/v1/recalculations/{run_id:int}", MARKETING, 404, "/v1/recalculations/999"),
    # Customer
    Entry("GET", "/v1/me", CUSTOMER, 200),
    Entry("GET", "/v1/me/offers", CUSTOMER, 200),
    Entry("GET", "/v1/me/history", CUSTOMER, 200),
    Entry("GET", "/v1/me/export", CUSTOMER, 200),
    # Admin
    Entry("DELETE", "/v1/customers/{customer_id:str}", ADMIN, 404, "/v1/customers/nobody"),
    Entry("POST", "/v1/webhooks", ADMIN, 422, body=INVALID),
    Entry("GET", "/v1/webhooks", ADMIN, 200),
    Entry("DELETE", "/v1/webhooks/{webhook_id:int}", ADMIN, 404, "/v1/webhooks/999"),
    Entry("GET", "/v1/webhooks/{webhook_id:int}/deliveries", ADMIN, 404, "/v1/webhooks/999/deliveries"),
    # Operations (no key)
    Entry("GET", "/health/live", OPERATIONS, 200),
    Entry("GET", "/health/ready", OPERATIONS, 200),
    Entry("GET", "/metrics", OPERATIONS, 200),
    Entry("GET", "/problems", OPERATIONS, 200),
    Entry("GET", "/problems/{slug:str}", OPERATIONS, 200, "/problems/validation"),
    Entry("GET", "/schema", OPERATIONS, 200),
    Entry("GET", "/schema/openapi.json", OPERATIONS, 200),
    Entry("GET", "/schema/oauth2-redirect.html", OPERATIONS, 200),
    # Litestar's answer for any other path under /schema: a 404 page.
    Entry("GET", "/schema/{path:str}", OPERATIONS, 404, "/schema/nothing-here"),
    Entry("GET", "/schema-assets/swagger-ui/{name:str}", OPERATIONS, 200, "/schema-assets/swagger-ui/swagger-ui.css"),
    # The dashboard (HTML)
    Entry("GET", "/dashboard", BROWSER, 303),
    Entry("GET", "/dashboard/sign-in", BROWSER, 200),
    Entry("POST", "/dashboard/sign-in", BROWSER, 303, form=True),
    Entry("POST", "/dashboard/sign-out", BROWSER, 303),
    Entry("GET", "/dashboard/static/{file_path:path}", BROWSER, 200, "/dashboard/static/dashboard.css"),
    Entry("HEAD", "/dashboard/static/{file_path:path}", BROWSER, 200, "/dashboard/static/dashboard.css"),
]
# Litestar answers OPTIONS on every path itself (the allowed methods, no data); test_options_carry_no_data.
FRAMEWORK_METHODS = {"OPTIONS"}


@pytest.fixture
async def credentials(client, keys) -> dict[str, dict[str, str]]:
    storefront = keys.headers("storefront")
    tokens = {}
    for customer in ("a", "b"):
        assert (await client.put(f"/v1/customers/{customer}", json={}, headers=storefront)).status_code == 201
        tokens[customer] = (await client.post(f"/v1/customers/{customer}/token", headers=storefront)).json()["token"]
    return {
        "none": {},
        "unknown_key": {"X-API-Key": "lty_" + "0" * 43},
        "storefront": storefront,
        "marketing": keys.headers("marketing"),
        "admin": keys.headers("admin"),
        # The token of the customer the paths name ("a"), and of another customer.
        "customer": {"Authorization": f"Bearer {tokens['a']}"},
        "other_customer": {"Authorization": f"Bearer {tokens['b']}"},
    }


def _route_methods(app: Any) -> set[tuple[str, str]]:
    return {
        (method, route.path)
        for route in app.routes
        if isinstance(route, HTTPRoute)
        for method in route.methods - FRAMEWORK_METHODS
    }


def test_every_route_has_an_access_decision(app) -> None:
    """A new route cannot ship without a line in ACCESS (and a route that is gone takes its line with it)."""
    table = [(entry.method, entry.route) for entry in ACCESS]
    assert len(table) == len(set(table)), "a route is listed twice"
    actual = _route_methods(app)
    assert actual - set(table) == set(), "routes without an access decision in ACCESS"
    assert set(table) - actual == set(), "ACCESS lists routes the app does not have"
    documented = set(app.openapi_schema.to_schema()["paths"])
    assert documented <= {re.sub(r":\w+\}", "}", route) for _method, route in table}


async def test_each_route_answers_each_credential_as_api_md_says(client, keys, credentials, engine) -> None:
    mismatches = []
    for entry in ACCESS:
        for credential in CREDENTIALS:
            expected = entry.policy[credential] or entry.admitted
            headers = credentials[credential]
            if entry.form:
                response = await client.post(
                    entry.url, data={"key": keys.marketing}, headers=headers, follow_redirects=False
                )
            else:
                response = await client.request(
                    entry.method,
                    entry.url,
                    json=entry.body,
                    params=entry.params,
                    headers=headers,
                    follow_redirects=False,
                )
            cell = (entry.method, entry.route, credential)
            if response.status_code != expected:
                mismatches.append((*cell, expected, response.status_code, response.text[:150]))
            elif entry.policy[credential] != ADMITTED and entry.method != "HEAD":
                problem = response.json()
                assert response.headers["content-type"].startswith("application/problem+json"), cell
                kind = "unauthenticated" if expected == 401 else "forbidden"
                assert problem["type"] == f"/problems/{kind}", (cell, problem)
                if expected == 401:
                    assert response.headers["www-authenticate"], cell
    assert mismatches == [], "\n".join(map(str, mismatches))


async def test_a_customer_token_reads_only_its_own_customer(client, credentials) -> None:
    for credential, customer in (("customer", "a"), ("other_customer", "b")):
        me = await client.get("/v1/me", headers=credentials[credential])
        assert me.json()["customer_id"] == customer
        export = (await client.get("/v1/me/export", headers=credentials[credential])).json()
        assert export["profile"]["customer_id"] == customer


async def test_options_carry_no_data(app, client, credentials) -> None:
    """Litestar's own OPTIONS answer: the allowed methods and nothing else, or the route's 401/403 where its
    guards apply to OPTIONS too."""
    for route in app.routes:
        if not isinstance(route, HTTPRoute) or "OPTIONS" not in route.methods:
            continue
        path = re.sub(r"\{\w+:int\}", "1", route.path)
        path = re.sub(r"\{\w+(:\w+)?\}", "a", path)
        for credential in ("none", "storefront", "customer"):
            response = await client.options(path, headers=credentials[credential])
            if response.status_code == 204:
                assert response.content == b"", route.path
                assert "allow" in response.headers, route.path
            else:
                assert response.status_code in (401, 403), (route.path, credential, response.status_code)
                assert response.headers["content-type"].startswith("application/problem+json"), route.path


# ---------------------------------------------------------------- constant-time comparison of secrets

# Names under which the service holds secrets or values derived from them.
_SECRET_NAME = re.compile(r"(^|_)(secret|signature|digest|token|password|key_hash|plain|cookie|csrf)s?(_|$)", re.I)
# The API key check compares hashes inside the database's unique index, not in Python: an attacker cannot steer
# the stored hash, so its timing says nothing about the key (loyalty/access/services.py, authenticate_key).
_HASH_LOOKUPS = {("access/services.py", "ApiKey.key_hash == key_hash")}


def _names(node: ast.AST) -> list[str]:
    return [
        sub.id if isinstance(sub, ast.Name) else sub.attr
        for sub in ast.walk(node)
        if isinstance(sub, ast.Name | ast.Attribute)
    ]


def test_no_secret_is_compared_with_equality() -> None:
    """`==` stops at the first differing byte, so its time tells an attacker how much of a guess is right:
    secrets are compared with `hmac.compare_digest` (dashboard sessions) or looked up by hash (API keys).

    A test of timing itself would be flaky on a shared machine; this reads every comparison in the service.
    """
    found = []
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        relative = path.relative_to(PACKAGE_ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), relative)):
            if not isinstance(node, ast.Compare) or not any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
                continue
            if any(_SECRET_NAME.search(name) for name in _names(node)):
                found.append((relative, ast.unparse(node)))
    assert set(found) == _HASH_LOOKUPS, found
    sessions = (PACKAGE_ROOT / "dashboard" / "sessions.py").read_text()
    assert "hmac.compare_digest(signature" in sessions


def test_customer_tokens_are_verified_in_constant_time() -> None:
    """PyJWT checks an HS256 signature with `hmac.compare_digest`; pinned here so an upgrade cannot change it."""
    assert "hmac.compare_digest(" in inspect.getsource(jwt.algorithms.HMACAlgorithm.verify)
