"""Real-time re-scoring: an order, refund or referral updates that customer (and referrers) in the same request.

It uses the parameters and percentile cut-offs of the last full run, so a single customer is placed on the same
scale as everyone else without refitting. It never downgrades: downgrades wait for a full run and its grace.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.db.dialect import bulk_upsert, is_postgres
from loyalty.db.models import Customer, CustomerScore, CustomerTier, RecalcRun, Referral, TierHistory
from loyalty.lib.clock import utcnow
from loyalty.offers.welcome import issue_welcome_offers
from loyalty.ops import metrics
from loyalty.recalc.assignments import place_customer
from loyalty.scoring.figures import load_figures, load_interests, load_referral_edges, referral_figures
from loyalty.scoring.scores import ScoringModel, rank_on_cutoffs, score_inputs
from loyalty.tiers.config import TiersConfig
from loyalty.webhooks.outbox import HistorySelection, announce_tier_changes


@dataclass
class ModelCache:
    """The last full run's model, re-read at most every ``ttl`` seconds per process."""

    ttl: float = 5.0
    _model: ScoringModel | None = None
    _run_id: int | None = None
    _read_at: float = field(default=-1e9)

    async def get(self, session: AsyncSession) -> tuple[ScoringModel, int | None]:
        if self._model is None or time.monotonic() - self._read_at > self.ttl:
            row = (
                await session.execute(
                    select(RecalcRun.id, RecalcRun.model, RecalcRun.cutoffs)
                    .where(RecalcRun.status == "succeeded", RecalcRun.dry_run.is_(False))
                    .order_by(RecalcRun.finished_at.desc())
                    .limit(1)
                )
            ).first()
            if row is None:
                self._model, self._run_id = ScoringModel.initial(), None
            else:
                self._model, self._run_id = ScoringModel.from_record(row.model, row.cutoffs), row.id
            self._read_at = time.monotonic()
        return self._model, self._run_id

    def invalidate(self) -> None:
        self._model = None


async def referrers_of(session: AsyncSession, customer_ids: Sequence[int]) -> list[int]:
    """Up to two levels of referrers: their influence counts these customers' spending."""
    first = list(
        (await session.scalars(select(Referral.referrer_id).where(Referral.referee_id.in_(customer_ids)))).all()
    )
    if not first:
        return []
    second = list((await session.scalars(select(Referral.referrer_id).where(Referral.referee_id.in_(first)))).all())
    return sorted(set(first) | set(second))


async def rescore(
    session: AsyncSession, customer_ids: Sequence[int], tiers: TiersConfig, cache: ModelCache
) -> dict[int, str]:
    """Re-score the given customers now and return their tiers; upgrades apply at once."""
    ids = sorted(set(customer_ids))
    if not ids:
        return {}
    began = time.perf_counter()
    # Lock the customers (in id order, so two requests never wait on each other in a cycle): a concurrent
    # order for the same customer then waits, and its figures include ours. NO KEY UPDATE, not UPDATE: the
    # order just inserted holds KEY SHARE on its customer (the foreign key), which UPDATE would wait on.
    locked = select(Customer.id).where(Customer.id.in_(ids)).order_by(Customer.id)
    if is_postgres(session):
        locked = locked.with_for_update(key_share=True)
    await session.execute(locked)

    now = utcnow()
    config = tiers.scoring
    model, _run_id = await cache.get(session)
    figures = await load_figures(session, now, config, ids)
    referrers, referees = await load_referral_edges(session, now, ids)
    referee_figures = (
        await load_figures(session, now, config, sorted(set(referees.tolist()))) if referees.size else None
    )
    referrals = referral_figures(figures, referrers, referees, config.second_level_decay, referee_figures)
    interests = await load_interests(session, now, config, ids)
    scores = score_inputs(figures, referrals, model.bgnbd, model.gamma_gamma, config, model.mean_order_value)
    rank_on_cutoffs(scores, figures.scored, model.cutoffs)

    stored = {
        row.customer_id: row
        for row in await session.execute(
            select(
                CustomerTier.customer_id,
                CustomerTier.tier,
                CustomerTier.since,
                CustomerTier.below_since,
                CustomerTier.pinned_tier,
                CustomerTier.pinned_until,
                CustomerTier.pin_reason,
                CustomerTier.updated_at,
            ).where(CustomerTier.customer_id.in_(ids))
        )
    }
    previous_runs = dict(
        (
            await session.execute(
                select(CustomerScore.customer_id, CustomerScore.run_id).where(CustomerScore.customer_id.in_(ids))
            )
        ).all()
    )
    tiers_now: dict[int, str] = {}
    score_rows, tier_rows, history_rows = [], [], []
    for position, customer_id in enumerate(figures.customer_id.tolist()):
        placement = place_customer(
            tiers,
            position,
            (figures, referrals, scores, model.cutoffs),
            interests.get(customer_id, []),
            stored.get(customer_id),
            as_of=now,
            now=now,
            allow_downgrade=False,
            score_run_id=previous_runs.get(customer_id),
            history_run_id=None,
        )
        tiers_now[customer_id] = placement.assignment.tier
        score_rows.append(placement.score)
        tier_rows.append(placement.tier)
        if placement.history is not None:
            history_rows.append(placement.history)
    await bulk_upsert(session, CustomerScore, score_rows, ["customer_id"])
    await bulk_upsert(session, CustomerTier, tier_rows, ["customer_id"])
    if history_rows:
        await session.execute(insert(TierHistory), history_rows)
        selection = HistorySelection(customer_ids=[row["customer_id"] for row in history_rows], at=now)
        await announce_tier_changes(session, selection, now)
        await issue_welcome_offers(session, tiers, selection, now)
    metrics.record_rescore(len(ids), time.perf_counter() - began)
    return tiers_now


async def rescore_after_write(
    session: AsyncSession, customer_ids: Sequence[int], tiers: TiersConfig, cache: ModelCache
) -> dict[int, str]:
    """Re-score customers whose activity changed, and those whose influence counts it (their referrers)."""
    affected = set(customer_ids) | set(await referrers_of(session, customer_ids))
    return await rescore(session, sorted(affected), tiers, cache)


async def current_tiers(session: AsyncSession, customer_ids: Sequence[int]) -> dict[int, str]:
    """Stored tiers; a customer never scored is a prospect."""
    found = dict(
        (
            await session.execute(
                select(CustomerTier.customer_id, CustomerTier.tier).where(CustomerTier.customer_id.in_(customer_ids))
            )
        ).all()
    )
    return {customer_id: found.get(customer_id, "prospect") for customer_id in customer_ids}
