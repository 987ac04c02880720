"""PostgreSQL announces every change to what a badge shows, so each server process can keep badges in memory.

A change to a customer's tier row (its tier, since, progress or pin) and the unlinking of a storefront id (an
erasure) notify the channel ``loyalty_badges`` with the customer's id; a TRUNCATE notifies ``*`` (every badge).
Notifications reach listeners when the writing transaction commits, and only then, so a process's cache
(``loyalty.tiers.badge_cache``) forgets a badge as soon as its change is visible. A bulk writer (the full run) sets
``loyalty.badges`` to ``announced`` for its transaction and sends one ``*`` itself: a notification per row of a
million-row upsert would cost more than the write. SQLite has no notifications, and no badge cache.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# What a row trigger checks first: a writer that announced its changes itself is not announced again per row.
NOT_ANNOUNCED = "current_setting('loyalty.badges', true) IS DISTINCT FROM 'announced'"

UPGRADE = [
    """
    CREATE FUNCTION loyalty_badge_tier_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP IN ('DELETE', 'UPDATE') THEN
            PERFORM pg_notify('loyalty_badges', OLD.customer_id::text);
        END IF;
        IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.customer_id IS DISTINCT FROM OLD.customer_id) THEN
            PERFORM pg_notify('loyalty_badges', NEW.customer_id::text);
        END IF;
        RETURN NULL;
    END $$
    """,
    """
    CREATE FUNCTION loyalty_badge_customer_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('loyalty_badges', OLD.id::text);
        RETURN NULL;
    END $$
    """,
    """
    CREATE FUNCTION loyalty_badges_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('loyalty_badges', '*');
        RETURN NULL;
    END $$
    """,
    f"""
    CREATE TRIGGER badge_tier_written AFTER INSERT OR DELETE ON customer_tier
    FOR EACH ROW WHEN ({NOT_ANNOUNCED}) EXECUTE FUNCTION loyalty_badge_tier_changed()
    """,
    # Only a change to what the badge shows: a re-score that rewrites the same badge (updated_at, the explanation,
    # scores elsewhere) announces nothing. progress is json, which has no equality; its text is what was written.
    f"""
    CREATE TRIGGER badge_tier_changed AFTER UPDATE ON customer_tier
    FOR EACH ROW WHEN ({NOT_ANNOUNCED} AND (
        OLD.tier IS DISTINCT FROM NEW.tier
        OR OLD.since IS DISTINCT FROM NEW.since
        OR OLD.progress::text IS DISTINCT FROM NEW.progress::text
        OR OLD.pinned_until IS DISTINCT FROM NEW.pinned_until
        OR OLD.customer_id IS DISTINCT FROM NEW.customer_id
    )) EXECUTE FUNCTION loyalty_badge_tier_changed()
    """,
    # An erasure unlinks the storefront id: the badge cached under it must go at once.
    """
    CREATE TRIGGER badge_customer_unlinked AFTER UPDATE OF external_id ON customer
    FOR EACH ROW WHEN (OLD.external_id IS DISTINCT FROM NEW.external_id)
    EXECUTE FUNCTION loyalty_badge_customer_changed()
    """,
    # Customers are never deleted once visible (a batch deletes only those it created itself), but a deletion
    # would take the badge with it.
    """
    CREATE TRIGGER badge_customer_deleted AFTER DELETE ON customer
    FOR EACH ROW EXECUTE FUNCTION loyalty_badge_customer_changed()
    """,
    """
    CREATE TRIGGER badge_tiers_truncated AFTER TRUNCATE ON customer_tier
    FOR EACH STATEMENT EXECUTE FUNCTION loyalty_badges_truncated()
    """,
    """
    CREATE TRIGGER badge_customers_truncated AFTER TRUNCATE ON customer
    FOR EACH STATEMENT EXECUTE FUNCTION loyalty_badges_truncated()
    """,
]

DOWNGRADE = [
    "DROP TRIGGER badge_customers_truncated ON customer",
    "DROP TRIGGER badge_tiers_truncated ON customer_tier",
    "DROP TRIGGER badge_customer_deleted ON customer",
    "DROP TRIGGER badge_customer_unlinked ON customer",
    "DROP TRIGGER badge_tier_changed ON customer_tier",
    "DROP TRIGGER badge_tier_written ON customer_tier",
    "DROP FUNCTION loyalty_badges_truncated()",
    "DROP FUNCTION loyalty_badge_customer_changed()",
    "DROP FUNCTION loyalty_badge_tier_changed()",
]


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for statement in DOWNGRADE:
        op.execute(statement)
