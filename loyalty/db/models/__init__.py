"""All tables, importable from one place so cross-domain foreign keys never cause import cycles."""

from loyalty.db.models.access import ApiKey
from loyalty.db.models.activity import InteractionEvent, Order, OrderItem, Referral, Refund
from loyalty.db.models.customer import Customer
from loyalty.db.models.offers import (
    Campaign,
    CampaignMember,
    CampaignSend,
    IssuedCode,
    Offer,
    OutboxEvent,
    Redemption,
)
from loyalty.db.models.scoring import CustomerScore, CustomerTier, RecalcRun, TierHistory
from loyalty.db.models.webhooks import WebhookDelivery, WebhookEndpoint

__all__ = [
    "ApiKey",
    "Campaign",
    "CampaignMember",
    "CampaignSend",
    "Customer",
    "CustomerScore",
    "CustomerTier",
    "InteractionEvent",
    "IssuedCode",
    "Offer",
    "Order",
    "OrderItem",
    "OutboxEvent",
    "RecalcRun",
    "Redemption",
    "Referral",
    "Refund",
    "TierHistory",
    "WebhookDelivery",
    "WebhookEndpoint",
]
