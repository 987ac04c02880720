"""Soak: mixed storefront traffic against a real `loyalty serve` on PostgreSQL, with a full recalculation and a
campaign send in the middle. No errors, flat memory, every acknowledged write present at the end.

`LOYALTY_SOAK_SECONDS` sets how long the traffic runs (60 by default, as in CI); README.md ("Soak test") has the
ten-minute command. The summary printed at the end (`-s`) gives requests, rates and latencies per kind and the
server's memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from loyalty.db.models import (
    CampaignMember,
    CampaignSend,
    Customer,
    InteractionEvent,
    IssuedCode,
    Order,
    OrderItem,
    Redemption,
    Refund,
)
from loyalty.demo.generator import load_demo
from loyalty.settings import Settings
from tests.soak.traffic import PREFIX, Acknowledged, Traffic
from tests.support import loyalty_environment, loyalty_server

SOAK_SECONDS = float(os.environ.get("LOYALTY_SOAK_SECONDS", "60"))
DEMO_CUSTOMERS = 3000
# When the work in the middle of the traffic starts, as fractions of the soak. The first recalculation under
# traffic takes the allocator to its high-water mark; memory is then compared from the second quarter, before the
# second, to the last quarter, after it and the campaign send (see `memory_trend`).
WARM_UP_RECALCULATION_AT = 0.1
RECALCULATION_AT = 0.45
CAMPAIGN_SEND_AT = 0.55
# Seconds after a recalculation or the campaign send finished before memory is compared.
SETTLE_SECONDS = 3
WARM_UP = "warm-up recalculation"
RECALCULATION = "recalculation"
# Measured across the second recalculation (the allocator's step as its peak lands elsewhere): +2.4 to +6.6 MiB,
# with the RSS flat to 0.1 MiB between the recalculations and over the last five minutes of a ten-minute soak.
MEMORY_GROWTH_LIMIT_MIB = 12
SOAK_OFFER = {"name": "soak-10", "kind": "percent_off", "value": "10", "valid_days": 30, "min_order_total": "20.00"}


# ---------------------------------------------------------------- the server process and its memory


def soak_environment(settings: Settings) -> dict[str, str]:
    """`loyalty serve` with its timer polling every second (the recalculation and the campaign send run on it),
    logging JSON lines that `server_problems` reads at the end."""
    return loyalty_environment(settings, scheduler=True, log_format="json", poll_seconds="1")


def rss_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS in /proc/<pid>/status), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used (/proc/<pid>/stat), in seconds."""
    # The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Memory:
    """The server's RSS sampled every second, as (seconds into the soak, KiB), and its CPU time over the soak."""

    samples: list[tuple[float, int]] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    async def sample(self, pid: int, started: float) -> None:
        self.cpu.append(cpu_seconds(pid))
        try:
            while True:
                self.samples.append((time.monotonic() - started, rss_kib(pid)))
                await asyncio.sleep(1)
        finally:
            self.cpu.append(cpu_seconds(pid))

    def median_mib(self, start: float, end: float) -> float:
        """Median RSS over [start, end) seconds into the soak, in MiB."""
        window = [kib for at, kib in self.samples if start <= at < end]
        return statistics.median(window) / 1024 if window else float("nan")


def server_problems(log: Path) -> tuple[list[str], Counter[str]]:
    """Log lines at ERROR or above, and anything that is not a log line (a traceback); warnings counted by text."""
    errors: list[str] = []
    warnings: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            errors.append(line)
            continue
        level = entry.get("level") if isinstance(entry, dict) else None
        if level == "warning":
            # APScheduler names each job with its next run time; without it, repeats of one warning count together.
            warnings[re.sub(r" \(trigger: [^)]*\)", "", str(entry.get("message")))[:160]] += 1
        elif level in ("error", "critical") or level is None:
            errors.append(line[:1000])
    return errors, warnings


# ---------------------------------------------------------------- seed


async def wait_for(client: httpx.AsyncClient, url: str, done: tuple[str, ...], seconds: float) -> dict[str, Any]:
    """Poll a resource until its status is one of `done`; the last answer."""
    deadline = time.monotonic() + seconds
    while True:
        body: dict[str, Any] = (await client.get(url)).raise_for_status().json()
        if body.get("status") in done or time.monotonic() > deadline:
            return body
        await asyncio.sleep(0.5)


