"""Scheduled recalculation work: `recalc.schedule` on the cron, `recalc.run_due` on every poll."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.db.models import CustomerTier
from loyalty.db.session import transaction
from loyalty.lib.clock import utcnow
from loyalty.recalc import incremental, runs
from loyalty.recalc.full import execute_run
from loyalty.scheduling.timer import Job, current_fire_time
from loyalty.tiers.config import TiersConfig

EXPIRED_PINS_PER_POLL = 1000


@dataclass(frozen=True)
class RecalcJobs:
    session_maker: async_sessionmaker[AsyncSession]
    tiers: TiersConfig
    cron: CronTrigger
    lease_seconds: float
    model_cache: incremental.ModelCache = field(default_factory=incremental.ModelCache)

    async def schedule(self) -> dict[str, Any]:
        """Queue this cron period's run; the period key makes every replica but the first a no-op."""
        fired = current_fire_time(self.cron, utcnow())
        async with transaction(self.session_maker) as session:
            run_id = await runs.enqueue_run(session, trigger="scheduled", period_key=fired.isoformat())
        return {"queued": run_id} if run_id else {}

    async def run_due(self) -> dict[str, Any]:
        """Fail runs whose replica died, then claim and carry out the oldest queued run, if any."""
        async with transaction(self.session_maker) as session:
            expired = await runs.expire_stale_runs(session)
            run = await runs.claim_next_run(session, self.lease_seconds)
            run_id = run.id if run is not None else None
        result: dict[str, Any] = {"expired": expired} if expired else {}
        if run_id is not None:
            result.update(await execute_run(self.session_maker, run_id, self.tiers, self.lease_seconds))
        return result

    async def expire_pins(self) -> dict[str, Any]:
        """`tiers.expire_pins`: a pin that ran out gives way to the tier the rules give, without waiting for a run."""
        async with transaction(self.session_maker) as session:
            expired = list(
                (
                    await session.scalars(
                        select(CustomerTier.customer_id)
                        .where(CustomerTier.pinned_until <= utcnow())
                        .order_by(CustomerTier.customer_id)
                        .limit(EXPIRED_PINS_PER_POLL)
                    )
                ).all()
            )
            if expired:
                await incremental.rescore(session, expired, self.tiers, self.model_cache)
        return {"pins_expired": len(expired)} if expired else {}

    def poll_jobs(self) -> list[Job]:
        return [Job("recalc.run_due", self.run_due), Job("tiers.expire_pins", self.expire_pins)]

    def cron_jobs(self) -> list[Job]:
        return [Job("recalc.schedule", self.schedule)]
