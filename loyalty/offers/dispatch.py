"""Campaign dispatch: due occurrences become leased sends; a send issues its codes in set-based statements.

Every effect has a unique key — one member row and one code per send and customer, one outbox event per code —
so a retried, duplicated or taken-over send issues nothing twice. The holdout split is a deterministic hash of
campaign and customer: a retry, and every occurrence of a recurring campaign, makes the same split.
"""

from __future__ import annotations

import functools
import logging
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import TextClause, bindparam, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.db.dialect import (
    advisory_lock,
    insert_ignoring_conflicts,
    is_postgres,
    json_object_sql,
    random_code_sql,
)
from loyalty.db.models import Campaign, CampaignMember, CampaignSend, IssuedCode, Offer
from loyalty.db.session import transaction
from loyalty.db.types import DateTimeUTC
from loyalty.lib.clock import utcnow
from loyalty.offers.services import next_fire
from loyalty.ops import metrics
from loyalty.scheduling.leases import WORKER_ID, LeaseLostError, keep_lease, renew_claim
from loyalty.scheduling.timer import CronError, Job

logger = logging.getLogger("loyalty.offers")

# The split hashes (customer, campaign) onto 0..HASH_MODULUS-1; a customer is in the holdout below the cut.
HASH_MODULUS = 1_000_003
SENDS_PER_POLL = 10

# Who a send reaches, and on which side of the split. The scores are joined only for a campaign with a score
# filter: scores are 0-100, so an unset filter (">= 0") passes everyone, and the join would read every score row.
_ELIGIBLE_SQL = """
SELECT c.id AS customer_id, c.external_id,
       CASE WHEN (c.id * 2654435761 + CAST(:campaign_id AS BIGINT) * 97531) % {modulus} < :holdout_cut
            THEN {true} ELSE {false} END AS holdout
FROM customer_tier t
JOIN customer c ON c.id = t.customer_id
{score_join}
WHERE t.tier IN :tiers
  AND NOT c.marketing_opt_out
  AND c.external_id IS NOT NULL
  {score_filters}
"""

SCORE_FILTERS = (
    ("min_value_score", "value_score"),
    ("min_frequency_score", "frequency_score"),
    ("min_influence_score", "influence_score"),
)

_MEMBERS_SQL = """
INSERT INTO campaign_member (send_id, customer_id, campaign_id, holdout)
SELECT CAST(:send_id AS BIGINT), e.customer_id, CAST(:campaign_id AS BIGINT), e.holdout
FROM ({eligible}) e
WHERE 1 = 1 -- SQLite reads "FROM ... ON" as a join without a WHERE in between
ON CONFLICT (send_id, customer_id) DO NOTHING
"""

_CODES_SQL = """
INSERT INTO issued_code (code, offer_id, customer_id, campaign_id, send_id, issued_at, expires_at, uses_left, status)
SELECT {code}, CAST(:offer_id AS BIGINT), m.customer_id, CAST(:campaign_id AS BIGINT), CAST(:send_id AS BIGINT),
       :now, :expires_at, :uses, 'active'
FROM campaign_member m
WHERE m.send_id = CAST(:send_id AS BIGINT) AND NOT m.holdout
ON CONFLICT (send_id, customer_id) DO NOTHING
"""

_ISSUED_EVENTS_SQL = """
INSERT INTO outbox_event (event_type, customer_id, dedupe_key, occurred_at, payload, created_at)
SELECT 'offer.issued', ic.customer_id, 'offer.issued:' || ic.code, ic.issued_at, {payload}, :now
FROM issued_code ic JOIN customer c ON c.id = ic.customer_id
WHERE ic.send_id = :send_id
ON CONFLICT (dedupe_key) DO NOTHING
"""

