"""The console's HTTP clients (issue 18): a connection pool per service, since httpcore's work per
request grows with the connections of its pool; a client handed in (tests) serves every service."""

from __future__ import annotations

import httpx

from services.console.clients import Services

URLS = {"certification": "http://certification.test", "registration": "http://registration.test"}


async def test_each_service_has_a_pool_of_its_own_closed_with_the_console() -> None:
    services = Services(URLS)
    certification = services.pool("certification")

    assert services.pool("certification") is certification
    assert services.pool("registration") is not certification
    assert certification is not services.http

    await services.close()
    assert certification.is_closed and services.pool("registration").is_closed and services.http.is_closed


async def test_a_given_client_answers_for_every_service() -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(200, json={"items": [], "total": 0})

    given = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    services = Services(URLS, http=given)

    assert services.pool("certification") is given and services.pool("registration") is given
    assert await services.applications("token", municipality="304018") == {"items": [], "total": 0}
    assert await services.registrations("token", municipality="304018") == {"items": [], "total": 0}
    assert seen == ["certification.test", "registration.test"]
    await services.close()
