"""The full run's rows: built chunk by chunk in storage form, staged in temporary tables, applied set-based.

A full run writes a score and a tier row for every customer. Writing them through the ORM, or as upserts chunk by
chunk inside one long transaction, costs more than everything else in the run and holds the rows it has written
locked until the end, so a real-time re-score of those customers waits for the whole run. Instead, the run's own
connection stages the rows in temporary tables (COPY on PostgreSQL) while it computes them, and then applies them
in one short transaction: one statement per table.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncConnection

from loyalty.db.models import CustomerScore
from loyalty.db.staging import (
    Row,
    binary_copy,
    column_types,
    copy_payload,
    is_postgres_connection,
    stored_instant,
    stored_optional_instants,
    write_rows,
)
from loyalty.db.types import DateTimeUTC
from loyalty.lib.money import STORAGE_FACTOR
from loyalty.recalc.assignments import (
    INSTANT_SCORE_COLUMNS,
    MONEY_SCORE_COLUMNS,
    ProgressTexts,
    decide_chunk,
    kept_pin_reason,
    score_columns,
    state_from_row,
)
from loyalty.scoring.figures import Figures, ReferralFigures
from loyalty.scoring.scores import Scores
from loyalty.tiers.badge_cache import announce_every_badge_changed
from loyalty.tiers.config import TiersConfig
from loyalty.tiers.rules import assign_decided, settled

STAGE_TIER = "recalc_stage_tier"
STAGE_SCORE = "recalc_stage_score"
# Every column of the two tables is written. The tier rows are built as tuples in this order (stage_chunk); a test
# checks that it names every column of customer_tier.
TIER_COLUMNS = (
    "customer_id",
    "tier",
    "since",
    "qualified_tier",
    "below_since",
    "explanation",
    "progress",
    "pinned_tier",
    "pinned_until",
    "pin_reason",
    "updated_at",
)
# Kept beside each staged tier row for the history and the run's moves; not columns of customer_tier.
HISTORY_COLUMNS = ("previous_tier", "changed", "kind", "reason")
SCORE_COLUMNS = tuple(column.name for column in CustomerScore.__table__.columns)
_NO_INTERESTS = "[]"


@dataclass(frozen=True)
class RunContext:
    """What every chunk of one run shares."""

    tiers: TiersConfig
    figures: Figures
    referrals: ReferralFigures
    scores: Scores
    cutoffs: dict[str, list[float]]
    interests: dict[int, str]  # each customer's top interests as JSON text (load_interest_texts)
    run_id: int
    as_of: datetime
    now: datetime
    started_at: datetime
    postgres: bool
    # The missing items of progress texts as JSON, kept from chunk to chunk (see ProgressTexts).
    progress_items: dict[tuple[str, float], str] = field(default_factory=dict, compare=False)


@dataclass
class StagedChunk:
    """A chunk's rows: the tier rows (with the history columns) as tuples, the score rows as columns (see
    ``_score_columns``); and, once encoded for PostgreSQL (``encode``), both as binary COPY payloads."""

    tiers: list[Row]
    scores: dict[str, Any]
    copies: list[tuple[str, list[str], bytes]] = field(default_factory=list)


# The stage tables' column types on PostgreSQL (``stage_types``), in the order of their columns here.
StageTypes = dict[str, tuple[str, ...]]


def stage_chunk(context: RunContext, start: int, stop: int, states: dict[int, Any]) -> StagedChunk:
    """Apply the rules to customers ``start:stop`` of the population and build their rows in storage form.

    The decisions and their texts are made for the whole chunk at once (``evaluate_columns``); only what is stored
    is worked out customer by customer, from the decision and the stored row. A customer re-scored in real time
    after the run began is left out: that tier comes from newer data.
    """
    tiers, postgres, now, started_at = context.tiers, context.postgres, context.now, context.started_at
    population = (context.figures, context.referrals, context.scores, context.cutoffs)
    decided = decide_chunk(tiers, population, start, stop)
    ids = context.figures.customer_id[start:stop].tolist()
    now_stored = stored_instant(postgres, now)
    # Most customers share a few instants (the run that set their tier): each is encoded once per chunk.
    instants: dict[datetime | None, Any] = {None: None, now: now_stored}
    progress = ProgressTexts(context.progress_items)
    kept: list[int] = []
    tier_rows: list[Row] = []
    for offset, customer_id in enumerate(ids):
        stored = states.get(customer_id)
        if stored is not None and stored.updated_at > started_at:
            continue
        kept.append(offset)
        decided_tier, detail = decided.tiers[offset], decided.details[offset]
        if stored is None or (stored.pinned_tier is None and stored.tier == decided_tier):
            # The commonest cases, without the objects of the general path below.
            previous = None if stored is None else stored.tier
            since, below_since, changed, kind, reason = settled(
                previous, None if stored is None else stored.since, detail, now
            )
            tier, pinned_tier, pinned_until, pin_reason = decided_tier, None, None, None
        else:
            previous = stored.tier
            assignment = assign_decided(
                tiers,
                state_from_row(stored),
                decided_tier,
                detail,
                now,
                allow_downgrade=True,
                pin_reason=stored.pin_reason,
            )
            tier, since, below_since, changed = (
                assignment.tier,
                assignment.since,
                assignment.below_since,
                assignment.changed,
            )
            kind, reason = assignment.kind, assignment.reason
            pinned_tier, pinned_until = assignment.pinned_tier, assignment.pinned_until
            pin_reason = kept_pin_reason(assignment, stored.pin_reason)
        if since not in instants:
            instants[since] = stored_instant(postgres, since)
        if below_since not in instants:
            instants[below_since] = stored_instant(postgres, below_since)
        if pinned_until not in instants:
            instants[pinned_until] = stored_instant(postgres, pinned_until)
        tier_rows.append(
            (
                customer_id,
                tier,
                instants[since],
                decided_tier,
                instants[below_since],
                decided.explanations[offset],
                progress.text(decided.progress[offset]),
                pinned_tier,
                instants[pinned_until],
                pin_reason,
                now_stored,
                previous,
                changed,
                kind,
                reason,
            )
        )
    positions = np.asarray(kept, dtype=np.int64) + start
    return StagedChunk(tier_rows, _score_columns(context, positions))


def stage_and_encode(
    context: RunContext, start: int, stop: int, states: dict[int, Any], types: StageTypes | None
) -> StagedChunk:
    """``stage_chunk``, with its rows encoded for COPY when ``types`` are given (PostgreSQL): all of a chunk's
    work that needs no connection, to run beside the connection's own."""
    chunk = stage_chunk(context, start, stop, states)
    if types is not None:
        chunk.copies = encode(chunk, types)
    return chunk


