"""What the marketing dashboard shows, gathered from the existing reports, runs and campaign results."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.customers.reports import segments
from loyalty.db.models import RecalcRun
from loyalty.offers.results import campaign_results
from loyalty.offers.services import list_campaigns
from loyalty.recalc.services import list_runs, run_view
from loyalty.tiers.config import TiersConfig

# Enough history to see a trend without making the page slow; the API has the full lists.
RECENT_RUNS = 20
RECENT_CAMPAIGNS = 10


async def _last_applied_run(session: AsyncSession) -> dict[str, Any] | None:
    """The newest successful run that wrote tiers: a dry run's moves never happened."""
    run = await session.scalar(
        select(RecalcRun)
        .where(RecalcRun.status == "succeeded", RecalcRun.dry_run.is_(False))
        .order_by(RecalcRun.id.desc())
        .limit(1)
    )
    if run is None:
        return None
    view = run_view(run)
    return {"run_id": view.run_id, "finished_at": view.finished_at, "customers": view.customers, "moves": view.moves}


def _duration(started: datetime | None, finished: datetime | None) -> float | None:
    if started is None or finished is None:
        return None
    return round((finished - started).total_seconds(), 2)


async def dashboard_data(read_session_maker: async_sessionmaker[AsyncSession], tiers: TiersConfig) -> dict[str, Any]:
    """Everything the page draws, as JSON-ready values (dates as RFC 3339 strings)."""
    segment_list = await segments(read_session_maker, tiers)
    async with read_session_maker() as session:
        runs = (await list_runs(session, RECENT_RUNS, None)).items
        last_run = await _last_applied_run(session)
        campaigns = (await list_campaigns(session, RECENT_CAMPAIGNS, None)).items
        results = []
        for campaign in campaigns:
            outcome = await campaign_results(session, campaign.campaign_id)
            results.append(
                {
                    "campaign_id": campaign.campaign_id,
                    "name": campaign.name,
                    "status": campaign.status,
                    "tiers": campaign.tiers,
                    **outcome.model_dump(mode="json", exclude={"campaign_id"}),
                }
            )
        await session.rollback()
    tier_order: list[str] = [tier.id for tier in tiers.tier]
    return {
        "tiers": [{"id": tier.id, "name": tier.name} for tier in tiers.tier],
        "segments": segment_list.model_dump(mode="json"),
        "last_run": None if last_run is None else {**last_run, "finished_at": _iso(last_run["finished_at"])},
        # Sources include "none" (customers seen for the first time); targets follow the configured tier order.
        "move_sources": _move_sources(last_run, tier_order),
        "runs": [
            {
                "run_id": run.run_id,
                "trigger": run.trigger,
                "status": run.status,
                "dry_run": run.dry_run,
                "queued_at": _iso(run.queued_at),
                "duration_seconds": _duration(run.started_at, run.finished_at),
                "customers": run.customers,
                "error": run.error,
            }
            for run in runs
        ],
        "campaigns": results,
    }


def _iso(value: Any) -> str | None:
    return None if value is None else str(value.isoformat())


def _move_sources(last_run: dict[str, Any] | None, tier_order: list[str]) -> list[str]:
    if last_run is None:
        return []
    sources = set(last_run["moves"])
    known = [tier for tier in tier_order if tier in sources]
    return (["none"] if "none" in sources else []) + known + sorted(sources - set(known) - {"none"})


def heat_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The move matrix as table rows with a 0-5 intensity per cell, so the heat map needs no inline styles."""
    last_run = data["last_run"]
    if last_run is None:
        return []
    moves: dict[str, dict[str, int]] = last_run["moves"]
    peak = max((count for targets in moves.values() for count in targets.values()), default=0)
    names = {tier["id"]: tier["name"] for tier in data["tiers"]} | {"none": "New"}
    rows = []
    for source in data["move_sources"]:
        cells = []
        for tier in data["tiers"]:
            count = moves.get(source, {}).get(tier["id"], 0)
            level = 0 if not count or not peak else max(1, round(5 * count / peak))
            cells.append({"count": count, "level": level, "stay": source == tier["id"]})
        rows.append({"source": names.get(source, source), "cells": cells, "total": sum(moves[source].values())})
    return rows
