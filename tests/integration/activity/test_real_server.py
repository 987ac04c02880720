"""Concurrency through a real server process (uvicorn), not only the in-process test client."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from loyalty.settings import PROJECT_ROOT


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def server(settings: Any, engine: Any) -> AsyncIterator[str]:
    port = _free_port()
    environment = {
        **os.environ,
        "LOYALTY_DATABASE_URL": settings.database_url,
        "LOYALTY_SECRET_KEY": settings.secret_key,
        "LOYALTY_TIERS_FILE": str(settings.tiers_file),
        "LOYALTY_LOG_FORMAT": "plain",
        "LOYALTY_LOG_LEVEL": "WARNING",
        "LOYALTY_SCHEDULER_ENABLED": "false",
    }
    process = subprocess.Popen(  # noqa: ASYNC220 (a real server process is the point of this test)
        [sys.executable, "-m", "loyalty.cli", "serve", "--port", str(port)],
        env=environment,
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                try:
                    if (await client.get(f"{base}/health/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None:
                    pytest.fail(f"server exited: {process.stderr.read().decode()[-2000:] if process.stderr else ''}")
                await asyncio.sleep(0.2)
            else:
                pytest.fail("server did not become ready")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


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
