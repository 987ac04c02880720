"""Run records and their leases: one active run across all replicas, crashed runs noticed and retried."""

from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.db.dialect import insert_ignoring_conflicts, is_postgres
from loyalty.db.models import RecalcRun
from loyalty.lib.clock import utcnow

ACTIVE_STATUSES = ("queued", "running")
# A scheduled run whose claimant died is queued again, up to this many attempts in all.
MAX_ATTEMPTS = 3
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


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
    """Queue a run; None when another run is already queued or running (or this period was already queued)."""
    statement = insert_ignoring_conflicts(session, RecalcRun).returning(RecalcRun.id)
    return await session.scalar(
        statement,
        {
            "trigger": trigger,
            "status": "queued",
            "as_of": as_of,
            "dry_run": dry_run,
            "period_key": period_key,
            "active_slot": 1,
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
    """Take the oldest queued run under a lease; replicas racing for it never both get it."""
    candidate = select(RecalcRun.id).where(RecalcRun.status == "queued").order_by(RecalcRun.queued_at).limit(1)
    if is_postgres(session):
        candidate = candidate.with_for_update(skip_locked=True)
    now = utcnow()
    claimed = await session.scalar(
        update(RecalcRun)
        .where(RecalcRun.id == candidate.scalar_subquery(), RecalcRun.status == "queued")
        .values(
            status="running",
            claimed_by=worker,
            started_at=now,
            lease_until=now + timedelta(seconds=lease_seconds),
            attempts=RecalcRun.attempts + 1,
        )
        .returning(RecalcRun.id)
    )
    if claimed is None:
        return None
    return await session.get(RecalcRun, claimed)


async def renew_lease(session: AsyncSession, run_id: int, lease_seconds: float, worker: str = WORKER_ID) -> bool:
    """Extend our lease; False when the run is no longer ours (it was expired and failed by another replica)."""
    renewed = await session.scalar(
        update(RecalcRun)
        .where(RecalcRun.id == run_id, RecalcRun.status == "running", RecalcRun.claimed_by == worker)
        .values(lease_until=utcnow() + timedelta(seconds=lease_seconds))
        .returning(RecalcRun.id)
    )
    return renewed is not None


async def fail_run(session: AsyncSession, run_id: int, error: str, phases: dict[str, float] | None = None) -> None:
    values: dict[str, Any] = {"status": "failed", "error": error[:2000], "finished_at": utcnow(), "active_slot": None}
    if phases is not None:
        values["phases"] = phases
    await session.execute(update(RecalcRun).where(RecalcRun.id == run_id, RecalcRun.status == "running").values(values))


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
    for run_id, trigger, attempts, as_of, dry_run in stale:
        if trigger in ("scheduled", "retry") and attempts < MAX_ATTEMPTS:
            await enqueue_run(
                session, trigger="retry", as_of=as_of, dry_run=dry_run, retry_of=run_id, attempts=attempts
            )
    return [row[0] for row in stale]
