"""Campaign results: redemptions, and revenue per customer in treatment vs holdout with a 95% interval.

Method (also in the API docs): intent-to-treat — every treatment member counts, redeemed or not, and every
holdout member; each member's revenue is the net total (after refunds) of orders placed in the campaign window,
from the first send to the end of the codes' validity (or now, if sooner). The incremental revenue per customer
is the difference of the two means, with a 95% confidence interval from Welch's unequal-variance standard error
and the normal approximation: diff ± 1.96 · sqrt(s_t²/n_t + s_h²/n_h). With fewer than MIN_GROUP members in
either group the interval is not given and `insufficient_data` is true.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from sqlalchemy import bindparam, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.db.models import Campaign, CampaignSend, IssuedCode, Offer, Redemption
from loyalty.db.types import DateTimeUTC
from loyalty.lib.clock import utcnow
from loyalty.lib.errors import NOT_FOUND, ProblemError
from loyalty.lib.money import STORAGE_FACTOR, format_money
from loyalty.offers import schemas

MIN_GROUP = 30
Z_95 = 1.959963984540054
METHOD = (
    "intent-to-treat difference in mean revenue per customer (treatment - holdout) over the campaign window; "
    "95% CI from Welch's standard error with the normal approximation"
)

_REVENUE_SQL = """
WITH members AS (
    SELECT customer_id, MAX(CASE WHEN holdout THEN 1 ELSE 0 END) AS holdout
    FROM campaign_member
    WHERE send_id IN (SELECT id FROM campaign_send WHERE campaign_id = :campaign_id) -- the members' key leads
    GROUP BY customer_id
),
revenue AS (
    SELECT m.customer_id, m.holdout, COALESCE(SUM(o.total - o.refunded), 0) * 1.0 / :factor AS amount
    FROM members m
    LEFT JOIN customer_order o ON o.customer_id = m.customer_id AND o.placed_at >= :start AND o.placed_at < :end
    GROUP BY m.customer_id, m.holdout
)
SELECT holdout, COUNT(*), SUM(amount), SUM(amount * amount) FROM revenue GROUP BY holdout
"""


@dataclass(frozen=True)
class GroupStats:
    n: int
    total: float
    total_squares: float

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    @property
    def variance(self) -> float:
        """Sample variance (n - 1)."""
        if self.n < 2:
            return 0.0
        return max(0.0, (self.total_squares - self.n * self.mean**2) / (self.n - 1))


@dataclass(frozen=True)
class Uplift:
    estimate: float | None
    low: float | None
    high: float | None
    insufficient_data: bool


def difference_in_means(treatment: GroupStats, holdout: GroupStats, min_group: int = MIN_GROUP) -> Uplift:
    """Welch difference of means with a normal-approximation 95% interval (pure, for testing on plain data)."""
    if treatment.n == 0 or holdout.n == 0:
        return Uplift(None, None, None, True)
    estimate = treatment.mean - holdout.mean
    if treatment.n < min_group or holdout.n < min_group:
        return Uplift(estimate, None, None, True)
    error = math.sqrt(treatment.variance / treatment.n + holdout.variance / holdout.n)
    return Uplift(estimate, estimate - Z_95 * error, estimate + Z_95 * error, False)


def _money(value: float | None) -> str | None:
    return None if value is None else format_money(Decimal(str(round(value, 6))))


async def campaign_results(session: AsyncSession, campaign_id: int) -> schemas.CampaignResults:
    campaign = await session.get(Campaign, campaign_id)
    if campaign is None:
        raise ProblemError(NOT_FOUND, f"No campaign with campaign_id {campaign_id}")
    offer = await session.get(Offer, campaign.offer_id)
    assert offer is not None
    now = utcnow()
    first_send, last_send = (
        await session.execute(
            select(func.min(CampaignSend.started_at), func.max(CampaignSend.started_at)).where(
                CampaignSend.campaign_id == campaign_id, CampaignSend.status == "done"
            )
        )
    ).one()
    issued = await session.scalar(
        select(func.count()).select_from(IssuedCode).where(IssuedCode.campaign_id == campaign_id)
    )
    redeemed = await session.scalar(
        select(func.count(func.distinct(Redemption.code_id)))
        .join(IssuedCode, IssuedCode.id == Redemption.code_id)
        .where(IssuedCode.campaign_id == campaign_id, Redemption.voided_at.is_(None))
    )
    groups = {False: GroupStats(0, 0.0, 0.0), True: GroupStats(0, 0.0, 0.0)}
    end = None
    if first_send is not None and last_send is not None:
        end = min(now, last_send + timedelta(days=offer.valid_days))
        statement = text(_REVENUE_SQL).bindparams(
            bindparam("start", type_=DateTimeUTC()), bindparam("end", type_=DateTimeUTC())
        )
        rows = await session.execute(
            statement, {"campaign_id": campaign_id, "start": first_send, "end": end, "factor": STORAGE_FACTOR}
        )
        for holdout, n, total, squares in rows:
            groups[bool(holdout)] = GroupStats(int(n), float(total or 0.0), float(squares or 0.0))
    treatment, holdout = groups[False], groups[True]
    uplift = difference_in_means(treatment, holdout)
    return schemas.CampaignResults(
        campaign_id=campaign_id,
        issued=int(issued or 0),
        holdout=holdout.n,
        redeemed=int(redeemed or 0),
        redemption_rate=round(int(redeemed or 0) / issued, 4) if issued else None,
        window={"start": first_send, "end": end},
        revenue_per_customer=schemas.RevenuePerCustomer(
            treatment=_money(treatment.mean) if treatment.n else None,
            holdout=_money(holdout.mean) if holdout.n else None,
        ),
        incremental_revenue=schemas.IncrementalRevenue(
            estimate=_money(uplift.estimate),
            ci95=None if uplift.low is None else [_money(uplift.low) or "", _money(uplift.high) or ""],
            method=METHOD,
        ),
        insufficient_data=uplift.insufficient_data,
    )
