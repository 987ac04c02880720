"""The OpenAPI document's credentials and error responses: every operation says what it needs and how it fails.

Litestar documents a route's success response from its signature, and a 400 in its own error shape, which this API
never sends. What a route can fail with follows from what it is, so it is added here for every route: its guard
(401, and 403 for a key without the scope), its body (400 malformed, 413 too large, 422) and parameters (422), the
rate limit (429), the database (503) and the unexpected (500). The outcomes of a route's own logic (404 for an
unknown id, 409 for a conflicting replay, the distinct 422s of redemptions, ...) are declared on the route itself
with ``responses=problem_responses(...)``; a status declared there wins over the one added here. The guard also
names the credential (the security schemes of ``loyalty.app``).

Two more corrections to what Litestar generates: the 400 it adds to every route with parameters, in an error shape
this API never sends (invalid parameters are a 422 problem), is dropped; and a body with a default is optional.
"""

from __future__ import annotations

from dataclasses import dataclass

from litestar import Litestar
from litestar.constants import RESERVED_KWARGS
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.spec import OpenAPIResponse, Operation, RequestBody, SecurityRequirement
from litestar.routes import HTTPRoute

from loyalty.access import guards
from loyalty.dashboard.guards import browser_session_only
from loyalty.lib.errors import (
    BODY_TOO_LARGE,
    FORBIDDEN,
    INTERNAL,
    MALFORMED,
    PROBLEM_MEDIA_TYPE,
    RATE_LIMITED,
    UNAUTHENTICATED,
    UNAVAILABLE,
    VALIDATION,
    ProblemKind,
    problem_responses,
)
from loyalty.lib.middleware import UNLIMITED_PATHS


@dataclass(frozen=True)
class GuardDoc:
    """What a guard means for the document: the security scheme of its credential, and what it refuses with."""

    scheme: str | None
    refusals: tuple[ProblemKind, ...]


_SCOPED_KEY = GuardDoc("ApiKey", (UNAUTHENTICATED, FORBIDDEN))
# A new guard must be added here: documenting the app fails loudly until it is.
GUARDS: dict[object, GuardDoc] = {
    guards.storefront: _SCOPED_KEY,
    guards.marketing: _SCOPED_KEY,
    guards.admin: _SCOPED_KEY,
    guards.storefront_or_marketing: _SCOPED_KEY,
    guards.any_key: GuardDoc("ApiKey", (UNAUTHENTICATED,)),
    guards.requires_customer: GuardDoc("CustomerToken", (UNAUTHENTICATED,)),
    # The dashboard's credential is a browser session cookie from its sign-in page, not an API credential.
    browser_session_only: GuardDoc(None, (UNAUTHENTICATED,)),
}


def _guard_docs(route: HTTPRoute, handler: HTTPRouteHandler) -> list[GuardDoc]:
    try:
        return [GUARDS[guard] for guard in handler.resolve_guards()]
    except KeyError as error:
        raise ValueError(f"{route.path}: guard {error.args[0]!r} is missing from loyalty.ops.openapi.GUARDS") from None


def route_problems(route: HTTPRoute, handler: HTTPRouteHandler) -> list[ProblemKind]:
    """The problem kinds any route like this one can answer with, whatever its own logic does."""
    kinds = [INTERNAL]
    route_guards = _guard_docs(route, handler)
    for guard in route_guards:
        kinds += guard.refusals
    signature = handler.parsed_fn_signature.parameters
    parameters = set(signature) - RESERVED_KWARGS - set(handler.resolve_dependencies())
    if "data" in signature:
        kinds += [MALFORMED, BODY_TOO_LARGE, VALIDATION]
    elif parameters:
        kinds.append(VALIDATION)
    if not route.path.startswith(UNLIMITED_PATHS):
        kinds.append(RATE_LIMITED)
    # Every credential check reads the database (or its cache of keys), as does every route given a session.
    if route_guards or "session" in signature:
        kinds.append(UNAVAILABLE)
    return list(dict.fromkeys(kinds))


@dataclass
class ProblemOperation(Operation):
    """An operation whose error responses are all problem documents: Litestar's own 400 is left out."""

    def __post_init__(self) -> None:
        responses = self.responses or {}
        bad_request = responses.get("400")
        if isinstance(bad_request, OpenAPIResponse) and PROBLEM_MEDIA_TYPE not in (bad_request.content or {}):
            del responses["400"]


@dataclass
class OptionalBodyOperation(ProblemOperation):
    """The same, for a route whose body has a default: Litestar marks every body required."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.request_body, RequestBody):
            self.request_body.required = False


def document_routes(app: Litestar) -> None:
    """Give every documented route its credential and problem responses; call once, before the schema is built."""
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            if not handler.resolve_include_in_schema():
                continue
            schemes = dict.fromkeys(guard.scheme for guard in _guard_docs(route, handler) if guard.scheme)
            security: list[SecurityRequirement] = list(handler.security or [])
            security += [{scheme: []} for scheme in schemes if {scheme: []} not in security]
            handler.security = security
            declared = dict(handler.responses or {})
            handler.responses = {**problem_responses(*route_problems(route, handler)), **declared}
            body = handler.parsed_fn_signature.parameters.get("data")
            optional_body = body is not None and body.has_default
            handler.operation_class = OptionalBodyOperation if optional_body else ProblemOperation
