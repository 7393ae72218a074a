"""The subsidy service over the real broker and database.

One app for the module, on a database and topics of its own (its own prefixes), so events other
services' tests publish in the same session never reach it. Tests stay apart by using their own
municipalities, or programs of their own with a partner code of their own.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeAlias, cast

import asyncpg
import httpx
import pytest
import pytest_asyncio
from aiokafka import ConsumerRecord

from services.subsidy.config import SubsidySettings
from services.subsidy.main import create_app, expire_lapsed_grants, seed
from shared.contracts.base import EventData
from shared.contracts.certification import (
    CertificateExpired,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
)
from shared.contracts.common import SealedMembership
from shared.contracts.donation import DonationReceived, DonationRefunded
from shared.contracts.formats import ProgramId
from shared.contracts.partners import TripAccepted, TripKind
from shared.contracts.reasons import BUDGET_CHANGE_REASONS
from shared.contracts.registration import ResidentErased
from shared.contracts.sealed import Sealed, resident_subject
from shared.contracts.subsidy import (
    BudgetChanged,
    GrantCancelled,
    GrantExpired,
    GrantIssued,
    GrantRedeemed,
    GrantRedemptionRejected,
    GrantWaitlisted,
)
from shared.contracts.topics import BUDGETS, CERTIFICATES, DONATIONS, ERASURES, GATEWAY_TRIPS, GRANTS, Topic
from shared.kit.clock import SYSTEM_CLOCK
from shared.kit.consumer import HandlerContext, Run
from shared.kit.envelope import Envelope, new_envelope, parse_envelope
from shared.kit.service import ServiceRuntime
from shared.kit.settings import Settings
from shared.stack.backends import Backends
from tests.conftest import make_settings
from tests.support import (
    bearer,
    eventually,
    membership,
    opened_for_tests,
    produce,
    read_topic,
    sealed_for,
    service_client,
)

pytestmark = pytest.mark.stack

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"

TODAY = SYSTEM_CLOCK.today()
PROBLEM = "application/problem+json"


@dataclass
class Subsidy:
    client: httpx.AsyncClient
    settings: Settings
    runtime: ServiceRuntime

    @property
    def pool(self) -> asyncpg.Pool:
        return self.runtime.pool

    def auth(self, role: str, **claims: str) -> dict[str, str]:
        return bearer(self.settings, role, **claims)

    async def publish(self, topic: Topic, *events: tuple[EventData, str, str]) -> list[Envelope]:
        """Publish (data, subject, key) as the upstream service would; returns the envelopes."""
        envelopes = [new_envelope("tests", data, subject=subject, key=key) for data, subject, key in events]
        await self.republish(topic, envelopes)
        return envelopes

    async def republish(self, topic: Topic, envelopes: list[Envelope]) -> None:
        await produce(
            self.settings, self.settings.topic(topic.name), [(e.key, e.data, e.headers()) for e in envelopes]
        )

    async def certify(self, *certificates: CertificateIssued) -> list[Envelope]:
        """Publish certificates one after the other, each handled before the next (arrival order)."""
        envelopes: list[Envelope] = []
        for certificate in certificates:
            envelopes += await self.publish(CERTIFICATES, cert_event(certificate))

            async def seen(number: str = certificate.certificate_number) -> bool:
                found = await self.pool.fetchval("SELECT true FROM certificates WHERE certificate_number = $1", number)
                return bool(found)

            await eventually(seen)
        return envelopes

    async def grant_of(self, certificate_number: str, program_id: str) -> asyncpg.Record:
        async def exists() -> bool:
            return bool(await self.grant_row(certificate_number, program_id))

        await eventually(exists)
        row = await self.grant_row(certificate_number, program_id)
        assert row is not None
        return row

    async def status(self, certificate_number: str, program_id: str) -> str | None:
        row = await self.grant_row(certificate_number, program_id)
        return None if row is None else str(row["status"])

    async def grant_row(self, certificate_number: str, program_id: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            "SELECT * FROM grants WHERE certificate_number = $1 AND program_id = $2", certificate_number, program_id
        )

    async def budget(self, program_id: str) -> dict[str, int]:
        """Available (the budget row), reserved and spent (the ledger)."""
        row = await self.pool.fetchrow(
            """
            SELECT b.available,
                   (SELECT coalesce(sum(reserved_delta), 0) FROM budget_ledger l WHERE l.program_id = b.program_id)
                       AS reserved,
                   (SELECT coalesce(sum(spent_delta), 0) FROM budget_ledger l WHERE l.program_id = b.program_id)
                       AS spent
            FROM budgets b WHERE b.program_id = $1
            """,
            program_id,
        )
        assert row is not None
        return {k: int(v) for k, v in dict(row).items()}

    async def ledger(self, program_id: str) -> list[tuple[str, int]]:
        rows = await self.pool.fetch(
            "SELECT kind, amount FROM budget_ledger WHERE program_id = $1 ORDER BY entry_id", program_id
        )
        return [(r["kind"], r["amount"]) for r in rows]

    async def assert_balanced(self, program_id: str) -> dict[str, int]:
        """The budget row equals the sum of its ledger, what is reserved is what open grants hold,
        what is spent is what grants drew, and nothing is negative."""
        budget = await self.budget(program_id)
        ledger_available = await self.pool.fetchval(
            "SELECT coalesce(sum(available_delta), 0) FROM budget_ledger WHERE program_id = $1", program_id
        )
        grants = await self.pool.fetchrow(
            "SELECT coalesce(sum(remaining), 0) AS reserved, coalesce(sum(drawn), 0) AS spent "
            "FROM grants WHERE program_id = $1",
            program_id,
        )
        assert grants is not None
        assert budget["available"] == ledger_available
        assert (budget["reserved"], budget["spent"]) == (grants["reserved"], grants["spent"])
        assert min(budget.values()) >= 0
        return budget

    async def emitted(self, event: type[EventData], **match: object) -> list[dict[str, Any]]:
        """Events of one type this service recorded in its outbox (exact counts, before relaying)."""
        rows = await self.pool.fetch(
            """
            SELECT payload FROM outbox
            WHERE header_values[array_position(header_names, 'ce_type')] = $1::bytea ORDER BY id
            """,
            event.event_type.encode(),
        )
        found = [json.loads(r["payload"]) for r in rows]
        return [e for e in found if all(e.get(k) == v for k, v in match.items())]

    async def on_topic(
        self, topic: Topic, event: type[EventData], count: int, **match: object
    ) -> list[tuple[Record, dict[str, Any]]]:
        """Wait for ``count`` distinct events of a type on the real topic; returns (record, data)."""

        def matching(records: list[Record]) -> list[tuple[Record, dict[str, Any]]]:
            seen: dict[bytes, tuple[Record, dict[str, Any]]] = {}
            for record in records:
                headers = dict(record.headers)
                if headers.get("ce_type") != event.event_type.encode():
                    continue
                data = json.loads(record.value or b"{}")
                if all(data.get(k) == v for k, v in match.items()):
                    seen.setdefault(headers["ce_id"], (record, data))
            return list(seen.values())

        records = await read_topic(
            self.settings, self.settings.topic(topic.name), until=lambda r: len(matching(r)) >= count, timeout=20
        )
        found = matching(records)
        assert len(found) >= count, f"{len(found)} of {count} {event.__name__} on {topic.name}"
        return found


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def subsidy(backends: Backends, run_id: str) -> AsyncIterator[Subsidy]:
    settings = make_settings(backends, f"{run_id}sub")
    config = SubsidySettings(sweep_interval_s=3600)
    app = create_app(settings, config)
    async with service_client(app) as client:
        yield Subsidy(client, settings, app.state.runtime)


# --- builders -------------------------------------------------------------------------------------


def uid() -> str:
    return uuid.uuid4().hex[:8]


def certificate_issued(
    municipality: str, partners: list[SealedMembership], *, valid_from: date | None = None,
    number: str | None = None, resident: str | None = None,
) -> CertificateIssued:
    start = valid_from or TODAY - timedelta(days=30)
    return CertificateIssued(
        certificate_number=number or f"C-{municipality}-{uid()}", resident_id=resident or f"res-{uid()}",
        municipality_code=municipality, valid_from=start, valid_until=start + timedelta(days=364), status="valid",
        partners=partners, application_id=f"app-{uid()}", issued_at=datetime.now(UTC),
    )


def closing(
    issued: CertificateIssued, kind: type[CertificateRevoked] | type[CertificateExpired]
) -> CertificateRevoked | CertificateExpired:
    base = issued.model_dump(exclude={"application_id", "issued_at", "status"})
    if kind is CertificateRevoked:
        # Free text, as revocations carried before the reason codes: it must go no further.
        return CertificateRevoked(**base, status="revoked", reason="moved away", revoked_at=datetime.now(UTC))
    return CertificateExpired(**base, status="expired", expired_on=TODAY)


def trip(
    partner: str, grant: asyncpg.Record | dict[str, Any], *, kind: TripKind = "round_trip", days_ago: int = 1,
    trip_id: str | None = None, discount: int | None = None,
) -> TripAccepted:
    return TripAccepted(
        partner=partner, grant_id=grant["grant_id"], certificate_number=grant["certificate_number"],
        trip_id=trip_id or f"T-{uid()}", trip_kind=kind, travelled_on=TODAY - timedelta(days=days_ago),
        discount_jpy=discount, reported_at=datetime.now(UTC),
    )


def http_trip(grant: asyncpg.Record | dict[str, Any], **overrides: object) -> dict[str, Any]:
    body: dict[str, Any] = {
        "grant_id": grant["grant_id"], "certificate_number": grant["certificate_number"], "trip_id": f"H-{uid()}",
        "trip_kind": "one_way", "travelled_on": (TODAY - timedelta(days=1)).isoformat(),
    }
    body.update(overrides)
    return body


def donation(municipality: str, unit: str, amount: int, **overrides: object) -> DonationReceived:
    values: dict[str, Any] = {
        "donation_id": f"D-{uid()}", "municipality_code": municipality, "donor_id": f"donor-{uid()}",
        "kind": "miles" if unit == "miles" else "hometown_tax", "unit": unit, "amount": amount,
        "earmark": "dual_residence", "payment_date": TODAY, "calendar_year": TODAY.year,
        "received_at": datetime.now(UTC),
    }
    values.update(overrides)
    return DonationReceived(**values)


def cert_event(event: CertificateIssued | CertificateRevoked | CertificateExpired | CertificateRenewed) -> tuple[
    EventData, str, str
]:
    return event, event.certificate_number, event.certificate_number


def trip_event(event: TripAccepted) -> tuple[EventData, str, str]:
    return event, event.trip_id, event.grant_id


async def registered_partner(s: Subsidy, code: str) -> str:
    """A partner beyond the seed, as the gateway's ``gateway.partners.v1`` would have announced it."""
    await s.runtime.pool.execute(
        "INSERT INTO registered_partners (code, name, registered_at) VALUES ($1, $1, now()) ON CONFLICT DO NOTHING",
        code,
    )
    return code


