"""Every Prometheus metric of the service's own work, defined once, in the registry `/metrics` serves.

The metrics live at module import, so building the application many times (as the tests do) never registers a
name twice. Request metrics are recorded by `loyalty.lib.middleware.RequestMiddleware` through `REQUEST_METRICS`;
the others cover the work that happens outside a request's own timing: recalculation runs, campaign sends, webhook
deliveries, real-time re-scores, and the database connection pools, read at scrape time.

Recording goes through the small functions below: each swallows (and logs) its own errors, because a metric
must never fail the request or the job it observes.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, ParamSpec, TypeVar

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncEngine

logger = logging.getLogger("loyalty.metrics")
P = ParamSpec("P")
T = TypeVar("T")

# Runs take from well under a second (a small shop) to many minutes (millions of customers).
RUN_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# Sends start on the next poll after they come due: seconds normally, hours when no replica was running.
LATENESS_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 900, 3600, 6 * 3600, 24 * 3600)
# A webhook attempt is bounded by its timeout (5 s by default).
DELIVERY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# A re-score runs inside an order request, so it is measured on the request scale.
RESCORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

RECALC_RUNS = Counter(
    "loyalty_recalc_runs_total",
    "Full recalculation runs carried out, by trigger and final status.",
    ["trigger", "status"],
)
RECALC_RUN_DURATION = Histogram(
    "loyalty_recalc_run_duration_seconds",
    "Wall time of a full recalculation run, from claim to its final status.",
    ["status"],
    buckets=RUN_BUCKETS,
)
RECALC_PHASE_DURATION = Histogram(
    "loyalty_recalc_phase_duration_seconds",
    "Time spent in each phase of a full run (aggregate, fit, score, rules, write, effects).",
    ["phase"],
    buckets=RUN_BUCKETS,
)
RECALC_LAST_RUN_PHASE = Gauge(
    "loyalty_recalc_last_run_phase_seconds", "Each phase's time in the last finished run of this process.", ["phase"]
)
RECALC_LAST_RUN_CUSTOMERS = Gauge(
    "loyalty_recalc_last_run_customers", "Customers scored by the last successful run of this process."
)
RECALC_MODEL_FALLBACKS = Counter(
    "loyalty_recalc_model_fallbacks_total",
    "Runs whose model fit fell back to default parameters, by model (bgnbd, gamma_gamma).",
    ["model"],
)

CAMPAIGN_SENDS = Counter(
    "loyalty_campaign_sends_total", "Campaign sends carried out, by outcome (done, cancelled, failed).", ["outcome"]
)
CAMPAIGN_CODES_ISSUED = Counter("loyalty_campaign_codes_issued_total", "Offer codes issued by campaign sends.")
CAMPAIGN_HOLDOUT_MEMBERS = Counter(
    "loyalty_campaign_holdout_members_total", "Campaign members kept in the holdout group (no code)."
)
CAMPAIGN_SEND_LATENESS = Histogram(
    "loyalty_campaign_send_lateness_seconds",
    "How long after its scheduled occurrence a send started.",
    buckets=LATENESS_BUCKETS,
)

WEBHOOK_ATTEMPTS = Counter(
    "loyalty_webhook_attempts_total",
    "Webhook delivery attempts, by the delivery's resulting status (delivered, failed, dead).",
    ["outcome"],
)
WEBHOOK_ATTEMPT_DURATION = Histogram(
    "loyalty_webhook_attempt_duration_seconds",
    "Time of one webhook attempt, from sending to the receiver's answer (or the timeout).",
    buckets=DELIVERY_BUCKETS,
)

RESCORE_CALLS = Counter("loyalty_rescore_calls_total", "Real-time re-scores (orders, refunds, referrals, pins).")
RESCORE_CUSTOMERS = Counter("loyalty_rescore_customers_total", "Customers re-scored in real time.")
RESCORE_DURATION = Histogram(
    "loyalty_rescore_duration_seconds", "Time of one real-time re-score, inside its request.", buckets=RESCORE_BUCKETS
)

ORDER_GROUPS = Histogram(
    "loyalty_order_group_orders",
    "Single orders (POST /v1/orders) written together in one transaction (group commit).",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)


# Named, described and labelled as litestar's PrometheusMiddleware (prefix `loyalty`) named them before the request
# middleware took them over, so dashboards and alerts keep working.
REQUEST_LABELS = ("method", "path", "status_code", "app_name")
APP_NAME = "loyalty"
REQUESTS = Counter("loyalty_requests_total", "Total requests", REQUEST_LABELS)
REQUEST_ERRORS = Counter("loyalty_requests_error_total", "Total errors in requests", REQUEST_LABELS)
REQUEST_DURATION = Histogram("loyalty_request_duration_seconds", "Request duration, in seconds", REQUEST_LABELS)
REQUESTS_IN_PROGRESS = Gauge(
    "loyalty_requests_in_progress",
    "Total requests currently in progress",
    REQUEST_LABELS,
    multiprocess_mode="livesum",
)


class RequestMetrics:
    """Records the request metrics, labelled by method, route path template and status.

    Each label combination's children are looked up once and kept: `labels()` checks and converts its values and
    takes a lock on every call, four times a request. There are as many combinations as the metrics hold anyway.
    """

    def __init__(self) -> None:
        self._in_progress: dict[tuple[str, str], Any] = {}
        self._finished: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}

    def _gauge(self, method: str, path: str) -> Any:
        child = self._in_progress.get((method, path))
        if child is None:
            # Litestar labelled requests in progress with the status they start with: 200.
            child = self._in_progress[(method, path)] = REQUESTS_IN_PROGRESS.labels(method, path, 200, APP_NAME)
        return child

    def started(self, method: str, path: str) -> None:
        self._gauge(method, path).inc()

    def finished(self, method: str, path: str, status: int, seconds: float) -> None:
        self._gauge(method, path).dec()
        children = self._finished.get((method, path, status))
        if children is None:
            labels = (method, path, status, APP_NAME)
            errors = REQUEST_ERRORS.labels(*labels) if status >= 500 else None
            children = (REQUESTS.labels(*labels), REQUEST_DURATION.labels(*labels), errors)
            self._finished[(method, path, status)] = children
        requests, duration, errors = children
        requests.inc()
        duration.observe(seconds)
        if errors is not None:
            errors.inc()


REQUEST_METRICS = RequestMetrics()


def never_raises(function: Callable[P, None]) -> Callable[P, None]:
    """Log, rather than raise, any error while recording: observability must not break what it observes."""

    @functools.wraps(function)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            function(*args, **kwargs)
        except Exception:
            logger.exception("recording a metric failed", extra={"metric_function": function.__name__})

    return guarded


@never_raises
def record_run(trigger: str, status: str, seconds: float, phases: Mapping[str, float], customers: int | None) -> None:
    RECALC_RUNS.labels(trigger=trigger, status=status).inc()
    RECALC_RUN_DURATION.labels(status=status).observe(seconds)
    for phase, phase_seconds in phases.items():
        RECALC_PHASE_DURATION.labels(phase=phase).observe(phase_seconds)
        RECALC_LAST_RUN_PHASE.labels(phase=phase).set(phase_seconds)
    if customers is not None:
        RECALC_LAST_RUN_CUSTOMERS.set(customers)


@never_raises
def record_fallback(fallback: str | None) -> None:
    # The run record's `fallback` is "bgnbd: reason; gamma_gamma: reason" with either part absent.
    for model in ("bgnbd", "gamma_gamma"):
        if fallback and f"{model}: " in fallback:
            RECALC_MODEL_FALLBACKS.labels(model=model).inc()


@never_raises
def record_send(outcome: str, issued: int = 0, holdout: int = 0, late_seconds: float | None = None) -> None:
    CAMPAIGN_SENDS.labels(outcome=outcome).inc()
    CAMPAIGN_CODES_ISSUED.inc(issued)
    CAMPAIGN_HOLDOUT_MEMBERS.inc(holdout)
    if late_seconds is not None:
        CAMPAIGN_SEND_LATENESS.observe(late_seconds)


@never_raises
def record_webhook_attempts(outcome: str, number: int = 1) -> None:
    WEBHOOK_ATTEMPTS.labels(outcome=outcome).inc(number)


@never_raises
def record_webhook_duration(seconds: float) -> None:
    WEBHOOK_ATTEMPT_DURATION.observe(seconds)


@never_raises
def record_rescore(customers: int, seconds: float) -> None:
    RESCORE_CALLS.inc()
    RESCORE_CUSTOMERS.inc(customers)
    RESCORE_DURATION.observe(seconds)


@never_raises
def record_order_group(orders: int) -> None:
    ORDER_GROUPS.observe(orders)


class _TrackingCollector(Collector, Generic[T]):
    """A collector of what the running applications hold, read at scrape time.

    What it tracks is held weakly and dropped on application shutdown, so the many applications a test run builds
    leave nothing behind; one collector serves them all, so nothing is registered twice.
    """

    def __init__(self) -> None:
        self._tracked: weakref.WeakSet[T] = weakref.WeakSet()
        self._lock = threading.Lock()

    def track(self, item: T) -> None:
        with self._lock:
            self._tracked.add(item)

    def forget(self, item: T) -> None:
        with self._lock:
            self._tracked.discard(item)

    def tracked(self) -> list[T]:
        with self._lock:
            return list(self._tracked)


class PoolCollector(_TrackingCollector[AsyncEngine]):
    """Reads the connection pools of the tracked engines at scrape time, summed per database dialect."""

    def _totals(self) -> dict[str, dict[str, float]]:
        engines = self.tracked()
        totals: dict[str, dict[str, float]] = {}
        for engine in engines:
            pool: Any = engine.sync_engine.pool
            # Pools without a fixed size (NullPool, StaticPool) have none of these; they report nothing.
            if not all(hasattr(pool, name) for name in ("size", "checkedout", "overflow")):
                continue
            figures = totals.setdefault(engine.dialect.name, {"size": 0.0, "checked_out": 0.0, "overflow": 0.0})
            figures["size"] += pool.size()
            figures["checked_out"] += pool.checkedout()
            # Negative while the pool has not yet opened all of its `size` connections; only excess counts.
            figures["overflow"] += max(0, pool.overflow())
        return totals

    def collect(self) -> Iterable[Metric]:
        families = {
            "size": GaugeMetricFamily(
                "loyalty_db_pool_size_connections", "Configured size of the database pools.", labels=["dialect"]
            ),
            "checked_out": GaugeMetricFamily(
                "loyalty_db_pool_checked_out_connections", "Connections currently in use.", labels=["dialect"]
            ),
            "overflow": GaugeMetricFamily(
                "loyalty_db_pool_overflow_connections",
                "Connections open beyond the pool size (up to its max overflow).",
                labels=["dialect"],
            ),
        }
        try:
            totals = self._totals()
        except Exception:
            logger.exception("reading the database pools failed")
            totals = {}
        for dialect, figures in totals.items():
            for name, family in families.items():
                family.add_metric([dialect], figures[name])
        yield from families.values()

    def describe(self) -> Iterable[Metric]:
        # Describing without reading the pools lets the registry check names once, at registration.
        return [
            GaugeMetricFamily("loyalty_db_pool_size_connections", "", labels=["dialect"]),
            GaugeMetricFamily("loyalty_db_pool_checked_out_connections", "", labels=["dialect"]),
            GaugeMetricFamily("loyalty_db_pool_overflow_connections", "", labels=["dialect"]),
        ]


POOLS = PoolCollector()
REGISTRY.register(POOLS)


class BadgeCacheCollector(_TrackingCollector[Any]):
    """Reads the badge caches of the running applications at scrape time (``loyalty.tiers.badge_cache``).

    The caches count their own hits and misses as plain integers: the badge read is the hottest path, and a
    Prometheus counter's lock on every read would cost more than the cache's lookup.
    """

    def collect(self) -> Iterable[Metric]:
        caches = self.tracked()
        reads = CounterMetricFamily(
            "loyalty_badge_cache_reads", "Badge reads while the cache served, by result.", labels=["result"]
        )
        reads.add_metric(["hit"], sum(cache.hits for cache in caches))
        reads.add_metric(["miss"], sum(cache.misses for cache in caches))
        yield reads
        yield GaugeMetricFamily("loyalty_badge_cache_entries", "Badges held in memory.", sum(map(len, caches)))
        yield GaugeMetricFamily(
            "loyalty_badge_cache_listening",
            "Caches serving badges (their notification connection is listening).",
            sum(cache.listening for cache in caches),
        )

    def describe(self) -> Iterable[Metric]:
        return [
            CounterMetricFamily("loyalty_badge_cache_reads", "", labels=["result"]),
            GaugeMetricFamily("loyalty_badge_cache_entries", ""),
            GaugeMetricFamily("loyalty_badge_cache_listening", ""),
        ]


BADGE_CACHES = BadgeCacheCollector()
REGISTRY.register(BADGE_CACHES)
