"""What the timer logs: a job cut short by shutdown is no error, and no job carries a request's id.

Both were found by the soak test (`tests/soak`), which fails on any error line in the server's log.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from loyalty.lib.logging import RequestIdFilter, request_id_var
from loyalty.scheduling.timer import Job, Timer


async def test_a_job_in_flight_at_shutdown_is_not_logged_as_an_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    started = asyncio.Event()

    async def long_running() -> dict[str, int]:
        started.set()
        await asyncio.sleep(60)
        return {}

    timer = Timer(poll_seconds=0.05, poll_jobs=[Job("test.long", long_running)])
    timer.start()
    await asyncio.wait_for(started.wait(), timeout=5)
    # What a stopping server does: its work stays in the database for the next start or another replica.
    await timer.stop()
    await asyncio.sleep(0.1)
    assert not timer.running
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
    assert [getattr(record, "job", None) for record in caplog.records if record.getMessage() == "job cancelled"] == [
        "test.long"
    ]


async def test_a_job_brought_forward_by_a_request_does_not_carry_its_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(RequestIdFilter())
    ran = asyncio.Event()
    seen: list[str | None] = []

    async def job() -> dict[str, int]:
        seen.append(request_id_var.get())
        ran.set()
        return {"done": 1}

    timer = Timer(poll_seconds=3600, poll_jobs=[Job("test.soon", job)])
    timer.start()
    try:
        # The timer's first look at its jobs, on the next turn of the loop, finds nothing due for an hour.
        await asyncio.sleep(0.05)
        # As `POST /v1/recalculations` does, while serving its request.
        token = request_id_var.set("request-that-queued-the-run")
        try:
            timer.run_soon("test.soon")
        finally:
            request_id_var.reset(token)
        await asyncio.wait_for(ran.wait(), timeout=5)
        await asyncio.sleep(0.05)
    finally:
        await timer.stop()
        await asyncio.sleep(0.01)
    assert seen == [None]
    done = [record for record in caplog.records if record.getMessage() == "job done"]
    assert [getattr(record, "request_id", None) for record in done] == [None]