async def create_program(
    s: Subsidy, municipality: str, mechanism: str, parameters: dict[str, Any], opening_budget: int
) -> tuple[str, str]:
    """A program of a partner code of its own (so no other test's certificate is granted under it)."""
    partner = await registered_partner(s, f"p{uid()}")
    program_id = ProgramId.format(f"test-{mechanism.replace('_', '-')}-{uid()}", municipality)
    response = await s.client.post(
        "/v1/programs",
        json={
            "program_id": program_id, "title": f"test {mechanism}", "partner": partner,
            "municipality_code": municipality, "mechanism": mechanism, "parameters": parameters,
            "active_from": (TODAY - timedelta(days=365)).isoformat(),
            "active_until": (TODAY + timedelta(days=365)).isoformat(), "opening_budget": opening_budget,
        },
        headers=s.auth("admin"),
    )
    assert response.status_code == 201, response.text
    return program_id, partner


VOUCHER_PARAMETERS = {"voucher_jpy": 5000, "max_one_ways": 8}


# --- tests ----------------------------------------------------------------------------------------


async def test_programs_are_seeded_once_from_the_reference_data(subsidy: Subsidy) -> None:
    response = await subsidy.client.get(
        "/v1/municipalities/304018/programs", headers=subsidy.auth("staff", municipality="304018")
    )
    assert response.status_code == 200
    (jal,) = [p for p in response.json()["items"] if p["program_id"] == "jal-dual-residence-miles@304018"]
    assert jal["partner"] == "jal" and jal["mechanism"] == "mileage_grant" and jal["unit"] == "miles"
    assert jal["parameters"] == {
        "required_round_trips": 4, "max_one_ways": 4, "miles_per_one_way": 7500, "window_days": 122,
        "jpy_per_mile": 2,
    }
    assert jal["grant_value"] == 30_000
    assert await subsidy.pool.fetchval("SELECT count(*) FROM programs WHERE reference_program IS NOT NULL") == 18
    opening = await subsidy.on_topic(
        BUDGETS, BudgetChanged, 1, program_id="jal-dual-residence-miles@302066", reason="opening_balance"
    )
    record, data = opening[0]
    assert record.key == b"jal-dual-residence-miles@302066" and data["delta"] == 30_000 and data["unit"] == "miles"
    # a restart seeds nothing twice
    assert await seed(subsidy.runtime, SubsidySettings()) == []
    assert await subsidy.ledger("jal-dual-residence-miles@372081") == [("opening", 30_000)]


async def test_the_jal_journey_credits_the_miles_exactly_once(subsidy: Subsidy) -> None:
    program_id = "jal-dual-residence-miles@304018"
    issued = certificate_issued("304018", [membership(partner="jal", member_number="123456789")])
    await subsidy.publish(CERTIFICATES, cert_event(issued))

    grant = await subsidy.grant_of(issued.certificate_number, program_id)
    [(record, data)] = await subsidy.on_topic(GRANTS, GrantIssued, 1, certificate_number=issued.certificate_number)
    assert record.key == issued.certificate_number.encode()
    assert dict(record.headers)["ce_subject"] == grant["grant_id"].encode()
    assert data["reserved"] == 30_000 and data["unit"] == "miles"
    # The certificate's sealed member number, copied as it came (subsidy never opens it).
    assert Sealed.model_validate(data["member_number"]) == issued.partners[0].member_number
    assert b"123456789" not in (record.value or b"")
    assert data["window_from"] == issued.valid_from.isoformat()
    assert data["window_until"] == (issued.valid_from + timedelta(days=121)).isoformat()
    assert await subsidy.budget(program_id) == {"available": 0, "reserved": 30_000, "spent": 0}

    trips = [trip("jal", grant, days_ago=20 - 4 * i) for i in range(4)]
    envelopes = await subsidy.publish(GATEWAY_TRIPS, *[trip_event(t) for t in trips])
    redeemed = await subsidy.on_topic(GRANTS, GrantRedeemed, 4, grant_id=grant["grant_id"])
    by_trip = {data["trip_id"]: data for _, data in redeemed}
    assert [by_trip[t.trip_id]["trips_counted"] for t in trips] == [2, 4, 6, 8]
    assert [by_trip[t.trip_id]["amount"] for t in trips] == [0, 0, 0, 30_000]
    assert [by_trip[t.trip_id]["completed"] for t in trips] == [False, False, False, True]

    # the same trips again: redelivered envelopes, and re-sent under new event ids
    await subsidy.republish(GATEWAY_TRIPS, envelopes)
    await subsidy.publish(GATEWAY_TRIPS, *[trip_event(t) for t in trips])
    fifth = trip("jal", grant, days_ago=1)
    await subsidy.publish(GATEWAY_TRIPS, trip_event(fifth))
    [(_, refused)] = await subsidy.on_topic(GRANTS, GrantRedemptionRejected, 1, trip_id=fifth.trip_id)
    assert refused["reason"] == "over_count"

    assert len(await subsidy.emitted(GrantRedeemed, grant_id=grant["grant_id"], completed=True)) == 1
    assert len(await subsidy.emitted(GrantRedeemed, grant_id=grant["grant_id"])) == 4
    assert await subsidy.ledger(program_id) == [("opening", 30_000), ("reserve", 30_000), ("draw", 30_000)]
    assert await subsidy.assert_balanced(program_id) == {"available": 0, "reserved": 0, "spent": 30_000}
    row = await subsidy.grant_row(issued.certificate_number, program_id)
    assert row is not None and row["status"] == "completed" and row["legs_counted"] == 8 and row["drawn"] == 30_000


