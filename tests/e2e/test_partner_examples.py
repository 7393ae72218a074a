"""The partner's guide's examples (docs/partners.md, examples/partners/) against a running platform.

The services a partner meets run as their own processes (identity, registration, certification,
subsidy, the partner gateway) over the session's servers, under a database and topic prefix of their
own. A resident registers with 白浜町 consenting to share the certificate with JAL, and is certified;
subsidy grants the JAL mileage programme. Then, as JAL would run them:

- ``kafka_feed``: its confluent-kafka client reads ``partner.jal.v1`` on the partner-facing broker from
  the beginning and holds the certificate and the grant; ``main --report-trip`` reports a round trip on
  ``partner.jal.trips.v1`` and prints the answer that came back on the feed (``redeemed``), which
  subsidy counted (two legs);
- ``http_feed``: follows ``GET /v1/feed`` with an API key (cursor, long poll) to the same certificate;
- ``report_trip_http``: signs in with JAL's client credentials at the identity provider and reports a
  one-way trip (``POST /v1/redemptions``), then the same trip again (a duplicate, answered the same);
- last, the resident revokes the consent: both feed clients, read again, hold nothing of the person.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from examples.partners import http_feed, kafka_feed, report_trip_http
from shared.cli.fleet import ServiceFleet
from shared.contracts.partners import TripReported
from shared.kit.envelope import parse_envelope
from shared.kit.kafka_security import KafkaConnection
from shared.kit.settings import Settings
from shared.stack.backends import Backends
from tests.conftest import make_settings
from tests.e2e.conftest import new_fleet
from tests.support import bearer, eventually

pytestmark = [pytest.mark.stack, pytest.mark.timeout(180)]

SHIRAHAMA = "304018"
OTHER_TOWN = "131016"
JAL_PROGRAM = f"jal-dual-residence-miles@{SHIRAHAMA}"
#: The development client the identity service seeds for JAL (docs/identity.md).
JAL_CLIENT = ("partner-jal", "nichiiki-dev-jal-secret")
SERVICES = ("identity", "registration", "certification", "subsidy", "partner_gateway")
#: What a partner's certificate record may carry (docs/partners.md, "Personal data").
CERTIFICATE_FIELDS = {
    "certificate_number", "status", "valid_from", "valid_until", "municipality_code", "programs", "resident_ref",
    "member_number", "changed_at",
}


class Resident:
    """The certified resident and what the platform made of them."""

    def __init__(self) -> None:
        self.id = f"res-{uuid.uuid4()}"
        self.name = "小川 ゆかり"
        self.email = f"yukari.{self.id[4:12]}@example.jp"
        self.member_number = str(random.randrange(10**8, 10**9))  # JAL Mileage Bank: 9 digits
        self.certificate_number = ""
        self.grant_id = ""


@pytest.fixture(scope="module")
def examples_settings(backends: Backends, run_id: str) -> Settings:
    # Under the session's prefix, so the session's clean-up drops these databases too.
    return make_settings(backends, f"{run_id}px")


@pytest.fixture(scope="module")
def fleet(
    examples_settings: Settings, backends: Backends, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceFleet]:
    fleet = new_fleet(examples_settings, backends, tmp_path_factory.mktemp("partner-examples-logs"))
    try:
        fleet.start(SERVICES)
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def jal(examples_settings: Settings) -> kafka_feed.Connection:
    """JAL's connection to the partner-facing broker, as the example takes it (plaintext on this stack)."""
    edge = KafkaConnection.edge(examples_settings)
    if edge.security_protocol != "PLAINTEXT":
        pytest.skip("the examples' test connects in plaintext, as to the local stack's edge")
    return kafka_feed.Connection(partner="jal", bootstrap=edge.bootstrap, topic_prefix=examples_settings.topic_prefix)


async def _json(response: httpx.Response, *ok: int) -> Any:
    assert response.status_code in ok, f"{response.request.method} {response.request.url}: {response.text}"
    return response.json()


