"""Donation's part of erasure (issue #17): a withdrawn resident's donor, and a donor erased on request,
keep only what the law asks the municipality to keep — the donor's name and address on the receipts
— until its period ends; the retention job then erases that too, once, however many replicas run it.

Over the real stack: the withdrawal comes through ``registration.residents.v1`` to the service's
consumer; the retention job runs on runtimes whose clock is moved past the period.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import date, datetime
from typing import Any

import asyncpg
import pytest

from services.donation import handlers
from services.donation.domain import last_erasable_year, retention_ends
from services.donation.main import DonationConfig, create_app
from shared.contracts.donation import DonationReceived
from shared.contracts.registration import ResidentErased
from shared.contracts.topics import ERASURES
from shared.kit.clock import JAPAN, Clock
from shared.kit.envelope import Envelope, new_envelope
from shared.kit.settings import Settings
from tests.integration.test_donation import SHIRAHAMA, TANABE, Service, donation, events_about, person, problem
from tests.support import bearer, eventually, produce, service_client

IKI = "352101"  # 長崎県壱岐市: only this module's donations go there (receipt counters stay others')


def new_id(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
async def service(settings: Settings) -> AsyncIterator[Service]:
    config = DonationConfig(consumer_name=new_id("donation-erasure"))
    app = create_app(settings, config=config)
    async with service_client(app) as client:
        yield Service(app, client, app.state.runtime.pool, settings)


async def withdraw(settings: Settings, resident_id: str) -> Envelope:
    """The registration service's erasure request, as it publishes it."""
    envelope = new_envelope(
        "registration", ResidentErased(resident_id=resident_id, withdrawn_at=datetime.now(JAPAN)),
        subject=resident_id,
    )
    await publish(settings, envelope)
    return envelope


async def publish(settings: Settings, envelope: Envelope) -> None:
    await produce(settings, settings.topic(ERASURES.name), [(envelope.key, envelope.data, envelope.headers())])


async def handled(pool: asyncpg.Pool, envelope: Envelope) -> None:
    async def seen() -> bool:
        return bool(await pool.fetchval("SELECT count(*) FROM inbox WHERE event_id = $1", envelope.id))

    await eventually(seen, timeout=30)


async def occurrences(pool: asyncpg.Pool, text: str) -> dict[str, int]:
    """Rows of every table of the service's database holding ``text`` (published payloads included)."""
    found: dict[str, int] = {}
    for table in await pool.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"):
        name = table["tablename"]
        count = await pool.fetchval(f'SELECT count(*) FROM "{name}" t WHERE strpos(t::text, $1) > 0', text)
        if count:
            found[name] = count
    in_payloads = await pool.fetchval(
        "SELECT count(*) FROM outbox WHERE position($1::bytea IN payload) > 0", text.encode()
    )
    if in_payloads:
        found["outbox payloads"] = in_payloads
    return found


async def in_tables(pool: asyncpg.Pool, resident_id: str) -> dict[str, int]:
    """Where a resident id is kept: events carry ids (donation.received names the resident), tables
    must not once the resident is erased, but for the erased-residents ledger."""
    return {table: n for table, n in (await occurrences(pool, resident_id)).items() if table != "outbox payloads"}


def manager(settings: Settings, municipality: str) -> dict[str, str]:
    return bearer(settings, "staff", subject=f"manager-{municipality}", municipality=municipality,
                  staff_role="manager")


# ---------------------------------------------------------------------------- a resident withdraws


