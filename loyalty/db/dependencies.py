"""The request's transaction: one HTTP request, one transaction, committed before the response is sent."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from litestar import Request
from litestar.datastructures import State
from sqlalchemy.ext.asyncio import AsyncSession


async def provide_session(state: State, request: Request[Any, Any, Any]) -> AsyncGenerator[AsyncSession, None]:
    """Commit when the handler returns, roll back when it raises.

    Litestar closes yield-dependencies before it sends the response, so a failed commit becomes an error
    response instead of a 2xx for a write that never landed. GET requests only read, and get a read-only session.
    """
    maker = state.read_session_maker if request.method in ("GET", "HEAD") else state.session_maker
    async with maker() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        else:
            await session.commit()
