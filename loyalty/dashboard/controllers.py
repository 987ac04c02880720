"""The marketing dashboard: a sign-in page exchanging an API key for a session, and the page itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from litestar import Controller, MediaType, Request, get, post
from litestar.datastructures import Cookie
from litestar.enums import RequestEncodingType
from litestar.openapi import ResponseSpec
from litestar.params import Body
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from litestar.status_codes import HTTP_200_OK, HTTP_303_SEE_OTHER, HTTP_401_UNAUTHORIZED
from litestar.template.config import TemplateConfig

from loyalty.access.services import authenticate_key
from loyalty.dashboard.guards import browser_session_only
from loyalty.dashboard.services import dashboard_data, heat_rows
from loyalty.dashboard.sessions import (
    COOKIE_NAME,
    DASHBOARD_SCOPES,
    LIFETIME,
    issue_session,
    key_may_view,
    session_key_id,
)
from loyalty.lib.clock import utcnow

PACKAGE_DIR = Path(__file__).parent
SIGN_IN_PATH = "/dashboard/sign-in"

# Everything the page loads comes from this origin; the data rides in a non-executable JSON script element,
# so no inline script or style is needed and none is allowed.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def template_config() -> TemplateConfig[JinjaTemplateEngine]:
    return TemplateConfig(directory=PACKAGE_DIR / "templates", engine=JinjaTemplateEngine)


# The vendored chart library, stylesheet and page script (no CDN at run time).
static_router = create_static_files_router(
    path="/dashboard/static",
    directories=[PACKAGE_DIR / "static"],
    include_in_schema=False,
    name="dashboard-static",
    guards=[browser_session_only],
)


@dataclass
class SignInForm:
    key: str = ""


def _session_cookie(value: str, request: Request[Any, Any, Any], max_age: int) -> Cookie:
    return Cookie(
        key=COOKIE_NAME,
        value=value,
        path="/dashboard",
        max_age=max_age,
        httponly=True,
        samesite="strict",
        # Behind TLS (uvicorn honours X-Forwarded-Proto) the cookie never travels in clear text.
        secure=request.url.scheme == "https",
    )


def _sign_in_page(error: str | None, status_code: int) -> Template:
    return Template(
        template_name="sign_in.html.j2",
        context={"error": error},
        status_code=status_code,
        headers=SECURITY_HEADERS,
    )


class DashboardController(Controller):
    path = "/dashboard"
    tags = ["marketing"]
    guards = [browser_session_only]

    @get(
        "/",
        operation_id="Dashboard",
        summary="The marketing dashboard (HTML; sign in with a marketing key).",
        media_type=MediaType.HTML,
        responses={HTTP_303_SEE_OTHER: ResponseSpec(None, description="No session: to the sign-in page.")},
    )
    async def dashboard(self, request: Request[Any, Any, Any]) -> Template | Redirect:
        """The marketing dashboard page; without a session, a redirect to its sign-in page."""
        state = request.app.state
        key_id = session_key_id(request.cookies.get(COOKIE_NAME), state.secret_key, utcnow())
        if key_id is not None:
            async with state.read_session_maker() as session:
                allowed = await key_may_view(session, key_id)
                await session.rollback()
            if not allowed:
                key_id = None
        if key_id is None:
            return Redirect(SIGN_IN_PATH, status_code=HTTP_303_SEE_OTHER)
        data = await dashboard_data(state.read_session_maker, state.tiers)
        return Template(
            template_name="dashboard.html.j2",
            context={"data": data, "heat_rows": heat_rows(data)},
            headers=SECURITY_HEADERS,
        )

    @get("/sign-in", include_in_schema=False)
    async def sign_in_form(self) -> Template:
        return _sign_in_page(None, HTTP_200_OK)

    @post("/sign-in", include_in_schema=False)
    async def sign_in(
        self,
        request: Request[Any, Any, Any],
        data: Annotated[SignInForm, Body(media_type=RequestEncodingType.URL_ENCODED)],
    ) -> Template | Redirect:
        async with request.app.state.read_session_maker() as session:
            principal = await authenticate_key(session, data.key.strip())
            await session.rollback()
        if principal is None or not any(principal.allows(scope) for scope in DASHBOARD_SCOPES):
            # One message for unknown and for under-scoped keys: the form does not confirm which keys exist.
            return _sign_in_page(
                "That key cannot open the dashboard: use a marketing or admin key.", HTTP_401_UNAUTHORIZED
            )
        value = issue_session(principal.key_id, request.app.state.secret_key, utcnow())
        return Redirect(
            "/dashboard",
            status_code=HTTP_303_SEE_OTHER,
            cookies=[_session_cookie(value, request, int(LIFETIME.total_seconds()))],
        )

    @post("/sign-out", include_in_schema=False)
    async def sign_out(self, request: Request[Any, Any, Any]) -> Redirect:
        # SameSite=Strict keeps other sites from signing a user out (or in) through this form.
        return Redirect(SIGN_IN_PATH, status_code=HTTP_303_SEE_OTHER, cookies=[_session_cookie("", request, 0)])
