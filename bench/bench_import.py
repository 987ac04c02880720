"""Time `loyalty import orders` on a generated generic CSV.

    .venv/bin/python bench/bench_import.py [--rows 1000000] [--database-url URL] [--batch-size N] [--rerun] [--runs N]

Writes a generic order file of ``--rows`` rows (one to three item rows per order, five orders per customer) to a
temporary directory and runs the real command on it in a subprocess (``python -m loyalty.cli import orders``).
Without ``--database-url`` the import goes into a fresh SQLite file beside the CSV; a PostgreSQL URL
(``postgresql+asyncpg://...``) must name an existing database, which is migrated first. Ids carry a per-run tag,
so repeated runs on one database always import new orders. ``--rerun`` imports the same file a second time, to
time the idempotent path where every order is a duplicate. Prints rows, orders and seconds, rows/s, and the CPU
seconds of the import process (the rest of the wall time is the database's work, or waiting for a busy machine).
``--runs N`` repeats everything N times with a new file (and on SQLite a fresh database) and prints the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from loyalty.db.migrate import upgrade_database
from loyalty.db.session import create_engine
from loyalty.settings import Settings

ITEMS = (("TOP-101", "tops", "30.00"), ("SHO-102", "shoes", "40.00"), ("ACC-103", "accessories", "12.50"))


def write_file(path: Path, rows: int) -> int:
    """Write ``rows`` data rows; answers the number of orders."""
    tag = uuid.uuid4().hex[:8]
    written = orders = 0
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("order_id,customer_id,placed_at,total,currency,sku,category,quantity,unit_price\n")
        while written < rows:
            lines = min(1 + orders % 3, rows - written)
            day = 1 + orders % 28
            month = 1 + orders // 28 % 12
            order = (
                f"{tag}-o-{orders},{tag}-c-{orders // 5},2024-{month:02d}-{day:02d}T{orders % 24:02d}:15:00+01:00,"
                f"{82.50 * lines:.2f},USD"
            )
            for line in range(lines):
                sku, category, price = ITEMS[line]
                out.write(f"{order},{sku},{category},{1 + line % 2},{price}\n")
            written += lines
            orders += 1
    return orders


async def migrate(database_url: str) -> None:
    engine = create_engine(Settings(database_url=database_url))
    try:
        await upgrade_database(engine)
    finally:
        await engine.dispose()


def run_import(path: Path, database_url: str, batch_size: int | None) -> tuple[float, float, str]:
    """Answers the wall seconds, the CPU seconds of the import process, and its output."""
    command = [sys.executable, "-m", "loyalty.cli", "import", "orders", str(path)]
    if batch_size:
        command += ["--batch-size", str(batch_size)]
    cpu_before = _children_cpu()
    started = time.perf_counter()
    completed = subprocess.run(
        command,
        env={**os.environ, "LOYALTY_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        sys.exit(f"import failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}")
    return seconds, _children_cpu() - cpu_before, completed.stdout


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bench(directory: Path, rows: int, database_url: str, batch_size: int | None, rerun: bool) -> dict[str, float]:
    """One run: answers the wall seconds of each import."""
    path = directory / "orders.csv"
    started = time.perf_counter()
    orders = write_file(path, rows)
    print(f"wrote {rows:,} rows ({orders:,} orders, {path.stat().st_size / 1e6:.0f} MB) in "
          f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    if not database_url.startswith("sqlite"):
        asyncio.run(migrate(database_url))
    timings: dict[str, float] = {}
    for label in ("import", "re-run") if rerun else ("import",):
        seconds, cpu_seconds, output = run_import(path, database_url, batch_size)
        timings[label] = seconds
        database = database_url.split(":", 1)[0]
        print(f"--- {label} on {database}: {seconds:.1f} s, {rows / seconds:,.0f} rows/s, {orders / seconds:,.0f} "
              f"orders/s (process wall time; import process CPU {cpu_seconds:.1f} s)")  # fmt: skip
        print(output.rstrip())
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description="Time `loyalty import orders` on a generated generic CSV.")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--database-url", help="default: a fresh SQLite file in a temporary directory")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--rerun", action="store_true", help="import the same file again (all duplicates)")
    parser.add_argument("--runs", type=int, default=1, help="repeat and print the median wall times")
    arguments = parser.parse_args()
    runs: list[dict[str, float]] = []
    for _run in range(arguments.runs):
        with tempfile.TemporaryDirectory(prefix="loyalty-bench-import-") as directory:
            database_url = arguments.database_url or f"sqlite+aiosqlite:///{Path(directory) / 'import.db'}"
            runs.append(bench(Path(directory), arguments.rows, database_url, arguments.batch_size, arguments.rerun))
    if arguments.runs > 1:
        for label in runs[0]:
            seconds = statistics.median(run[label] for run in runs)
            each = ", ".join(f"{run[label]:.1f}" for run in runs)
            print(f"=== median {label} of {arguments.runs} runs: {seconds:.1f} s for {arguments.rows:,} rows "
                  f"({arguments.rows / seconds:,.0f} rows/s); runs: {each}")  # fmt: skip


if __name__ == "__main__":
    main()
