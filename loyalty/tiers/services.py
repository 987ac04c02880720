"""Tier reads and changes outside a recalculation: the badge, the tier list, pins, previews."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from litestar.serialization import encode_json
from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from loyalty.db.dialect import bulk_upsert
from loyalty.db.models import Customer, CustomerScore, CustomerTier, RecalcRun, TierHistory
from loyalty.db.session import read_first, read_only
from loyalty.lib.clock import utcnow
from loyalty.lib.errors import NOT_FOUND, ProblemError, field_problem
from loyalty.offers.welcome import issue_welcome_offers
from loyalty.recalc.assignments import decide, facts_at
from loyalty.recalc.full import PhaseTimer, compute_population
from loyalty.tiers import schemas
from loyalty.tiers.badge_cache import BadgeCache
from loyalty.tiers.badge_cache import note_changed as note_badges_changed
from loyalty.tiers.config import FIGURES, TiersConfig
from loyalty.tiers.rules import CustomerFacts, decide_tier, describe_rule, pin_in_force
from loyalty.webhooks.outbox import HistorySelection, announce_tier_changes

PREVIEW_CHUNK = 20_000


def tier_list(tiers: TiersConfig) -> schemas.TierList:
    return schemas.TierList(
        items=[
            schemas.TierInfo(
                tier=tier.id,
                name=tier.name,
                rule_text=describe_rule(tier),
                benefits=list(tier.benefits),
                grace_days=tier.grace_days,
                welcome_offer=tier.welcome_offer,
            )
            for tier in tiers.tier
        ]
    )


_FIRST_ORDER = schemas.Progress(next_tier=None, text="place a first order", missing=[])


def badge_from_row(tiers: TiersConfig, external_id: str, row: Any) -> schemas.TierBadge:
    """The badge from a stored tier row (or a prospect's defaults when the customer was never scored)."""
    if row is None or row.tier is None:
        prospect = tiers.get("prospect")
        lowest = next((t.id for t in reversed(tiers.tier) if t.id != "prospect"), None)
        progress = _FIRST_ORDER.model_copy(update={"next_tier": lowest})
        return schemas.TierBadge(
            customer_id=external_id,
            tier="prospect",
            tier_name=prospect.name if prospect else "Prospect",
            since=row.created_at if row is not None else None,
            benefits=list(prospect.benefits) if prospect else [],
            next_tier=lowest,
            progress=progress,
            pinned_until=None,
        )
    tier = tiers.get(row.tier)
    progress = schemas.Progress.model_validate(row.progress or {"next_tier": None, "text": "", "missing": []})
    pinned = row.pinned_until if row.pinned_until and row.pinned_until > utcnow() else None
    return schemas.TierBadge(
        customer_id=external_id,
        tier=row.tier,
        tier_name=tier.name if tier else row.tier,
        since=row.since,
        benefits=list(tier.benefits) if tier else [],
        next_tier=progress.next_tier,
        progress=progress,
        pinned_until=pinned,
    )


# Built once: the badge is the storefront's hottest read, and building the statement (and adapting the cached
# compilation's result columns to a new statement object) cost more than running it. The customer's id is what
# the badge cache's notifications name.
_BADGE_QUERY = (
    select(
        Customer.id,
        Customer.created_at,
        CustomerTier.tier,
        CustomerTier.since,
        CustomerTier.progress,
        CustomerTier.pinned_until,
    )
    .outerjoin(CustomerTier, CustomerTier.customer_id == Customer.id)
    .where(Customer.external_id == bindparam("external_id"))
)


async def badge(session: AsyncSession, tiers: TiersConfig, external_id: str) -> schemas.TierBadge:
    """One indexed read: the customer's unique id joined to their tier row by primary key."""
    row = (await session.execute(_BADGE_QUERY, {"external_id": external_id})).first()
    return _found_badge(tiers, external_id, row)


async def storefront_badge_json(engine: AsyncEngine, tiers: TiersConfig, badges: BadgeCache, external_id: str) -> bytes:
    """The badge for the storefront's hottest call, as its JSON body: from the process's badge cache when it holds
    it, else the same read with no session, and on PostgreSQL no BEGIN/COMMIT round trips around the one
    statement (`read_first`). Encoded as the API encodes every model (by alias, JSON mode)."""
    body = badges.get(external_id)
    if body is not None:
        return body
    generation = badges.generation
    row: Any = await read_first(engine, _BADGE_QUERY, {"external_id": external_id})
    badge = _found_badge(tiers, external_id, row)
    body = encode_json(badge.model_dump(mode="json", by_alias=True))
    # A pin's end shows on the badge (pinned_until no longer given) with nothing written: keep it no longer.
    changes_in = (badge.pinned_until - utcnow()).total_seconds() if badge.pinned_until is not None else None
    badges.put(external_id, row.id, body, generation, changes_in)
    return body


def _found_badge(tiers: TiersConfig, external_id: str, row: Any) -> schemas.TierBadge:
    if row is None:
        raise ProblemError(NOT_FOUND, f"No customer with customer_id {external_id!r}")
    return badge_from_row(tiers, external_id, row)


async def _customer_id(session: AsyncSession, external_id: str) -> int:
    """The customer's internal id, locked as the real-time re-score locks it (NO KEY UPDATE; nothing on SQLite).

    A pin reads the stored tier and then writes it with a history entry starting from it: without the lock, a
    re-score committing in between made that entry start from the tier before the re-score's change.
    """
    customer_id = await session.scalar(
        select(Customer.id).where(Customer.external_id == external_id).with_for_update(key_share=True, of=Customer)
    )
    if customer_id is None:
        raise ProblemError(NOT_FOUND, f"No customer with customer_id {external_id!r}")
    return customer_id


async def set_pin(
    session: AsyncSession, tiers: TiersConfig, external_id: str, pin: schemas.TierPin
) -> schemas.TierBadge:
    """Pin a tier until a date: it wins over the rules at once, and is recorded in the history."""
    now = utcnow()
    if pin.until <= now:
        raise field_problem("until", "must be in the future")
    if tiers.get(pin.tier) is None:
        raise field_problem("tier", f"is not a tier of the current configuration ({pin.tier})")
    customer_id = await _customer_id(session, external_id)
    current = (
        await session.execute(
            select(CustomerTier.tier, CustomerTier.since, CustomerTier.qualified_tier, CustomerTier.progress).where(
                CustomerTier.customer_id == customer_id
            )
        )
    ).first()
    previous_tier = current.tier if current else None
    changed = previous_tier != pin.tier
    note_badges_changed(session, [customer_id])
    await bulk_upsert(
        session,
        CustomerTier,
        [
            {
                "customer_id": customer_id,
                "tier": pin.tier,
                "since": now if changed or current is None else current.since,
                "qualified_tier": current.qualified_tier if current else "prospect",
                "below_since": None,
                "explanation": f"Pinned by marketing until {pin.until.date().isoformat()}: {pin.reason}",
                "progress": current.progress if current else {},
                "pinned_tier": pin.tier,
                "pinned_until": pin.until,
                "pin_reason": pin.reason,
                "updated_at": now,
            }
        ],
        ["customer_id"],
    )
    session.add(
        TierHistory(
            customer_id=customer_id,
            from_tier=previous_tier,
            to_tier=pin.tier,
            at=now,
            kind="pinned",
            reason=f"pinned by marketing until {pin.until.isoformat()}: {pin.reason}",
        )
    )
    await session.flush()
    selection = HistorySelection(customer_ids=[customer_id], at=now)
    await announce_tier_changes(session, selection, now)
    await issue_welcome_offers(session, tiers, selection, now)
    return await badge(session, tiers, external_id)


async def remove_pin(session: AsyncSession, external_id: str) -> int:
    """Remove a pin; the customer goes back to the tier the rules gave them, at once. Answers the internal id."""
    customer_id = await _customer_id(session, external_id)
    row = (
        await session.execute(
            select(CustomerTier.tier, CustomerTier.qualified_tier, CustomerTier.pinned_tier).where(
                CustomerTier.customer_id == customer_id
            )
        )
    ).first()
    if row is None or row.pinned_tier is None:
        raise ProblemError(NOT_FOUND, f"Customer {external_id!r} has no tier pin")
    now = utcnow()
    note_badges_changed(session, [customer_id])
    await session.execute(
        update(CustomerTier)
        .where(CustomerTier.customer_id == customer_id)
        .values(
            tier=row.qualified_tier,
            since=now if row.qualified_tier != row.tier else CustomerTier.since,
            pinned_tier=None,
            pinned_until=None,
            pin_reason=None,
            below_since=None,
            updated_at=now,
        )
    )
    if row.qualified_tier != row.tier:
        session.add(
            TierHistory(
                customer_id=customer_id,
                from_tier=row.tier,
                to_tier=row.qualified_tier,
                at=now,
                kind="unpinned",
                reason="pin removed by marketing; the tier the rules give applies again",
            )
        )
        await session.flush()
        await announce_tier_changes(session, HistorySelection(customer_ids=[customer_id], at=now), now)
    return customer_id


async def history(session: AsyncSession, customer_id: int, limit: int = 500) -> list[schemas.HistoryItem]:
    rows = await session.scalars(
        select(TierHistory)
        .where(TierHistory.customer_id == customer_id)
        .order_by(TierHistory.at.desc(), TierHistory.id.desc())
        .limit(limit)
    )
    return [
        schemas.HistoryItem.model_validate(
            {"from": row.from_tier, "to": row.to_tier, "at": row.at, "reason": row.reason, "kind": row.kind}
        )
        for row in rows
    ]


async def preview(
    session_maker: async_sessionmaker[AsyncSession], current: TiersConfig, candidate: TiersConfig
) -> schemas.PreviewResult:
    """How many customers would move between each pair of tiers under ``candidate``; nothing is written.

    With the same `[scoring]` section, the candidate's rules are applied to the stored scores and figures of the
    last run; a changed `[scoring]` section changes the scores themselves, so they are recomputed (reads only).
    Pins in force are respected; grace periods are not (a preview shows where the rules put customers).
    """
    moves: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    now = utcnow()
    reader = read_only(session_maker)
    async with reader() as session:
        last_run = await session.scalar(
            select(RecalcRun.id)
            .where(RecalcRun.status == "succeeded", RecalcRun.dry_run.is_(False))
            .order_by(RecalcRun.finished_at.desc())
            .limit(1)
        )
        pins = {
            row.customer_id: (row.tier, row.pinned_tier, row.pinned_until)
            for row in await session.execute(
                select(CustomerTier.customer_id, CustomerTier.tier, CustomerTier.pinned_tier, CustomerTier.pinned_until)
            )
        }
        await session.rollback()
    customers = 0
    if candidate.scoring == current.scoring:
        async with reader() as session:
            result = await session.stream(select(CustomerScore).execution_options(yield_per=PREVIEW_CHUNK))
            async for score in result.scalars():
                customers += 1
                facts = _stored_facts(score)
                _count(moves, candidate, pins.get(score.customer_id), decide_tier(candidate, facts), now)
            await session.rollback()
    else:
        population = await compute_population(session_maker, now, candidate.scoring, PhaseTimer())
        for position, customer_id in enumerate(population.figures.customer_id.tolist()):
            customers += 1
            facts, raw = facts_at(position, population.figures, population.referrals, population.scores)
            decision = decide(candidate, facts, raw, population.cutoffs)
            _count(moves, candidate, pins.get(customer_id), decision.tier, now)
    return schemas.PreviewResult(
        moves={source: dict(targets) for source, targets in moves.items()},
        customers=customers,
        config_hash=candidate.config_hash,
        based_on_run=last_run,
    )


def _stored_facts(score: CustomerScore) -> CustomerFacts:
    figures: dict[str, float] = {}
    for name in FIGURES:
        value = getattr(score, name, None)
        if value is not None:
            figures[name] = float(value)
    return CustomerFacts(
        paid_orders=score.paid_orders,
        scores={"value": score.value_score, "frequency": score.frequency_score, "influence": score.influence_score},
        figures=figures,
    )


def _count(
    moves: dict[str, dict[str, int]],
    candidate: TiersConfig,
    stored: tuple[str, str | None, datetime | None] | None,
    tier: str,
    now: datetime,
) -> None:
    current = stored[0] if stored else "prospect"
    # As a recalculation under the candidate would: a pin to a tier the candidate drops no longer holds.
    if stored and pin_in_force(candidate, stored[1], stored[2], now):
        tier = stored[1] or tier
    moves[current][tier] += 1