# PostgreSQL does all three in one statement, on a send that has no members yet (dispatch_send makes sure, under
# the send's lock): so nothing conflicts and nothing is read back. Plain inserts, not ON CONFLICT, whose speculative
# insertion costs an index probe and a WAL record per row; the keys stay unique all the same, so a writer that got
# around the lock would fail, not issue twice. Each code is drawn once, in `eligible`, and both the code row and its
# event take it from there.
_ISSUE_ALL_SQL = """
WITH eligible AS MATERIALIZED (
    SELECT e.customer_id, e.external_id, e.holdout, {code} AS code, CAST(:offer_id AS BIGINT) AS offer_id,
           CAST(:campaign_id AS BIGINT) AS campaign_id
    FROM ({eligible}) e
),
members AS (
    INSERT INTO campaign_member (send_id, customer_id, campaign_id, holdout)
    SELECT CAST(:send_id AS BIGINT), e.customer_id, e.campaign_id, e.holdout
    FROM eligible e
),
codes AS (
    INSERT INTO issued_code (code, offer_id, customer_id, campaign_id, send_id, issued_at, expires_at, uses_left,
                             status)
    SELECT ic.code, ic.offer_id, ic.customer_id, ic.campaign_id, CAST(:send_id AS BIGINT), :now, :expires_at, :uses,
           'active'
    FROM eligible ic
    WHERE NOT ic.holdout
)
INSERT INTO outbox_event (event_type, customer_id, dedupe_key, occurred_at, payload, created_at)
SELECT 'offer.issued', ic.customer_id, 'offer.issued:' || ic.code, :now, {eligible_payload}, :now
FROM eligible ic
WHERE NOT ic.holdout
"""

# A send's advisory lock (PostgreSQL): a namespace in the high bits, the send in the low 32. Two sends whose keys
# collide only wait for each other.
_SEND_LOCK_NAMESPACE = zlib.crc32(b"loyalty.campaign_send") % 2**30


def _send_lock_key(send_id: int) -> int:
    return _SEND_LOCK_NAMESPACE << 32 | send_id % 2**32