async def scored_shop_with_codes(
    base: str, marketing: dict[str, str], session_maker: async_sessionmaker[AsyncSession]
) -> tuple[int, list[tuple[str, str]]]:
    """A full recalculation of the demo shop, then a first campaign send; the offer and its (code, owner)s."""
    async with httpx.AsyncClient(base_url=base, headers=marketing, timeout=60) as client:
        run_id = (await client.post("/v1/recalculations", json={})).raise_for_status().json()["run_id"]
        run = await wait_for(client, f"/v1/recalculations/{run_id}", ("succeeded", "failed"), 120)
        assert run["status"] == "succeeded", run
        offer_id = (await client.post("/v1/offers", json=SOAK_OFFER)).raise_for_status().json()["offer_id"]
        send_at = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
        campaign = {
            "name": "soak seed",
            "offer_id": offer_id,
            "tiers": ["vip", "nurture", "one_time"],
            "send_at": send_at,
            "holdout_pct": 10,
        }
        campaign_id = (await client.post("/v1/campaigns", json=campaign)).raise_for_status().json()["campaign_id"]
        sent = await wait_for(client, f"/v1/campaigns/{campaign_id}", ("completed",), 120)
        assert sent["status"] == "completed", sent
    async with session_maker() as session:
        codes = (
            await session.execute(
                select(IssuedCode.code, Customer.external_id)
                .join(Customer, Customer.id == IssuedCode.customer_id)
                .where(IssuedCode.campaign_id == campaign_id)
                .order_by(IssuedCode.id)
            )
        ).all()
    return offer_id, [(code, str(owner)) for code, owner in codes]


# ---------------------------------------------------------------- the check at the end


