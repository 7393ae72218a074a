"""Who the console lets through, page by page and role by role (the console's entries of the
authorisation matrix, ``CONSOLE_PAGES`` in tests/e2e/test_authorization.py), in-process.

Each actor has a session (a resident, 白浜町's reviewer, manager and auditor, a manager of another
municipality, readers, partners...) or none ("public"). The services behind the console are a stub
that answers every call with 503, so what is measured is the console's own gate: a refused actor
gets 403 (or, without a session, the sign-in page), an allowed one gets past it (the page then shows
the service's refusal, 502). Every form also needs the session's CSRF token. The sessions' cookie
flags, the CSV heading translation and the sign-out's revocation are checked here too.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.console.clients import ApiError, Json, Params, Services, Tokens
from services.console.main import create_app
from services.console.pages.base import Console
from services.console.pages.downloads import _translated_csv
from services.console.session import ANONYMOUS_CSRF_COOKIE, COOKIE, Session, SessionStore
from shared.kit.auth import Principal, Role, StaffRole
from shared.kit.settings import Settings
from tests.e2e.test_authorization import ACTORS, CONSOLE_PAGES

#: Path parameters: any well-formed value (the stub service answers every call the same).
PARAMETERS = {
    "application_id": "app-1", "registration_id": "reg-1", "number": "NCH-304018-2026-000001", "action": "revoke",
    "decision": "approve", "program_id": "jal-dual-residence-miles@304018", "donation_id": str(uuid.uuid4()),
    "notification_id": str(uuid.uuid4()), "export_id": str(uuid.uuid4()), "kind": "json", "code": "en",
    "table": "kpis", "activity_id": "304018-beach-cleanup",
}
CSRF = "csrf-of-the-session"


class Unavailable(Services):
    """Every service is down: what a page does past the console's gate shows as 502."""

    def __init__(self) -> None:
        super().__init__({}, http=httpx.AsyncClient())
        self.revoked: list[str] = []

    async def call(self, method: str, service: str, path: str, token: str | None, **kwargs: Any) -> Json:
        raise ApiError(503, "service-unavailable", service)

    async def open(self, service: str, path: str, token: str, params: Params | None = None) -> httpx.Response:
        raise ApiError(503, "service-unavailable", service)

    async def _token(self, form: dict[str, str], client_ip: str | None) -> Tokens:
        if form.get("password") == "right-password":
            return Tokens("access-token", "refresh-token", 900.0)
        raise ApiError(400, "invalid_grant", "wrong")

    async def revoke(self, token: str) -> None:
        self.revoked.append(token)


class MemorySessions(SessionStore):
    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.ttl_s = 3600

    async def load(self, session_id: str | None) -> Session | None:
        return self.sessions.get(session_id or "")

    async def save(self, session: Session) -> None:
        self.sessions[session.id] = session

    async def delete(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)


class Verifier:
    async def principal(self, token: str) -> Principal:
        return Principal("dev-shirahama-reviewer", Role.STAFF, municipality="304018", staff_role=StaffRole.REVIEWER)


def _session(actor: str) -> Session | None:
    staff = {"reviewer": ("304018", "reviewer"), "manager": ("304018", "manager"), "auditor": ("304018", "auditor"),
             "other_staff": ("131016", "manager")}
    fields: dict[str, Any] = {"subject": f"{actor}-1", "role": actor}
    if actor in ("resident", "other_resident"):
        fields = {"subject": f"res-{actor}", "role": "resident"}
    elif actor in staff:
        municipality, staff_role = staff[actor]
        fields = {"subject": f"staff-{actor}", "role": "staff", "municipality": municipality, "staff_role": staff_role}
    elif actor in ("prefecture", "other_prefecture"):
        fields = {"subject": actor, "role": "prefecture", "prefecture": "300004" if actor == "prefecture" else "130001"}
    elif actor in ("partner", "other_partner"):
        fields = {"subject": actor, "role": "partner"}
    elif actor == "public":
        return None
    return Session(id=f"session-{actor}", csrf=CSRF, access_token="t", refresh_token="r", expires_at=4e9,
                   username=f"{actor}@example.jp", **fields)


