"""Storefront ingestion routes: orders, refunds, events, referrals."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.params import JSONBody
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_202_ACCEPTED
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.access import guards
from loyalty.activity import schemas, services
from loyalty.activity.order_groups import OrderGroups
from loyalty.lib.errors import (
    CONFLICT,
    NOT_FOUND,
    REFEREE_CLAIMED,
    REFERRAL_CYCLE,
    REFUND_EXCEEDS,
    SELF_REFERRAL,
    VALIDATION,
    problem_responses,
)
from loyalty.lib.schemas import ExternalIdPath
from loyalty.recalc import incremental


async def _tiers_after(
    request: Request[Any, Any, Any], session: AsyncSession, written: services.Written[Any]
) -> dict[int, str]:
    state = request.app.state
    return await services.tiers_after(session, written, state.tiers, state.model_cache)


def _status(created: bool) -> int:
    return HTTP_201_CREATED if created else HTTP_200_OK


class OrderController(Controller):
    path = "/v1/orders"
    tags = ["storefront"]
    guards = [guards.storefront]

    @post(
        "/",
        operation_id="CreateOrder",
        status_code=HTTP_201_CREATED,
        responses={
            HTTP_200_OK: ResponseSpec(schemas.Order, description="A replay: the order as stored, unchanged."),
            **problem_responses(CONFLICT),
        },
    )
    async def create_order(
        self, request: Request[Any, Any, Any], data: JSONBody[schemas.OrderCreate]
    ) -> Response[schemas.Order]:
        """Record an order (idempotent by order_id) and answer with the customer's tier after it."""
        # Written by the app's group commit, in a transaction of its own (not a request session's).
        order_groups: OrderGroups = request.app.state.order_groups
        answer = await order_groups.write(data)
        return Response(answer.order, status_code=_status(answer.created))

    @post("/batch", operation_id="CreateOrderBatch", status_code=HTTP_200_OK)
    async def create_order_batch(
        self,
        request: Request[Any, Any, Any],
        session: NamedDependency[AsyncSession],
        data: JSONBody[schemas.OrderBatch],
    ) -> schemas.OrderBatchResult:
        """Record up to 1000 orders; each succeeds or fails on its own."""
        result, affected = await services.create_orders_batch(session, data.orders)
        state = request.app.state
        await incremental.rescore_after_write(session, sorted(affected), state.tiers, state.model_cache)
        return result

    @post(
        "/{order_id:str}/refunds",
        operation_id="CreateRefund",
        status_code=HTTP_201_CREATED,
        responses={
            HTTP_200_OK: ResponseSpec(schemas.Refund, description="A replay: the refund as stored, unchanged."),
            **problem_responses(NOT_FOUND, CONFLICT, VALIDATION, REFUND_EXCEEDS),
        },
    )
    async def create_refund(
        self,
        request: Request[Any, Any, Any],
        session: NamedDependency[AsyncSession],
        data: JSONBody[schemas.RefundCreate],
        order_id: ExternalIdPath,
    ) -> Response[schemas.Refund]:
        """Record a refund of an order (idempotent by refund_id)."""
        written = await services.create_refund(session, order_id, data)
        await _tiers_after(request, session, written)
        return Response(written.resource, status_code=_status(written.created))


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

    @post(
        "/",
        operation_id="CreateReferral",
        status_code=HTTP_201_CREATED,
        responses={
            HTTP_200_OK: ResponseSpec(schemas.Referral, description="A replay: the referral as stored, unchanged."),
            **problem_responses(CONFLICT, VALIDATION, SELF_REFERRAL, REFEREE_CLAIMED, REFERRAL_CYCLE),
        },
    )
    async def create_referral(
        self,
        request: Request[Any, Any, Any],
        session: NamedDependency[AsyncSession],
        data: JSONBody[schemas.ReferralCreate],
    ) -> Response[schemas.Referral]:
        """Record that one customer referred another."""
        written = await services.create_referral(session, data)
        await _tiers_after(request, session, written)
        return Response(written.resource, status_code=_status(written.created))
