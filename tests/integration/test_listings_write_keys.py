"""Listings' writes under an Idempotency-Key: a repeat answers the first response, only to the caller
who sent it; another caller reusing the key gets its own answer; a changed request under the same
key is a 422 (``tests.support.assert_key_scoped``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from shared.kit.settings import Settings
from tests.integration.test_listings import Platform, ok, platform, rows, vacant_house
from tests.integration.test_notification import publish
from tests.support import assert_key_scoped, bearer, eventually
from tests.unit.test_notification_rendering import SHIRAHAMA, registration

COVERED = {
    "POST /v1/listings",
    "POST /v1/listings/{listing_id}/publish",
    "POST /v1/listings/{listing_id}/withdraw",
    "POST /v1/listings/{listing_id}/interests/{resident_id}/contact-deliveries",
    "PUT /v1/residents/{resident_id}/listing-interests",
    "DELETE /v1/residents/{resident_id}/listing-interests",
    "PUT /v1/residents/{resident_id}/interested-listings/{listing_id}",
    "DELETE /v1/residents/{resident_id}/interested-listings/{listing_id}",
}
OTHER = "302066"  # 和歌山県田辺市: the other caller's municipality


@pytest.fixture(scope="module")
async def p(settings: Settings) -> AsyncIterator[Platform]:
    async with platform(settings) as running:
        yield running


async def published(p: Platform, title: str) -> str:
    draft = await ok(await p.listings.post("/v1/listings", json=vacant_house(consent=True, title=title),
                                           headers=p.staff()), 201)
    await ok(await p.listings.post(f"/v1/listings/{draft['listing_id']}/publish", headers=p.staff()))
    return str(draft["listing_id"])


async def test_listing_keys_belong_to_the_municipalitys_staff(p: Platform) -> None:
    body = vacant_house(consent=True, title="鍵の家")
    first = await assert_key_scoped(
        p.listings, "POST", "/v1/listings", owner=p.staff(), other=p.staff(OTHER), body=body,
        changed_body={**body, "title": "別の家"},
    )
    listing_id = first.json()["listing_id"]
    another = (await ok(await p.listings.post("/v1/listings", json=body, headers=p.staff()), 201))["listing_id"]
    await assert_key_scoped(
        p.listings, "POST", f"/v1/listings/{listing_id}/publish", owner=p.staff(), other=p.staff(OTHER),
        changed_path=f"/v1/listings/{another}/publish",
    )
    await assert_key_scoped(
        p.listings, "POST", f"/v1/listings/{listing_id}/withdraw", owner=p.staff(), other=p.staff(OTHER),
        body={"reason_code": "filled"}, changed_body={"reason_code": "other"},
    )


async def test_interest_keys_belong_to_the_resident(p: Platform) -> None:
    resident, other, third = "r-keys-1", "r-keys-2", "r-keys-3"
    wanted = {"kinds": ["vacant_house"], "cadence": "weekly"}
    await assert_key_scoped(
        p.listings, "PUT", f"/v1/residents/{resident}/listing-interests", owner=p.resident(resident),
        other=p.resident(other), body=wanted, changed_body={**wanted, "cadence": "immediate"},
    )
    # The changed request is another resident's: only an admin may send both.
    for someone in (resident, third):
        await ok(await p.listings.put(f"/v1/residents/{someone}/listing-interests", json=wanted,
                                      headers=p.resident(someone)))
    await assert_key_scoped(
        p.listings, "DELETE", f"/v1/residents/{resident}/listing-interests", owner=bearer(p.settings, "admin"),
        other=p.resident(other), changed_path=f"/v1/residents/{third}/listing-interests",
    )
    listing_id, another = await published(p, "関心の家"), await published(p, "関心の家 2")
    await assert_key_scoped(
        p.listings, "PUT", f"/v1/residents/{resident}/interested-listings/{listing_id}", owner=p.resident(resident),
        other=p.resident(other), body={"share_contact": False}, changed_body={"share_contact": True},
    )
    await ok(await p.listings.put(f"/v1/residents/{resident}/interested-listings/{another}",
                                  json={"share_contact": False}, headers=p.resident(resident)))
    await assert_key_scoped(
        p.listings, "DELETE", f"/v1/residents/{resident}/interested-listings/{listing_id}",
        owner=p.resident(resident), other=p.resident(other),
        changed_path=f"/v1/residents/{resident}/interested-listings/{another}",
    )


async def test_contact_delivery_keys_belong_to_the_listings_staff(p: Platform) -> None:
    sharing, also = "r-keys-share-1", "r-keys-share-2"
    await publish(p.settings, registration(sharing, email_consent=False), registration(also, email_consent=False))

    async def known() -> bool:
        return await rows(p.listings_pool, "SELECT count(*) FROM resident_registrations WHERE resident_id = "
                          "ANY($1::text[]) AND municipality_code = $2", [sharing, also], SHIRAHAMA) == 2

    await eventually(known, timeout=20)
    listing_id = await published(p, "連絡先の家")
    for resident in (sharing, also):
        await ok(await p.listings.put(f"/v1/residents/{resident}/interested-listings/{listing_id}",
                                      json={"share_contact": True}, headers=p.resident(resident)))
    await assert_key_scoped(
        p.listings, "POST", f"/v1/listings/{listing_id}/interests/{sharing}/contact-deliveries", owner=p.staff(),
        other=p.staff(OTHER), changed_path=f"/v1/listings/{listing_id}/interests/{also}/contact-deliveries",
    )