@pytest.fixture(scope="module")
async def resident(fleet: ServiceFleet, examples_settings: Settings) -> Resident:
    """Registered with 白浜町 (sharing the certificate with JAL), certified, and granted the JAL miles."""
    who = Resident()
    s = examples_settings
    as_resident = bearer(s, "resident", who.id)
    manager = bearer(s, "staff", "staff-manager", municipality=SHIRAHAMA, staff_role="manager")
    async with httpx.AsyncClient(timeout=15) as http:
        await _json(await http.post(f"{fleet.url('registration')}/v1/residents", headers=as_resident, json={
            "name": who.name, "name_kana": "オガワ ユカリ", "email": who.email, "date_of_birth": "1988-04-02",
            "legal_address_code": OTHER_TOWN,
            "consents": [{"purpose": "email"}, {"purpose": "share_certificate", "partner": "jal"}],
        }), 201)
        await _json(await http.post(
            f"{fleet.url('registration')}/v1/residents/{who.id}/registrations", headers=as_resident,
            json={"municipality_code": SHIRAHAMA, "tier": "basic"},
        ), 201)
        application: dict[str, Any] = {}

        async def applied() -> bool:  # the registration's events are on their way to certification
            answer = await http.post(f"{fleet.url('certification')}/v1/applications", headers=as_resident, json={
                "municipality_code": SHIRAHAMA, "planned_stay_days": 90, "housing_basis": "rented",
                "address_there": "和歌山県西牟婁郡白浜町 (賃貸住宅)", "primary_residence_code": OTHER_TOWN,
                "partners": [{"partner": "jal", "member_number": who.member_number}],
            })
            assert answer.status_code in (201, 409, 422), answer.text
            application.update(answer.json() if answer.status_code == 201 else {})
            return answer.status_code == 201

        await eventually(applied, timeout=30, interval=0.2)
        certificate = await _json(await http.post(
            f"{fleet.url('certification')}/v1/applications/{application['application_id']}/approve", headers=manager,
        ), 201)
        who.certificate_number = certificate["certificate_number"]

        async def granted() -> bool:
            page = await _json(await http.get(
                f"{fleet.url('subsidy')}/v1/residents/{who.id}/grants", headers=as_resident), 200)
            grant = next((g for g in page["items"] if g["program_id"] == JAL_PROGRAM), None)
            who.grant_id = grant["grant_id"] if grant else ""
            return grant is not None and grant["status"] == "issued"

        await eventually(granted, timeout=30, interval=0.2)
    return who


async def _legs_counted(fleet: ServiceFleet, settings: Settings, who: Resident) -> int:
    async with httpx.AsyncClient(timeout=15) as http:
        page = await _json(await http.get(
            f"{fleet.url('subsidy')}/v1/residents/{who.id}/grants", headers=bearer(settings, "resident", who.id)), 200)
    (grant,) = [g for g in page["items"] if g["grant_id"] == who.grant_id]
    return int(grant["legs_counted"])


