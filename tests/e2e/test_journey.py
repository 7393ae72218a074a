"""The resident journey (issue 9) end to end: every service its own process, the demo's Journey on them.

The same :class:`shared.cli.demo.Journey` that ``nichiiki demo`` runs on the running platform runs
here on a fleet over the session's servers (its own database and topic prefix) and an SMTP sink of
its own; the test then checks the outcomes, partly again through the services' APIs.
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.cli.demo import A_INBOX, B_INBOX, JAL_PROGRAM, PARTNER_RECORD_FIELDS, SHIRAHAMA, Journey, JourneyResult
from shared.cli.fleet import ServiceFleet
from shared.contracts.formats import CertificateNumber
from shared.contracts.partners import PartnerCertificate, PartnerGrant, grant_key
from shared.contracts.sealed import Sealed, partner_kid
from shared.kit.keyring import open_with
from shared.kit.settings import Settings
from shared.stack.backends import Backends
from shared.stack.smtp_sink import SmtpSink
from tests.conftest import make_settings
from tests.support import bearer

pytestmark = [pytest.mark.stack, pytest.mark.timeout(240)]

PERSONAL_FIELDS = {"name", "name_kana", "address", "birth_date", "date_of_birth", "email", "phone", "contact",
                   "resident_id"}


@pytest.fixture(scope="module")
def journey_settings(backends: Backends, run_id: str) -> Settings:
    # Under the session's prefix, so the session's clean-up drops these databases too.
    return make_settings(backends, f"{run_id}j")


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmtpSink]:
    with SmtpSink(tmp_path_factory.mktemp("mailbox")) as sink:
        yield sink


@pytest.fixture(scope="module")
def fleet(
    journey_settings: Settings, backends: Backends, sink: SmtpSink, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceFleet]:
    fleet = ServiceFleet(journey_settings, backends, tmp_path_factory.mktemp("journey-logs"), smtp_url=sink.url)
    try:
        fleet.start()  # every service
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
async def journey(fleet: ServiceFleet, journey_settings: Settings, sink: SmtpSink) -> JourneyResult:
    lines: list[str] = []
    urls = {name: fleet.url(name) for name in fleet.processes}
    try:
        return await Journey(urls, journey_settings, sink.messages, printer=lines.append).run()
    except Exception:
        for name in fleet.processes:
            tail = fleet.logs(name).splitlines()[-15:]
            lines.append(f"--- {name} log tail ---\n" + "\n".join(tail))
        raise AssertionError("the journey failed:\n" + "\n".join(lines)) from None


async def opened_by_jal(fleet: ServiceFleet, settings: Settings, record: dict[str, Any]) -> str:
    """A feed record's member number as JAL opens it: sealed for JAL about this resident (kid
    ``partner:jal:<resident_ref>``), with the key the gateway's ``GET /v1/keys/{kid}`` gives JAL."""
    sealed = Sealed.model_validate(record["member_number"])
    assert sealed.kid == partner_kid("jal", record["resident_ref"])
    async with httpx.AsyncClient(base_url=fleet.url("partner_gateway"), timeout=10) as client:
        answer = await client.get(f"/v1/keys/{sealed.kid}", headers=bearer(settings, "partner", partner="jal"))
    assert answer.status_code == 200, answer.text
    assert answer.headers["Cache-Control"] == "no-store"
    key = answer.json()["k"]
    return open_with(base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)), sealed).decode()


async def test_the_journey_prints_one_line_per_step(journey: JourneyResult) -> None:
    numbered = [line for line in journey.lines if line.startswith("✓ ")]
    assert len(numbered) == 23, journey.lines
    assert [int(line.split(".")[0].removeprefix("✓ ")) for line in numbered] == list(range(1, 24))
    assert any("staff approved the premium registration (valid until" in line for line in numbered)
    assert journey.lines[-1].startswith("The journey is complete")


async def test_a_is_certified_and_jal_receives_only_what_it_may_see(
    journey: JourneyResult, fleet: ServiceFleet, journey_settings: Settings
) -> None:
    a = journey.resident_a
    assert CertificateNumber.parse(a.certificate_number).municipality_code == SHIRAHAMA
    assert a.premium_valid_until is not None
    async with httpx.AsyncClient(base_url=fleet.url("certification"), timeout=10) as client:
        answer = await client.get(
            f"/v1/certificates/{a.certificate_number}", headers=bearer(journey_settings, "resident", a.resident_id)
        )
    assert answer.status_code == 200, answer.text
    certificate = answer.json()
    assert certificate["status"] == "valid" and certificate["resident_id"] == a.resident_id
    assert certificate["partners"] == [{"partner": "jal", "member_number": a.member_number}]

    records = [
        r for r in journey.jal_feed if r.key == a.certificate_number and r.ce_type == PartnerCertificate.event_type
    ]
    assert records, journey.jal_feed
    for record in records:
        assert record.data is not None and record.raw is not None
        assert set(record.data) <= PARTNER_RECORD_FIELDS
        assert not set(record.data) & PERSONAL_FIELDS
        # sealed for JAL: never in the clear on the feed, and JAL's key opens it (docs/partners.md)
        assert a.member_number not in record.raw.decode()
        assert await opened_by_jal(fleet, journey_settings, record.data) == a.member_number
        assert record.data["resident_ref"] and record.data["resident_ref"] != a.resident_id
        assert record.data["municipality_code"] == "304018" and record.data["status"] == "valid"
        for personal in (a.resident_id, a.name, a.name_kana, a.email):
            assert personal not in record.raw.decode()


