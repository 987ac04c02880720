"""Lists: `?limit=` (default 50, max 500) and an opaque `?cursor=`; every list answers `{items, next_cursor}`."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Annotated, Any, Generic, TypeVar

from litestar.params import Parameter, PathParameter
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.lib.errors import field_problem
from loyalty.lib.schemas import MAX_ID

T = TypeVar("T")

Limit = Annotated[int, Parameter(ge=1, le=500, description="Items per page (max 500).")]
Cursor = Annotated[str | None, Parameter(max_length=200, description="`next_cursor` of the previous page.")]


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None


def encode_cursor(position: str) -> str:
    return base64.urlsafe_b64encode(position.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The position a cursor stands for; a cursor we did not make is a 422 naming `cursor`."""
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise field_problem("cursor", "is not a cursor this API returned") from None


def decode_int_cursor(cursor: str) -> int:
    position = decode_cursor(cursor)
    if not re.fullmatch(r"[0-9]{1,18}", position):
        raise field_problem("cursor", "is not a cursor this API returned")
    return int(position)


# Ids in paths: positive and within a 64-bit column, so nothing out of range ever reaches the database.
IdPath = Annotated[int, PathParameter(ge=1, le=MAX_ID)]


async def newest_first(
    session: AsyncSession, model: Any, limit: int, cursor: str | None, view: Callable[[Any], T]
) -> Page[T]:
    """A page of ``model`` rows by descending id, each turned into its API shape by ``view``."""
    statement = select(model).order_by(model.id.desc()).limit(limit + 1)
    if cursor:
        statement = statement.where(model.id < decode_int_cursor(cursor))
    found = list((await session.scalars(statement)).all())
    next_cursor = encode_cursor(str(found[limit - 1].id)) if len(found) > limit else None
    return Page(items=[view(row) for row in found[:limit]], next_cursor=next_cursor)
