"""Customer routes: profiles and tokens (storefront), member lists, exports and segments (marketing)."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, post, put
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.params import JSONBody, Parameter
from litestar.response import Stream
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_204_NO_CONTENT
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.access import guards
from loyalty.customers import me, reports, schemas, services
from loyalty.lib.errors import (
    NOT_FOUND,
    REFEREE_CLAIMED,
    REFERRAL_CYCLE,
    SELF_REFERRAL,
    VALIDATION,
    problem_responses,
)
from loyalty.lib.pagination import Cursor, Limit, Page
from loyalty.lib.schemas import ExternalIdPath
from loyalty.recalc import incremental
from loyalty.tiers.config import TierId

CustomerIdParam = Parameter(description="The storefront's customer id.")
TierFilter = Annotated[TierId | None, Parameter(description="Only members of this tier.")]
MinValueScore = Annotated[float | None, Parameter(ge=0, le=100, description="Value score at least.")]


class CustomerController(Controller):
    path = "/v1/customers"

    @put(
        "/{customer_id:str}",
        operation_id="UpsertCustomer",
        tags=["storefront"],
        guards=[guards.storefront],
        status_code=HTTP_200_OK,
        responses={
            HTTP_201_CREATED: ResponseSpec(schemas.Customer, description="A new customer: the profile as created."),
            # `referred_by` records a referral, with the referral route's refusals.
            **problem_responses(VALIDATION, SELF_REFERRAL, REFEREE_CLAIMED, REFERRAL_CYCLE),
        },
    )
    async def upsert_customer(
        self,
        request: Request[Any, Any, Any],
        session: NamedDependency[AsyncSession],
        data: JSONBody[schemas.CustomerUpsert],
        customer_id: ExternalIdPath,
    ) -> Response[schemas.Customer]:
        """Create or update a customer profile."""
        written = await services.upsert_customer(session, customer_id, data)
        if written.customer_ids:
            # A new referral changes the referrer's influence now, as POST /v1/referrals does.
            state = request.app.state
            await incremental.rescore_after_write(session, written.customer_ids, state.tiers, state.model_cache)
        return Response(written.resource, status_code=HTTP_201_CREATED if written.created else HTTP_200_OK)

    @post(
        "/{customer_id:str}/token",
        operation_id="CreateCustomerToken",
        tags=["storefront"],
        guards=[guards.storefront],
        status_code=HTTP_200_OK,
        responses=problem_responses(NOT_FOUND),
    )
    async def create_token(
        self,
        request: Request[Any, Any, Any],
        session: NamedDependency[AsyncSession],
        customer_id: ExternalIdPath,
    ) -> schemas.CustomerToken:
        """Mint a short-lived token that lets a signed-in customer read their own rewards."""
        state = request.app.state
        return await services.mint_token(session, customer_id, state.secret_key, state.settings.customer_token_ttl)

    @get(
        "/{customer_id:str}",
        operation_id="GetCustomer",
        tags=["marketing"],
        guards=[guards.storefront_or_marketing],
        responses=problem_responses(NOT_FOUND),
    )
    async def get_customer(
        self,
        request: Request[Any, Any, Any],
        session: NamedDependency[AsyncSession],
        customer_id: ExternalIdPath,
    ) -> schemas.CustomerDetail:
        """A customer in full: profile, tier with explanation and progress, scores, figures, interests."""
        return await reports.customer_detail(session, request.app.state.tiers, customer_id)

    @get("/", operation_id="ListCustomers", tags=["marketing"], guards=[guards.marketing])
    async def list_customers(
        self,
        session: NamedDependency[AsyncSession],
        tier: TierFilter = None,
        min_value_score: MinValueScore = None,
        limit: Limit = 50,
        cursor: Cursor = None,
    ) -> Page[schemas.CustomerListItem]:
        """Members with scores and raw figures, filtered by tier and value score, in customer order."""
        return await reports.list_customers(session, tier, min_value_score, limit, cursor)

    @delete(
        "/{customer_id:str}",
        operation_id="EraseCustomer",
        tags=["admin"],
        guards=[guards.admin],
        status_code=HTTP_204_NO_CONTENT,
        responses=problem_responses(NOT_FOUND),
    )
    async def erase_customer(self, session: NamedDependency[AsyncSession], customer_id: ExternalIdPath) -> None:
        """Erase a customer's personal data; anonymised orders and aggregates are kept. Again: 404."""
        await services.erase_customer(session, customer_id)


class ReportController(Controller):
    path = "/v1"
    tags = ["marketing"]
    guards = [guards.marketing]

    @get("/exports/customers", operation_id="ExportCustomers", media_type="text/csv")
    async def export_customers(
        self, request: Request[Any, Any, Any], tier: TierFilter = None, min_value_score: MinValueScore = None
    ) -> Stream:
        """Every member with scores and figures as CSV, streamed."""
        return Stream(
            reports.export_csv(request.app.state.read_session_maker, tier, min_value_score),
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="customers.csv"'},
        )

    @get("/segments", operation_id="ListSegments")
    async def list_segments(self, request: Request[Any, Any, Any]) -> schemas.SegmentList:
        """Per tier: customers, share, revenue share and score spreads (p10, p50, p90)."""
        return await reports.segments(request.app.state.read_session_maker, request.app.state.tiers)


class MeController(Controller):
    """A customer's own rewards, with a customer token (never an API key)."""

    path = "/v1/me"
    tags = ["customer"]
    guards = [guards.requires_customer]

    @get("/", operation_id="GetMe")
    async def get_me(self, request: Request[Any, Any, Any], session: NamedDependency[AsyncSession]) -> schemas.Me:
        """My tier, benefits, progress to the next tier and scores in words."""
        principal = guards.customer_principal(request)
        return schemas.Me.model_validate(await me.my_status(session, request.app.state.tiers, principal.customer_id))

    @get("/offers", operation_id="GetMyOffers")
    async def get_my_offers(
        self, request: Request[Any, Any, Any], session: NamedDependency[AsyncSession]
    ) -> schemas.MyOffers:
        """My offer codes with status and expiry, newest first."""
        principal = guards.customer_principal(request)
        return schemas.MyOffers.model_validate({"items": await me.my_offers(session, principal.customer_id)})

    @get("/history", operation_id="GetMyHistory")
    async def get_my_history(
        self, request: Request[Any, Any, Any], session: NamedDependency[AsyncSession]
    ) -> schemas.MyHistory:
        """My tier changes with their reasons, newest first."""
        principal = guards.customer_principal(request)
        return schemas.MyHistory.model_validate({"items": await me.my_history(session, principal.customer_id)})

    @get("/export", operation_id="ExportMe")
    async def export_me(
        self, request: Request[Any, Any, Any], session: NamedDependency[AsyncSession]
    ) -> dict[str, Any]:
        """Everything held about me: profile, orders, refunds, events, referrals, scores, tiers, offers, redemptions."""
        principal = guards.customer_principal(request)
        return await me.my_export(session, request.app.state.tiers, principal.customer_id)
