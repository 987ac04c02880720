"""A recalculation killed mid-run, and two replicas sharing one cron: real processes, real scheduler."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from loyalty.app import create_app
from loyalty.db.models import CustomerTier, RecalcRun
from loyalty.db.session import read_only
from loyalty.demo.generator import load_demo
from loyalty.settings import PROJECT_ROOT

LEASE_SECONDS = 3


async def _tiers(session_maker: Any) -> list[tuple[int, str, Any]]:
    async with read_only(session_maker)() as session:
        rows = await session.execute(select(CustomerTier.customer_id, CustomerTier.tier, CustomerTier.since))
        return sorted(tuple(row) for row in rows)


async def _run_status(session_maker: Any) -> list[tuple[int, str, str | None]]:
    # Read-only: on SQLite it must not queue behind the run's own write transaction.
    async with read_only(session_maker)() as session:
        rows = await session.execute(select(RecalcRun.id, RecalcRun.status, RecalcRun.error).order_by(RecalcRun.id))
        return [tuple(row) for row in rows]


@contextlib.asynccontextmanager
async def _final_write_held(engine: AsyncEngine, dialect: str) -> AsyncIterator[None]:
    """Holds a lock the run's one write transaction needs, so that a kill can never come after its commit, however
    fast the run is. On PostgreSQL the apply locks customer_score against other writers first, which SHARE mode
    blocks; on SQLite this connection's BEGIN IMMEDIATE takes the database's write lock."""
    async with engine.connect() as connection:
        if dialect == "postgresql":
            await connection.execute(text("LOCK TABLE customer_score IN SHARE MODE"))
        else:
            await connection.execute(text("SELECT 1"))
        yield
        await connection.rollback()


def _cli_environment(settings: Any) -> dict[str, str]:
    return {
        **os.environ,
        "LOYALTY_DATABASE_URL": settings.database_url,
        "LOYALTY_SECRET_KEY": settings.secret_key,
        "LOYALTY_TIERS_FILE": str(settings.tiers_file),
        "LOYALTY_RECALC_LEASE_SECONDS": str(LEASE_SECONDS),
        "LOYALTY_LOG_FORMAT": "plain",
    }


@pytest.mark.slow
async def test_killed_recalculation_keeps_previous_tiers_and_next_run_completes(
    database, settings, engine, session_maker, run_due, client, keys
) -> None:
    await load_demo(engine, customers=15_000, seed=11)
    first = await client.post("/v1/recalculations", json={}, headers=keys.headers("marketing"))
    assert first.status_code == 202
    await run_due()
    before = await _tiers(session_maker)
    assert len(before) == 15_000

    process = subprocess.Popen(  # noqa: ASYNC220 (the child must be a real process, to be killed)
        [sys.executable, "-m", "loyalty.cli", "recalc"],
        env=_cli_environment(settings),
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            statuses = [status for _, status, _ in await _run_status(session_maker)]
            if statuses[-1] == "running" and len(statuses) == 2:
                break
            await asyncio.sleep(0.02)
            if process.poll() is not None:
                runs = await _run_status(session_maker)
                errors = process.stderr.read().decode()[-2000:] if process.stderr else ""
                pytest.fail(f"the recalculation process exited ({process.returncode}, runs {runs}): {errors}")
        else:
            pytest.fail("the recalculation never started")
        async with _final_write_held(engine, database.dialect):
            # Let it get into its work (aggregation, fit, the rules and staging, on PostgreSQL up to the lock its
            # apply waits for) before killing it.
            await asyncio.sleep(1.5)
            assert process.poll() is None, "the run ended before it could be killed"
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        # Killed by the signal itself: no handler, no clean-up, no chance to mark its run.
        assert process.returncode == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()

    killed_id, status, _ = (await _run_status(session_maker))[-1]
    assert status == "running", "the killed run must not have reached its commit"
    assert await _tiers(session_maker) == before

    # While the dead process's lease lasts, the run holds the slot; once it runs out, any replica's next poll
    # marks the run failed and the slot is free again.
    assert (await client.post("/v1/recalculations", json={}, headers=keys.headers("marketing"))).status_code == 409
    deadline = time.monotonic() + LEASE_SECONDS + 30
    while (await run_due()).get("expired") != [killed_id]:
        assert time.monotonic() < deadline, "the killed run was never marked failed"
        await asyncio.sleep(0.2)
    runs = {run_id: (status, error) for run_id, status, error in await _run_status(session_maker)}
    assert runs[killed_id][0] == "failed"
    assert "lease expired" in (runs[killed_id][1] or "")
    assert await _tiers(session_maker) == before

    again = await client.post("/v1/recalculations", json={}, headers=keys.headers("marketing"))
    assert again.status_code == 202
    await run_due()
    *_earlier, (last_id, last_status, _error) = await _run_status(session_maker)
    assert (last_id, last_status) == (again.json()["run_id"], "succeeded")
    assert [status for _id, status, _ in await _run_status(session_maker)] == ["succeeded", "failed", "succeeded"]


@pytest.mark.slow
async def test_two_replicas_run_each_scheduled_recalculation_once(database, settings, engine, session_maker) -> None:
    if database.dialect != "postgresql":
        pytest.skip("replicas share a PostgreSQL database; the embedded SQLite default is one process")
    replica = settings.model_copy(
        update={"scheduler_enabled": True, "recalc_cron": "*/2 * * * * *", "poll_seconds": 0.2}
    )
    first, second = create_app(replica), create_app(replica)
    async with AsyncTestClient(app=first), AsyncTestClient(app=second):
        await asyncio.sleep(7.5)
    # Let a run that was claimed just before shutdown be judged by what is stored.
    async with session_maker() as session:
        rows = (
            await session.execute(
                select(
                    RecalcRun.period_key, RecalcRun.status, RecalcRun.attempts, RecalcRun.claimed_by, RecalcRun.error
                ).where(RecalcRun.trigger == "scheduled")
            )
        ).all()
        per_period = dict(
            (await session.execute(select(RecalcRun.period_key, func.count()).group_by(RecalcRun.period_key))).all()
        )
    assert len(rows) >= 3, rows
    assert all(count == 1 for count in per_period.values()), per_period
    finished = [row for row in rows if row.status == "succeeded"]
    assert len(finished) >= 2, rows
    # A period the timer queued just before shutdown may still be waiting, never claimed.
    assert all(row.attempts == (0 if row.status == "queued" else 1) for row in rows), rows
    assert not [row for row in rows if row.status == "failed"]


async def test_a_cancelled_recalculation_ends_promptly_and_the_next_one_completes(engine, session_maker) -> None:
    # A server shutting down cancels a run in whatever phase it is; the task must end (not hang on the driver
    # adapter's lock with a statement in its clean-up) and leave the tiers as they were.
    from loyalty.db.session import transaction
    from loyalty.recalc import runs
    from loyalty.recalc.full import execute_run
    from loyalty.tiers.config import load_tiers

    tiers = load_tiers(PROJECT_ROOT / "config" / "tiers.toml")
    await load_demo(engine, customers=3000, seed=9)

    async def start_run() -> int:
        async with transaction(session_maker) as session:
            run_id = await runs.enqueue_run(session, trigger="manual", as_of=None, dry_run=False)
        async with transaction(session_maker) as session:
            claimed = await runs.claim_next_run(session, 60)
        assert claimed is not None
        assert claimed.id == run_id
        return run_id

    for delay in (0.05, 0.3, 0.8):
        run_id = await start_run()
        task = asyncio.create_task(execute_run(session_maker, run_id, tiers, 60))
        await asyncio.sleep(delay)
        task.cancel()
        done, _pending = await asyncio.wait({task}, timeout=15)
        assert done, f"a run cancelled after {delay} s did not end"
        # Free the slot the cancelled run held, as its lease expiring would.
        async with transaction(session_maker) as session:
            await runs.fail_run(session, run_id, "cancelled by the test")
    run_id = await start_run()
    summary = await execute_run(session_maker, run_id, tiers, 60)
    assert summary["status"] == "succeeded"
