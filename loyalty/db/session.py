"""Engines and sessions: the one place that knows how SQLite and PostgreSQL connections are set up."""

from __future__ import annotations

import asyncio
import weakref
from collections import namedtuple
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy import Connection, Dialect, Engine, Executable, Numeric, Row, Select, event
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.util import await_only, greenlet_spawn

from loyalty.settings import Settings

READ_ONLY_OPTION = "loyalty_read_only"
# A migration's connection (``migrate.schema_change``): on SQLite it runs with foreign keys off.
SCHEMA_CHANGE_OPTION = "loyalty_schema_change"


def _configure_sqlite(engine: AsyncEngine, settings: Settings) -> None:
    busy_ms = int(settings.db_timeout_seconds * 1000 * 3)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # The driver's own implicit BEGIN breaks SAVEPOINT; we issue BEGIN ourselves below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        # 64 MB of page cache (grown only as the database does) instead of SQLite's 2 MB: a campaign send inserts
        # random codes and event keys, each into a random page of its unique index, and with the default cache
        # nearly every row reads its page back from the OS (a 200k-member send took twice as long). Set once per
        # connection: changing it around a statement would need a restore that a cancelled task cannot safely run.
        cursor.execute("PRAGMA cache_size=-65536")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front: a transaction that reads, then writes, can otherwise fail
        # with SQLITE_BUSY when another connection wrote in between, instead of waiting its turn. Read-only
        # sessions begin DEFERRED and read a WAL snapshot, so they never wait for a writer (nor it for them).
        options = connection.get_execution_options()
        if options.get(SCHEMA_CHANGE_OPTION):
            # Only outside a transaction does this pragma take effect.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        if options.get(READ_ONLY_OPTION):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def create_engine(settings: Settings) -> AsyncEngine:
    """An async engine for the configured database.

    Statement parameters are kept out of error messages (``hide_parameters``): an error's text reaches the logs
    with its traceback, and the parameters of a write can be a webhook's signing secret or a customer's email.
    """
    if settings.is_sqlite:
        engine = create_async_engine(
            settings.database_url,
            hide_parameters=True,
            pool_size=max(2, min(settings.db_pool_size, 5)),
            max_overflow=0,
            pool_timeout=settings.db_timeout_seconds * 3,
        )
        _configure_sqlite(engine, settings)
        return engine
    return create_async_engine(
        settings.database_url,
        hide_parameters=True,
        # The overflow connections are kept once opened, as the pool's own, rather than closed on return: under
        # load SQLAlchemy's asyncio queue counts a connection handed to a waiting request as still queued until that
        # request runs, so a burst of returns found the queue full and closed overflow connections the waiting
        # requests then opened again (50 to 80 new sessions a second at 64 concurrent badge reads, each a server
        # process, a TLS probe and a statement cache to rebuild). The most connections a process opens is the same.
        pool_size=settings.db_pool_size + settings.db_max_overflow,
        max_overflow=0,
        pool_timeout=settings.db_timeout_seconds,
        # No ping before each checkout: it would be one more round trip per request. After a database restart the
        # first statement on a dead connection fails (a 503) and invalidates the whole pool, so every later checkout
        # connects afresh (tests/integration/faults/test_postgres_restart.py).
        pool_pre_ping=False,
        connect_args=_postgres_connect_args(settings, "loyalty"),
    )


def _postgres_connect_args(settings: Settings, application_name: str) -> dict[str, Any]:
    return {
        # Fail fast when the server is down, so callers get a 503 rather than a hung request.
        "timeout": settings.db_timeout_seconds,
        "command_timeout": 300,
        # JIT compilation costs more than it saves on the short per-customer statements.
        "server_settings": {"application_name": application_name, "jit": "off"},
    }


# Options of SQLAlchemy's asyncpg dialect that its URL carries but asyncpg.connect does not take.
_DIALECT_ONLY_OPTIONS = ("prepared_statement_cache_size", "prepared_statement_name_func", "async_fallback")


async def connect_outside_pool(engine: AsyncEngine, settings: Settings, application_name: str) -> asyncpg.Connection:
    """A connection of the driver's own (asyncpg), to the engine's PostgreSQL database, that no pool hands out.

    For a connection that holds session state for its whole life, such as a LISTEN: returned to the pool, it
    would go on receiving notifications for whoever took it next; kept out of the pool, it would leave one
    connection fewer for requests. It is set up as the pool's connections are (timeouts, settings).
    """
    _args, options = engine.dialect.create_connect_args(engine.url)
    for name in _DIALECT_ONLY_OPTIONS:
        options.pop(name, None)
    options.update(_postgres_connect_args(settings, application_name))
    return await asyncpg.connect(**options)


