"""Certification over the real broker and database: the journey, every refusal, withdrawal, replay, expiry.

Residents reach the service only as ``registration.residents.v1`` events, which these tests publish
themselves. 和歌山県白浜町 (304018) has a plan; 東京都千代田区 (131016) has none and is the
residents' legal address. The module shares one running service and database; the replay and
scheduler tests start their own (fresh database, own consumer group).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import ConsumerRecord
from fastapi import FastAPI

from services.certification import handlers
from services.certification.main import CertificationConfig, create_app, seed_municipality_rules
from shared.contracts.base import EventData
from shared.contracts.certification import (
    ApplicationRejected,
    ApplicationSubmitted,
    CertificateExpired,
    CertificateExpiring,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
)
from shared.contracts.common import PartnerMembership, SealedMembership
from shared.contracts.formats import CertificateNumber
from shared.contracts.registration import (
    ConsentChanged,
    ConsentState,
    Contact,
    ContactChanged,
    PremiumApproved,
    PremiumExpired,
    PremiumRejected,
    PremiumRequested,
    RegistrationWithdrawn,
    ResidentRegistered,
    ResidentWithdrawn,
)
from shared.contracts.sealed import resident_subject
from shared.contracts.topics import APPLICATIONS, CERTIFICATES, RESIDENTS
from shared.kit.clock import JAPAN, SYSTEM_CLOCK, Clock
from shared.kit.envelope import Envelope, new_envelope, parse_envelope
from shared.kit.service import ServiceRuntime
from shared.kit.settings import Settings
from shared.kit.use_case import Work
from shared.reference import municipalities_with_plan, prefecture_of, travel_programs
from tests.support import bearer, eventually, produce, read_topic, seal_for_tests, service_client

SHIRAHAMA = "304018"  # 和歌山県白浜町: has a 特定居住促進計画
CHIYODA = "131016"  # 東京都千代田区: no plan; the residents' legal address
TANABE = "302066"  # 和歌山県田辺市: has a plan
SUSAMI = "304069"  # 和歌山県すさみ町: has a plan; its rules are edited in one test
SHIOJIRI = "202151"  # 長野県塩尻市: has a plan; only the queue test applies there
HACHIOJI = "132012"  # 東京都八王子市: no plan until an admin records one
PROBLEM = "application/problem+json"


class FakeClock:
    """Today in Japan, movable by tests; ``clock`` is the kit's clock reading it."""

    def __init__(self) -> None:
        self.today = SYSTEM_CLOCK.today()
        self.clock = Clock(self.now)

    def now(self) -> datetime:
        # The current time of day on the (movable) day in Japan.
        real = datetime.now(JAPAN)
        return datetime.combine(self.today, real.timetz()).astimezone(UTC)


@dataclass
class Harness:
    settings: Settings
    client: httpx.AsyncClient
    app: FastAPI
    clock: FakeClock

    @property
    def runtime(self) -> ServiceRuntime:
        runtime: ServiceRuntime = self.app.state.runtime
        return runtime

    @property
    def pool(self) -> asyncpg.Pool:
        return self.runtime.pool

    def resident(self, resident_id: str) -> dict[str, str]:
        return bearer(self.settings, "resident", resident_id)

    def staff(self, code: str = SHIRAHAMA) -> dict[str, str]:
        return bearer(self.settings, "staff", municipality=code)

    def admin(self) -> dict[str, str]:
        return bearer(self.settings, "admin")


@pytest.fixture(scope="module")
async def h(settings: Settings) -> AsyncIterator[Harness]:
    clock = FakeClock()
    app = create_app(settings, config=CertificationConfig(expiry_interval_s=3600), clock=clock.clock)
    async with service_client(app) as client:
        yield Harness(settings, client, app, clock)


# --- helpers -------------------------------------------------------------------------------------


def new_id(prefix: str = "res") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def now() -> datetime:
    return datetime.now(UTC)


async def publish(settings: Settings, *events: EventData) -> list[Envelope]:
    """Publish registration events as the registration service would (key and subject: resident id)."""
    envelopes = [new_envelope("registration", e, subject=getattr(e, "resident_id")) for e in events]  # noqa: B009
    await publish_envelopes(settings, envelopes)
    return envelopes


async def publish_envelopes(settings: Settings, envelopes: Sequence[Envelope]) -> None:
    await produce(settings, settings.topic(RESIDENTS.name), [(e.key, e.data, e.headers()) for e in envelopes])


def registered(
    resident_id: str, municipality: str = SHIRAHAMA, *, tier: str = "basic", status: str = "active",
    legal: str = CHIYODA, consents: Sequence[str] = ("jal", "ana"), registration_id: str | None = None,
) -> ResidentRegistered:
    return ResidentRegistered(
        resident_id=resident_id, registration_id=registration_id or new_id("reg"), municipality_code=municipality,
        prefecture_code=prefecture_of(municipality).code, tier=tier, status=status,
        legal_address_code=legal,
        contact=seal_for_tests(
            resident_subject(resident_id),
            Contact(name="山田 花子", name_kana="ヤマダ ハナコ", email=f"{resident_id}@example.jp"),
        ),
        consents=[ConsentState(purpose="share_certificate", partner=p, granted=True, at=now()) for p in consents],
        registered_at=now(),
    )


async def opened_partners(h: Harness, partners: Sequence[SealedMembership]) -> list[PartnerMembership]:
    """The memberships an event carried, their member numbers opened with the platform's key store."""
    numbers = await h.runtime.keyring.open_many([m.member_number for m in partners])
    return [
        PartnerMembership(partner=m.partner, member_number=None if n is None else n.decode())
        for m, n in zip(partners, numbers, strict=True)
    ]


async def known(h: Harness, resident_id: str, *, municipality: str | None = None) -> None:
    """Wait until the projection has the resident (and their registration with ``municipality``)."""

    async def check() -> bool:
        return bool(
            await h.pool.fetchval(
                """
                SELECT 1 FROM residents r WHERE r.resident_id = $1 AND ($2::text IS NULL OR EXISTS (
                    SELECT 1 FROM resident_registrations g WHERE g.resident_id = r.resident_id
                    AND g.municipality_code = $2))
                """,
                resident_id, municipality,
            )
        )

    await eventually(check, timeout=20)


async def register(h: Harness, resident_id: str, *municipalities: str, **kwargs: Any) -> None:
    for code in municipalities or (SHIRAHAMA,):
        await publish(h.settings, registered(resident_id, code, **kwargs))
    for code in municipalities or (SHIRAHAMA,):
        await known(h, resident_id, municipality=code)


def application_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "municipality_code": SHIRAHAMA, "planned_stay_days": 60, "housing_basis": "rented",
        "address_there": "和歌山県西牟婁郡白浜町1234-5", "primary_residence_code": CHIYODA,
        "partners": [{"partner": "jal", "member_number": "123456789"}], "note": "週末と夏に滞在します",
    }
    body.update(overrides)
    return body