async def test_a_withdrawn_residents_donor_keeps_only_what_the_receipts_must_show(service: Service) -> None:
    resident_id = new_id("res")
    name, address, email = "消去 花子", f"長崎県壱岐市郷ノ浦町{uuid.uuid4().hex[:6]}", f"{new_id('hanako')}@example.jp"
    reason = f"カード会社から返金依頼 {uuid.uuid4().hex[:6]}"
    donor = {**person(name, resident_id=resident_id, address=address), "email": email}
    kept = await service.confirm(donation(IKI, 30_000, payment_date="2025-06-01", donor=donor, one_stop_requested=True))
    refunded = await service.confirm(donation(SHIRAHAMA, 12_000, payment_date="2026-02-01", donor=donor))
    miles = await service.confirm(donation(SHIRAHAMA, 5_000, kind="miles", payment_date="2026-02-02", donor=donor))
    response = await service.client.post(
        f"/v1/donations/{refunded['id']}/refund", json={"reason": reason}, headers=service.admin
    )
    assert response.status_code == 200 and response.json()["refund_reason"] == reason
    # Stored responses that copy the donor: the resident's own re-issue, an admin's confirmation.
    reissued = await service.client.post(
        f"/v1/receipts/{kept['receipt_number']}/reissue",
        headers={**service.resident(resident_id), "Idempotency-Key": new_id("reissue")},
    )
    assert reissued.status_code == 200 and reissued.json()["donor_name"] == name
    keyed = await service.client.post(
        "/v1/donations", json=donation(IKI, 8_000, payment_date="2026-03-01", donor=donor),
        headers={**service.admin, "Idempotency-Key": new_id("confirm")},
    )
    assert keyed.status_code == 201
    donor_id = uuid.UUID(kept["donor_id"])
    assert {refunded["donor_id"], miles["donor_id"], keyed.json()["donor_id"]} == {str(donor_id)}
    assert await service.pool.fetchval("SELECT count(*) FROM idempotency_keys WHERE strpos(body::text, $1) > 0",
                                       name) == 2

    withdrawal = await withdraw(service.settings, resident_id)
    await handled(service.pool, withdrawal)

    # E-mail, the staff's words and the resident link are gone at once, everywhere.
    assert await occurrences(service.pool, email) == {}
    assert await occurrences(service.pool, reason) == {}
    row = await service.pool.fetchrow("SELECT * FROM donors WHERE id = $1", donor_id)
    assert row is not None
    assert (row["name"], row["address"], row["email"], row["resident_id"]) == ("", None, None, None)
    assert row["erased_at"] is not None and row["purged_at"] is None  # its receipts keep something
    assert row["donor_key"] == f"erased:{donor_id}"
    assert await service.pool.fetchval(
        "SELECT count(*) FROM kit_erased_residents WHERE resident_id = $1", resident_id) == 1
    # The name and address stay exactly where the law keeps them: on the three receipts.
    assert await occurrences(service.pool, name) == {"receipts": 3}
    assert await occurrences(service.pool, address) == {"receipts": 3}
    assert await in_tables(service.pool, resident_id) == {"kit_erased_residents": 1}

    # Staff still read the municipality's record; no one gets the receipt again.
    staff = service.staff(IKI)
    record = await service.client.get(f"/v1/receipts/{kept['receipt_number']}", headers=staff)
    assert record.status_code == 200 and record.json()["donor_name"] == name
    listed = await service.client.get(f"/v1/donations/{kept['id']}", headers=staff)
    assert listed.json()["donor_name"] == name
    miles_view = await service.client.get(f"/v1/donations/{miles['id']}", headers=service.admin)
    assert miles_view.json()["donor_name"] == ""  # no receipt, nothing kept
    problem(await service.client.post(f"/v1/receipts/{kept['receipt_number']}/reissue", headers=staff),
            410, "donor-erased")
    problem(await service.client.get(f"/v1/receipts/{kept['receipt_number']}.pdf", headers=staff),
            410, "donor-erased")
    for path in (f"/v1/receipts/{kept['receipt_number']}", f"/v1/residents/{resident_id}/donor"):
        response = await service.client.get(path, headers=service.resident(resident_id))
        assert response.status_code in (403, 404) and name not in response.text
    erased_view = await service.client.get(f"/v1/donors/{donor_id}", headers=service.admin)
    assert erased_view.json()["erased_at"] is not None and erased_view.json()["name"] == ""

    # The withdrawal again (a redelivery, or a new copy after the inbox forgot it) changes nothing.
    before = [dict(r) for r in await service.pool.fetch("SELECT * FROM donors WHERE id = $1", donor_id)]
    receipts_before = [dict(r) for r in await service.pool.fetch(
        "SELECT * FROM receipts WHERE donor_id = $1 ORDER BY number", donor_id)]
    await publish(service.settings, withdrawal)
    again = await withdraw(service.settings, resident_id)
    await handled(service.pool, again)
    assert [dict(r) for r in await service.pool.fetch("SELECT * FROM donors WHERE id = $1", donor_id)] == before
    assert [dict(r) for r in await service.pool.fetch(
        "SELECT * FROM receipts WHERE donor_id = $1 ORDER BY number", donor_id)] == receipts_before


