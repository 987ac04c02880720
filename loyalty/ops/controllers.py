"""Operations routes (no key): health, metrics, problem type documentation."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from litestar import Controller, MediaType, Request, Response, get
from litestar.openapi import ResponseSpec
from litestar.params import Parameter
from litestar.plugins.prometheus import PrometheusController
from sqlalchemy import text

from loyalty.db.migrate import current_revision, head_revision
from loyalty.lib.errors import NOT_FOUND, PROBLEM_KINDS, ProblemError, problem_responses


class HealthController(Controller):
    path = "/health"
    tags = ["operations"]
    include_in_schema = True

    @get("/live", operation_id="Live", cache_control=None)
    async def live(self) -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @get(
        "/ready",
        operation_id="Ready",
        responses={
            503: ResponseSpec(
                dict[str, Any],
                generate_examples=False,
                description="Not ready: the database is unreachable or not at the latest migration (a status "
                "document for probes, not a problem document).",
            )
        },
    )
    async def ready(self, request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        """The database is reachable and at the latest migration."""
        engine = request.app.state.engine
        try:
            async with asyncio.timeout(request.app.state.settings.db_timeout_seconds):
                async with engine.connect() as connection:
                    await connection.execute(text("SELECT 1"))
                revision = await current_revision(engine)
        except Exception as error:  # any failure to reach the database means "not ready", never a 500
            return Response(
                {"status": "unavailable", "database": "unreachable", "error": type(error).__name__}, status_code=503
            )
        head = head_revision()
        if revision != head:
            return Response(
                {"status": "unavailable", "database": "reachable", "migration": revision, "expected": head},
                status_code=503,
            )
        return Response({"status": "ok", "database": "reachable", "migration": revision})


class ProblemController(Controller):
    path = "/problems"
    tags = ["operations"]

    @get("/", operation_id="ListProblemTypes")
    async def list_problems(self) -> dict[str, list[dict[str, Any]]]:
        """Every problem type the API answers with."""
        return {
            "items": [
                {"type": kind.type_uri, "title": kind.title, "status": kind.status, "description": kind.description}
                for kind in PROBLEM_KINDS.values()
            ]
        }

    @get("/{slug:str}", operation_id="GetProblemType", responses=problem_responses(NOT_FOUND))
    async def get_problem(self, slug: str = Parameter(max_length=64)) -> dict[str, Any]:
        """What one problem type means."""
        kind = PROBLEM_KINDS.get(slug)
        if kind is None:
            raise ProblemError(NOT_FOUND, f"No problem type {slug!r}")
        return {"type": kind.type_uri, "title": kind.title, "status": kind.status, "description": kind.description}


class MetricsController(PrometheusController):
    """Litestar's Prometheus endpoint, documented as what it serves: the text exposition format, not JSON."""

    tags = ["operations"]

    @get(operation_id="Metrics", summary="Prometheus metrics", media_type=MediaType.TEXT)
    async def get(self) -> Response[bytes]:
        """Prometheus metrics (no key: expose it to the scraper, not to the internet)."""
        return cast("Response[bytes]", await PrometheusController.get.fn(self))