async def apply(h: Harness, resident_id: str, **overrides: Any) -> dict[str, Any]:
    response = await h.client.post(
        "/v1/applications", json=application_body(**overrides), headers=h.resident(resident_id)
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def approve(h: Harness, application_id: str, code: str = SHIRAHAMA, **dates: str) -> dict[str, Any]:
    response = await h.client.post(
        f"/v1/applications/{application_id}/approve", json=dates or None, headers=h.staff(code)
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def certified(
    h: Harness, resident_id: str, *, dates: dict[str, str] | None = None, **overrides: Any
) -> dict[str, Any]:
    application = await apply(h, resident_id, **overrides)
    return await approve(h, application["application_id"], **(dates or {}))


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM, response.headers
    body: dict[str, Any] = response.json()
    assert body["code"] == code and body["status"] == status, body
    return body


APPEND_ONLY = ("audit_trail", "outbox", "idempotency_keys")
MUTABLE = {
    "applications": "application_id", "certificates": "certificate_number",
    "certificate_counters": "municipality_code, year", "municipality_rules": "municipality_code",
}


async def written(h: Harness) -> dict[str, object]:
    """A fingerprint of everything a request can write: row counts, and a digest of each mutable table."""
    state: dict[str, object] = {t: await h.pool.fetchval(f"SELECT count(*) FROM {t}") for t in APPEND_ONLY}
    for table, order in MUTABLE.items():
        state[table] = await h.pool.fetchval(
            f"SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY {order}), '')) FROM {table} AS t"
        )
    return state


async def refused(
    h: Harness, request: Callable[[], Awaitable[httpx.Response]], status: int, code: str
) -> dict[str, Any]:
    """The request is refused with this problem and nothing is written."""
    before = await written(h)
    body = assert_problem(await request(), status, code)
    assert await written(h) == before, f"{code}: something was written"
    return body


async def events_on(
    settings: Settings, topic_name: str, key: str, count: int = 1, *, event_type: str | None = None,
    timeout: float = 15.0,
) -> list[Envelope]:
    """The envelopes with this key on the topic (waiting until ``count`` of them arrived)."""

    def matching(records: list[ConsumerRecord[bytes, bytes]]) -> list[Envelope]:
        found = [parse_envelope(r.headers, r.value, r.key) for r in records if r.key == key.encode()]
        return [e for e in found if event_type is None or e.type == event_type]

    records = await read_topic(
        settings, settings.topic(topic_name), until=lambda rs: len(matching(rs)) >= count, timeout=timeout
    )
    return matching(records)


# --- the journey ---------------------------------------------------------------------------------


async def test_journey_registration_application_approval_certificate_event(h: Harness) -> None:
    resident = new_id()
    await register(h, resident)

    response = await h.client.post("/v1/applications", json=application_body(), headers=h.resident(resident))
    assert response.status_code == 201, response.text
    application = response.json()
    application_id = application["application_id"]
    assert application["status"] == "submitted" and application["municipality_name"] == "和歌山県白浜町"
    [submitted] = await events_on(h.settings, APPLICATIONS.name, application_id)
    assert submitted.type == ApplicationSubmitted.event_type and submitted.subject == application_id
    data = submitted.decode(ApplicationSubmitted)
    assert (data.resident_id, data.municipality_code, data.primary_residence_code) == (resident, SHIRAHAMA, CHIYODA)
    assert await opened_partners(h, data.partners) == [PartnerMembership(partner="jal", member_number="123456789")]
    assert b"123456789" not in submitted.data  # sealed with the resident's key, never in clear

    queue = await h.client.get("/v1/applications", params={"municipality": SHIRAHAMA}, headers=h.staff())
    assert queue.status_code == 200
    assert application_id in [item["application_id"] for item in queue.json()["items"]]
    opened = await h.client.get(f"/v1/applications/{application_id}", headers=h.staff())
    assert opened.json()["address_there"] == "和歌山県西牟婁郡白浜町1234-5"

    certificate = await approve(h, application_id)
    number = certificate["certificate_number"]
    parsed = CertificateNumber.parse(number)
    assert (parsed.municipality_code, parsed.year) == (SHIRAHAMA, h.clock.today.year), number
    assert certificate["valid_from"] == h.clock.today.isoformat()
    assert certificate["valid_until"] == (h.clock.today + timedelta(days=364)).isoformat()  # 365 days inclusive

    [issued] = await events_on(h.settings, CERTIFICATES.name, number)
    assert issued.type == "jp.nichiiki.certification.certificate.issued.v2"
    assert issued.key == number.encode() and issued.subject == number
    event = issued.decode(CertificateIssued)
    assert event.status == "valid" and event.resident_id == resident and event.application_id == application_id
    assert (event.valid_from, event.valid_until) == (h.clock.today, h.clock.today + timedelta(days=364))
    assert await opened_partners(h, event.partners) == [PartnerMembership(partner="jal", member_number="123456789")]

    row = await h.pool.fetchrow("SELECT status, certificate_number FROM applications WHERE application_id = $1",
                                application_id)
    assert row is not None and (row["status"], row["certificate_number"]) == ("approved", number)
    audit = await h.pool.fetchrow("SELECT * FROM audit_trail WHERE target_id = $1", application_id)
    assert audit is not None and audit["action"] == "application.approved" and audit["actor_role"] == "staff"

    # The holder and the municipality read it; nobody else learns it exists.
    assert (await h.client.get(f"/v1/certificates/{number}", headers=h.resident(resident))).status_code == 200
    assert (await h.client.get(f"/v1/certificates/{number}", headers=h.staff())).status_code == 200
    for other in (h.resident(new_id()), h.staff(TANABE)):
        body = assert_problem(await h.client.get(f"/v1/certificates/{number}", headers=other), 404,
                              "certificate-not-found")
        assert resident not in str(body)
    partner = bearer(h.settings, "partner", partner="jal")
    body = assert_problem(await h.client.get(f"/v1/certificates/{number}", headers=partner), 403, "forbidden")
    assert resident not in str(body) and "123456789" not in str(body)

    own = await h.client.get(f"/v1/residents/{resident}/certificates", headers=h.resident(resident))
    assert [c["certificate_number"] for c in own.json()["items"]] == [number]
    mine = await h.client.get(f"/v1/residents/{resident}/applications", headers=h.resident(resident))
    assert [a["application_id"] for a in mine.json()["items"]] == [application_id]
    assert_problem(await h.client.get(f"/v1/residents/{resident}/certificates", headers=h.resident(new_id())),
                   403, "forbidden")

    csv = await h.client.get(f"/v1/municipalities/{SHIRAHAMA}/certificates.csv", headers=h.staff())
    assert csv.status_code == 200
    assert csv.headers["content-type"] == "text/csv; charset=utf-8"
    assert csv.headers["content-disposition"].startswith("attachment;")
    assert csv.content.startswith("\ufeff".encode())
    lines = csv.content.decode("utf-8-sig").splitlines()
    assert lines[0].startswith("certificate_number,resident_id,status")
    assert any(line.startswith(f"{number},{resident},valid,") and line.endswith(",jal") for line in lines)
    assert_problem(await h.client.get(f"/v1/municipalities/{SHIRAHAMA}/certificates.csv", headers=h.staff(TANABE)),
                   403, "forbidden")

    # Holding a valid certificate, the resident does not apply again: staff renew it.
    again = await h.client.post("/v1/applications", json=application_body(), headers=h.resident(resident))
    assert_problem(again, 409, "certificate-already-held")


async def test_only_partners_still_consented_at_approval_are_shared(h: Harness) -> None:
    resident = new_id()
    await register(h, resident, consents=("jal", "ana"))
    application = await apply(h, resident, partners=[
        {"partner": "jal", "member_number": "1234567"},  # an older 7-digit JAL card
        {"partner": "ana", "member_number": "1234567890"},
    ])
    [revoked] = await publish(
        h.settings, ConsentChanged(resident_id=resident, purpose="share_certificate", partner="ana", granted=False,
                                   at=now())
    )

    async def consent_gone() -> bool:
        return bool(await h.pool.fetchval("SELECT 1 FROM inbox WHERE event_id = $1", revoked.id))

    await eventually(consent_gone)
    certificate = await approve(h, application["application_id"])
    [issued] = await events_on(h.settings, CERTIFICATES.name, certificate["certificate_number"])
    assert await opened_partners(h, issued.decode(CertificateIssued).partners) == [
        PartnerMembership(partner="jal", member_number="1234567")
    ]


async def test_an_idempotency_key_makes_a_repeated_application_act_once(h: Harness) -> None:
    resident = new_id()
    await register(h, resident)
    headers = {**h.resident(resident), "Idempotency-Key": new_id("key")}
    first = await h.client.post("/v1/applications", json=application_body(), headers=headers)
    second = await h.client.post("/v1/applications", json=application_body(), headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    assert await h.pool.fetchval("SELECT count(*) FROM applications WHERE resident_id = $1", resident) == 1
    other = await h.client.post("/v1/applications", json=application_body(planned_stay_days=90), headers=headers)
    assert_problem(other, 422, "idempotency-key-reused")


async def test_concurrent_approvals_get_consecutive_numbers_and_twin_applications_one_row(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    yaizu = "222127"  # 静岡県焼津市: has a plan; only this test issues certificates there
    residents = [new_id() for _ in range(30)]
    await publish(h.settings, *(registered(r, yaizu) for r in residents))
    for resident in residents:
        await known(h, resident, municipality=yaizu)
    twins = await asyncio.gather(*(
        h.client.post("/v1/applications", json=application_body(municipality_code=yaizu), headers=h.resident(r))
        for r in (residents[0], residents[0])
    ))
    assert sorted(t.status_code for t in twins) == [201, 409]
    applications = [next(t.json() for t in twins if t.status_code == 201)]
    applications += await asyncio.gather(*(apply(h, r, municipality_code=yaizu) for r in residents[1:]))

    # Three approvals fail after their number was taken (their event cannot be recorded): the
    # rollback gives the number back, so the others and the retries leave no gap.
    emit_certificate = handlers._emit_certificate
    issued_here = 0

    async def failing_thrice(work: Work, event: handlers.CertificateEvent) -> None:
        nonlocal issued_here
        if isinstance(event, CertificateIssued) and event.municipality_code == yaizu:
            issued_here += 1
            if issued_here in (2, 9, 17):
                raise RuntimeError("the outbox is unavailable")
        await emit_certificate(work, event)

    monkeypatch.setattr(handlers, "_emit_certificate", failing_thrice)
    approvals = await asyncio.gather(*(
        h.client.post(f"/v1/applications/{a['application_id']}/approve", headers=h.staff(yaizu))
        for a in applications
    ))
    assert sorted(a.status_code for a in approvals) == [201] * 27 + [500] * 3, [a.text for a in approvals]
    year = h.clock.today.year
    assert sorted(a.json()["certificate_number"] for a in approvals if a.status_code == 201) == [
        CertificateNumber.format(yaizu, year, n) for n in range(1, 28)
    ]
    failed = [a for a, response in zip(applications, approvals, strict=True) if response.status_code == 500]
    retried = [await approve(h, a["application_id"], yaizu) for a in failed]
    assert sorted(r["certificate_number"] for r in retried) == [
        CertificateNumber.format(yaizu, year, n) for n in (28, 29, 30)
    ]

    rows = await h.pool.fetch(
        """
        SELECT c.sequence, c.certificate_number, a.certificate_number AS application_number,
               (SELECT count(*) FROM audit_trail t WHERE t.target_id = a.application_id
                AND t.details->>'certificate_number' = c.certificate_number) AS audited
        FROM certificates c JOIN applications a USING (application_id)
        WHERE c.municipality_code = $1 AND c.year = $2 ORDER BY c.sequence
        """,
        yaizu, year,
    )
    assert [r["sequence"] for r in rows] == list(range(1, 31))
    assert all(
        r["certificate_number"] == r["application_number"] == CertificateNumber.format(yaizu, year, r["sequence"])
        # what the SQL composed, read back by the shared parser the gateway uses
        and CertificateNumber.parse(r["certificate_number"]) == CertificateNumber(yaizu, year, r["sequence"])
        and r["audited"] == 1
        for r in rows
    ), [dict(r) for r in rows]
    assert await h.pool.fetchval(
        "SELECT last_sequence FROM certificate_counters WHERE municipality_code = $1 AND year = $2", yaizu, year
    ) == 30


# --- refusals ------------------------------------------------------------------------------------


async def test_every_bad_application_is_refused_with_its_problem_and_writes_nothing(h: Harness) -> None:
    resident = new_id()
    await register(h, resident, consents=("jal", "ana"))
    headers = h.resident(resident)

    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"municipality_code": CHIYODA, "primary_residence_code": SHIRAHAMA}, 422, "no-certification-scheme"),
        ({"primary_residence_code": SHIRAHAMA}, 422, "primary-residence-same-municipality"),
        ({"planned_stay_days": 0}, 422, "stay-days-out-of-range"),
        ({"planned_stay_days": 367}, 422, "stay-days-out-of-range"),
        ({"planned_stay_days": 29}, 422, "stay-below-minimum"),
        ({"partners": [{"partner": "jal", "member_number": "12345"}]}, 422, "invalid-member-number"),
        ({"partners": [{"partner": "jal", "member_number": "12345678a"}]}, 422, "invalid-member-number"),
        ({"partners": [{"partner": "jal", "member_number": "１２３４５６７８９"}]}, 422, "invalid-member-number"),
        ({"partners": [{"partner": "ana", "member_number": "123456789"}]}, 422, "invalid-member-number"),
        ({"partners": [{"partner": "jreast", "member_number": "ABC-123"}]}, 422, "invalid-member-number"),
        ({"partners": [{"partner": "jreast", "member_number": "A" * 21}]}, 422, "invalid-member-number"),
        ({"partners": [{"partner": "united"}]}, 422, "unknown-partner"),
        ({"partners": [{"partner": "jal"}, {"partner": "jal"}]}, 422, "duplicate-partner"),
        ({"partners": [{"partner": "sadokisen"}]}, 422, "partner-consent-missing"),
        ({"municipality_code": "304017"}, 422, "unknown-municipality"),  # wrong check digit
        ({"primary_residence_code": "999999"}, 422, "unknown-municipality"),
        ({"primary_residence_code": prefecture_of(CHIYODA).code}, 422, "not-a-municipality"),
        ({"municipality_code": TANABE}, 422, "registration-required"),  # a plan, but not registered there
        ({"housing_basis": "castle"}, 422, "invalid-request"),
        ({"surprise": True}, 422, "invalid-request"),
    ]
    for overrides, status, code in cases:

        def send(o: dict[str, Any] = overrides) -> Awaitable[httpx.Response]:
            return h.client.post("/v1/applications", json=application_body(**o), headers=headers)

        body = await refused(h, send, status, code)
        assert body["title"] and body["detail"], body

    # Only residents apply; and a second open application to one municipality is refused.
    await refused(h, lambda: h.client.post("/v1/applications", json=application_body(), headers=h.staff()),
                  403, "forbidden")
    await refused(h, lambda: h.client.post("/v1/applications", json=application_body()), 401, "unauthenticated")
    await apply(h, resident)
    await refused(h, lambda: h.client.post("/v1/applications", json=application_body(), headers=headers),
                  409, "open-application-exists")


async def test_an_application_sent_before_the_registration_arrives_is_refused_then_accepted(h: Harness) -> None:
    resident = new_id()
    body = await refused(
        h, lambda: h.client.post("/v1/applications", json=application_body(), headers=h.resident(resident)),
        409, "resident-not-yet-known",
    )
    assert body["retry_after"] >= 1
    response = await h.client.post("/v1/applications", json=application_body(), headers=h.resident(resident))
    assert response.headers["retry-after"] == str(body["retry_after"])

    await publish(h.settings, registered(resident))
    accepted: list[httpx.Response] = []

    async def client_retries() -> bool:
        response = await h.client.post("/v1/applications", json=application_body(), headers=h.resident(resident))
        if response.status_code != 201:
            assert_problem(response, 409, "resident-not-yet-known")
            return False
        accepted.append(response)
        return True

    await eventually(client_retries, timeout=20, interval=0.2)
    assert accepted[0].json()["resident_id"] == resident
    assert await h.pool.fetchval("SELECT count(*) FROM applications WHERE resident_id = $1", resident) == 1


async def test_decisions_refused_for_other_municipalities_decided_applications_and_bad_dates(h: Harness) -> None:
    resident = new_id()
    await register(h, resident)
    application_id = (await apply(h, resident))["application_id"]
    url = f"/v1/applications/{application_id}"

    await refused(h, lambda: h.client.post(f"{url}/approve", headers=h.staff(TANABE)), 403, "forbidden")
    await refused(h, lambda: h.client.post(f"{url}/reject", json={"reason_code": "other"}, headers=h.staff(TANABE)),
                  403, "forbidden")
    await refused(h, lambda: h.client.post(f"{url}/approve", headers=h.resident(resident)), 403, "forbidden")
    assert_problem(await h.client.get(url, headers=h.staff(TANABE)), 403, "forbidden")
    assert_problem(await h.client.get(url, headers=h.resident(new_id())), 404, "application-not-found")
    today = h.clock.today
    await refused(
        h, lambda: h.client.post(f"{url}/approve", headers=h.staff(), json={
            "valid_from": (today + timedelta(days=10)).isoformat(), "valid_until": today.isoformat()}),
        422, "invalid-validity-period",
    )
    await refused(
        h, lambda: h.client.post(f"{url}/approve", headers=h.staff(), json={
            "valid_from": (today - timedelta(days=400)).isoformat(),
            "valid_until": (today - timedelta(days=1)).isoformat()}),
        422, "validity-ends-in-past",
    )
    # A reason is a code of the published list: free text, an unknown code or none is refused.
    for body in ({"reason": "滞在実態が確認できません"}, {"reason_code": "滞在実態が確認できません"},
                 {"reason_code": "moved_away"}, {"reason_code": "certificate_revoked"}, {"note": "x"}, {}):
        await refused(h, lambda body=body: h.client.post(f"{url}/reject", json=body, headers=h.staff()),  # type: ignore[misc]
                      422, "invalid-request")
    # The valid_until a municipality allows: its validity from valid_from, no more.
    await refused(
        h, lambda: h.client.post(f"{url}/approve", headers=h.staff(), json={"valid_until": "2099-12-31"}),
        422, "validity-exceeds-rules",
    )
    await refused(
        h, lambda: h.client.post(f"{url}/approve", headers=h.staff(), json={
            "valid_from": today.isoformat(), "valid_until": (today + timedelta(days=365)).isoformat()}),
        422, "validity-exceeds-rules",
    )
    await refused(
        h, lambda: h.client.post(f"{url}/approve", headers=h.staff(), json={
            "valid_from": (today - timedelta(days=31)).isoformat()}),
        422, "valid-from-too-early",
    )
    await refused(
        h, lambda: h.client.post(f"{url}/approve", headers=h.staff(), json={
            "valid_from": (today + timedelta(days=91)).isoformat()}),
        422, "valid-from-too-late",
    )
    await refused(h, lambda: h.client.post("/v1/applications/nope/approve", headers=h.staff()),
                  404, "application-not-found")

    rejected = await h.client.post(
        f"{url}/reject", json={"reason_code": "residence_not_confirmed", "note": "現地確認で空き家と判明"},
        headers=h.staff(),
    )
    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected"
    assert rejected.json()["decision_reason"] == "residence_not_confirmed"
    [event] = await events_on(h.settings, APPLICATIONS.name, application_id, event_type=ApplicationRejected.event_type)
    assert event.decode(ApplicationRejected).reason == "residence_not_confirmed"
    assert "空き家" not in event.data.decode()  # the note stays in the audit trail
    mine = await h.client.get(url, headers=h.resident(resident))
    assert mine.json()["decision_reason"] == "residence_not_confirmed" and "空き家" not in mine.text
    await refused(h, lambda: h.client.post(f"{url}/approve", headers=h.staff()), 409, "application-already-decided")
    await refused(h, lambda: h.client.post(f"{url}/reject", json={"reason_code": "other"}, headers=h.staff()),
                  409, "application-already-decided")

    second = (await apply(h, resident))["application_id"]
    await approve(h, second)
    await refused(h, lambda: h.client.post(f"/v1/applications/{second}/approve", headers=h.staff()),
                  409, "application-already-decided")


async def test_renewal_keeps_the_number_and_revocation_is_refused_when_revoked_or_expired(h: Harness) -> None:
    resident = new_id()
    await register(h, resident)
    certificate = await certified(h, resident)
    number, until = certificate["certificate_number"], date.fromisoformat(certificate["valid_until"])
    url = f"/v1/certificates/{number}"

    await refused(h, lambda: h.client.post(f"{url}/renew", headers=h.staff(TANABE)), 403, "forbidden")
    await refused(h, lambda: h.client.post(f"{url}/renew", json={"valid_until": until.isoformat()},
                                           headers=h.staff()), 422, "renewal-must-extend")
    # A renewal adds at most the municipality's validity after the current valid_until.
    for beyond in ("2099-12-31", (until + timedelta(days=366)).isoformat()):
        await refused(h, lambda beyond=beyond: h.client.post(  # type: ignore[misc]
            f"{url}/renew", json={"valid_until": beyond}, headers=h.staff()), 422, "validity-exceeds-rules")
    renewed = await h.client.post(f"{url}/renew", headers=h.staff())
    assert renewed.status_code == 200, renewed.text
    assert renewed.json()["certificate_number"] == number
    assert renewed.json()["valid_until"] == (until + timedelta(days=365)).isoformat()
    [event] = await events_on(h.settings, CERTIFICATES.name, number, event_type=CertificateRenewed.event_type)
    assert event.decode(CertificateRenewed).valid_until == until + timedelta(days=365)
    # Renewals do not stack: the next one waits until the validity ends within one period from today.
    too_early = await refused(h, lambda: h.client.post(f"{url}/renew", headers=h.staff()), 409, "renewal-too-early")
    assert too_early["renewable_from"] == (until + timedelta(days=1)).isoformat()

    await refused(h, lambda: h.client.post(f"{url}/revoke", json={"reason_code": "other"}, headers=h.staff(TANABE)),
                  403, "forbidden")
    for body in ({}, {"reason": "住所を白浜町に移しました"}, {"reason_code": "住所を白浜町に移しました"},
                 {"reason_code": "stay_below_minimum"}, {"reason_code": "other", "note": "x" * 1001}):
        await refused(h, lambda body=body: h.client.post(f"{url}/revoke", json=body, headers=h.staff()),  # type: ignore[misc]
                      422, "invalid-request")
    revoked = await h.client.post(
        f"{url}/revoke", json={"reason_code": "legal_address_moved_here", "note": "住所を白浜町に移しました"},
        headers=h.staff(),
    )
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert revoked.json()["revocation_reason"] == "legal_address_moved_here"
    [event] = await events_on(h.settings, CERTIFICATES.name, number, event_type=CertificateRevoked.event_type)
    assert event.decode(CertificateRevoked).reason == "legal_address_moved_here"
    assert "白浜町に移し" not in event.data.decode()
    await refused(h, lambda: h.client.post(f"{url}/revoke", json={"reason_code": "other"}, headers=h.staff()),
                  409, "certificate-already-revoked")
    await refused(h, lambda: h.client.post(f"{url}/renew", headers=h.staff()), 409, "certificate-not-renewable")

    # A certificate past its last day is expired, even before the scheduler has marked it.
    other = new_id()
    await register(h, other)
    ending = await certified(h, other, dates={"valid_until": (h.clock.today + timedelta(days=1)).isoformat()})
    ending_url = f"/v1/certificates/{ending['certificate_number']}"
    real_today = h.clock.today
    h.clock.today = real_today + timedelta(days=3)
    try:
        await refused(h, lambda: h.client.post(f"{ending_url}/revoke", json={"reason_code": "other"},
                                               headers=h.staff()),
                      409, "certificate-expired")
        await refused(h, lambda: h.client.post(f"{ending_url}/renew", headers=h.staff()),
                      409, "certificate-not-renewable")
    finally:
        h.clock.today = real_today


async def test_the_audit_trail_records_every_decision_and_refuses_changes(h: Harness) -> None:
    resident = new_id()
    await register(h, resident)
    certificate = await certified(h, resident)
    number = certificate["certificate_number"]
    await h.client.post(f"/v1/certificates/{number}/revoke", json={"reason_code": "false_statement",
                                                                   "note": "虚偽の申告（勤務先の証明書が偽造）"},
                        headers=h.staff())

    trail = await h.client.get(f"/v1/municipalities/{SHIRAHAMA}/audit", params={"limit": 200}, headers=h.staff())
    assert trail.status_code == 200
    entries = [e for e in trail.json()["items"] if e["target_id"] in (number, certificate["application_id"])]
    assert [(e["action"], e["reason"]) for e in entries] == [
        ("certificate.revoked", "false_statement"), ("application.approved", None)
    ]
    # The staff's note is kept here, in the municipality's audit trail, beside the code.
    assert entries[0]["details"] == {"note": "虚偽の申告（勤務先の証明書が偽造）"}
    assert all(e["actor_role"] == "staff" and e["actor"] and e["at"] for e in entries)
    assert_problem(await h.client.get(f"/v1/municipalities/{SHIRAHAMA}/audit", headers=h.staff(TANABE)),
                   403, "forbidden")

    for statement in ("UPDATE audit_trail SET reason = 'edited'", "DELETE FROM audit_trail", "TRUNCATE audit_trail"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await h.pool.execute(statement)


async def test_review_queue_is_oldest_first_filtered_and_paged(h: Harness) -> None:
    residents = [new_id() for _ in range(3)]
    for resident in residents:
        await register(h, resident, SHIOJIRI)
    ids = []
    for index, resident in enumerate(residents):
        basis = "hotel" if index == 2 else "owned"
        ids.append((await apply(h, resident, municipality_code=SHIOJIRI, housing_basis=basis,
                                address_there="長野県塩尻市1-1"))["application_id"])
    staff = h.staff(SHIOJIRI)
    first = (await h.client.get("/v1/applications", params={"limit": 2}, headers=staff)).json()
    second = (await h.client.get("/v1/applications", params={"limit": 2, "offset": 2}, headers=staff)).json()
    assert [a["application_id"] for a in first["items"] + second["items"]] == ids
    assert first["total"] == 3 and (first["limit"], first["offset"]) == (2, 0)
    hotels = (await h.client.get("/v1/applications", params={"housing_basis": "hotel"}, headers=staff)).json()
    assert [a["application_id"] for a in hotels["items"]] == [ids[2]]
    await h.client.post(f"/v1/applications/{ids[0]}/reject", json={"reason_code": "documents_incomplete"},
                        headers=staff)
    open_ = (await h.client.get("/v1/applications", headers=staff)).json()
    assert [a["application_id"] for a in open_["items"]] == ids[1:]
    decided = (await h.client.get("/v1/applications", params={"status": "rejected"}, headers=staff)).json()
    assert [a["application_id"] for a in decided["items"]] == ids[:1]
    assert_problem(await h.client.get("/v1/applications", params={"municipality": SHIOJIRI}, headers=h.staff()),
                   403, "forbidden")
    assert_problem(await h.client.get("/v1/applications", headers=h.resident(residents[0])), 403, "forbidden")
    assert_problem(await h.client.get("/v1/applications", params={"limit": 0}, headers=staff), 422, "invalid-request")


async def test_municipality_rules_are_seeded_edited_by_their_staff_and_applied(h: Harness) -> None:
    rules = await h.client.get(f"/v1/municipalities/{SUSAMI}/rules", headers=h.resident(new_id()))
    assert rules.status_code == 200
    assert {k: rules.json()[k] for k in ("min_stay_days", "validity_days", "required_registration")} == {
        "min_stay_days": 30, "validity_days": 365, "required_registration": "any_active"}
    assert len(rules.json()["housing_bases"]) == 5 and rules.json()["plan_source"] == "reference"
    assert_problem(await h.client.get(f"/v1/municipalities/{CHIYODA}/rules", headers=h.admin()), 404,
                   "rules-not-found")

    strict = {"min_stay_days": 60, "housing_bases": ["owned", "rented"], "validity_days": 180,
              "required_registration": "premium"}
    url = f"/v1/municipalities/{SUSAMI}/rules"
    await refused(h, lambda: h.client.put(url, json=strict, headers=h.staff()), 403, "forbidden")
    await refused(h, lambda: h.client.put(url, json=strict, headers=h.resident(new_id())), 403, "forbidden")
    await refused(h, lambda: h.client.put(url, json={**strict, "housing_bases": []}, headers=h.staff(SUSAMI)),
                  422, "invalid-request")
    await refused(h, lambda: h.client.put(url, json={**strict, "validity_days": 0}, headers=h.staff(SUSAMI)),
                  422, "invalid-request")
    await refused(h, lambda: h.client.put(f"/v1/municipalities/{CHIYODA}/rules", json=strict, headers=h.admin()),
                  404, "rules-not-found")
    saved = await h.client.put(url, json=strict, headers=h.staff(SUSAMI))
    assert saved.status_code == 200 and saved.json()["required_registration"] == "premium"
    assert await h.pool.fetchval(
        "SELECT count(*) FROM audit_trail WHERE municipality_code = $1 AND action = 'rules.updated'", SUSAMI) == 1

    # Seeding again (every start does) keeps the edit and adds nothing.
    await seed_municipality_rules(h.runtime)
    assert (await h.client.get(url, headers=h.admin())).json()["min_stay_days"] == 60
    assert await h.pool.fetchval(
        "SELECT count(*) FROM municipality_rules WHERE plan_source = 'reference' AND legal_basis = 'plan'"
    ) == len(municipalities_with_plan())
    # Every other town of a travel programme certifies under a model project (issue #19).
    programme_towns = {code for programme in travel_programs() for code in programme.municipality_codes}
    assert await h.pool.fetchval(
        "SELECT count(*) FROM municipality_rules WHERE plan_source = 'reference' AND legal_basis = 'model_project'"
    ) == len(programme_towns - municipalities_with_plan())

    resident = new_id()
    registration_id = new_id("reg")
    await register(h, resident, SUSAMI, registration_id=registration_id)
    headers = h.resident(resident)
    susami = {"municipality_code": SUSAMI, "address_there": "和歌山県すさみ町1"}
    for overrides, code in (
        ({"planned_stay_days": 45}, "stay-below-minimum"),
        ({"housing_basis": "hotel"}, "housing-basis-not-accepted"),
        ({}, "premium-registration-required"),
    ):

        def send(o: dict[str, Any] = overrides) -> Awaitable[httpx.Response]:
            return h.client.post("/v1/applications", json=application_body(**susami, **o), headers=headers)

        await refused(h, send, 422, code)
    [approved] = await publish(h.settings, PremiumApproved(
        resident_id=resident, registration_id=registration_id, municipality_code=SUSAMI,
        valid_until=h.clock.today + timedelta(days=300), decided_at=now()))

    async def premium() -> bool:
        return bool(await h.pool.fetchval("SELECT 1 FROM inbox WHERE event_id = $1", approved.id))

    await eventually(premium)
    application = await apply(h, resident, **susami)
    certificate = await approve(h, application["application_id"], SUSAMI)
    assert date.fromisoformat(certificate["valid_until"]) == h.clock.today + timedelta(days=179)


async def test_an_admin_records_a_plan_adopted_later(h: Harness) -> None:
    url = f"/v1/municipalities/{HACHIOJI}/plan"
    await refused(h, lambda: h.client.post(url, headers=h.staff(HACHIOJI)), 403, "forbidden")
    await refused(h, lambda: h.client.post(f"/v1/municipalities/{prefecture_of(HACHIOJI).code}/plan",
                                           headers=h.admin()), 422, "not-a-municipality")
    await refused(h, lambda: h.client.post("/v1/municipalities/999999/plan", headers=h.admin()),
                  404, "municipality-not-found")
    recorded = await h.client.post(url, json={"adopted_on": "2026-04-01"}, headers=h.admin())
    assert recorded.status_code == 201, recorded.text
    assert recorded.json()["plan_source"] == "admin" and recorded.json()["min_stay_days"] == 30
    await refused(h, lambda: h.client.post(url, headers=h.admin()), 409, "plan-already-recorded")

    resident = new_id()
    await register(h, resident, HACHIOJI)
    application = await apply(h, resident, municipality_code=HACHIOJI, address_there="東京都八王子市1")
    assert application["status"] == "submitted"


# --- events in: withdrawal and replay ------------------------------------------------------------


async def test_withdrawal_revokes_certificates_rejects_open_applications_and_erases_personal_data(
    h: Harness,
) -> None:
    resident = new_id()
    await register(h, resident, SHIRAHAMA, TANABE, consents=("jal",))
    certificate = await certified(h, resident)
    number = certificate["certificate_number"]
    open_application = await apply(h, resident, municipality_code=TANABE, address_there="和歌山県田辺市2-3")

    withdrawal = ResidentWithdrawn(resident_id=resident, withdrawn_at=now())
    [envelope] = await publish(h.settings, withdrawal)
    [revoked] = await events_on(h.settings, CERTIFICATES.name, number, event_type=CertificateRevoked.event_type)
    data = revoked.decode(CertificateRevoked)
    assert data.reason == "resident_withdrawn" and data.status == "revoked"
    assert data.partners == [SealedMembership(partner="jal")]  # who to tell, but no member number
    assert revoked.causation_id == str(envelope.id)
    [rejected] = await events_on(h.settings, APPLICATIONS.name, open_application["application_id"],
                                 event_type=ApplicationRejected.event_type)
    assert rejected.decode(ApplicationRejected).reason == "resident_withdrawn"

    rows = await h.pool.fetch(
        "SELECT status, address_there, note, partners::text AS partners FROM applications WHERE resident_id = $1",
        resident,
    )
    assert sorted(r["status"] for r in rows) == ["approved", "rejected"]
    assert all(r["address_there"] is None and r["note"] is None and "123456789" not in r["partners"] for r in rows)
    cert = await h.pool.fetchrow("SELECT status, partners::text AS partners FROM certificates "
                                 "WHERE certificate_number = $1", number)
    assert cert is not None and cert["status"] == "revoked" and "123456789" not in cert["partners"]
    resident_row = await h.pool.fetchrow("SELECT * FROM residents WHERE resident_id = $1", resident)
    assert resident_row is not None
    assert resident_row["status"] == "withdrawn" and resident_row["legal_address_code"] is None
    for table in ("resident_registrations", "share_consents"):
        assert await h.pool.fetchval(f"SELECT count(*) FROM {table} WHERE resident_id = $1", resident) == 0
    assert await h.pool.fetchval(
        "SELECT count(*) FROM audit_trail WHERE target_id = ANY($1::text[]) AND actor = 'system'",
        [number, open_application["application_id"]]) == 2

    # The same event again changes nothing; a late registration does not bring the person back.
    consumer = h.runtime.consumers[0]
    duplicates = consumer.stats.duplicates
    await publish_envelopes(h.settings, [envelope])
    [late] = await publish(h.settings, registered(resident))

    async def both_seen() -> bool:
        seen = await h.pool.fetchval("SELECT 1 FROM inbox WHERE event_id = $1", late.id)
        return bool(seen) and consumer.stats.duplicates > duplicates

    await eventually(both_seen)
    assert len(await events_on(h.settings, CERTIFICATES.name, number, event_type=CertificateRevoked.event_type)) == 1
    assert await h.pool.fetchval("SELECT count(*) FROM outbox WHERE key = $1", number.encode()) == 2  # issued, revoked
    assert await h.pool.fetchval("SELECT status FROM residents WHERE resident_id = $1", resident) == "withdrawn"
    assert await h.pool.fetchval("SELECT count(*) FROM resident_registrations WHERE resident_id = $1", resident) == 0
    await refused(h, lambda: h.client.post("/v1/applications", json=application_body(), headers=h.resident(resident)),
                  409, "resident-withdrawn")


async def tables_holding(pool: asyncpg.Pool, *needles: str) -> dict[str, list[str]]:
    """Every table of the service's database whose rows' text holds one of the needles (bytea
    columns such as the outbox's payload are searched as UTF-8 bytes)."""
    found: dict[str, list[str]] = {}
    tables = await pool.fetch("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    for row in tables:
        table = row["tablename"]
        columns = await pool.fetch(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = $1", table,
        )
        for needle in needles:
            tests = [
                f"position(convert_to($1, 'UTF8') in \"{c['column_name']}\") > 0" if c["data_type"] == "bytea"
                else f"strpos(\"{c['column_name']}\"::text, $1) > 0"
                for c in columns
            ]
            if tests and await pool.fetchval(f"SELECT count(*) FROM \"{table}\" WHERE {' OR '.join(tests)}", needle):
                found.setdefault(table, []).append(needle)
    return found


async def test_erasure_leaves_no_member_number_note_or_address_and_sealed_copies_die_with_the_key(
    h: Harness,
) -> None:
    resident = new_id()
    member, note, address = "918273645", f"NOTE-{uuid.uuid4().hex[:11]} 通院のため", f"白浜町{uuid.uuid4().hex[:8]}"
    staff_note = f"STAFF-{uuid.uuid4().hex[:11]} 家族から連絡"
    await register(h, resident, SHIRAHAMA, TANABE, consents=("jal",))
    keyed = {**h.resident(resident), "Idempotency-Key": f"apply-{resident}"}
    applied = await h.client.post("/v1/applications", headers=keyed, json=application_body(
        partners=[{"partner": "jal", "member_number": member}], note=note, address_there=address))
    assert applied.status_code == 201, applied.text
    number = (await approve(h, applied.json()["application_id"]))["certificate_number"]
    other = await apply(h, resident, municipality_code=TANABE, partners=[{"partner": "jal", "member_number": member}])
    rejected = await h.client.post(
        f"/v1/applications/{other['application_id']}/reject",
        json={"reason_code": "residence_not_confirmed", "note": staff_note},
        headers={**h.staff(TANABE), "Idempotency-Key": f"reject-{resident}"},
    )
    assert rejected.status_code == 200, rejected.text
    # Before: the database holds them (the resident is active); the events never in clear.
    assert set(await tables_holding(h.pool, member, note, address, staff_note)) >= {
        "applications", "certificates", "audit_notes", "idempotency_keys"}
    [issued] = await events_on(h.settings, CERTIFICATES.name, number)
    [submitted] = await events_on(h.settings, APPLICATIONS.name, other["application_id"],
                                  event_type=ApplicationSubmitted.event_type)
    for raw in (issued.data, submitted.data):
        assert member.encode() not in raw and b'"kid":"resident:' in raw.replace(b" ", b"")
    sealed = issued.decode(CertificateIssued).partners[0].member_number
    assert await h.runtime.keyring.open_text(sealed) == member

    [envelope] = await publish(h.settings, ResidentWithdrawn(resident_id=resident, withdrawn_at=now()))
    await events_on(h.settings, CERTIFICATES.name, number, event_type=CertificateRevoked.event_type)
    assert await tables_holding(h.pool, member, note, address, staff_note) == {}
    # The audit trail keeps who decided what, when and why (the code); the note alone is gone.
    entries = await h.pool.fetch("SELECT actor, action, reason, details FROM audit_trail WHERE target_id = $1",
                                 other["application_id"])
    assert [(e["action"], e["reason"]) for e in entries] == [("application.rejected", "residence_not_confirmed")]
    assert await h.pool.fetchval("SELECT erased_at FROM kit_erased_residents WHERE resident_id = $1", resident)
    # The key is shredded (registration does it): every copy of the sealed number is unreadable.
    await h.runtime.keyring.shred(resident_subject(resident))
    assert await h.runtime.keyring.open_many([sealed]) == [None]

    # Late events about the person write nothing back.
    late = await publish(
        h.settings, registered(resident, SHIRAHAMA, consents=("jal", "ana")),
        ConsentChanged(resident_id=resident, purpose="share_certificate", partner="ana", granted=True, at=now()),
    )

    async def handled() -> bool:
        seen = await h.pool.fetchval("SELECT count(*) FROM inbox WHERE event_id = ANY($1::uuid[])",
                                     [e.id for e in late])
        return bool(seen == len(late))

    await eventually(handled)
    for table in ("resident_registrations", "share_consents"):
        assert await h.pool.fetchval(f"SELECT count(*) FROM {table} WHERE resident_id = $1", resident) == 0
    assert envelope.id is not None


PROJECTION = {
    "residents": "resident_id",
    "resident_registrations": "registration_id",
    "share_consents": "resident_id, partner",
}


async def projection(pool: asyncpg.Pool) -> dict[str, list[dict[str, Any]]]:
    return {
        table: [dict(r) for r in await pool.fetch(f"SELECT * FROM {table} ORDER BY {order}")]
        for table, order in PROJECTION.items()
    }


async def test_replaying_the_registration_topic_into_an_empty_database_rebuilds_the_projection(
    h: Harness, settings: Settings
) -> None:
    a, b, c = new_id(), new_id(), new_id()
    reg_a, reg_b, reg_b2, reg_c = (new_id("reg") for _ in range(4))
    earlier = now() - timedelta(minutes=5)
    history: list[EventData] = [
        registered(a, SHIRAHAMA, registration_id=reg_a, consents=("jal",)),
        PremiumRequested(resident_id=a, registration_id=reg_a, municipality_code=SHIRAHAMA, activity_count=3,
                         requested_at=now()),
        PremiumApproved(resident_id=a, registration_id=reg_a, municipality_code=SHIRAHAMA,
                        valid_until=date(2030, 3, 31), decided_at=now()),
        ConsentChanged(resident_id=a, purpose="share_certificate", partner="ana", granted=True, at=now()),
        ConsentChanged(resident_id=a, purpose="share_certificate", partner="ana", granted=False,
                       at=earlier),  # older fact arriving later: loses
        ConsentChanged(resident_id=a, purpose="email", granted=False, at=now()),  # not ours
        ContactChanged(resident_id=a,
                       contact=seal_for_tests(
                           resident_subject(a), Contact(name="x", name_kana="エックス", email="x@example.jp")
                       ),
                       at=now()),  # not routed: no contact data here
        registered(b, TANABE, tier="premium", status="pending_review", registration_id=reg_b),
        PremiumRejected(resident_id=b, registration_id=reg_b, municipality_code=TANABE,
                        reason="activity_not_confirmed",
                        decided_at=now()),
        registered(b, SHIRAHAMA, registration_id=reg_b2, consents=()),
        RegistrationWithdrawn(resident_id=b, registration_id=reg_b2, municipality_code=SHIRAHAMA,
                              withdrawn_at=now()),
        registered(c, SUSAMI, registration_id=reg_c),
        PremiumExpired(resident_id=c, registration_id=reg_c, municipality_code=SUSAMI, expired_on=date(2026, 1, 1)),
        ResidentWithdrawn(resident_id=c, withdrawn_at=now()),
    ]
    envelopes = await publish(settings, *history)
    await publish_envelopes(settings, envelopes[:3])  # redelivered: must change nothing

    async def applied_live() -> bool:
        handled = {r["event_id"] for r in await h.pool.fetch("SELECT event_id FROM inbox")}
        return all(e.id in handled for e in envelopes if e.type != ContactChanged.event_type)

    await eventually(applied_live, timeout=20)
    live = await projection(h.pool)
    a_rows = [r for r in live["resident_registrations"] if r["resident_id"] == a]
    assert [(r["tier"], r["status"], r["premium_status"]) for r in a_rows] == [("premium", "active", "approved")]
    assert {(r["partner"], r["granted"]) for r in live["share_consents"] if r["resident_id"] == a} == {
        ("jal", True), ("ana", True)}
    b_rows = {r["registration_id"]: r for r in live["resident_registrations"] if r["resident_id"] == b}
    assert (b_rows[reg_b]["status"], b_rows[reg_b2]["status"]) == ("rejected", "withdrawn")
    assert [r["status"] for r in live["residents"] if r["resident_id"] == c] == ["withdrawn"]

    replay_settings = settings.model_copy(update={"db_prefix": f"{settings.db_prefix}_replay"})
    config = CertificationConfig(expiry_interval_s=3600, consumer_name=new_id("certification-replay"))
    replay_app = create_app(replay_settings, config=config)
    async with service_client(replay_app):
        replay_pool: asyncpg.Pool = replay_app.state.runtime.pool

        async def caught_up() -> bool:
            live_ids = {r["event_id"] for r in await h.pool.fetch("SELECT event_id FROM inbox")}
            replayed = {r["event_id"] for r in await replay_pool.fetch("SELECT event_id FROM inbox")}
            return live_ids == replayed

        await eventually(caught_up, timeout=30, interval=0.2)
        rebuilt = await projection(replay_pool)
    assert rebuilt == await projection(h.pool)
    assert any(r["resident_id"] == a for r in rebuilt["residents"])


# --- the expiry scheduler under two replicas -----------------------------------------------------


async def test_two_replicas_send_each_expiring_and_expired_notice_exactly_once(settings: Settings) -> None:
    clock = FakeClock()
    start = clock.today
    # Topics of its own too: a fresh database numbers certificates from 000001 again, as other tests' do.
    replica_settings = settings.model_copy(update={
        "db_prefix": f"{settings.db_prefix}_expiry", "topic_prefix": f"{settings.topic_prefix}expiry.",
    })
    config = CertificationConfig(expiry_interval_s=0.05, consumer_name=new_id("certification-expiry"))
    first, second = create_app(replica_settings, config=config, clock=clock.clock), create_app(
        replica_settings, config=config, clock=clock.clock)
    async with service_client(first) as client_a, service_client(second) as client_b:
        harnesses = [Harness(replica_settings, c, app, clock) for c, app in ((client_a, first), (client_b, second))]
        numbers = []
        for index in range(4):
            replica = harnesses[index % 2]
            resident = new_id()
            await register(replica, resident)
            application = await apply(replica, resident)
            certificate = await approve(replica, application["application_id"],
                                        valid_until=(start + timedelta(days=40)).isoformat())
            numbers.append(certificate["certificate_number"])
        h = harnesses[0]

        clock.today = start + timedelta(days=10)  # 30 days left: the notice is due
        for number in numbers:
            # One notice (one event id); the relay may deliver a record twice (at least once, by design).
            notices = await events_on(
                replica_settings, CERTIFICATES.name, number, event_type=CertificateExpiring.event_type
            )
            assert len({n.id for n in notices}) == 1
            assert notices[0].decode(CertificateExpiring).days_left == 30
        renewed = await h.client.post(f"/v1/certificates/{numbers[3]}/renew", headers=h.staff())
        assert renewed.status_code == 200, renewed.text

        clock.today = start + timedelta(days=41)  # the day after valid_until: expired
        for number in numbers[:3]:
            expiries = await events_on(
                replica_settings, CERTIFICATES.name, number, event_type=CertificateExpired.event_type
            )
            assert len({e.id for e in expiries}) == 1
            data = expiries[0].decode(CertificateExpired)
            assert data.status == "expired" and data.expired_on == start + timedelta(days=41)
        await asyncio.sleep(1.0)  # about 20 more sweeps on each replica: none may send anything again
        assert all(app.state.runtime.state["expiry_sweeps"] > 5 for app in (first, second))

        async def all_published() -> bool:
            return not await h.pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")

        await eventually(all_published)
        keys = {number.encode() for number in numbers}
        records = await read_topic(replica_settings, replica_settings.topic(CERTIFICATES.name),
                                   until=lambda rs: sum(r.key in keys for r in rs) >= 12)
        for number in numbers:
            # distinct events: a record the relay delivered twice is one event (consumers dedupe by id)
            mine = [dict(r.headers) for r in records if r.key == number.encode()]
            kinds = [t for t, _ in dict.fromkeys((h["ce_type"].decode(), h["ce_id"]) for h in mine)]
            assert kinds.count(CertificateExpiring.event_type) == 1, kinds
            assert kinds.count(CertificateExpired.event_type) == (0 if number == numbers[3] else 1), kinds
        rows = await h.pool.fetch(
            "SELECT certificate_number, status FROM certificates WHERE certificate_number = ANY($1::text[])", numbers)
        statuses = {r["certificate_number"]: r["status"] for r in rows}
        assert statuses == {**dict.fromkeys(numbers[:3], "expired"), numbers[3]: "valid"}
        outbox = await h.pool.fetchval(
            "SELECT count(*) FROM outbox WHERE convert_from(key, 'UTF8') = ANY($1::text[])", numbers)
        assert outbox == 4 + 4 + 3 + 1  # issued, expiring, expired, renewed
