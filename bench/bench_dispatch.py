"""Time the dispatch of a VIP campaign send, as the scheduler's `offers.dispatch_due` job runs it.

    .venv/bin/python bench/bench_dispatch.py [--vips 200000] [--others 100000] [--runs 3]
                                             [--database-url URL | --sqlite] [--keep]

Without ``--database-url`` the bench creates a scratch PostgreSQL database ``bench_dispatch_<random>`` on
127.0.0.1:5432 (user postgres) and drops it at the end; ``--sqlite`` uses a fresh SQLite file in a temporary
directory instead. A given URL must name an empty database (PostgreSQL) or a new file (SQLite); it is migrated
and loaded, and kept.

The load writes ``--vips`` eligible VIP customers (customer, customer_score, customer_tier) in bulk — COPY on
PostgreSQL, the driver's executemany on SQLite — plus ``--others`` customers of the other tiers, and a few VIPs a
campaign must never reach: opted out of marketing, or erased. An offer and a campaign with a 10% holdout are made
through the service functions; each run makes a fresh campaign due now and times `OfferJobs.dispatch_due`, the
function the timer calls. Prints, per run and as the median of the runs: members, codes issued, holdout count,
outbox events, seconds and members per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import Table, column, func, select, table, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from loyalty.db.base import Base
from loyalty.db.migrate import upgrade_database
from loyalty.db.models import (
    CampaignMember,
    CampaignSend,
    Customer,
    CustomerScore,
    CustomerTier,
    IssuedCode,
    OutboxEvent,
)
from loyalty.db.session import create_engine, create_session_maker, transaction
from loyalty.offers import schemas
from loyalty.offers.dispatch import OfferJobs
from loyalty.offers.services import create_campaign, create_offer
from loyalty.settings import Settings

SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ROWS_PER_STATEMENT = 50_000
OTHER_TIERS = ("nurture", "one_time", "prospect")
# VIPs the campaign must skip: a hundredth opted out of marketing, a two-hundredth erased (no external id).
OPTED_OUT_SHARE = 100
ERASED_SHARE = 200
HOLDOUT_PCT = 10.0
CUSTOMER, SCORE, TIER = (Base.metadata.tables[model.__tablename__] for model in (Customer, CustomerScore, CustomerTier))


@dataclass(frozen=True)
class Population:
    eligible_vips: int
    excluded_vips: int
    others: int


@dataclass(frozen=True)
class RunFigures:
    members: int
    issued: int
    holdout: int
    events: int
    seconds: float
    # CPU the database server spent on the dispatch (PostgreSQL on this machine only): on a shared machine it
    # tells the work done apart from the waiting for a core.
    server_cpu_seconds: float | None

    @property
    def rate(self) -> float:
        return self.members / self.seconds


class StorageForm:
    """Values in the form each driver takes for the columns written here."""

    def __init__(self, postgres: bool) -> None:
        self.postgres = postgres

    def instant(self, moment: datetime) -> Any:
        # asyncpg wants an aware datetime; SQLAlchemy keeps SQLite datetimes as UTC text in exactly this form.
        return moment if self.postgres else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")

    def flag(self, value: bool) -> Any:
        return value if self.postgres else int(value)


def column_defaults(target: Table, form: StorageForm) -> dict[str, Any]:
    """Each column's model default in storage form: COPY and raw executemany apply none of them."""
    defaults: dict[str, Any] = {}
    for each in target.columns:
        default = each.default
        if default is None or not default.is_scalar:
            defaults[each.name] = None
        elif isinstance(default.arg, Decimal):
            defaults[each.name] = 0  # Money is stored as integer ten-thousandths
        elif isinstance(default.arg, bool):
            defaults[each.name] = form.flag(default.arg)
        else:
            defaults[each.name] = default.arg
    return defaults


def rows_for(target: Table, form: StorageForm, values: Sequence[dict[str, Any]]) -> tuple[list[str], list[tuple]]:
    defaults = column_defaults(target, form)
    names = list(defaults)
    return names, [tuple(row.get(name, defaults[name]) for name in names) for row in values]


async def write(
    connection: AsyncConnection, form: StorageForm, target: Table, values: Sequence[dict[str, Any]]
) -> None:
    """Bulk-insert: COPY on PostgreSQL, the driver's executemany on SQLite."""
    names, rows = rows_for(target, form, values)
    batches = [rows[start : start + ROWS_PER_STATEMENT] for start in range(0, len(rows), ROWS_PER_STATEMENT)]
    if form.postgres:
        driver = (await connection.get_raw_connection()).driver_connection
        assert driver is not None
        for batch in batches:
            await driver.copy_records_to_table(target.name, records=batch, columns=names)
    else:
        statement = str(
            table(target.name, *(column(name) for name in names)).insert().compile(dialect=connection.dialect)
        )
        for batch in batches:
            await connection.exec_driver_sql(statement, batch)


