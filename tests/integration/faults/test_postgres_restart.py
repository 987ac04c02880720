"""PostgreSQL stopped and started again under load: requests fail fast with 503 while it is down, succeed again
within seconds after, and every order that got a 2xx is stored.

The server the test stops is a cluster of its own (initdb in a temporary folder, its own port and socket), so the
other tests, which share the PostgreSQL on 5432, are not disturbed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from loyalty.access.services import create_key
from loyalty.db.migrate import upgrade_database
from loyalty.db.session import create_engine, create_session_maker, transaction
from loyalty.settings import PROJECT_ROOT, Settings
from tests.conftest import TEST_SECRET
from tests.support import free_port, loyalty_environment, loyalty_server, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

# "A few seconds": generous for a loaded 2-core machine, yet far below anything a hung request would take.
FAIL_FAST_SECONDS = 5.0
BACK_WITHIN_SECONDS = 20.0
ORDER_WRITERS = 6
BADGE_READERS = 2


def _postgres_binaries() -> Path | None:
    """The directory with initdb and pg_ctl: `pg_config --bindir`, else the newest /usr/lib/postgresql/*/bin."""
    candidates: list[Path] = []
    try:
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout
        candidates.append(Path(bindir.strip()))
    except (OSError, subprocess.CalledProcessError):
        pass
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    return None


@dataclass
class Cluster:
    """A PostgreSQL cluster in a temporary folder, run as the `postgres` user when the tests run as root."""

    binaries: Path
    folder: Path
    port: int

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/loyalty"

    def _run(self, *arguments: str, timeout: float = 120) -> None:
        command = [str(self.binaries / arguments[0]), *arguments[1:]]
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root.
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            log = (self.folder / "server.log").read_text(errors="replace")[-2000:] if self.folder.exists() else ""
            pytest.fail(f"{arguments[0]} failed: {result.stdout}{result.stderr}\n{log}")

    def initdb(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self, *settings: str) -> None:
        options = " ".join(
            [f"-p {self.port} -k {self.folder}", "-c listen_addresses=127.0.0.1", *(f"-c {each}" for each in settings)]
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "server.log"), "-o", options, "-w", "start")

    def start_recovering(self) -> None:
        """Start, but stay in recovery refusing connections ("the database system is not accepting connections",
        SQLSTATE 57P03), as a server restarted after a crash does until it has replayed its WAL; see `promote`."""
        signal_file = self.data / "standby.signal"
        signal_file.touch()
        if os.geteuid() == 0:
            shutil.chown(signal_file, "postgres", "postgres")
        self.start("hot_standby=off")

    def promote(self) -> None:
        """End the recovery: from now on the server accepts connections."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "promote")

    def stop_immediately(self) -> None:
        """Stop as a crash would: every backend is killed at once, nothing is flushed or checkpointed."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    binaries = _postgres_binaries()
    if binaries is None:
        pytest.skip("initdb and pg_ctl not found (pg_config --bindir, /usr/lib/postgresql/*/bin): install PostgreSQL")
    # Not under pytest's tmp_path: the `postgres` user must be able to reach the folder, and root's temporary
    # folders are closed to others.
    folder = Path(tempfile.mkdtemp(prefix="loyalty-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    cluster = Cluster(binaries, folder, free_port())
    try:
        cluster.initdb()
        cluster.start()
        yield cluster
    finally:
        if (cluster.data / "postmaster.pid").exists():
            cluster.stop_immediately()
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class Answer:
    kind: str  # "order" or "badge"
    key: str
    started: float
    seconds: float
    status: int | None
    body: Any = None
    retry_after: str | None = None
    content_type: str = ""
    error: str | None = None

    @property
    def finished(self) -> float:
        return self.started + self.seconds


@dataclass
class Load:
    """Storefront traffic: concurrent order posts and badge reads, every answer recorded."""

    url: str
    key: str
    answers: list[Answer] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    numbers: Iterator[int] = field(default_factory=itertools.count)

    async def _request(self, client: httpx.AsyncClient, kind: str, key: str, method: str, path: str, **kw: Any) -> None:
        started = time.monotonic()
        try:
            response = await client.request(method, f"{self.url}{path}", headers={"X-API-Key": self.key}, **kw)
        except httpx.HTTPError as error:
            # A transport error is recorded as such: the assertions below allow none.
            self.answers.append(Answer(kind, key, started, time.monotonic() - started, None, error=repr(error)))
            return
        content_type = response.headers.get("content-type", "")
        body = response.json() if "json" in content_type else response.text
        self.answers.append(
            Answer(
                kind,
                key,
                started,
                time.monotonic() - started,
                response.status_code,
                body,
                response.headers.get("retry-after"),
                content_type,
            )
        )

    async def write_orders(self, client: httpx.AsyncClient) -> None:
        while not self.stop.is_set():
            number = next(self.numbers)
            order = {
                "order_id": f"restart-{number}",
                "customer_id": f"shopper-{number % 40}",
                "placed_at": (datetime.now(UTC) - timedelta(minutes=1)).isoformat(),
                "total": "42.50",
                "currency": "USD",
                "items": [{"sku": "TEE-1", "category": "tops", "quantity": 1, "unit_price": "42.50"}],
            }
            await self._request(client, "order", order["order_id"], "POST", "/v1/orders", json=order)

    async def read_badges(self, client: httpx.AsyncClient) -> None:
        while not self.stop.is_set():
            await self._request(client, "badge", "shopper-1", "GET", "/v1/customers/shopper-1/tier")
            await asyncio.sleep(0.02)

    def since(self, moment: float) -> list[Answer]:
        return [answer for answer in self.answers if answer.started >= moment]


async def _prepare_database(cluster: Cluster) -> tuple[Settings, str]:
    connection = await asyncpg.connect(host="127.0.0.1", port=cluster.port, user="postgres", database="postgres")
    try:
        await connection.execute("CREATE DATABASE loyalty")
    finally:
        await connection.close()
    settings = Settings(
        database_url=cluster.url,
        secret_key=TEST_SECRET,
        tiers_file=PROJECT_ROOT / "config" / "tiers.toml",
        rate_limit=1_000_000,
        _env_file=None,  # type: ignore[call-arg]
    )
    engine = create_engine(settings)
    try:
        await upgrade_database(engine)
        async with transaction(create_session_maker(engine)) as session:
            _key, secret = await create_key(session, "restart test", "storefront")
    finally:
        await engine.dispose()
    return settings, secret


async def _stored_orders(cluster: Cluster) -> set[str]:
    connection = await asyncpg.connect(host="127.0.0.1", port=cluster.port, user="postgres", database="loyalty")
    try:
        return {row["external_id"] for row in await connection.fetch("SELECT external_id FROM customer_order")}
    finally:
        await connection.close()


def _is_unavailable_problem(answer: Answer) -> bool:
    return (
        answer.status == 503
        and answer.content_type.startswith("application/problem+json")
        and isinstance(answer.body, dict)
        and answer.body.get("type") == "/problems/unavailable"
        and answer.retry_after is not None
        and answer.retry_after.isdigit()
    )


async def test_requests_fail_fast_while_postgres_is_down_and_no_acknowledged_order_is_lost(
    cluster: Cluster, tmp_path: Path
) -> None:
    settings, key = await _prepare_database(cluster)
    # The scheduler runs too, as in production: its jobs fail while the database is down and must not hold on to
    # connections the requests need.
    environment = loyalty_environment(settings, scheduler=True, poll_seconds="0.5")
    async with loyalty_server(environment, tmp_path / "serve.log") as server:
        load = Load(server.url, key)
        limits = httpx.Limits(max_connections=ORDER_WRITERS + BADGE_READERS + 2)
        # No client timeout below a minute: a request that hangs must show up as a long duration, not an error.
        async with httpx.AsyncClient(timeout=60, limits=limits) as client, asyncio.TaskGroup() as workers:
            for _ in range(ORDER_WRITERS):
                workers.create_task(load.write_orders(client))

            async def orders_stored_since(moment: float, count: int) -> bool:
                return sum(1 for a in load.since(moment) if a.kind == "order" and a.status == 201) >= count

            await wait_for(lambda: orders_stored_since(0, 30), "orders before the outage", within=60)
            # The badge readers start once their customer exists: a 404 is not what this test is about.
            for _ in range(BADGE_READERS):
                workers.create_task(load.read_badges(client))
            await asyncio.sleep(0.5)

            # Down: connections are refused. Then restarted but still recovering: connections are refused by
            # PostgreSQL itself (57P03). Then up.
            cluster.stop_immediately()
            down = time.monotonic()
            await asyncio.sleep(2)
            ready_while_down = await _timed(client.get(f"{server.url}/health/ready"))
            cluster.start_recovering()
            recovering = time.monotonic()
            await asyncio.sleep(2)
            ready_while_recovering = await _timed(client.get(f"{server.url}/health/ready"))
            promoting = time.monotonic()
            cluster.promote()
            up = time.monotonic()

            first_success = await wait_for(
                lambda: _first_order_since(load, up), "an order stored after the restart", within=BACK_WITHIN_SECONDS
            )
            await wait_for(lambda: orders_stored_since(first_success.finished, 30), "orders after it", within=60)
            ready_after = await _timed(client.get(f"{server.url}/health/ready"))
            load.stop.set()
        stored = await _stored_orders(cluster)
        log = server.log_tail()

    # While the database was down or recovering: every request answered at once, with the problem and when to
    # retry; so did the readiness probe.
    for name, (start, end) in {"down": (down, recovering), "recovering": (recovering, promoting)}.items():
        during = [a for a in load.answers if start <= a.started and a.finished < end]
        assert len(during) >= ORDER_WRITERS + BADGE_READERS, f"requests stalled while {name}: {during}"
        wrong = [a for a in during if not _is_unavailable_problem(a)]
        assert not wrong, f"while {name}: expected the 503 problem with Retry-After: {wrong[:3]}"
    slow = [a for a in load.answers if down <= a.started < promoting and a.seconds > FAIL_FAST_SECONDS]
    assert not slow, f"requests hung while the database was unavailable: {slow[:3]}"
    for (status, body), seconds in (ready_while_down, ready_while_recovering):
        assert status == 503, body
        assert body["status"] == "unavailable"
        assert seconds < FAIL_FAST_SECONDS

    # Around the outage, nothing but a success or the 503 problem: no 500, no transport error.
    unexpected = [a for a in load.answers if a.status not in (200, 201) and not _is_unavailable_problem(a)]
    assert not unexpected, f"{unexpected[:3]}\nserver log:\n{log}"
    # Back within seconds, and everything started since the first success has succeeded.
    assert first_success.finished - up < BACK_WITHIN_SECONDS
    after = [a for a in load.since(first_success.finished) if a.status not in (200, 201)]
    assert not after, after[:3]
    assert ready_after[0][0] == 200

    acknowledged = {a.key for a in load.answers if a.kind == "order" and a.status == 201}
    assert len(acknowledged) >= 60
    assert acknowledged <= stored, f"orders answered 201 but not stored: {sorted(acknowledged - stored)[:10]}"


async def _timed(request: Awaitable[httpx.Response]) -> tuple[tuple[int, Any], float]:
    started = time.monotonic()
    response = await request
    return (response.status_code, response.json()), time.monotonic() - started


async def _first_order_since(load: Load, moment: float) -> Answer | None:
    return next((a for a in load.since(moment) if a.kind == "order" and a.status == 201), None)
