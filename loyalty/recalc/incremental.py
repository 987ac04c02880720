"""Real-time re-scoring: an order, refund or referral updates that customer (and referrers) in the same request.

It uses the parameters and percentile cut-offs of the last full run, so a single customer is placed on the same
scale as everyone else without refitting. It never downgrades: downgrades wait for a full run and its grace.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    BindParameter,
    ColumnElement,
    CompoundSelect,
    Insert,
    Select,
    Text,
    bindparam,
    column,
    insert,
    select,
    union,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect, Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import aliased
from sqlalchemy.sql.selectable import TextualSelect

from loyalty.db.base import Base
from loyalty.db.bulk import on_conflict_update_sql, plan_sized, storage_form, unnest_insert_sql
from loyalty.db.dialect import json_rows_sql
from loyalty.db.models import Customer, CustomerScore, CustomerTier, RecalcRun, Referral, TierHistory
from loyalty.db.types import DateTimeUTC
from loyalty.lib.clock import utcnow
from loyalty.offers.welcome import issue_welcome_offers
from loyalty.ops import metrics
from loyalty.recalc.assignments import TIER_STATE_COLUMNS, place_customer, score_rows
from loyalty.scoring.config import ScoringConfig
from loyalty.scoring.figures import (
    FIGURE_COLUMNS,
    figures_from_rows,
    figures_parameters,
    figures_statement,
    interest_parameters,
    interests_from_json,
    interests_sql,
    load_figures,
    load_referral_edges,
    referral_figures,
)
from loyalty.scoring.scores import ScoringModel, rank_on_cutoffs, score_inputs
from loyalty.tiers.badge_cache import note_changed as note_badges_changed
from loyalty.tiers.config import TiersConfig
from loyalty.webhooks.outbox import HistorySelection, announce_tier_changes, tier_changed_sql

# The tables, not the ORM classes, for inserts: the ORM's bulk path would also fetch every new row's id, unused here.
# The statements' SQL is PostgreSQL's whichever driver runs it; built once, not per engine.
_POSTGRES: Dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
_SCORE_TABLE, _TIER_TABLE, _TIER_HISTORY = (
    Base.metadata.tables[model.__tablename__] for model in (CustomerScore, CustomerTier, TierHistory)
)


@dataclass
class ModelCache:
    """The last full run's model, re-read at most every ``ttl`` seconds per process."""

    ttl: float = 5.0
    _model: ScoringModel | None = None
    _run_id: int | None = None
    _read_at: float = field(default=-1e9)

    async def get(self, session: AsyncSession) -> tuple[ScoringModel, int | None]:
        if self._model is None or time.monotonic() - self._read_at > self.ttl:
            row = (
                await session.execute(
                    select(RecalcRun.id, RecalcRun.model, RecalcRun.cutoffs)
                    .where(RecalcRun.status == "succeeded", RecalcRun.dry_run.is_(False))
                    .order_by(RecalcRun.finished_at.desc())
                    .limit(1)
                )
            ).first()
            if row is None:
                self._model, self._run_id = ScoringModel.initial(), None
            else:
                self._model, self._run_id = ScoringModel.from_record(row.model, row.cutoffs), row.id
            self._read_at = time.monotonic()
        return self._model, self._run_id

    def invalidate(self) -> None:
        self._model = None


def _customers_and_referrers(customer_ids: BindParameter[list[int]] | Select[Any]) -> CompoundSelect[int]:
    """The ``customer_ids`` and up to two levels of their referrers: their influence counts these customers'
    spending."""
    first_referral, second_referral = aliased(Referral), aliased(Referral)
    return union(
        select(Customer.id).where(Customer.id.in_(customer_ids)),
        select(first_referral.referrer_id).where(first_referral.referee_id.in_(customer_ids)),
        select(second_referral.referrer_id)
        .join(first_referral, first_referral.referrer_id == second_referral.referee_id)
        .where(first_referral.referee_id.in_(customer_ids)),
    )


@functools.cache
def _lock_statement(dialect: str, with_referrers: bool) -> Select[Any]:
    """``lock_statement`` for the ``customer_ids`` parameter, built once per process and shape.

    Building the statement (aliases, comparisons, the union) on every order cost more of the request than running
    it; the ids are bound at execution.
    """
    return lock_statement(dialect, with_referrers)


