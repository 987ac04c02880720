"""Group commit of single orders: orders that arrive while others are being written go to the database together.

Each ``POST /v1/orders`` answers with the customer's tier after the order, so its re-score runs before the answer.
Written one transaction per order, an order cost about seven round trips and their statements' fixed work, which
under load was most of the server's CPU. Here an order arriving while no group is being written is written at once,
alone, by the same statements as before; orders arriving meanwhile wait for that group and are then written
together by the batch's statements, with one re-score for all their customers. So an idle server adds no wait to
an order, and a busy one shares each transaction's fixed cost among the orders that queued during the previous one.

Each order's answer is what it would have been alone:
- created (201), a replay (200, the stored order) or a conflict (409), in arrival order for the same order id
  (``services.write_orders``);
- a group holds at most one order per customer, so a customer's concurrent orders are still re-scored one after
  the other, each answering the tier after it and each tier change kept in the history (and announced);
- an answer is given only after its group has committed. If a group fails as a whole, its orders are written
  again one by one, in arrival order, so an order that cannot be written fails only its own request; if the
  database is unavailable, every order of the group gets that 503 at once instead.
A referrer re-scored for a referee's order in the same group as an order of its own is re-scored once, with both,
as if the referee's order had arrived first.

One group is written at a time, unless it takes longer than ``STALLED_AFTER`` (waiting for a lock, say): then
the orders arriving meanwhile get a writer of their own, so one slow group does not hold up every order.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.activity import schemas, services
from loyalty.db.session import transaction
from loyalty.lib.errors import database_unavailable, unavailable
from loyalty.ops import metrics
from loyalty.recalc import incremental
from loyalty.tiers.config import TiersConfig

logger = logging.getLogger("loyalty.orders")

# Orders written in one transaction at most: a group's statements and re-score grow with it, and the orders
# queued behind a larger one would wait longer than they save.
MAX_GROUP = 64
# Writers at once, and how long a group may take before the orders queued behind it get another writer.
# Two writers all the time did worse than one (smaller groups, more CPU per order, on 2 cores).
MAX_WRITERS = 4
STALLED_AFTER = 0.2


@dataclass(frozen=True)
class OrderAnswer:
    """What ``POST /v1/orders`` answers: the order with the customer's tier, and whether it was created now."""

    order: schemas.Order
    created: bool


@dataclass
class _Waiting:
    data: schemas.OrderCreate
    answer: asyncio.Future[OrderAnswer] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def settle(self, answer: OrderAnswer | None = None, error: BaseException | None = None) -> None:
        # The request may have gone (its client disconnected, its task cancelled): the order is stored all the same.
        if self.answer.done():
            return
        if error is not None:
            self.answer.set_exception(error)
        else:
            self.answer.set_result(answer)  # type: ignore[arg-type]


