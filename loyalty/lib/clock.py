"""The one place that reads the time, and the bounds every incoming timestamp must respect."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime

EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
# Storefront clocks drift; a day of slack accepts them without accepting typos of years.
FUTURE_SLACK = timedelta(days=1)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _within_bounds(value: datetime) -> datetime:
    try:
        value = value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range") from None
    if value < EARLIEST:
        raise ValueError("must not be before 1970-01-01T00:00:00Z")
    if value > utcnow() + FUTURE_SLACK:
        raise ValueError("must not be more than a day in the future")
    return value


# Pydantic's AwareDatetime refuses a timestamp without an offset with "Input should have timezone info".
EventTime = Annotated[AwareDatetime, AfterValidator(_within_bounds)]


def _plannable(value: datetime) -> datetime:
    if not 1970 <= value.year <= 9000:
        raise ValueError("must be a date between 1970 and 9000")
    return value


# An instant someone plans ahead (a campaign's send, a pin's end): far bounds that are never in the way, and keep
# the year-9999 edge out, where converting to UTC or storing the value overflows.
PlannedTime = Annotated[AwareDatetime, AfterValidator(_plannable)]