async def load_customers(engine: AsyncEngine, vips: int, others: int) -> Population:
    """Customers with scores and a current tier, ids 1..n, as a recalculation would have left them."""
    now = datetime.now(UTC)
    excluded = vips // OPTED_OUT_SHARE + vips // ERASED_SHARE
    total = vips + excluded + others
    async with engine.begin() as connection:
        form = StorageForm(connection.dialect.name == "postgresql")
        stamp, joined, empty = form.instant(now), form.instant(now - timedelta(days=400)), json.dumps({})
        customers, scores, tiers = [], [], []
        for customer_id in range(1, total + 1):
            if customer_id <= vips + excluded:
                tier, value_score = "vip", 90.0 + customer_id % 10
            else:
                tier, value_score = OTHER_TIERS[customer_id % len(OTHER_TIERS)], float(customer_id % 90)
            excluded_kind = customer_id - vips if vips < customer_id <= vips + excluded else 0
            erased = excluded_kind > vips // OPTED_OUT_SHARE
            customers.append(
                {
                    "id": customer_id,
                    "external_id": None if erased else f"bench-{customer_id:08d}",
                    "email": None if erased else f"bench-{customer_id}@example.com",
                    "joined_at": joined,
                    "attributes": empty,
                    "marketing_opt_out": form.flag(0 < excluded_kind <= vips // OPTED_OUT_SHARE),
                    "updated_at": stamp,
                    "erased_at": stamp if erased else None,
                    "created_at": stamp,
                }
            )
            scores.append(
                {
                    "customer_id": customer_id,
                    "as_of": stamp,
                    "computed_at": stamp,
                    "value_score": value_score,
                    "frequency_score": float(customer_id % 100),
                    "influence_score": float(customer_id % 50),
                    "paid_orders": 1 + customer_id % 7,
                    "interests": json.dumps([]),
                }
            )
            tiers.append(
                {
                    "customer_id": customer_id,
                    "tier": tier,
                    "since": stamp,
                    "qualified_tier": tier,
                    "explanation": "bench",
                    "progress": empty,
                    "updated_at": stamp,
                }
            )
        await write(connection, form, CUSTOMER, customers)
        await write(connection, form, SCORE, scores)
        await write(connection, form, TIER, tiers)
        if form.postgres:
            await connection.exec_driver_sql(
                "SELECT setval(pg_get_serial_sequence('customer', 'id'), max(id)) FROM customer"
            )
            await connection.exec_driver_sql("ANALYZE")
    return Population(eligible_vips=vips, excluded_vips=excluded, others=others)


async def count(session: AsyncSession, model: type[Base], *where: ColumnElement[bool]) -> int:
    return int(await session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


async def one_run(
    session_maker: async_sessionmaker[AsyncSession], jobs: OfferJobs, offer_id: int, number: int
) -> RunFigures:
    """A fresh campaign due now, dispatched by the scheduler's job; answers what the send produced and its time."""
    async with transaction(session_maker) as session:
        campaign = await create_campaign(
            session,
            schemas.CampaignCreate(
                name=f"bench VIP {number}",
                offer_id=offer_id,
                tiers=["vip"],
                send_at=datetime.now(UTC),
                holdout_pct=HOLDOUT_PCT,
            ),
            jobs.timezone,
        )
    async with session_maker() as session:
        events_before = await count(session, OutboxEvent, OutboxEvent.event_type == "offer.issued")
        backends = await server_backends(session)
    cpu_before = server_cpu(backends)
    started = time.perf_counter()
    summary = await jobs.dispatch_due()
    seconds = time.perf_counter() - started
    cpu_after = server_cpu(backends)
    server_cpu_seconds = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    sends = summary.get("sends", [])
    if len(sends) != 1 or sends[0]["status"] != "done":
        sys.exit(f"expected one completed send, the job answered {summary}")
    async with session_maker() as session:
        send_id = await session.scalar(select(CampaignSend.id).where(CampaignSend.campaign_id == campaign.campaign_id))
        members = await count(session, CampaignMember, CampaignMember.send_id == send_id)
        holdout = await count(session, CampaignMember, CampaignMember.send_id == send_id, CampaignMember.holdout)
        issued = await count(session, IssuedCode, IssuedCode.send_id == send_id)
        events = await count(session, OutboxEvent, OutboxEvent.event_type == "offer.issued") - events_before
    return RunFigures(members, issued, holdout, events, seconds, server_cpu_seconds)


async def server_backends(session: AsyncSession) -> list[int]:
    """The server processes of the bench's connections (the pool's; the job reuses them)."""
    if session.get_bind().dialect.name != "postgresql":
        return []
    return list(
        (await session.scalars(text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"))).all()
    )


def server_cpu(backends: list[int]) -> float | None:
    """User plus system CPU seconds of those processes, if they run on this machine and can be read."""
    if not backends:
        return None
    ticks = 0
    try:
        for pid in backends:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    except OSError:
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


async def bench(database_url: str, vips: int, others: int, runs: int) -> None:
    engine = create_engine(Settings(database_url=database_url))
    try:
        started = time.perf_counter()
        await upgrade_database(engine)
        migrated = time.perf_counter()
        population = await load_customers(engine, vips, others)
        print(f"{engine.dialect.name}: migrated in {migrated - started:.1f} s; loaded {population.eligible_vips:,} "
              f"eligible VIPs, {population.excluded_vips:,} opted-out or erased VIPs and {population.others:,} "
              f"others in {time.perf_counter() - migrated:.1f} s")  # fmt: skip
        session_maker = create_session_maker(engine)
        jobs = OfferJobs(session_maker, "UTC", lease_seconds=600)
        async with transaction(session_maker) as session:
            offer = await create_offer(
                session,
                schemas.OfferCreate(
                    name=f"bench-vip-{uuid.uuid4().hex[:8]}", kind="percent_off", value=Decimal(15), valid_days=30
                ),
            )
        figures = []
        for number in range(1, runs + 1):
            run = await one_run(session_maker, jobs, offer.offer_id, number)
            figures.append(run)
            print(
                f"run {number}: members {run.members:,}, codes issued {run.issued:,}, holdout {run.holdout:,}, "
                f"outbox events {run.events:,}, {run.seconds:.2f} s, {run.rate:,.0f} rows/s{cpu_note(run)}"
            )
            problems = check(run, population)
            if problems:
                sys.exit(f"run {number} is wrong: {'; '.join(problems)}")
        median = statistics.median(run.seconds for run in figures)
        cpu = [run.server_cpu_seconds for run in figures if run.server_cpu_seconds is not None]
        cpu_median = f", server CPU {statistics.median(cpu):.2f} s" if cpu else ""
        # Every run dispatches to the same customers, so the counts differ only in the holdout of each campaign.
        typical = sorted(figures, key=lambda run: run.seconds)[len(figures) // 2]
        print(f"--- median of {runs}: members {typical.members:,}, codes issued {typical.issued:,}, holdout "
              f"{typical.holdout:,}, outbox events {typical.events:,}, {median:.2f} s, "
              f"{typical.members / median:,.0f} rows/s{cpu_median}")  # fmt: skip
    finally:
        await engine.dispose()


def cpu_note(run: RunFigures) -> str:
    return "" if run.server_cpu_seconds is None else f" (server CPU {run.server_cpu_seconds:.2f} s)"


def check(run: RunFigures, population: Population) -> list[str]:
    problems = []
    if run.members != population.eligible_vips:
        problems.append(f"{run.members} members for {population.eligible_vips} eligible VIPs")
    if run.issued + run.holdout != run.members:
        problems.append(f"{run.issued} codes + {run.holdout} holdout != {run.members} members")
    if run.events != run.issued:
        problems.append(f"{run.events} offer.issued events for {run.issued} codes")
    expected = population.eligible_vips * HOLDOUT_PCT / 100
    if abs(run.holdout - expected) > 5 * expected**0.5 + 10:
        problems.append(f"holdout {run.holdout} far from {expected:.0f}")
    return problems


async def create_scratch_database() -> tuple[str, str]:
    name = f"bench_dispatch_{uuid.uuid4().hex[:10]}"
    server = await asyncpg.connect(SERVER_URL)
    try:
        await server.execute(f'CREATE DATABASE "{name}"')
    finally:
        await server.close()
    return name, f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"


async def drop_scratch_database(name: str) -> None:
    server = await asyncpg.connect(SERVER_URL)
    try:
        await server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Time a VIP campaign dispatch as the scheduler runs it.")
    parser.add_argument("--vips", type=int, default=200_000, help="eligible VIP customers")
    parser.add_argument("--others", type=int, default=100_000, help="customers of the other tiers")
    parser.add_argument("--runs", type=int, default=3, help="dispatches timed, each of a fresh campaign")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--database-url", help="an empty PostgreSQL database or a new SQLite file (kept)")
    target.add_argument("--sqlite", action="store_true", help="a fresh SQLite file in a temporary directory")
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch PostgreSQL database (its name is printed)"
    )
    arguments = parser.parse_args()
    if arguments.database_url:
        asyncio.run(bench(arguments.database_url, arguments.vips, arguments.others, arguments.runs))
    elif arguments.sqlite:
        with tempfile.TemporaryDirectory(prefix="loyalty-bench-dispatch-") as directory:
            url = f"sqlite+aiosqlite:///{Path(directory) / 'dispatch.db'}"
            asyncio.run(bench(url, arguments.vips, arguments.others, arguments.runs))
    else:
        name, url = asyncio.run(create_scratch_database())
        try:
            asyncio.run(bench(url, arguments.vips, arguments.others, arguments.runs))
        finally:
            if arguments.keep:
                print(f"kept scratch database {name}")
            else:
                asyncio.run(drop_scratch_database(name))


if __name__ == "__main__":
    main()
