"""Storefront ingestion routes: orders, refunds, events, referrals."""

from __future__ import annotations

from litestar import Controller, Response, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_202_ACCEPTED
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.access import guards
from loyalty.activity import schemas, services
from loyalty.lib.schemas import ExternalId

CREATED_OR_REPLAYED = {
    HTTP_201_CREATED: "created",
    HTTP_200_OK: "a faithful replay of an earlier request: the stored resource",
}


class OrderController(Controller):
    path = "/v1/orders"
    tags = ["storefront"]
    guards = [guards.storefront]

    @post("/", operation_id="CreateOrder", status_code=HTTP_201_CREATED)
    async def create_order(
        self, session: NamedDependency[AsyncSession], data: JSONBody[schemas.OrderCreate]
    ) -> Response[schemas.Order]:
        """Record an order (idempotent by order_id); an unknown customer is created."""
        written = await services.create_order(session, data)
        return Response(written.resource, status_code=HTTP_201_CREATED if written.created else HTTP_200_OK)

    @post("/batch", operation_id="CreateOrderBatch", status_code=HTTP_200_OK)
    async def create_order_batch(
        self, session: NamedDependency[AsyncSession], data: JSONBody[schemas.OrderBatch]
    ) -> schemas.OrderBatchResult:
        """Record up to 1000 orders; each succeeds or fails on its own."""
        return await services.create_orders_batch(session, data.orders)

    @post("/{order_id:str}/refunds", operation_id="CreateRefund", status_code=HTTP_201_CREATED)
    async def create_refund(
        self,
        session: NamedDependency[AsyncSession],
        data: JSONBody[schemas.RefundCreate],
        order_id: ExternalId = Parameter(description="The storefront's order id."),
    ) -> Response[schemas.Refund]:
        """Record a refund of an order (idempotent by refund_id)."""
        written = await services.create_refund(session, order_id, data)
        return Response(written.resource, status_code=HTTP_201_CREATED if written.created else HTTP_200_OK)


class EventController(Controller):
    path = "/v1/events"
    tags = ["storefront"]
    guards = [guards.storefront]

    @post("/", operation_id="RecordEvents", status_code=HTTP_202_ACCEPTED)
    async def record_events(
        self, session: NamedDependency[AsyncSession], data: JSONBody[schemas.EventBatch]
    ) -> schemas.EventBatchResult:
        """Record up to 1000 interaction events; duplicates are counted, invalid ones listed by index."""
        return await services.record_events(session, data.events)


class ReferralController(Controller):
    path = "/v1/referrals"
    tags = ["storefront"]
    guards = [guards.storefront]

    @post("/", operation_id="CreateReferral", status_code=HTTP_201_CREATED)
    async def create_referral(
        self, session: NamedDependency[AsyncSession], data: JSONBody[schemas.ReferralCreate]
    ) -> Response[schemas.Referral]:
        """Record that one customer referred another."""
        written = await services.create_referral(session, data)
        return Response(written.resource, status_code=HTTP_201_CREATED if written.created else HTTP_200_OK)
