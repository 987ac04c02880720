"""Recalculation runs for the API and the CLI."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.db.models import RecalcRun
from loyalty.lib.errors import NOT_FOUND, RUN_IN_PROGRESS, ProblemError
from loyalty.lib.pagination import Page, newest_first
from loyalty.recalc import runs, schemas


def run_view(run: RecalcRun) -> schemas.Run:
    return schemas.Run(
        run_id=run.id,
        trigger=run.trigger,
        status=run.status,
        as_of=run.as_of,
        dry_run=run.dry_run,
        queued_at=run.queued_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        phases=run.phases,
        customers=run.customers,
        moves=run.moves,
        config_hash=run.config_hash,
        model=run.model,
        error=run.error,
        attempts=run.attempts,
        retry_of=run.retry_of,
    )


async def request_run(session: AsyncSession, as_of: datetime | None, dry_run: bool) -> int:
    """Queue a manual run; 409 while another is queued or running."""
    run_id = await runs.enqueue_run(session, trigger="manual", as_of=as_of, dry_run=dry_run)
    if run_id is None:
        active = await session.scalar(select(RecalcRun.id).where(RecalcRun.active_slot == 1).limit(1))
        raise ProblemError(
            RUN_IN_PROGRESS, f"Recalculation {active} is queued or running; try again when it has finished"
        )
    return run_id


async def get_run(session: AsyncSession, run_id: int) -> schemas.Run:
    run = await session.get(RecalcRun, run_id)
    if run is None:
        raise ProblemError(NOT_FOUND, f"No recalculation with run_id {run_id}")
    return run_view(run)


async def list_runs(session: AsyncSession, limit: int, cursor: str | None) -> Page[schemas.Run]:
    """Newest first."""
    return await newest_first(session, RecalcRun, limit, cursor, run_view)
