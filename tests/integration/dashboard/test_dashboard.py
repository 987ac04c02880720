"""The marketing dashboard through the app: sign-in, the session cookie, and what the page embeds."""

from __future__ import annotations

import json
import re
from typing import Any

from sqlalchemy import select

from loyalty.access.services import revoke_key
from loyalty.dashboard.sessions import COOKIE_NAME
from loyalty.db.models import ApiKey
from loyalty.db.session import transaction


def embedded_data(html: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="dashboard-data">(.*?)</script>', html, re.S)
    assert match, "the page embeds its data"
    return dict(json.loads(match.group(1)))


async def sign_in(client: Any, key: str) -> Any:
    return await client.post("/dashboard/sign-in", data={"key": key}, follow_redirects=False)


async def test_without_a_session_the_dashboard_redirects_to_sign_in(client) -> None:
    response = await client.get("/dashboard", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard/sign-in"
    form = await client.get("/dashboard/sign-in")
    assert form.status_code == 200
    assert 'name="key"' in form.text
    assert "default-src 'none'" in form.headers["content-security-policy"]
    forged_cookie = {"Cookie": f"{COOKIE_NAME}=1.99999999999.deadbeef"}
    forged = await client.get("/dashboard", headers=forged_cookie, follow_redirects=False)
    assert forged.status_code == 303


async def test_storefront_and_unknown_keys_are_refused(client, keys) -> None:
    for key in (keys.storefront, "lty_not-a-key", ""):
        response = await sign_in(client, key)
        assert response.status_code == 401
        assert "cannot open the dashboard" in response.text
        assert COOKIE_NAME not in response.cookies
    assert (await client.get("/dashboard", follow_redirects=False)).status_code == 303


async def test_a_marketing_key_opens_a_session_until_sign_out_or_revocation(client, keys, session_maker) -> None:
    response = await sign_in(client, keys.marketing)
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "samesite=strict" in cookie.lower()
    assert "Path=/dashboard" in cookie
    assert "Max-Age=28800" in cookie
    assert keys.marketing not in cookie, "the key itself never travels in the cookie"
    page = await client.get("/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "No recalculation has written tiers yet." in page.text

    signed_out = await client.post("/dashboard/sign-out", follow_redirects=False)
    assert signed_out.status_code == 303
    assert (await client.get("/dashboard", follow_redirects=False)).status_code == 303

    assert (await sign_in(client, keys.marketing)).status_code == 303
    async with transaction(session_maker) as session:
        key_id = await session.scalar(select(ApiKey.id).where(ApiKey.scope == "marketing"))
        assert key_id is not None
        await revoke_key(session, key_id)
    assert (await client.get("/dashboard", follow_redirects=False)).status_code == 303


async def test_an_admin_key_also_signs_in(client, keys) -> None:
    assert (await sign_in(client, keys.admin)).status_code == 303
    assert (await client.get("/dashboard")).status_code == 200


async def test_the_page_embeds_tiers_moves_campaigns_and_runs(client, keys, shop) -> None:
    assert (await sign_in(client, keys.marketing)).status_code == 303
    page = await client.get("/dashboard")
    assert page.status_code == 200
    data = embedded_data(page.text)
    assert [tier["id"] for tier in data["tiers"]] == ["vip", "nurture", "one_time", "prospect"]
    segments = data["segments"]["items"]
    assert sum(segment["customers"] for segment in segments) == data["segments"]["customers"] >= 800
    assert abs(sum(segment["revenue_share"] for segment in segments) - 1) < 0.01
    assert all(set(segment["scores"]) == {"value", "frequency", "influence"} for segment in segments)
    moves = data["last_run"]["moves"]
    # Every customer was placed by the run (prospects included), so the matrix covers the whole base.
    assert sum(count for targets in moves.values() for count in targets.values()) == data["segments"]["customers"]
    assert data["move_sources"][0] == "none", "a first run moves everyone from no tier"
    (campaign,) = data["campaigns"]
    assert campaign["campaign_id"] == shop
    assert campaign["issued"] > 0
    assert campaign["holdout"] > 0
    assert campaign["revenue_per_customer"]["treatment"] is not None
    assert [run["status"] for run in data["runs"]] == ["succeeded"]
    # The campaign name is data: escaped in the HTML table and inside the JSON (no element can be closed).
    assert "Spring VIP &lt;thanks&gt;" in page.text
    assert "Spring VIP <thanks>" not in page.text
    for canvas in ("chart-tier-sizes", "chart-revenue-share", "chart-scores", "chart-moves", "chart-campaigns"):
        assert f'id="{canvas}"' in page.text
    assert (await client.get("/dashboard/static/chart.umd.js")).status_code == 200


async def test_the_dashboard_is_in_the_schema_and_sign_in_is_not(client) -> None:
    paths = (await client.get("/schema/openapi.json")).json()["paths"]
    assert "/dashboard" in paths
    assert paths["/dashboard"]["get"]["summary"]
    assert not any(path.startswith(("/dashboard/sign", "/dashboard/static")) for path in paths)


async def test_api_credentials_get_the_api_401_not_the_sign_in_page(client, keys) -> None:
    for headers in (keys.headers("marketing"), {"Authorization": "Bearer x"}):
        for path in ("/dashboard", "/dashboard/sign-in", "/dashboard/static/chart.umd.js"):
            response = await client.get(path, headers=headers, follow_redirects=False)
            assert response.status_code == 401
            assert response.headers["content-type"].startswith("application/problem+json")
