"""Mixed storefront traffic for the soak test.

Every request states the answer the contract gives it (API.md): a new order 201, its faithful replay 200, the same
id with other content 409, a second use of a one-use code 409 `code-used-up`, and so on. Anything else, a transport
error included, is recorded as unexpected. Every write that was acknowledged is kept with the content sent, so the
test can find each one in the database at the end.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx

from loyalty.db.models.activity import EVENT_TYPES

TIER_IDS = {"vip", "nurture", "one_time", "prospect"}
PROBLEM_JSON = "application/problem+json"
CENT = Decimal("0.01")
REQUEST_TIMEOUT = 60.0
# Ids of everything the soak writes start with this, so the check at the end can select exactly its own rows.
PREFIX = "soak-"
NEW_CUSTOMERS = 300
ORDERS_PER_BATCH = 20
EVENTS_PER_REQUEST = 16
REPLAYED_EVENTS_PER_REQUEST = 4
# A redemption order total above the soak offer's minimum.
REDEMPTION_TOTAL = "80.00"


def money(value: Decimal) -> str:
    return str(value.quantize(CENT))


def is_problem(response: httpx.Response, problem: str) -> bool:
    """Whether the response is the RFC 9457 document of this problem type."""
    media_type = response.headers.get("content-type", "").split(";")[0]
    return media_type == PROBLEM_JSON and response.json().get("type") == f"/problems/{problem}"


@dataclass
class Outcomes:
    """Latency of every answered request by kind, and every answer the contract does not allow for its request."""

    latencies: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    unexpected: list[str] = field(default_factory=list)

    async def call(
        self,
        client: httpx.AsyncClient,
        kind: str,
        method: str,
        url: str,
        *,
        expect: int,
        problem: str | None = None,
        **request: Any,
    ) -> httpx.Response | None:
        """The response when it has the expected status (and problem type); None, recorded, otherwise."""
        started = time.perf_counter()
        try:
            response = await client.request(method, url, **request)
        except httpx.HTTPError as error:
            self.unexpected.append(f"{kind}: {method} {url}: {type(error).__name__}: {error}")
            return None
        self.latencies[kind].append(time.perf_counter() - started)
        if response.status_code != expect:
            self.unexpected.append(
                f"{kind}: {method} {url}: {response.status_code} (expected {expect}) {response.text[:300]}"
            )
            return None
        if problem is not None and not is_problem(response, problem):
            self.unexpected.append(
                f"{kind}: {method} {url}: not the /problems/{problem} document: {response.text[:300]}"
            )
            return None
        return response

    def check(self, kind: str, condition: bool, detail: str) -> bool:
        """Record a 2xx answer whose content is not what was sent or what the contract promises."""
        if not condition:
            self.unexpected.append(f"{kind}: {detail}")
        return condition


@dataclass
class Acknowledged:
    """Writes the service acknowledged (2xx), with what was sent, to be found in the database at the end."""

    orders: dict[str, dict[str, Any]] = field(default_factory=dict)
    # refund id -> (order id, amount, refunded_at)
    refunds: dict[str, tuple[str, Decimal, str]] = field(default_factory=dict)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    # redemption id -> the redemption sent
    redemptions: dict[int, dict[str, str]] = field(default_factory=dict)
    # Second uses of one-use codes refused with `code-used-up`, as the contract requires.
    refused_second_uses: int = 0


@dataclass
class Traffic:
    """Several concurrent clients, each looping over one kind of storefront work until the deadline."""

    base: str
    storefront: dict[str, str]
    marketing: dict[str, str]
    customers: list[str]
    # Issued one-use codes and their owners, redeemed one by one (each once, some deliberately twice).
    codes: list[tuple[str, str]]
    seconds: float
    outcomes: Outcomes = field(default_factory=Outcomes)
    acknowledged: Acknowledged = field(default_factory=Acknowledged)
    started: float = field(default_factory=time.monotonic)
    # When each piece of marketing work in the middle of the soak was seen finished, in seconds into the soak.
    finished: dict[str, float] = field(default_factory=dict)

    def running(self) -> bool:
        return time.monotonic() - self.started < self.seconds

    def client(self, headers: dict[str, str]) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base, headers=headers, timeout=REQUEST_TIMEOUT)

    def workers(self) -> list[Any]:
        """The traffic mix: coroutines to run together."""
        return [
            self.orders(1),
            self.orders(2),
            self.batches(),
            self.events(),
            self.badges(1),
            self.badges(2),
            self.customer_views(),
            self.redemptions(),
        ]

    # ------------------------------------------------------------ orders and refunds

    def _customer(self, rng: random.Random) -> str:
        # Mostly existing customers (their tier may move), some from a fixed set of new ones: the first write for
        # each creates it. The set is bounded so the shop, and each recalculation, stays the same size throughout.
        if rng.random() < 0.7:
            return rng.choice(self.customers)
        return f"{PREFIX}c-{rng.randrange(NEW_CUSTOMERS)}"

    def _new_order(self, rng: random.Random, order_id: str, customer_id: str) -> dict[str, Any]:
        items = [
            {
                "sku": f"SKU-{rng.randrange(500)}",
                "category": rng.choice(["tops", "shoes", "bags", None]),
                "quantity": rng.randint(1, 3),
                "unit_price": money(Decimal(rng.randint(500, 12_000)) / 100),
            }
            for _ in range(rng.randint(1, 3))
        ]
        total = sum((Decimal(item["unit_price"]) * item["quantity"] for item in items), Decimal(0))
        placed_at = datetime.now(UTC) - timedelta(minutes=rng.randint(1, 60 * 24 * 30))
        return {
            "order_id": order_id,
            "customer_id": customer_id,
            "placed_at": placed_at.isoformat(),
            "total": money(total * Decimal(rng.choice(["1", "0.9"]))),
            "currency": "USD",
            "items": items,
            "channel": rng.choice(["web", "app", None]),
        }

    def _order_answer_matches(self, kind: str, response: httpx.Response, order: dict[str, Any]) -> bool:
        body = response.json()
        return self.outcomes.check(
            kind,
            body.get("order_id") == order["order_id"]
            and body.get("customer_id") == order["customer_id"]
            and Decimal(body.get("total", "-1")) == Decimal(order["total"])
            and body.get("tier") in TIER_IDS,
            f"answer does not match the order sent: {body} vs {order}",
        )

    async def orders(self, worker: int) -> None:
        """Single orders, with replays, conflicting replays, refunds, refund replays and refunds past the total."""
        rng = random.Random(f"orders-{worker}")
        call = self.outcomes.call
        mine: list[str] = []
        refunded: dict[str, Decimal] = {}
        mine_refunds: list[tuple[str, dict[str, str]]] = []
        n = 0
        async with self.client(self.storefront) as client:
            while self.running():
                n += 1
                order_id = f"{PREFIX}o-{worker}-{n}"
                order = self._new_order(rng, order_id, self._customer(rng))
                response = await call(client, "order", "POST", "/v1/orders", json=order, expect=201)
                if response is not None and self._order_answer_matches("order", response, order):
                    self.acknowledged.orders[order_id] = order
                    mine.append(order_id)
                    refunded[order_id] = Decimal(0)
                if not mine:
                    continue
                if n % 4 == 0:
                    replayed = self.acknowledged.orders[rng.choice(mine)]
                    response = await call(client, "order replay", "POST", "/v1/orders", json=replayed, expect=200)
                    if response is not None:
                        self._order_answer_matches("order replay", response, replayed)
                if n % 10 == 0:
                    original = self.acknowledged.orders[rng.choice(mine)]
                    changed = {**original, "total": money(Decimal(original["total"]) + 1)}
                    await call(
                        client,
                        "order conflict",
                        "POST",
                        "/v1/orders",
                        json=changed,
                        expect=409,
                        problem="idempotency-conflict",
                    )
                if n % 3 == 0:
                    await self._refund(client, rng, f"{worker}-{n}", rng.choice(mine), refunded, mine_refunds)
                if n % 9 == 0 and mine_refunds:
                    order_id, refund = rng.choice(mine_refunds)
                    url = f"/v1/orders/{order_id}/refunds"
                    response = await call(client, "refund replay", "POST", url, json=refund, expect=200)
                    if response is not None:
                        self.outcomes.check(
                            "refund replay", response.json().get("refund_id") == refund["refund_id"], response.text
                        )

    async def _refund(
        self,
        client: httpx.AsyncClient,
        rng: random.Random,
        label: str,
        order_id: str,
        refunded: dict[str, Decimal],
        mine_refunds: list[tuple[str, dict[str, str]]],
    ) -> None:
        """Part of what is left of the order's total, or, once nothing is left, a refund the total refuses."""
        left = Decimal(self.acknowledged.orders[order_id]["total"]) - refunded[order_id]
        refund_id = f"{PREFIX}r-{label}"
        url = f"/v1/orders/{order_id}/refunds"
        refunded_at = datetime.now(UTC).isoformat()
        if left <= 0:
            refund = {"refund_id": refund_id, "amount": "1.00", "refunded_at": refunded_at}
            await self.outcomes.call(
                client, "refund past total", "POST", url, json=refund, expect=422, problem="refund-exceeds-total"
            )
            return
        # Half the time the rest in full (the order is then fully refunded), otherwise a part of it.
        amount = left if rng.random() < 0.5 else max(CENT, (left * Decimal(rng.random())).quantize(CENT))
        refund = {"refund_id": refund_id, "amount": money(amount), "refunded_at": refunded_at}
        response = await self.outcomes.call(client, "refund", "POST", url, json=refund, expect=201)
        if response is not None and self.outcomes.check(
            "refund",
            response.json().get("refund_id") == refund_id and Decimal(response.json().get("amount")) == amount,
            response.text,
        ):
            refunded[order_id] += amount
            self.acknowledged.refunds[refund_id] = (order_id, amount, refunded_at)
            mine_refunds.append((order_id, refund))

    # ------------------------------------------------------------ batches

    async def batches(self) -> None:
        """Batches of new orders with replays, one conflicting replay and one invalid order in each."""
        rng = random.Random("batches")
        mine: list[str] = []
        n = 0
        async with self.client(self.storefront) as client:
            while self.running():
                n += 1
                new = [self._new_order(rng, f"{PREFIX}b-{n}-{i}", self._customer(rng)) for i in range(ORDERS_PER_BATCH)]
                orders = list(new)
                expected = [201] * len(new)
                if mine:
                    replays = [self.acknowledged.orders[order_id] for order_id in rng.sample(mine, min(3, len(mine)))]
                    conflicting = {**replays[0], "total": money(Decimal(replays[0]["total"]) + 1)}
                    orders += [*replays, conflicting]
                    expected += [200] * len(replays) + [409]
                invalid = {**self._new_order(rng, f"{PREFIX}b-{n}-invalid", rng.choice(self.customers)), "total": "-1"}
                orders.append(invalid)
                expected.append(422)
                response = await self.outcomes.call(
                    client, "order batch", "POST", "/v1/orders/batch", json={"orders": orders}, expect=200
                )
                if response is None:
                    continue
                statuses = [result.get("status") for result in response.json().get("results", [])]
                answered = [result.get("order_id") for result in response.json().get("results", [])]
                if self.outcomes.check(
                    "order batch",
                    statuses == expected and answered == [order["order_id"] for order in orders],
                    f"item outcomes {statuses} for {expected}",
                ):
                    for order in new:
                        self.acknowledged.orders[order["order_id"]] = order
                        mine.append(order["order_id"])

    # ------------------------------------------------------------ events

    async def events(self) -> None:
        """Event batches, each replaying a few events acknowledged before (counted as duplicates)."""
        rng = random.Random("events")
        mine: list[str] = []
        n = 0
        async with self.client(self.storefront) as client:
            while self.running():
                n += 1
                new = [
                    {
                        "event_id": f"{PREFIX}e-{n}-{i}",
                        "customer_id": self._customer(rng),
                        "type": rng.choice(EVENT_TYPES),
                        "target": f"sku:SKU-{rng.randrange(500)}",
                        "occurred_at": (datetime.now(UTC) - timedelta(seconds=rng.randint(0, 86_400))).isoformat(),
                    }
                    for i in range(EVENTS_PER_REQUEST)
                ]
                replays = [
                    self.acknowledged.events[event_id]
                    for event_id in rng.sample(mine, min(REPLAYED_EVENTS_PER_REQUEST, len(mine)))
                ]
                response = await self.outcomes.call(
                    client, "events", "POST", "/v1/events", json={"events": new + replays}, expect=202
                )
                if response is None:
                    continue
                body = response.json()
                if self.outcomes.check(
                    "events",
                    body == {"accepted": len(new), "duplicates": len(replays), "rejected": []},
                    f"{body} for {len(new)} new and {len(replays)} replayed events",
                ):
                    for event in new:
                        self.acknowledged.events[event["event_id"]] = event
                        mine.append(event["event_id"])

    # ------------------------------------------------------------ reads

    async def badges(self, worker: int) -> None:
        """The storefront's badge read, the hottest call."""
        rng = random.Random(f"badges-{worker}")
        async with self.client(self.storefront) as client:
            while self.running():
                customer_id = rng.choice(self.customers)
                response = await self.outcomes.call(
                    client, "badge", "GET", f"/v1/customers/{customer_id}/tier", expect=200
                )
                if response is not None:
                    body = response.json()
                    self.outcomes.check(
                        "badge", body.get("customer_id") == customer_id and body.get("tier") in TIER_IDS, str(body)
                    )

    async def customer_views(self) -> None:
        """A customer token minted by the storefront, then the customer's own status and offers."""
        rng = random.Random("customer views")
        call = self.outcomes.call
        async with self.client(self.storefront) as storefront, self.client({}) as customer:
            while self.running():
                customer_id = rng.choice(self.customers)
                minted = await call(storefront, "token", "POST", f"/v1/customers/{customer_id}/token", expect=200)
                if minted is None:
                    continue
                bearer = {"Authorization": f"Bearer {minted.json()['token']}"}
                me = await call(customer, "me", "GET", "/v1/me", headers=bearer, expect=200)
                if me is not None:
                    body = me.json()
                    self.outcomes.check(
                        "me", body.get("customer_id") == customer_id and body.get("tier") in TIER_IDS, str(body)
                    )
                offers = await call(customer, "me offers", "GET", "/v1/me/offers", headers=bearer, expect=200)
                if offers is not None:
                    self.outcomes.check("me offers", isinstance(offers.json().get("items"), list), offers.text)

    # ------------------------------------------------------------ redemptions

    async def redemptions(self) -> None:
        """Check and redeem each code once; replay some, and try a second use of some, alone or at the same time."""
        rng = random.Random("redemptions")
        codes = list(self.codes)
        rng.shuffle(codes)
        # Paced so the codes last the whole soak, however long it runs.
        interval = self.seconds / max(1, len(codes))
        n = 0
        async with self.client(self.storefront) as client:
            while self.running() and codes:
                n += 1
                code, owner = codes.pop()
                paced = asyncio.create_task(asyncio.sleep(interval))
                check = await self.outcomes.call(
                    client,
                    "code check",
                    "GET",
                    f"/v1/codes/{code}",
                    params={"customer_id": owner, "order_total": REDEMPTION_TOTAL},
                    expect=200,
                )
                if check is not None:
                    self.outcomes.check("code check", check.json().get("valid") is True, check.text)
                first = self._redemption(code, owner, f"{PREFIX}rd-{n}-a")
                second = self._redemption(code, owner, f"{PREFIX}rd-{n}-b")
                if n % 4 == 0:
                    await self._redeem_twice_at_once(client, first, second)
                else:
                    await self._redeem_then_replay_and_reuse(client, first, second, replay=n % 2 == 0)
                await paced

    @staticmethod
    def _redemption(code: str, owner: str, order_id: str) -> dict[str, str]:
        return {"code": code, "customer_id": owner, "order_id": order_id, "order_total": REDEMPTION_TOTAL}

    def _redeemed(self, kind: str, response: httpx.Response, redemption: dict[str, str]) -> None:
        body = response.json()
        if self.outcomes.check(
            kind,
            body.get("code") == redemption["code"] and body.get("order_id") == redemption["order_id"],
            response.text,
        ):
            self.acknowledged.redemptions[int(body["redemption_id"])] = redemption

    async def _redeem_then_replay_and_reuse(
        self, client: httpx.AsyncClient, first: dict[str, str], second: dict[str, str], *, replay: bool
    ) -> None:
        call = self.outcomes.call
        redeemed = await call(client, "redeem", "POST", "/v1/redemptions", json=first, expect=201)
        if redeemed is None:
            return
        self._redeemed("redeem", redeemed, first)
        if replay:
            again = await call(client, "redeem replay", "POST", "/v1/redemptions", json=first, expect=200)
            if again is not None:
                self.outcomes.check(
                    "redeem replay",
                    again.json().get("redemption_id") == redeemed.json()["redemption_id"],
                    f"{again.text} replays {redeemed.text}",
                )
            return
        refused = await call(
            client, "second use", "POST", "/v1/redemptions", json=second, expect=409, problem="code-used-up"
        )
        if refused is not None:
            self.acknowledged.refused_second_uses += 1

    async def _redeem_twice_at_once(
        self, client: httpx.AsyncClient, first: dict[str, str], second: dict[str, str]
    ) -> None:
        """Two checkouts race for a one-use code: exactly one wins, the other gets `code-used-up`."""
        kind = "racing second use"
        started = time.perf_counter()
        try:
            answers = await asyncio.gather(
                client.post("/v1/redemptions", json=first), client.post("/v1/redemptions", json=second)
            )
        except httpx.HTTPError as error:
            self.outcomes.unexpected.append(f"{kind}: {type(error).__name__}: {error}")
            return
        self.outcomes.latencies[kind].append(time.perf_counter() - started)
        statuses = sorted(answer.status_code for answer in answers)
        if not self.outcomes.check(
            kind, statuses == [201, 409], f"statuses {statuses}: {[a.text[:200] for a in answers]}"
        ):
            return
        winner, loser = (0, 1) if answers[0].status_code == 201 else (1, 0)
        if self.outcomes.check(
            kind, is_problem(answers[loser], "code-used-up"), f"refusal {answers[loser].text[:300]}"
        ):
            self.acknowledged.refused_second_uses += 1
        self._redeemed(kind, answers[winner], (first, second)[winner])

    # ------------------------------------------------------------ marketing, in the middle of the traffic

    async def recalculation(self, kind: str, at: float) -> dict[str, Any]:
        """At `at` seconds into the soak, request a full recalculation and follow it to its end; the final run."""
        await asyncio.sleep(max(0.0, self.started + at - time.monotonic()))
        async with self.client(self.marketing) as client:
            requested = await self.outcomes.call(
                client, f"{kind} request", "POST", "/v1/recalculations", json={}, expect=202
            )
            if requested is None:
                return {}
            return await self._follow(client, kind, f"/v1/recalculations/{requested.json()['run_id']}")

    async def campaign_send(self, campaign_id: int) -> dict[str, Any]:
        """Follow a campaign scheduled to send during the soak until its send has completed; the campaign."""
        async with self.client(self.marketing) as client:
            return await self._follow(client, "campaign send", f"/v1/campaigns/{campaign_id}")

    async def _follow(self, client: httpx.AsyncClient, kind: str, url: str) -> dict[str, Any]:
        """Poll a run or a campaign until it has finished (or a generous deadline); notes when it finished."""
        deadline = self.started + self.seconds + 120
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            answer = await self.outcomes.call(client, f"{kind} poll", "GET", url, expect=200)
            body = answer.json() if answer is not None else body
            if body.get("status") in ("succeeded", "failed", "completed", "cancelled"):
                self.finished[kind] = time.monotonic() - self.started
                break
            await asyncio.sleep(0.5)
        return body
