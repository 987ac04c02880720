"""Time the demo data generator.

    .venv/bin/python bench/bench_demo.py --customers 100000 [--database-url URL] [--seed N]

Without ``--database-url`` the load goes into a fresh SQLite file in a temporary directory, removed afterwards.
A PostgreSQL URL (``postgresql+asyncpg://...``) must name an existing database without demo data; migrations are
applied first. Prints the rows written per table and the seconds the load took (migrations excluded).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from loyalty.db.migrate import upgrade_database
from loyalty.db.session import create_engine
from loyalty.demo.generator import DemoSummary, load_demo
from loyalty.settings import Settings


def _report_progress(stage: str, done: int, total: int) -> None:
    print(f"\r{stage}: {done:,} / {total:,}", end="\n" if done == total else "", file=sys.stderr, flush=True)


async def _load(database_url: str, customers: int, seed: int) -> DemoSummary:
    engine = create_engine(Settings(database_url=database_url))
    try:
        await upgrade_database(engine)
        return await load_demo(engine, customers=customers, seed=seed, progress=_report_progress)
    finally:
        await engine.dispose()


def _print_summary(database_url: str, summary: DemoSummary) -> None:
    figures = {
        "customers": summary.customers,
        "orders": summary.orders,
        "order_items": summary.order_items,
        "refunds": summary.refunds,
        "events": summary.events,
        "referrals": summary.referrals,
        "rows": summary.rows,
    }
    print(f"{'database':<12} {database_url.split(':', 1)[0]}")
    for name, value in figures.items():
        print(f"{name:<12} {value:>12,}")
    print(f"{'seconds':<12} {summary.seconds:>12.2f}")
    print(f"{'rows/s':<12} {summary.rows / summary.seconds:>12,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Time loading the demo data set.")
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--database-url", help="default: a fresh SQLite file in a temporary directory")
    arguments = parser.parse_args()
    if arguments.database_url:
        summary = asyncio.run(_load(arguments.database_url, arguments.customers, arguments.seed))
        _print_summary(arguments.database_url, summary)
        return
    with tempfile.TemporaryDirectory(prefix="loyalty-bench-demo-") as directory:
        database_url = f"sqlite+aiosqlite:///{Path(directory) / 'demo.db'}"
        summary = asyncio.run(_load(database_url, arguments.customers, arguments.seed))
        _print_summary(database_url, summary)


if __name__ == "__main__":
    main()
