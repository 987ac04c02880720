"""Customer tokens: short-lived HS256 JWTs for one customer, minted by the storefront."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import jwt

from loyalty.lib.clock import utcnow

ISSUER = "loyalty"
AUDIENCE = "loyalty:customer"
# Fixed: a token cannot choose its own algorithm, so `none` and RS/HS confusion are refused by construction.
ALGORITHM = "HS256"


@dataclass(frozen=True)
class CustomerPrincipal:
    """The customer a valid token speaks for."""

    customer_id: int
    external_id: str


class InvalidTokenError(Exception):
    """The token is malformed, tampered with, expired, or meant for someone else."""


def mint_customer_token(
    customer_id: int, external_id: str, secret: str, ttl_seconds: int, now: datetime | None = None
) -> tuple[str, datetime]:
    issued = now or utcnow()
    expires = issued + timedelta(seconds=ttl_seconds)
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": external_id,
        "cid": customer_id,
        "iat": int(issued.timestamp()),
        "exp": int(expires.timestamp()),
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM), expires.replace(microsecond=0)


def verify_customer_token(token: str, secret: str) -> CustomerPrincipal:
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": ["exp", "iat", "iss", "aud", "sub", "cid"]},
        )
    except jwt.PyJWTError as error:
        raise InvalidTokenError(type(error).__name__) from None
    customer_id, external_id = claims.get("cid"), claims.get("sub")
    if not isinstance(customer_id, int) or not isinstance(external_id, str):
        raise InvalidTokenError("malformed claims")
    return CustomerPrincipal(customer_id=customer_id, external_id=external_id)
