"""The dashboard in a real headless Chromium (Debian's browser driven by Playwright) against a real server.

Without /usr/bin/chromium (or the playwright package) the test is skipped with the reason, never passed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from loyalty.settings import PROJECT_ROOT
from tests.support import running_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = PROJECT_ROOT / "test-artifacts"
CANVASES = ("chart-tier-sizes", "chart-revenue-share", "chart-scores", "chart-moves", "chart-campaigns")
# A canvas counts as drawn when its image differs from a blank canvas of the same size.
DRAWN_CANVASES_JS = """
() => Array.from(document.querySelectorAll("canvas"))
    .filter((canvas) => {
        const blank = document.createElement("canvas");
        blank.width = canvas.width;
        blank.height = canvas.height;
        return canvas.width > 0 && canvas.toDataURL() !== blank.toDataURL();
    })
    .map((canvas) => canvas.id)
"""


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.skip("Chromium not installed: apt-get install chromium")
    pytest.importorskip("playwright.async_api", reason="playwright not installed: pip install -e '.[test]'")
    return CHROMIUM


@pytest.fixture
async def server(settings: Any, engine: Any, shop: int, tmp_path: Path) -> AsyncIterator[str]:
    """A real server process on the test database, started after the shop's data is in place."""
    async with running_server(settings, tmp_path / "serve.log") as base:
        yield base


@pytest.mark.slow
async def test_dashboard_renders_its_charts_in_chromium(chromium, server, keys, database) -> None:
    from playwright.async_api import async_playwright

    suffix = "" if database.dialect == "sqlite" else f"-{database.dialect}"
    ARTIFACTS.mkdir(exist_ok=True)
    problems: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1366, "height": 900})
            page.on(
                "console",
                lambda message: (
                    problems.append(f"console {message.type}: {message.text}")
                    if message.type in ("error", "warning")
                    else None
                ),
            )
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url}"))

            await page.goto(f"{server}/dashboard")
            assert page.url.endswith("/dashboard/sign-in"), "without a session the browser lands on the sign-in page"
            await page.fill("#key", keys.storefront)
            await page.click("button[type=submit]")
            assert "cannot open the dashboard" in await page.inner_text("[role=alert]")
            problems.clear()  # the refused sign-in's 401 is reported by Chromium as a failed resource load

            await page.fill("#key", keys.marketing)
            await page.click("button[type=submit]")
            await page.wait_for_url(f"{server}/dashboard")
            await page.wait_for_function("Object.keys(Chart.instances).length === 5")
            assert sorted(await page.evaluate(DRAWN_CANVASES_JS)) == sorted(CANVASES)
            assert "Spring VIP <thanks>" in await page.inner_text("body")
            await page.screenshot(path=ARTIFACTS / f"dashboard{suffix}.png", full_page=True)

            # A phone: one column, nothing wider than the screen (wide tables scroll inside their cards).
            await page.set_viewport_size({"width": 390, "height": 844})
            await page.wait_for_timeout(300)
            assert await page.evaluate("document.documentElement.scrollWidth") <= 390
            assert sorted(await page.evaluate(DRAWN_CANVASES_JS)) == sorted(CANVASES)
            await page.screenshot(path=ARTIFACTS / f"dashboard-phone{suffix}.png", full_page=True)
        finally:
            await browser.close()
    assert problems == []
