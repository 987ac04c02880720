"""The application factory: settings, database, routes, error handling, middleware, the timer."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme, Tag
from litestar.plugins.pydantic import PydanticPlugin
from litestar.stores.memory import MemoryStore

from loyalty import __version__
from loyalty.activity.controllers import EventController, OrderController, ReferralController
from loyalty.activity.order_groups import OrderGroups
from loyalty.customers.controllers import CustomerController, MeController, ReportController
from loyalty.dashboard.controllers import DashboardController, static_router, template_config
from loyalty.db.dependencies import provide_session
from loyalty.db.session import connect_outside_pool, create_engine, create_session_maker, read_only
from loyalty.db.statistics import StatisticsJobs
from loyalty.lib.collector import settle_after_startup
from loyalty.lib.errors import handle_exception, problems_reference
from loyalty.lib.logging import configure_logging
from loyalty.lib.middleware import RATE_LIMIT_STORE, KeyRateLimiter, RequestMiddleware
from loyalty.lib.request import JsonRequest
from loyalty.offers.controllers import CampaignController, CodeController, OfferController
from loyalty.offers.dispatch import OfferJobs
from loyalty.ops import metrics
from loyalty.ops.assets import SchemaAssetsController
from loyalty.ops.controllers import HealthController, MetricsController, ProblemController
from loyalty.ops.openapi import document_routes
from loyalty.recalc.controllers import RecalculationController
from loyalty.recalc.incremental import ModelCache
from loyalty.recalc.jobs import RecalcJobs
from loyalty.scheduling.timer import Timer, parse_cron
from loyalty.settings import Settings, get_settings
from loyalty.tiers.badge_cache import CACHE_INFO_KEY, BadgeCache, BadgeListener
from loyalty.tiers.config import load_tiers
from loyalty.tiers.controllers import CustomerTierController, TierController
from loyalty.webhooks.controllers import WebhookController
from loyalty.webhooks.jobs import WebhookJobs

logger = logging.getLogger("loyalty.app")

DESCRIPTION = f"""
Loyalty scores customers (value with expected future spending, purchase frequency, influence), places them in
reward tiers, and issues tier offers measured against holdout groups.

**Authentication.** API keys in `X-API-Key` (scopes `storefront`, `marketing`, `admin`); customer tokens in
`Authorization: Bearer`. Missing, invalid or the wrong kind of credential: 401. A key without the scope: 403.

**Money** is a decimal string in the store currency (`"129.90"`); **timestamps** are RFC 3339 with an offset.

**Errors** are RFC 9457 `application/problem+json`. Problem types:

