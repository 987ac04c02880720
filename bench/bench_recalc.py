"""Time the full recalculation against the floor no recalculation can beat, and check it scales linearly.

    .venv/bin/python bench/bench_recalc.py [--customers 100000,1000000] [--orders-per-customer 10] [--runs 3]
                                           [--database-url postgresql+asyncpg://postgres@127.0.0.1:5432/postgres]
                                           [--reuse] [--keep]
    .venv/bin/python bench/bench_recalc.py --guard [--customers 20000,80000] [--max-ratio 6]

Default (PostgreSQL): for each size a database ``bench_recalc_<customers>`` is created on the server named by
``--database-url`` (an admin URL), migrated and filled by a generator of its own — customers, orders (Poisson
counts with gamma-distributed rates averaging ``--orders-per-customer``), refunds, reviews and shares, product views
and referrals — loaded with COPY. ``--reuse`` keeps an already-filled database (a 10M-order load takes minutes);
``--keep`` does not drop it afterwards. Then, side by side in one run:

- the floor: one ``SELECT customer_id, count(*), sum(total) FROM customer_order GROUP BY customer_id``, every row
  fetched by the client (median of ``--runs``);
- the real recalculation (``loyalty recalc``'s code path) in a child process, so its peak memory (ru_maxrss) is its
  own: wall seconds, phases and peak MB (median of ``--runs``).

``--guard`` is CI's regression check: the same recalculation on SQLite demo data (``loyalty demo``'s generator) at
two sizes, exit 1 if time at the larger over time at the smaller exceeds ``--max-ratio`` (4x the customers, so 6
allows some slack over linear but fails anything quadratic).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

from loyalty.db.migrate import upgrade_database
from loyalty.db.session import create_engine
from loyalty.settings import Settings

ADMIN_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
SECONDS_PER_DAY = 86_400
MICROS_PER_SECOND = 1_000_000
HISTORY_DAYS = 3 * 365
STORAGE = 10_000  # money is stored in ten-thousandths
CHUNK_CUSTOMERS = 100_000
FLOOR_SQL = "SELECT customer_id, count(*), sum(total) FROM customer_order GROUP BY customer_id"


# ---------------------------------------------------------------- the generator (PostgreSQL, COPY)


def _plain_url(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _database_url(admin_url: str, name: str) -> str:
    return admin_url.rsplit("/", 1)[0] + "/" + name


async def _stage(connection: asyncpg.Connection, name: str, columns: dict[str, str], records: list[Any]) -> None:
    """COPY plain numbers into an unlogged staging table; SQL then shapes them into the service's rows."""
    definition = ", ".join(f"{column} {kind}" for column, kind in columns.items())
    await connection.execute(f"DROP TABLE IF EXISTS {name}; CREATE UNLOGGED TABLE {name} ({definition})")
    await connection.copy_records_to_table(name, records=records, columns=list(columns))