async def test_waitlisted_grants_are_issued_in_arrival_order_when_donations_arrive(subsidy: Subsidy) -> None:
    program_id = "jal-dual-residence-miles@302066"  # 田辺市: opening budget for one resident
    jal = [membership(partner="jal", member_number="987654321")]
    first, second, third = (certificate_issued("302066", jal) for _ in range(3))
    await subsidy.certify(first, second, third)
    granted = [await subsidy.grant_of(c.certificate_number, program_id) for c in (first, second, third)]
    assert [g["status"] for g in granted] == ["issued", "waitlisted", "waitlisted"]
    waitlisted = await subsidy.on_topic(GRANTS, GrantWaitlisted, 2, program_id=program_id)
    positions = {data["certificate_number"]: data["position"] for _, data in waitlisted}
    assert positions == {second.certificate_number: 1, third.certificate_number: 2}
    assert {data["needed"] for _, data in waitlisted} == {30_000}

    # 60,001 yen at 2 yen a mile: 30,000 miles, enough for the second only
    gift = donation("302066", "jpy", 60_001)
    await subsidy.publish(DONATIONS, (gift, gift.donation_id, gift.municipality_code))
    await subsidy.on_topic(GRANTS, GrantIssued, 1, certificate_number=second.certificate_number)
    assert await subsidy.status(third.certificate_number, program_id) == "waitlisted"
    credited = await subsidy.pool.fetchrow("SELECT * FROM donation_credits WHERE donation_id = $1", gift.donation_id)
    assert credited is not None and credited["credited"] == 30_000 and credited["remainder"] == 1

    # 29,999 miles do not fit the third: it keeps waiting
    miles = donation("302066", "miles", 29_999, earmark="general")
    await subsidy.publish(DONATIONS, (miles, miles.donation_id, miles.municipality_code))
    await eventually(lambda: _has_credit(subsidy, miles.donation_id))
    assert await subsidy.status(third.certificate_number, program_id) == "waitlisted"
    assert (await subsidy.budget(program_id))["available"] == 29_999

    # one more mile from staff: the third is issued at once
    response = await subsidy.client.post(
        f"/v1/programs/{program_id}/budget", json={"unit": "miles", "amount": 1, "reason": "council decision"},
        headers=subsidy.auth("staff", municipality="302066"),
    )
    assert response.status_code == 201, response.text
    third_grant = await subsidy.grant_row(third.certificate_number, program_id)
    assert third_grant is not None
    assert response.json()["issued_from_waitlist"] == [third_grant["grant_id"]]
    assert response.json()["budget"] == {"available": 0, "reserved": 90_000, "spent": 0}

    issued_order = [e["certificate_number"] for e in await subsidy.emitted(GrantIssued, program_id=program_id)]
    assert issued_order == [c.certificate_number for c in (first, second, third)]
    changes = await subsidy.on_topic(BUDGETS, BudgetChanged, 4, program_id=program_id)
    assert sorted(d["delta"] for _, d in changes) == [1, 29_999, 30_000, 30_000]  # the opening balance too
    # The staff's words stay in the ledger; the event carries the code only.
    assert "top_up" in {d["reason"] for _, d in changes} <= set(BUDGET_CHANGE_REASONS)
    assert not any("council" in json.dumps(d) for _, d in changes)
    assert await subsidy.pool.fetchval(
        "SELECT reason FROM budget_ledger WHERE program_id = $1 AND kind = 'top_up'", program_id
    ) == "council decision"
    assert await subsidy.assert_balanced(program_id) == {"available": 0, "reserved": 90_000, "spent": 0}


async def _has_credit(s: Subsidy, donation_id: str) -> bool:
    return bool(await s.pool.fetchval("SELECT true FROM donation_credits WHERE donation_id = $1", donation_id))


async def test_concurrent_redemptions_never_overdraw_a_small_budget(subsidy: Subsidy) -> None:
    # a budget for exactly 10 vouchers, all of it reserved by one grant
    program_id, partner = await create_program(
        subsidy, "152048", "fare_voucher", {"voucher_jpy": 5000, "max_one_ways": 10}, opening_budget=50_000
    )
    issued = certificate_issued("152048", [membership(partner=partner)])
    late = certificate_issued("152048", [membership(partner=partner)])
    await subsidy.certify(issued, late)
    grant = await subsidy.grant_of(issued.certificate_number, program_id)
    assert (await subsidy.grant_of(late.certificate_number, program_id))["status"] == "waitlisted"

    headers = subsidy.auth("partner", partner=partner)
    bodies = [http_trip(grant, trip_id=f"H-{i}-{uid()}") for i in range(60)]
    twins = bodies[:10]  # ten of them sent twice at the same moment
    responses = await asyncio.gather(
        *[subsidy.client.post("/v1/redemptions", json=body, headers=headers) for body in bodies + twins]
    )
    assert {r.status_code for r in responses} <= {200, 201}, [r.text for r in responses if r.status_code >= 300]
    new = [r.json() for r in responses if r.status_code == 201]
    assert len(new) == 60 and sum(r.status_code == 200 for r in responses) == 10
    assert sum(o["accepted"] for o in new) == 10
    assert {o["reason"] for o in new if not o["accepted"]} == {"over_count"}
    assert sorted(o["trips_counted"] for o in new if o["accepted"]) == list(range(1, 11))

    assert await subsidy.assert_balanced(program_id) == {"available": 0, "reserved": 0, "spent": 50_000}
    assert len(await subsidy.emitted(GrantRedeemed, grant_id=grant["grant_id"])) == 10
    assert len(await subsidy.emitted(GrantRedeemed, grant_id=grant["grant_id"], completed=True)) == 1
    assert len(await subsidy.emitted(GrantRedemptionRejected, grant_id=grant["grant_id"])) == 50
    assert await subsidy.pool.fetchval("SELECT count(*) FROM trips WHERE grant_id = $1", grant["grant_id"]) == 60
    assert await subsidy.status(late.certificate_number, program_id) == "waitlisted"


async def test_concurrent_reservations_never_overdraw_and_keep_arrival_order(subsidy: Subsidy) -> None:
    """Grant issuing in parallel transactions (as several consumer replicas would) against one budget."""
    from services.subsidy import handlers

    program_id, partner = await create_program(
        subsidy, "152048", "fare_voucher", VOUCHER_PARAMETERS, opening_budget=3 * 40_000 + 39_999
    )
    certificates = [certificate_issued("152048", [membership(partner=partner)]) for _ in range(20)]

    async def grant(certificate: CertificateIssued) -> None:
        async with subsidy.runtime.transaction() as uow:
            # A unit of work stands in for a consumer's context: granting only uses its conn and emit.
            await handlers.grant_certificates(Run([(cast(HandlerContext, uow), certificate)]), TODAY)

    await asyncio.gather(*[grant(c) for c in certificates])
    statuses = await subsidy.pool.fetch(
        "SELECT status, count(*) AS n FROM grants WHERE program_id = $1 GROUP BY status", program_id
    )
    assert {r["status"]: r["n"] for r in statuses} == {"issued": 3, "waitlisted": 17}
    assert await subsidy.assert_balanced(program_id) == {"available": 39_999, "reserved": 120_000, "spent": 0}
    positions = sorted(e["position"] for e in await subsidy.emitted(GrantWaitlisted, program_id=program_id))
    assert positions == list(range(1, 18))