{problems_reference()}
"""


def _openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="Loyalty",
        version=__version__,
        description=DESCRIPTION,
        path="/schema",
        render_plugins=[
            SwaggerRenderPlugin(
                path="/",
                js_url="/schema-assets/swagger-ui/swagger-ui-bundle.js",
                css_url="/schema-assets/swagger-ui/swagger-ui.css",
                standalone_preset_js_url="/schema-assets/swagger-ui/swagger-ui-standalone-preset.js",
            )
        ],
        tags=[
            Tag(name="storefront", description="Server-to-server calls from the shop (scope `storefront`)."),
            Tag(
                name="marketing",
                description="Reports, tier previews, offers, campaigns, recalculations (scope `marketing`).",
            ),
            Tag(name="customer", description="A customer's own rewards (customer token from the storefront)."),
            Tag(name="admin", description="Erasure and webhooks (scope `admin`)."),
            Tag(name="operations", description="Health, metrics and reference (no key)."),
        ],
        components=Components(
            security_schemes={
                "ApiKey": SecurityScheme(type="apiKey", name="X-API-Key", security_scheme_in="header"),
                "CustomerToken": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT"),
            }
        ),
    )


def create_app(settings: Settings | None = None) -> Litestar:
    """Build the application; configuration errors stop here, before anything listens."""
    settings = settings or get_settings()
    configure_logging(settings.log_format, settings.log_level)
    tiers = load_tiers(settings.tiers_file)
    secret_key = settings.resolved_secret_key()
    recalc_cron = parse_cron(settings.recalc_cron, settings.timezone)
    engine = create_engine(settings)
    badges = BadgeCache(settings.badge_cache_size, settings.badge_cache_seconds)
    # Without notifications (SQLite) or room for badges, the cache never starts and every read goes to the database.
    badge_listener = (
        BadgeListener(
            badges,
            lambda: connect_outside_pool(engine, settings, "loyalty-badges"),
            probe_seconds=settings.poll_seconds,
            timeout_seconds=settings.db_timeout_seconds,
        )
        if engine.dialect.name == "postgresql" and settings.badge_cache_size > 0
        else None
    )
    session_maker = create_session_maker(engine, {CACHE_INFO_KEY: badges} if badge_listener else None)
    model_cache = ModelCache(ttl=settings.poll_seconds)
    metrics.POOLS.track(engine)
    metrics.BADGE_CACHES.track(badges)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        recalc_jobs = RecalcJobs(session_maker, tiers, recalc_cron, settings.recalc_lease_seconds, model_cache)
        offer_jobs = OfferJobs(session_maker, settings.timezone, settings.recalc_lease_seconds)
        webhook_jobs = WebhookJobs(session_maker, poll_seconds=settings.poll_seconds)
        statistics_jobs = StatisticsJobs(engine)
        timer = Timer(
            poll_seconds=settings.poll_seconds,
            poll_jobs=[
                *recalc_jobs.poll_jobs(),
                *offer_jobs.poll_jobs(),
                *webhook_jobs.poll_jobs(),
                *statistics_jobs.poll_jobs(),
            ],
            cron=recalc_cron,
            cron_jobs=recalc_jobs.cron_jobs(),
            timezone=settings.timezone,
        )
        if settings.scheduler_enabled:
            timer.start()
        if badge_listener is not None:
            badge_listener.start()
        app.state.timer = timer
        logger.info("started", extra={"database": engine.dialect.name, "tiers_config": tiers.config_hash[:12]})
        try:
            yield
        finally:
            await timer.stop()
            if badge_listener is not None:
                await badge_listener.stop()
            await app.state.order_groups.close()
            metrics.POOLS.forget(engine)
            metrics.BADGE_CACHES.forget(badges)
            await engine.dispose()

    # One limiter for the app: Litestar builds the middleware once per route, and a key's window spans them all.
    limiter = KeyRateLimiter(settings.rate_limit)
    config = AppConfig(
        route_handlers=[
            HealthController,
            ProblemController,
            MetricsController,
            CustomerController,
            ReportController,
            MeController,
            OrderController,
            EventController,
            ReferralController,
            RecalculationController,
            CustomerTierController,
            TierController,
            OfferController,
            CampaignController,
            CodeController,
            WebhookController,
            DashboardController,
            static_router,
            SchemaAssetsController,
        ],
        dependencies={"session": Provide(provide_session)},
        exception_handlers={Exception: handle_exception},
        middleware=[lambda app: RequestMiddleware(app, limiter)],
        # Field aliases are the API's names (a history item's `from`, a Python keyword).
        plugins=[PydanticPlugin(prefer_alias=True)],
        openapi_config=_openapi_config(),
        template_config=template_config(),
        lifespan=[lifespan],
        request_class=JsonRequest,
        request_max_body_size=settings.max_body_bytes,
        stores={RATE_LIMIT_STORE: MemoryStore()},
        debug=False,
        logging_config=None,
    )
    app = Litestar.from_config(config)
    document_routes(app)
    app.state.settings = settings
    app.state.tiers = tiers
    app.state.secret_key = secret_key
    app.state.engine = engine
    app.state.session_maker = session_maker
    app.state.read_session_maker = read_only(session_maker)
    app.state.model_cache = model_cache
    app.state.badges = badges
    app.state.badge_listener = badge_listener
    app.state.order_groups = OrderGroups(session_maker, tiers, model_cache)
    app.state.rate_limiter = limiter
    return app


def create_server_app(settings: Settings | None = None) -> Litestar:
    """``create_app`` for a process that serves it until it exits (``loyalty serve``'s factory, one per worker).

    Once started, the process settles its garbage collector (``collector.settle_after_startup``).
    """
    app = create_app(settings)
    app.on_startup.append(settle_after_startup)
    return app