@pytest.fixture(scope="module")
def console() -> tuple[FastAPI, MemorySessions, Unavailable]:
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", env="development"))
    sessions, services = MemorySessions(), Unavailable()
    for actor in (*ACTORS, "public"):
        if (session := _session(actor)) is not None:
            sessions.sessions[session.id] = session
    app.state.console = Console(services=services, sessions=sessions, redis=None,  # type: ignore[arg-type]
                                verifier=Verifier(), secure_cookies=True, development=False)  # type: ignore[arg-type]
    return app, sessions, services


async def _request(app: FastAPI, key: str, actor: str, *, csrf: bool = True) -> httpx.Response:
    method, path = key.removeprefix("console ").split(" ", 1)
    path = re.sub(r"{(\w+)}", lambda m: PARAMETERS[m.group(1)], path)
    cookies = {ANONYMOUS_CSRF_COOKIE: CSRF}
    if (session := _session(actor)) is not None:  # afresh: an earlier request may have signed it out
        app.state.console.sessions.sessions[session.id] = session
        cookies[COOKIE] = session.id
    body = f"csrf={CSRF if csrf else 'forged'}&username=x%40example.jp&password=p"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://console.test",
                                 cookies=cookies) as client:
        if method == "POST":
            return await client.post(path, content=body,
                                     headers={"content-type": "application/x-www-form-urlencoded"})
        return await client.get(path)


def _refused(response: httpx.Response) -> bool:
    to_sign_in = response.status_code == 303 and response.headers["location"].startswith("/signin?next=")
    return to_sign_in or response.status_code == 403


@pytest.mark.parametrize("key", sorted(f"console {route}" for route in CONSOLE_PAGES))
async def test_the_console_lets_through_exactly_who_the_matrix_names(
    console: tuple[FastAPI, MemorySessions, Unavailable], key: str
) -> None:
    app, _, _ = console
    allowed = CONSOLE_PAGES[key.removeprefix("console ")]
    problems = []
    for actor in (*ACTORS, "public"):
        response = await _request(app, key, actor)
        if _refused(response) == (actor in allowed):
            problems.append(f"{actor}: {response.status_code} {response.headers.get('location', '')}")
        if response.status_code >= 500 and response.status_code != 502:
            problems.append(f"{actor}: {response.status_code} (a failure, not the service's refusal)")
    assert not problems, problems


@pytest.mark.parametrize("key", sorted(f"console {route}" for route in CONSOLE_PAGES if route.startswith("POST ")))
async def test_every_form_needs_the_csrf_token(console: tuple[FastAPI, MemorySessions, Unavailable], key: str) -> None:
    app, _, _ = console
    allowed = CONSOLE_PAGES[key.removeprefix("console ")]
    actor = next(a for a in ("manager", "resident", "public") if a in allowed)
    response = await _request(app, key, actor, csrf=False)
    assert response.status_code == 403, response.text[:300]
    assert "フォームの有効期限が切れました" in response.text


async def test_a_refused_page_is_html_in_the_users_language(console: tuple[FastAPI, MemorySessions, Unavailable]
                                                            ) -> None:
    app, _, _ = console
    response = await _request(app, "console GET /staff", "resident")
    assert response.status_code == 403 and response.headers["content-type"].startswith("text/html")
    assert '<html lang="ja">' in response.text and "このページを表示する権限がありません" in response.text
    # A service that does not answer: the page says so in Japanese, with the error summary.
    response = await _request(app, "console GET /staff/applications", "reviewer")
    assert response.status_code == 502 and "サービスが応答しませんでした" in response.text
    assert 'role="alert"' in response.text


async def test_sign_in_keeps_the_session_server_side_in_a_strict_cookie(
    console: tuple[FastAPI, MemorySessions, Unavailable]
) -> None:
    app, sessions, _ = console
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://console.test",
                                 cookies={ANONYMOUS_CSRF_COOKIE: CSRF}) as client:
        form = {"content-type": "application/x-www-form-urlencoded"}
        wrong = await client.post("/signin", content=f"csrf={CSRF}&username=r%40x.jp&password=wrong&totp=123456",
                                  headers=form)
        assert wrong.status_code == 401
        assert 'value="r@x.jp"' in wrong.text and "wrong" not in wrong.text  # the e-mail kept, never the password
        assert 'href="#field-' in wrong.text or "正しくありません" in wrong.text
        right = await client.post("/signin", content=f"csrf={CSRF}&username=r%40x.jp&password=right-password",
                                  headers=form)
    assert right.status_code == 303 and right.headers["location"] == "/staff"
    cookie = right.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert "Secure" in cookie  # outside development
    session_id = cookie.split(";")[0].split("=", 1)[1]
    session = sessions.sessions[session_id]
    assert len(session_id) >= 40 and session.access_token == "access-token" and session.refresh_token == "refresh-token"
    assert "access-token" not in cookie


