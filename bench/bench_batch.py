"""Time `POST /v1/orders/batch` through the real application, in process.

    .venv/bin/python bench/bench_batch.py [--orders 20000] [--batch-sizes 100,1000] [--runs 3] [--concurrency 1]
                                          [--postgres-url URL | --sqlite] [--replay]

The application as `loyalty serve` builds it (``create_server_app``, with its middleware, guards, one transaction
per request, the real-time re-score and its settled garbage collector) is driven through an in-process ASGI
client, so the figures are the server's work without a network or a second process competing for the two cores.
Bodies are encoded before the clock starts.

PostgreSQL by default: ``--postgres-url`` is an admin URL (default ``postgresql+asyncpg://postgres@127.0.0.1:5432/
postgres``) where a scratch database ``bench_ingest_<random>`` is created, migrated and dropped at the end.
``--sqlite`` uses a fresh SQLite file in a temporary directory instead. Each run posts ``--orders`` new orders
(one to three items each, five orders per customer, so a batch also creates customers) in batches of each size,
and prints orders/s per run and the median, plus the share of the request time spent in the real-time re-score.
``--replay`` posts every batch a second time, to time the idempotent path where every order is a replay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from litestar.testing import AsyncTestClient
from prometheus_client import REGISTRY
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from loyalty.access.services import create_key
from loyalty.app import create_server_app
from loyalty.db.migrate import upgrade_database
from loyalty.db.session import create_engine, create_session_maker, transaction
from loyalty.settings import PROJECT_ROOT, Settings

DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
ITEMS = (("TOP-101", "tops", "30.00"), ("SHO-102", "shoes", "40.00"), ("ACC-103", "accessories", "12.50"))
RESCORE_SECONDS = "loyalty_rescore_duration_seconds_sum"


def order_bodies(orders: int, batch_size: int) -> list[bytes]:
    """Encoded batch bodies of new orders, ids unique to this call."""
    tag = uuid.uuid4().hex[:8]
    batch: list[dict[str, Any]] = []
    bodies: list[bytes] = []
    for number in range(orders):
        lines = 1 + number % 3
        batch.append(
            {
                "order_id": f"{tag}-o-{number}",
                "customer_id": f"{tag}-c-{number // 5}",
                "placed_at": f"2024-{1 + number // 28 % 12:02d}-{1 + number % 28:02d}T{number % 24:02d}:15:00+01:00",
                "total": f"{sum(float(ITEMS[line][2]) for line in range(lines)):.2f}",
                "currency": "USD",
                "items": [
                    {"sku": sku, "category": category, "quantity": 1, "unit_price": price}
                    for sku, category, price in ITEMS[:lines]
                ],
                "channel": "web",
            }
        )
        if len(batch) == batch_size:
            bodies.append(json.dumps({"orders": batch}).encode())
            batch = []
    if batch:
        bodies.append(json.dumps({"orders": batch}).encode())
    return bodies


@asynccontextmanager
async def scratch_database(arguments: argparse.Namespace) -> AsyncIterator[str]:
    """A migrated database for the run, removed afterwards."""
    if arguments.sqlite:
        with tempfile.TemporaryDirectory(prefix="loyalty-bench-batch-") as directory:
            url = f"sqlite+aiosqlite:///{Path(directory) / 'batch.db'}"
            await migrate(url)
            yield url
        return
    admin_url = make_url(arguments.postgres_url)
    name = f"bench_ingest_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            await connection.execute(text(f'CREATE DATABASE "{name}"'))
        url = admin_url.set(database=name).render_as_string(hide_password=False)
        try:
            await migrate(url)
            yield url
        finally:
            async with admin.connect() as connection:
                await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()


async def migrate(url: str) -> None:
    engine = create_engine(Settings(database_url=url))
    try:
        await upgrade_database(engine)
    finally:
        await engine.dispose()


async def storefront_key(settings: Settings) -> str:
    engine = create_engine(settings)
    try:
        async with transaction(create_session_maker(engine)) as session:
            _key, plain = await create_key(session, f"bench {uuid.uuid4().hex[:6]}", "storefront")
        return plain
    finally:
        await engine.dispose()


async def post_all(
    client: AsyncTestClient[Any], bodies: list[bytes], headers: dict[str, str], concurrency: int
) -> tuple[float, dict[str, int]]:
    """Post every body, ``concurrency`` requests in flight; answers the seconds and the summed counts."""
    queue = list(reversed(bodies))
    totals = {"created": 0, "replayed": 0, "failed": 0}

    async def worker() -> None:
        while queue:
            body = queue.pop()
            response = await client.post("/v1/orders/batch", content=body, headers=headers)
            if response.status_code != 200:
                sys.exit(f"batch failed: {response.status_code} {response.text[:500]}")
            result = response.json()
            for name in totals:
                totals[name] += result[name]

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, totals


async def bench(arguments: argparse.Namespace) -> None:
    async with scratch_database(arguments) as url:
        settings = Settings(
            database_url=url,
            secret_key="bench-secret-key-that-is-long-enough-for-hs256-0123456789",
            tiers_file=PROJECT_ROOT / "config" / "tiers.toml",
            scheduler_enabled=False,
            log_format="plain",
            log_level="WARNING",
            rate_limit=1_000_000_000,
            _env_file=None,  # type: ignore[call-arg]
        )
        headers = {"X-API-Key": await storefront_key(settings), "content-type": "application/json"}
        database = "SQLite" if arguments.sqlite else "PostgreSQL"
        async with AsyncTestClient(app=create_server_app(settings)) as client:
            for batch_size in arguments.batch_sizes:
                labels = ("new", "replay") if arguments.replay else ("new",)
                rates: dict[str, list[float]] = {label: [] for label in labels}
                rescore_shares: list[float] = []
                for run in range(arguments.runs):
                    bodies = order_bodies(arguments.orders, batch_size)
                    rescored_before = REGISTRY.get_sample_value(RESCORE_SECONDS) or 0.0
                    seconds, totals = await post_all(client, bodies, headers, arguments.concurrency)
                    rescore_seconds = (REGISTRY.get_sample_value(RESCORE_SECONDS) or 0.0) - rescored_before
                    if totals["created"] != arguments.orders:
                        sys.exit(f"expected {arguments.orders} created, got {totals}")
                    rates["new"].append(arguments.orders / seconds)
                    # Concurrent requests overlap, so the share is of the summed request time, roughly.
                    rescore_shares.append(rescore_seconds / (seconds * arguments.concurrency))
                    line = (
                        f"{database} batch {batch_size:>5}  run {run + 1}: {arguments.orders:,} new orders in "
                        f"{seconds:.2f} s = {arguments.orders / seconds:,.0f} orders/s "
                        f"(re-score {rescore_seconds:.2f} s)"
                    )
                    if arguments.replay:
                        seconds, totals = await post_all(client, bodies, headers, arguments.concurrency)
                        if totals["replayed"] != arguments.orders:
                            sys.exit(f"expected {arguments.orders} replayed, got {totals}")
                        rates["replay"].append(arguments.orders / seconds)
                        line += f"; replayed in {seconds:.2f} s = {arguments.orders / seconds:,.0f} orders/s"
                    print(line, flush=True)
                summary = ", ".join(f"{label} {statistics.median(values):,.0f}" for label, values in rates.items())
                print(
                    f"== {database} batch {batch_size}, concurrency {arguments.concurrency}: median orders/s: "
                    f"{summary}; re-score {statistics.median(rescore_shares):.0%} of the time",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description="Time POST /v1/orders/batch through the real app, in process.")
    parser.add_argument("--orders", type=int, default=20_000, help="new orders per run and batch size")
    parser.add_argument(
        "--batch-sizes", type=lambda value: [int(size) for size in value.split(",")], default=[100, 1000]
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL, help="admin URL for the scratch database")
    parser.add_argument("--sqlite", action="store_true", help="a fresh SQLite file instead of PostgreSQL")
    parser.add_argument("--replay", action="store_true", help="post every batch again (all replays)")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
