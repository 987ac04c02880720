"""The run queue: one active run, scheduled runs never dropped behind a manual one, failures queued again."""

from __future__ import annotations

from sqlalchemy import select

from loyalty.db.models import RecalcRun
from loyalty.db.session import transaction
from loyalty.recalc import runs


async def test_scheduled_run_waits_behind_a_manual_run_and_failures_are_retried(session_maker) -> None:
    async with transaction(session_maker) as session:
        manual = await runs.enqueue_run(session, trigger="manual")
        assert manual is not None
        assert await runs.enqueue_run(session, trigger="manual") is None
        scheduled = await runs.enqueue_run(session, trigger="scheduled", period_key="2026-11-24T03:00:00+00:00")
        assert scheduled is not None
        # Another replica queues the same period: nothing.
        assert await runs.enqueue_run(session, trigger="scheduled", period_key="2026-11-24T03:00:00+00:00") is None
    async with transaction(session_maker) as session:
        first = await runs.claim_next_run(session, 60)
        assert first is not None
        assert first.id == manual
    async with transaction(session_maker) as session:
        assert await runs.claim_next_run(session, 60) is None  # one at a time
        await runs.fail_run(session, manual, "boom")
    async with transaction(session_maker) as session:
        second = await runs.claim_next_run(session, 60)
        assert second is not None
        assert second.id == scheduled
        await runs.fail_run(session, scheduled, "database went away")
    async with session_maker() as session:
        rows = (
            await session.execute(select(RecalcRun.id, RecalcRun.trigger, RecalcRun.status, RecalcRun.retry_of))
        ).all()
    retries = [row for row in rows if row.trigger == "retry"]
    assert len(retries) == 1, rows
    assert retries[0].retry_of == scheduled
    assert retries[0].status == "queued"
    # The manual run is not retried: whoever asked for it sees it failed.
    assert not [row for row in rows if row.retry_of == manual]