def _score_columns(context: RunContext, positions: np.ndarray[Any, Any]) -> dict[str, Any]:
    """The customer_score columns of the customers at ``positions``: numbers as stored (money in ten-thousandths),
    purchase instants as microseconds since the epoch, NaN for NULL; the run's instants and the interests as lists.
    """
    size = positions.size
    low, high = (int(positions[0]), int(positions[-1]) + 1) if size else (0, 0)
    ids = context.figures.customer_id[positions]
    interests = context.interests
    values: dict[str, Any] = {
        "customer_id": ids,
        "run_id": np.full(size, context.run_id, dtype=np.int64),
        "as_of": [context.as_of] * size,
        "computed_at": [context.now] * size,
        "interests": [interests.get(i, _NO_INTERESTS) for i in ids.tolist()],
    }
    selected = positions - low
    for name, full in score_columns(context.figures, context.referrals, context.scores, slice(low, high)).items():
        column = full[selected]
        if name in MONEY_SCORE_COLUMNS:
            column = np.rint(column * STORAGE_FACTOR).astype(np.int64)
        values[name] = column
    return values


def _score_rows(postgres: bool, columns: dict[str, Any]) -> list[Row]:
    """The score columns as row tuples in storage form, for the driver's own encoding."""
    values: dict[str, list[Any]] = {}
    for name, column in columns.items():
        if not isinstance(column, np.ndarray):
            values[name] = (
                [stored_instant(postgres, value) for value in column] if name in ("as_of", "computed_at") else column
            )
        elif name in INSTANT_SCORE_COLUMNS:
            values[name] = stored_optional_instants(postgres, column)
        elif column.dtype.kind == "f" and np.isnan(column).any():
            values[name] = [None if value != value else value for value in column.tolist()]
        else:
            values[name] = column.tolist()
    return list(zip(*(values[name] for name in SCORE_COLUMNS), strict=True))


def encode(chunk: StagedChunk, types: StageTypes) -> list[tuple[str, list[str], bytes]]:
    """Both tables' rows of a chunk as binary COPY payloads, each with the columns it names in its order."""
    copies = []
    tier_columns = TIER_COLUMNS + HISTORY_COLUMNS
    tier_values: list[Sequence[Any]] = list(zip(*chunk.tiers, strict=True)) or [[] for _name in tier_columns]
    for table_name, names, columns in (
        (STAGE_TIER, tier_columns, tier_values),
        (STAGE_SCORE, SCORE_COLUMNS, [chunk.scores[name] for name in SCORE_COLUMNS]),
    ):
        order, payload = binary_copy(types[table_name], columns, len(chunk.tiers))
        copies.append((table_name, [names[index] for index in order], payload))
    return copies


# ---------------------------------------------------------------- staging tables