async def lost_writes(session_maker: async_sessionmaker[AsyncSession], acknowledged: Acknowledged) -> list[str]:
    """Every acknowledged write that is missing or stored with other content than was sent."""
    lost: list[str] = []
    pattern = f"{PREFIX}%"
    async with session_maker() as session:
        orders = {
            row.external_id: row
            for row in await session.execute(
                select(Order.external_id, Customer.external_id.label("customer"), Order.placed_at, Order.total)
                .add_columns(Order.refunded, Order.currency, Order.channel)
                .join(Customer, Customer.id == Order.customer_id)
                .where(Order.external_id.like(pattern))
            )
        }
        items: dict[str, list[tuple[str, str | None, int, Decimal]]] = {}
        for row in await session.execute(
            select(Order.external_id, OrderItem.sku, OrderItem.category, OrderItem.quantity, OrderItem.unit_price)
            .join(Order, Order.id == OrderItem.order_id)
            .where(Order.external_id.like(pattern))
            .order_by(Order.external_id, OrderItem.line_no)
        ):
            items.setdefault(row[0], []).append((row[1], row[2], row[3], row[4]))
        refunds = {
            row.external_id: row
            for row in await session.execute(
                select(Refund.external_id, Order.external_id.label("order"), Refund.amount, Refund.refunded_at)
                .join(Order, Order.id == Refund.order_id)
                .where(Refund.external_id.like(pattern))
            )
        }
        events = {
            row.external_id: row
            for row in await session.execute(
                select(InteractionEvent.external_id, Customer.external_id.label("customer"), InteractionEvent.type)
                .add_columns(InteractionEvent.target, InteractionEvent.occurred_at)
                .join(Customer, Customer.id == InteractionEvent.customer_id)
                .where(InteractionEvent.external_id.like(pattern))
            )
        }
        redemptions = {
            row.id: row
            for row in await session.execute(
                select(Redemption.id, IssuedCode.code, Customer.external_id.label("customer"), Redemption.order_ref)
                .add_columns(Redemption.order_total, Redemption.voided_at)
                .join(IssuedCode, IssuedCode.id == Redemption.code_id)
                .join(Customer, Customer.id == Redemption.customer_id)
                .where(Redemption.order_ref.like(pattern))
            )
        }

    refunded: dict[str, Decimal] = {}
    for refund_id, (order_id, amount, refunded_at) in acknowledged.refunds.items():
        stored = refunds.get(refund_id)
        if stored is None or (stored.order, stored.amount, stored.refunded_at) != (order_id, amount, _at(refunded_at)):
            lost.append(f"refund {refund_id}: sent {(order_id, amount, refunded_at)}, stored {stored}")
        refunded[order_id] = refunded.get(order_id, Decimal(0)) + amount
    for order_id, order in acknowledged.orders.items():
        stored = orders.get(order_id)
        sent_items = [
            (item["sku"], item["category"], item["quantity"], Decimal(item["unit_price"])) for item in order["items"]
        ]
        if (
            stored is None
            or (stored.customer, stored.placed_at, stored.total, stored.currency, stored.channel)
            != (order["customer_id"], _at(order["placed_at"]), Decimal(order["total"]), "USD", order["channel"])
            or items.get(order_id, []) != sent_items
            or stored.refunded != refunded.get(order_id, Decimal(0))
        ):
            lost.append(f"order {order_id}: sent {order}, stored {stored} {items.get(order_id)}")
    for event_id, event in acknowledged.events.items():
        stored = events.get(event_id)
        sent = (event["customer_id"], event["type"], event["target"], _at(event["occurred_at"]))
        if stored is None or (stored.customer, stored.type, stored.target, stored.occurred_at) != sent:
            lost.append(f"event {event_id}: sent {event}, stored {stored}")
    for redemption_id, redemption in acknowledged.redemptions.items():
        stored = redemptions.get(redemption_id)
        sent_redemption = (
            redemption["code"],
            redemption["customer_id"],
            redemption["order_id"],
            Decimal(redemption["order_total"]),
            None,
        )
        if stored is None or tuple(stored)[1:] != sent_redemption:
            lost.append(f"redemption {redemption_id}: sent {redemption}, stored {stored}")
    # Nothing beyond what was acknowledged: the soak's ids are its own, and every request was answered.
    for kind, stored_ids, sent_ids in (
        ("orders", orders, acknowledged.orders),
        ("refunds", refunds, acknowledged.refunds),
        ("events", events, acknowledged.events),
        ("redemptions", redemptions, acknowledged.redemptions),
    ):
        extra = set(stored_ids) - set(sent_ids)
        if extra:
            lost.append(f"{len(extra)} {kind} stored that were never acknowledged, e.g. {sorted(extra)[:5]}")
    return lost


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


async def overused_codes(session_maker: async_sessionmaker[AsyncSession]) -> list[tuple[str, int, int]]:
    """Codes redeemed more than once, or whose uses left disagree with their redemptions (the soak's are one-use)."""
    async with session_maker() as session:
        rows = await session.execute(
            select(IssuedCode.code, IssuedCode.uses_left, func.count(Redemption.id))
            .join(Redemption, Redemption.code_id == IssuedCode.id)
            .where(Redemption.voided_at.is_(None))
            .group_by(IssuedCode.code, IssuedCode.uses_left)
            .having((func.count(Redemption.id) > 1) | (IssuedCode.uses_left != 0))
        )
        return [(code, uses_left, count) for code, uses_left, count in rows]


async def campaign_send_faults(session_maker: async_sessionmaker[AsyncSession], campaign_id: int) -> list[str]:
    """How the campaign's send differs from one code per treatment member and none for the holdout."""
    async with session_maker() as session:
        send = (await session.execute(select(CampaignSend).where(CampaignSend.campaign_id == campaign_id))).scalar_one()
        treatment = set(
            await session.scalars(
                select(CampaignMember.customer_id).where(CampaignMember.send_id == send.id, ~CampaignMember.holdout)
            )
        )
        holdout = set(
            await session.scalars(
                select(CampaignMember.customer_id).where(CampaignMember.send_id == send.id, CampaignMember.holdout)
            )
        )
        holders = list(await session.scalars(select(IssuedCode.customer_id).where(IssuedCode.send_id == send.id)))
    faults = []
    if send.status != "done":
        faults.append(f"send status {send.status}: {send.error}")
    if sorted(holders) != sorted(treatment) or send.issued != len(treatment) or send.holdout != len(holdout):
        faults.append(
            f"{len(holders)} codes ({len(set(holders))} customers) for {len(treatment)} treatment members; "
            f"send counts issued {send.issued}, holdout {send.holdout} (members {len(holdout)})"
        )
    if not treatment:
        faults.append("the send reached nobody")
    return faults


