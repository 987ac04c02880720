"""The service's own Prometheus metrics on /metrics: runs and phases, campaign sends, re-scores, the pool.

Metrics are process-wide and other tests move them too, so each check compares a scrape after the work with
one taken before it, and the differences with what the database says happened.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from loyalty.db.models import CampaignMember, IssuedCode
from loyalty.ops import metrics

NOW = datetime.now(UTC).replace(microsecond=0)
PHASES = ("aggregate", "fit", "score", "rules", "write", "effects")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: Any) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def order(order_id: str, customer_id: str, days_ago: float, total: str) -> dict[str, Any]:
    return {
        "order_id": order_id,
        "customer_id": customer_id,
        "placed_at": (NOW - timedelta(days=days_ago)).isoformat(),
        "total": total,
        "currency": "USD",
    }


async def seed_shop(client: Any, headers: dict[str, str]) -> None:
    orders = []
    for i in range(40):
        purchases = 1 if i % 3 == 0 else (2 + i % 4 if i % 3 == 1 else 6 + i % 5)
        for k in range(purchases):
            orders.append(order(f"o-{i:03d}-{k}", f"c-{i:03d}", 300 - k * 25 - i % 7, f"{20 + (i * 7) % 90}.00"))
    response = await client.post("/v1/orders/batch", json={"orders": orders}, headers=headers)
    assert response.json()["failed"] == 0, response.text


async def test_metrics_follow_runs_sends_rescores_and_the_pool(
    client, keys, run_due, dispatch_due, session_maker, database
) -> None:
    storefront, marketing = keys.headers("storefront"), keys.headers("marketing")
    await seed_shop(client, storefront)
    before = await scrape(client)

    requested = await client.post("/v1/recalculations", json={}, headers=marketing)
    assert requested.status_code == 202, requested.text
    await run_due()
    run = (await client.get(f"/v1/recalculations/{requested.json()['run_id']}", headers=marketing)).json()
    assert run["status"] == "succeeded", run
    after_run = await scrape(client)

    runs = "loyalty_recalc_runs_total"
    assert (
        value(after_run, runs, trigger="manual", status="succeeded")
        == value(before, runs, trigger="manual", status="succeeded") + 1
    )
    assert value(after_run, runs, trigger="manual", status="failed") == value(
        before, runs, trigger="manual", status="failed"
    )
    for phase in PHASES:
        count, total = "loyalty_recalc_phase_duration_seconds_count", "loyalty_recalc_phase_duration_seconds_sum"
        assert value(after_run, count, phase=phase) == value(before, count, phase=phase) + 1, phase
        added = value(after_run, total, phase=phase) - value(before, total, phase=phase)
        assert abs(added - run["phases"][phase]) < 1e-3, (phase, added, run["phases"])
        assert value(after_run, "loyalty_recalc_last_run_phase_seconds", phase=phase) == run["phases"][phase]
    duration = "loyalty_recalc_run_duration_seconds_sum"
    run_seconds = value(after_run, duration, status="succeeded") - value(before, duration, status="succeeded")
    assert run_seconds >= sum(run["phases"].values()) - 1e-3
    assert value(after_run, "loyalty_recalc_last_run_customers") == run["customers"] == 40
    # 40 customers cannot support a fit: the run record names the fallback, and the counter saw it.
    assert run["model"]["fallback"]
    fallbacks = "loyalty_recalc_model_fallbacks_total"
    added_fallbacks = sum(
        value(after_run, fallbacks, model=model) - value(before, fallbacks, model=model)
        for model in ("bgnbd", "gamma_gamma")
    )
    named = sum(f"{model}: " in run["model"]["fallback"] for model in ("bgnbd", "gamma_gamma"))
    assert added_fallbacks == named >= 1

    offer = await client.post(
        "/v1/offers",
        json={"name": "metrics-10", "kind": "percent_off", "value": "10", "valid_days": 30},
        headers=marketing,
    )
    assert offer.status_code == 201, offer.text
    campaign = await client.post(
        "/v1/campaigns",
        json={
            "name": "metrics",
            "offer_id": offer.json()["offer_id"],
            "tiers": ["vip", "nurture"],
            "send_at": datetime.now(UTC).isoformat(),
            "holdout_pct": 30,
        },
        headers=marketing,
    )
    assert campaign.status_code == 201, campaign.text
    campaign_id = campaign.json()["campaign_id"]
    await dispatch_due()
    after_send = await scrape(client)
    async with session_maker() as session:
        codes = await session.scalar(
            select(func.count()).select_from(IssuedCode).where(IssuedCode.campaign_id == campaign_id)
        )
        holdout = await session.scalar(
            select(func.count())
            .select_from(CampaignMember)
            .where(CampaignMember.campaign_id == campaign_id, CampaignMember.holdout.is_(True))
        )
    assert codes, codes
    assert holdout, holdout
    sends = "loyalty_campaign_sends_total"
    assert value(after_send, sends, outcome="done") == value(after_run, sends, outcome="done") + 1
    issued = "loyalty_campaign_codes_issued_total"
    assert value(after_send, issued) - value(after_run, issued) == codes
    held = "loyalty_campaign_holdout_members_total"
    assert value(after_send, held) - value(after_run, held) == holdout
    lateness = "loyalty_campaign_send_lateness_seconds_count"
    assert value(after_send, lateness) == value(after_run, lateness) + 1

    placed = await client.post("/v1/orders", json=order("o-new", "c-001", 0, "80.00"), headers=storefront)
    assert placed.status_code in (200, 201), placed.text
    after_order = await scrape(client)
    for name in (
        "loyalty_rescore_calls_total",
        "loyalty_rescore_customers_total",
        "loyalty_rescore_duration_seconds_count",
    ):
        assert value(after_order, name) == value(after_send, name) + 1, name

    dialect = database.dialect
    size = value(after_order, "loyalty_db_pool_size_connections", dialect=dialect)
    checked_out = value(after_order, "loyalty_db_pool_checked_out_connections", dialect=dialect)
    overflow = value(after_order, "loyalty_db_pool_overflow_connections", dialect=dialect)
    assert size >= 2
    assert 0 <= checked_out <= size + overflow
    assert overflow >= 0


def test_a_failing_metric_never_raises() -> None:
    # A negative increment is refused by prometheus_client; the job that recorded it must go on regardless.
    metrics.record_send("done", issued=-1)
    metrics.record_run("manual", "succeeded", 0.1, {"fit": "not a number"}, None)  # type: ignore[dict-item]


async def test_request_metrics_keep_litestars_names_and_labels(client, keys) -> None:
    """Request metrics are recorded by our own middleware now, under the names and labels dashboards already use."""
    badge = {"method": "GET", "path": "/v1/customers/{customer_id}/tier", "app_name": "loyalty"}
    tiers = {**badge, "path": "/v1/tiers"}
    before = await scrape(client)
    assert (await client.get("/v1/customers/nobody/tier", headers=keys.headers("storefront"))).status_code == 404
    assert (await client.get("/v1/tiers")).status_code == 401
    after = await scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("loyalty_requests_total", **badge, status_code="404") == 1
    assert moved("loyalty_requests_total", **tiers, status_code="401") == 1
    assert moved("loyalty_request_duration_seconds_count", **tiers, status_code="401") == 1
    assert moved("loyalty_request_duration_seconds_sum", **tiers, status_code="401") > 0
    # Finished requests are no longer in progress; /metrics itself is never counted.
    assert value(after, "loyalty_requests_in_progress", **badge, status_code="200") == 0
    assert not any(name.startswith("loyalty_request") and ("path", "/metrics") in key for name, key in after)
