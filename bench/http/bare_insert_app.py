"""The floor under `POST /v1/orders`: the same JSON in, one INSERT of the order (and of a new customer) out.

    python -m uvicorn --app-dir bench/http bare_insert_app:create_app --factory --workers N

A bench-only raw ASGI app: no framework, no validation, no key check, no re-score; it shares only the engine
setup (``loyalty.db.session.create_engine`` with the same settings), so the ratio of the real endpoint to this
one is what everything above the database costs. The folder has no ``__init__.py`` on purpose: a package named
``http`` would shadow the standard library's for every script run from ``bench/``.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.dialects import postgresql, sqlite

from loyalty.db.models import Customer, Order
from loyalty.db.session import create_engine
from loyalty.lib.clock import utcnow
from loyalty.lib.collector import settle_after_startup
from loyalty.settings import get_settings

Scope = dict[str, Any]


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _respond(send: Any, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app() -> Any:
    settings = get_settings()
    engine = create_engine(settings)
    dialect_insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    insert_customer = (
        dialect_insert(Customer).on_conflict_do_nothing(index_elements=["external_id"]).returning(Customer.id)
    )
    insert_order = insert(Order)

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    settle_after_startup()  # as the served app does, so that the two differ only in the request
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await engine.dispose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["method"] != "POST":
            await _respond(send, 200, {"status": "ok"})
            return
        order = json.loads(await _read_body(receive))
        now = utcnow()
        async with engine.begin() as connection:
            customer_id = await connection.scalar(
                select(Customer.id).where(Customer.external_id == order["customer_id"])
            )
            if customer_id is None:
                customer_id = await connection.scalar(
                    insert_customer,
                    {
                        "external_id": order["customer_id"],
                        "attributes": {},
                        "marketing_opt_out": False,
                        "created_at": now,
                        "updated_at": now,
                    },
                )
            await connection.execute(
                insert_order,
                {
                    "external_id": order["order_id"],
                    "customer_id": customer_id,
                    "placed_at": datetime.fromisoformat(order["placed_at"]),
                    "total": Decimal(order["total"]),
                    "refunded": Decimal(0),
                    "currency": order["currency"],
                    "channel": order.get("channel"),
                    "content_hash": "0" * 64,
                    "created_at": now,
                },
            )
        await _respond(send, 201, {"order_id": order["order_id"], "customer_id": order["customer_id"]})

    return app
