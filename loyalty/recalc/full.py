"""The full recalculation: aggregate in the database, fit once, score, apply the rules, write in bulk.

Reads happen first; every write (scores, tiers, history and the run record) happens in one transaction at the
end, so a run that dies at any point leaves the previous tiers exactly as they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from loyalty.db.models import CustomerTier, RecalcRun
from loyalty.db.session import READ_ONLY_OPTION, read_only, transaction
from loyalty.db.staging import driver_in_transaction, is_postgres_connection
from loyalty.lib.clock import utcnow
from loyalty.offers.welcome import issue_welcome_offers
from loyalty.ops import metrics
from loyalty.recalc import runs, staged
from loyalty.recalc.assignments import TIER_STATE_COLUMNS
from loyalty.scheduling.leases import LeaseLostError, keep_lease, renew_claim
from loyalty.scoring.config import ScoringConfig
from loyalty.scoring.figures import (
    Figures,
    ReferralFigures,
    load_figures,
    load_interest_texts,
    load_referral_edges,
    referral_figures,
)
from loyalty.scoring.scores import (
    Scores,
    fit_models,
    mean_order_value,
    model_record,
    rank_exactly,
    score_inputs,
)
from loyalty.tiers.badge_cache import forget_every_badge
from loyalty.tiers.config import TiersConfig
from loyalty.webhooks.outbox import HistorySelection, announce_tier_changes

logger = logging.getLogger("loyalty.recalc")
WRITE_CHUNK = 5_000


@dataclass
class PhaseTimer:
    phases: dict[str, float] = field(default_factory=dict)

    @contextlib.asynccontextmanager
    async def phase(self, name: str) -> AsyncIterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = round(self.phases.get(name, 0.0) + time.perf_counter() - started, 4)


@dataclass
class Population:
    """Everything a full run knows before it applies the rules."""

    figures: Figures
    referrals: ReferralFigures
    scores: Scores
    cutoffs: dict[str, list[float]]
    interests: dict[int, str]  # as JSON text
    model: dict[str, Any]


async def compute_population(
    session_maker: async_sessionmaker[AsyncSession], as_of: datetime, config: ScoringConfig, timer: PhaseTimer
) -> Population:
    """Aggregate in the database, fit the models once, and rank every customer (reads only)."""
    async with timer.phase("aggregate"), read_only(session_maker)() as session:
        figures = await load_figures(session, as_of, config)
        referrers, referees = await load_referral_edges(session, as_of)
        interests = await load_interest_texts(session, as_of, config)
        await session.rollback()
    async with timer.phase("fit"):
        bgnbd_fit, gamma_gamma_fit = await asyncio.to_thread(fit_models, figures)
    async with timer.phase("score"):
        referrals = referral_figures(figures, referrers, referees, config.second_level_decay)
        order_value = mean_order_value(figures)
        scores = score_inputs(figures, referrals, bgnbd_fit.params, gamma_gamma_fit.params, config, order_value)
        cutoffs = rank_exactly(scores, figures.scored)
    model = model_record(bgnbd_fit, gamma_gamma_fit, order_value)
    return Population(figures, referrals, scores, cutoffs, interests, model)


class _StoredState(NamedTuple):
    """A stored customer_tier row as the rules read it (by attribute, as ``state_from_row`` does)."""

    customer_id: int
    tier: str
    since: datetime
    below_since: datetime | None
    pinned_tier: str | None
    pinned_until: datetime | None
    pin_reason: str | None
    updated_at: datetime


# Fixed column names only, no input: nothing to inject.
_STATES_SQL = f"SELECT {', '.join(_StoredState._fields)} FROM customer_tier WHERE customer_id BETWEEN $1 AND $2"  # noqa: S608


async def _current_states(connection: AsyncConnection, figures: Figures, start: int, stop: int) -> dict[int, Any]:
    """The stored customer_tier rows of the customers ``start:stop`` of the population, by customer id."""
    low, high = int(figures.customer_id[start]), int(figures.customer_id[stop - 1])
    if is_postgres_connection(connection):
        # The driver's own records: SQLAlchemy's result processing cost more than the query for every chunk, and
        # asyncpg already returns timestamptz as aware UTC datetimes, as DateTimeUTC would.
        driver = await driver_in_transaction(connection)
        make = _StoredState._make
        return {record[0]: make(record) for record in await driver.fetch(_STATES_SQL, low, high)}
    rows = await connection.execute(
        select(CustomerTier.customer_id, *TIER_STATE_COLUMNS).where(CustomerTier.customer_id.between(low, high))
    )
    return {row.customer_id: row for row in rows}


@contextlib.contextmanager
def _collector_skips_what_is_loaded() -> Iterator[None]:
    """Leave every object alive now (the population, the interests, the imported code: hundreds of thousands) out
    of the cyclic garbage collector's passes while the chunks are built. They outlive the loop anyway, and scanning
    them again on each full pass that the chunks' allocations set off cost a fifth of the rules phase. Unfrozen
    afterwards, so whatever of them becomes garbage is collected as before."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def execute_run(
    session_maker: async_sessionmaker[AsyncSession],
    run_id: int,
    tiers: TiersConfig,
    lease_seconds: float,
) -> dict[str, Any]:
    """Carry out a claimed run to success or failure; returns the run's summary counts."""
    timer = PhaseTimer()
    began = time.perf_counter()
    async with session_maker() as session:
        run = await session.get(RecalcRun, run_id)
        assert run is not None
        started_at = run.started_at or utcnow()
        as_of = run.as_of or started_at
        dry_run, trigger = run.dry_run, run.trigger
    try:
        renewal = functools.partial(renew_claim, model=RecalcRun, row_id=run_id, lease_seconds=lease_seconds)
        async with keep_lease(session_maker, renewal, lease_seconds, f"recalc-lease-{run_id}") as lease_lost:
            summary = await _compute_and_write(
                session_maker, run_id, tiers, as_of, started_at, dry_run, timer, lease_lost
            )
    except Exception as error:
        logger.exception("recalculation failed", extra={"run_id": run_id})
        async with transaction(session_maker) as session:
            await runs.fail_run(session, run_id, f"{type(error).__name__}: {error}", timer.phases)
        metrics.record_run(trigger, "failed", time.perf_counter() - began, timer.phases, None)
        return {"run_id": run_id, "status": "failed"}
    logger.info("recalculation succeeded", extra={"run_id": run_id, **timer.phases})
    metrics.record_run(trigger, "succeeded", time.perf_counter() - began, timer.phases, summary.get("customers"))
    return summary


