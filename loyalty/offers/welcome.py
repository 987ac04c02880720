"""Welcome offers: entering a tier that names one issues a code, once per entry.

An entry is a tier history row that moved the customer into the tier (first placement, upgrade, or pin); a
customer held in the tier through a grace period has no new entry, so a bounce issues nothing again. The code's
unique `welcome_entry_id` makes a retried run issue nothing twice. Opted-out customers receive none.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import bindparam, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.db.dialect import json_object_sql, random_code_sql
from loyalty.db.models import Offer
from loyalty.db.types import DateTimeUTC
from loyalty.tiers.config import TiersConfig
from loyalty.webhooks.outbox import HistorySelection

ENTRY_KINDS = ("initial", "upgrade", "pinned")


async def issue_welcome_offers(
    session: AsyncSession, tiers: TiersConfig, selection: HistorySelection, now: datetime
) -> None:
    for tier in tiers.tier:
        if not tier.welcome_offer:
            continue
        offer = (
            await session.execute(
                select(Offer.id, Offer.valid_days, Offer.uses_per_code).where(Offer.name == tier.welcome_offer)
            )
        ).first()
        if offer is None:
            continue  # named in the config but not created yet: nothing to issue
        expires_at = now + timedelta(days=offer.valid_days)
        # Only our own SQL fragments are interpolated; every value is a bound parameter.
        codes = f"""
            INSERT INTO issued_code
                (code, offer_id, customer_id, welcome_entry_id, issued_at, expires_at, uses_left, status)
            SELECT {random_code_sql(session)}, :offer_id, h.customer_id, h.id, :now, :expires_at, :uses, 'active'
            FROM tier_history h JOIN customer c ON c.id = h.customer_id
            WHERE {selection.where()} AND h.to_tier = :tier AND h.kind IN ('initial', 'upgrade', 'pinned')
              AND NOT c.marketing_opt_out
            ON CONFLICT (welcome_entry_id) WHERE welcome_entry_id IS NOT NULL DO NOTHING
        """
        statement = selection.bind(
            text(codes).bindparams(bindparam("now", type_=DateTimeUTC()), bindparam("expires_at", type_=DateTimeUTC()))
        )
        params = {
            **selection.params(),
            "offer_id": offer.id,
            "now": now,
            "expires_at": expires_at,
            "uses": offer.uses_per_code,
            "tier": tier.id,
        }
        await session.execute(statement, params)
        payload = json_object_sql(
            session,
            [
                ("code", "ic.code"),
                ("customer_id", "c.external_id"),
                ("offer_id", "ic.offer_id"),
                ("tier", "h.to_tier"),
                ("expires_at", "CAST(:expires_text AS VARCHAR(40))"),
            ],
        )
        events = f"""
            INSERT INTO outbox_event (event_type, customer_id, dedupe_key, occurred_at, payload, created_at)
            SELECT 'offer.issued', ic.customer_id, 'offer.issued:' || ic.code, ic.issued_at, {payload}, :now
            FROM issued_code ic
            JOIN tier_history h ON h.id = ic.welcome_entry_id
            JOIN customer c ON c.id = ic.customer_id
            WHERE {selection.where()} AND h.to_tier = :tier
              AND ic.welcome_entry_id IS NOT NULL -- implied by the join; lets the planner use the partial index
            ON CONFLICT (dedupe_key) DO NOTHING
        """
        statement = selection.bind(text(events).bindparams(bindparam("now", type_=DateTimeUTC())))
        await session.execute(
            statement, {**selection.params(), "now": now, "tier": tier.id, "expires_text": expires_at.isoformat()}
        )