async def test_a_repeated_trip_is_acknowledged_once_and_a_reused_trip_id_is_refused(subsidy: Subsidy) -> None:
    program_id, partner = await create_program(subsidy, "152048", "fare_voucher", VOUCHER_PARAMETERS, 80_000)
    issued = certificate_issued("152048", [membership(partner=partner)])
    await subsidy.publish(CERTIFICATES, cert_event(issued))
    grant = await subsidy.grant_of(issued.certificate_number, program_id)
    headers = subsidy.auth("partner", partner=partner)

    body = http_trip(grant, trip_kind="round_trip")
    first = await subsidy.client.post("/v1/redemptions", json=body, headers=headers)
    again = await subsidy.client.post("/v1/redemptions", json=body, headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert first.json() | {"duplicate": True} == again.json()
    assert first.json()["accepted"] is True and first.json()["amount"] == 10_000

    outbox_before = await subsidy.pool.fetchval("SELECT count(*) FROM outbox")
    reused = await subsidy.client.post(
        "/v1/redemptions", json=body | {"travelled_on": TODAY.isoformat()}, headers=headers
    )
    assert reused.status_code == 409 and reused.headers["content-type"] == PROBLEM
    assert reused.json()["code"] == "duplicate-trip"
    assert await subsidy.pool.fetchval("SELECT count(*) FROM outbox") == outbox_before

    # the same trip id over Kafka (another channel, a new event id): acknowledged, not counted
    same = TripAccepted(
        partner=partner, grant_id=grant["grant_id"], certificate_number=grant["certificate_number"],
        trip_id=body["trip_id"], trip_kind="round_trip", travelled_on=date.fromisoformat(body["travelled_on"]),
        reported_at=datetime.now(UTC),
    )
    other = trip(partner, grant, kind="one_way")
    await subsidy.publish(GATEWAY_TRIPS, trip_event(same), trip_event(other))
    await subsidy.on_topic(GRANTS, GrantRedeemed, 1, trip_id=other.trip_id)
    assert len(await subsidy.emitted(GrantRedeemed, trip_id=body["trip_id"])) == 1
    assert await subsidy.ledger(program_id) == [
        ("opening", 80_000), ("reserve", 40_000), ("draw", 10_000), ("draw", 5000),
    ]
    await subsidy.assert_balanced(program_id)


async def test_redelivered_events_never_count_twice(subsidy: Subsidy) -> None:
    program_id = "jal-dual-residence-miles@016331"  # 上士幌町
    issued = certificate_issued("016331", [membership(partner="jal")])
    waiting = certificate_issued("016331", [membership(partner="jal")])
    gift = donation("016331", "miles", 30_000)
    certificate_envelopes = await subsidy.certify(issued, waiting)
    first = await subsidy.grant_of(issued.certificate_number, program_id)
    await subsidy.grant_of(waiting.certificate_number, program_id)
    trips = [trip("jal", first, days_ago=3), trip("jal", first, kind="one_way", days_ago=2)]
    trip_envelopes = await subsidy.publish(GATEWAY_TRIPS, *[trip_event(t) for t in trips])
    gift_envelopes = await subsidy.publish(DONATIONS, (gift, gift.donation_id, gift.municipality_code))
    await subsidy.on_topic(GRANTS, GrantIssued, 1, certificate_number=waiting.certificate_number)
    await subsidy.on_topic(GRANTS, GrantRedeemed, 2, grant_id=first["grant_id"])

    # everything again: the very same records, and the same facts under new event ids
    await subsidy.republish(CERTIFICATES, certificate_envelopes)
    await subsidy.republish(GATEWAY_TRIPS, trip_envelopes)
    await subsidy.republish(DONATIONS, gift_envelopes)
    await subsidy.publish(DONATIONS, (gift, gift.donation_id, gift.municipality_code))
    renewed = CertificateRenewed(
        **issued.model_dump(exclude={"application_id", "issued_at"}), renewed_at=datetime.now(UTC)
    )
    await subsidy.publish(CERTIFICATES, cert_event(renewed))  # same certificate year: no second grant
    marker = certificate_issued("016331", [])  # handled after the others (same partition order per key)
    await subsidy.publish(CERTIFICATES, cert_event(marker))

    async def caught_up() -> bool:
        stats = [c.stats for c in subsidy.runtime.consumers]
        return bool(
            await subsidy.pool.fetchval(
                "SELECT true FROM certificates WHERE certificate_number = $1", marker.certificate_number
            )
        ) and sum(s.duplicates for s in stats) >= 5

    await eventually(caught_up)
    await asyncio.sleep(0.5)  # let the trips consumer finish its batch too
    assert await subsidy.pool.fetchval(
        "SELECT count(*) FROM grants WHERE certificate_number = ANY($1::text[])",
        [issued.certificate_number, waiting.certificate_number],
    ) == 2
    assert await subsidy.ledger(program_id) == [
        ("opening", 30_000), ("reserve", 30_000), ("donation", 30_000), ("reserve", 30_000),
    ]
    assert len(await subsidy.emitted(GrantRedeemed, grant_id=first["grant_id"])) == 2
    first_after = await subsidy.grant_row(issued.certificate_number, program_id)
    assert first_after is not None and first_after["legs_counted"] == 3
    assert len(await subsidy.emitted(BudgetChanged, program_id=program_id)) == 2  # opening + the one donation
    await subsidy.assert_balanced(program_id)


async def test_revocation_and_expiry_release_the_unused_part(subsidy: Subsidy) -> None:
    program_id, partner = await create_program(
        subsidy, "152048", "fare_voucher", VOUCHER_PARAMETERS, opening_budget=50_000
    )
    revoked = certificate_issued("152048", [membership(partner=partner)])
    waiting = certificate_issued("152048", [membership(partner=partner)])
    await subsidy.certify(revoked, waiting)
    grant = await subsidy.grant_of(revoked.certificate_number, program_id)
    assert (await subsidy.grant_of(waiting.certificate_number, program_id))["status"] == "waitlisted"
    headers = subsidy.auth("partner", partner=partner)
    response = await subsidy.client.post(
        "/v1/redemptions", json=http_trip(grant, trip_kind="round_trip"), headers=headers
    )
    assert response.json()["accepted"] is True

    await subsidy.publish(CERTIFICATES, cert_event(closing(revoked, CertificateRevoked)))
    [(_, cancelled)] = await subsidy.on_topic(GRANTS, GrantCancelled, 1, grant_id=grant["grant_id"])
    assert cancelled["released"] == 30_000 and cancelled["reason"] == "certificate_revoked"
    for table in ("grants", "budget_ledger"):  # nor is the revocation's text kept here
        rows = await subsidy.pool.fetch(f"SELECT t::text AS row FROM {table} t")
        assert not [r["row"] for r in rows if "moved away" in r["row"]]
    # the release lets the waitlisted grant in
    [(_, promoted)] = await subsidy.on_topic(GRANTS, GrantIssued, 1, certificate_number=waiting.certificate_number)
    assert promoted["reserved"] == 40_000
    late = await subsidy.client.post("/v1/redemptions", json=http_trip(grant), headers=headers)
    assert late.status_code == 201
    assert late.json() | {"trip_id": None} == {
        "partner": partner, "trip_id": None, "grant_id": grant["grant_id"], "program_id": program_id,
        "accepted": False, "reason": "certificate_revoked",
        "detail": f"certificate {revoked.certificate_number} was revoked",
        "unit": "jpy", "amount": 0, "trips_counted": 2, "completed": False, "duplicate": False,
    }
    rejected = await subsidy.emitted(GrantRedemptionRejected, grant_id=grant["grant_id"], reason="certificate_revoked")
    assert len(rejected) == 1

    second = await subsidy.grant_of(waiting.certificate_number, program_id)
    await subsidy.publish(CERTIFICATES, cert_event(closing(waiting, CertificateExpired)))
    [(_, expired)] = await subsidy.on_topic(GRANTS, GrantExpired, 1, grant_id=second["grant_id"])
    assert expired["released"] == 40_000 and expired["expired_on"] == TODAY.isoformat()
    after = await subsidy.client.post("/v1/redemptions", json=http_trip(second), headers=headers)
    assert after.json()["reason"] == "certificate_expired"

    assert await subsidy.ledger(program_id) == [
        ("opening", 50_000), ("reserve", 40_000), ("draw", 10_000), ("release", 30_000), ("reserve", 40_000),
        ("release", 40_000),
    ]
    assert await subsidy.assert_balanced(program_id) == {"available": 40_000, "reserved": 0, "spent": 10_000}
    released = await subsidy.on_topic(BUDGETS, BudgetChanged, 2, program_id=program_id)
    assert {d["delta"] for _, d in released} >= {30_000, 40_000}


async def test_a_renewal_grants_the_next_certificate_year_once(subsidy: Subsidy) -> None:
    program_id, partner = await create_program(subsidy, "152048", "fare_voucher", VOUCHER_PARAMETERS, 80_000)
    issued = certificate_issued("152048", [membership(partner=partner, member_number="M-77")])
    await subsidy.certify(issued)
    this_year = await subsidy.grant_of(issued.certificate_number, program_id)

    # certification renews under the same number and valid_from, extending valid_until by a year
    renewed = CertificateRenewed(
        **issued.model_dump(exclude={"application_id", "issued_at", "valid_until"}),
        valid_until=issued.valid_until + timedelta(days=365), renewed_at=datetime.now(UTC),
    )
    await subsidy.publish(CERTIFICATES, cert_event(renewed))
    await subsidy.publish(CERTIFICATES, cert_event(renewed))  # re-sent under a new event id
    issued_events = await subsidy.on_topic(GRANTS, GrantIssued, 2, certificate_number=issued.certificate_number)
    next_year = {d["grant_id"]: d for _, d in issued_events}
    next_year.pop(this_year["grant_id"])
    [(next_id, next_event)] = next_year.items()
    assert next_event["window_from"] == issued.valid_from.replace(year=issued.valid_from.year + 1).isoformat()
    program_ends = TODAY + timedelta(days=365)  # test programs run a year from today
    assert next_event["window_until"] == min(renewed.valid_until, program_ends).isoformat()
    assert opened_for_tests(Sealed.model_validate(next_event["member_number"])) == b"M-77"

    too_early = await subsidy.client.post(
        "/v1/redemptions", json=http_trip({"grant_id": next_id, "certificate_number": issued.certificate_number}),
        headers=subsidy.auth("partner", partner=partner),
    )
    assert too_early.json()["reason"] == "outside_window"

    # the resident withdraws: the certificate is revoked without member numbers, and so are the grants
    withdrawn = CertificateRevoked(
        **renewed.model_dump(exclude={"renewed_at", "status", "partners"}), status="revoked",
        partners=[membership(partner=partner)], reason="resident withdrew", revoked_at=datetime.now(UTC),
    )
    await subsidy.publish(CERTIFICATES, cert_event(withdrawn))
    cancelled = await subsidy.on_topic(GRANTS, GrantCancelled, 2, certificate_number=issued.certificate_number)
    assert sorted(d["released"] for _, d in cancelled) == [40_000, 40_000]
    assert {d["reason"] for _, d in cancelled} == {"resident_withdrawn"}  # the old text keeps its meaning
    rows = await subsidy.pool.fetch(
        "SELECT member_number, status FROM grants WHERE certificate_number = $1", issued.certificate_number
    )
    assert [(r["member_number"], r["status"]) for r in rows] == [(None, "cancelled"), (None, "cancelled")]
    assert await subsidy.assert_balanced(program_id) == {"available": 80_000, "reserved": 0, "spent": 0}


async def test_windows_that_end_expire_the_grant_and_return_its_miles(subsidy: Subsidy) -> None:
    parameters = {"required_round_trips": 2, "max_one_ways": 2, "miles_per_one_way": 5000, "window_days": 10}
    program_id, partner = await create_program(subsidy, "304069", "mileage_grant", parameters, 10_000)
    issued = certificate_issued("304069", [membership(partner=partner)], valid_from=TODAY - timedelta(days=5))
    too_late = certificate_issued("304069", [membership(partner=partner)], valid_from=TODAY - timedelta(days=20))
    await subsidy.certify(too_late, issued)
    grant = await subsidy.grant_of(issued.certificate_number, program_id)
    assert grant["window_until"] == TODAY + timedelta(days=4)
    assert await subsidy.grant_row(too_late.certificate_number, program_id) is None  # nothing left of its window
    await subsidy.publish(GATEWAY_TRIPS, trip_event(trip(partner, grant, days_ago=1)))
    await subsidy.on_topic(GRANTS, GrantRedeemed, 1, grant_id=grant["grant_id"])

    assert await expire_lapsed_grants(subsidy.runtime, TODAY) == 0
    assert await expire_lapsed_grants(subsidy.runtime, TODAY + timedelta(days=5)) >= 1
    [(_, expired)] = await subsidy.on_topic(GRANTS, GrantExpired, 1, grant_id=grant["grant_id"])
    assert expired["released"] == 10_000 and expired["expired_on"] == (TODAY + timedelta(days=5)).isoformat()
    assert await subsidy.assert_balanced(program_id) == {"available": 10_000, "reserved": 0, "spent": 0}


async def test_fare_discounts_draw_what_the_partner_granted_up_to_the_cap(subsidy: Subsidy) -> None:
    parameters = {"discount_percent": 50, "max_discount_jpy": 10_000, "max_one_ways": 2}
    program_id, partner = await create_program(subsidy, "392065", "fare_discount", parameters, 20_000)
    issued = certificate_issued("392065", [membership(partner=partner)])
    await subsidy.publish(CERTIFICATES, cert_event(issued))
    grant = await subsidy.grant_of(issued.certificate_number, program_id)
    assert grant["value"] == 20_000
    headers = subsidy.auth("partner", partner=partner)

    for bad in (http_trip(grant, discount_jpy=-5), http_trip(grant, discount_jpy=0), http_trip(grant)):
        before = await snapshot(subsidy)
        response = await subsidy.client.post("/v1/redemptions", json=bad, headers=headers)
        await assert_problem(subsidy, response, 422, "invalid-discount", before)
    over_cap = await subsidy.client.post("/v1/redemptions", json=http_trip(grant, discount_jpy=10_001), headers=headers)
    assert over_cap.json()["accepted"] is False and over_cap.json()["reason"] == "over_count"
    ok = await subsidy.client.post("/v1/redemptions", json=http_trip(grant, discount_jpy=3000), headers=headers)
    assert ok.json()["accepted"] is True and ok.json()["amount"] == 3000
    last = await subsidy.client.post("/v1/redemptions", json=http_trip(grant, discount_jpy=4000), headers=headers)
    assert last.json()["completed"] is True
    # the used-up grant hands back what its envelope did not need
    assert await subsidy.ledger(program_id) == [
        ("opening", 20_000), ("reserve", 20_000), ("draw", 3000), ("draw", 4000), ("release", 13_000),
    ]
    assert await subsidy.assert_balanced(program_id) == {"available": 13_000, "reserved": 0, "spent": 7000}

    # the seeded ANA program: cap and count from the illustrative defaults
    ana = certificate_issued("392065", [membership(partner="ana", member_number="ANA-1")])
    await subsidy.publish(CERTIFICATES, cert_event(ana))
    seeded = await subsidy.grant_of(ana.certificate_number, "ana-dual-residence-fare@392065")
    assert seeded["value"] == 120_000 and seeded["status"] == "issued"


async def test_kafka_reports_are_answered_on_the_grants_topic(subsidy: Subsidy) -> None:
    program_id, partner = await create_program(subsidy, "152048", "fare_voucher", VOUCHER_PARAMETERS, 40_000)
    issued = certificate_issued("152048", [membership(partner=partner)])
    await subsidy.publish(CERTIFICATES, cert_event(issued))
    grant = await subsidy.grant_of(issued.certificate_number, program_id)

    outside = trip(partner, grant, kind="one_way", days_ago=40)  # before the certificate's start
    foreign = trip("jal", grant, kind="one_way")
    unknown = TripAccepted(
        partner=partner, grant_id="no-such-grant", certificate_number=issued.certificate_number,
        trip_id=f"T-{uid()}", trip_kind="one_way", travelled_on=TODAY, reported_at=datetime.now(UTC),
    )
    hopeless = TripAccepted(
        partner=partner, grant_id="no-such-grant", certificate_number="no-such-certificate",
        trip_id=f"T-{uid()}", trip_kind="one_way", travelled_on=TODAY, reported_at=datetime.now(UTC),
    )
    bad_discount = trip(partner, grant, kind="one_way", discount=100)
    await subsidy.publish(GATEWAY_TRIPS, *[trip_event(t) for t in (outside, foreign, unknown, hopeless, bad_discount)])

    reasons = {}
    for report in (outside, unknown):
        [(record, data)] = await subsidy.on_topic(GRANTS, GrantRedemptionRejected, 1, trip_id=report.trip_id)
        assert record.key == issued.certificate_number.encode()
        reasons[report.trip_id] = (data["reason"], data["partner"])
    assert reasons == {
        outside.trip_id: ("outside_window", partner),
        unknown.trip_id: ("unknown_grant", partner),
    }
    # nothing to answer about: parked on the dead-letter topic with the reason
    ours = {r.trip_id for r in (foreign, hopeless, bad_discount)}

    def parked_trips(records: list[Record]) -> dict[str, dict[str, bytes]]:
        decoded = {parse_envelope(r.headers, r.value, r.key).decode(TripAccepted).trip_id: dict(r.headers)
                   for r in records}
        return {trip_id: headers for trip_id, headers in decoded.items() if trip_id in ours}

    dead = await read_topic(
        subsidy.settings, subsidy.settings.topic(GATEWAY_TRIPS.dlq), until=lambda r: len(parked_trips(r)) >= 3,
        timeout=20,
    )
    parked = parked_trips(dead)
    assert b"UnknownGrant" in parked[hopeless.trip_id]["dlq_reason"]
    assert b"InvalidDiscount" in parked[bad_discount.trip_id]["dlq_reason"]
    # Another partner's grant (JAL runs no program in this town): the answer to a grant that does
    # not exist, and nothing on the grants topic names the grant for JAL.
    assert parked[foreign.trip_id]["dlq_reason"] == (
        f"UnknownGrant: no grant {grant['grant_id']} for certificate {issued.certificate_number} "
        "(and no program of this partner for it)"
    ).encode()
    assert await subsidy.emitted(GrantRedemptionRejected, trip_id=foreign.trip_id) == []
    assert await subsidy.ledger(program_id) == [("opening", 40_000), ("reserve", 40_000)]


async def test_another_partners_grant_is_answered_as_a_grant_that_does_not_exist(subsidy: Subsidy) -> None:
    """JAL runs a program in 香川県三豊市 (372081) too: a JAL trip on the other partner's grant there
    is refused exactly as one on a grant id nobody issued, on both channels, and moves nothing."""
    program_id, partner = await create_program(subsidy, "372081", "fare_voucher", VOUCHER_PARAMETERS, 40_000)
    issued = certificate_issued("372081", [membership(partner=partner)])
    await subsidy.publish(CERTIFICATES, cert_event(issued))
    grant = await subsidy.grant_of(issued.certificate_number, program_id)
    budget = await subsidy.assert_balanced(program_id)

    foreign = trip("jal", grant, kind="one_way")
    unknown = trip("jal", {"grant_id": f"G-{uid()}", "certificate_number": issued.certificate_number},
                   kind="one_way")
    await subsidy.publish(GATEWAY_TRIPS, trip_event(foreign), trip_event(unknown))
    answers = {}
    for report in (foreign, unknown):
        [(record, data)] = await subsidy.on_topic(GRANTS, GrantRedemptionRejected, 1, trip_id=report.trip_id)
        assert record.key == issued.certificate_number.encode()
        answers[report.trip_id] = data
    volatile = {"trip_id", "grant_id", "detail", "rejected_at"}
    same = [{k: v for k, v in answers[r.trip_id].items() if k not in volatile} for r in (foreign, unknown)]
    assert same[0] == same[1]
    assert same[0]["reason"] == "unknown_grant" and same[0]["partner"] == "jal"
    assert same[0]["program_id"] == "jal-dual-residence-miles@372081"  # JAL's own program, never the other's
    assert answers[foreign.trip_id]["detail"] == (
        f"no grant {grant['grant_id']} for certificate {issued.certificate_number}"
    )

    # Over HTTP with JAL's token: the very problem an unknown grant gets.
    jal = subsidy.auth("partner", partner="jal")
    over_http = await subsidy.client.post("/v1/redemptions", json=http_trip(grant), headers=jal)
    unknown_http = await subsidy.client.post("/v1/redemptions", json=http_trip(
        {"grant_id": f"G-{uid()}", "certificate_number": issued.certificate_number}), headers=jal)
    assert over_http.status_code == unknown_http.status_code == 404
    assert over_http.json()["code"] == unknown_http.json()["code"] == "unknown-grant"

    row = await subsidy.grant_row(issued.certificate_number, program_id)
    assert row is not None and (row["status"], row["legs_counted"], row["drawn"]) == ("issued", 0, 0)
    assert await subsidy.assert_balanced(program_id) == budget
    assert await subsidy.ledger(program_id) == [("opening", 40_000), ("reserve", 40_000)]


async def test_staff_see_their_programs_grants_ledger_and_redemptions(subsidy: Subsidy) -> None:
    program_id, partner = await create_program(subsidy, "152242", "fare_voucher", VOUCHER_PARAMETERS, 40_000)
    issued = certificate_issued("152242", [membership(partner=partner)], resident="res-sado-1")
    await subsidy.publish(CERTIFICATES, cert_event(issued))
    grant = await subsidy.grant_of(issued.certificate_number, program_id)
    headers = subsidy.auth("partner", partner=partner)
    accepted = await subsidy.client.post("/v1/redemptions", json=http_trip(grant, trip_id="佐渡-1"), headers=headers)
    refused = await subsidy.client.post(
        "/v1/redemptions", json=http_trip(grant, travelled_on=(TODAY + timedelta(days=9)).isoformat()), headers=headers
    )
    formula = await subsidy.client.post(
        "/v1/redemptions", json=http_trip(grant, trip_id="=HYPERLINK(1)", travelled_on="2020-01-01"), headers=headers
    )
    assert accepted.json()["accepted"] and not refused.json()["accepted"] and not formula.json()["accepted"]
    staff = subsidy.auth("staff", municipality="152242")

    view = (await subsidy.client.get(f"/v1/programs/{program_id}", headers=staff)).json()
    [budget] = view["budgets"]
    assert budget["available"] == 0 and budget["reserved"] == 35_000 and budget["spent"] == 5000
    assert budget["balanced"] is True
    assert budget["ledger"]["by_kind"] == {"opening": 40_000, "reserve": 40_000, "draw": 5000}
    assert view["grants"] == {"issued": 1}

    ledger = (await subsidy.client.get(f"/v1/programs/{program_id}/ledger?limit=2&offset=1", headers=staff)).json()
    assert ledger["total"] == 3 and [e["kind"] for e in ledger["items"]] == ["reserve", "draw"]
    assert ledger["items"][1]["trip_id"] == "佐渡-1" and ledger["items"][1]["grant_id"] == grant["grant_id"]

    grants = (await subsidy.client.get(f"/v1/programs/{program_id}/grants?status=issued", headers=staff)).json()
    assert grants["total"] == 1 and grants["items"][0]["remaining"] == 35_000
    none = (await subsidy.client.get(f"/v1/programs/{program_id}/grants?status=waitlisted", headers=staff)).json()
    assert none == {"items": [], "total": 0, "limit": 100, "offset": 0}

    export = await subsidy.client.get("/v1/municipalities/152242/redemptions.csv", headers=staff)
    assert export.status_code == 200
    assert export.headers["content-type"] == "text/csv; charset=utf-8"
    assert export.headers["content-disposition"].startswith("attachment")
    assert export.content.startswith("\ufeff".encode())
    rows = list(csv.DictReader(io.StringIO(export.content.decode("utf-8-sig"))))
    mine = [r for r in rows if r["grant_id"] == grant["grant_id"]]
    assert [(r["trip_id"], r["accepted"], r["reason"], r["amount"]) for r in mine] == [
        ("佐渡-1", "true", "", "5000"), (refused.json()["trip_id"], "false", "outside_window", "0"),
        ("'=HYPERLINK(1)", "false", "outside_window", "0"),
    ]

    listed = await subsidy.client.get(
        f"/v1/municipalities/152242/redemptions?program_id={program_id}&limit=1&offset=1", headers=staff
    )
    assert listed.json()["total"] == 3
    assert [(t["trip_id"], t["reason"]) for t in listed.json()["items"]] == [
        (refused.json()["trip_id"], "outside_window")
    ]

    resident = subsidy.auth("resident", subject="res-sado-1")
    own = await subsidy.client.get("/v1/residents/res-sado-1/grants", headers=resident)
    assert [g["grant_id"] for g in own.json()["items"]] == [grant["grant_id"]]
    other_staff = subsidy.auth("staff", municipality="304018")
    assert (await subsidy.client.get("/v1/residents/res-sado-1/grants", headers=other_staff)).json()["total"] == 0
    for path in (f"/v1/programs/{program_id}", "/v1/municipalities/152242/redemptions.csv",
                 "/v1/municipalities/152242/redemptions",
                 "/v1/municipalities/152242/programs", f"/v1/programs/{program_id}/ledger"):
        denied = await subsidy.client.get(path, headers=other_staff)
        assert denied.status_code == 403 and denied.headers["content-type"] == PROBLEM
    unknown = await subsidy.client.get("/v1/programs/no-such-program@152242", headers=staff)
    assert unknown.status_code == 404 and unknown.json()["code"] == "unknown-program"
    someone_else = await subsidy.client.get(
        "/v1/residents/res-sado-1/grants", headers=subsidy.auth("resident", subject="res-other")
    )
    assert someone_else.status_code == 403


async def test_a_refunded_donation_leaves_the_reserved_grants_whole(subsidy: Subsidy) -> None:
    program_id = "jal-dual-residence-miles@422100"  # 壱岐市: a miles and a yen program
    gift = donation("422100", "miles", 10_000)
    await subsidy.publish(DONATIONS, (gift, gift.donation_id, gift.municipality_code))
    await eventually(lambda: _has_credit(subsidy, gift.donation_id))
    issued = certificate_issued("422100", [membership(partner="jal")])
    await subsidy.publish(CERTIFICATES, cert_event(issued))
    await subsidy.grant_of(issued.certificate_number, program_id)  # takes 30,000 of the 40,000
    refund = DonationRefunded(
        donation_id=gift.donation_id, municipality_code="422100", donor_id=gift.donor_id, unit="miles",
        amount=10_000, earmark="dual_residence", refunded_at=datetime.now(UTC),
    )
    await subsidy.publish(DONATIONS, (refund, refund.donation_id, refund.municipality_code))

    async def refunded() -> bool:
        status = await subsidy.pool.fetchval(
            "SELECT status FROM donation_credits WHERE donation_id = $1", gift.donation_id
        )
        return bool(status == "refunded")

    await eventually(refunded)
    assert await subsidy.ledger(program_id) == [
        ("opening", 30_000), ("donation", 10_000), ("reserve", 30_000), ("debit", 10_000),
    ]
    assert await subsidy.assert_balanced(program_id) == {"available": 0, "reserved": 30_000, "spent": 0}
    # the yen program of the same island got nothing from a miles donation
    assert await subsidy.ledger("iki-island-routes@422100") == [("opening", 1_000_000)]


# --- bad input ------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    ledger: int
    outbox: int
    trips: int
    programs: int


async def snapshot(s: Subsidy) -> Snapshot:
    row = await s.pool.fetchrow(
        """
        SELECT (SELECT count(*) FROM budget_ledger) AS ledger, (SELECT count(*) FROM outbox) AS outbox,
               (SELECT count(*) FROM trips) AS trips, (SELECT count(*) FROM programs) AS programs
        """
    )
    assert row is not None
    return Snapshot(**dict(row))


async def assert_problem(
    s: Subsidy, response: httpx.Response, status: int, code: str, before: Snapshot
) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["code"] == code
    assert await snapshot(s) == before  # nothing written: no ledger row, no event, no trip


def program_body(**overrides: object) -> dict[str, Any]:
    body: dict[str, Any] = {
        "program_id": f"test-bad-{uid()}@304018", "title": "bad", "partner": "jal", "municipality_code": "304018",
        "mechanism": "mileage_grant",
        "parameters": {"required_round_trips": 4, "max_one_ways": 4, "miles_per_one_way": 7500, "window_days": 122},
        "active_from": (TODAY - timedelta(days=1)).isoformat(),
        "active_until": (TODAY + timedelta(days=100)).isoformat(),
    }
    body.update(overrides)
    return body


def with_parameters(**changes: object) -> dict[str, Any]:
    parameters = program_body()["parameters"] | changes
    return program_body(parameters=parameters)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (with_parameters(required_round_trips=0), 422, "invalid-program-parameters"),
        (with_parameters(miles_per_one_way=-7500), 422, "invalid-program-parameters"),
        (with_parameters(miles_per_one_way="7500"), 422, "invalid-program-parameters"),
        (with_parameters(window_days=1.5), 422, "invalid-program-parameters"),
        (program_body(parameters={"voucher_jpy": 5000}), 422, "invalid-program-parameters"),
        (program_body(active_from="2024-01-01", active_until="2024-12-31"), 422, "program-period-in-past"),
        (program_body(active_until=(TODAY - timedelta(days=2)).isoformat()), 422, "invalid-program-period"),
        (program_body(opening_budget=-1), 422, "invalid-amount"),
        (program_body(opening_budget=1.5), 422, "invalid-request"),
        (program_body(opening_budget="100"), 422, "invalid-request"),
        (program_body(municipality_code="304019"), 422, "invalid-request"),
        (program_body(mechanism="cashback"), 422, "invalid-request"),
        (program_body(surprise=1), 422, "invalid-request"),
        (program_body(program_id="jal-dual-residence-miles@304018"), 409, "program-exists"),
    ],
)
async def test_programs_that_make_no_sense_are_refused(
    subsidy: Subsidy, body: dict[str, Any], status: int, code: str
) -> None:
    before = await snapshot(subsidy)
    response = await subsidy.client.post("/v1/programs", json=body, headers=subsidy.auth("admin"))
    await assert_problem(subsidy, response, status, code, before)


