"""Helpers shared by tests that need a real server process."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from loyalty.settings import PROJECT_ROOT, Settings


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def running_server(settings: Settings) -> AsyncIterator[str]:
    """`loyalty serve` in its own process on the test database; yields its base URL once it is ready."""
    port = free_port()
    environment = {
        **os.environ,
        "LOYALTY_DATABASE_URL": settings.database_url,
        "LOYALTY_SECRET_KEY": settings.secret_key or "",
        "LOYALTY_TIERS_FILE": str(settings.tiers_file),
        "LOYALTY_LOG_FORMAT": "plain",
        "LOYALTY_LOG_LEVEL": "WARNING",
        "LOYALTY_SCHEDULER_ENABLED": "false",
    }
    process = subprocess.Popen(  # noqa: ASYNC220 (a real server process is the point of these tests)
        [sys.executable, "-m", "loyalty.cli", "serve", "--port", str(port)],
        env=environment,
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                try:
                    if (await client.get(f"{base}/health/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None:
                    pytest.fail(f"server exited: {process.stderr.read().decode()[-2000:] if process.stderr else ''}")
                await asyncio.sleep(0.2)
            else:
                pytest.fail("server did not become ready")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