class OrderGroups:
    """The application's writer of single orders (one per process and event loop)."""

    def __init__(
        self, session_maker: async_sessionmaker[AsyncSession], tiers: TiersConfig, cache: incremental.ModelCache
    ) -> None:
        self._session_maker = session_maker
        self._tiers = tiers
        self._cache = cache
        self._queue: list[_Waiting] = []
        # Each running writer, with when it began its current group (the event loop's clock).
        self._writers: dict[asyncio.Task[None], float] = {}
        self._closed = False

    async def write(self, data: schemas.OrderCreate) -> OrderAnswer:
        """Store the order (idempotent by order id), re-score its customer and answer once it is committed."""
        if self._closed:  # shutting down: the engine is about to go
            raise unavailable("The service is shutting down; retry shortly.")
        waiting = _Waiting(data)
        self._queue.append(waiting)
        if self._wants_writer():
            # A task of its own, not the request's: a request cancelled while it waits cancels nobody's write. Its
            # context is fresh, not this request's: its logs would otherwise carry this request's id for them all.
            writer = asyncio.create_task(self._write_queued(), context=contextvars.Context())
            self._writers[writer] = asyncio.get_running_loop().time()
        return await waiting.answer

    async def close(self) -> None:
        """Refuse new orders and wait for the queued ones to be written (at shutdown, before the engine goes)."""
        self._closed = True
        while self._writers:
            await asyncio.wait(list(self._writers))

    def _wants_writer(self) -> bool:
        if not self._writers:
            return True
        now = asyncio.get_running_loop().time()
        return len(self._writers) < MAX_WRITERS and all(now - began > STALLED_AFTER for began in self._writers.values())

    def _next_group(self) -> list[_Waiting]:
        """The queued orders to write next, in arrival order: at most one per customer and ``MAX_GROUP`` in all."""
        group: list[_Waiting] = []
        later: list[_Waiting] = []
        customers: set[str] = set()
        for waiting in self._queue:
            if len(group) < MAX_GROUP and waiting.data.customer_id not in customers:
                customers.add(waiting.data.customer_id)
                group.append(waiting)
            else:
                later.append(waiting)
        self._queue = later
        return group

    async def _write_queued(self) -> None:
        writer = asyncio.current_task()
        assert writer is not None
        group: list[_Waiting] = []
        try:
            while self._queue:
                group = self._next_group()
                self._writers[writer] = asyncio.get_running_loop().time()
                try:
                    await self._write_group(group)
                except Exception as error:  # a fault of ours: each request gets it as its 500, and the rest go on
                    logger.exception("writing an order group failed")
                    for waiting in group:
                        waiting.settle(error=error)
        except asyncio.CancelledError:
            # Only the event loop closing cancels a writer (and every other with it): no request may wait for an
            # answer that will never come.
            for waiting in group + self._queue:
                waiting.answer.cancel()
            raise
        finally:
            # Here, not in a done callback: between its last look at the queue and this, a writer never yields, so
            # an order queued after that look always finds it gone and starts a writer (a callback runs later, and
            # an order queued meanwhile waited for a writer that had already stopped).
            del self._writers[writer]

    async def _write_group(self, group: list[_Waiting]) -> None:
        metrics.record_order_group(len(group))
        if len(group) == 1:
            await self._write_alone(group[0])
            return
        try:
            answers = await self._write_together(group)
        except Exception as error:
            if database_unavailable(error):  # each alone would wait for the database again, and fail the same way
                for waiting in group:
                    waiting.settle(error=error)
                return
            # Whatever else it was, each order gets its own chance and its own outcome, in arrival order.
            logger.warning("order group of %d failed (%s); writing each alone", len(group), type(error).__name__)
            for waiting in group:
                await self._write_alone(waiting)
            return
        for waiting, answer in zip(group, answers, strict=True):
            if isinstance(answer, OrderAnswer):
                waiting.settle(answer)
            else:
                waiting.settle(error=answer)

    async def _write_alone(self, waiting: _Waiting) -> None:
        """One order in its own transaction: the statements built for a single order (fewest round trips)."""
        try:
            async with transaction(self._session_maker) as session:
                written = await services.create_order(session, waiting.data)
                tiers = await services.tiers_after(session, written, self._tiers, self._cache)
        except Exception as error:  # the request's own failure, answered as the exception handler answers it
            waiting.settle(error=error)
            return
        tier = tiers.get(written.customer_ids[0], "prospect")
        waiting.settle(OrderAnswer(written.resource.model_copy(update={"tier": tier}), written.created))

    async def _write_together(self, group: list[_Waiting]) -> list[OrderAnswer | Exception]:
        """The group's orders in one transaction, with one re-score of all their customers."""
        async with transaction(self._session_maker) as session:
            written = await services.write_orders(session, [waiting.data for waiting in group], lock_for_rescore=True)
            tiers = await incremental.rescore_after_write(
                session, sorted(set(written.customers.values())), self._tiers, self._cache, locked=written.locked
            )
            answers: list[OrderAnswer | Exception] = []
            for waiting, status in zip(group, written.statuses, strict=True):
                data = waiting.data
                if status == 201:
                    tier = tiers.get(written.customers[data.order_id], "prospect")
                    view = services.new_order_view(data, written.created_at)
                    answers.append(OrderAnswer(view.model_copy(update={"tier": tier}), created=True))
                elif status == 200:
                    view, customer_id = await services.stored_order_view(session, data)
                    if customer_id not in tiers:  # a replay alone re-scores nobody: its customer's stored tier
                        tiers.update(await incremental.current_tiers(session, [customer_id]))
                    answers.append(OrderAnswer(view.model_copy(update={"tier": tiers[customer_id]}), created=False))
                else:
                    answers.append(services.order_conflict(data.order_id))
        return answers