async def test_a_payment_naming_an_erased_resident_is_recorded_unlinked(service: Service) -> None:
    resident_id = new_id("res")
    address = f"長崎県壱岐市芦辺町{uuid.uuid4().hex[:6]}"
    email = f"{new_id('late')}@example.jp"
    first = await service.confirm(donation(IKI, 10_000, payment_date="2025-08-01",
                                           donor=person("遅延 次郎", resident_id=resident_id, address=address)))
    await handled(service.pool, await withdraw(service.settings, resident_id))

    # The provider still reports a payment by the person: it is money, recorded with what the
    # receipt shows, but neither linked to the resident nor kept with the e-mail.
    late = await service.confirm(donation(
        IKI, 7_000, payment_date="2025-08-02",
        donor={**person("遅延 次郎", resident_id=resident_id, address=address), "email": email},
    ))
    assert late["donor_id"] != first["donor_id"] and late["receipt_number"] is not None
    row = await service.pool.fetchrow("SELECT * FROM donors WHERE id = $1", uuid.UUID(late["donor_id"]))
    assert row is not None and row["resident_id"] is None and row["email"] is None and row["erased_at"] is None
    assert row["name"] == "遅延 次郎" and row["address"] == address
    assert await occurrences(service.pool, email) == {}
    [received] = await events_about(service.settings, late["id"], expected=1, model=DonationReceived)
    assert received.decode(DonationReceived).resident_id is None
    assert await in_tables(service.pool, resident_id) == {"kit_erased_residents": 1}

    # Naming the erased donor record by id is refused: its details are gone.
    problem(await service.client.post(
        "/v1/donations", headers=service.admin,
        json={**donation(IKI, 1_000, payment_date="2025-08-03"), "donor": None, "donor_id": first["donor_id"]},
    ), 410, "donor-erased")


# ---------------------------------------------------------------------------- erasure on request


async def test_a_donor_is_erased_on_request_by_an_admin_or_a_manager_of_their_municipality(
    service: Service,
) -> None:
    name, address = "依頼 三郎", f"長崎県壱岐市勝本町{uuid.uuid4().hex[:6]}"
    made = await service.confirm(donation(IKI, 20_000, payment_date="2025-09-01", donor=person(name, address=address)))
    donor_id = made["donor_id"]
    path = f"/v1/donors/{donor_id}"
    settings = service.settings

    reviewer = bearer(settings, "staff", subject="reviewer-iki", municipality=IKI, staff_role="reviewer")
    for refused, status in (
        (manager(settings, TANABE), 403),  # the donor never gave to 田辺市
        (reviewer, 403),  # managers only
        (service.resident(new_id("res")), 403),
        (bearer(settings, "payment_provider", subject="provider"), 403),
    ):
        response = await service.client.delete(path, headers=refused)
        assert response.status_code == status, response.text
    problem(await service.client.delete(f"/v1/donors/{uuid.uuid4()}", headers=service.admin), 404, "donor-not-found")
    company_donation = await service.confirm(donation(
        "300004", 100_000, kind="corporate", project="熊野の森", payment_date="2025-09-01",
        donor={"type": "company", "name": "株式会社消去", "head_office_code": "131016"},
        revitalisation_plan_id="300004-machi-hito-shigoto",  # 和歌山県's certified plan (FY2025 on)
    ))
    problem(await service.client.delete(f"/v1/donors/{company_donation['donor_id']}", headers=service.admin),
            409, "donor-is-a-company")
    assert await occurrences(service.pool, address) == {"donors": 1, "receipts": 1}

    erased = await service.client.delete(path, headers=manager(settings, IKI))
    assert erased.status_code == 200, erased.text
    body = erased.json()
    assert body["donor_id"] == donor_id and body["erased_at"] is not None
    assert body["erasable_from"] == retention_ends(2025).isoformat() == "2032-04-01"
    assert await occurrences(service.pool, address) == {"receipts": 1}
    # Asking again answers the same erasure (an admin too).
    again = await service.client.delete(path, headers=service.admin)
    assert again.status_code == 200 and again.json() == body

    # The person gives again with the same details: a new donor, the erased record stays erased.
    anew = await service.confirm(donation(IKI, 3_000, payment_date="2025-09-02", donor=person(name, address=address)))
    assert anew["donor_id"] != donor_id


# ---------------------------------------------------------------------------- the retention job


