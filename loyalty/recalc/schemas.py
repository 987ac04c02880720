"""Recalculation request and run record shapes (API.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, Field, field_validator

from loyalty.lib.clock import EARLIEST, utcnow
from loyalty.lib.schemas import Schema


class RecalculationCreate(Schema):
    as_of: AwareDatetime | None = Field(
        default=None, description="Replay as of this instant (orders after it ignored)."
    )
    dry_run: bool = Field(default=False, description="Compute and record the run without writing scores or tiers.")

    @field_validator("as_of")
    @classmethod
    def _not_future(cls, value: datetime | None) -> datetime | None:
        if value is not None and not (EARLIEST <= value <= utcnow()):
            raise ValueError("must be between 1970-01-01 and now")
        return value


class RunCreated(Schema):
    run_id: int
    status: str


class Run(Schema):
    run_id: int
    trigger: Literal["manual", "scheduled", "retry"]
    status: Literal["queued", "running", "succeeded", "failed"]
    as_of: datetime | None
    dry_run: bool
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    phases: dict[str, float]
    customers: int
    moves: dict[str, dict[str, int]]
    config_hash: str | None
    model: dict[str, Any]
    error: str | None
    attempts: int
    retry_of: int | None
