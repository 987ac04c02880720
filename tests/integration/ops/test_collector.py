"""A served process settles its garbage collector once started; an app built alone (tests, benches) does not."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from litestar.testing import AsyncTestClient

from loyalty.app import create_app, create_server_app
from loyalty.lib.collector import YOUNG_THRESHOLD
from loyalty.settings import Settings


@pytest.fixture
def collector_restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("collector_restored")
async def test_the_served_app_freezes_what_startup_built_and_collects_the_young_less_often(settings: Settings) -> None:
    gc.unfreeze()
    async with AsyncTestClient(app=create_app(settings)) as client:
        assert (await client.get("/health/live")).status_code == 200
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold()[0] != YOUNG_THRESHOLD

    async with AsyncTestClient(app=create_server_app(settings)) as client:
        # The routes, tables, statements and schemas startup built: well over ten thousand objects.
        frozen = gc.get_freeze_count()
        assert frozen > 10_000, frozen
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
        assert (await client.get("/health/live")).status_code == 200