async def _compute_and_write(
    session_maker: async_sessionmaker[AsyncSession],
    run_id: int,
    tiers: TiersConfig,
    as_of: datetime,
    started_at: datetime,
    dry_run: bool,
    timer: PhaseTimer,
    lease_lost: asyncio.Event,
) -> dict[str, Any]:
    population = await compute_population(session_maker, as_of, tiers.scoring, timer)
    figures = population.figures
    metrics.record_fallback(population.model.get("fallback"))
    now = as_of if as_of < started_at else utcnow()
    engine: AsyncEngine = session_maker.kw["bind"]
    # One connection for the whole write: its temporary tables hold the run's rows until the apply.
    async with engine.connect() as connection:
        postgres = is_postgres_connection(connection)
        context = staged.RunContext(
            tiers=tiers,
            figures=figures,
            referrals=population.referrals,
            scores=population.scores,
            cutoffs=population.cutoffs,
            interests=population.interests,
            run_id=run_id,
            as_of=as_of,
            now=now,
            started_at=started_at,
            postgres=postgres,
        )
        # Staging only reads the service's tables (and writes temporary ones): on SQLite it must neither take nor
        # wait for the write lock, which the apply alone holds, briefly.
        await connection.execution_options(**{READ_ONLY_OPTION: True})
        try:
            async with connection.begin():
                await staged.create_stage(connection)
                types = await staged.stage_types(connection)
            with _collector_skips_what_is_loaded():
                await _stage_chunks(connection, context, types, timer, lease_lost)
            if lease_lost.is_set():
                raise LeaseLostError("the run's lease was lost; another replica marked it failed")
            await connection.execution_options(**{READ_ONLY_OPTION: False})
            async with connection.begin():
                if not dry_run:
                    async with timer.phase("write"):
                        await staged.apply(connection, run_id, started_at)
                moves = await staged.staged_moves(connection)
                async with AsyncSession(bind=connection, join_transaction_mode="create_savepoint") as session:
                    if not dry_run:
                        async with timer.phase("effects"):
                            selection = HistorySelection(run_id=run_id)
                            await announce_tier_changes(session, selection, now)
                            await issue_welcome_offers(session, tiers, selection, now)
                    await _finish(session, run_id, tiers, as_of, timer, population, moves)
                    await session.commit()
            if not dry_run:
                # This process's badges at once; other processes' when the run's notification reaches them.
                forget_every_badge(session_maker)
        finally:
            # Not when the task is being cancelled (shutdown): a statement awaited now can wait forever on the
            # driver adapter's lock, still held by the statement the cancellation interrupted. The next run on
            # this connection drops the tables first anyway, and a closed connection takes them with it.
            task = asyncio.current_task()
            if not (task is not None and task.cancelling()) and not connection.invalidated:
                with contextlib.suppress(DBAPIError):
                    async with connection.begin():
                        await staged.drop_stage(connection)
    return {"run_id": run_id, "status": "succeeded", "customers": int(figures.scored.sum())}