async def test_only_admins_create_programs(subsidy: Subsidy) -> None:
    before = await snapshot(subsidy)
    response = await subsidy.client.post(
        "/v1/programs", json=program_body(), headers=subsidy.auth("staff", municipality="304018")
    )
    await assert_problem(subsidy, response, 403, "forbidden", before)
    response = await subsidy.client.post("/v1/programs", json=program_body())
    await assert_problem(subsidy, response, 401, "unauthenticated", before)


@pytest.mark.parametrize(
    ("path", "body", "role", "status", "code"),
    [
        ("jal-dual-residence-miles@304069", {"unit": "miles", "amount": -500, "reason": "x"}, "staff", 422,
         "invalid-amount"),
        ("jal-dual-residence-miles@304069", {"unit": "miles", "amount": 0, "reason": "x"}, "staff", 422,
         "invalid-amount"),
        ("jal-dual-residence-miles@304069", {"unit": "miles", "amount": 1.5, "reason": "x"}, "staff", 422,
         "invalid-request"),
        ("jal-dual-residence-miles@304069", {"unit": "miles", "amount": "100", "reason": "x"}, "staff", 422,
         "invalid-request"),
        ("jal-dual-residence-miles@304069", {"unit": "miles", "amount": 100}, "staff", 422, "invalid-request"),
        ("jal-dual-residence-miles@304069", {"unit": "jpy", "amount": 3, "reason": "x"}, "staff", 422,
         "amount-not-convertible"),
        ("jal-dual-residence-miles@304069", {"unit": "miles", "amount": 100, "reason": "x"}, "other-staff", 403,
         "forbidden"),
        ("jal-dual-residence-miles@304069", {"unit": "miles", "amount": 100, "reason": "x"}, "partner", 403,
         "forbidden"),
        ("no-such-program@304069", {"unit": "miles", "amount": 100, "reason": "x"}, "staff", 404, "unknown-program"),
        ("jr-east-sanjo-shinkansen@152048", {"unit": "miles", "amount": 100, "reason": "x"}, "admin", 422,
         "unit-mismatch"),
    ],
)
async def test_bad_top_ups_are_refused_and_leave_the_ledger_alone(
    subsidy: Subsidy, path: str, body: dict[str, Any], role: str, status: int, code: str
) -> None:
    headers = {
        "staff": subsidy.auth("staff", municipality="304069"),
        "other-staff": subsidy.auth("staff", municipality="304018"),
        "partner": subsidy.auth("partner", partner="jal"),
        "admin": subsidy.auth("admin"),
    }[role]
    before = await snapshot(subsidy)
    response = await subsidy.client.post(f"/v1/programs/{path}/budget", json=body, headers=headers)
    await assert_problem(subsidy, response, status, code, before)


