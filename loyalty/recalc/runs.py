"""Run records and their leases: one active run across all replicas, crashed runs noticed and retried."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.db.dialect import insert_ignoring_conflicts, is_postgres
from loyalty.db.models import RecalcRun
from loyalty.lib.clock import utcnow
from loyalty.scheduling.leases import WORKER_ID

ACTIVE_STATUSES = ("queued", "running")
# A scheduled run whose claimant died is queued again, up to this many attempts in all.
MAX_ATTEMPTS = 3


async def enqueue_run(
    session: AsyncSession,
    *,
    trigger: str,
    as_of: datetime | None = None,
    dry_run: bool = False,
    period_key: str | None = None,
    retry_of: int | None = None,
    attempts: int = 0,
) -> int | None:
    """Queue a run; None when refused.

    A manual run takes the one active slot at once, so a second request while one is queued or running is
    refused (409). Scheduled and retry runs wait in the queue without the slot — they are never dropped because
    a manual run happens to be active — and take the slot when claimed; a scheduled run is refused only when
    its cron period was already queued by another replica.
    """
    manual = trigger == "manual"
    statement = insert_ignoring_conflicts(session, RecalcRun, None if manual else ["period_key"])
    return await session.scalar(
        statement.returning(RecalcRun.id),
        {
            "trigger": trigger,
            "status": "queued",
            "as_of": as_of,
            "dry_run": dry_run,
            "period_key": period_key,
            "active_slot": 1 if manual else None,
            "queued_at": utcnow(),
            "attempts": attempts,
            "retry_of": retry_of,
            "phases": {},
            "moves": {},
            "model": {},
            "cutoffs": {},
        },
    )


async def claim_next_run(session: AsyncSession, lease_seconds: float, worker: str = WORKER_ID) -> RecalcRun | None:
    """Take the next queued run under a lease: the one holding the slot first, then the oldest.

    Taking the run sets its active slot; while another run is running that unique key refuses the claim, so
    replicas racing for work never run two at once.
    """
    if await session.scalar(select(RecalcRun.id).where(RecalcRun.status == "running").limit(1)) is not None:
        return None
    candidate = (
        select(RecalcRun.id)
        .where(RecalcRun.status == "queued")
        .order_by(RecalcRun.active_slot.is_(None), RecalcRun.queued_at)
        .limit(1)
    )
    if is_postgres(session):
        candidate = candidate.with_for_update(skip_locked=True)
    now = utcnow()
    try:
        async with session.begin_nested():
            claimed = await session.scalar(
                update(RecalcRun)
                .where(RecalcRun.id == candidate.scalar_subquery(), RecalcRun.status == "queued")
                .values(
                    status="running",
                    active_slot=1,
                    claimed_by=worker,
                    started_at=now,
                    lease_until=now + timedelta(seconds=lease_seconds),
                    attempts=RecalcRun.attempts + 1,
                )
                .returning(RecalcRun.id)
            )
    except IntegrityError:
        return None  # another replica's run holds the slot
    if claimed is None:
        return None
    return await session.get(RecalcRun, claimed)


async def fail_run(session: AsyncSession, run_id: int, error: str, phases: dict[str, float] | None = None) -> None:
    """Mark a running run failed; a scheduled one is queued again."""
    values: dict[str, Any] = {"status": "failed", "error": error[:2000], "finished_at": utcnow(), "active_slot": None}
    if phases is not None:
        values["phases"] = phases
    failed = (
        await session.execute(
            update(RecalcRun)
            .where(RecalcRun.id == run_id, RecalcRun.status == "running")
            .values(values)
            .returning(RecalcRun.id, RecalcRun.trigger, RecalcRun.attempts, RecalcRun.as_of, RecalcRun.dry_run)
        )
    ).all()
    await _queue_retries(session, failed)


async def expire_stale_runs(session: AsyncSession, now: datetime | None = None) -> list[int]:
    """Fail runs whose claimant stopped renewing its lease, and queue scheduled ones again as `retry` runs."""
    now = now or utcnow()
    stale = (
        await session.execute(
            update(RecalcRun)
            .where(RecalcRun.status == "running", RecalcRun.lease_until < now)
            .values(
                status="failed",
                error="the process running it stopped (lease expired); previous tiers were kept",
                finished_at=now,
                active_slot=None,
            )
            .returning(RecalcRun.id, RecalcRun.trigger, RecalcRun.attempts, RecalcRun.as_of, RecalcRun.dry_run)
        )
    ).all()
    await _queue_retries(session, stale)
    return [row[0] for row in stale]


async def _queue_retries(session: AsyncSession, failed: Sequence[Any]) -> None:
    """PRODUCT.md: a scheduled run that failed is queued again (up to MAX_ATTEMPTS in all)."""
    for run_id, trigger, attempts, as_of, dry_run in failed:
        if trigger in ("scheduled", "retry") and attempts < MAX_ATTEMPTS:
            await enqueue_run(
                session, trigger="retry", as_of=as_of, dry_run=dry_run, retry_of=run_id, attempts=attempts
            )