def lock_statement(
    dialect: str,
    with_referrers: bool,
    only_if: ColumnElement[bool] | None = None,
    customers: Select[Any] | None = None,
) -> Select[Any]:
    """Lock the ``customer_ids`` (and, if asked, their referrers), in id order, and answer their ids.

    A concurrent write for the same customer then waits, and its figures include ours. Id order means two
    requests never wait on each other in a cycle. NO KEY UPDATE, not UPDATE: a refund, event or referral just
    inserted holds KEY SHARE on its customer (their foreign keys), which UPDATE would wait on. SQLite needs no
    lock: every write transaction there already holds the database's single write lock.

    ``only_if``, a condition on no row of ``customer``, lets a write lock in its own statement: a new order's
    insert and this lock are one round trip (``rescore_after_write``'s ``locked``). PostgreSQL evaluates such a
    condition once, before it reads and locks any row. ``customers``, a select of customer ids, stands in for the
    ``customer_ids`` parameter: a statement's own CTE, such as the ids of the orders it just inserted.
    """
    # An expanded list, not PostgreSQL's array parameter: for a list of one or two ids the server then keeps one
    # generic plan of the statement, where with an array of unknown length it planned it anew on every order.
    ids: BindParameter[list[int]] | Select[Any] = (
        customers if customers is not None else bindparam("customer_ids", expanding=True)
    )
    wanted = Customer.id.in_(_customers_and_referrers(ids) if with_referrers else ids)
    locked = select(Customer.id).where(wanted).order_by(Customer.id)
    if only_if is not None:
        locked = locked.where(only_if)
    if dialect == "postgresql":
        locked = locked.with_for_update(key_share=True, of=Customer)
    return locked


async def _lock_customers(connection: AsyncConnection, customer_ids: Sequence[int], with_referrers: bool) -> list[int]:
    statement = _lock_statement(connection.dialect.name, with_referrers)
    return list((await connection.scalars(statement, {"customer_ids": plan_sized(customer_ids)})).all())


# Each customer's figures with their stored tier, the run of their stored score and their top interests: one read,
# where these were two round trips. The interests are read once for all the customers (the full definition,
# filtered by the same ids), grouped by customer into JSON text and joined: a hash join, linear in the customers
# (a subquery per row rescanned the whole CTE for each, quadratic for a batch's thousand customers).
_FIGURES_AND_STATE_SQL = """
WITH interests AS MATERIALIZED ({interests})
SELECT f.*, t.customer_id, {state}, s.customer_id, s.run_id, i.interests
FROM ({{figures}}) f
LEFT JOIN customer_tier t ON t.customer_id = f.id
LEFT JOIN customer_score s ON s.customer_id = f.id
LEFT JOIN (SELECT customer_id, {interest_rows} AS interests FROM interests GROUP BY customer_id) i
    ON i.customer_id = f.id
ORDER BY f.id
"""


@functools.cache
def _figures_and_state(dialect: str) -> TextualSelect:
    around = _FIGURES_AND_STATE_SQL.format(
        interests=interests_sql(filtered=True),
        state=", ".join(f"t.{state.name}" for state in TIER_STATE_COLUMNS),
        interest_rows=json_rows_sql(dialect, ["target", "engagements", "position"]),
    )
    statement: TextualSelect = (
        figures_statement(dialect, filtered=True, around=around)
        .bindparams(bindparam("since", type_=DateTimeUTC()))
        .columns(
            *(column(f"figure_{position}") for position in range(FIGURE_COLUMNS)),
            column("tier_customer_id", BigInteger),
            # Typed, so stored times come back as aware datetimes on SQLite too.
            *(column(state.name, state.type) for state in TIER_STATE_COLUMNS),
            column("score_customer_id", BigInteger),
            column("run_id", BigInteger),
            column("interests", Text),
        )
    )
    return statement


async def read_customers(
    connection: AsyncConnection, now: datetime, config: ScoringConfig, ids: Sequence[int]
) -> Sequence[Row[Any]]:
    """The customers' rows of ``_FIGURES_AND_STATE_SQL``, in id order: figures first (``figures_from_rows``), then
    the stored tier state, ``run_id`` and ``interests`` (``interests_from_json``)."""
    parameters = {**figures_parameters(now, config, ids), **interest_parameters(now, config)}
    return (await connection.execute(_figures_and_state(connection.dialect.name), parameters)).all()


async def _connection(session: AsyncSession) -> AsyncConnection:
    """The session's connection, for the re-score's own Core statements: run on it directly they skip the ORM
    session's per-statement work (a tenth of a millisecond each, on every order). What the session would have
    flushed before its next statement is flushed first, so those statements still see the caller's changes."""
    await session.flush()
    return await session.connection()


