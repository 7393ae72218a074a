"""Listings over the real broker and database, with notification beside it (issue #20, done-when):
a vacant house published with the owner's consent and one without — only the first is listed; a
resident with a matching interest gets exactly one digest message with it, a resident without the
consent none, an erased resident none. Then "interested" with the consent to give the contact, and
the record of the contact given.

Each test runs the two services in-process against databases of their own and feeds them the
upstream events (registration's) on the session's topics; residents are unique per test.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
from fastapi import FastAPI

from services.listings.main import ListingsConfig
from services.listings.main import create_app as listings_app
from services.notification.main import create_app as notification_app
from shared.contracts.registration import ResidentWithdrawn
from shared.kit.clock import SYSTEM_CLOCK
from shared.kit.service import ServiceRuntime
from shared.kit.settings import Settings
from tests.integration.test_notification import publish
from tests.support import bearer, eventually, service_client
from tests.unit.test_notification_rendering import DECIDED, SHIRAHAMA, registration

FAST = ListingsConfig(sweep_interval_s=0.1)


@dataclass
class Platform:
    settings: Settings
    listings: httpx.AsyncClient
    notification: httpx.AsyncClient
    listings_app: FastAPI
    notification_app: FastAPI

    def pool(self, app: FastAPI) -> asyncpg.Pool:
        runtime: ServiceRuntime = app.state.runtime
        return runtime.pool

    @property
    def listings_pool(self) -> asyncpg.Pool:
        return self.pool(self.listings_app)

    @property
    def notification_pool(self) -> asyncpg.Pool:
        return self.pool(self.notification_app)

    def staff(self, code: str = SHIRAHAMA) -> dict[str, str]:
        return bearer(self.settings, "staff", municipality=code, staff_role="reviewer")

    def resident(self, resident_id: str) -> dict[str, str]:
        return bearer(self.settings, "resident", subject=resident_id)


@contextlib.asynccontextmanager
async def platform(settings: Settings) -> AsyncIterator[Platform]:
    own = settings.model_copy(update={"db_prefix": f"{settings.db_prefix}_l{uuid.uuid4().hex[:6]}", "smtp_url": None})
    lapp, napp = listings_app(own, config=FAST), notification_app(own)
    async with service_client(lapp) as listings, service_client(napp) as notification:
        yield Platform(own, listings, notification, lapp, napp)


async def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json() if response.content else None


def new_resident() -> str:
    return str(uuid.uuid4())


def vacant_house(*, consent: bool, title: str) -> dict[str, Any]:
    today = SYSTEM_CLOCK.today()
    body: dict[str, Any] = {
        "kind": "vacant_house", "municipality_code": SHIRAHAMA, "area": "白浜町堅田", "title": title,
        "summary": "築40年の平屋、海まで徒歩5分。改修費の補助あり。", "language": "ja",
        "available_from": today.isoformat(), "available_until": (today + timedelta(days=180)).isoformat(),
        "expires_on": (today + timedelta(days=60)).isoformat(),
    }
    if consent:
        body["owner_consent"] = {"owner_name": "白浜 一郎", "consented_on": today.isoformat(), "method": "written",
                                 "document_ref": "白浜町空き家バンク 2026-014"}
    return body


async def rows(pool: asyncpg.Pool, sql: str, *args: object) -> int:
    return int(await pool.fetchval(sql, *args))


async def digests_of(p: Platform, resident_id: str) -> list[asyncpg.Record]:
    return await p.notification_pool.fetch(
        "SELECT kind, subject, body FROM messages WHERE resident_id = $1 AND kind = 'listing_digest'", resident_id
    )


async def test_only_a_consented_vacant_house_is_listed_and_told_once_to_consenting_living_residents(
    settings: Settings,
) -> None:
    async with platform(settings) as p:
        interested, unconsented, erased = new_resident(), new_resident(), new_resident()
        await publish(p.settings, *(registration(r, email_consent=False) for r in (interested, unconsented, erased)))

        async def known() -> bool:
            return await rows(p.listings_pool, "SELECT count(*) FROM resident_registrations WHERE resident_id = "
                              "ANY($1::text[])", [interested, unconsented, erased]) == 3

        await eventually(known, timeout=20)

        wanted = {"kinds": ["vacant_house", "trial_stay"], "municipality_codes": [SHIRAHAMA], "cadence": "immediate"}
        for resident in (interested, erased):
            consent = await ok(await p.listings.put(f"/v1/residents/{resident}/listing-interests", json=wanted,
                                                    headers=p.resident(resident)))
            assert consent["consented_at"] is not None and consent["kinds"] == ["trial_stay", "vacant_house"]
        # A resident may not set another's interests.
        other = await p.listings.put(f"/v1/residents/{unconsented}/listing-interests", json=wanted,
                                     headers=p.resident(interested))
        assert other.status_code == 403

        # The erased resident's withdrawal reaches both services before the listing is published.
        await publish(p.settings, ResidentWithdrawn(resident_id=erased, withdrawn_at=DECIDED))

        async def erased_everywhere() -> bool:
            return all([
                await rows(pool, "SELECT count(*) FROM kit_erased_residents WHERE resident_id = $1", erased) == 1
                for pool in (p.listings_pool, p.notification_pool)
            ])

        await eventually(erased_everywhere, timeout=20)
        assert await rows(p.listings_pool, "SELECT count(*) FROM interests WHERE resident_id = $1", erased) == 0

        # No consent, no listing: refused; with it, drafted, then published.
        refused = await p.listings.post("/v1/listings", json=vacant_house(consent=False, title="同意のない空き家"),
                                        headers=p.staff())
        assert refused.status_code == 422 and refused.json()["code"] == "owner-consent-missing"
        draft = await ok(await p.listings.post("/v1/listings", json=vacant_house(consent=True, title="海辺の平屋"),
                                               headers=p.staff()), 201)
        assert draft["status"] == "draft" and draft["owner_consent"]["owner_name"] == "白浜 一郎"
        listing_id = draft["listing_id"]
        listed = await ok(await p.listings.get("/v1/public/listings", params={"municipality": SHIRAHAMA}))
        assert listing_id not in [item["listing_id"] for item in listed["items"]]  # a draft is not public
        await ok(await p.listings.post(f"/v1/listings/{listing_id}/publish", headers=p.staff()))

        listed = await ok(await p.listings.get("/v1/public/listings",
                                               params={"municipality": SHIRAHAMA, "kind": "vacant_house"}))
        titles = [item["title"] for item in listed["items"]]
        assert titles == ["海辺の平屋"]
        assert "owner_consent" not in listed["items"][0]  # the owner's record is staff's, never public

        async def told() -> bool:
            return len(await digests_of(p, interested)) >= 1

        await eventually(told, timeout=20)
        await asyncio.sleep(1.0)  # ten more sweeps: still exactly one digest
        digests = await digests_of(p, interested)
        assert len(digests) == 1
        assert "海辺の平屋" in digests[0]["body"] and "空き家" in digests[0]["body"]
        assert "和歌山県白浜町" in digests[0]["body"]
        assert await digests_of(p, unconsented) == []
        assert await digests_of(p, erased) == []
        assert await rows(p.listings_pool, "SELECT count(*) FROM matches WHERE resident_id = ANY($1::text[])",
                          [unconsented, erased]) == 0


async def test_interested_with_consent_records_the_contact_given_to_the_owner(settings: Settings) -> None:
    async with platform(settings) as p:
        sharing, keeping = new_resident(), new_resident()
        await publish(p.settings, *(registration(r, email_consent=False) for r in (sharing, keeping)))

        async def known() -> bool:
            return await rows(p.listings_pool, "SELECT count(*) FROM resident_registrations WHERE resident_id = "
                              "ANY($1::text[])", [sharing, keeping]) == 2

        await eventually(known, timeout=20)
        body = vacant_house(consent=True, title="お試し居住の家") | {"kind": "trial_stay"}
        listing = await ok(await p.listings.post("/v1/listings", json=body, headers=p.staff()), 201)
        listing_id = listing["listing_id"]
        not_open = await p.listings.put(f"/v1/residents/{sharing}/interested-listings/{listing_id}",
                                        json={"share_contact": True}, headers=p.resident(sharing))
        assert not_open.status_code == 409 and not_open.json()["code"] == "listing-not-open"
        await ok(await p.listings.post(f"/v1/listings/{listing_id}/publish", headers=p.staff()))

        for resident, share in ((sharing, True), (keeping, False)):
            await ok(await p.listings.put(f"/v1/residents/{resident}/interested-listings/{listing_id}",
                                          json={"share_contact": share}, headers=p.resident(resident)))
        seen = await ok(await p.listings.get(f"/v1/listings/{listing_id}/interests", headers=p.staff()))
        by_resident = {item["resident_id"]: item for item in seen}
        assert by_resident[sharing]["registration_id"] == f"reg-{sharing}-{SHIRAHAMA}"
        assert by_resident[keeping]["registration_id"] is None  # no consent: not even where to look

        refused = await p.listings.post(f"/v1/listings/{listing_id}/interests/{keeping}/contact-deliveries",
                                        headers=p.staff())
        assert refused.status_code == 409 and refused.json()["code"] == "no-contact-consent"
        other_town = await p.listings.post(f"/v1/listings/{listing_id}/interests/{sharing}/contact-deliveries",
                                           headers=p.staff("302066"))
        assert other_town.status_code == 403
        given = await ok(await p.listings.post(
            f"/v1/listings/{listing_id}/interests/{sharing}/contact-deliveries", headers=p.staff()), 201)
        assert given["recipient_kind"] == "municipality" and given["recipient_id"] == SHIRAHAMA
        assert given["items"] == ["name", "name_kana", "email", "phone"]

        record = await ok(await p.listings.get(f"/v1/residents/{sharing}/listing-deliveries",
                                               headers=p.resident(sharing)))
        assert [d["delivery_id"] for d in record] == [given["delivery_id"]]
        assert await ok(await p.listings.get(f"/v1/residents/{keeping}/listing-deliveries",
                                             headers=p.resident(keeping))) == []
        assert (await p.listings.get(f"/v1/residents/{sharing}/listing-deliveries",
                                     headers=p.resident(keeping))).status_code == 403

        # Erasure: interests go, the record of the contact given stays (random id only).
        await publish(p.settings, ResidentWithdrawn(resident_id=sharing, withdrawn_at=DECIDED))

        async def erased() -> bool:
            return await rows(p.listings_pool, "SELECT count(*) FROM listing_interests WHERE resident_id = $1",
                              sharing) == 0

        await eventually(erased, timeout=20)
        assert await rows(p.listings_pool, "SELECT count(*) FROM resident_registrations WHERE resident_id = $1",
                          sharing) == 0
        assert await rows(p.listings_pool, "SELECT count(*) FROM contact_deliveries WHERE resident_id = $1",
                          sharing) == 1
