"""Concurrency through a real server process (uvicorn), not only the in-process test client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import running_server


@pytest.fixture
async def server(settings: Any, engine: Any, tmp_path: Path) -> AsyncIterator[str]:
    async with running_server(settings, tmp_path / "serve.log") as base:
        yield base


def _order(order_id: str, customer_id: str) -> dict[str, Any]:
    return {
        "order_id": order_id,
        "customer_id": customer_id,
        "placed_at": "2026-03-01T10:00:00Z",
        "total": "25.00",
        "currency": "USD",
    }


@pytest.mark.slow
async def test_fifty_concurrent_orders_through_a_real_server(server, storefront) -> None:
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(base_url=server, headers=storefront, limits=limits, timeout=60) as client:
        different = await asyncio.gather(*(client.post("/v1/orders", json=_order(f"o-{i}", "c-1")) for i in range(50)))
        assert [r.status_code for r in different] == [201] * 50, [r.text for r in different if r.status_code != 201]
        same = await asyncio.gather(*(client.post("/v1/orders", json=_order("o-same", "c-2")) for _ in range(50)))
        statuses = sorted(r.status_code for r in same)
        assert statuses == [200] * 49 + [201], statuses
        detail = await client.get("/v1/customers/c-1/tier")
        assert detail.json()["tier"] in ("nurture", "one_time")