async def rescore(
    session: AsyncSession, customer_ids: Sequence[int], tiers: TiersConfig, cache: ModelCache
) -> dict[int, str]:
    """Re-score the given customers now and return their tiers; upgrades apply at once."""
    ids = sorted(set(customer_ids))
    if not ids:
        return {}
    began = time.perf_counter()
    connection = await _connection(session)
    await _lock_customers(connection, ids, with_referrers=False)
    return await _rescore_locked(session, connection, ids, tiers, cache, began)


async def _rescore_locked(
    session: AsyncSession,
    connection: AsyncConnection,
    ids: list[int],
    tiers: TiersConfig,
    cache: ModelCache,
    began: float,
) -> dict[int, str]:
    now = utcnow()
    config = tiers.scoring
    model, _run_id = await cache.get(session)
    customer_rows = await read_customers(connection, now, config, ids)
    figures = figures_from_rows(customer_rows, now)
    referrers, referees = await load_referral_edges(session, now, ids)
    referee_figures = (
        await load_figures(session, now, config, sorted(set(referees.tolist()))) if referees.size else None
    )
    referrals = referral_figures(figures, referrers, referees, config.second_level_decay, referee_figures)
    interests = {row[0]: interests_from_json(row.interests) for row in customer_rows}
    scores = score_inputs(figures, referrals, model.bgnbd, model.gamma_gamma, config, model.mean_order_value)
    rank_on_cutoffs(scores, figures.scored, model.grids)

    stored: dict[int, Any] = {}
    previous_runs: dict[int, int | None] = {}
    for customer_id, row in zip(figures.customer_id.tolist(), customer_rows, strict=True):
        if row.tier_customer_id is not None:
            stored[customer_id] = row
        if row.score_customer_id is not None:
            previous_runs[customer_id] = row.run_id
    tiers_now: dict[int, str] = {}
    tier_rows, history_rows = [], []
    for position, customer_id in enumerate(figures.customer_id.tolist()):
        placement = place_customer(
            tiers,
            position,
            (figures, referrals, scores, model.cutoffs),
            stored.get(customer_id),
            now=now,
            allow_downgrade=False,
            history_run_id=None,
        )
        tiers_now[customer_id] = placement.assignment.tier
        tier_rows.append(placement.tier)
        if placement.history is not None:
            history_rows.append(placement.history)
    new_scores = score_rows(figures, referrals, scores, interests, now, now, previous_runs)
    announced = await _write_placements(connection, new_scores, tier_rows, history_rows)
    note_badges_changed(session, ids)
    if history_rows:
        selection = HistorySelection(customer_ids=[row["customer_id"] for row in history_rows], at=now)
        if not announced:
            await announce_tier_changes(session, selection, now)
        await issue_welcome_offers(session, tiers, selection, now)
    metrics.record_rescore(len(ids), time.perf_counter() - began)
    return tiers_now


async def _write_placements(
    connection: AsyncConnection,
    score_rows: list[dict[str, Any]],
    tier_rows: list[dict[str, Any]],
    history_rows: list[dict[str, Any]],
) -> bool:
    """Upsert the customers' score and tier rows and add their history rows (one of each per customer at most).
    Answers whether their tier.changed events were written too.

    PostgreSQL: one statement, each column one array, whatever the number of customers, with the events: on every
    order three or four round trips become one, and a batch's hundreds of rows no longer go one execution each.
    """
    if not score_rows:
        return False
    dialect = connection.dialect
    if dialect.name != "postgresql":
        for model, rows in ((CustomerScore, score_rows), (CustomerTier, tier_rows)):
            await connection.execute(_upsert_by_customer(dialect.name, model, tuple(rows[0])), rows)
        if history_rows:
            await connection.execute(insert(_TIER_HISTORY), history_rows)
        return False
    shapes = [(_SCORE_TABLE, tuple(score_rows[0]), score_rows), (_TIER_TABLE, tuple(tier_rows[0]), tier_rows)]
    if history_rows:
        shapes.append((_TIER_HISTORY, tuple(history_rows[0]), history_rows))
    arrays = [
        array
        for table, columns, rows in shapes
        for array in storage_form(dialect, table, columns, [[row[name] for name in columns] for row in rows])
    ]
    # Through SQLAlchemy, not on the driver: a lost connection is then reported and invalidated as on every other
    # statement (a 503 while the database restarts), and the driver still receives the arrays as they are.
    await connection.exec_driver_sql(_placements_sql(*(columns for _table, columns, _rows in shapes)), tuple(arrays))
    return True


