"""Notification: how a run of events is cut into chunks that are applied set-based."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import cast

from services.notification.domain import (
    ConsentUpdate,
    ContactUpdate,
    Effect,
    conflict_free_runs,
    effect_of,
)
from services.notification.handlers import _open_contacts
from shared.contracts.base import EventData
from shared.contracts.donation import DonationReceived
from shared.contracts.registration import ConsentChanged, Contact, ContactChanged, ResidentRegistered
from shared.contracts.sealed import Sealed, resident_subject
from shared.kit.keyring import Keyring
from tests.support import opened_for_tests, seal_for_tests
from tests.unit.test_notification_rendering import DECIDED, WAKAYAMA, contact_of, registration, sample_events

HOKKAIDO, TANABE = "010006", "302066"


def effect(event: EventData) -> Effect | None:
    """The event's effect, a registration's contact opened as the handler opens it."""
    return effect_of(event, contact_of(event) if isinstance(event, ResidentRegistered) else None)


def chunked(events: list[EventData]) -> list[list[int]]:
    """The chunks, as positions in ``events`` of the events that do something here."""
    planned = [(index, change) for index, event in enumerate(events) if (change := effect(event)) is not None]
    return [[index for index, _ in chunk] for chunk in conflict_free_runs(planned, effect=lambda item: item[1])]


def test_a_registration_tells_after_saving_its_contact_and_consent() -> None:
    told = effect(registration("r-1", name="Emma", email="e@example.jp", language="en"))
    assert told is not None and told.notice is not None
    assert told.resident_id == told.notice.resident_id == "r-1"
    assert told.contact == ContactUpdate("Emma", "e@example.jp", "en")
    assert told.consent == ConsentUpdate(True, DECIDED - timedelta(days=1))
    # With a prefecture itself: the contact is kept, and the confirmation is in words of its own.
    prefecture = effect(registration("r-1", municipality=WAKAYAMA, prefecture=WAKAYAMA))
    assert prefecture is not None and prefecture.contact is not None
    assert prefecture.notice is not None and prefecture.notice.kind == "prefecture_registration_confirmed"


def test_a_registration_whose_contact_does_not_open_does_nothing() -> None:
    """Its person was erased (the key is gone): no contact, no consent, no message."""
    assert effect_of(registration("r-1"), None) is None
    assert effect_of(registration("r-1", status="pending_review", tier="premium"), None) is None


def test_what_does_nothing_here_has_no_effect() -> None:
    contact = seal_for_tests(resident_subject("r-1"), Contact(name="n", name_kana="n", email="e@example.jp"))
    assert effect_of(ConsentChanged(resident_id="r-1", purpose="newsletter", granted=True, at=DECIDED)) is None
    assert effect_of(ContactChanged(resident_id="r-1", contact=contact, at=DECIDED)) is None  # handled alone
    receipt = sample_events("r-1")["receipt_issued"]
    assert isinstance(receipt, DonationReceived) and receipt.receipt_number is not None
    assert effect_of(receipt.model_copy(update={"resident_id": None})) is None
    assert effect_of(ConsentChanged(resident_id="r-1", purpose="email", granted=False, at=DECIDED)) == Effect(
        "r-1", consent=ConsentUpdate(False, DECIDED)
    )


def test_registrations_a_second_one_each_and_later_decisions_go_in_one_chunk() -> None:
    events: list[EventData] = []
    for resident in ("a", "b", "c"):
        # A second registration (with 北海道 itself) repeats the contact and consents: the same update.
        events += [registration(resident, derived_prefecture=f"reg-{resident}-pref"),
                   registration(resident, municipality=HOKKAIDO, prefecture=HOKKAIDO)]
    events += [sample_events(r)[kind] for r in ("a", "b", "a") for kind in ("certificate_issued", "grant_issued")]
    assert chunked(events) == [list(range(len(events)))]


def test_a_change_after_a_message_to_the_same_resident_starts_a_new_chunk() -> None:
    decision = sample_events("a")["application_received"]
    revoke = ConsentChanged(resident_id="a", purpose="email", granted=False, at=DECIDED)
    events: list[EventData] = [
        decision, registration("b"),  # the message to a read a's contact before the registration
        registration("a"),
        sample_events("a")["certificate_issued"],
        revoke,  # after a message to a: the message must not see it
        sample_events("b")["grant_issued"],
        ConsentChanged(resident_id="a", purpose="email", granted=True, at=DECIDED + timedelta(hours=1)),
        ConsentChanged(resident_id="b", purpose="newsletter", granted=True, at=DECIDED),  # nothing here
    ]
    assert chunked(events) == [[0, 1], [2, 3], [4, 5], [6]]


def test_a_second_different_update_of_one_resident_starts_a_new_chunk() -> None:
    events: list[EventData] = [
        registration("a", email="old@example.jp", status="pending_review"),  # no message
        registration("a", email="new@example.jp", status="pending_review"),
        registration("b", status="pending_review"),
        ConsentChanged(resident_id="b", purpose="email", granted=False, at=DECIDED),
        ConsentChanged(resident_id="b", purpose="email", granted=False, at=DECIDED),  # the same again
    ]
    assert chunked(events) == [[0], [1, 2], [3, 4]]
    assert chunked([]) == []


class CountingKeyring:
    """Opens what ``seal_for_tests`` sealed, and remembers how many values each call asked for."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    async def open_many(self, sealed: Sequence[Sealed | None]) -> list[bytes | None]:
        self.asked.append(len(sealed))
        return [None if value is None else opened_for_tests(value) for value in sealed]


async def test_a_contact_carried_by_two_registrations_is_opened_once() -> None:
    municipal = registration("r-1", name="Emma", email="e@example.jp", language="en")
    second = municipal.model_copy(update={"municipality_code": TANABE})  # the same sealed contact
    other = registration("r-2", name="Bo")
    keyring = CountingKeyring()
    events: list[EventData] = [municipal, sample_events("r-1")["receipt_issued"], second, other]
    contacts = await _open_contacts(cast(Keyring, keyring), events)
    assert keyring.asked == [2]  # Emma's contact once, Bo's once
    assert contacts == [contact_of(municipal), None, contact_of(municipal), contact_of(other)]
