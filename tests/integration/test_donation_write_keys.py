"""Donation's writes under an Idempotency-Key: a repeat answers the first response, only to the
caller who sent it; another caller reusing the key gets its own answer (never, say, a donor's name
and address from a re-issued receipt); a changed request under the same key is a 422
(``tests.support.assert_key_scoped``)."""

from __future__ import annotations

import uuid
from typing import Any

from tests.integration.test_donation import (
    SHIRAHAMA,
    SUSAMI,
    TANABE,
    Service,
    donation,
    person,
    service,
)
from tests.support import assert_key_scoped, bearer

__all__ = ["service"]  # the module-scoped service fixture of test_donation, shared

COVERED = {
    "POST /v1/donations",
    "POST /v1/donations/{donation_id}/refund",
    "POST /v1/donations/{donation_id}/one-stop",
    "POST /v1/donations/{donation_id}/one-stop/verify",
    "POST /v1/donors",
    "DELETE /v1/donors/{donor_id}",
    "POST /v1/receipts/{number}/reissue",
}


def another_admin(service: Service) -> dict[str, str]:
    return bearer(service.settings, "admin", subject=f"admin-{uuid.uuid4().hex[:6]}")


async def test_a_confirmation_key_is_the_integrations_own(service: Service) -> None:
    body = donation(SUSAMI, 12_000, payment_date="2025-04-01")
    first = await assert_key_scoped(
        service.client, "POST", "/v1/donations", owner=another_admin(service), other=another_admin(service),
        body=body, changed_body={**body, "amount": 12_001},
    )
    # The other integration's own answer was the payment reference's: the same donation, as a 200.
    assert first.status_code == 201
    assert await service.pool.fetchval(
        "SELECT count(*) FROM donations WHERE payment_reference = $1", body["payment_reference"]
    ) == 1


async def test_a_refund_key_is_the_refunding_admins_own(service: Service) -> None:
    made = await service.confirm(donation(TANABE, 40_000, payment_date="2025-04-02"))
    other = another_admin(service)
    first = await assert_key_scoped(
        service.client, "POST", f"/v1/donations/{made['id']}/refund", owner=another_admin(service), other=other,
        body={"reason": "card payment reversed"}, changed_body={"reason": "another reason"},
    )
    assert first.json()["status"] == "refunded"
    # The other admin's request ran for itself: the donation was refunded already.
    theirs = await service.client.post(
        f"/v1/donations/{made['id']}/refund", json={"reason": "card payment reversed"}, headers=other
    )
    assert theirs.status_code == 409 and theirs.json()["code"] == "already-refunded"


async def test_one_stop_keys_belong_to_the_municipalitys_staff(service: Service) -> None:
    donor = person("鍵 一子")
    made = await service.confirm(donation(SHIRAHAMA, 10_000, payment_date="2025-05-01", donor=donor))
    first = await assert_key_scoped(
        service.client, "POST", f"/v1/donations/{made['id']}/one-stop", owner=service.staff(SHIRAHAMA),
        other=service.staff(TANABE), body={"received_on": "2025-06-01"}, changed_body={"received_on": "2025-06-02"},
    )
    assert first.status_code == 201 and first.json()["status"] == "valid"

    another = await service.confirm(donation(SHIRAHAMA, 10_000, payment_date="2025-05-02", donor=donor))
    verified = await assert_key_scoped(
        service.client, "POST", f"/v1/donations/{made['id']}/one-stop/verify", owner=service.staff(SHIRAHAMA),
        other=service.staff(TANABE), changed_path=f"/v1/donations/{another['id']}/one-stop/verify",
    )
    assert verified.json()["verified"] is True


async def test_a_donor_registration_key_is_the_admins_own(service: Service) -> None:
    body = person("登録 二郎")
    first = await assert_key_scoped(
        service.client, "POST", "/v1/donors", owner=another_admin(service), other=another_admin(service),
        body=body, changed_body=person("登録 三郎"),
    )
    assert first.status_code == 201 and first.json()["name"] == "登録 二郎"


async def test_a_reissue_key_never_hands_the_receipt_to_someone_else(service: Service) -> None:
    resident_id = f"res-{uuid.uuid4().hex[:8]}"
    donor: dict[str, Any] = person("受領 花子", resident_id=resident_id, address="和歌山県白浜町2番地")
    made = await service.confirm(donation(SHIRAHAMA, 20_000, payment_date="2025-07-01", donor=donor))
    more = await service.confirm(donation(SHIRAHAMA, 30_000, payment_date="2025-07-02", donor=donor))
    key_thief = service.resident(f"res-{uuid.uuid4().hex[:8]}")
    first = await assert_key_scoped(
        service.client, "POST", f"/v1/receipts/{made['receipt_number']}/reissue",
        owner=service.resident(resident_id), other=key_thief,
        changed_path=f"/v1/receipts/{more['receipt_number']}/reissue",
    )
    assert first.json()["donor_name"] == "受領 花子" and first.json()["reissue_count"] == 1
    # The donor's own key, guessed by another resident or another town's staff: a 403, never the
    # donor's name and address; the donor's repeat is still their own replay.
    key = {"Idempotency-Key": "reissue-1"}
    mine = await service.client.post(
        f"/v1/receipts/{made['receipt_number']}/reissue", headers={**service.resident(resident_id), **key}
    )
    assert mine.status_code == 200 and mine.json()["reissue_count"] == 2
    for outsider in (key_thief, service.staff(TANABE)):
        response = await service.client.post(
            f"/v1/receipts/{made['receipt_number']}/reissue", headers={**outsider, **key}
        )
        assert response.status_code == 403 and "受領" not in response.text, response.text
    again = await service.client.post(
        f"/v1/receipts/{made['receipt_number']}/reissue", headers={**service.resident(resident_id), **key}
    )
    assert again.headers.get("Idempotent-Replayed") == "true" and again.json() == mine.json()
    assert await service.pool.fetchval(
        "SELECT reissue_count FROM receipts WHERE number = $1", made["receipt_number"]
    ) == 2


async def test_an_erasure_key_is_the_managers_own(service: Service) -> None:
    # DELETE /donors/{id}: another town's manager reusing the key gets its own 403, never the answer.
    made = await service.confirm(donation(SHIRAHAMA, 10_000, payment_date="2025-10-01", donor=person("消去 鍵子")))
    other = await service.confirm(donation(SHIRAHAMA, 10_000, payment_date="2025-10-01", donor=person("消去 鍵代")))
    first = await assert_key_scoped(
        service.client, "DELETE", f"/v1/donors/{made['donor_id']}", owner=service.staff(SHIRAHAMA),
        other=service.staff(TANABE), changed_path=f"/v1/donors/{other['donor_id']}",
    )
    assert first.json()["donor_id"] == made["donor_id"] and first.json()["erased_at"] is not None
    assert await service.pool.fetchval(
        "SELECT erased_at IS NULL FROM donors WHERE id = $1", uuid.UUID(other["donor_id"])
    )
