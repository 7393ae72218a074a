"""Rate limits over the real Redis: 429 problem+json with Retry-After past the limit, one caller's
flood never limits another, the limit lifts after the wait, and a Redis outage limits nobody.

Through the kit (``RateLimiter.hit`` and the leased ``take``), a sign-in route as the identity
provider wires it, the partner gateway's verification hot path and subsidy's partner redemptions.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

import httpx
import pytest
import pytest_asyncio
from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from services.partner_gateway.main import create_app as create_gateway
from services.subsidy.main import create_app as create_subsidy
from shared.contracts.formats import CertificateNumber
from shared.kit.auth import Principal, Role, require
from shared.kit.http import create_app
from shared.kit.rate_limit import (
    PARTNER_API,
    Limit,
    RateLimited,
    RateLimiter,
    limited_principal,
    public_limit,
    sign_in_limit,
)
from shared.kit.settings import Settings
from shared.stack.backends import Backends
from tests.conftest import make_settings
from tests.support import bearer, service_client

pytestmark = pytest.mark.stack

PROBLEM = "application/problem+json"


def assert_rate_limited(response: httpx.Response, limit: str) -> float:
    """The 429 answer; returns its Retry-After in seconds (as precise as the body says)."""
    assert response.status_code == 429, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["code"] == "rate-limited" and body["status"] == 429 and body["limit"] == limit
    retry_after = int(response.headers["retry-after"])
    assert retry_after >= 1 and retry_after >= body["retry_after_s"] > 0
    return float(body["retry_after_s"])


# --- The kit's limiter over Redis --------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def limiter(settings: Settings) -> AsyncIterator[RateLimiter]:
    limiter = RateLimiter(settings)
    yield limiter
    await limiter.close()


async def test_a_bucket_refuses_past_its_burst_and_refills_at_its_rate(limiter: RateLimiter) -> None:
    limit = Limit(f"test-{uuid.uuid4().hex[:6]}", rate=5.0, burst=3)
    for _ in range(3):
        await limiter.hit((limit, "alice"))
    with pytest.raises(RateLimited) as refused:
        await limiter.hit((limit, "alice"))
    # The next token comes one emission (1/5 s) after the last one taken.
    assert 0.1 < refused.value.retry_after_s <= 0.2
    assert refused.value.headers == {"Retry-After": "1"}
    await limiter.hit((limit, "bob"))  # another caller's bucket is full, not bob's
    await asyncio.sleep(refused.value.retry_after_s + 0.01)
    await limiter.hit((limit, "alice"))
    with pytest.raises(RateLimited):
        await limiter.hit((limit, "alice"))


async def test_several_buckets_are_all_or_nothing(limiter: RateLimiter) -> None:
    tight = Limit(f"tight-{uuid.uuid4().hex[:6]}", rate=1.0, burst=1)
    loose = Limit(f"loose-{uuid.uuid4().hex[:6]}", rate=100.0, burst=100)
    await limiter.hit((loose, "ip"), (tight, "alice"))
    with pytest.raises(RateLimited) as refused:
        await limiter.hit((loose, "ip"), (tight, "alice"))
    assert refused.value.extra["limit"] == tight.name
    # The refused request took nothing from the loose bucket: 99 more fit, the 100th does not.
    grant = await limiter.acquire(100, (loose, "ip"))
    assert grant is not None and grant.tokens == 99


async def test_leased_tokens_never_exceed_the_redis_bucket(settings: Settings) -> None:
    """Two processes (two limiters) taking from one bucket through leases get no more than it holds."""
    tuned = settings.model_copy(update={"rate_limit_lease_s": 0.5})
    first, second = RateLimiter(tuned), RateLimiter(tuned)
    limit = Limit(f"lease-{uuid.uuid4().hex[:6]}", rate=10.0, burst=20)  # leases of 5
    try:
        started = time.monotonic()
        passed = 0
        for index in range(60):
            try:
                await (first if index % 2 else second).take(limit, "jal")
                passed += 1
            except RateLimited as error:
                assert 0 < error.retry_after_s <= 0.1 + 1e-3
        elapsed = time.monotonic() - started
        # The burst and what the rate added meanwhile, nothing more; and at most a lease per process less.
        assert 20 - 2 * 5 <= passed <= 20 + 10 * elapsed + 1, (passed, elapsed)
        await first.take(limit, "ana")  # another partner's bucket is untouched
    finally:
        await first.close()
        await second.close()


async def test_redis_down_fails_open(settings: Settings) -> None:
    registry = CollectorRegistry()
    down = RateLimiter(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}), registry=registry)
    limit = Limit("down", rate=1.0, burst=1)
    try:
        started = time.monotonic()
        for _ in range(20):
            await down.hit((limit, "alice"))
            await down.take(limit, "jal")
        # One failed connection, then a second without asking Redis: no timeout per request.
        assert time.monotonic() - started < 1.0
        assert await down.acquire(1, (limit, "alice")) is None
        # Every check that passed for want of Redis is counted (the lease's pass covers its takes).
        assert (registry.get_sample_value("rate_limit_unavailable_total") or 0) >= 21
    finally:
        await down.close()


# --- Sign-in and public routes, wired as the identity provider wires its token endpoint --------


@dataclass
class Identity:
    app: FastAPI
    settings: Settings

    def client(self, ip: str | None = None) -> httpx.AsyncClient:
        """A client calling from ``ip`` (a new address unless given)."""
        transport = httpx.ASGITransport(app=self.app, client=(ip or new_ip(), 50000))
        return httpx.AsyncClient(transport=transport, base_url="http://identity")


def new_ip() -> str:
    return "10." + ".".join(str(random.randrange(1, 255)) for _ in range(3))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def identity(backends: Backends, run_id: str) -> AsyncIterator[Identity]:
    settings = make_settings(
        backends, f"{run_id}rl", rate_limit_sign_in_account_per_min=60, rate_limit_sign_in_account_burst=3,
        rate_limit_sign_in_ip_per_min=600, rate_limit_sign_in_ip_burst=6, rate_limit_public_per_min=600,
        rate_limit_public_burst=2, rate_limit_partner_per_s=5, rate_limit_partner_burst=2,
    )
    router = APIRouter()

    @router.post("/oauth/token", dependencies=[Depends(sign_in_limit)])
    async def token() -> JSONResponse:
        return JSONResponse({"access_token": "x", "token_type": "Bearer"})

    @router.get("/public/certificates/{number}", dependencies=[Depends(public_limit)])
    async def public(number: str) -> dict[str, str]:
        return {"number": number}

    @router.get("/partner/ping")
    async def ping(
        principal: Annotated[Principal, Depends(limited_principal(PARTNER_API, require(Role.PARTNER)))],
    ) -> dict[str, str | None]:
        return {"partner": principal.partner}

    app = create_app(service="identity", settings=settings, routers=[router], form_paths={"/oauth/token"})
    yield Identity(app, settings)
    await app.state.rate_limiter.close()


async def test_sign_in_is_limited_per_account(identity: Identity) -> None:
    account = f"alice-{uuid.uuid4().hex[:6]}@example.jp"
    async with identity.client() as one, identity.client() as other:
        form = {"grant_type": "password", "username": account, "password": "wrong"}
        for _ in range(3):
            assert (await one.post("/oauth/token", data=form)).status_code == 200
        # The account's fourth attempt is refused from any address, and in any letter case.
        response = await other.post("/oauth/token", data={**form, "username": account.upper()})
        assert_rate_limited(response, "sign-in-account")
        # Another account from the same address still signs in.
        assert (await one.post("/oauth/token", data={**form, "username": f"b-{account}"})).status_code == 200
        # A client of the client-credentials grant is an account too, whether it sends its id in the
        # form or with HTTP Basic.
        client_id = f"jal-{uuid.uuid4().hex[:6]}"
    async with identity.client() as one, identity.client() as other:
        for _ in range(3):
            response = await one.post("/oauth/token", data={"grant_type": "client_credentials"}, auth=(client_id, "s"))
            assert response.status_code == 200
        response = await other.post(
            "/oauth/token", data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": "s"}
        )
        retry = assert_rate_limited(response, "sign-in-account")
        # 60/min: a new attempt a second after the last one.
        assert 0.5 < retry <= 1.0
        await asyncio.sleep(retry + 0.05)
        assert (await other.post("/oauth/token", data={"grant_type": "client_credentials"}, auth=(client_id, "s"))
                ).status_code == 200


async def test_sign_in_is_limited_per_client_address(identity: Identity) -> None:
    async with identity.client() as flood, identity.client() as neighbour:
        for index in range(6):
            form = {"grant_type": "password", "username": f"u{index}-{uuid.uuid4().hex[:6]}", "password": "x"}
            assert (await flood.post("/oauth/token", data=form)).status_code == 200
        form = {"grant_type": "password", "username": f"new-{uuid.uuid4().hex[:6]}", "password": "x"}
        retry = assert_rate_limited(await flood.post("/oauth/token", data=form), "sign-in-ip")
        assert (await neighbour.post("/oauth/token", data=form)).status_code == 200
        await asyncio.sleep(retry + 0.05)
        form["username"] = f"later-{uuid.uuid4().hex[:6]}"
        assert (await flood.post("/oauth/token", data=form)).status_code == 200


async def test_public_routes_are_limited_per_client_address(identity: Identity) -> None:
    async with identity.client() as flood, identity.client() as neighbour:
        for _ in range(2):
            assert (await flood.get("/public/certificates/1")).status_code == 200
        assert_rate_limited(await flood.get("/public/certificates/1"), "public")
        assert (await neighbour.get("/public/certificates/1")).status_code == 200


async def test_a_principal_dependency_counts_per_partner(identity: Identity) -> None:
    def token(partner: str) -> dict[str, str]:
        return bearer(identity.settings, "partner", partner=partner, services=["identity"])

    # Another token of the same partner shares its bucket; another partner has its own.
    jal, jal_again, ana = token("jal"), token("jal"), token("ana")
    async with identity.client() as client:
        assert (await client.get("/partner/ping", headers=jal)).json() == {"partner": "jal"}
        assert (await client.get("/partner/ping", headers=jal)).status_code == 200
        assert_rate_limited(await client.get("/partner/ping", headers=jal_again), "partner")
        assert (await client.get("/partner/ping", headers=ana)).status_code == 200
        # Authentication comes first: no token is a 401, not a count.
        assert (await client.get("/partner/ping")).status_code == 401


# --- The partner gateway's verification hot path and subsidy's redemptions ----------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gateway(backends: Backends, run_id: str) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    settings = make_settings(
        backends, f"{run_id}rlgw", rate_limit_verify_per_s=10, rate_limit_verify_burst=10, rate_limit_lease_s=0.3,
    )
    async with service_client(create_gateway(settings)) as client:
        keys: dict[str, str] = {}
        for partner in ("jal", "ana"):
            response = await client.post(
                f"/v1/partners/{partner}/api-keys", json={"label": "rate limit tests"},
                headers=bearer(settings, "admin"),
            )
            assert response.status_code == 201, response.text
            keys[partner] = response.json()["api_key"]
        yield client, keys


async def test_verification_is_limited_per_partner_and_recovers(
    gateway: tuple[httpx.AsyncClient, dict[str, str]],
) -> None:
    client, keys = gateway
    path = f"/v1/certificates/{CertificateNumber.format('304018', 2026, 4242)}"  # unknown: a 404 when let through
    jal, ana = {"X-Api-Key": keys["jal"]}, {"X-Api-Key": keys["ana"]}
    started = time.monotonic()
    answers = [(await client.get(path, headers=jal)) for _ in range(40)]
    elapsed = time.monotonic() - started
    passed = [a for a in answers if a.status_code == 404]
    refused = [a for a in answers if a.status_code == 429]
    assert len(passed) + len(refused) == len(answers)
    # The burst (10) and what 10/s adds meanwhile; at most one lease (3) less for the leasing.
    assert 10 - 3 <= len(passed) <= 10 + 10 * elapsed + 1, (len(passed), elapsed)
    retry = assert_rate_limited(refused[-1], "verification")
    assert refused[-1].headers["x-request-id"]  # answered inside the kit's middleware like any request
    # JAL's flood does not limit ANA.
    assert (await client.get(path, headers=ana)).status_code == 404
    await asyncio.sleep(retry + 0.05)
    assert (await client.get(path, headers=jal)).status_code == 404
    metrics = (await client.get("/metrics")).text
    assert 'rate_limit_refusals_total{limit="verification"}' in metrics


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def subsidy(backends: Backends, run_id: str) -> AsyncIterator[tuple[httpx.AsyncClient, Settings]]:
    settings = make_settings(backends, f"{run_id}rlsub", rate_limit_partner_per_s=2, rate_limit_partner_burst=3)
    async with service_client(create_subsidy(settings)) as client:
        yield client, settings


async def test_redemptions_are_limited_per_partner(subsidy: tuple[httpx.AsyncClient, Settings]) -> None:
    client, settings = subsidy
    jal, ana = bearer(settings, "partner", partner="jal"), bearer(settings, "partner", partner="ana")

    def trip() -> dict[str, str]:
        return {"grant_id": f"G-{uuid.uuid4().hex[:8]}", "certificate_number": "304018-2026-000001",
                "trip_id": f"T-{uuid.uuid4().hex[:8]}", "trip_kind": "one_way", "travelled_on": "2026-01-05"}

    answers = [await client.post("/v1/redemptions", json=trip(), headers=jal) for _ in range(3)]
    assert all(a.status_code != 429 for a in answers), [a.text for a in answers]
    retry = assert_rate_limited(await client.post("/v1/redemptions", json=trip(), headers=jal), "partner")
    assert 0 < retry <= 0.5
    assert (await client.post("/v1/redemptions", json=trip(), headers=ana)).status_code != 429
    await asyncio.sleep(retry + 0.05)
    assert (await client.post("/v1/redemptions", json=trip(), headers=jal)).status_code != 429
