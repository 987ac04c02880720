"""Offers and campaigns: create, read, cancel."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.db.dialect import insert_ignoring_conflicts
from loyalty.db.models import Campaign, CampaignMember, CampaignSend, Offer
from loyalty.lib.clock import utcnow
from loyalty.lib.errors import CAMPAIGN_FINISHED, NOT_FOUND, OFFER_NAME_TAKEN, ProblemError, field_problem
from loyalty.lib.pagination import Page, decode_int_cursor, encode_cursor, newest_first
from loyalty.offers import schemas
from loyalty.scheduling.timer import CronError, parse_cron

# A send time a little in the past is accepted (clocks differ); further back is a typo.
SEND_AT_SLACK = timedelta(minutes=5)


def offer_view(offer: Offer) -> schemas.Offer:
    return schemas.Offer(
        offer_id=offer.id,
        name=offer.name,
        kind=offer.kind,
        value=offer.value,
        valid_days=offer.valid_days,
        min_order_total=offer.min_order_total,
        uses_per_code=offer.uses_per_code,
        created_at=offer.created_at,
    )


async def create_offer(session: AsyncSession, data: schemas.OfferCreate) -> schemas.Offer:
    statement = insert_ignoring_conflicts(session, Offer, ["name"]).returning(Offer.id)
    offer_id = await session.scalar(
        statement,
        {
            "name": data.name,
            "kind": data.kind,
            "value": data.value,
            "valid_days": data.valid_days,
            "min_order_total": data.min_order_total,
            "uses_per_code": data.uses_per_code,
            "created_at": utcnow(),
        },
    )
    if offer_id is None:
        raise ProblemError(OFFER_NAME_TAKEN, f"An offer named {data.name!r} already exists")
    return await get_offer(session, offer_id)


async def get_offer(session: AsyncSession, offer_id: int) -> schemas.Offer:
    offer = await session.get(Offer, offer_id)
    if offer is None:
        raise ProblemError(NOT_FOUND, f"No offer with offer_id {offer_id}")
    return offer_view(offer)


async def list_offers(session: AsyncSession, limit: int, cursor: str | None) -> Page[schemas.Offer]:
    return await newest_first(session, Offer, limit, cursor, offer_view)


def next_fire(cron: str, timezone: str, after: datetime) -> datetime | None:
    trigger = parse_cron(cron, timezone)
    fire = trigger.get_next_fire_time(None, after)
    return fire if fire is None else fire.astimezone(after.tzinfo)


async def create_campaign(session: AsyncSession, data: schemas.CampaignCreate, timezone: str) -> schemas.Campaign:
    now = utcnow()
    if await session.get(Offer, data.offer_id) is None:
        raise field_problem("offer_id", f"no offer with offer_id {data.offer_id}")
    first: datetime | None
    if data.send_at is not None:
        if data.send_at < now - SEND_AT_SLACK:
            raise field_problem("send_at", "must not be in the past")
        first = data.send_at
    else:
        assert data.cron is not None
        try:
            first = next_fire(data.cron, timezone, now)
        except CronError as error:
            raise field_problem("cron", str(error)) from None
        if first is None:
            raise field_problem("cron", "never fires")
    campaign = Campaign(
        name=data.name,
        offer_id=data.offer_id,
        tiers=list(data.tiers),
        filters=data.filters.model_dump(exclude_none=True),
        send_at=data.send_at,
        cron=data.cron,
        holdout_pct=data.holdout_pct,
        status="scheduled",
        next_send_at=first,
        created_at=now,
    )
    session.add(campaign)
    await session.flush()
    return await get_campaign(session, campaign.id)


async def get_campaign(session: AsyncSession, campaign_id: int) -> schemas.Campaign:
    campaign = await session.get(Campaign, campaign_id)
    if campaign is None:
        raise ProblemError(NOT_FOUND, f"No campaign with campaign_id {campaign_id}")
    return (await _campaign_views(session, [campaign]))[0]


async def list_campaigns(session: AsyncSession, limit: int, cursor: str | None) -> Page[schemas.Campaign]:
    statement = select(Campaign).order_by(Campaign.id.desc()).limit(limit + 1)
    if cursor:
        statement = statement.where(Campaign.id < decode_int_cursor(cursor))
    found = list((await session.scalars(statement)).all())
    next_cursor = encode_cursor(str(found[limit - 1].id)) if len(found) > limit else None
    return Page(items=await _campaign_views(session, found[:limit]), next_cursor=next_cursor)


async def _campaign_views(session: AsyncSession, campaigns: list[Campaign]) -> list[schemas.Campaign]:
    ids = [campaign.id for campaign in campaigns]
    sends: dict[int, list[schemas.CampaignSend]] = {campaign_id: [] for campaign_id in ids}
    if ids:
        for send in await session.scalars(
            select(CampaignSend).where(CampaignSend.campaign_id.in_(ids)).order_by(CampaignSend.occurrence_at)
        ):
            sends[send.campaign_id].append(
                schemas.CampaignSend(
                    occurrence_at=send.occurrence_at,
                    status=send.status,
                    started_at=send.started_at,
                    finished_at=send.finished_at,
                    late_seconds=send.late_seconds,
                    issued=send.issued,
                    holdout=send.holdout,
                    attempts=send.attempts,
                )
            )
    views = []
    for campaign in campaigns:
        campaign_sends = sends[campaign.id]
        views.append(
            schemas.Campaign(
                campaign_id=campaign.id,
                name=campaign.name,
                offer_id=campaign.offer_id,
                tiers=campaign.tiers,
                filters=schemas.Filters.model_validate(campaign.filters),
                send_at=campaign.send_at,
                cron=campaign.cron,
                holdout_pct=campaign.holdout_pct,
                status=campaign.status,
                next_send_at=campaign.next_send_at,
                issued=sum(send.issued for send in campaign_sends),
                holdout=sum(send.holdout for send in campaign_sends),
                sends=campaign_sends,
                created_at=campaign.created_at,
                cancelled_at=campaign.cancelled_at,
                completed_at=campaign.completed_at,
            )
        )
    return views


async def cancel_campaign(session: AsyncSession, campaign_id: int) -> schemas.Campaign:
    """Stop future sends; codes already issued stay valid. A finished campaign is a 409."""
    now = utcnow()
    cancelled = await session.scalar(
        update(Campaign)
        .where(Campaign.id == campaign_id, Campaign.status.in_(("scheduled", "running")))
        .values(status="cancelled", cancelled_at=now, next_send_at=None)
        .returning(Campaign.id)
    )
    if cancelled is None:
        campaign = await session.get(Campaign, campaign_id)
        if campaign is None:
            raise ProblemError(NOT_FOUND, f"No campaign with campaign_id {campaign_id}")
        raise ProblemError(CAMPAIGN_FINISHED, f"Campaign {campaign_id} is already {campaign.status}")
    # A send not yet started will not start.
    await session.execute(
        update(CampaignSend)
        .where(CampaignSend.campaign_id == campaign_id, CampaignSend.status == "due")
        .values(status="cancelled", finished_at=now)
    )
    return await get_campaign(session, campaign_id)


async def member_counts(session: AsyncSession, campaign_id: int) -> tuple[int, int]:
    """Distinct treatment and holdout customers of a campaign across its sends."""
    rows = dict(
        (
            await session.execute(
                select(CampaignMember.holdout, func.count(func.distinct(CampaignMember.customer_id)))
                # Through the sends: the members' key leads with the send.
                .where(
                    CampaignMember.send_id.in_(select(CampaignSend.id).where(CampaignSend.campaign_id == campaign_id))
                )
                .group_by(CampaignMember.holdout)
            )
        ).all()
    )
    return int(rows.get(False, 0)), int(rows.get(True, 0))