async def test_the_thirty_thousand_miles_are_credited_exactly_once(
    journey: JourneyResult, fleet: ServiceFleet, journey_settings: Settings
) -> None:
    a = journey.resident_a
    assert journey.miles_credited == 30_000
    assert [t["accepted"] for t in journey.trips] == [True] * 4
    assert [t["trips_counted"] for t in journey.trips] == [2, 4, 6, 8]
    crediting = [t for t in journey.trips if t["amount"] > 0]
    assert len(crediting) == 1 and crediting[0]["amount"] == 30_000 and crediting[0]["completed"] is True
    assert a.grant_states == ["issued", "completed"]
    redeemed = [
        r.data for r in journey.jal_feed
        if r.ce_type == PartnerGrant.event_type and r.data and r.key == grant_key(a.certificate_number, a.grant_id)
        and r.data["state"] == "redeemed" and (r.data["amount"] or 0) > 0
    ]
    assert len(redeemed) == 1 and redeemed[0]["amount"] == 30_000 and redeemed[0]["unit"] == "miles"
    assert await opened_by_jal(fleet, journey_settings, redeemed[0]) == a.member_number

    async with httpx.AsyncClient(base_url=fleet.url("subsidy"), timeout=10) as client:
        grants = (await client.get(
            f"/v1/residents/{a.resident_id}/grants", headers=bearer(journey_settings, "resident", a.resident_id)
        )).json()["items"]
        program = (await client.get(
            f"/v1/programs/{JAL_PROGRAM}", headers=bearer(journey_settings, "staff", municipality="304018")
        )).json()
    assert [(g["status"], g["drawn"], g["remaining"], g["legs_counted"]) for g in grants] == [
        ("completed", 30_000, 0, 8)
    ]
    (miles,) = [b for b in program["budgets"] if b["unit"] == "miles"]
    assert miles["balanced"] is True
    assert miles["spent"] == 30_000  # A's miles, once
    assert miles["reserved"] == 30_000  # B's grant, released by the donation
    assert miles["available"] == 0


async def test_b_is_waitlisted_then_issued_after_the_donation(
    journey: JourneyResult, fleet: ServiceFleet, journey_settings: Settings
) -> None:
    b = journey.resident_b
    assert CertificateNumber.parse(b.certificate_number).municipality_code == SHIRAHAMA
    assert b.certificate_number != journey.resident_a.certificate_number
    assert b.grant_states == ["waitlisted", "issued"]
    assert journey.budget_topped_up == 0  # a fresh platform funds exactly one resident
    assert journey.donation_miles == 30_000  # ¥60,000 at ¥2 a mile
    assert journey.receipt_number is not None
    async with httpx.AsyncClient(base_url=fleet.url("subsidy"), timeout=10) as client:
        grants = (await client.get(
            f"/v1/residents/{b.resident_id}/grants", headers=bearer(journey_settings, "resident", b.resident_id)
        )).json()["items"]
    assert [(g["status"], g["remaining"], g["certificate_number"]) for g in grants] == [
        ("issued", 30_000, b.certificate_number)
    ]
    states = [
        r.data["state"] for r in journey.jal_feed
        if r.key == grant_key(b.certificate_number, b.grant_id) and r.ce_type == PartnerGrant.event_type and r.data
    ]
    assert states == ["waitlisted", "issued"]  # JAL heard of both, in order (the grant's key)
    home = next(r.partition for r in journey.jal_feed if r.key == b.certificate_number)
    assert {r.partition for r in journey.jal_feed if r.key.startswith(b.certificate_number)} == {home}


async def test_both_residents_find_every_message_in_the_inbox_and_the_mailbox(
    journey: JourneyResult, fleet: ServiceFleet, journey_settings: Settings, sink: SmtpSink
) -> None:
    for who, expected in ((journey.resident_a, A_INBOX), (journey.resident_b, B_INBOX)):
        assert Counter(who.inbox) == Counter(expected), who.label
        assert Counter(who.emails) == Counter(expected), who.label
        async with httpx.AsyncClient(base_url=fleet.url("notification"), timeout=10) as client:
            emails = (await client.get(
                f"/v1/residents/{who.resident_id}/emails?limit=100",
                headers=bearer(journey_settings, "resident", who.resident_id),
            )).json()["items"]
            inbox = (await client.get(
                f"/v1/residents/{who.resident_id}/notifications?limit=100",
                headers=bearer(journey_settings, "resident", who.resident_id),
            )).json()["items"]
        assert sorted(e["status"] for e in emails) == ["sent"] * sum(expected.values())
        # Every message knew who it was for (no generic "ご登録者 様" written before the contact arrived).
        assert all(m["body"].startswith(f"{who.name} 様") for m in inbox), [m["body"][:20] for m in inbox]
    # One certificate's grant events share a partition: the inbox keeps their order.
    assert journey.resident_b.inbox.index("grant_waitlisted") < journey.resident_b.inbox.index("grant_issued")
    recipients = {str(m["To"]) for m in sink.messages()}
    assert any(journey.resident_a.email in r for r in recipients)
    assert any(journey.resident_b.email in r for r in recipients)
    assert journey.emails_checked


def test_the_demo_module_needs_a_running_platform(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from shared.cli.demo import run_demo

    assert run_demo(Settings(state_dir=tmp_path)) == 1
    assert "the platform is not running" in capsys.readouterr().err
