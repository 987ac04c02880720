"""The full run's rows: built chunk by chunk in storage form, staged in temporary tables, applied set-based.

A full run writes a score and a tier row for every customer. Writing them through the ORM, or as upserts chunk by
chunk inside one long transaction, costs more than everything else in the run and holds the rows it has written
locked until the end, so a real-time re-score of those customers waits for the whole run. Instead, the run's own
connection stages the rows in temporary tables (COPY on PostgreSQL) while it computes them, and then applies them
in one short transaction: one statement per table.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncConnection

from loyalty.db.models import CustomerScore, CustomerTier
from loyalty.db.staging import (
    Row,
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
    ChunkFacts,
    decide,
    score_columns,
    state_from_row,
    tier_row,
)
from loyalty.scoring.figures import Figures, ReferralFigures
from loyalty.scoring.scores import Scores
from loyalty.tiers.config import TiersConfig
from loyalty.tiers.rules import assign

STAGE_TIER = "recalc_stage_tier"
STAGE_SCORE = "recalc_stage_score"
# Every column of the two tables is written; the order is the models' own.
TIER_COLUMNS = tuple(column.name for column in CustomerTier.__table__.columns)
# Kept beside each staged tier row for the history and the run's moves; not columns of customer_tier.
HISTORY_COLUMNS = ("previous_tier", "changed", "kind", "reason")
SCORE_COLUMNS = tuple(column.name for column in CustomerScore.__table__.columns)
_TIER_INSTANTS = ("since", "below_since", "pinned_until")
_NO_INTERESTS = "[]"


@dataclass(frozen=True)
class RunContext:
    """What every chunk of one run shares."""

    tiers: TiersConfig
    figures: Figures
    referrals: ReferralFigures
    scores: Scores
    cutoffs: dict[str, list[float]]
    interests: dict[int, list[dict[str, Any]]]
    run_id: int
    as_of: datetime
    now: datetime
    started_at: datetime
    postgres: bool


@dataclass
class StagedChunk:
    tiers: list[Row]
    scores: list[Row]


def stage_chunk(context: RunContext, start: int, stop: int, states: dict[int, Any]) -> StagedChunk:
    """Apply the rules to customers ``start:stop`` of the population and build their rows in storage form.

    A customer re-scored in real time after the run began is left out: that tier comes from newer data.
    """
    tiers, postgres, now = context.tiers, context.postgres, context.now
    facts = ChunkFacts(tiers, (context.figures, context.referrals, context.scores), start, stop)
    ids = context.figures.customer_id[start:stop].tolist()
    now_stored = stored_instant(postgres, now)
    kept: list[int] = []
    tier_rows: list[Row] = []
    for offset, customer_id in enumerate(ids):
        stored = states.get(customer_id)
        if stored is not None and stored.updated_at > context.started_at:
            continue
        kept.append(offset)
        state = state_from_row(stored)
        pin_reason = stored.pin_reason if stored is not None else None
        customer_facts, raw = facts.at(offset)
        decision = decide(tiers, customer_facts, raw, context.cutoffs)
        assignment = assign(tiers, state, decision, now, allow_downgrade=True, pin_reason=pin_reason)
        row = tier_row(customer_id, assignment, decision, pin_reason, now)
        row["progress"] = json.dumps(row["progress"])
        row["updated_at"] = now_stored
        for name in _TIER_INSTANTS:
            row[name] = stored_instant(postgres, row[name])
        tier_rows.append(
            (
                *(row[name] for name in TIER_COLUMNS),
                state.tier,
                assignment.changed,
                assignment.kind,
                assignment.reason,
            )
        )
    positions = np.asarray(kept, dtype=np.int64) + start
    return StagedChunk(tier_rows, _score_rows(context, positions))


def _score_rows(context: RunContext, positions: np.ndarray[Any, Any]) -> list[Row]:
    if positions.size == 0:
        return []
    low, high = int(positions[0]), int(positions[-1]) + 1
    ids = context.figures.customer_id[positions].tolist()
    size = len(ids)
    interests = context.interests
    values: dict[str, list[Any]] = {
        "customer_id": ids,
        "run_id": [context.run_id] * size,
        "as_of": [stored_instant(context.postgres, context.as_of)] * size,
        "computed_at": [stored_instant(context.postgres, context.now)] * size,
        "interests": [json.dumps(interests[i]) if i in interests else _NO_INTERESTS for i in ids],
    }
    selected = positions - low
    for name, full in score_columns(context.figures, context.referrals, context.scores, slice(low, high)).items():
        column = full[selected]
        if name in MONEY_SCORE_COLUMNS:
            values[name] = np.rint(column * STORAGE_FACTOR).astype(np.int64).tolist()
        elif name in INSTANT_SCORE_COLUMNS:
            values[name] = stored_optional_instants(context.postgres, column)
        elif column.dtype.kind == "f" and np.isnan(column).any():
            values[name] = [None if value != value else value for value in column.tolist()]
        else:
            values[name] = column.tolist()
    return list(zip(*(values[name] for name in SCORE_COLUMNS), strict=True))


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


async def append(connection: AsyncConnection, chunk: StagedChunk) -> None:
    await write_rows(connection, STAGE_TIER, TIER_COLUMNS + HISTORY_COLUMNS, chunk.tiers)
    await write_rows(connection, STAGE_SCORE, SCORE_COLUMNS, chunk.scores)


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
