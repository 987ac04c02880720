"""Badges kept in each server process's memory, forgotten as soon as PostgreSQL announces a change to them.

The badge is the storefront's hottest read, and a cached one skips the database's round trip and its server
process, both on the same cores as the service. What keeps a cached badge right:

- PostgreSQL announces every change to what a badge shows (migration 0009's triggers): a tier row's tier, since,
  progress or pin, and a storefront id unlinked by an erasure, each as the customer's id on channel
  ``loyalty_badges``; a TRUNCATE or a full run as ``*``. A notification is delivered when its transaction
  commits, to every listener. Each process listens on a connection of its own (``BadgeListener``) and forgets
  the badges named.
- The cache serves only while that LISTEN is in place. Before it is, and from the moment its connection is lost
  or a probe of it fails, every read goes to the database and the cache is emptied: notifications may have been
  missed.
- A read that missed stores its row only if no notification arrived while it ran (``generation``). Otherwise a
  read whose snapshot predates a change could store the old badge after the change's notification had passed.
- A process's own writes are forgotten when their transaction commits (``note_changed``), before their
  notification comes back, so a client that writes and then reads through the same process sees its write.
  Other processes see it when the notification arrives, in about a millisecond on one network.
- Entries expire after ``LOYALTY_BADGE_CACHE_SECONDS`` regardless: a bound on staleness should the network lose
  the listener's connection in a way neither end notices until the next probe.

SQLite has no notifications (and a second process may write the file), so there the badge is always read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import asyncpg
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, SessionTransaction

logger = logging.getLogger("loyalty.badges")

CHANNEL = "loyalty_badges"
EVERY_BADGE = "*"
# What a bulk writer runs in its transaction: the triggers stay quiet for it (the setting lasts as long as the
# transaction), and one notification stands for all its rows.
_ANNOUNCE_EVERY_BADGE = text(
    f"SELECT set_config('loyalty.badges', 'announced', true), pg_notify('{CHANNEL}', '{EVERY_BADGE}')"
)
# Session.info keys: the process's cache (given to every session of the app's session maker) and the customers
# whose badges the session's transaction has changed.
CACHE_INFO_KEY = "loyalty.badge_cache"
_CHANGED_INFO_KEY = "loyalty.badges_changed"
# After a failed connection the listener tries again at once, then backs off to its probe interval.
FIRST_RETRY_SECONDS = 0.1


class BadgeCache:
    """Badges as answered (their JSON body) by storefront id, least recently read dropped first, each kept at most
    ``seconds`` and never past the moment it would read differently (a pin's end).

    The body is kept rather than the row it is built from: building and encoding the badge cost more than
    finding it. It is built with the application's tiers configuration, which lives as long as the process.
    """

    def __init__(self, size: int, seconds: float) -> None:
        self.size = size
        self.seconds = seconds
        # Storefront id -> (internal id, which notifications name; the body; when it expires, monotonic).
        self._entries: OrderedDict[str, tuple[int, bytes, float]] = OrderedDict()
        self._external_ids: dict[int, str] = {}
        # Moves on every forgetting: a read that started before it must not store what it read.
        self.generation = 0
        self.listening = False
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, external_id: str) -> bytes | None:
        """The cached badge, or None: not cached, expired, or the cache is not listening."""
        if not self.listening:
            return None
        entry = self._entries.get(external_id)
        if entry is None or entry[2] <= time.monotonic():
            self.misses += 1
            return None
        self._entries.move_to_end(external_id)
        self.hits += 1
        return entry[1]

    def put(
        self, external_id: str, customer_id: int, body: bytes, generation: int, changes_in: float | None = None
    ) -> None:
        """Keep a badge built from a database read, unless something was forgotten since ``generation`` was taken
        (before the read). ``changes_in``: seconds until the badge would read differently with nothing written."""
        if not self.listening or generation != self.generation or self.size <= 0:
            return
        lifetime = self.seconds if changes_in is None else min(self.seconds, changes_in)
        self._entries[external_id] = (customer_id, body, time.monotonic() + lifetime)
        self._entries.move_to_end(external_id)
        self._external_ids[customer_id] = external_id
        while len(self._entries) > self.size:
            dropped, (dropped_id, _body, _expiry) = self._entries.popitem(last=False)
            if self._external_ids.get(dropped_id) == dropped:
                del self._external_ids[dropped_id]

    def forget(self, customer_ids: Iterable[int]) -> None:
        """Forget these customers' badges (internal ids)."""
        self.generation += 1
        for customer_id in customer_ids:
            external_id = self._external_ids.pop(customer_id, None)
            if external_id is not None:
                self._entries.pop(external_id, None)

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()
        self._external_ids.clear()

    def start(self) -> None:
        """Serve from memory: the listener's LISTEN is in place. Anything read before it is dropped."""
        self.clear()
        self.listening = True

    def stop(self) -> None:
        """Read every badge from the database again: notifications may be missed from now on."""
        self.listening = False
        self.clear()

    def notified(self, payload: str) -> None:
        if payload == EVERY_BADGE:
            self.clear()
            return
        try:
            customer_id = int(payload)
        except ValueError:
            # Not ours to understand (someone else's NOTIFY on the channel): forgetting everything is always safe.
            logger.warning("unexpected badge notification %r: forgetting every badge", payload[:100])
            self.clear()
            return
        self.forget((customer_id,))


class BadgeListener:
    """Keeps the cache's LISTEN connection open, reconnecting after any failure; the cache serves only meanwhile.

    The connection is probed every ``probe_seconds``: a connection can look open while the network or the server
    behind it is gone, and nothing would be heard on it.
    """

    def __init__(
        self,
        cache: BadgeCache,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        probe_seconds: float,
        timeout_seconds: float,
    ) -> None:
        self.cache = cache
        self._connect = connect
        self.probe_seconds = probe_seconds
        self.timeout_seconds = timeout_seconds
        self._task: asyncio.Task[None] | None = None
        # The listening connection's server process (pg_stat_activity.pid), for operators and tests.
        self.server_pid: int | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="badge-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.cache.stop()

    async def _run(self) -> None:
        retry_seconds = FIRST_RETRY_SECONDS
        failing = False
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # whatever failed, the cache is already off; try again shortly
                # Said once per outage: the database being down is reported by every request meanwhile.
                log = logger.debug if failing else logger.warning
                log(
                    "badge cache off: its notification connection failed; reading badges from the database",
                    extra={"error": f"{type(error).__name__}: {error}"},
                )
                failing = True
            else:
                retry_seconds = FIRST_RETRY_SECONDS
                failing = False
            await asyncio.sleep(retry_seconds)
            retry_seconds = min(retry_seconds * 2, self.probe_seconds)

    async def _listen(self) -> None:
        connection = await self._connect()
        lost = asyncio.Event()

        def on_lost(_connection: Any) -> None:
            self.cache.stop()
            lost.set()

        def on_notification(_connection: Any, _pid: int, _channel: str, payload: str) -> None:
            self.cache.notified(payload)

        try:
            connection.add_termination_listener(on_lost)
            await connection.add_listener(CHANNEL, on_notification)
            self.cache.start()
            self.server_pid = connection.get_server_pid()
            logger.info("badge cache on: listening for badge changes")
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), self.probe_seconds)
                if not lost.is_set():
                    await asyncio.wait_for(connection.fetchval("SELECT 1"), self.timeout_seconds)
            logger.warning("badge cache off: its notification connection closed; reading badges from the database")
        finally:
            self.cache.stop()
            connection.terminate()


