"""The timer runs for real: short intervals, a failing job does not stop it, cron expressions are checked."""

from __future__ import annotations

import asyncio

import pytest

from loyalty.scheduling.timer import CronError, Job, Timer, parse_cron


async def test_poll_jobs_run_repeatedly_and_survive_failures() -> None:
    runs: list[str] = []

    async def counting() -> dict[str, int]:
        runs.append("ok")
        return {"done": 1}

    async def failing() -> dict[str, int]:
        runs.append("failed")
        raise RuntimeError("boom")

    timer = Timer(poll_seconds=0.05, poll_jobs=[Job("test.count", counting), Job("test.fail", failing)])
    timer.start()
    try:
        await asyncio.sleep(0.5)
    finally:
        await timer.stop()
    # AsyncIOScheduler carries out shutdown on its event loop, i.e. at the next turn.
    await asyncio.sleep(0.01)
    assert runs.count("ok") >= 3
    assert runs.count("failed") >= 3
    assert not timer.running


async def test_cron_job_fires_on_a_seconds_cron() -> None:
    fired = asyncio.Event()

    async def mark() -> dict[str, int]:
        fired.set()
        return {}

    timer = Timer(poll_seconds=60, cron=parse_cron("* * * * * *", "UTC"), cron_jobs=[Job("test.cron", mark)])
    timer.start()
    try:
        await asyncio.wait_for(fired.wait(), timeout=3)
    finally:
        await timer.stop()
    assert timer.job_names() == ["test.cron"] or not timer.running


async def test_stop_returns_only_once_a_running_job_has_wound_down() -> None:
    """A server stopping mid-job returns its connection before the event loop goes: the job's clean-up has run."""
    started, wound_down = asyncio.Event(), asyncio.Event()

    async def long_running() -> dict[str, int]:
        started.set()
        try:
            await asyncio.sleep(60)
        finally:
            # Standing in for a rollback and a connection going back to the pool: clean-up that awaits.
            await asyncio.sleep(0.3)
            wound_down.set()
        return {}

    timer = Timer(poll_seconds=0.05, poll_jobs=[Job("test.long", long_running)])
    timer.start()
    await asyncio.wait_for(started.wait(), timeout=5)
    await timer.stop()
    assert wound_down.is_set()
    assert not timer.running


@pytest.mark.parametrize(
    ("expression", "zone", "message"),
    [("0 3 * *", "UTC", "expected 5 fields"), ("0 25 * * *", "UTC", "0 25"), ("0 3 * * *", "Mars/Base", "time zone")],
)
def test_bad_cron(expression: str, zone: str, message: str) -> None:
    with pytest.raises(CronError, match=message):
        parse_cron(expression, zone)


def test_good_cron() -> None:
    assert parse_cron("0 3 * * *", "Europe/Lisbon") is not None
    assert parse_cron("30 0 3 * * *", "UTC") is not None