async def test_top_ups_by_admin_convert_yen_and_replay_with_the_idempotency_key(subsidy: Subsidy) -> None:
    program_id = "jal-dual-residence-miles@372081"  # 三豊市
    headers = subsidy.auth("admin") | {"Idempotency-Key": f"k-{uid()}"}
    body = {"unit": "jpy", "amount": 10_000, "reason": "furusato fund transfer"}
    first = await subsidy.client.post(f"/v1/programs/{program_id}/budget", json=body, headers=headers)
    again = await subsidy.client.post(f"/v1/programs/{program_id}/budget", json=body, headers=headers)
    assert first.status_code == again.status_code == 201 and first.json() == again.json()
    assert first.json()["credited"] == 5000
    before = await snapshot(subsidy)
    reused = await subsidy.client.post(
        f"/v1/programs/{program_id}/budget", json=body | {"amount": 20_000}, headers=headers
    )
    await assert_problem(subsidy, reused, 422, "idempotency-key-reused", before)
    assert await subsidy.ledger(program_id) == [("opening", 30_000), ("top_up", 5000)]


async def test_bad_redemptions_are_problems_and_write_nothing(subsidy: Subsidy) -> None:
    program_id, partner = await create_program(subsidy, "152048", "fare_voucher", VOUCHER_PARAMETERS, 40_000)
    issued = certificate_issued("152048", [membership(partner=partner)])
    await subsidy.publish(CERTIFICATES, cert_event(issued))
    grant = await subsidy.grant_of(issued.certificate_number, program_id)
    mine = subsidy.auth("partner", partner=partner)
    cases: list[tuple[dict[str, Any], dict[str, str], int, str]] = [
        (http_trip(grant, grant_id="no-such-grant"), mine, 404, "unknown-grant"),
        (http_trip(grant, certificate_number="C-other"), mine, 404, "unknown-grant"),
        # another partner's grant is answered as one that does not exist (its existence is not revealed)
        (http_trip(grant), subsidy.auth("partner", partner="jal"), 404, "unknown-grant"),
        (http_trip(grant, discount_jpy=500), mine, 422, "invalid-discount"),
        (http_trip(grant, discount_jpy=1.5), mine, 422, "invalid-request"),
        (http_trip(grant, trip_kind="teleport"), mine, 422, "invalid-request"),
        (http_trip(grant, partner="jal"), mine, 422, "invalid-request"),
        (http_trip(grant), subsidy.auth("staff", municipality="152048"), 403, "forbidden"),
        (http_trip(grant), subsidy.auth("admin"), 403, "forbidden"),
    ]
    for body, headers, status, code in cases:
        before = await snapshot(subsidy)
        response = await subsidy.client.post("/v1/redemptions", json=body, headers=headers)
        await assert_problem(subsidy, response, status, code, before)
    assert await subsidy.ledger(program_id) == [("opening", 40_000), ("reserve", 40_000)]


