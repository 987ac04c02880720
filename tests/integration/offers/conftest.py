"""Fixtures for offer tests: a scored shop and a way to run the dispatch job as the scheduler would."""

from __future__ import annotations

from typing import Any

import pytest

from loyalty.demo.generator import load_demo
from loyalty.offers.dispatch import OfferJobs


@pytest.fixture
def dispatch_due(session_maker: Any, settings: Any) -> Any:
    """Run `offers.dispatch_due` once on the test's own engine (the app's timer is off in most tests)."""

    async def run() -> dict[str, Any]:
        return await OfferJobs(session_maker, settings.timezone, settings.recalc_lease_seconds).dispatch_due()

    return run


@pytest.fixture
async def scored_shop(engine: Any, client: Any, keys: Any, run_due: Any) -> None:
    """3,000 generated customers, scored and tiered by a full run."""
    await load_demo(engine, customers=3000, seed=5)
    response = await client.post("/v1/recalculations", json={}, headers=keys.headers("marketing"))
    assert response.status_code == 202
    await run_due()