async def generate(url: str, customers: int, orders_per_customer: float, seed: int) -> dict[str, int]:
    """Fill an empty, migrated database; answers the rows written per table."""
    rng = np.random.default_rng(seed)
    now = int(time.time()) * MICROS_PER_SECOND
    connection = await asyncpg.connect(_plain_url(url))
    counts = dict.fromkeys(("customers", "orders", "refunds", "events", "referrals"), 0)
    try:
        for start in range(0, customers, CHUNK_CUSTOMERS):
            size = min(CHUNK_CUSTOMERS, customers - start)
            ids = np.arange(start + 1, start + size + 1, dtype=np.int64)
            joined = now - (rng.random(size) * HISTORY_DAYS * SECONDS_PER_DAY * MICROS_PER_SECOND).astype(np.int64)
            await _stage(
                connection,
                "bench_customer",
                {"id": "bigint", "joined": "bigint"},
                list(zip(ids.tolist(), joined.tolist(), strict=True)),
            )
            await connection.execute(
                """INSERT INTO customer (id, external_id, email, joined_at, attributes, marketing_opt_out,
                                         updated_at, created_at)
                   SELECT id, 'bench-' || id, NULL, to_timestamp(joined / 1e6), '{}', id % 50 = 0, now(), now()
                   FROM bench_customer"""
            )
            counts["customers"] += size

            # Four in five customers buy, as BG/NBD supposes: purchase rates are gamma-distributed, and after each
            # purchase a customer drops out with a beta-distributed probability (so the models can be fitted).
            buyer = rng.random(size) < 0.8
            span_days = (now - joined) / (SECONDS_PER_DAY * MICROS_PER_SECOND)
            rate = rng.gamma(1.0, 0.005 * orders_per_customer, size)
            dropout = rng.beta(1.0, 14.0, size)
            possible = rng.poisson(rate * span_days)
            repeats = np.minimum(possible, rng.geometric(dropout) - 1)
            order_count = np.where(buyer, 1 + repeats, 0)
            # A customer who dropped out bought only in the first part of the span.
            active_share = np.where(repeats < possible, (repeats + 1) / (possible + 1), 1.0)
            owner = np.repeat(np.arange(size), order_count)
            span = ((now - joined[owner]) * active_share[owner]).astype(np.int64)
            placed = joined[owner] + (rng.random(owner.size) * span).astype(np.int64)
            total = (np.rint(rng.lognormal(3.8, 0.7, owner.size) * 100) * (STORAGE // 100)).astype(np.int64)
            order_ids = np.arange(counts["orders"] + 1, counts["orders"] + owner.size + 1, dtype=np.int64)
            refunded_order = rng.random(owner.size) < 0.03
            refund_amount = np.where(
                rng.random(owner.size) < 0.4, total, (total * rng.uniform(0.1, 0.9, owner.size)).astype(np.int64)
            )
            refunded = np.where(refunded_order, np.maximum(refund_amount, 1), 0)
            await _stage(
                connection,
                "bench_order",
                {"id": "bigint", "customer_id": "bigint", "placed": "bigint", "total": "bigint", "refunded": "bigint"},
                list(
                    zip(
                        order_ids.tolist(),
                        ids[owner].tolist(),
                        placed.tolist(),
                        total.tolist(),
                        refunded.tolist(),
                        strict=True,
                    )
                ),
            )
            await connection.execute(
                """INSERT INTO customer_order (id, external_id, customer_id, placed_at, total, refunded, currency,
                                               channel, content_hash, created_at)
                   SELECT id, 'bench-o-' || id, customer_id, to_timestamp(placed / 1e6), total, refunded, 'USD',
                          'web', md5(id::text) || md5(customer_id::text), now()
                   FROM bench_order"""
            )
            await connection.execute(
                """INSERT INTO refund (id, external_id, order_id, customer_id, amount, refunded_at, content_hash,
                                       created_at)
                   SELECT id, 'bench-r-' || id, id, customer_id, refunded,
                          least(to_timestamp(placed / 1e6) + interval '5 days', now()), md5(id::text) || md5('r'), now()
                   FROM bench_order WHERE refunded > 0"""
            )
            counts["orders"] += int(owner.size)
            counts["refunds"] += int(refunded_order.sum())

            # Reviews and shares feed influence; product views feed interests.
            event_owner = np.concatenate([np.flatnonzero(rng.random(size) < 0.3), np.arange(size)])
            kind = np.concatenate([rng.integers(0, 2, event_owner.size - size), np.full(size, 2)])
            occurred = joined[event_owner] + (rng.random(event_owner.size) * (now - joined[event_owner])).astype(
                np.int64
            )
            event_ids = np.arange(counts["events"] + 1, counts["events"] + event_owner.size + 1, dtype=np.int64)
            await _stage(
                connection,
                "bench_event",
                {"id": "bigint", "customer_id": "bigint", "kind": "int", "occurred": "bigint", "target": "int"},
                list(
                    zip(
                        event_ids.tolist(),
                        ids[event_owner].tolist(),
                        kind.tolist(),
                        occurred.tolist(),
                        rng.integers(0, 200, event_owner.size).tolist(),
                        strict=True,
                    )
                ),
            )
            await connection.execute(
                """INSERT INTO interaction_event (id, external_id, customer_id, type, target, occurred_at, created_at)
                   SELECT id, 'bench-e-' || id, customer_id,
                          (ARRAY['review', 'social_share', 'product_view'])[kind + 1], 'category:c' || target,
                          to_timestamp(occurred / 1e6), now()
                   FROM bench_event"""
            )
            counts["events"] += int(event_owner.size)

            # One in twenty is referred by an earlier customer; each is referred at most once.
            referee = np.flatnonzero(rng.random(size) < 0.05) + start + 1
            referee = referee[referee > 1]
            referrer = (rng.random(referee.size) * (referee - 1)).astype(np.int64) + 1
            referral_ids = np.arange(counts["referrals"] + 1, counts["referrals"] + referee.size + 1, dtype=np.int64)
            await _stage(
                connection,
                "bench_referral",
                {"id": "bigint", "referrer": "bigint", "referee": "bigint"},
                list(zip(referral_ids.tolist(), referrer.tolist(), referee.tolist(), strict=True)),
            )
            await connection.execute(
                """INSERT INTO referral (id, referrer_id, referee_id, occurred_at, created_at)
                   SELECT r.id, r.referrer, r.referee, c.joined_at, now()
                   FROM bench_referral r JOIN customer c ON c.id = r.referee"""
            )
            counts["referrals"] += int(referee.size)
            print(
                f"\r  loaded {start + size:,} / {customers:,} customers, {counts['orders']:,} orders",
                end="",
                file=sys.stderr,
                flush=True,
            )
        print(file=sys.stderr)
        for name in ("bench_customer", "bench_order", "bench_event", "bench_referral"):
            await connection.execute(f"DROP TABLE IF EXISTS {name}")
        for table in ("customer", "customer_order", "refund", "interaction_event", "referral"):
            await connection.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
            )
        await connection.execute("VACUUM ANALYZE")
    finally:
        await connection.close()
    return counts


async def _filled(url: str) -> int:
    connection = await asyncpg.connect(_plain_url(url))
    try:
        return int(await connection.fetchval("SELECT count(*) FROM customer"))
    finally:
        await connection.close()


async def prepare_postgres(admin_url: str, customers: int, orders_per_customer: float, reuse: bool) -> str:
    name = f"bench_recalc_{customers}"
    url = _database_url(admin_url, name)
    admin = await asyncpg.connect(_plain_url(admin_url))
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists and reuse:
            try:
                if await _filled(url) == customers:
                    print(f"reusing {name}", file=sys.stderr)
                    return url
            except asyncpg.PostgresError:
                pass
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    engine = create_engine(Settings(database_url=url))
    try:
        await upgrade_database(engine)
    finally:
        await engine.dispose()
    began = time.perf_counter()
    counts = await generate(url, customers, orders_per_customer, seed=customers)
    print(f"  generated {counts} in {time.perf_counter() - began:.1f} s", file=sys.stderr)
    return url


async def drop_postgres(admin_url: str, customers: int) -> None:
    admin = await asyncpg.connect(_plain_url(admin_url))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "bench_recalc_{customers}" WITH (FORCE)')
    finally:
        await admin.close()


async def floor_seconds(url: str) -> float:
    connection = await asyncpg.connect(_plain_url(url))
    try:
        began = time.perf_counter()
        rows = await connection.fetch(FLOOR_SQL)
        assert rows
        return time.perf_counter() - began
    finally:
        await connection.close()


async def order_count(url: str) -> int:
    connection = await asyncpg.connect(_plain_url(url))
    try:
        return int(await connection.fetchval("SELECT count(*) FROM customer_order"))
    finally:
        await connection.close()


# ---------------------------------------------------------------- the recalculation, in a child process


def recalc_in_child(url: str) -> dict[str, Any]:
    """One full recalculation in a fresh process: wall seconds, phases and that process's peak memory."""
    env = {**os.environ, "LOYALTY_DATABASE_URL": url, "LOYALTY_SECRET_KEY": "b" * 48, "LOYALTY_LOG_LEVEL": "WARNING"}
    completed = subprocess.run(
        [sys.executable, __file__, "--child"], env=env, capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        sys.exit(f"recalculation failed:\n{completed.stdout}\n{completed.stderr}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def child() -> None:
    import resource

    from loyalty.cli import _recalculate
    from loyalty.settings import get_settings
    from loyalty.tiers.config import load_tiers

    settings = get_settings()
    tiers = load_tiers(settings.tiers_file)

    async def work() -> Any:
        engine = create_engine(settings)
        try:
            if settings.is_sqlite:
                await upgrade_database(engine)
            return await _recalculate(engine, settings, tiers, None, False)
        finally:
            await engine.dispose()

    began = time.perf_counter()
    run = asyncio.run(work())
    seconds = time.perf_counter() - began
    if run is None or run.status != "succeeded":
        sys.exit(f"run did not succeed: {run}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "phases": run.phases, "customers": run.customers, "peak_mb": peak_mb}))


def _median_run(url: str, runs: int) -> tuple[float, dict[str, Any]]:
    results = []
    for number in range(1, runs + 1):
        result = recalc_in_child(url)
        # Each run on its own line: the first on freshly loaded data also writes every customer's first tier.
        phases = " ".join(f"{name} {seconds:.2f}" for name, seconds in result["phases"].items())
        print(f"  run {number}: {result['seconds']:.2f} s, peak {result['peak_mb']:.0f} MB, {phases}", file=sys.stderr)
        results.append(result)
    results.sort(key=lambda result: result["seconds"])
    middle = results[len(results) // 2]
    return float(middle["seconds"]), middle


# ---------------------------------------------------------------- the two modes


def bench_postgres(arguments: argparse.Namespace) -> None:
    sizes = [int(size) for size in arguments.customers.split(",")]
    rows = []
    for customers in sizes:
        print(f"== {customers:,} customers", file=sys.stderr)
        url = asyncio.run(
            prepare_postgres(arguments.database_url, customers, arguments.orders_per_customer, arguments.reuse)
        )
        orders = asyncio.run(order_count(url))
        floors = [asyncio.run(floor_seconds(url)) for _ in range(arguments.runs)]
        seconds, run = _median_run(url, arguments.runs)
        floor = statistics.median(floors)
        rows.append((customers, orders, floor, seconds, run))
        print(f"  floor {floor:.2f} s, recalculation {seconds:.2f} s, phases {run['phases']}", file=sys.stderr)
        if not arguments.keep:
            asyncio.run(drop_postgres(arguments.database_url, customers))
    print(f"{'customers':>10} {'orders':>11} {'floor s':>8} {'recalc s':>9} {'x floor':>8} {'peak MB':>8}  phases")
    for customers, orders, floor, seconds, run in rows:
        phases = " ".join(f"{name} {value:.2f}" for name, value in run["phases"].items())
        print(
            f"{customers:>10,} {orders:>11,} {floor:>8.2f} {seconds:>9.2f} {seconds / floor:>8.1f} "
            f"{run['peak_mb']:>8.0f}  {phases}"
        )


def guard(arguments: argparse.Namespace) -> None:
    from loyalty.demo.generator import load_demo

    sizes = [int(size) for size in arguments.customers.split(",")]
    small, large = sizes
    with tempfile.TemporaryDirectory() as directory:
        urls = {size: f"sqlite+aiosqlite:///{Path(directory) / f'guard-{size}.db'}" for size in sizes}

        async def load(url: str, customers: int) -> None:
            engine = create_engine(Settings(database_url=url))
            try:
                await upgrade_database(engine)
                await load_demo(engine, customers=customers, seed=11)
            finally:
                await engine.dispose()

        for size in sizes:
            asyncio.run(load(urls[size], size))
        # The two sizes take turns, so that a burst of load on a shared machine falls on both alike.
        results: dict[int, list[dict[str, Any]]] = {size: [] for size in sizes}
        for _ in range(arguments.runs):
            for size in sizes:
                results[size].append(recalc_in_child(urls[size]))
    timings = {}
    for size in sizes:
        seconds = statistics.median(result["seconds"] for result in results[size])
        timings[size] = seconds
        phases = min(results[size], key=lambda result: abs(result["seconds"] - seconds))["phases"]
        print(f"{size:>8,} customers: recalculation {seconds:.2f} s (median of {arguments.runs})  phases {phases}")
    ratio = timings[large] / timings[small]
    print(f"ratio {large:,}/{small:,}: {ratio:.2f} (limit {arguments.max_ratio})")
    if ratio > arguments.max_ratio:
        sys.exit(f"recalculation grows worse than linearly: ratio {ratio:.2f} > {arguments.max_ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--customers", default=None, help="comma-separated sizes")
    parser.add_argument("--orders-per-customer", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--database-url", default=ADMIN_URL)
    parser.add_argument("--reuse", action="store_true", help="keep an already-filled database of the same size")
    parser.add_argument("--keep", action="store_true", help="do not drop the databases afterwards")
    parser.add_argument("--guard", action="store_true", help="CI's linearity check on SQLite")
    parser.add_argument("--max-ratio", type=float, default=6.0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        child()
    elif arguments.guard:
        arguments.customers = arguments.customers or "20000,80000"
        guard(arguments)
    else:
        arguments.customers = arguments.customers or "100000,1000000"
        bench_postgres(arguments)


if __name__ == "__main__":
    main()
