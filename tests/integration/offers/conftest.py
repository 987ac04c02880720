"""Fixtures for offer tests: a scored shop and a way to run the dispatch job as the scheduler would."""

from __future__ import annotations

from typing import Any

import pytest

from loyalty.demo.generator import load_demo


@pytest.fixture
async def scored_shop(engine: Any, client: Any, keys: Any, run_due: Any) -> None:
    """3,000 generated customers, scored and tiered by a full run."""
    await load_demo(engine, customers=3000, seed=5)
    response = await client.post("/v1/recalculations", json={}, headers=keys.headers("marketing"))
    assert response.status_code == 202
    await run_due()
