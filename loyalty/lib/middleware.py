"""ASGI middleware: per request, in one pass, an id, the per-key rate limit, Prometheus metrics and an access log."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import uuid
from typing import Any, cast

from litestar import Litestar, Request
from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.stores.base import Store
from litestar.stores.memory import MemoryStore
from litestar.types import ASGIApp, HTTPResponseStartEvent, Message, Receive, Scope, Send
from sqlalchemy.exc import SQLAlchemyError

from loyalty.access.services import hash_key, recently_verified, verify_key
from loyalty.lib.errors import RATE_LIMITED, ProblemError, problem_response
from loyalty.lib.logging import request_id_var
from loyalty.ops.metrics import REQUEST_METRICS

access_logger = logging.getLogger("loyalty.access")
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
UNLIMITED_PATHS = ("/health", "/metrics", "/schema", "/problems")
# Requests to /metrics are the scraper's own, left out of the request metrics it reads.
UNMEASURED_PATHS = ("/metrics",)
# How long a key, once found active, counts as a real key for the rate limiter: its window.
KEY_KNOWN_SECONDS = 60.0
WINDOW_SECONDS = 60
# The app's store the windows live in: in this process (a MemoryStore), or shared by replicas (Redis).
RATE_LIMIT_STORE = "rate_limit"
_BUCKET = "KeyRateLimitMiddleware::"


class RequestMiddleware:
    """Every request's cross-cutting work, done once for all of it in one pure-ASGI layer.

    The request gets an id (the caller's ``X-Request-ID`` if sane), echoed in the response and carried by every log
    line written while it is served; it is counted against its credential's rate limit (`KeyRateLimiter`), measured
    in the Prometheus request metrics (`loyalty.ops.metrics.RequestMetrics`), and logged in one access line. These
    were three middlewares (ours, and Litestar's Prometheus and rate-limit ones), each building its own request
    object, headers and send wrapper, and the limiter taking two locks: a sixth of the badge read's CPU.

    Litestar runs app middleware per route, after routing, so the route's path template is known here, and inside
    the route's own exception handling, so an error in a handler reaches this layer as a problem response.
    """

    def __init__(self, app: ASGIApp, limiter: KeyRateLimiter | None, access_log: bool = True) -> None:
        self.app = app
        self.limiter = limiter
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method = str(scope.get("method", ""))
        path = scope["path"]
        # The first of each header, as Litestar's request headers answer it; ASGI servers send names in lower case.
        incoming: str | None = None
        plain_key: str | None = None
        authorization: str | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1") if incoming is None else incoming
            elif name == b"x-api-key":
                plain_key = value.decode("latin-1") if plain_key is None else plain_key
            elif name == b"authorization":
                authorization = value.decode("latin-1") if authorization is None else authorization
        request_id = incoming if incoming and _VALID_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        measured = not path.startswith(UNMEASURED_PATHS)
        path_template = scope.get("path_template", path)
        if measured:
            REQUEST_METRICS.started(method, path_template)
        status = 500
        ended = 0.0
        added = [(b"x-request-id", request_id.encode("latin-1"))]
        app = self.app

        async def send_wrapper(message: Message) -> None:
            nonlocal status, ended
            if message["type"] == "http.response.start":
                status = message["status"]
                _put_headers(message, added)
            elif message["type"] == "http.response.body":
                ended = time.perf_counter()
            await send(message)

        try:
            limiter = self.limiter
            if limiter is not None and not path.startswith(UNLIMITED_PATHS):
                refused, window_headers = await limiter.count(scope, plain_key, authorization)
                if refused is not None:
                    app = refused
                else:
                    added = window_headers + added
            await app(scope, receive, send_wrapper)
        finally:
            if measured:
                REQUEST_METRICS.finished(method, path_template, status, ended - started if ended else 0.0)
            if self.access_log and access_logger.isEnabledFor(logging.INFO):
                access_logger.info(
                    "%s %s %s",
                    method,
                    path,
                    status,
                    extra={
                        "method": method,
                        "path": path,
                        "status": status,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    },
                )
            request_id_var.reset(token)


def _put_headers(message: HTTPResponseStartEvent, added: list[tuple[bytes, bytes]]) -> None:
    """Set response headers as `MutableScopeHeaders` does (replacing any of the same name), in one pass."""
    headers = message.setdefault("headers", [])
    names = {name for name, _value in added}
    if isinstance(headers, list) and not any(name.lower() in names for name, _value in headers):
        headers.extend(added)
        return
    mutable = MutableScopeHeaders.from_message(cast("Message", message))
    for name, value in added:
        mutable[name.decode("latin-1")] = value.decode("latin-1")


def rate_limit_identity(authorization: str | None, address: str) -> str:
    """Limit per credential: the bearer token (by hash, never in clear), or else the address. API keys are counted
    per key once verified; see `KeyRateLimiter._identity`."""
    if authorization:
        return "token:" + hashlib.sha256(authorization.encode()).hexdigest()[:32]
    return "addr:" + address


class KeyRateLimiter:
    """A fixed window of requests a minute per credential, announced in RateLimit headers, 429 with Retry-After past it.

    A window is a count and its end, kept in the app's ``rate_limit`` store, so replicas can share it (Redis). When
    that store is the in-process `MemoryStore`, the windows are a dict here instead: read and written without an
    await, a window cannot change between the two on the one event loop, where the store needed a lock around its
    awaited get and set (and takes one of its own inside each): together the limiter's largest cost per request.
    """

    # Past this many windows, ended ones are dropped (a window is a few dozen bytes; identities are keys and
    # addresses, so this bounds the memory an address scan can take, not the number of callers).
    SWEEP_AT = 10_000

    def __init__(self, requests_per_minute: int) -> None:
        self.max_requests = requests_per_minute
        self._windows: dict[str, tuple[int, int]] = {}
        self._sweep_at = self.SWEEP_AT
        self._store_lock = asyncio.Lock()
        self._policy = f"{requests_per_minute}; w={WINDOW_SECONDS}".encode()
        self._limit = str(requests_per_minute).encode()

    async def count(
        self, scope: Scope, plain_key: str | None, authorization: str | None
    ) -> tuple[ASGIApp | None, list[tuple[bytes, bytes]]]:
        """Count the request: the 429 response to send instead of serving it, or None and the window's headers."""
        app: Litestar = scope["litestar_app"]
        store = app.stores.get(RATE_LIMIT_STORE)
        local = isinstance(store, MemoryStore)
        key = await self._identity(scope, app, store, local, plain_key, authorization)
        if local:
            now = int(time.time())
            count, reset = self._windows.get(key, (0, now))
            refused, count, reset = self._admit(count, reset, now)
            if not refused:
                self._windows[key] = (count, reset)
                if len(self._windows) >= self._sweep_at:
                    self._sweep(now)
        else:
            async with self._store_lock:
                now = int(time.time())
                count, reset = _decode_window(await store.get(key), now)
                refused, count, reset = self._admit(count, reset, now)
                if not refused:
                    await store.set(key, f"{count}:{reset}", expires_in=max(1, reset - now))
        if refused:
            return self._refuse(scope, app, count, reset, now), []
        return None, self._window_headers(count, reset, now)

    def _admit(self, count: int, reset: int, now: int) -> tuple[bool, int, int]:
        """Whether the window is used up, and the window counting this request if it is not."""
        if reset <= now:
            count, reset = 0, now + WINDOW_SECONDS
        if count >= self.max_requests:
            return True, count, reset
        return False, count + 1, reset

    def _sweep(self, now: int) -> None:
        self._windows = {key: window for key, window in self._windows.items() if window[1] > now}
        self._sweep_at = max(self.SWEEP_AT, 2 * len(self._windows))

    async def _peek(self, store: Store, local: bool, key: str, now: int) -> tuple[int, int]:
        if local:
            return self._windows.get(key, (0, now))
        return _decode_window(await store.get(key), now)

    async def _identity(
        self, scope: Scope, app: Litestar, store: Store, local: bool, plain_key: str | None, authorization: str | None
    ) -> str:
        """The bucket a request counts in: its API key's, once the key is known to be real, else as
        `rate_limit_identity` says.

        A key this process has not found active lately is verified here first (the route's guard then finds it
        in the verified keys). A made-up key counts against its sender's address: otherwise every invented key
        would open a bucket of its own, and a flood of them, each costing a database read, would never be
        limited. Once the address has used up its window, an unfamiliar key is refused without that read (a real
        key in use from that address stays known, and served, meanwhile).
        """
        client = scope.get("client")
        address = client[0] if client else "127.0.0.1"
        if not plain_key:
            return _BUCKET + rate_limit_identity(authorization, address)
        key_hash = hash_key(plain_key)
        state = app.state
        if recently_verified(state.engine, key_hash, KEY_KNOWN_SECONDS):
            return f"{_BUCKET}key:{key_hash[:32]}"
        address_bucket = f"{_BUCKET}addr:{address}"
        now = int(time.time())
        count, reset = await self._peek(store, local, address_bucket, now)
        if reset > now and count >= self.max_requests:
            return address_bucket
        try:
            real = await verify_key(state.engine, plain_key, state.settings.api_key_cache_seconds) is not None
        except (SQLAlchemyError, OSError):
            # The database is unreachable: the route's own check meets the same error and answers it (503).
            real = False
        return f"{_BUCKET}key:{key_hash[:32]}" if real else address_bucket

    def _refuse(self, scope: Scope, app: Litestar, count: int, reset: int, now: int) -> ASGIApp:
        """The 429 problem, sent as a response rather than raised.

        This runs inside the request id, metrics and access log but outside the route's exception handling: an
        exception raised here would pass them by (the access log would say 500 and the metrics 200, and the
        response would lack its X-Request-ID) and be turned into a response only by the app's outermost handler.
        """
        retry_after = max(1, reset - now)
        headers = {name.decode(): value.decode() for name, value in self._window_headers(count, reset, now)}
        problem = ProblemError(
            RATE_LIMITED,
            f"More than {self.max_requests} requests a minute with this credential; retry in {retry_after} s",
            headers={**headers, "Retry-After": str(retry_after)},
        )
        request: Request[Any, Any, Any] = app.request_class(scope)
        return problem_response(problem, request).to_asgi_response(app=None, request=request)

    def _window_headers(self, count: int, reset: int, now: int) -> list[tuple[bytes, bytes]]:
        return [
            (b"ratelimit-policy", self._policy),
            (b"ratelimit-limit", self._limit),
            (b"ratelimit-remaining", str(max(0, self.max_requests - count)).encode()),
            (b"ratelimit-reset", str(reset - now).encode()),
        ]


def _decode_window(stored: bytes | None, now: int) -> tuple[int, int]:
    """(requests so far, end of the window) from the store; an absent or unreadable entry starts a new window."""
    count, _sep, reset = (stored or b"").partition(b":")
    try:
        return int(count), int(reset)
    except ValueError:
        return 0, now
