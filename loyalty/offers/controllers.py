"""Offer, campaign, code and redemption routes."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.params import JSONBody, Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_204_NO_CONTENT
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.access import guards
from loyalty.lib.errors import (
    CAMPAIGN_FINISHED,
    CODE_BELOW_MINIMUM,
    CODE_EXPIRED,
    CODE_NOT_THEIRS,
    CODE_UNKNOWN,
    CODE_USED_UP,
    CONFLICT,
    NOT_FOUND,
    OFFER_NAME_TAKEN,
    VALIDATION,
    field_problem,
    problem_responses,
)
from loyalty.lib.money import parse_money
from loyalty.lib.pagination import Cursor, IdPath, Limit, Page
from loyalty.offers import redemptions, results, schemas, services


class OfferController(Controller):
    path = "/v1/offers"
    tags = ["marketing"]
    guards = [guards.marketing]

    @post("/", operation_id="CreateOffer", status_code=HTTP_201_CREATED, responses=problem_responses(OFFER_NAME_TAKEN))
    async def create_offer(
        self, session: NamedDependency[AsyncSession], data: JSONBody[schemas.OfferCreate]
    ) -> schemas.Offer:
        """Create an offer template (names are unique: welcome offers refer to them)."""
        return await services.create_offer(session, data)

    @get("/", operation_id="ListOffers")
    async def list_offers(
        self, session: NamedDependency[AsyncSession], limit: Limit = 50, cursor: Cursor = None
    ) -> Page[schemas.Offer]:
        """Offers, newest first."""
        return await services.list_offers(session, limit, cursor)

    @get("/{offer_id:int}", operation_id="GetOffer", responses=problem_responses(NOT_FOUND))
    async def get_offer(self, session: NamedDependency[AsyncSession], offer_id: IdPath) -> schemas.Offer:
        """One offer."""
        return await services.get_offer(session, offer_id)


class CampaignController(Controller):
    path = "/v1/campaigns"
    tags = ["marketing"]
    guards = [guards.marketing]

    @post("/", operation_id="CreateCampaign", status_code=HTTP_201_CREATED)
    async def create_campaign(
        self,
        request: Request[Any, Any, Any],
        session: NamedDependency[AsyncSession],
        data: JSONBody[schemas.CampaignCreate],
    ) -> schemas.Campaign:
        """Schedule an offer to tiers, once (`send_at`) or on a `cron`, with a holdout group."""
        return await services.create_campaign(session, data, request.app.state.settings.timezone)

    @get("/", operation_id="ListCampaigns")
    async def list_campaigns(
        self, session: NamedDependency[AsyncSession], limit: Limit = 50, cursor: Cursor = None
    ) -> Page[schemas.Campaign]:
        """Campaigns, newest first, with status, next send, counts and the lateness of past sends."""
        return await services.list_campaigns(session, limit, cursor)

    @get("/{campaign_id:int}", operation_id="GetCampaign", responses=problem_responses(NOT_FOUND))
    async def get_campaign(self, session: NamedDependency[AsyncSession], campaign_id: IdPath) -> schemas.Campaign:
        """One campaign with its sends."""
        return await services.get_campaign(session, campaign_id)

    @post(
        "/{campaign_id:int}/cancel",
        operation_id="CancelCampaign",
        status_code=HTTP_200_OK,
        responses=problem_responses(NOT_FOUND, CAMPAIGN_FINISHED),
    )
    async def cancel_campaign(self, session: NamedDependency[AsyncSession], campaign_id: IdPath) -> schemas.Campaign:
        """Stop future sends (codes already issued stay valid); a finished campaign is a 409."""
        return await services.cancel_campaign(session, campaign_id)

    @get("/{campaign_id:int}/results", operation_id="GetCampaignResults", responses=problem_responses(NOT_FOUND))
    async def get_results(self, session: NamedDependency[AsyncSession], campaign_id: IdPath) -> schemas.CampaignResults:
        """Redemptions and incremental revenue per customer against the holdout, with a 95% interval.

        Intent-to-treat difference of mean revenue per customer (net of refunds, orders in the campaign window);
        the interval uses Welch's standard error and the normal approximation; fewer than 30 customers in a group
        gives `insufficient_data`.
        """
        return await results.campaign_results(session, campaign_id)


OrderTotalQuery = Annotated[str | None, Parameter(max_length=40, description="Order total to check the minimum.")]


class CodeController(Controller):
    path = "/v1"
    tags = ["storefront"]
    guards = [guards.storefront]

    @get("/codes/{code:str}", operation_id="CheckCode", responses=problem_responses(CODE_UNKNOWN))
    async def check_code(
        self,
        session: NamedDependency[AsyncSession],
        code: Annotated[str, Parameter(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9-]+$")],
        customer_id: Annotated[
            str | None,
            Parameter(max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$", description="The customer at checkout."),
        ] = None,
        order_total: OrderTotalQuery = None,
    ) -> schemas.CodeCheck:
        """Check a code at checkout without redeeming it."""
        total: Decimal | None = None
        if order_total is not None:
            try:
                total = parse_money(order_total)
            except ValueError as error:
                raise field_problem("order_total", str(error)) from None
        return await redemptions.check_code(session, code, customer_id, total)

    @post(
        "/redemptions",
        operation_id="Redeem",
        status_code=HTTP_201_CREATED,
        responses={
            HTTP_200_OK: ResponseSpec(schemas.Redemption, description="A replay for the same order: the redemption."),
            **problem_responses(
                CODE_UNKNOWN, CODE_USED_UP, CONFLICT, VALIDATION, CODE_NOT_THEIRS, CODE_EXPIRED, CODE_BELOW_MINIMUM
            ),
        },
    )
    async def redeem(
        self, session: NamedDependency[AsyncSession], data: JSONBody[schemas.RedemptionCreate]
    ) -> Response[schemas.Redemption]:
        """Redeem a code for an order; a replay for the same order returns the redemption (200)."""
        redemption, created = await redemptions.redeem(session, data)
        return Response(redemption, status_code=HTTP_201_CREATED if created else HTTP_200_OK)

    @delete(
        "/redemptions/{redemption_id:int}",
        operation_id="VoidRedemption",
        status_code=HTTP_204_NO_CONTENT,
        responses=problem_responses(NOT_FOUND),
    )
    async def void_redemption(self, session: NamedDependency[AsyncSession], redemption_id: IdPath) -> None:
        """Void a redemption (the order was cancelled): the use comes back."""
        await redemptions.void(session, redemption_id)
