"""The municipality's certificate list filtered by the end of validity (issue 18: the console's
"certificates expiring in 30 days" asks the service for them instead of reading every certificate),
and the review queue's keyset page."""

from __future__ import annotations

from datetime import timedelta

from tests.integration.test_certification import (
    SHIRAHAMA,
    TANABE,
    Harness,
    apply,
    assert_problem,
    certified,
    h,  # noqa: F401  (the service under test, a module fixture)
    new_id,
    register,
)


async def test_valid_until_before_lists_the_expiring_certificates_soonest_first(h: Harness) -> None:  # noqa: F811
    today = h.clock.today
    numbers = {}
    for days in (10, 40, 5, 30):
        resident = new_id()
        await register(h, resident)
        certificate = await certified(h, resident, dates={"valid_until": (today + timedelta(days=days)).isoformat()})
        numbers[days] = certificate["certificate_number"]
    path = f"/v1/municipalities/{SHIRAHAMA}/certificates"
    horizon = (today + timedelta(days=31)).isoformat()  # expiring within 30 days, the 30th included

    page = (await h.client.get(path, params={"status": "valid", "valid_until_before": horizon, "limit": 200},
                               headers=h.staff())).json()
    mine = [c["certificate_number"] for c in page["items"] if c["certificate_number"] in numbers.values()]
    assert mine == [numbers[5], numbers[10], numbers[30]]  # soonest first; the 40-day one is not expiring
    assert all(c["valid_until"] < horizon for c in page["items"])
    assert [c["valid_until"] for c in page["items"]] == sorted(c["valid_until"] for c in page["items"])
    assert page["total"] == len(page["items"])  # the count has the same filter

    one = (await h.client.get(path, params={"valid_until_before": horizon, "limit": 1}, headers=h.staff())).json()
    assert one["total"] == page["total"] and len(one["items"]) == 1
    everything = (await h.client.get(path, params={"limit": 200}, headers=h.staff())).json()
    assert numbers[40] in [c["certificate_number"] for c in everything["items"]]

    # Authorised as the list is; a date that is not one is refused.
    assert_problem(await h.client.get(path, params={"valid_until_before": horizon}, headers=h.staff(TANABE)),
                   403, "forbidden")
    assert_problem(await h.client.get(path, params={"valid_until_before": "soon"}, headers=h.staff()),
                   422, "invalid-request")


async def test_the_review_queue_pages_by_keyset_with_filters(h: Harness) -> None:  # noqa: F811
    ids = []
    for basis in ("owned", "hotel", "owned", "owned"):
        resident = new_id()
        await register(h, resident, TANABE)
        ids.append((await apply(h, resident, municipality_code=TANABE, housing_basis=basis,
                                address_there="和歌山県田辺市1-1"))["application_id"])
    staff = h.staff(TANABE)
    owned = [ids[0], ids[2], ids[3]]
    query: dict[str, str | int] = {"housing_basis": "owned", "limit": 200}
    listed = [a["application_id"] for a in
              (await h.client.get("/v1/applications", params=query, headers=staff)).json()["items"]]
    assert [i for i in listed if i in ids] == owned
    after_first = (await h.client.get("/v1/applications", params={**query, "after": ids[0]}, headers=staff)).json()
    assert [a["application_id"] for a in after_first["items"] if a["application_id"] in ids] == owned[1:]
    assert all(a["housing_basis"] == "owned" for a in after_first["items"])


async def test_an_applications_audit_trail_is_read_by_its_application(h: Harness) -> None:  # noqa: F811
    resident, other = new_id(), new_id()
    for person in (resident, other):
        await register(h, person)
    certificate = await certified(h, resident)
    await certified(h, other)  # another decision of the same municipality, after it
    application_id, number = certificate["application_id"], certificate["certificate_number"]
    revoked = await h.client.post(f"/v1/certificates/{number}/revoke", json={"reason_code": "holder_request"},
                                  headers=h.staff())
    assert revoked.status_code == 200, revoked.text

    path = f"/v1/municipalities/{SHIRAHAMA}/audit"
    trail = (await h.client.get(path, params={"application": application_id}, headers=h.staff())).json()
    assert [(e["action"], e["target_id"]) for e in trail["items"]] == [
        ("certificate.revoked", number), ("application.approved", application_id)]  # newest first
    assert trail["total"] == 2
    everything = (await h.client.get(path, params={"limit": 200}, headers=h.staff())).json()
    assert everything["total"] > 2
    assert_problem(await h.client.get(path, params={"application": application_id}, headers=h.staff(TANABE)),
                   403, "forbidden")
