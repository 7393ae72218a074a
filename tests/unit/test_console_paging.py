"""What the staff pages ask the services, and how (issue 18, pages at municipal volume): a page's
calls go out at once, "next" links read after the last row shown (keyset), and the expiring list
asks certification for just those certificates. The services are a stub that records every call
and answers after a delay, counting how many it holds at once: a page that waited for its calls one
after another never has more than one in flight.
"""

from __future__ import annotations

import asyncio
from datetime import date, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.console.clients import Json, Services
from services.console.main import create_app
from services.console.pages.base import Console, Pager
from services.console.session import COOKIE, Session
from shared.kit.clock import SYSTEM_CLOCK
from shared.kit.settings import Settings
from tests.unit.test_console_pages import MemorySessions, Verifier

DELAY_S = 0.2


def _application(n: int) -> Json:
    return {"application_id": f"app-{n}", "submitted_at": "2026-12-01T10:00:00+09:00", "planned_stay_days": 60,
            "housing_basis": "rented", "status": "submitted", "municipality_code": "304018",
            "primary_residence_code": "131016", "partners": [], "certificate_number": None}


def _registration(n: int) -> Json:
    return {"id": f"reg-{n}", "name": f"山田 {n}", "name_kana": "ヤマダ", "tier": "basic", "status": "active",
            "registered_at": "2026-12-01T10:00:00+09:00", "awaiting_review": None}


class Recording(Services):
    """Every call recorded (service, path, query) and answered after ``DELAY_S`` with a page of 25 of
    a list of 10,000."""

    def __init__(self) -> None:
        super().__init__({}, http=httpx.AsyncClient())
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.in_flight = self.most_in_flight = 0

    async def call(self, method: str, service: str, path: str, token: str | None, **kwargs: Any) -> Json:
        params = {k: v for k, v in (kwargs.get("params") or {}).items() if v is not None}
        self.calls.append((service, path, params))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(DELAY_S)
        finally:
            self.in_flight -= 1
        limit = int(params.get("limit", 25))
        if path == "/v1/applications":
            return {"items": [_application(n) for n in range(limit)], "total": 10_000, "limit": limit, "offset": 0}
        if path == "/v1/registrations":
            return {"items": [_registration(n) for n in range(limit)], "total": 100_000, "limit": limit, "offset": 0}
        if path.startswith("/v1/applications/"):
            return _application(1)
        if path.endswith("/rules"):
            return {"min_stay_days": 30, "housing_bases": ["rented"], "required_registration": "any_active"}
        if path.endswith("/certificates"):
            return {"items": [], "total": 7, "limit": limit, "offset": 0}
        return {"items": [], "total": 0, "limit": limit, "offset": 0}


@pytest.fixture
def staff_console() -> tuple[FastAPI, Recording]:
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", env="development"))
    sessions, services = MemorySessions(), Recording()
    sessions.sessions["s"] = Session(
        id="s", csrf="c", access_token="t", refresh_token="r", expires_at=4e9, subject="staff-1", role="staff",
        municipality="304018", staff_role="reviewer",
    )
    app.state.console = Console(services=services, sessions=sessions, redis=None,  # type: ignore[arg-type]
                                verifier=Verifier(), secure_cookies=True, development=False)  # type: ignore[arg-type]
    return app, services


async def _get(app: FastAPI, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://console.test",
                                 cookies={COOKIE: "s"}) as client:
        return await client.get(path)


async def test_the_home_page_asks_the_four_services_at_once(staff_console: tuple[FastAPI, Recording]) -> None:
    app, services = staff_console
    response = await _get(app, "/staff")
    assert response.status_code == 200, response.text
    assert len(services.calls) == 4 and services.most_in_flight == 4
    [expiring] = [params for _, path, params in services.calls if path.endswith("/certificates")]
    assert expiring["status"] == "valid" and expiring["limit"] == 1 and "valid_until_before" in expiring
    assert '<span class="count">7</span>' in response.text  # the service's count of expiring certificates


async def test_an_application_and_its_rules_and_trail_are_asked_for_at_once(
    staff_console: tuple[FastAPI, Recording]
) -> None:
    app, services = staff_console
    response = await _get(app, "/staff/applications/app-1")
    assert response.status_code == 200, response.text
    assert sorted(path for _, path, _ in services.calls) == [
        "/v1/applications/app-1", "/v1/municipalities/304018/audit", "/v1/municipalities/304018/rules"]
    assert services.most_in_flight == 3


async def test_the_expiring_list_is_one_filtered_call(staff_console: tuple[FastAPI, Recording]) -> None:
    app, services = staff_console
    response = await _get(app, "/staff/certificates/expiring")
    assert response.status_code == 200, response.text
    [(service, path, params)] = services.calls
    assert (service, path) == ("certification", "/v1/municipalities/304018/certificates")
    assert params["status"] == "valid" and date.fromisoformat(params["valid_until_before"]) == (
        SYSTEM_CLOCK.today() + timedelta(days=31))  # within 30 days, the 30th included
    assert services.most_in_flight == 1


@pytest.mark.parametrize(("page", "service_path", "key"), [
    ("/staff/applications", "/v1/applications", "app-24"), ("/staff/residents", "/v1/registrations", "reg-24"),
])
async def test_next_links_read_after_the_last_row_and_deep_pages_use_them(
    staff_console: tuple[FastAPI, Recording], page: str, service_path: str, key: str
) -> None:
    app, services = staff_console
    first = await _get(app, page)
    assert f'{page}?after={key}&amp;offset=25" rel="next"' in first.text

    deep = await _get(app, f"{page}?after={key}&offset=9950")
    assert deep.status_code == 200, deep.text
    _, path, params = services.calls[-1]
    assert path == service_path and params["after"] == key and "offset" not in params  # an index range, no OFFSET
    assert f"offset={9950 - 25}" in deep.text  # "previous" still goes back a page


def test_the_pager_numbers_keyset_pages_by_their_offset() -> None:
    pager = Pager(total=100, limit=25, offset=50, base="/staff/residents", query={"tier": "basic"}, after="reg-74")
    assert (pager.first, pager.last) == (51, 75)
    assert pager.next == "/staff/residents?tier=basic&after=reg-74&offset=75"
    assert pager.previous == "/staff/residents?tier=basic&offset=25"
    last = Pager(total=100, limit=25, offset=75, base="/b", query={}, after="reg-99")
    assert last.next is None
    assert Pager(total=100, limit=25, offset=0, base="/b", query={}).next == "/b?offset=25"