def create_session_maker(engine: AsyncEngine, info: dict[str, Any] | None = None) -> async_sessionmaker[AsyncSession]:
    """Sessions for the service's work; ``info`` starts each session's ``Session.info`` (a copy of it)."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False, info=info)


def read_only(session_maker: async_sessionmaker[AsyncSession]) -> async_sessionmaker[AsyncSession]:
    """Sessions for work that only reads: on SQLite they neither take nor wait for the write lock."""
    engine = session_maker.kw["bind"]
    return async_sessionmaker(
        engine.execution_options(**{READ_ONLY_OPTION: True}), expire_on_commit=False, autoflush=False
    )


@asynccontextmanager
async def single_statement(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection for work that is one read statement, such as checking an API key on every request.

    On PostgreSQL it runs outside a transaction: a lone statement sees one snapshot either way, and the BEGIN
    and ROLLBACK around it would be two more round trips (each a wake-up of the server process) per request.
    On SQLite it is a read-only session's deferred transaction, which never waits for the write lock.
    """
    async with engine.connect() as connection:
        await connection.execution_options(**_single_statement_options(connection.dialect.name))
        yield connection


def _single_statement_options(dialect_name: str) -> dict[str, Any]:
    return {"isolation_level": "AUTOCOMMIT"} if dialect_name == "postgresql" else {READ_ONLY_OPTION: True}


async def read_first(
    engine: AsyncEngine, statement: Executable, parameters: Mapping[str, Any]
) -> Row[Any] | tuple[Any, ...] | None:
    """The first row of one read statement, on a connection set up as `single_statement` sets it up.

    The checkout, the statement and the check-in run in one pass through SQLAlchemy's synchronous core (as its
    asyncio layer runs each of them, in a greenlet that awaits the driver): through the async API each is a
    switch of its own, and on the storefront's badge read the three cost more than the statement's own work.
    On asyncpg the statement runs on the driver's connection itself (`_AsyncpgRead`); the row is then a named
    tuple rather than a `Row`, with the same values, names and positions.
    """
    reads = _reads_for(engine.sync_engine)
    if reads.slots is None:
        return await greenlet_spawn(_read_first, engine.sync_engine, reads, statement, parameters)
    await _take_slot(reads.slots, engine.sync_engine)
    try:
        return await greenlet_spawn(_read_first, engine.sync_engine, reads, statement, parameters)
    finally:
        reads.slots.release()


class _AsyncpgRead:
    """A read statement compiled once for asyncpg, run on the driver's connection with a prepared statement.

    Through SQLAlchemy's `Connection.execute` the badge's read took 0.19 ms of CPU, this way 0.10 ms (the driver's
    own part is 0.02 ms): the rest was the compiled cache's key, an execution context, a cursor, a result and its
    row, and the connection's options set and reset, on every storefront read. What SQLAlchemy would do to the
    values is kept: each column type's bind and result processors are applied, and asyncpg keeps the statement
    prepared on each connection (its own statement cache, by SQL text).
    """

    def __init__(self, compiled: SQLCompiler, statement: Select[Any], dialect: Dialect) -> None:
        self.sql = compiled.string
        binds = [(name, compiled.binds[name]) for name in compiled.positiontup or ()]
        # Per positional parameter: its name, its bind (the value when not given), its type's processor.
        self.binds = [(name, bind, bind.type.dialect_impl(dialect).bind_processor(dialect)) for name, bind in binds]
        columns = list(statement.selected_columns.items())
        self.processors = [column.type.dialect_impl(dialect).result_processor(dialect, None) for _, column in columns]
        self.row_type: Any = namedtuple("Row", [name for name, _ in columns], rename=True)  # type: ignore[misc]

    @classmethod
    def of(cls, statement: Select[Any], dialect: Dialect) -> _AsyncpgRead | None:
        """The read, or None for a select SQLAlchemy must run itself: one with parameters expanded at execution
        (``IN`` lists) is not final SQL once compiled, and a numeric or float column's result processing on asyncpg
        depends on the type the server reports for it, which only a cursor knows."""
        if any(isinstance(column.type, Numeric) for column in statement.selected_columns):
            return None
        compiled = statement.compile(dialect=dialect)
        if not isinstance(compiled, SQLCompiler) or compiled.post_compile_params or compiled.literal_execute_params:
            return None
        return cls(compiled, statement, dialect)

    def arguments(self, parameters: Mapping[str, Any]) -> list[Any]:
        values = []
        for name, bind, processor in self.binds:
            value = parameters[name] if bind.required else parameters.get(name, bind.effective_value)
            values.append(processor(value) if processor is not None else value)
        return values

    def row(self, record: Any) -> tuple[Any, ...] | None:
        if record is None:
            return None
        return self.row_type._make(  # type: ignore[no-any-return]
            value if processor is None else processor(value)
            for processor, value in zip(self.processors, record, strict=True)
        )


