"""Customer tokens: only our own, unexpired, untampered HS256 tokens for our audience are accepted."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import jwt
import pytest

from loyalty.access.tokens import AUDIENCE, ISSUER, InvalidTokenError, mint_customer_token, verify_customer_token
from loyalty.lib.clock import utcnow

SECRET = "unit-test-secret-0123456789-0123456789-0123456789"


def _claims(**overrides: object) -> dict[str, object]:
    now = int(utcnow().timestamp())
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": "c-1", "cid": 1, "iat": now, "exp": now + 60, **overrides}


def test_round_trip() -> None:
    token, expires_at = mint_customer_token(7, "c-7", SECRET, 900)
    principal = verify_customer_token(token, SECRET)
    assert (principal.customer_id, principal.external_id) == (7, "c-7")
    assert timedelta(seconds=890) < expires_at - utcnow() <= timedelta(seconds=900)


def test_expired() -> None:
    token, _ = mint_customer_token(1, "c-1", SECRET, 60, now=utcnow() - timedelta(minutes=5))
    with pytest.raises(InvalidTokenError):
        verify_customer_token(token, SECRET)


def test_tampered_payload() -> None:
    token, _ = mint_customer_token(1, "c-1", SECRET, 60)
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"], claims["cid"] = "c-2", 2
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidTokenError):
        verify_customer_token(f"{header}.{forged}.{signature}", SECRET)


@pytest.mark.parametrize(
    "token",
    [
        jwt.encode(_claims(), "another-secret-0123456789-0123456789-0123456789", algorithm="HS256"),
        jwt.encode(_claims(aud="someone-else"), SECRET, algorithm="HS256"),
        jwt.encode(_claims(iss="someone-else"), SECRET, algorithm="HS256"),
        jwt.encode(_claims(), SECRET, algorithm="HS512"),
        jwt.encode({k: v for k, v in _claims().items() if k != "exp"}, SECRET, algorithm="HS256"),
        jwt.encode(_claims(cid="1"), SECRET, algorithm="HS256"),
        "not-a-token",
        "",
    ],
    ids=[
        "wrong-secret",
        "wrong-audience",
        "wrong-issuer",
        "other-algorithm",
        "no-expiry",
        "bad-claims",
        "garbage",
        "empty",
    ],
)
def test_refused(token: str) -> None:
    with pytest.raises(InvalidTokenError):
        verify_customer_token(token, SECRET)


def test_alg_none_is_refused() -> None:
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    payload = base64.urlsafe_b64encode(json.dumps(_claims()).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidTokenError):
        verify_customer_token(f"{header}.{payload}.", SECRET)
