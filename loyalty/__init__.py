"""Loyalty: customer value, frequency and influence scores, reward tiers, and offers measured against holdouts."""

__version__ = "0.1.0"