class _EngineReads:
    """Per engine: the fair semaphore below, and its read statements compiled for asyncpg."""

    def __init__(self, engine: Engine) -> None:
        pool = engine.pool
        # Pools without a fixed size (none that create_engine makes) have nothing to wait for.
        self.slots = asyncio.Semaphore(pool.size()) if isinstance(pool, QueuePool) else None
        self.asyncpg = engine.dialect.driver == "asyncpg"
        self.compiled: weakref.WeakKeyDictionary[Select[Any], _AsyncpgRead | None] = weakref.WeakKeyDictionary()

    def on_driver(self, statement: Executable, dialect: Dialect) -> _AsyncpgRead | None:
        """The statement compiled for asyncpg (once), or None where SQLAlchemy runs it: on other drivers, and for
        statements other than selects (a text statement, say, has no columns to process the values by)."""
        if not self.asyncpg or not isinstance(statement, Select):
            return None
        try:
            return self.compiled[statement]
        except KeyError:
            read = self.compiled[statement] = _AsyncpgRead.of(statement, dialect)
            return read


# A fair semaphore the size of each engine's pool, for the reads above. SQLAlchemy's asyncio pool queue is not
# first come, first served: a request arriving while others wait takes the connection just handed to a woken
# waiter, which then queues again at the back. At 64 concurrent badge reads on 20 connections that left some
# waiting over a second (p99 1.2 s against 0.2 s median). Waiting here keeps arrival order, and spares the pool's
# own timed waits. Per engine, dropped with it (the tests build many).
_engine_reads: weakref.WeakKeyDictionary[Engine, _EngineReads] = weakref.WeakKeyDictionary()


def _reads_for(engine: Engine) -> _EngineReads:
    reads = _engine_reads.get(engine)
    if reads is None:
        reads = _engine_reads[engine] = _EngineReads(engine)
    return reads


async def _take_slot(slots: asyncio.Semaphore, engine: Engine) -> None:
    """A connection's turn, waited for no longer than the pool itself would wait (a timeout is its 503)."""
    if not slots.locked():
        await slots.acquire()  # free: taken without yielding
        return
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    try:
        async with asyncio.timeout(pool.timeout()):
            await slots.acquire()
    except TimeoutError:
        raise PoolTimeoutError(f"no connection free within {pool.timeout():g} s") from None


def _read_first(
    engine: Engine, reads: _EngineReads, statement: Executable, parameters: Mapping[str, Any]
) -> Row[Any] | tuple[Any, ...] | None:
    read = reads.on_driver(statement, engine.dialect)
    if read is not None:
        try:
            return _read_first_on_driver(engine, read, parameters)
        except _DriverReadError:
            # Left to SQLAlchemy: running the read again its way reports the driver's error as every other
            # statement's is reported (a lost connection is a 503) and recovers the pool as it does (after a
            # database restart, the first such error invalidates every pooled connection). A read can run twice.
            pass
    with engine.connect() as connection:
        configured: Connection = connection.execution_options(**_single_statement_options(connection.dialect.name))
        return configured.execute(statement, parameters).first()


class _DriverReadError(Exception):
    """The driver's connection failed a read that had its connection: SQLAlchemy is to run it instead."""


def _read_first_on_driver(engine: Engine, read: _AsyncpgRead, parameters: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """The read on asyncpg's own connection, outside a transaction as `single_statement` runs it: the pool's
    connections are in asyncpg's default mode, where a lone statement commits by itself.

    The connection is checked out as SQLAlchemy checks it out, so a full pool or a database out of reach fails
    here as it would there, once: tried again, a host that does not answer would keep the read waiting twice."""
    arguments = read.arguments(parameters)
    with engine.connect() as connection:
        driver: Any = connection.connection.driver_connection
        try:
            record = await_only(driver.fetchrow(read.sql, *arguments))
        except Exception as error:
            # Whatever broke (the connection, the statement), this connection is not handed out again.
            connection.invalidate(error)
            raise _DriverReadError from error
    return read.row(record)


@asynccontextmanager
async def transaction(session_maker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """One unit of work for jobs and the CLI: commit on success, roll back on any error."""
    async with session_maker() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        else:
            await session.commit()