async def test_erasure_removes_member_numbers_from_every_table_and_no_late_certificate_grants_again(
    subsidy: Subsidy,
) -> None:
    """Member numbers travel and rest sealed with the resident's key; the resident's withdrawal ends
    their open grants, erases the numbers of all their grants (ended ones too) and certificates, keeps
    the accounts with ids only; a certificate event redelivered afterwards grants nothing."""
    program_id, partner = await create_program(subsidy, "152048", "fare_voucher", VOUCHER_PARAMETERS, 80_000)
    resident, member = f"res-{uid()}", f"M{uuid.uuid4().hex[:11].upper()}"
    keyring = subsidy.runtime.keyring
    ended, current = [
        await sealed_for(keyring, certificate_issued(
            "152048", [membership(partner, member, resident_id=resident)], resident=resident))
        for _ in range(2)
    ]
    [ended_envelope] = await subsidy.certify(ended)
    await subsidy.certify(current)
    await subsidy.grant_of(ended.certificate_number, program_id)
    await subsidy.publish(CERTIFICATES, cert_event(closing(ended, CertificateExpired)))
    open_grant = await subsidy.grant_of(current.certificate_number, program_id)

    async def ended_expired() -> bool:
        return await subsidy.status(ended.certificate_number, program_id) == "expired"

    await eventually(ended_expired)
    issued = await subsidy.on_topic(GRANTS, GrantIssued, 2, resident_id=resident)
    for record, data in issued:  # never in clear on the topic; the key store opens it while they are active
        assert member.encode() not in (record.value or b"")
        assert await keyring.open_text(Sealed.model_validate(data["member_number"])) == member
    listed = await subsidy.client.get(f"/v1/residents/{resident}/grants", headers=subsidy.auth("admin"))
    assert {g["member_number"] for g in listed.json()["items"]} == {member}  # opened for whoever may read it

    [withdrawal] = await subsidy.publish(
        ERASURES, (ResidentErased(resident_id=resident, withdrawn_at=datetime.now(UTC)), resident, resident)
    )

    async def erased() -> bool:
        return bool(await subsidy.pool.fetchval(
            "SELECT true FROM kit_erased_residents WHERE resident_id = $1", resident))

    await eventually(erased)
    [(_, cancelled)] = await subsidy.on_topic(GRANTS, GrantCancelled, 1, grant_id=open_grant["grant_id"])
    assert cancelled["reason"] == "resident_withdrawn" and cancelled["released"] == 40_000
    grants = await subsidy.pool.fetch(
        "SELECT status, member_number FROM grants WHERE resident_id = $1 ORDER BY status", resident
    )
    assert [(g["status"], g["member_number"]) for g in grants] == [("cancelled", None), ("expired", None)]
    certificates = await subsidy.pool.fetch(
        "SELECT partners FROM certificates WHERE resident_id = $1", resident
    )
    assert [json.loads(c["partners"]) for c in certificates] == [[{"partner": partner, "member_number": None}]] * 2
    # No table holds the sealed number any more (nor, ever, the number itself).
    sealed_ct = cast(Sealed, current.partners[0].member_number).ct
    for table in ("grants", "certificates", "trips", "budget_ledger", "idempotency_keys"):
        for needle in (member, sealed_ct):
            query = f"SELECT count(*) FROM {table} AS t WHERE strpos(t::text, $1) > 0"
            hits = await subsidy.pool.fetchval(query, needle)
            assert hits == 0, (table, needle)
    assert await subsidy.pool.fetchval(  # the events went out sealed only
        "SELECT count(*) FROM outbox WHERE position(convert_to($1, 'UTF8') in payload) > 0", member
    ) == 0
    # The accounts stay whole, with ids only.
    assert await subsidy.assert_balanced(program_id) == {"available": 80_000, "reserved": 0, "spent": 0}
    # The key shredded (registration does it): the copies on the topic are unreadable for good.
    await keyring.shred(resident_subject(resident))
    assert await keyring.open_many([Sealed.model_validate(d["member_number"]) for _, d in issued]) == [None, None]

    # A certificate redelivered after the erasure (a late event, a replay) grants nothing.
    grants_before = await subsidy.pool.fetchval("SELECT count(*) FROM grants WHERE resident_id = $1", resident)
    await subsidy.republish(CERTIFICATES, [ended_envelope])
    [late] = await subsidy.publish(CERTIFICATES, cert_event(current))
    await subsidy.republish(ERASURES, [withdrawal])

    async def handled() -> bool:
        return bool(await subsidy.pool.fetchval("SELECT true FROM inbox WHERE event_id = $1", late.id))

    await eventually(handled)
    assert await subsidy.pool.fetchval("SELECT count(*) FROM grants WHERE resident_id = $1", resident) == grants_before
    assert len(await subsidy.emitted(GrantIssued, resident_id=resident)) == 2
