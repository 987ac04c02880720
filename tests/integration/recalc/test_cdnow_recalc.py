"""CDNOW through the API: a recalculation as of the end of the calibration period reproduces the published fit."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).parents[2] / "data" / "cdnow" / "CDNOW_sample.txt"
WEEK = 7.0


def cdnow_orders() -> list[dict[str, Any]]:
    """Each transaction as an order placed at the start of its day (UTC), customer = cohort id."""
    orders = []
    for line_no, line in enumerate(DATA.read_text().splitlines()):
        _master, cohort_id, day, _cds, value = line.split()
        placed = datetime.strptime(day, "%Y%m%d").replace(tzinfo=UTC)
        orders.append(
            {
                "order_id": f"cdnow-{line_no}",
                "customer_id": f"cdnow-{int(cohort_id)}",
                "placed_at": placed.isoformat(),
                "total": f"{float(value):.2f}",
                "currency": "USD",
            }
        )
    return orders


def same_to_3_significant(actual: float, published: float) -> bool:
    return f"{actual:.3g}" == f"{published:.3g}" or abs(actual - published) / abs(published) < 5e-4


@pytest.mark.slow
async def test_cdnow_recalculation_reproduces_published_parameters(client, keys, run_due) -> None:
    storefront, marketing = keys.headers("storefront"), keys.headers("marketing")
    orders = cdnow_orders()
    assert len(orders) == 6919
    for start in range(0, len(orders), 1000):
        response = await client.post(
            "/v1/orders/batch", json={"orders": orders[start : start + 1000]}, headers=storefront
        )
        assert response.status_code == 200
        assert response.json()["failed"] == 0, response.json()["results"][:3]

    requested = await client.post(
        "/v1/recalculations", json={"as_of": "1997-09-30T00:00:00Z", "dry_run": True}, headers=marketing
    )
    assert requested.status_code == 202, requested.text
    await run_due()
    run = (await client.get(f"/v1/recalculations/{requested.json()['run_id']}", headers=marketing)).json()
    assert run["status"] == "succeeded", run["error"]
    assert run["customers"] == 2357
    model = run["model"]
    assert model["fallback"] is None
    assert model["time_unit"] == "day"
    bgnbd, gamma_gamma = model["bgnbd"], model["gamma_gamma"]
    published = {"r": 0.2426, "alpha": 4.4136 * WEEK, "a": 0.7929, "b": 2.4259}
    for name, value in published.items():
        assert same_to_3_significant(bgnbd[name], value), (name, bgnbd[name], value)
    # Published in weeks (-9582.43); in days 2,457 repeat-purchase times are rescaled by 7.
    assert abs(bgnbd["log_likelihood"] - (-9582.43 - 2457 * math.log(WEEK))) < 0.1
    for name, value in {"p": 6.25, "q": 3.74, "gamma": 15.44}.items():
        assert same_to_3_significant(gamma_gamma[name], value), (name, gamma_gamma[name], value)