async def create_stage(connection: AsyncConnection) -> None:
    """Empty temporary tables shaped like the targets, on this connection only."""
    for name, source in ((STAGE_TIER, "customer_tier"), (STAGE_SCORE, "customer_score")):
        await connection.execute(text(f"DROP TABLE IF EXISTS {name}"))
        await connection.execute(text(f"CREATE TEMPORARY TABLE {name} AS SELECT * FROM {source} WHERE 1 = 0"))
    for column, kind in zip(HISTORY_COLUMNS, ("VARCHAR(16)", "BOOLEAN", "VARCHAR(32)", "TEXT"), strict=True):
        await connection.execute(text(f"ALTER TABLE {STAGE_TIER} ADD COLUMN {column} {kind}"))


async def drop_stage(connection: AsyncConnection) -> None:
    for name in (STAGE_TIER, STAGE_SCORE):
        await connection.execute(text(f"DROP TABLE IF EXISTS {name}"))


async def stage_types(connection: AsyncConnection) -> StageTypes | None:
    """The column types of the stage tables that ``encode`` needs; None on SQLite, which takes row tuples."""
    if not is_postgres_connection(connection):
        return None
    types = {}
    for table_name, names in ((STAGE_TIER, TIER_COLUMNS + HISTORY_COLUMNS), (STAGE_SCORE, SCORE_COLUMNS)):
        known = await column_types(connection, table_name)
        types[table_name] = tuple(known[name] for name in names)
    return types


async def append(connection: AsyncConnection, chunk: StagedChunk) -> None:
    if chunk.copies:
        for table_name, columns, payload in chunk.copies:
            await copy_payload(connection, table_name, columns, payload)
        return
    postgres = is_postgres_connection(connection)
    await write_rows(connection, STAGE_TIER, TIER_COLUMNS + HISTORY_COLUMNS, chunk.tiers)
    await write_rows(connection, STAGE_SCORE, SCORE_COLUMNS, _score_rows(postgres, chunk.scores))


async def apply(connection: AsyncConnection, run_id: int, started_at: datetime) -> None:
    """Write the staged rows into the service's tables, inside the connection's (write) transaction.

    On PostgreSQL both tables are locked against other writers first, in the order the real-time re-score writes
    them (scores, then tiers), so neither can deadlock the other; readers (the badge) are not blocked. With no
    other writer left, customers re-scored in real time since the run began are dropped from the stage, and the
    rest is written unconditionally. On SQLite the write transaction already excludes every other writer.
    """
    if is_postgres_connection(connection):
        await connection.execute(text("LOCK TABLE customer_score IN SHARE ROW EXCLUSIVE MODE"))
        await connection.execute(text("LOCK TABLE customer_tier IN SHARE ROW EXCLUSIVE MODE"))
        await announce_every_badge_changed(connection)
    newer = text(
        "DELETE FROM {stage} WHERE customer_id IN "
        "(SELECT customer_id FROM customer_tier WHERE updated_at > :started_at)"
    )
    for stage in (STAGE_TIER, STAGE_SCORE):
        statement = text(newer.text.format(stage=stage)).bindparams(bindparam("started_at", type_=DateTimeUTC()))
        await connection.execute(statement, {"started_at": started_at})
    await connection.execute(text(_upsert_sql("customer_score", STAGE_SCORE, SCORE_COLUMNS)))
    await connection.execute(text(_upsert_sql("customer_tier", STAGE_TIER, TIER_COLUMNS)))
    await connection.execute(
        text(
            "INSERT INTO tier_history (customer_id, from_tier, to_tier, at, kind, reason, run_id) "
            f"SELECT customer_id, previous_tier, tier, updated_at, kind, reason, :run_id FROM {STAGE_TIER} "
            "WHERE changed"
        ),
        {"run_id": run_id},
    )


def _upsert_sql(target: str, stage: str, columns: tuple[str, ...]) -> str:
    listed = ", ".join(columns)
    updates = ", ".join(f"{column} = excluded.{column}" for column in columns if column != "customer_id")
    # `WHERE true` settles SQLite's parse of INSERT ... SELECT ... ON CONFLICT (the ON could begin a join).
    return (
        f"INSERT INTO {target} ({listed}) SELECT {listed} FROM {stage} WHERE true "
        f"ON CONFLICT (customer_id) DO UPDATE SET {updates}"
    )


async def staged_moves(connection: AsyncConnection) -> dict[str, dict[str, int]]:
    """How many customers moved from each tier (``none`` before their first) to each tier, as staged."""
    moves: dict[str, dict[str, int]] = defaultdict(dict)
    rows = await connection.execute(
        text(f"SELECT COALESCE(previous_tier, 'none'), tier, COUNT(*) FROM {STAGE_TIER} GROUP BY 1, 2")
    )
    for source, target, count in rows:
        moves[source][target] = int(count)
    return dict(moves)