@functools.cache
def _placements_sql(
    score_columns: tuple[str, ...], tier_columns: tuple[str, ...], history_columns: tuple[str, ...] | None = None
) -> str:
    """``_write_placements``' statement on PostgreSQL: the score upsert, then the tier upsert, then any history.

    The two upserts take their locks in the order a full run's write does (``staged.apply``: the score table, then
    the tier table, and their rows in that order), so the two never wait on each other in a cycle:
    - rows: PostgreSQL runs a data-modifying CTE that nothing reads after the main statement, so the tier insert
      counts the score CTE's rows first, which runs it to the end before any tier row is written;
    - tables: both upserts are CTEs under a plain SELECT. With the tier upsert as the main statement, a plan reused
      from the connection's statement cache locked the tier table before the score table, and a re-score deadlocked
      with a full run waiting to lock both.
    The history insert, which no other writer waits for, may run last, and its tier.changed events with it.
    """
    scores = (
        f"{unnest_insert_sql(_POSTGRES, _SCORE_TABLE, score_columns)} "
        f"{on_conflict_update_sql(_POSTGRES, _SCORE_TABLE, score_columns, 'customer_id')} RETURNING 1"
    )
    parameters = len(score_columns) + 1
    after_scores = "(SELECT count(*) FROM scores) >= 0"
    tiers = (
        f"{unnest_insert_sql(_POSTGRES, _TIER_TABLE, tier_columns, parameters, where=after_scores)} "
        f"{on_conflict_update_sql(_POSTGRES, _TIER_TABLE, tier_columns, 'customer_id')} RETURNING 1"
    )
    history = ""
    if history_columns:
        first = parameters + len(tier_columns)
        # The history rows and their tier.changed events (``announce_tier_changes``' insert, reading the rows from
        # this CTE): one more round trip saved on every order that changes a tier. Each row's time is the
        # re-score's own, as the announce's creation time is.
        returned = "id, customer_id, at, from_tier, to_tier, kind, reason"  # what tier_changed_sql reads
        added = f"{unnest_insert_sql(_POSTGRES, _TIER_HISTORY, history_columns, first)} RETURNING {returned}"
        announced = tier_changed_sql("postgresql", "history", where="true", created_at="h.at")
        history = f", history AS ({added}), announced AS ({announced})"
    # Only our own SQL and the tables' identifiers: every value is a parameter.
    return f"WITH scores AS ({scores}), tiers AS ({tiers}){history} SELECT count(*) FROM tiers"  # noqa: S608


@functools.cache
def _upsert_by_customer(dialect: str, model: type[Base], columns: tuple[str, ...]) -> Insert:
    """SQLite: `bulk_upsert`'s statement for a table keyed by customer, built once per process.

    Building ``ON CONFLICT ... DO UPDATE SET column = excluded.column`` makes a proxy object per column, and did
    so anew on every order: about a tenth of the request's time. The statement itself never changes.
    """
    statement = postgresql.insert(model) if dialect == "postgresql" else sqlite.insert(model)
    return statement.on_conflict_do_update(
        index_elements=["customer_id"],
        set_={column: statement.excluded[column] for column in columns if column != "customer_id"},
    )


async def rescore_after_write(
    session: AsyncSession,
    customer_ids: Sequence[int],
    tiers: TiersConfig,
    cache: ModelCache,
    locked: Sequence[int] | None = None,
) -> dict[int, str]:
    """Re-score customers whose activity changed, and those whose influence counts it (their referrers).

    ``locked``: what ``lock_statement`` (with referrers) answered for these customers when the write itself
    already ran it in this transaction; otherwise the re-score locks them first.
    """
    if not customer_ids:
        return {}
    began = time.perf_counter()
    connection = await _connection(session)
    # Finding the referrers and locking everyone is one statement: one round trip fewer on every order.
    affected = (
        list(locked) if locked is not None else await _lock_customers(connection, customer_ids, with_referrers=True)
    )
    return await _rescore_locked(session, connection, affected, tiers, cache, began)


async def current_tiers(session: AsyncSession, customer_ids: Sequence[int]) -> dict[int, str]:
    """Stored tiers; a customer never scored is a prospect."""
    found = dict(
        (
            await session.execute(
                select(CustomerTier.customer_id, CustomerTier.tier).where(CustomerTier.customer_id.in_(customer_ids))
            )
        ).all()
    )
    return {customer_id: found.get(customer_id, "prospect") for customer_id in customer_ids}
