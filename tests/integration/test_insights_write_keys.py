"""Insights' one write under an Idempotency-Key: a repeated rebuild answers the first response (no
second rebuild), only to the admin who sent it; another admin reusing the key starts their own; a
changed request under the same key is a 422 (``tests.support.assert_key_scoped``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from services.insights.main import create_app
from shared.kit.settings import Settings
from tests.support import assert_key_scoped, bearer, service_client

COVERED = {"POST /v1/insights/rebuild"}


@pytest.fixture(scope="module")
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with service_client(create_app(settings)) as http:
        yield http


async def test_a_rebuild_key_is_the_callers_own(client: httpx.AsyncClient, settings: Settings) -> None:
    first = await assert_key_scoped(
        client, "POST", "/v1/insights/rebuild", owner=bearer(settings, "admin"), other=bearer(settings, "admin"),
        changed_path="/v1/insights/rebuild?again=1",
    )
    assert first.status_code == 202
    # the owner's repeat started no generation of its own: the other admin's rebuild was the only other one
    state = await client.get("/v1/insights/kpis", headers=bearer(settings, "admin"))
    assert state.status_code == 200
    generation = int(first.json()["generation"])
    again = await client.post("/v1/insights/rebuild", headers=bearer(settings, "admin"))
    assert again.json()["generation"] == generation + 2
