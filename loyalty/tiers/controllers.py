"""Tier routes: the badge and tier list (storefront), pins and previews (marketing)."""

from __future__ import annotations

from typing import Any, cast

from litestar import Controller, MediaType, Request, Response, delete, get, post, put
from litestar.di import NamedDependency
from litestar.params import JSONBody, Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_204_NO_CONTENT
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.access import guards
from loyalty.lib.errors import NOT_FOUND, VALIDATION, FieldError, ProblemError, problem_responses
from loyalty.lib.schemas import ExternalIdPath
from loyalty.recalc import incremental
from loyalty.tiers import schemas, services
from loyalty.tiers.config import TiersConfigError, parse_tiers

CustomerIdParam = Parameter(description="The storefront's customer id.")


class CustomerTierController(Controller):
    path = "/v1/customers/{customer_id:str}"

    @get(
        "/tier",
        operation_id="GetTierBadge",
        tags=["storefront"],
        guards=[guards.storefront],
        responses=problem_responses(NOT_FOUND),
    )
    async def get_badge(
        self, request: Request[Any, Any, Any], customer_id: ExternalIdPath
    ) -> Response[schemas.TierBadge]:
        """The tier badge: tier, benefits and progress to the next tier (one indexed read, or none when cached)."""
        state = request.app.state
        body = await services.storefront_badge_json(state.engine, state.tiers, state.badges, customer_id)
        # The body is a TierBadge already encoded (the cache keeps it so); the annotation documents it as one.
        return cast("Response[schemas.TierBadge]", Response(body, media_type=MediaType.JSON))

    @put(
        "/tier-pin",
        operation_id="PinTier",
        tags=["marketing"],
        guards=[guards.marketing],
        status_code=HTTP_200_OK,
        responses=problem_responses(NOT_FOUND),
    )
    async def pin_tier(
        self,
        request: Request[Any, Any, Any],
        session: NamedDependency[AsyncSession],
        data: JSONBody[schemas.TierPin],
        customer_id: ExternalIdPath,
    ) -> schemas.TierBadge:
        """Pin a tier until a date, with a reason; it wins over the rules until it expires."""
        return await services.set_pin(session, request.app.state.tiers, customer_id, data)

    @delete(
        "/tier-pin",
        operation_id="UnpinTier",
        tags=["marketing"],
        guards=[guards.marketing],
        status_code=HTTP_204_NO_CONTENT,
        # Also for a customer without a pin.
        responses=problem_responses(NOT_FOUND),
    )
    async def unpin_tier(
        self, request: Request[Any, Any, Any], session: NamedDependency[AsyncSession], customer_id: ExternalIdPath
    ) -> None:
        """Remove a pin; the tier the rules give applies again at once."""
        internal_id = await services.remove_pin(session, customer_id)
        # Re-score now: a customer pinned before their first score has no rule decision stored yet.
        state = request.app.state
        await incremental.rescore(session, [internal_id], state.tiers, state.model_cache)


class TierController(Controller):
    path = "/v1/tiers"

    @get("/", operation_id="ListTiers", tags=["storefront"], guards=[guards.any_key])
    async def list_tiers(self, request: Request[Any, Any, Any]) -> schemas.TierList:
        """The tiers in evaluation order, with their rules in words and their benefits."""
        return services.tier_list(request.app.state.tiers)

    @post(
        "/preview", operation_id="PreviewTiers", tags=["marketing"], guards=[guards.marketing], status_code=HTTP_200_OK
    )
    async def preview(self, request: Request[Any, Any, Any], data: JSONBody[dict[str, Any]]) -> schemas.PreviewResult:
        """How many customers would move between tiers under a candidate tiers config; nothing is changed."""
        try:
            candidate = parse_tiers(data, "candidate config")
        except TiersConfigError as error:
            errors = [FieldError(field, message) for field, message in error.errors]
            raise ProblemError(
                VALIDATION, f"Invalid tiers config: {', '.join(e.field for e in errors)}", errors=errors
            ) from None
        state = request.app.state
        return await services.preview(state.session_maker, state.tiers, candidate)