def _eligible_sql(session: AsyncSession, filters: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The eligible-customers query for a campaign's filters, with the parameters of its score filters."""
    true, false = ("TRUE", "FALSE") if is_postgres(session) else ("1", "0")
    conditions, params = [], {}
    for key, score in SCORE_FILTERS:
        if filters.get(key):
            conditions.append(f"AND COALESCE(s.{score}, 0) >= :{key}")
            params[key] = filters[key]
    sql = _ELIGIBLE_SQL.format(
        modulus=HASH_MODULUS,
        true=true,
        false=false,
        score_join="LEFT JOIN customer_score s ON s.customer_id = c.id" if conditions else "",
        score_filters="\n  ".join(conditions),
    )
    return sql, params


def _bound(sql: str) -> TextClause:
    """A dispatch statement with the types of the parameters it uses; it ignores the ones it does not."""
    typed = {
        "tiers": bindparam("tiers", expanding=True),
        "now": bindparam("now", type_=DateTimeUTC()),
        "expires_at": bindparam("expires_at", type_=DateTimeUTC()),
    }
    return text(sql).bindparams(*(parameter for name, parameter in typed.items() if f":{name}" in sql))


def _issued_payload(session: AsyncSession, external_id: str = "c.external_id") -> str:
    """An `offer.issued` event's payload, from a code row `ic` and the customer's storefront id."""
    return json_object_sql(
        session,
        [
            ("code", "ic.code"),
            ("customer_id", external_id),
            ("offer_id", "ic.offer_id"),
            ("campaign_id", "ic.campaign_id"),
            ("expires_at", "CAST(:expires_text AS VARCHAR(40))"),
        ],
    )


async def schedule_due_occurrences(session: AsyncSession, timezone: str, now: datetime | None = None) -> int:
    """Turn each campaign occurrence that has come due into a send; advance the campaign to its next one.

    Missed occurrences of a recurring campaign (no replica was running) collapse into one send, the latest.
    """
    now = now or utcnow()
    due = select(Campaign).where(Campaign.status.in_(("scheduled", "running")), Campaign.next_send_at <= now)
    if is_postgres(session):
        due = due.with_for_update(skip_locked=True)
    created = 0
    for campaign in (await session.scalars(due)).all():
        occurrence = campaign.next_send_at
        assert occurrence is not None
        if campaign.cron:
            # The latest occurrence not after now, so one late start sends once, not once per missed period.
            latest = occurrence
            tick = timedelta(microseconds=1)
            try:
                while (later := next_fire(campaign.cron, timezone, latest + tick)) is not None and later <= now:
                    latest = later
                following = next_fire(campaign.cron, timezone, now + tick)
            except CronError:
                following = None
            occurrence = latest
            campaign.next_send_at = following
        else:
            campaign.next_send_at = None
        inserted = await session.scalar(
            insert_ignoring_conflicts(session, CampaignSend, ["campaign_id", "occurrence_at"]).returning(
                CampaignSend.id
            ),
            {
                "campaign_id": campaign.id,
                "occurrence_at": occurrence,
                "status": "due",
                "attempts": 0,
                "issued": 0,
                "holdout": 0,
            },
        )
        created += inserted is not None
    await session.flush()
    return created


async def claim_send(session: AsyncSession, lease_seconds: float, now: datetime | None = None) -> int | None:
    """Claim the oldest due send, or one whose claimant's lease ran out (its effects are idempotent)."""
    now = now or utcnow()
    candidate = (
        select(CampaignSend.id)
        .where((CampaignSend.status == "due") | ((CampaignSend.status == "running") & (CampaignSend.lease_until < now)))
        .order_by(CampaignSend.occurrence_at)
        .limit(1)
    )
    if is_postgres(session):
        candidate = candidate.with_for_update(skip_locked=True)
    return await session.scalar(
        update(CampaignSend)
        .where(CampaignSend.id == candidate.scalar_subquery())
        .values(
            status="running",
            claimed_by=WORKER_ID,
            lease_until=now + timedelta(seconds=lease_seconds),
            attempts=CampaignSend.attempts + 1,
            started_at=func.coalesce(CampaignSend.started_at, now),
        )
        .returning(CampaignSend.id)
    )


@dataclass(frozen=True)
class SendResult:
    send_id: int
    issued: int
    holdout: int
    status: str = "done"
    late_seconds: float | None = None


async def dispatch_send(session: AsyncSession, send_id: int, now: datetime | None = None) -> SendResult:
    """Assign members and issue codes for one send, in a few set-based statements."""
    now = now or utcnow()
    send = await session.get(CampaignSend, send_id)
    assert send is not None
    campaign = await session.get(Campaign, send.campaign_id)
    assert campaign is not None
    offer = await session.get(Offer, campaign.offer_id)
    assert offer is not None
    if campaign.status == "cancelled":
        await session.execute(
            update(CampaignSend).where(CampaignSend.id == send_id).values(status="cancelled", finished_at=now)
        )
        return SendResult(send_id, 0, 0, status="cancelled")
    eligible, filter_params = _eligible_sql(session, campaign.filters or {})
    fragments = {
        "eligible": eligible,
        "code": random_code_sql(session),
        "payload": _issued_payload(session),
        "eligible_payload": _issued_payload(session, "ic.external_id"),
    }
    expires_at = now + timedelta(days=offer.valid_days)
    params = {
        "send_id": send_id,
        "campaign_id": campaign.id,
        "offer_id": offer.id,
        "holdout_cut": int(campaign.holdout_pct / 100.0 * HASH_MODULUS),
        "tiers": list(campaign.tiers),
        "now": now,
        "expires_at": expires_at,
        "expires_text": expires_at.isoformat(),
        "uses": offer.uses_per_code,
        **filter_params,
    }
    # Members, codes and events of a send are only ever written together, in one transaction: a send with members
    # was written by a transaction that committed (a retry, or a replica that took the lease over and finished
    # first), and issues nothing again. The lock makes a concurrent writer of the same send wait for that commit (or
    # rollback) before it looks; on SQLite the write transaction already excludes every other writer.
    await advisory_lock(session, _send_lock_key(send_id))
    written = await session.scalar(select(CampaignMember.send_id).where(CampaignMember.send_id == send_id).limit(1))
    if written is None and is_postgres(session):
        await session.execute(_bound(_ISSUE_ALL_SQL.format(**fragments)), params)
    elif written is None:
        # SQLite has no data-modifying WITH: members, then codes for them, then events for the codes.
        for step in (_MEMBERS_SQL, _CODES_SQL, _ISSUED_EVENTS_SQL):
            await session.execute(_bound(step.format(**fragments)), params)
    counts = dict(
        (
            await session.execute(
                select(CampaignMember.holdout, func.count())
                .where(CampaignMember.send_id == send_id)
                .group_by(CampaignMember.holdout)
            )
        ).all()
    )
    issued, holdout = int(counts.get(False, 0)), int(counts.get(True, 0))
    started = send.started_at or now
    late_seconds = max(0.0, (started - send.occurrence_at).total_seconds())
    await session.execute(
        update(CampaignSend)
        .where(CampaignSend.id == send_id)
        .values(
            status="done",
            finished_at=now,
            issued=issued,
            holdout=holdout,
            late_seconds=late_seconds,
            lease_until=None,
        )
    )
    finished = campaign.cron is None and campaign.next_send_at is None
    await session.execute(
        update(Campaign)
        .where(Campaign.id == campaign.id, Campaign.status.in_(("scheduled", "running")))
        .values(status="completed" if finished else "running", completed_at=now if finished else None)
    )
    return SendResult(send_id, issued, holdout, late_seconds=late_seconds)


async def expire_codes(session: AsyncSession, now: datetime | None = None) -> int:
    """Mark active codes whose validity ended."""
    result = await session.execute(
        update(IssuedCode)
        .where(IssuedCode.status == "active", IssuedCode.expires_at <= (now or utcnow()))
        .values(status="expired")
    )
    return int(getattr(result, "rowcount", 0) or 0)


@dataclass(frozen=True)
class OfferJobs:
    session_maker: async_sessionmaker[AsyncSession]
    timezone: str
    lease_seconds: float

    async def dispatch_due(self) -> dict[str, Any]:
        """`offers.dispatch_due`: schedule due occurrences, then claim and carry out sends one by one."""
        async with transaction(self.session_maker) as session:
            scheduled = await schedule_due_occurrences(session, self.timezone)
        results = []
        for _ in range(SENDS_PER_POLL):
            async with transaction(self.session_maker) as session:
                send_id = await claim_send(session, self.lease_seconds)
            if send_id is None:
                break
            renewal = functools.partial(
                renew_claim, model=CampaignSend, row_id=send_id, lease_seconds=self.lease_seconds
            )
            try:
                async with (
                    keep_lease(self.session_maker, renewal, self.lease_seconds, f"send-lease-{send_id}") as lost,
                    transaction(self.session_maker) as session,
                ):
                    result = await dispatch_send(session, send_id)
                    if lost.is_set():
                        # Another replica is sending it again; its statements wait for ours, so roll back.
                        raise LeaseLostError(f"campaign send {send_id} was taken over by another replica")
            except Exception:
                logger.exception("campaign send failed; it will be retried", extra={"send_id": send_id})
                metrics.record_send("failed")
                break
            # Counted once committed: a send rolled back issued nothing, and its retry will count.
            metrics.record_send(result.status, result.issued, result.holdout, result.late_seconds)
            results.append(result)
        summary: dict[str, Any] = {}
        if scheduled:
            summary["scheduled"] = scheduled
        if results:
            summary["sends"] = [result.__dict__ for result in results]
        return summary

    async def expire(self) -> dict[str, Any]:
        """`offers.expire_codes`."""
        async with transaction(self.session_maker) as session:
            expired = await expire_codes(session)
        return {"expired": expired} if expired else {}

    def poll_jobs(self) -> list[Job]:
        return [Job("offers.dispatch_due", self.dispatch_due), Job("offers.expire_codes", self.expire)]