def note_changed(session: AsyncSession, customer_ids: Iterable[int]) -> None:
    """This session's transaction changes these customers' badges: the process forgets them when it commits."""
    if CACHE_INFO_KEY in session.info:
        session.info.setdefault(_CHANGED_INFO_KEY, set()).update(customer_ids)


def forget_every_badge(session_maker: async_sessionmaker[AsyncSession]) -> None:
    """After a committed bulk write: the process of this session maker forgets every badge it holds."""
    cache = session_maker.kw.get("info", {}).get(CACHE_INFO_KEY)
    if cache is not None:
        cache.clear()


async def announce_every_badge_changed(connection: AsyncConnection) -> None:
    """For a writer of many tier rows (PostgreSQL): one notification for all of them, none per row."""
    if connection.dialect.name == "postgresql":
        await connection.execute(_ANNOUNCE_EVERY_BADGE)


@event.listens_for(Session, "after_transaction_end")
def _forget_when_ended(session: Session, transaction: SessionTransaction) -> None:
    # Only the outermost transaction's end: a savepoint's release or rollback (which SQLAlchemy also reports as a
    # commit or rollback) comes before the write is visible to anyone else. After a rollback forgetting is
    # needless but harmless: the badge is read again.
    if transaction.parent is not None or transaction.nested:
        return
    changed = session.info.pop(_CHANGED_INFO_KEY, None)
    cache = session.info.get(CACHE_INFO_KEY)
    if changed and cache is not None:
        cache.forget(changed)
