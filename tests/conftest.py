"""Shared fixtures: the same integration tests run on SQLite and on PostgreSQL.

PostgreSQL is used when ``LOYALTY_TEST_POSTGRES_URL`` names a server (an admin URL such as
``postgresql+asyncpg://postgres@127.0.0.1:5432/postgres``); each test session creates its own database there and
drops it at the end. Without it the PostgreSQL half is skipped with the reason; with
``LOYALTY_TEST_REQUIRE_POSTGRES=1`` (as in CI) an unreachable server fails the run instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from loyalty.access.services import create_key
from loyalty.app import create_app
from loyalty.db.base import Base
from loyalty.db.migrate import upgrade_database
from loyalty.db.session import create_engine, create_session_maker, transaction
from loyalty.offers.dispatch import OfferJobs
from loyalty.recalc.jobs import RecalcJobs
from loyalty.settings import PROJECT_ROOT, Settings

POSTGRES_URL = os.environ.get("LOYALTY_TEST_POSTGRES_URL", "")
REQUIRE_POSTGRES = os.environ.get("LOYALTY_TEST_REQUIRE_POSTGRES", "") not in ("", "0", "false")
TEST_SECRET = "test-secret-key-that-is-long-enough-for-hs256-0123456789"


@dataclass(frozen=True)
class TestDatabase:
    __test__ = False
    url: str
    dialect: str


def _postgres_unavailable(reason: str) -> None:
    if REQUIRE_POSTGRES:
        pytest.fail(f"PostgreSQL is required (LOYALTY_TEST_REQUIRE_POSTGRES) but {reason}")
    pytest.skip(f"PostgreSQL half skipped: {reason}")


async def _create_postgres_database() -> str:
    admin_url = make_url(POSTGRES_URL)
    name = f"loyalty_test_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            await connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await admin.dispose()
    return admin_url.set(database=name).render_as_string(hide_password=False)


async def _drop_postgres_database(url: str) -> None:
    target = make_url(url)
    admin = create_async_engine(make_url(POSTGRES_URL), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            await connection.execute(text(f'DROP DATABASE IF EXISTS "{target.database}" WITH (FORCE)'))
    finally:
        await admin.dispose()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
async def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[TestDatabase]:
    """A migrated database of each kind, created once per test session."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "loyalty.db"
        url = f"sqlite+aiosqlite:///{path}"
    else:
        if not POSTGRES_URL:
            _postgres_unavailable("LOYALTY_TEST_POSTGRES_URL is not set")
        try:
            url = await _create_postgres_database()
        except Exception as error:  # any failure to reach the server is the reason for the skip
            _postgres_unavailable(f"cannot create a database at {POSTGRES_URL}: {error}")
    engine = create_engine(Settings(database_url=url))
    try:
        await upgrade_database(engine)
    finally:
        await engine.dispose()
    yield TestDatabase(url=url, dialect=request.param)
    if request.param == "postgresql":
        await _drop_postgres_database(url)


@pytest.fixture
def settings(database: TestDatabase) -> Settings:
    return Settings(
        database_url=database.url,
        secret_key=TEST_SECRET,
        tiers_file=PROJECT_ROOT / "config" / "tiers.toml",
        scheduler_enabled=False,
        log_format="plain",
        rate_limit=1_000_000,
        _env_file=None,  # type: ignore[call-arg]
    )


async def _empty_all_tables(engine: AsyncEngine) -> None:
    tables = list(reversed(Base.metadata.sorted_tables))
    async with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            names = ", ".join(f'"{table.name}"' for table in tables)
            await connection.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
        else:
            for table in tables:
                await connection.execute(table.delete())


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """An engine on the test database; every table is emptied after the test, so tests never share state."""
    engine = create_engine(settings)
    yield engine
    await _empty_all_tables(engine)
    await engine.dispose()


@pytest.fixture
def session_maker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return create_session_maker(engine)


@pytest.fixture
async def db_session(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    """A session inside a transaction that is rolled back: commits in the code under test become savepoints."""
    async with engine.connect() as connection:
        outer = await connection.begin()
        session = AsyncSession(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
        try:
            yield session
        finally:
            await session.close()
            await outer.rollback()


@pytest.fixture
async def app(settings: Settings, engine: AsyncEngine) -> Litestar:
    return create_app(settings)


@pytest.fixture
async def client(app: Litestar) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app=app) as test_client:
        yield test_client


@pytest.fixture
async def concurrent_client(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose requests run concurrently, in the test's own event loop.

    ``AsyncTestClient`` hands each request to the app on a loop of its own and waits for the answer, so requests
    gathered on it still reach the app one at a time. Through ASGI on this loop they overlap as on a real server.
    """
    transport = httpx.ASGITransport(app=app)
    # Not the app's lifespan (its task group must close in the task that opened it, which a fixture's teardown is
    # not), but what its shutdown does with the scheduler off.
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client
    finally:
        await app.state.order_groups.close()
        await app.state.engine.dispose()


@dataclass(frozen=True)
class Keys:
    storefront: str
    marketing: str
    admin: str

    def headers(self, scope: str) -> dict[str, str]:
        return {"X-API-Key": getattr(self, scope)}


@pytest.fixture
async def keys(session_maker: async_sessionmaker[AsyncSession]) -> Keys:
    plain: dict[str, str] = {}
    async with transaction(session_maker) as session:
        for scope in ("storefront", "marketing", "admin"):
            _key, plain[scope] = await create_key(session, f"test {scope}", scope)
    return Keys(**plain)


@pytest.fixture
def storefront(keys: Keys) -> dict[str, str]:
    return keys.headers("storefront")


@pytest.fixture
def tmp_cwd(tmp_path: Path) -> Iterator[Path]:
    previous = Path.cwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(previous)


@pytest.fixture
def run_due(app: Litestar, session_maker: async_sessionmaker[AsyncSession]) -> Any:
    """Run the `recalc.run_due` job once, as the app's timer would (the timer is off in most tests).

    It uses the test's own engine: the app's engine lives on the test client's event loop.
    """
    state = app.state

    async def run() -> dict[str, Any]:
        jobs = RecalcJobs(session_maker, state.tiers, None, state.settings.recalc_lease_seconds)  # type: ignore[arg-type]
        result = await jobs.run_due()
        state.model_cache.invalidate()
        return result

    return run


@pytest.fixture
def dispatch_due(session_maker: async_sessionmaker[AsyncSession], settings: Settings) -> Any:
    """Run `offers.dispatch_due` once on the test's own engine (the app's timer is off in most tests)."""

    async def run() -> dict[str, Any]:
        return await OfferJobs(session_maker, settings.timezone, settings.recalc_lease_seconds).dispatch_due()

    return run
