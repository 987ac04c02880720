"""Customer profile routes for the storefront."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, post, put
from litestar.di import NamedDependency
from litestar.params import JSONBody, Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.access import guards
from loyalty.customers import schemas, services
from loyalty.lib.schemas import ExternalId

CustomerIdParam = Parameter(description="The storefront's customer id.")


class CustomerController(Controller):
    path = "/v1/customers"
    tags = ["storefront"]

    @put("/{customer_id:str}", operation_id="UpsertCustomer", guards=[guards.storefront], status_code=HTTP_200_OK)
    async def upsert_customer(
        self,
        session: NamedDependency[AsyncSession],
        data: JSONBody[schemas.CustomerUpsert],
        customer_id: ExternalId = CustomerIdParam,
    ) -> Response[schemas.Customer]:
        """Create or update a customer profile."""
        written = await services.upsert_customer(session, customer_id, data)
        return Response(written.resource, status_code=HTTP_201_CREATED if written.created else HTTP_200_OK)

    @post(
        "/{customer_id:str}/token",
        operation_id="CreateCustomerToken",
        guards=[guards.storefront],
        status_code=HTTP_200_OK,
    )
    async def create_token(
        self,
        request: Request[Any, Any, Any],
        session: NamedDependency[AsyncSession],
        customer_id: ExternalId = CustomerIdParam,
    ) -> schemas.CustomerToken:
        """Mint a short-lived token that lets a signed-in customer read their own rewards."""
        state = request.app.state
        return await services.mint_token(session, customer_id, state.secret_key, state.settings.customer_token_ttl)