async def _stage_chunks(
    connection: AsyncConnection,
    context: staged.RunContext,
    types: staged.StageTypes | None,
    timer: PhaseTimer,
    lease_lost: asyncio.Event,
) -> None:
    """Apply the rules to the population chunk by chunk and stage the rows, as a pipeline.

    Each chunk's rules and rows are worked out in a thread (``stage_and_encode``: CPU only), so that a run inside
    the server leaves its event loop free for requests. Meanwhile the connection copies the previous chunk's rows
    into the stage, which is the database's work on its own CPU, and reads the next chunk's stored tiers. Rows
    re-scored in real time after that read are dropped at the apply, as those after the run began. The time the
    loop spends copying is the ``stage`` phase; the rest, waiting for the rules, is ``rules``.
    """
    figures = context.figures
    states: dict[int, Any] | None = None
    pending: staged.StagedChunk | None = None
    for start in range(0, len(figures), WRITE_CHUNK):
        if lease_lost.is_set():
            raise LeaseLostError("the run's lease was lost; another replica marked it failed")
        stop = min(start + WRITE_CHUNK, len(figures))
        following = min(stop + WRITE_CHUNK, len(figures))
        async with connection.begin():
            if states is None:
                async with timer.phase("rules"):
                    states = await _current_states(connection, figures, start, stop)
            staging = asyncio.ensure_future(
                asyncio.to_thread(staged.stage_and_encode, context, start, stop, states, types)
            )
            try:
                if pending is not None:
                    async with timer.phase("stage"):
                        await staged.append(connection, pending)
                    pending = None
                async with timer.phase("rules"):
                    states = await _current_states(connection, figures, stop, following) if following > stop else None
            finally:
                async with timer.phase("rules"):
                    pending = await staging
    if pending is not None:
        async with connection.begin(), timer.phase("stage"):
            await staged.append(connection, pending)


async def _finish(
    session: AsyncSession,
    run_id: int,
    tiers: TiersConfig,
    as_of: datetime,
    timer: PhaseTimer,
    population: Population,
    moves: dict[str, dict[str, int]],
) -> None:
    """Mark the run succeeded, unless another replica declared it dead meanwhile."""
    finished = await session.scalar(
        update(RecalcRun)
        .where(RecalcRun.id == run_id, RecalcRun.status == "running")
        .values(
            status="succeeded",
            finished_at=utcnow(),
            active_slot=None,
            as_of=as_of,
            phases=timer.phases,
            customers=int(population.figures.scored.sum()),
            moves=moves,
            config_hash=tiers.config_hash,
            model=population.model,
            cutoffs=population.cutoffs,
        )
        .returning(RecalcRun.id)
    )
    if finished is None:
        raise LeaseLostError("the run was marked failed by another replica before it could finish")
