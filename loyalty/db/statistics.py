"""Planner statistics on PostgreSQL, where autovacuum does not keep them current.

PostgreSQL plans each statement from what ANALYZE last learned of the tables: their size and how many distinct
values a column holds. Autovacuum runs ANALYZE on a table once a tenth of it has changed (plus 50 rows), checking
once a minute. A table never analyzed is planned on fixed guesses instead, and they put the real-time re-score on
the wrong plan. Re-scoring a referrer with 106 referees reads those referees' figures. On 134k orders, never
analyzed, that read scanned every order and every event: 32.6 ms. Once the tables were analyzed, it took the
customer indexes: 3.4 ms (EXPLAIN ANALYZE, same data). Such orders made the slowest percent of single orders.

Tables lack current statistics in two cases, and the service covers both:
- Right after a bulk load (demo data, an import). PostgreSQL's advice for a bulk load is to ANALYZE once it is in
  ("Populating a Database"), so the loaders analyze the tables they filled; the first minutes of traffic then do
  not wait for autovacuum.
- Autovacuum off, for the server or for a table, as some hosts and CI machines run it. Then the timer's
  ``db.analyze`` job, once a minute (autovacuum's own default interval), analyzes any of our tables that has
  changed past autovacuum's threshold (``autovacuum_analyze_threshold`` and ``_scale_factor``, the table's own
  or the server's) since it was last analyzed. It leaves alone every table that autovacuum covers, and every
  table this role cannot analyze (ANALYZE by a role other than the owner only warns, and the table would stay
  due forever).

Each table is analyzed in a transaction of its own: an ANALYZE rolled back (a shutdown, a timeout) has already
marked its tables analyzed in the statistics views, without their statistics, and nobody would analyze them again
until they changed past the threshold once more.

SQLite is left as it is: without statistics its planner already takes an index for an equality on an indexed
column, the plan the re-score wants.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from loyalty.db.base import Base
from loyalty.scheduling.timer import Job

logger = logging.getLogger("loyalty.db")

# One replica at a time checks and analyzes: two ANALYZEs of one table wait for each other and do the work twice.
_ANALYZE_LOCK_KEY = zlib.crc32(b"loyalty.analyze")
# autovacuum_naptime's default: how often autovacuum itself would look.
CHECK_EVERY_SECONDS = 60.0

# Our tables (found as the application's statements find them, on the search path) that autovacuum would analyze
# by now if it ran on them: changed past the analyze threshold since anyone last analyzed them, where autovacuum
# is off for the server or the table, and owned by a role this one is a member of. A table never analyzed has
# reltuples -1, so its threshold is the base alone. The names come back as ANALYZE takes them (regclass text).
_DUE_FOR_ANALYZE_SQL = """
SELECT CAST(CAST(c.oid AS regclass) AS text)
FROM unnest(CAST(:tables AS text[])) AS ours(name)
JOIN pg_class c ON c.oid = to_regclass(quote_ident(ours.name))
JOIN pg_stat_user_tables s ON s.relid = c.oid
CROSS JOIN LATERAL (
    SELECT max(option_value) FILTER (WHERE option_name = 'autovacuum_enabled') AS enabled,
           max(option_value) FILTER (WHERE option_name = 'autovacuum_analyze_threshold') AS threshold,
           max(option_value) FILTER (WHERE option_name = 'autovacuum_analyze_scale_factor') AS scale_factor
    FROM pg_options_to_table(c.reloptions)
) own
WHERE pg_has_role(c.relowner, 'USAGE')
  AND NOT (current_setting('autovacuum')::boolean AND COALESCE(own.enabled::boolean, true))
  AND s.n_mod_since_analyze > COALESCE(own.threshold::bigint, current_setting('autovacuum_analyze_threshold')::bigint)
      + COALESCE(own.scale_factor::float8, current_setting('autovacuum_analyze_scale_factor')::float8)
        * GREATEST(c.reltuples, 0)
ORDER BY 1
"""


def _our_tables() -> list[str]:
    return sorted(Base.metadata.tables)


async def _analyze_each(engine: AsyncEngine, names: Iterable[str]) -> None:
    """ANALYZE each table in a transaction of its own (autocommit: PostgreSQL commits each table's statistics)."""
    async with engine.connect() as connection:
        autocommit: AsyncConnection = await connection.execution_options(isolation_level="AUTOCOMMIT")
        for name in names:
            # Only our own tables' names, quoted: nothing from outside reaches this statement.
            await autocommit.exec_driver_sql(f"ANALYZE {name}")


async def analyze_after_load(engine: AsyncEngine, tables: Iterable[str]) -> None:
    """After a bulk load has committed: statistics for the tables it filled, before traffic plans on them.

    The load stands whatever happens here; a failure (a statement timeout, say) is a warning, and autovacuum or
    ``db.analyze`` gets to the tables later.
    """
    if engine.dialect.name != "postgresql":
        return
    quote = engine.dialect.identifier_preparer.quote
    try:
        await _analyze_each(engine, (quote(name) for name in sorted(set(tables))))
    except SQLAlchemyError as error:
        logger.warning("could not analyze the loaded tables", extra={"error": type(error).__name__})


async def analyze_where_autovacuum_is_off(engine: AsyncEngine) -> list[str]:
    """Analyze our tables that are due by autovacuum's rule but that autovacuum does not run on; answers them.

    Another replica doing the same makes this a no-op: a transaction-scoped advisory lock, tried, not waited for,
    and held by a second connection while this one analyzes (ending it, however, releases the lock).
    """
    if engine.dialect.name != "postgresql":
        return []
    async with engine.connect() as guard, guard.begin():
        if not await guard.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": _ANALYZE_LOCK_KEY}):
            return []
        due = list((await guard.scalars(text(_DUE_FOR_ANALYZE_SQL), {"tables": _our_tables()})).all())
        await _analyze_each(engine, due)
    return due


@dataclass
class StatisticsJobs:
    engine: AsyncEngine
    every_seconds: float = CHECK_EVERY_SECONDS
    _next_check: float = field(default=0.0, init=False)

    async def analyze_due(self) -> dict[str, Any]:
        """`db.analyze`: statistics for tables autovacuum would have analyzed, where it is off (on the timer's
        poll, at most every ``every_seconds``)."""
        now = time.monotonic()
        if now < self._next_check:
            return {}
        self._next_check = now + self.every_seconds
        analyzed = await analyze_where_autovacuum_is_off(self.engine)
        return {"analyzed": analyzed} if analyzed else {}

    def poll_jobs(self) -> list[Job]:
        return [Job("db.analyze", self.analyze_due)]