# ---------------------------------------------------------------- memory and summary


@dataclass(frozen=True)
class MemoryTrend:
    """Median RSS before the recalculation in the middle, against the median of the last quarter, after it."""

    baseline_from: float
    baseline_to: float
    baseline_mib: float
    end_from: float
    end_mib: float

    @property
    def growth_mib(self) -> float:
        return self.end_mib - self.baseline_mib


def memory_trend(memory: Memory, finished: dict[str, float], seconds: float) -> MemoryTrend:
    """Compare the server's memory across the recalculation and the campaign send in the middle of the soak.

    A recalculation's peak stays with the allocator as free heap, which later allocations reuse before the RSS
    grows: compared from just after a recalculation, a leak would hide in that hole. So a first recalculation
    under traffic makes the hole, the baseline follows it, and the second recalculation, needing its peak again,
    turns whatever filled the hole meanwhile into RSS that the last quarter shows. Medians keep single samples
    (a recalculation's own peak) out of both.
    """
    baseline_from = max(seconds / 4, finished.get(WARM_UP, seconds) + SETTLE_SECONDS)
    end_from = max([seconds * 3 / 4] + [at + SETTLE_SECONDS for kind, at in finished.items() if kind != WARM_UP])
    baseline_to = RECALCULATION_AT * seconds
    return MemoryTrend(
        baseline_from,
        baseline_to,
        memory.median_mib(baseline_from, baseline_to),
        end_from,
        memory.median_mib(end_from, seconds + 1),
    )


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def summary(traffic: Traffic, memory: Memory, trend: MemoryTrend, run: dict[str, Any], warnings: Counter[str]) -> str:
    seconds = traffic.seconds
    lines = [f"soak: {seconds:.0f} s of traffic against PostgreSQL ({DEMO_CUSTOMERS} demo customers)"]
    lines.append(f"  {'kind':<30} {'requests':>9} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    total = 0
    for kind, latencies in sorted(traffic.outcomes.latencies.items()):
        total += len(latencies)
        lines.append(
            f"  {kind:<30} {len(latencies):>9} {len(latencies) / seconds:>8.1f} "
            f"{percentile(latencies, 0.5) * 1000:>8.1f} {percentile(latencies, 0.99) * 1000:>8.1f} "
            f"{max(latencies) * 1000:>8.1f}"
        )
    lines.append(f"  {'all':<30} {total:>9} {total / seconds:>8.1f}")
    acknowledged = traffic.acknowledged
    lines.append(
        f"  acknowledged writes: {len(acknowledged.orders)} orders, {len(acknowledged.refunds)} refunds, "
        f"{len(acknowledged.events)} events, {len(acknowledged.redemptions)} redemptions; "
        f"{acknowledged.refused_second_uses} second uses refused; "
        f"{len(traffic.codes)} codes to redeem; {len(traffic.outcomes.unexpected)} unexpected answers"
    )
    phases = ", ".join(f"{name} {value:.2f}" for name, value in run.get("phases", {}).items())
    finished = ", ".join(f"{kind} finished at {at:.0f} s" for kind, at in traffic.finished.items())
    lines.append(f"  recalculation: {run.get('status')} for {run.get('customers')} customers ({phases}); {finished}")
    kib = [value for _, value in memory.samples]
    if kib:
        lines.append(
            f"  server RSS MiB: start {kib[0] / 1024:.1f}, max {max(kib) / 1024:.1f}, end {kib[-1] / 1024:.1f}; "
            f"median {trend.baseline_from:.0f}-{trend.baseline_to:.0f} s {trend.baseline_mib:.1f}, "
            f"from {trend.end_from:.0f} s {trend.end_mib:.1f} "
            f"({trend.growth_mib:+.1f}, limit +{MEMORY_GROWTH_LIMIT_MIB})"
        )
        tenths = [memory.median_mib(seconds * i / 10, seconds * (i + 1) / 10) for i in range(10)]
        lines.append("  server RSS MiB by tenth of the soak (medians): " + " ".join(f"{mib:.1f}" for mib in tenths))
    if len(memory.cpu) == 2:
        used = memory.cpu[1] - memory.cpu[0]
        lines.append(
            f"  server CPU: {used:.1f} s in {seconds:.0f} s ({used / seconds:.0%} of a core), "
            f"{used / max(1, total) * 1000:.1f} ms per request"
        )
    if warnings:
        lines.append("  server warnings: " + "; ".join(f"{count} x {text}" for text, count in warnings.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------- the soak


@pytest.mark.slow
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_soak(
    settings: Settings,
    engine: AsyncEngine,
    session_maker: async_sessionmaker[AsyncSession],
    keys: Any,
    tmp_path: Path,
) -> None:
    await load_demo(engine, customers=DEMO_CUSTOMERS, seed=11)
    async with session_maker() as session:
        customers = [str(c) for c in await session.scalars(select(Customer.external_id).order_by(Customer.id))]
    marketing = keys.headers("marketing")
    async with loyalty_server(soak_environment(settings), tmp_path / "server.log") as server:
        offer_id, codes = await scored_shop_with_codes(server.url, marketing, session_maker)
        async with httpx.AsyncClient(base_url=server.url, headers=marketing, timeout=60) as client:
            send_at = datetime.now(UTC) + timedelta(seconds=CAMPAIGN_SEND_AT * SOAK_SECONDS)
            campaign = {
                "name": "soak mid-traffic",
                "offer_id": offer_id,
                "tiers": ["vip", "nurture"],
                "send_at": send_at.isoformat(),
                "holdout_pct": 20,
            }
            campaign_id = (await client.post("/v1/campaigns", json=campaign)).raise_for_status().json()["campaign_id"]
        traffic = Traffic(server.url, keys.headers("storefront"), marketing, customers, codes, SOAK_SECONDS)
        memory = Memory()
        sampler = asyncio.create_task(memory.sample(server.popen.pid, traffic.started))
        try:
            warm_up, run, sent, *_ = await asyncio.gather(
                traffic.recalculation(WARM_UP, WARM_UP_RECALCULATION_AT * SOAK_SECONDS),
                traffic.recalculation(RECALCULATION, RECALCULATION_AT * SOAK_SECONDS),
                traffic.campaign_send(campaign_id),
                *traffic.workers(),
            )
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
    errors, warnings = server_problems(server.log)
    trend = memory_trend(memory, traffic.finished, SOAK_SECONDS)
    print("\n" + summary(traffic, memory, trend, run, warnings))

    unexpected = traffic.outcomes.unexpected
    assert not unexpected, f"{len(unexpected)} answers the contract does not allow:\n" + "\n".join(unexpected[:30])
    assert not errors, "the server logged errors:\n" + "\n".join(errors[:30])
    assert warm_up.get("status") == run.get("status") == "succeeded", (warm_up, run)
    assert sent.get("status") == "completed", sent
    assert await campaign_send_faults(session_maker, campaign_id) == []
    lost = await lost_writes(session_maker, traffic.acknowledged)
    assert not lost, f"{len(lost)} acknowledged writes missing or changed:\n" + "\n".join(lost[:30])
    assert await overused_codes(session_maker) == []
    # Every kind of traffic ran, so none of the checks above is vacuous.
    expected_kinds = {"order", "order replay", "order conflict", "refund", "refund replay", "order batch", "events"}
    expected_kinds |= {"badge", "token", "me", "me offers", "code check", "redeem", "redeem replay", "second use"}
    expected_kinds |= {"racing second use", f"{WARM_UP} request", f"{RECALCULATION} poll", "campaign send poll"}
    assert expected_kinds <= set(traffic.outcomes.latencies), expected_kinds - set(traffic.outcomes.latencies)
    too_late = f"the recalculations and the campaign send finished too late to compare memory: {traffic.finished}"
    assert trend.baseline_to - trend.baseline_from >= 2, too_late
    assert trend.end_from <= SOAK_SECONDS - 2, too_late
    assert trend.growth_mib <= MEMORY_GROWTH_LIMIT_MIB, f"server memory grew: {trend}"
