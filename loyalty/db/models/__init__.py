"""All tables, importable from one place so cross-domain foreign keys never cause import cycles."""

from loyalty.db.models.access import ApiKey
from loyalty.db.models.activity import InteractionEvent, Order, OrderItem, Referral, Refund
from loyalty.db.models.customer import Customer
from loyalty.db.models.scoring import CustomerScore, CustomerTier, RecalcRun, TierHistory

__all__ = [
    "ApiKey",
    "Customer",
    "CustomerScore",
    "CustomerTier",
    "InteractionEvent",
    "Order",
    "OrderItem",
    "RecalcRun",
    "Referral",
    "Refund",
    "TierHistory",
]
