"""The dashboard is for browsers with a session cookie; API credentials are the wrong kind of credential here."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from loyalty.lib.errors import UNAUTHENTICATED, ProblemError


async def browser_session_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Refuse API keys and customer tokens with the API's 401, as every route refuses the wrong credential.

    A browser never sends these headers, so an API client gets a clear problem instead of a redirect to an
    HTML sign-in page it cannot use.
    """
    if connection.headers.get("x-api-key") or connection.headers.get("authorization"):
        raise ProblemError(
            UNAUTHENTICATED,
            "The dashboard takes a browser session, not an API credential: sign in at /dashboard/sign-in",
            headers={"WWW-Authenticate": 'Bearer realm="loyalty"'},
        )
