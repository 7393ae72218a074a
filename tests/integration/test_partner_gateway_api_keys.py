"""API keys across gateway processes: a key revoked through one is refused by the others at once.

Two gateways on one database and one Redis stand for two HTTP worker processes (or replicas): each
has its own in-memory API-key cache, which is what a revocation has to reach.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from services.partner_gateway.cache import generation_key
from services.partner_gateway.main import create_app
from shared.contracts.formats import CertificateNumber
from tests.support import bearer, service_client

pytestmark = pytest.mark.stack

SHIRAHAMA = "304018"


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["code"] == "invalid-api-key"


async def test_a_key_revoked_through_one_process_is_refused_by_another_at_once(backends: Any, run_id: str) -> None:
    from tests.conftest import make_settings

    settings = make_settings(backends, run_id + "ak")
    admin = bearer(settings, "admin")
    number = CertificateNumber.format(SHIRAHAMA, 2026, 1)  # no such certificate: 404 for an accepted key
    # A kid in a UUID's own form: 32 bare hex digits hold, about 1 time in 800, twelve decimal digits with
    # a valid check digit, which the My Number guard refuses (422) before the route looks.
    verify, key_route = f"/v1/certificates/{number}", f"/v1/keys/{uuid.uuid4()}"
    one, other = create_app(settings), create_app(settings)
    async with service_client(one) as first, service_client(other) as second:
        created = (await first.post("/v1/partners/jal/api-keys", json={"label": "two"}, headers=admin)).json()
        jal = {"X-Api-Key": created["api_key"]}
        # The other process accepts the key and caches it (the hot path, and a route through FastAPI).
        for _ in range(2):
            assert (await second.get(verify, headers=jal)).status_code == 404
            assert (await second.get(key_route, headers=jal)).status_code == 404
        assert other.state.gateway.api_keys.cached(created["api_key"]) is not None

        revoked = await first.delete(f"/v1/partners/jal/api-keys/{created['id']}", headers=admin)
        assert revoked.status_code == 204
        # Well within the other process's 30 s cache: refused on its next request.
        assert_refused(await second.get(verify, headers=jal))
        assert_refused(await second.get(key_route, headers=jal))
        assert_refused(await first.get(verify, headers=jal))

        # A key issued after the revocation works in both; Redis losing the generation (a restart)
        # only makes each process look its keys up again.
        fresh = (await first.post("/v1/partners/jal/api-keys", headers=admin)).json()["api_key"]
        assert (await second.get(verify, headers={"X-Api-Key": fresh})).status_code == 404
        redis = Redis.from_url(settings.redis_url or "")
        try:
            assert await redis.delete(generation_key(settings)) == 1
        finally:
            await redis.aclose()
        assert (await second.get(verify, headers={"X-Api-Key": fresh})).status_code == 404
        assert_refused(await second.get(verify, headers=jal))
