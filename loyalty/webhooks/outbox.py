"""The transactional outbox: effects to announce are written with the change itself, delivered later.

Producers insert with a unique `dedupe_key`, so a retried run or dispatch announces nothing twice.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.db.dialect import json_object_sql
from loyalty.db.types import DateTimeUTC

EVENT_TYPES = ("tier.changed", "offer.issued", "offer.redeemed")


@dataclass(frozen=True)
class HistorySelection:
    """Which tier_history rows a write just added: those of a full run, or of some customers at one instant."""

    run_id: int | None = None
    customer_ids: Sequence[int] = ()
    at: datetime | None = None

    def where(self) -> str:
        if self.run_id is not None:
            return "h.run_id = :run_id"
        return "h.run_id IS NULL AND h.at = :at AND h.customer_id IN :ids"

    def params(self) -> dict[str, Any]:
        if self.run_id is not None:
            return {"run_id": self.run_id}
        return {"at": self.at, "ids": list(self.customer_ids)}

    def bind(self, statement: Any) -> Any:
        if self.run_id is not None:
            return statement
        return statement.bindparams(bindparam("ids", expanding=True), bindparam("at", type_=DateTimeUTC()))


async def announce_tier_changes(session: AsyncSession, selection: HistorySelection, now: datetime) -> None:
    """One `tier.changed` event per history row."""
    statement = _tier_changed_statement(session.get_bind().dialect.name, selection.run_id is not None)
    await session.execute(statement, {**selection.params(), "now": now})


@functools.cache
def _tier_changed_statement(dialect: str, by_run: bool) -> Any:
    """Built once per process and shape: the real-time re-score announces on every order that changes a tier, and
    building the statement (parsing its text for parameters) cost more than running it."""
    selection = HistorySelection(run_id=0 if by_run else None)
    sql = tier_changed_sql(dialect, "tier_history", where=selection.where(), created_at=":now")
    return selection.bind(text(sql).bindparams(bindparam("now", type_=DateTimeUTC())))


def tier_changed_sql(dialect: str, history: str, where: str, created_at: str) -> str:
    """The insert of one ``tier.changed`` event per row of ``history`` (``tier_history`` itself, or a statement's
    CTE returning the rows it just added to it) that ``where`` selects, ``created_at`` the events' SQL time."""
    payload = json_object_sql(
        dialect,
        [
            ("customer_id", "c.external_id"),
            ("from", "h.from_tier"),
            ("to", "h.to_tier"),
            ("kind", "h.kind"),
            ("reason", "h.reason"),
        ],
    )
    # Only our own SQL fragments are interpolated; every value is a bound parameter.
    return f"""
        INSERT INTO outbox_event (event_type, customer_id, dedupe_key, occurred_at, payload, created_at)
        SELECT 'tier.changed', h.customer_id, 'tier.changed:' || CAST(h.id AS VARCHAR(20)), h.at, {payload},
            {created_at}
        FROM {history} h JOIN customer c ON c.id = h.customer_id
        WHERE {where}
        ON CONFLICT (dedupe_key) DO NOTHING
    """
