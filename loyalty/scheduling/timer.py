"""The in-process timer every replica runs.

It holds only triggers (a cron for the full recalculation and a short poll); the work itself lives in the
database and is claimed with leases, so any number of replicas can run the same timer safely (ARCHITECTURE.md).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

logger = logging.getLogger("loyalty.scheduling")

JobResult = dict[str, Any]


@dataclass(frozen=True)
class Job:
    """Scheduled work named ``domain.action``, returning a small dict of counts that is logged."""

    name: str
    run: Callable[[], Awaitable[JobResult]]


class CronError(ValueError):
    pass


def parse_cron(expression: str, timezone: str) -> CronTrigger:
    """Five crontab fields, or six with seconds first; read in ``timezone``."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise CronError(f"unknown time zone {timezone!r}") from None
    fields = expression.split()
    try:
        if len(fields) == 5:
            return CronTrigger.from_crontab(expression, timezone=zone)
        if len(fields) == 6:
            second, minute, hour, day, month, day_of_week = fields
            return CronTrigger(
                second=second, minute=minute, hour=hour, day=day, month=month, day_of_week=day_of_week, timezone=zone
            )
    except ValueError as error:
        raise CronError(f"{expression!r}: {error}") from None
    raise CronError(f"{expression!r}: expected 5 fields (or 6 with seconds first), got {len(fields)}")


async def _run_logged(job: Job) -> None:
    started = time.perf_counter()
    try:
        result = await job.run()
    except asyncio.CancelledError:
        # The timer is stopping (a server shutting down) mid-job. Its work stays in the database, due or under a
        # lease, for the next start or another replica: no error, and APScheduler must not log one either.
        logger.info("job cancelled", extra={"job": job.name})
        return
    except Exception:
        # A failing job must not stop the timer; its work stays in the database for the next tick.
        logger.exception("job failed", extra={"job": job.name})
        return
    if result:
        elapsed = round(time.perf_counter() - started, 3)
        logger.info("job done", extra={"job": job.name, "seconds": elapsed, **result})


class Timer:
    """APScheduler with an in-memory job store: triggers only, never shared state."""

    def __init__(
        self,
        *,
        poll_seconds: float,
        poll_jobs: Sequence[Job] = (),
        cron: CronTrigger | None = None,
        cron_jobs: Sequence[Job] = (),
        timezone: str = "UTC",
    ) -> None:
        self._scheduler = AsyncIOScheduler(timezone=ZoneInfo(timezone))
        self._running_jobs: set[asyncio.Task[Any]] = set()
        for job in poll_jobs:
            self._scheduler.add_job(
                self._run,
                IntervalTrigger(seconds=poll_seconds),
                args=[job],
                id=job.name,
                name=job.name,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
            )
        for job in cron_jobs:
            if cron is None:
                raise CronError(f"job {job.name} needs a cron trigger")
            # A busy event loop may start a cron job late; within the hour it still runs (its period key
            # keeps a late start from running twice).
            self._scheduler.add_job(
                self._run,
                cron,
                args=[job],
                id=job.name,
                name=job.name,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=3600,
            )

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    def job_names(self) -> list[str]:
        return [job.id for job in self._scheduler.get_jobs()]

    def run_soon(self, name: str) -> None:
        """Bring a job's next run forward to now (e.g. a run was just queued); a no-op when stopped."""
        job = self._scheduler.get_job(name)
        if job is not None and self._scheduler.running:
            # In a fresh context: the scheduler's wake-up callback, and every job and wake-up after it, would
            # otherwise inherit the caller's context variables, stamping its request id on unrelated log lines.
            contextvars.Context().run(job.modify, next_run_time=datetime.now(self._scheduler.timezone))

    def start(self) -> None:
        self._scheduler.start()

    async def _run(self, job: Job) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._running_jobs.add(task)
        try:
            await _run_logged(job)
        finally:
            self._running_jobs.discard(task)

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """Start no more jobs, cancel the running ones and wait (at most ``grace_seconds``) until they have ended.

        Their work stays in the database, due or under a lease, for the next start or another replica. Waiting
        matters: a job still winding down (rolling back, returning its connection) when the event loop is torn
        down is cancelled a second time mid-clean-up, and a SQLite connection closed that way can wait forever
        for its worker thread, so the process never exits.
        """
        if self._scheduler.running:
            # APScheduler cancels the jobs it is running; it does not wait for them.
            self._scheduler.shutdown(wait=False)
        running = list(self._running_jobs)
        for task in running:
            # Only once: a second cancellation would interrupt the clean-up the first one started.
            if not task.cancelling():
                task.cancel()
        if running:
            _done, still_running = await asyncio.wait(running, timeout=grace_seconds)
            if still_running:
                logger.warning("jobs still running at shutdown", extra={"jobs": len(still_running)})


def current_fire_time(trigger: CronTrigger, now: datetime) -> datetime:
    """The fire time a cron job running at ``now`` belongs to, the same on every replica.

    Replicas run a firing a little late and not equally late; any instant within half a period after a fire
    time maps back to it.
    """
    upcoming = trigger.get_next_fire_time(None, now)
    following = trigger.get_next_fire_time(upcoming, upcoming + timedelta(microseconds=1))
    half_period = (following - upcoming) / 2 if upcoming and following else timedelta(seconds=1)
    fired = trigger.get_next_fire_time(None, now - half_period)
    return fired if fired is not None else now
