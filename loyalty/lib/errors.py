"""RFC 9457 problem details: one exception type, one registry of problem kinds, one renderer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, NotAuthorizedException, PermissionDeniedException
from litestar.exceptions import ValidationException as LitestarValidationException
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import Example
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

PROBLEM_MEDIA_TYPE = "application/problem+json"
logger = logging.getLogger("loyalty.errors")


@dataclass(frozen=True)
class ProblemKind:
    """A stable kind of error: its URI path segment, default title and status."""

    slug: str
    title: str
    status: int
    description: str

    @property
    def type_uri(self) -> str:
        return f"/problems/{self.slug}"


PROBLEM_KINDS: dict[str, ProblemKind] = {}


def _kind(slug: str, title: str, status: int, description: str) -> ProblemKind:
    kind = ProblemKind(slug, title, status, description)
    PROBLEM_KINDS[slug] = kind
    return kind


VALIDATION = _kind("validation", "Invalid request", 422, "One or more fields are invalid; `errors` lists each.")
MALFORMED = _kind("malformed-request", "Malformed request", 400, "The body is not valid JSON or not an object.")
NOT_FOUND = _kind("not-found", "Not found", 404, "The resource does not exist.")
METHOD_NOT_ALLOWED = _kind("method-not-allowed", "Method not allowed", 405, "The path exists, not the method.")
UNAUTHENTICATED = _kind(
    "unauthenticated",
    "Authentication required",
    401,
    "Missing, invalid, revoked or expired credentials, or the wrong kind of credential for this route.",
)
FORBIDDEN = _kind("forbidden", "Insufficient scope", 403, "The API key is valid but lacks the scope.")
CONFLICT = _kind(
    "idempotency-conflict",
    "Conflicting replay",
    409,
    "A resource with this id already exists with different content.",
)
BODY_TOO_LARGE = _kind("body-too-large", "Request body too large", 413, "The body exceeds LOYALTY_MAX_BODY_BYTES.")
UNSUPPORTED_MEDIA = _kind("unsupported-media-type", "Unsupported media type", 415, "Send application/json.")
RATE_LIMITED = _kind("rate-limited", "Too many requests", 429, "The per-key limit was reached; see Retry-After.")
UNAVAILABLE = _kind("unavailable", "Service unavailable", 503, "The database is unreachable; retry shortly.")
INTERNAL = _kind("internal", "Internal error", 500, "An unexpected error; the request id identifies it in the logs.")
CURRENCY = _kind("currency-mismatch", "Wrong currency", 422, "Amounts must be in the store currency.")
REFUND_EXCEEDS = _kind("refund-exceeds-total", "Refunds exceed order total", 422, "Refunds together > total.")
SELF_REFERRAL = _kind("self-referral", "Self-referral", 422, "A customer cannot refer themselves.")
REFEREE_CLAIMED = _kind(
    "referee-already-claimed", "Referee already claimed", 422, "Another customer already referred this customer."
)
REFERRAL_CYCLE = _kind("referral-cycle", "Referral cycle", 422, "The referral would make a referral cycle.")
RUN_IN_PROGRESS = _kind(
    "recalculation-in-progress", "Recalculation in progress", 409, "A recalculation is queued or running; wait for it."
)
CODE_UNKNOWN = _kind("code-not-found", "Unknown code", 404, "No offer code with this value.")
CODE_NOT_THEIRS = _kind("code-not-theirs", "Code of another customer", 422, "The code was issued to someone else.")
CODE_EXPIRED = _kind("code-expired", "Code expired", 422, "The code's validity has ended.")
CODE_USED_UP = _kind("code-used-up", "No use left", 409, "Every use of the code has been redeemed.")
CODE_BELOW_MINIMUM = _kind(
    "below-minimum-order", "Order below the minimum", 422, "The order total is below the offer's minimum."
)
OFFER_NAME_TAKEN = _kind(
    "offer-name-taken", "Offer name taken", 409, "Offer names are unique; welcome offers use them."
)
CAMPAIGN_FINISHED = _kind(
    "campaign-finished", "Campaign already finished", 409, "A completed or cancelled campaign cannot be cancelled."
)
CUSTOMER_ERASED = _kind("customer-erased", "Customer erased", 404, "The customer's data was erased.")


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str


class ProblemError(Exception):
    """Raised anywhere to answer with a problem document; rolls back the request's transaction."""

    def __init__(
        self,
        kind: ProblemKind,
        detail: str,
        *,
        errors: list[FieldError] | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.errors = errors or []
        self.status = status or kind.status
        self.headers = headers or {}
        self.extra = extra or {}

    def to_dict(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.kind.type_uri,
            "title": self.kind.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        if self.errors:
            body["errors"] = [{"field": e.field, "message": e.message} for e in self.errors]
        body.update(self.extra)
        return body


def field_path(location: tuple[int | str, ...], prefix: str = "") -> str:
    """Render a pydantic error location as API.md writes fields: ``items[0].quantity``."""
    path = prefix
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else str(part)
    return path or "body"


def validation_problem(error: ValidationError, prefix: str = "") -> ProblemError:
    """Turn a pydantic error into one 422 listing every field at fault."""
    field_errors = []
    for item in error.errors(include_url=False, include_input=False):
        # Pydantic prefixes messages from custom validators; the field name already says where.
        message = item["msg"].removeprefix("Value error, ")
        location = tuple(part for part in item["loc"] if not (isinstance(part, str) and part.startswith("function-")))
        field_errors.append(FieldError(field_path(location, prefix), message))
    names = ", ".join(dict.fromkeys(e.field for e in field_errors))
    return ProblemError(VALIDATION, f"Invalid fields: {names}", errors=field_errors)


def field_problem(field: str, message: str, kind: ProblemKind = VALIDATION) -> ProblemError:
    """A problem about one named field."""
    return ProblemError(kind, f"{field}: {message}", errors=[FieldError(field, message)])


def problem_response(problem: ProblemError, request: Request[Any, Any, Any] | None = None) -> Response[Any]:
    headers = dict(problem.headers)
    return Response(
        content=problem.to_dict(str(request.url.path) if request is not None else None),
        status_code=problem.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


_STATUS_KINDS = {
    400: MALFORMED,
    401: UNAUTHENTICATED,
    403: FORBIDDEN,
    404: NOT_FOUND,
    405: METHOD_NOT_ALLOWED,
    409: CONFLICT,
    413: BODY_TOO_LARGE,
    415: UNSUPPORTED_MEDIA,
    422: VALIDATION,
    429: RATE_LIMITED,
    503: UNAVAILABLE,
}


def _litestar_validation_errors(exc: LitestarValidationException) -> list[FieldError]:
    """Litestar reports ``items.0.quantity``; API.md writes ``items[0].quantity``."""
    errors: list[FieldError] = []
    extra = exc.extra if isinstance(exc.extra, list) else []
    for item in extra:
        if isinstance(item, dict):
            key = str(item.get("key") or "body")
            message = str(item.get("message", "invalid value")).removeprefix("Value error, ")
            if key == "data" and item.get("source") == "body":
                # `data` is the handler's name for the whole body; a missing body surfaces as a KeyError's repr.
                key = "body"
                message = "a JSON body is required" if message == "'data'" else message
            # ASCII digits only: "²".isdigit() is true, but int("²") raises (a JSON key may be any text).
            parts = tuple(int(part) if part.isascii() and part.isdigit() else part for part in key.split("."))
            errors.append(FieldError(field_path(parts), message))
    return errors or [FieldError("body", exc.detail or "invalid request")]


# Deadlock and serialisation failures: the transaction was rolled back whole and can simply be retried.
_RETRYABLE_SQLSTATES = {"40001", "40P01"}
# The server cannot serve now but will: shutting down or crashed (57P01, 57P02), starting up or still recovering
# after a crash (57P03, "the database system is not yet accepting connections"), out of connection slots (53300).
# The driver raises these as a plain database error; connection failures (class 08) are the same for the caller.
_UNAVAILABLE_SQLSTATES = {"57P01", "57P02", "57P03", "53300"}


def _sqlstate(error: DBAPIError) -> str | None:
    original = error.orig
    state = getattr(original, "sqlstate", None) or getattr(getattr(original, "__cause__", None), "sqlstate", None)
    return state if isinstance(state, str) else None


def _retryable(error: DBAPIError) -> bool:
    state = _sqlstate(error)
    return state in _RETRYABLE_SQLSTATES or state in _UNAVAILABLE_SQLSTATES or (state or "").startswith("08")


def database_unavailable(exc: BaseException) -> bool:
    """The database could not serve this now but may shortly (the 503 ``unavailable``): out of reach, restarting,
    no connection free, or a transaction that lost a deadlock or serialization race."""
    return isinstance(exc, PoolTimeoutError | OperationalError | OSError | ConnectionError) or (
        isinstance(exc, DBAPIError) and (exc.connection_invalidated or _retryable(exc))
    )


def unavailable(detail: str = UNAVAILABLE.description) -> ProblemError:
    """The 503 ``unavailable`` problem, with the wait before a retry."""
    return ProblemError(UNAVAILABLE, detail, headers={"Retry-After": "2"})


def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """The single exception handler: every error leaves as problem+json, never with a stack trace."""
    if isinstance(exc, ProblemError):
        return problem_response(exc, request)
    if isinstance(exc, ValidationError):
        return problem_response(validation_problem(exc), request)
    if isinstance(exc, LitestarValidationException):
        errors = _litestar_validation_errors(exc)
        names = ", ".join(dict.fromkeys(e.field for e in errors))
        return problem_response(ProblemError(VALIDATION, f"Invalid fields: {names}", errors=errors), request)
    if isinstance(exc, NotAuthorizedException | PermissionDeniedException | HTTPException):
        kind = _STATUS_KINDS.get(exc.status_code, INTERNAL if exc.status_code >= 500 else MALFORMED)
        detail = exc.detail if exc.detail and exc.detail != kind.title else kind.description
        headers = dict(exc.headers or {})
        return problem_response(ProblemError(kind, detail, status=exc.status_code, headers=headers), request)
    if database_unavailable(exc):
        logger.warning("database unavailable: %s", type(exc).__name__)
        return problem_response(unavailable(), request)
    logger.exception("unhandled error")
    return problem_response(
        ProblemError(INTERNAL, INTERNAL.description, status=HTTP_500_INTERNAL_SERVER_ERROR), request
    )


def problems_reference() -> str:
    """The list of problem types, for the OpenAPI description."""
    lines = ["| type | status | meaning |", "|---|---|---|"]
    for kind in PROBLEM_KINDS.values():
        lines.append(f"| `{kind.type_uri}` | {kind.status} | {kind.description} |")
    return "\n".join(lines)


class InvalidField(BaseModel):
    field: str = Field(description="Where, as API.md writes fields: `items[0].quantity`.", examples=["total"])
    message: str


class Problem(BaseModel):
    """An RFC 9457 problem document: the body of every error response (what ``ProblemError.to_dict`` writes)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(
        description="A stable URI per kind of error, listed at `/problems`.", examples=["/problems/validation"]
    )
    title: str
    status: int
    detail: str
    instance: str | None = Field(default=None, description="The request path.")
    errors: list[InvalidField] | None = Field(default=None, description="For invalid input: each field at fault.")


def problem_responses(*kinds: ProblemKind) -> dict[int, ResponseSpec]:
    """OpenAPI responses for the problem kinds a route can answer with, grouped by status.

    For a route's ``responses=``: the outcomes of its own logic (``NOT_FOUND`` for an unknown id, ``CONFLICT`` for
    a conflicting replay, ...). A status given here replaces the generic one ``loyalty.ops.openapi`` adds, so list
    every kind of that status the route answers with.
    """
    by_status: dict[int, list[ProblemKind]] = {}
    for kind in kinds:
        by_status.setdefault(kind.status, []).append(kind)
    return {
        status: ResponseSpec(
            data_container=Problem,
            media_type=PROBLEM_MEDIA_TYPE,
            description="; ".join(f"`{kind.type_uri}`: {kind.description}" for kind in group),
            generate_examples=False,
            examples=[
                Example(
                    summary=kind.title,
                    value={"type": kind.type_uri, "title": kind.title, "status": status, "detail": kind.description},
                )
                for kind in group
            ],
        )
        for status, group in sorted(by_status.items())
    }