async def test_sign_out_revokes_the_session_at_the_provider(console: tuple[FastAPI, MemorySessions, Unavailable]
                                                            ) -> None:
    app, sessions, services = console
    sessions.sessions["session-leaving"] = Session(
        id="session-leaving", csrf=CSRF, access_token="a", refresh_token="refresh-of-leaving", expires_at=4e9,
        subject="res-x", role="resident",
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://console.test",
                                 cookies={COOKIE: "session-leaving"}) as client:
        response = await client.post("/signout", content=f"csrf={CSRF}",
                                     headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 303 and response.headers["location"].startswith("/signin")
    assert "refresh-of-leaving" in services.revoked
    assert "session-leaving" not in sessions.sessions


async def test_a_services_csv_gets_japanese_headings_and_is_passed_on_as_it_comes() -> None:
    chunks = [
        b"\xef\xbb\xbfcertificate_number,resident_id,sta", b"tus\r\nNCH-1,res-1,valid\r\n", b"NCH-2,res-2,revoked\r\n",
    ]

    class Chunks(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

    response = httpx.Response(200, stream=Chunks())
    out = [part async for part in _translated_csv(response, "ja")]
    text = b"".join(out).decode("utf-8")
    assert text.startswith("\ufeff証明書番号,住民ID,状態\r\n")
    assert text.endswith("NCH-1,res-1,valid\r\nNCH-2,res-2,revoked\r\n")
    assert out[-1] == chunks[-1]  # the rest goes on chunk by chunk, never gathered


async def test_the_font_and_the_stylesheet_are_served_by_the_console(
    console: tuple[FastAPI, MemorySessions, Unavailable]
) -> None:
    app, _, _ = console
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://console.test") as client:
        font = await client.get("/fonts/ipaexg.ttf")
        css = await client.get("/static/console.css")
    assert font.status_code == 200 and font.headers["content-type"] == "font/ttf" and len(font.content) > 1_000_000
    assert css.status_code == 200 and 'url("/fonts/ipaexg.ttf")' in css.text
    assert "http" not in css.text  # no CDN


# --- pages past the gate: a stub service that answers, and records what the console sent ------------

SHIRAHAMA_CATALOGUE: Json = {"municipality_code": "304018", "municipality_name": "和歌山県白浜町", "items": [
    {"id": "304018-beach-cleanup", "code": "beach-cleanup", "name_ja": "海岸清掃", "name_en": "Beach clean-up",
     "kind": "environment", "kind_ja": "清掃・環境保全", "kind_en": "Clean-up and conservation", "season": "毎年8月",
     "evidence_required": False, "status": "published", "sample": True},
    {"id": "304018-fire-brigade", "code": "fire-brigade", "name_ja": "消防団の訓練", "name_en": "Fire brigade drill",
     "kind": "disaster_prevention", "kind_ja": "防災・消防団", "kind_en": "Disaster prevention", "season": None,
     "evidence_required": True, "status": "published", "sample": False},
]}


class Answering(Services):
    """The services answer from ``answers`` (by method and path); every call is kept in ``sent``. A
    ``refusal`` set for a method and path is raised instead (the service's problem)."""

    def __init__(self, answers: dict[str, Json], refusals: dict[str, ApiError] | None = None) -> None:
        super().__init__({}, http=httpx.AsyncClient())
        self.answers, self.refusals = answers, refusals or {}
        self.sent: list[tuple[str, str, Any]] = []

    async def call(self, method: str, service: str, path: str, token: str | None, **kwargs: Any) -> Json:
        self.sent.append((method, path, kwargs.get("json")))
        if (refusal := self.refusals.get(f"{method} {path}")) is not None:
            raise refusal
        return self.answers.get(f"{method} {path}", {})

    async def activity_catalogue(self, code: str, client_ip: str | None) -> Json:
        return await self.call("GET", "registration", f"/v1/public/municipalities/{code}/activities", None)


def _app_with(services: Services) -> FastAPI:
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", env="development"))
    sessions = MemorySessions()
    for actor in ("resident", "reviewer", "manager", "auditor"):
        session = _session(actor)
        assert session is not None
        sessions.sessions[session.id] = session
    app.state.console = Console(services=services, sessions=sessions, redis=None,  # type: ignore[arg-type]
                                verifier=Verifier(), secure_cookies=True, development=False)  # type: ignore[arg-type]
    return app


async def _as(app: FastAPI, actor: str, method: str, path: str, form: dict[str, str] | None = None,
              lang: str = "ja") -> httpx.Response:
    cookies = {COOKIE: f"session-{actor}", "nichiiki_lang": lang}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://console.test",
                                 cookies=cookies) as client:
        if method == "POST":
            return await client.post(path, data={"csrf": CSRF, **(form or {})})
        return await client.get(path)


RESIDENT_PROFILE: Json = {"name": "山田 花子", "registrations": [
    {"municipality_code": "304018", "municipality_name": "和歌山県白浜町", "tier": "basic", "status": "active"},
]}


async def test_the_premium_form_picks_from_the_catalogue_and_sends_activity_ids() -> None:
    services = Answering({"GET /v1/residents/res-resident": RESIDENT_PROFILE,
                          "GET /v1/public/municipalities/304018/activities": SHIRAHAMA_CATALOGUE})
    app = _app_with(services)
    page = await _as(app, "resident", "GET", "/my/premium")
    # The one basic registration is chosen: its catalogue is on the page, each entry a choice of every row.
    assert page.status_code == 200, page.text[:500]
    assert page.text.count('<option value="304018-fire-brigade"') == 5
    assert "消防団の訓練 — 証拠書類が必要" in page.text and "毎年8月" in page.text
    assert 'name="municipality_code" value="304018"' in page.text

    sent = await _as(app, "resident", "POST", "/my/premium", {
        "municipality_code": "304018", "attestation": "eyJ.att.sig",
        "activity_id_0": "304018-beach-cleanup", "activity_date_0": "2026-01-10",
        "activity_id_1": "", "activity_date_1": "2026-01-11",  # no activity chosen: not sent
        "activity_id_2": "304018-fire-brigade", "activity_date_2": "2026-02-01", "document_ref_2": "photo-17",
    })
    assert sent.status_code == 303 and sent.headers["location"].startswith("/my?notice=my.premium_requested")
    (body,) = [json for method, path, json in services.sent if method == "POST"]
    assert body == {"municipality_code": "304018", "tier": "premium", "attestation": "eyJ.att.sig", "activities": [
        {"activity_id": "304018-beach-cleanup", "date": "2026-01-10", "document_ref": None},
        {"activity_id": "304018-fire-brigade", "date": "2026-02-01", "document_ref": "photo-17"},
    ]}


async def test_a_refused_pick_is_named_by_its_row_and_what_was_typed_stays() -> None:
    refusal = ApiError(422, "activity-evidence-required", "activities[1]: 304018-fire-brigade needs a document_ref")
    services = Answering({"GET /v1/residents/res-resident": RESIDENT_PROFILE,
                          "GET /v1/public/municipalities/304018/activities": SHIRAHAMA_CATALOGUE},
                         {"POST /v1/residents/res-resident/registrations": refusal})
    app = _app_with(services)
    page = await _as(app, "resident", "POST", "/my/premium", {
        "municipality_code": "304018", "attestation": "eyJ.att.sig",
        "activity_id_0": "304018-beach-cleanup", "activity_date_0": "2026-01-10",
        "activity_id_3": "304018-fire-brigade", "activity_date_3": "2026-02-01",
    })
    assert page.status_code == 422
    # The second pick sent is the form's fourth row: the message links to its document reference.
    assert '<a href="#field-document_ref_3">活動 4: この活動には証拠書類の番号が必要です。</a>' in page.text
    assert re.search(r'<option value="304018-fire-brigade" selected>', page.text)
    assert re.search(r'name="activity_date_3" type="date"\s+value="2026-02-01"', page.text)
    assert "eyJ.att.sig" in page.text
    # A chosen activity without a date: the console says so and sends nothing.
    services.sent.clear()
    page = await _as(app, "resident", "POST", "/my/premium", {
        "municipality_code": "304018", "activity_id_1": "304018-beach-cleanup"}, lang="en")
    assert page.status_code == 422 and "Enter the date of activity 2." in page.text
    assert not [call for call in services.sent if call[0] == "POST"]


async def test_the_review_shows_each_picks_catalogue_entry() -> None:
    retired = {**SHIRAHAMA_CATALOGUE["items"][1], "status": "retired", "retired_at": "2026-03-01T00:00:00+09:00"}
    registration = {"id": "reg-1", "resident_id": "res-1", "municipality_name": "和歌山県白浜町", "tier": "basic",
                    "status": "active", "registered_at": "2026-01-01T10:00:00+09:00", "valid_until": None,
                    "awaiting_review": True, "reviews": [{
                        "kind": "upgrade", "status": "pending", "requested_at": "2026-03-02T10:00:00+09:00",
                        "identity_method": "jpki", "identity_provider": "https://verifier.example",
                        "identity_verified_at": "2026-03-02T09:00:00+09:00", "reason": None, "note": None,
                        "activities": [
                            {"activity_id": "304018-beach-cleanup", "name": "海岸清掃", "date": "2026-01-10",
                             "document_ref": None, "activity": SHIRAHAMA_CATALOGUE["items"][0]},
                            {"activity_id": "304018-fire-brigade", "name": "消防団の訓練", "date": "2026-02-01",
                             "document_ref": "photo-17", "activity": retired},
                            {"activity_id": None, "name": "棚田の草刈り", "date": "2025-06-01", "document_ref": None,
                             "activity": None},
                        ]}]}
    app = _app_with(Answering({"GET /v1/registrations/reg-1": registration}))
    page = await _as(app, "auditor", "GET", "/staff/registrations/reg-1")
    assert page.status_code == 200, page.text[:500]
    rows = re.findall(r'<tr data-activity="[^"]*">(.*?)</tr>', page.text, re.S)
    assert len(rows) == 3
    assert "海岸清掃" in rows[0] and "清掃・環境保全" in rows[0] and "指定中" in rows[0]
    assert "photo-17" in rows[1] and "防災・消防団" in rows[1] and "終了（2026-03-01）" in rows[1]
    assert "棚田の草刈り" in rows[2] and "自由記述" in rows[2]


async def test_managers_designate_change_and_retire_others_only_read() -> None:
    services = Answering({"GET /v1/public/municipalities/304018/activities": SHIRAHAMA_CATALOGUE})
    app = _app_with(services)
    for actor in ("reviewer", "auditor"):
        page = await _as(app, actor, "GET", "/staff/catalogue")
        assert page.status_code == 200 and "海岸清掃" in page.text and "サンプル" in page.text
        assert 'action="/staff/catalogue"' not in page.text and "管理者のみ" in page.text
        entry = await _as(app, actor, "GET", "/staff/catalogue/304018-fire-brigade")
        assert entry.status_code == 200 and "/retire" not in entry.text
        assert (await _as(app, actor, "POST", "/staff/catalogue/304018-fire-brigade/retire",
                          {"confirm": "yes"})).status_code == 403
    assert not [call for call in services.sent if call[0] != "GET"]

    page = await _as(app, "manager", "GET", "/staff/catalogue")
    assert 'action="/staff/catalogue"' in page.text and 'value="disaster_prevention"' in page.text
    created = await _as(app, "manager", "POST", "/staff/catalogue", {
        "code": "rice-planting", "name_ja": "田植え", "name_en": "Rice planting", "kind": "farming", "season": "",
        "evidence_required": "yes"})
    assert created.status_code == 303 and created.headers["location"] == "/staff/catalogue?notice=catalogue.created"
    changed = await _as(app, "manager", "POST", "/staff/catalogue/304018-beach-cleanup", {
        "name_ja": "海岸清掃", "name_en": "Beach clean-up", "kind": "environment", "season": "通年"})
    assert changed.status_code == 303
    unconfirmed = await _as(app, "manager", "POST", "/staff/catalogue/304018-beach-cleanup/retire")
    assert unconfirmed.status_code == 422 and "確認のチェック" in unconfirmed.text
    retired = await _as(app, "manager", "POST", "/staff/catalogue/304018-beach-cleanup/retire", {"confirm": "yes"})
    assert retired.status_code == 303
    writes = [(method, path, json) for method, path, json in services.sent if method != "GET"]
    assert writes == [
        ("POST", "/v1/municipalities/304018/activities", {
            "name_ja": "田植え", "name_en": "Rice planting", "kind": "farming", "season": None,
            "evidence_required": True, "code": "rice-planting"}),
        ("PATCH", "/v1/activities/304018-beach-cleanup", {
            "name_ja": "海岸清掃", "name_en": "Beach clean-up", "kind": "environment", "season": "通年",
            "evidence_required": False}),
        ("POST", "/v1/activities/304018-beach-cleanup/retire", None),
    ]
    # Not in the catalogue (retired, or another municipality's): no such page.
    assert (await _as(app, "manager", "GET", "/staff/catalogue/131016-other")).status_code == 404


async def test_a_refused_entry_keeps_what_was_typed_and_names_the_field() -> None:
    services = Answering({"GET /v1/public/municipalities/304018/activities": SHIRAHAMA_CATALOGUE},
                         {"POST /v1/municipalities/304018/activities": ApiError(409, "activity-exists", "taken")})
    page = await _as(_app_with(services), "manager", "POST", "/staff/catalogue", {
        "code": "beach-cleanup", "name_ja": "浜の清掃", "name_en": "Beach", "kind": "environment"})
    assert page.status_code == 409
    assert '<a href="#field-code">このコードはすでに使われています' in page.text
    assert 'value="浜の清掃"' in page.text


async def test_the_application_shows_the_schemes_basis_and_donations_their_deduction() -> None:
    application = {"application_id": "app-1", "status": "submitted", "resident_id": "res-1",
                   "submitted_at": "2026-03-01T10:00:00+09:00", "municipality_code": "304018",
                   "municipality_name": "和歌山県白浜町", "primary_residence_code": "131016", "planned_stay_days": 90,
                   "housing_basis": "rented", "address_there": "", "partners": [], "note": None}
    rules = {"legal_basis": "model_project", "plan_source": "reference", "plan_adopted_on": None,
             "valid_from": "2025-04-01", "valid_until": None, "min_stay_days": 30, "housing_bases": ["rented"],
             "validity_days": 365, "required_registration": "any_active"}
    donations = {"total": 2, "limit": 25, "offset": 0, "items": [
        {"id": "d-1", "donor_name": "東京 太郎", "payment_date": "2026-02-01", "amount": 10000, "unit": "jpy",
         "status": "confirmed", "kind": "hometown_tax", "special_deduction": False, "revitalisation_plan_id": None,
         "project": None, "receipt_number": None, "one_stop_requested": False},
        {"id": "d-2", "donor_name": "株式会社ニチイキ", "payment_date": "2026-02-02", "amount": 1000000, "unit": "jpy",
         "status": "confirmed", "kind": "corporate", "special_deduction": False,
         "revitalisation_plan_id": "RRP-304018-01", "project": None, "receipt_number": None,
         "one_stop_requested": False},
    ]}
    app = _app_with(Answering({
        "GET /v1/applications/app-1": application, "GET /v1/municipalities/304018/rules": rules,
        "GET /v1/municipalities/304018/audit": {"items": []},
        "GET /v1/municipalities/304018/donations": donations,
    }))
    page = await _as(app, "reviewer", "GET", "/staff/applications/app-1")
    assert page.status_code == 200, page.text[:500]
    assert "先導的モデル事業・市町村独自の制度" in page.text and "2025-04-01 – 定めなし" in page.text
    page = await _as(app, "reviewer", "GET", "/staff/donations")
    assert page.status_code == 200, page.text[:500]
    cells = re.findall(r'<td class="donation-kind">(.*?)</td>', page.text, re.S)
    assert "特例控除の対象外" in cells[0]
    assert "企業版ふるさと納税" in cells[1] and "RRP-304018-01" in cells[1] and "特例控除" not in cells[1]


def test_every_new_refusal_has_a_sentence_in_both_languages() -> None:
    from services.console import i18n

    for code in ("unknown-activity", "activity-of-another-municipality", "activity-retired",
                 "activity-evidence-required", "activity-not-designated", "invalid-activity-code",
                 "invalid-activity-name", "activity-exists", "activity-not-found", "activity-already-retired",
                 "no-certification-scheme", "scheme-not-in-force", "municipality-not-designated",
                 "corporate-recipient-excluded", "corporate-plan-required", "unknown-revitalisation-plan",
                 "revitalisation-plan-not-certified", "revitalisation-plan-not-applicable", "donor-erased"):
        for lang in ("ja", "en"):
            assert i18n.problem_title(code, 422, lang) != i18n.t("problem.status.422", lang), (code, lang)
    assert "problem.municipality-without-plan" not in i18n.CATALOGUE
