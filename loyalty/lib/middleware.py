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
from litestar.middleware.rate_limit import (
    DURATION_VALUES,
    RateLimitConfig,
    RateLimitMiddleware,
    get_remote_address,
)
from litestar.stores.base import Store
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from sqlalchemy.exc import SQLAlchemyError

from loyalty.access.services import hash_key, recently_verified, verify_key
from loyalty.lib.errors import RATE_LIMITED, ProblemError, problem_response
from loyalty.lib.logging import request_id_var

access_logger = logging.getLogger("loyalty.access")
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
UNLIMITED_PATHS = ("/health", "/metrics", "/schema", "/problems")
# How long a key, once found active, counts as a real key for the rate limiter: its window.
KEY_KNOWN_SECONDS = 60.0


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
    """Limit per credential: the bearer token (by hash, never in clear), or else the address. API keys are counted
    per key once verified; see `KeyRateLimitMiddleware._identity`."""
    authorization = request.headers.get("authorization")
    if authorization:
        return "token:" + hashlib.sha256(authorization.encode()).hexdigest()[:32]
    return "addr:" + get_remote_address(request)


class KeyRateLimitMiddleware(RateLimitMiddleware):
    """Litestar's fixed-window limiter and headers, counting requests instead of listing them, plus Retry-After.

    Litestar keeps one timestamp per request in the store and decodes and re-encodes the whole list on every
    request, though only its length is ever read: with the default limit that is thousands of numbers per request.
    A count and the window's end say the same in a few bytes, in the same store (so it can still be Redis).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope["litestar_app"]
        request: Request[Any, Any, Any] = app.request_class(scope)
        if await self.should_check_request(request=request):
            store = self.config.get_store_from_app(app)
            key = await self._identity(request, store)
            async with self._lock:
                now = int(time.time())
                count, reset = _decode_window(await store.get(key), now)
                if reset <= now:
                    count, reset = 0, now + DURATION_VALUES[self.unit]
                refused = count >= self.max_requests
                if not refused:
                    count += 1
                    await store.set(key, f"{count}:{reset}", expires_in=max(1, reset - now))
            if refused:
                await self._refuse(request, count, reset, now)(scope, receive, send)
                return
            if self.config.set_rate_limit_headers:
                send = self._send_with_headers(send, self._window_headers(count, reset, now))
        await self.app(scope, receive, send)

    async def _identity(self, request: Request[Any, Any, Any], store: Store) -> str:
        """The bucket a request counts in: its API key's, once the key is known to be real, else as
        `rate_limit_identity` says.

        A key this process has not found active lately is verified here first (the route's guard then finds it
        in the verified keys). A made-up key counts against its sender's address: otherwise every invented key
        would open a bucket of its own, and a flood of them, each costing a database read, would never be
        limited. Once the address has used up its window, an unfamiliar key is refused without that read (a real
        key in use from that address stays known, and served, meanwhile).
        """
        bucket = f"{type(self).__name__}::"
        plain = request.headers.get("x-api-key")
        if not plain:
            return bucket + rate_limit_identity(request)
        key_hash = hash_key(plain)
        state = request.app.state
        if recently_verified(state.engine, key_hash, KEY_KNOWN_SECONDS):
            return f"{bucket}key:{key_hash[:32]}"
        address = f"{bucket}addr:{get_remote_address(request)}"
        now = int(time.time())
        count, reset = _decode_window(await store.get(address), now)
        if reset > now and count >= self.max_requests:
            return address
        try:
            real = await verify_key(state.engine, plain, state.settings.api_key_cache_seconds) is not None
        except (SQLAlchemyError, OSError):
            # The database is unreachable: the route's own check meets the same error and answers it (503).
            real = False
        return f"{bucket}key:{key_hash[:32]}" if real else address

    def _refuse(self, request: Request[Any, Any, Any], count: int, reset: int, now: int) -> ASGIApp:
        """The 429 problem, sent as a response rather than raised.

        This middleware runs inside the request-id and metrics middleware but outside the route's exception
        handling: an exception raised here passes them by (so the access log said 500 and the metrics 200, and the
        response lacked its X-Request-ID) and is turned into a response only by the app's outermost handler.
        """
        retry_after = max(1, reset - now)
        headers = self._window_headers(count, reset, now) if self.config.set_rate_limit_headers else {}
        problem = ProblemError(
            RATE_LIMITED,
            f"More than {self.max_requests} requests a {self.unit} with this credential; retry in {retry_after} s",
            headers={**headers, "Retry-After": str(retry_after)},
        )
        return problem_response(problem, request).to_asgi_response(app=None, request=request)

    def _window_headers(self, count: int, reset: int, now: int) -> dict[str, str]:
        config = self.config
        return {
            config.rate_limit_policy_header_key: f"{self.max_requests}; w={DURATION_VALUES[self.unit]}",
            config.rate_limit_limit_header_key: str(self.max_requests),
            config.rate_limit_remaining_header_key: str(max(0, self.max_requests - count)),
            config.rate_limit_reset_header_key: str(reset - now),
        }

    @staticmethod
    def _send_with_headers(send: Send, headers: dict[str, str]) -> Send:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                response_headers = MutableScopeHeaders(message)
                for name, value in headers.items():
                    response_headers[name] = value
            await send(message)

        return send_with_headers


def _decode_window(stored: bytes | None, now: int) -> tuple[int, int]:
    """(requests so far, end of the window) from the store; an absent or unreadable entry starts a new window."""
    count, _sep, reset = (stored or b"").partition(b":")
    try:
        return int(count), int(reset)
    except ValueError:
        return 0, now


def rate_limit_config(requests_per_minute: int) -> RateLimitConfig:
    return RateLimitConfig(
        rate_limit=("minute", requests_per_minute),
        identifier_for_request=rate_limit_identity,
        exclude=[f"^{path}" for path in UNLIMITED_PATHS],
        middleware_class=KeyRateLimitMiddleware,
    )
