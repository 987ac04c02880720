"""Recalculation routes (scope `marketing`)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.status_codes import HTTP_202_ACCEPTED
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.access import guards
from loyalty.lib.errors import NOT_FOUND, RUN_IN_PROGRESS, problem_responses
from loyalty.lib.pagination import Cursor, IdPath, Limit, Page
from loyalty.recalc import schemas, services


class RecalculationController(Controller):
    path = "/v1/recalculations"
    tags = ["marketing"]
    guards = [guards.marketing]

    @post(
        "/",
        operation_id="RequestRecalculation",
        status_code=HTTP_202_ACCEPTED,
        responses=problem_responses(RUN_IN_PROGRESS),
    )
    async def request_recalculation(
        self,
        request: Request[Any, Any, Any],
        session: NamedDependency[AsyncSession],
        data: JSONBody[schemas.RecalculationCreate | None] = None,
    ) -> schemas.RunCreated:
        """Queue a full recalculation (optionally as of a past instant, or as a dry run); 409 if one is active."""
        body = data or schemas.RecalculationCreate()
        run_id = await services.request_run(session, body.as_of, body.dry_run)
        # Let this replica pick the run up at once instead of at its next poll.
        request.app.state.timer.run_soon("recalc.run_due")
        return schemas.RunCreated(run_id=run_id, status="queued")

    @get("/", operation_id="ListRecalculations")
    async def list_recalculations(
        self, session: NamedDependency[AsyncSession], limit: Limit = 50, cursor: Cursor = None
    ) -> Page[schemas.Run]:
        """Recalculation runs, newest first."""
        return await services.list_runs(session, limit, cursor)

    @get("/{run_id:int}", operation_id="GetRecalculation", responses=problem_responses(NOT_FOUND))
    async def get_recalculation(self, session: NamedDependency[AsyncSession], run_id: IdPath) -> schemas.Run:
        """One run: trigger, status, phases, counts, move matrix, fitted model."""
        return await services.get_run(session, run_id)
