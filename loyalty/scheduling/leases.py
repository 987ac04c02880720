"""Keeping a lease on long work: a claim that other replicas respect only while its holder keeps renewing it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.db.models import CampaignSend, RecalcRun
from loyalty.db.session import transaction
from loyalty.lib.clock import utcnow

logger = logging.getLogger(__name__)

# This process, as named in the claims it holds (`claimed_by`).
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"

# Answers whether the lease is still ours after extending it by the lease's length.
Renewal = Callable[[AsyncSession], Awaitable[bool]]


async def renew_claim(
    session: AsyncSession,
    model: type[RecalcRun] | type[CampaignSend],
    row_id: int,
    lease_seconds: float,
    worker: str = WORKER_ID,
) -> bool:
    """Extend ``worker``'s lease on a running row (a recalculation run, a campaign send); False once the row is no
    longer ours: another replica found the lease expired and took it over or failed it."""
    renewed = await session.scalar(
        update(model)
        .where(model.id == row_id, model.status == "running", model.claimed_by == worker)
        .values(lease_until=utcnow() + timedelta(seconds=lease_seconds))
        .returning(model.id)
    )
    return renewed is not None


class LeaseLostError(RuntimeError):
    """Another replica took the work over (our lease ran out); this holder must not write its results."""


@contextlib.asynccontextmanager
async def keep_lease(
    session_maker: async_sessionmaker[AsyncSession], renew: Renewal, lease_seconds: float, name: str
) -> AsyncIterator[asyncio.Event]:
    """Renew a lease in the background every third of its length; the event is set if the lease was lost.

    Without renewal, work that outlasts its lease (a recalculation or a campaign send at scale) would be taken
    over by another replica while it is still running, and done twice.
    """
    lost = asyncio.Event()

    async def renew_until_cancelled() -> None:
        while True:
            await asyncio.sleep(lease_seconds / 3)
            try:
                async with transaction(session_maker) as session:
                    renewed = await renew(session)
            except DBAPIError as error:
                # On SQLite the work's own write transaction holds the database's only write lock; the renewal
                # waits for the next tick. Nothing else can take the lease meanwhile, for the same reason.
                logger.debug("lease renewal postponed: %s", error.orig)
                continue
            if not renewed:
                lost.set()
                return

    task = asyncio.create_task(renew_until_cancelled(), name=name)
    try:
        yield lost
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
