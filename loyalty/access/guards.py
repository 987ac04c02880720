"""Guards: which credential a route takes, and with which scope.

API keys travel in ``X-API-Key``; customer tokens in ``Authorization: Bearer``. The wrong kind of credential for
a route is a 401, as is a missing, unknown or revoked one; a valid key without the scope is a 403.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from sqlalchemy import select

from loyalty.access.services import KeyPrincipal, verify_key
from loyalty.access.tokens import CustomerPrincipal, InvalidTokenError, verify_customer_token
from loyalty.db.models import Customer
from loyalty.lib.errors import FORBIDDEN, UNAUTHENTICATED, ProblemError

Guard = Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], Coroutine[Any, Any, None]]
PRINCIPAL_KEY = "principal"


def _unauthenticated(detail: str) -> ProblemError:
    return ProblemError(UNAUTHENTICATED, detail, headers={"WWW-Authenticate": 'Bearer realm="loyalty"'})


async def _key_principal(connection: ASGIConnection[Any, Any, Any, Any]) -> KeyPrincipal:
    plain = connection.headers.get("x-api-key")
    if not plain:
        if connection.headers.get("authorization"):
            raise _unauthenticated("This route takes an API key in X-API-Key, not a customer token")
        raise _unauthenticated("Send an API key in the X-API-Key header")
    state = connection.app.state
    principal = await verify_key(state.engine, plain, state.settings.api_key_cache_seconds)
    if principal is None:
        raise _unauthenticated("The API key is unknown or revoked")
    return principal


def requires_scope(*scopes: str) -> Guard:
    """A guard admitting API keys with one of ``scopes`` (admin keys hold every scope)."""
    wanted = " or ".join(f"`{scope}`" for scope in scopes)

    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        principal = await _key_principal(connection)
        if not any(principal.allows(scope) for scope in scopes):
            raise ProblemError(FORBIDDEN, f"This route needs the {wanted} scope; the key has `{principal.scope}`")
        connection.scope[PRINCIPAL_KEY] = principal  # type: ignore[literal-required]

    guard.__name__ = "requires_" + "_or_".join(scopes)
    return guard


async def requires_customer(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """A guard admitting only a valid customer token."""
    header = connection.headers.get("authorization", "")
    scheme, _sep, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        detail = (
            "This route takes a customer token, not an API key"
            if connection.headers.get("x-api-key")
            else "Send a customer token as Authorization: Bearer <token>"
        )
        raise _unauthenticated(detail)
    try:
        principal = verify_customer_token(token.strip(), connection.app.state.secret_key)
    except InvalidTokenError:
        raise _unauthenticated("The customer token is invalid or expired") from None
    # The token names both ids; an erased customer lost the storefront id, so tokens minted before the erasure
    # stop working at once (one read by primary key).
    async with connection.app.state.read_session_maker() as session:
        current = await session.scalar(select(Customer.external_id).where(Customer.id == principal.customer_id))
        await session.rollback()
    if current != principal.external_id:
        raise _unauthenticated("The customer token is no longer valid")
    connection.scope[PRINCIPAL_KEY] = principal  # type: ignore[literal-required]


def key_principal(connection: ASGIConnection[Any, Any, Any, Any]) -> KeyPrincipal:
    principal = connection.scope.get(PRINCIPAL_KEY)
    assert isinstance(principal, KeyPrincipal)
    return principal


def customer_principal(connection: ASGIConnection[Any, Any, Any, Any]) -> CustomerPrincipal:
    principal = connection.scope.get(PRINCIPAL_KEY)
    assert isinstance(principal, CustomerPrincipal)
    return principal


async def any_key(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """A guard admitting any valid API key, whatever its scope (reference data every integration reads)."""
    connection.scope[PRINCIPAL_KEY] = await _key_principal(connection)  # type: ignore[literal-required]


storefront = requires_scope("storefront")
marketing = requires_scope("marketing")
admin = requires_scope("admin")
storefront_or_marketing = requires_scope("storefront", "marketing")
