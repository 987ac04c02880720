"""A server killed (SIGKILL) while it writes a campaign send to thousands of customers; another start finishes it.

The send is written by `loyalty serve`'s own timer in a real process. After the kill and a restart, the send is
taken over once its lease runs out and completes: every eligible customer is a member once, every treatment
member has exactly one code and one `offer.issued` event, holdout members have none, and the campaign's counts
agree with what is stored.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import and_, func, select, text

from loyalty.db.models import CampaignMember, CampaignSend, Customer, CustomerTier, IssuedCode, OutboxEvent
from loyalty.db.session import read_only
from loyalty.demo.generator import load_demo
from tests.integration.offers.test_offers import create_offer, soon
from tests.support import loyalty_environment, loyalty_server, wait_for

pytestmark = pytest.mark.slow

CUSTOMERS = 6000
TIERS = ["vip", "nurture", "one_time", "prospect"]
HOLDOUT_PCT = 20
LEASE_SECONDS = 3


async def _send(session_maker: Any, campaign_id: int) -> Any:
    # Read-only: on SQLite it reads a snapshot and never queues behind the send's write transaction.
    async with read_only(session_maker)() as session:
        return (
            await session.execute(
                select(CampaignSend.id, CampaignSend.status, CampaignSend.attempts).where(
                    CampaignSend.campaign_id == campaign_id
                )
            )
        ).one_or_none()


async def _dispatch_statement_running(session_maker: Any) -> bool:
    """PostgreSQL only: the send's INSERT is executing on another connection right now."""
    async with read_only(session_maker)() as session:
        running = await session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' "
                "AND pid <> pg_backend_pid() AND query LIKE '%INSERT INTO campaign_member%'"
            )
        )
    return bool(running)


async def _sqlite_writer_active(path: Path) -> bool:
    """SQLite only: some connection holds the database's write lock, i.e. a write transaction is open."""
    connection = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError:  # "database is locked"
        return True
    else:
        connection.execute("ROLLBACK")
        return False
    finally:
        connection.close()


async def _count(session_maker: Any, statement: Any) -> int:
    async with read_only(session_maker)() as session:
        return int(await session.scalar(statement) or 0)


async def test_a_send_killed_mid_write_completes_once_after_a_restart(
    database, settings, engine, session_maker, client, keys, run_due, tmp_path: Path
) -> None:
    await load_demo(engine, customers=CUSTOMERS, seed=21)
    marketing = keys.headers("marketing")
    assert (await client.post("/v1/recalculations", json={}, headers=marketing)).status_code == 202
    await run_due()
    offer_id = await create_offer(client, marketing)
    created = await client.post(
        "/v1/campaigns",
        json={"name": "everyone", "offer_id": offer_id, "tiers": TIERS, "holdout_pct": HOLDOUT_PCT, "send_at": soon(1)},
        headers=marketing,
    )
    assert created.status_code == 201, created.text
    campaign_id = created.json()["campaign_id"]
    eligible = await _count(
        session_maker,
        select(func.count())
        .select_from(CustomerTier)
        .join(Customer, Customer.id == CustomerTier.customer_id)
        .where(CustomerTier.tier.in_(TIERS), ~Customer.marketing_opt_out, Customer.external_id.is_not(None)),
    )
    assert eligible > 4000
    issued_events = select(func.count()).select_from(OutboxEvent).where(OutboxEvent.event_type == "offer.issued")
    events_before = await _count(session_maker, issued_events)

    environment = loyalty_environment(
        settings, scheduler=True, poll_seconds="0.2", recalc_lease_seconds=str(LEASE_SECONDS)
    )
    log = tmp_path / "serve.log"
    async with loyalty_server(environment, log, ready_within=None) as server:

        async def send_started() -> bool:
            send = await _send(session_maker, campaign_id)
            return send is not None and send.status == "running"

        await wait_for(send_started, "the send to be claimed", within=90, every=0.01, watched=server)
        # Kill it while it writes: on PostgreSQL while its one statement inserts the members, codes and events; on
        # SQLite while the transaction that follows the claim holds the write lock.
        if database.dialect == "postgresql":
            await wait_for(
                lambda: _dispatch_statement_running(session_maker), "the send's INSERT", within=30, watched=server
            )
        else:
            assert settings.sqlite_path is not None
            await wait_for(
                lambda: _sqlite_writer_active(settings.sqlite_path), "the send's writes", within=30, watched=server
            )
        server.kill()

    send_id, status, attempts = await _send(session_maker, campaign_id)
    assert (status, attempts) == ("running", 1), "the send finished before it could be killed; use more customers"
    # The killed transaction left nothing behind.
    members_of_send = select(func.count()).select_from(CampaignMember).where(CampaignMember.send_id == send_id)
    assert await _count(session_maker, members_of_send) == 0
    assert await _count(session_maker, issued_events) == events_before

    # Another start takes the send over once the dead claimant's lease has run out, and completes it.
    async with loyalty_server(environment, log, ready_within=None) as server:

        async def send_done() -> bool:
            send = await _send(session_maker, campaign_id)
            return send is not None and send.status == "done"

        await wait_for(send_done, "the send to complete after the restart", within=90, every=0.2, watched=server)

    assert (await _send(session_maker, campaign_id)).attempts == 2
    members = await _count(session_maker, members_of_send)
    holdout = await _count(session_maker, members_of_send.where(CampaignMember.holdout))
    treatment = members - holdout
    assert members == eligible
    assert abs(holdout / members - HOLDOUT_PCT / 100) < 0.03

    codes_of_send = select(func.count()).select_from(IssuedCode).where(IssuedCode.send_id == send_id)
    assert await _count(session_maker, codes_of_send) == treatment
    assert (
        await _count(
            session_maker,
            select(func.count(func.distinct(IssuedCode.customer_id))).where(IssuedCode.send_id == send_id),
        )
        == treatment
    )
    # Every code went to a treatment member: none to the holdout, none to anyone outside the send.
    treatment_codes = codes_of_send.join(
        CampaignMember,
        and_(CampaignMember.send_id == IssuedCode.send_id, CampaignMember.customer_id == IssuedCode.customer_id),
    ).where(~CampaignMember.holdout)
    assert await _count(session_maker, treatment_codes) == treatment

    # One event per code, no more.
    assert await _count(session_maker, issued_events) - events_before == treatment
    events_of_send = (
        select(func.count(func.distinct(OutboxEvent.dedupe_key)))
        .select_from(OutboxEvent)
        .join(IssuedCode, OutboxEvent.dedupe_key == "offer.issued:" + IssuedCode.code)
        .where(IssuedCode.send_id == send_id)
    )
    assert await _count(session_maker, events_of_send) == treatment

    campaign = (await client.get(f"/v1/campaigns/{campaign_id}", headers=marketing)).json()
    assert campaign["status"] == "completed"
    assert (campaign["issued"], campaign["holdout"]) == (treatment, holdout)
    [send] = campaign["sends"]
    assert (send["status"], send["attempts"], send["issued"], send["holdout"]) == ("done", 2, treatment, holdout)
