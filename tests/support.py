"""Real `loyalty` processes for the tests that need one: started with the test's settings, logging to a file,
waited for until ready, killed with SIGKILL or stopped. Also what the planner-statistics tests read of a database."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from loyalty.settings import PROJECT_ROOT, Settings

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def log_tail(log: Path) -> str:
    """The end of a process's log, for a failure message."""
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def loyalty_environment(
    settings: Settings,
    *,
    scheduler: bool = False,
    log_level: str = "WARNING",
    log_format: str = "plain",
    **overrides: str,
) -> dict[str, str]:
    """The environment a `loyalty` process needs to work on the test's database, plus ``LOYALTY_*`` overrides
    (``poll_seconds="1"`` sets ``LOYALTY_POLL_SECONDS``).

    The scheduler is off unless asked for: a test that wants its timer says so.
    """
    return {
        **os.environ,
        "LOYALTY_DATABASE_URL": settings.database_url,
        "LOYALTY_SECRET_KEY": settings.secret_key or "",
        "LOYALTY_TIERS_FILE": str(settings.tiers_file),
        "LOYALTY_LOG_FORMAT": log_format,
        "LOYALTY_LOG_LEVEL": log_level,
        "LOYALTY_SCHEDULER_ENABLED": "true" if scheduler else "false",
        "LOYALTY_RATE_LIMIT": str(settings.rate_limit),
        # Once a year: the daily cron must not start a recalculation in the middle of a test.
        "LOYALTY_RECALC_CRON": "0 0 1 1 *",
        **{f"LOYALTY_{name.upper()}": value for name, value in overrides.items()},
    }


@dataclass
class Process:
    """A `loyalty` command running in its own process, logging to a file (a pipe nobody reads fills up and blocks
    a process that logs a lot, as a server does while its database is down)."""

    popen: subprocess.Popen[bytes]
    log: Path

    def log_tail(self) -> str:
        return log_tail(self.log)

    def running(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs, as when the machine or the OOM killer takes the process."""
        os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)
        assert self.popen.returncode == -signal.SIGKILL

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 15 s."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


@contextmanager
def loyalty_command(
    arguments: list[str], environment: dict[str, str], log: Path, *, capture_output: bool = False
) -> Iterator[Process]:
    """`python -m loyalty.cli ARGUMENTS` in its own process; stopped (if still running) when the block ends.

    Its output goes to ``log`` (appended) with its errors, or, with ``capture_output``, to a pipe for `communicate`.
    """
    with log.open("ab") as log_file:
        popen = subprocess.Popen(
            [sys.executable, "-m", "loyalty.cli", *arguments],
            env=environment,
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE if capture_output else log_file,
            stderr=log_file,
        )
    process = Process(popen, log)
    try:
        yield process
    finally:
        process.stop()
        if popen.stdout is not None:
            popen.stdout.close()


@dataclass(frozen=True)
class Finished:
    """A `loyalty` command that ran to its end: its exit status and what it printed (its log is in its file)."""

    returncode: int
    output: str


async def run_loyalty(arguments: list[str], environment: dict[str, str], log: Path, *, within: float) -> Finished:
    """Run a `loyalty` command to its end, failed or not; fails the test if it overruns ``within`` s."""
    with loyalty_command(arguments, environment, log, capture_output=True) as process:
        try:
            output, _ = await asyncio.to_thread(process.popen.communicate, timeout=within)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`loyalty {' '.join(arguments)}` did not finish within {within:g} s: {process.log_tail()}")
    return Finished(process.popen.returncode, output.decode())


async def run_to_completion(arguments: list[str], environment: dict[str, str], log: Path, within: float) -> str:
    """Run a `loyalty` command to its end; answers its output, and fails the test if it fails or overruns."""
    finished = await run_loyalty(arguments, environment, log, within=within)
    if finished.returncode != 0:
        pytest.fail(f"`loyalty {' '.join(arguments)}` failed ({finished.returncode}): {log_tail(log)}")
    return finished.output


@dataclass
class Server(Process):
    url: str


@asynccontextmanager
async def loyalty_server(
    environment: dict[str, str], log: Path, *, ready_within: float | None = 60
) -> AsyncIterator[Server]:
    """`loyalty serve` on a free port, yielded once `/health/ready` answers 200 (at once with ``ready_within=None``,
    for a test that watches the server's work in the database rather than its answers); stopped when the block ends.

    Fails the test, with the end of the server's log, if it exits or is not ready within ``ready_within`` s.
    """
    port = free_port()
    with loyalty_command(["serve", "--port", str(port)], environment, log) as process:
        server = Server(process.popen, log, f"http://127.0.0.1:{port}")
        if ready_within is None:
            yield server
            return
        async with httpx.AsyncClient(timeout=5) as client:
            deadline = time.monotonic() + ready_within
            while True:
                try:
                    if (await client.get(f"{server.url}/health/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if not server.running():
                    pytest.fail(f"the server exited ({server.popen.returncode}): {server.log_tail()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not become ready: {server.log_tail()}")
                await asyncio.sleep(0.1)
        yield server


@asynccontextmanager
async def running_server(settings: Settings, log: Path) -> AsyncIterator[str]:
    """`loyalty serve` on the test's settings with its scheduler off, logging to ``log``; yields its base URL once
    it is ready."""
    async with loyalty_server(loyalty_environment(settings), log) as server:
        yield server.url


async def wait_for(
    probe: Callable[[], Awaitable[T | None]],
    what: str,
    *,
    within: float,
    every: float = 0.05,
    watched: Process | None = None,
) -> T:
    """Poll ``probe`` until it answers something other than None or False; fail naming ``what`` after ``within`` s.

    With ``watched``, a process that exits meanwhile fails the wait at once, with its log.
    """
    deadline = time.monotonic() + within
    while True:
        answer = await probe()
        if answer is not None and answer is not False:
            return answer
        if watched is not None and not watched.running():
            pytest.fail(f"{what}: the process exited ({watched.popen.returncode}) first: {watched.log_tail()}")
        if time.monotonic() > deadline:
            suffix = f"; its log: {watched.log_tail()}" if watched is not None else ""
            pytest.fail(f"{what}: not within {within:g} s{suffix}")
        await asyncio.sleep(every)


async def planner_statistics(engine: AsyncEngine) -> dict[str, tuple[int, int]]:
    """PostgreSQL: (times analyzed by hand, rows changed since the last analysis) of each table. A new transaction,
    so a new snapshot of the server's statistics."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            text(
                "SELECT relname, analyze_count, n_mod_since_analyze FROM pg_stat_user_tables "
                "WHERE schemaname = current_schema()"
            )
        )
        return {name: (analyzed, changed) for name, analyzed, changed in rows.all()}


async def has_sqlite_statistics(engine: AsyncEngine) -> bool:
    """SQLite: whether anything ran ANALYZE on the database."""
    async with engine.connect() as connection:
        return bool(await connection.scalar(text("SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'")))