async def test_the_kafka_example_holds_the_certificate_and_its_trip_is_answered_on_the_feed(
    jal: kafka_feed.Connection, resident: Resident, fleet: ServiceFleet, examples_settings: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    number = resident.certificate_number
    grant_key = f"{number}/grants/{resident.grant_id}"

    def read() -> kafka_feed.FeedState:
        with kafka_feed.FeedReader(jal, group=f"jal.examples-{uuid.uuid4().hex[:6]}") as reader:
            return reader.read_until(lambda s: number in s.certificates and grant_key in s.grants, 45,
                                     "the certificate and its grant")

    state = await asyncio.to_thread(read)
    certificate = state.certificates[number]
    assert set(certificate) <= CERTIFICATE_FIELDS
    assert certificate["status"] == "valid" and certificate["municipality_code"] == SHIRAHAMA
    # Consented for JAL, sealed for JAL: the key the gateway gives JAL opens it (docs/partners.md).
    sealed = certificate["member_number"]
    assert sealed["kid"] == f"partner:jal:{certificate['resident_ref']}"
    assert resident.member_number not in json.dumps(certificate)
    async with httpx.AsyncClient(timeout=15) as http:
        key = await _json(await http.get(f"{fleet.url('partner_gateway')}/v1/keys/{sealed['kid']}",
                                         headers=bearer(examples_settings, "partner", partner="jal")), 200)
    assert kafka_feed.open_member_number(sealed, key["k"]) == resident.member_number
    assert certificate["resident_ref"] and resident.id not in json.dumps(certificate)
    assert resident.name not in json.dumps(certificate) and resident.email not in json.dumps(certificate)
    grant = state.grants[grant_key]
    assert (grant["state"], grant["program_id"], grant["unit"]) == ("issued", JAL_PROGRAM, "miles")
    assert kafka_feed.reportable_grant(state, resident.grant_id) == grant

    # The example as JAL runs it: the summary, then one round trip reported and answered on the feed.
    code = await asyncio.to_thread(kafka_feed.main, [
        "--partner", "jal", "--bootstrap", jal.bootstrap, "--topic-prefix", jal.topic_prefix,
        "--group", f"jal.examples-{uuid.uuid4().hex[:6]}", "--timeout", "45",
        "--report-trip", "--grant-id", resident.grant_id,
    ])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"{number} valid" in out and f"grant {resident.grant_id} issued" in out
    answered = re.search(r"the platform answered trip (\S+): (\w+)", out)
    assert answered is not None, out
    assert answered[2] == "redeemed", out  # a mileage grant counts the legs: amount 0 until the last
    assert await _legs_counted(fleet, examples_settings, resident) == 2  # one round trip: two legs


def test_the_kafka_examples_trip_record_is_a_valid_cloudevent(jal: kafka_feed.Connection) -> None:
    """What the example writes is what the platform's envelope parser and the contract accept."""
    grant = {"grant_id": "g-1", "certificate_number": "NCH-304018-2025-000001"}
    report = kafka_feed.trip_report(jal, grant, trip_kind="one_way")
    envelope = parse_envelope(
        [(name, raw.encode()) for name, raw in report.headers], json.dumps(report.value).encode(), report.key.encode()
    )
    assert envelope.type == TripReported.event_type and envelope.subject == report.trip_id
    trip = envelope.decode(TripReported)
    assert (trip.grant_id, trip.partner, trip.trip_kind) == ("g-1", None, "one_way")
    assert trip.travelled_on.isoformat() == report.value["travelled_on"]


async def test_the_http_feed_example_follows_the_feed_to_the_certificate(
    resident: Resident, fleet: ServiceFleet, examples_settings: Settings, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    gateway = fleet.url("partner_gateway")
    async with httpx.AsyncClient(timeout=15) as http:
        key = await _json(await http.post(f"{gateway}/v1/partners/jal/api-keys", json={"label": "examples"},
                                          headers=bearer(examples_settings, "admin")), 201)
    number = resident.certificate_number

    def follow() -> http_feed.FeedState:
        feed = http_feed.HttpFeed(gateway, key["api_key"])
        try:
            return feed.follow(wait_s=5, follow_s=30, until=lambda s: number in s.certificates)
        finally:
            feed.close()

    state = await asyncio.to_thread(follow)
    certificate = state.certificates[number]
    # Opened by the example with JAL's key for the resident (GET /v1/keys/{kid}).
    assert certificate["member_number"] == resident.member_number and set(certificate) <= CERTIFICATE_FIELDS
    assert state.cursor != "0"

    cursor_file = tmp_path / "cursor"
    code = await asyncio.to_thread(http_feed.main, ["--gateway", gateway, "--api-key", key["api_key"],
                                                    "--cursor-file", str(cursor_file)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"{number} valid" in out
    assert int(cursor_file.read_text()) >= int(state.cursor)  # where the next run goes on from

    # An unknown key: the example reports the gateway's problem code.
    assert await asyncio.to_thread(http_feed.main, ["--gateway", gateway, "--api-key", "nchk_not-a-key"]) == 1
    assert "invalid-api-key" in capsys.readouterr().err


async def test_the_http_trip_example_signs_in_and_reports_a_trip(
    resident: Resident, fleet: ServiceFleet, examples_settings: Settings, capsys: pytest.CaptureFixture[str],
) -> None:
    before = await _legs_counted(fleet, examples_settings, resident)
    trip_id = f"JL-{uuid.uuid4().hex[:10]}"
    args = [
        "--issuer", fleet.url("identity"), "--subsidy", fleet.url("subsidy"),
        "--client-id", JAL_CLIENT[0], "--client-secret", JAL_CLIENT[1],
        "--grant-id", resident.grant_id, "--certificate", resident.certificate_number,
        "--trip-id", trip_id, "--kind", "one_way",
    ]
    assert await asyncio.to_thread(report_trip_http.main, args) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"201 trip {trip_id}:"), out
    assert json.loads(out.split(": ", 1)[1])["accepted"] is True
    assert await _legs_counted(fleet, examples_settings, resident) == before + 1

    # The same trip again (e.g. after a timeout): the first outcome, counted once.
    def again() -> tuple[int, dict[str, Any]]:
        credentials = report_trip_http.ClientCredentials(fleet.url("identity"), *JAL_CLIENT)
        with httpx.Client(timeout=15) as client:
            body = report_trip_http.trip_body(resident.grant_id, resident.certificate_number, trip_id=trip_id,
                                              trip_kind="one_way")
            return report_trip_http.report_trip(client, credentials, fleet.url("subsidy"), body)

    status, outcome = await asyncio.to_thread(again)
    assert (status, outcome["accepted"], outcome["duplicate"]) == (200, True, True)
    assert await _legs_counted(fleet, examples_settings, resident) == before + 1

    # A grant that is not JAL's (here: no grant at all) is a problem, not an outcome.
    wrong = [*args[:8], "--grant-id", "no-such-grant", "--certificate", resident.certificate_number]
    assert await asyncio.to_thread(report_trip_http.main, wrong) == 1
    assert "404 unknown-grant" in capsys.readouterr().err


async def test_after_the_consent_is_revoked_both_examples_forget_the_certificate(
    jal: kafka_feed.Connection, resident: Resident, fleet: ServiceFleet, examples_settings: Settings,
) -> None:
    async with httpx.AsyncClient(timeout=15) as http:
        await _json(await http.delete(
            f"{fleet.url('registration')}/v1/residents/{resident.id}/consents/share_certificate",
            params={"partner": "jal"}, headers=bearer(examples_settings, "resident", resident.id),
        ), 200)
        key = await _json(await http.post(f"{fleet.url('partner_gateway')}/v1/partners/jal/api-keys", json={},
                                          headers=bearer(examples_settings, "admin")), 201)
    number = resident.certificate_number

    def forgotten_over_http() -> http_feed.FeedState:
        feed = http_feed.HttpFeed(fleet.url("partner_gateway"), key["api_key"])
        try:  # from the beginning: the certificate, its grant, then the withdrawal and the tombstones
            return feed.follow(wait_s=5, follow_s=30, until=lambda s: s.tombstones >= 2 and s.withdrawals >= 1)
        finally:
            feed.close()

    over_http = await asyncio.to_thread(forgotten_over_http)
    assert number not in over_http.certificates
    assert not [k for k in over_http.grants if k.startswith(number)]

    def forgotten_over_kafka() -> kafka_feed.FeedState:
        with kafka_feed.FeedReader(jal, group=f"jal.examples-{uuid.uuid4().hex[:6]}") as reader:
            return reader.read_until(lambda s: number in s.forgotten and s.tombstones >= 2, 45, "the tombstones")

    over_kafka = await asyncio.to_thread(forgotten_over_kafka)
    assert number not in over_kafka.certificates
    assert not over_kafka.grants_of(number)
    assert over_kafka.withdrawals >= 1