class Recorder:
    """Stands in for the handlers' logger: what was logged, by event."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    warning = error = exception = debug = info

    def named(self, prefix: str) -> list[dict[str, Any]]:
        return [fields for event, fields in self.events if event.startswith(prefix)]


def at(day: date) -> Clock:
    """A clock at 09:00 in Japan on ``day``."""
    return Clock.fixed(datetime(day.year, day.month, day.day, 9, tzinfo=JAPAN))


async def test_the_retention_job_erases_kept_receipts_when_the_period_ends_once_under_two_runtimes(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, address = "保存 四郎", f"長崎県壱岐市石田町{uuid.uuid4().hex[:6]}"
    donor = person(name, address=address)
    older = await service.confirm(donation(IKI, 10_000, payment_date="2025-03-01", donor=donor))
    newer = await service.confirm(donation(IKI, 15_000, payment_date="2026-01-15", donor=donor))
    donor_id = uuid.UUID(older["donor_id"])
    erased = await service.client.delete(f"/v1/donors/{donor_id}", headers=service.admin)
    assert erased.json()["erasable_from"] == "2033-04-01"  # the 2026 receipt's end

    # 2025's receipt lowered the 2026 fiscal year's resident tax: kept through 31 March 2032.
    assert last_erasable_year(date(2032, 3, 31)) == 2024 and last_erasable_year(date(2032, 4, 1)) == 2025

    async def receipt(number: str) -> asyncpg.Record:
        row = await service.pool.fetchrow("SELECT donor_name, donor_address, purged_at FROM receipts "
                                          "WHERE number = $1", number)
        assert row is not None
        return row

    config = DonationConfig(consumer_name=new_id("donation-retention"), retention_interval_s=3600)
    day_before = create_app(service.settings, clock=at(date(2032, 3, 31)), config=config)
    async with service_client(day_before):
        assert (await day_before.state.donation.purge_retained_records()).receipts == 0
    assert (await receipt(older["receipt_number"]))["donor_name"] == name

    # Erased donors' receipts of 2025 or before, not yet purged: due on 1 April 2032.
    due = await service.pool.fetchval(
        """
        SELECT count(*) FROM receipts r JOIN donors o ON o.id = r.donor_id
        WHERE o.erased_at IS NOT NULL AND r.purged_at IS NULL AND r.calendar_year <= 2025
        """
    )
    assert due >= 1
    recorder = Recorder()
    monkeypatch.setattr(handlers, "log", recorder)
    replicas = [
        create_app(service.settings, clock=at(date(2032, 4, 1)), config=config.model_copy(
            update={"consumer_name": new_id("donation-replica")})) for _ in range(2)
    ]
    async with service_client(replicas[0]), service_client(replicas[1]):
        rounds = await asyncio.gather(
            *(app.state.donation.purge_retained_records(batch_size=1) for app in replicas for _ in range(2))
        )
    assert sum(r.receipts for r in rounds) == due
    logged = recorder.named("retention ended")
    assert sum(fields["receipts"] for fields in logged) == due  # each receipt logged once
    assert all(fields["through_year"] == 2025 for fields in logged)

    purged = await receipt(older["receipt_number"])
    assert (purged["donor_name"], purged["donor_address"]) == ("", "") and purged["purged_at"] is not None
    assert (await receipt(newer["receipt_number"]))["donor_name"] == name  # 2026's is kept a year more
    assert await service.pool.fetchval("SELECT purged_at FROM donors WHERE id = $1", donor_id) is None
    assert await occurrences(service.pool, address) == {"receipts": 1}

    # A year later the background loop of a runtime finishes the donor: nothing of them is left.
    later = create_app(service.settings, clock=at(date(2033, 4, 1)), config=config.model_copy(
        update={"consumer_name": new_id("donation-later"), "retention_interval_s": 0.2}))
    async with service_client(later):
        async def finished() -> bool:
            return await service.pool.fetchval("SELECT purged_at FROM donors WHERE id = $1", donor_id) is not None

        await eventually(finished, timeout=20)
    assert await occurrences(service.pool, address) == {}
    assert await occurrences(service.pool, name) == {}
    # The money stays: the donations, their receipts' numbers and amounts, the ledger.
    rows = await service.pool.fetch("SELECT amount_jpy FROM receipts WHERE donor_id = $1 ORDER BY amount_jpy",
                                    donor_id)
    assert [r["amount_jpy"] for r in rows] == [10_000, 15_000]
