"""ASGI middleware: request ids, access logs and the per-key rate limit."""

from __future__ import annotations

import hashlib
import logging
import re
import time
import uuid
from typing import Any

from litestar import Request
from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.middleware.rate_limit import RateLimitConfig, RateLimitMiddleware, get_remote_address
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from loyalty.lib.logging import request_id_var

access_logger = logging.getLogger("loyalty.access")
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
UNLIMITED_PATHS = ("/health", "/metrics", "/schema", "/problems")


class RequestContextMiddleware:
    """Give every request an id (the caller's ``X-Request-ID`` if sane), echo it, and log one line per request."""

    def __init__(self, app: ASGIApp, access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        method = str(scope.get("method", ""))
        incoming = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode("latin-1")
        request_id = incoming if _VALID_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableScopeHeaders.from_message(message)["X-Request-ID"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.access_log:
                access_logger.info(
                    "%s %s %s",
                    method,
                    scope["path"],
                    status,
                    extra={
                        "method": method,
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    },
                )
            request_id_var.reset(token)


def rate_limit_identity(request: Request[Any, Any, Any]) -> str:
    """Limit per credential: the key (by hash, never in clear), the bearer token, or else the address."""
    key = request.headers.get("x-api-key")
    if key:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:32]
    authorization = request.headers.get("authorization")
    if authorization:
        return "token:" + hashlib.sha256(authorization.encode()).hexdigest()[:32]
    return "addr:" + get_remote_address(request)


class KeyRateLimitMiddleware(RateLimitMiddleware):
    """Litestar's limiter, plus the ``Retry-After`` header RFC 6585 asks a 429 to carry."""

    def create_response_headers(self, cache_object: Any) -> dict[str, str]:
        headers = super().create_response_headers(cache_object)
        reset = headers.get(self.config.rate_limit_reset_header_key)
        if reset is not None and cache_object.history and len(cache_object.history) >= self.max_requests:
            headers["Retry-After"] = str(max(1, int(reset)))
        return headers


def rate_limit_config(requests_per_minute: int) -> RateLimitConfig:
    return RateLimitConfig(
        rate_limit=("minute", requests_per_minute),
        identifier_for_request=rate_limit_identity,
        exclude=[f"^{path}" for path in UNLIMITED_PATHS],
        middleware_class=KeyRateLimitMiddleware,
    )
