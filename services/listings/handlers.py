"""Use cases: load, decide (domain), save (store), emit (outbox) — one transaction each.

HTTP writes go through the kit's use-case runner; ``authorise`` loads the target and checks who may
act on it (staff of the listing's municipality, or an admin; a resident on their own interests).
Consumer-side use cases run in the consumer's transaction (``conn``): the projection of where
residents belong, the designated corporations, and erasure. The sweep (``scheduler.py``) expires
listings and sends digests, each row claimed with ``FOR UPDATE SKIP LOCKED``: exactly once across
replicas.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import structlog

from services.listings import domain, store
from services.listings.domain import (
    Interests,
    Listing,
    OtherResidentsListings,
    OwnerConsent,
    UnknownListing,
)
from services.listings.views import (
    ContactDeliveryView,
    InterestsView,
    InterestView,
    ListingView,
    Page,
    PublicListingView,
    StaffInterestView,
    json_body,
)
from shared.contracts.common import Language
from shared.contracts.listings import (
    DigestCadence,
    ListingDigestDue,
    ListingExpired,
    ListingKind,
    ListingPublished,
    ListingWithdrawalReason,
    ListingWithdrawn,
    Publisher,
)
from shared.contracts.topics import LISTING_DIGESTS, LISTINGS
from shared.kit.auth import Principal, Role
from shared.kit.clock import Clock
from shared.kit.db import Connection
from shared.kit.erasure import forget_responses_about, record_erased
from shared.kit.ids import new_id
from shared.kit.service import ServiceRuntime, UnitOfWork
from shared.kit.use_case import Outcome, Write

log = structlog.get_logger(__name__)


def ensure_own(principal: Principal, resident_id: str) -> None:
    """A resident's interests and records are theirs (and an admin's, who acts for them)."""
    if principal.role is Role.ADMIN:
        return
    if principal.role is not Role.RESIDENT or principal.subject != resident_id:
        raise OtherResidentsListings(f"{principal.role.value} {principal.subject} may not act for {resident_id}")


@dataclass(frozen=True, slots=True)
class NewListing:
    kind: ListingKind
    municipality_code: str
    publisher: Publisher
    corporation_id: str | None
    area: str
    title: str
    summary: str
    language: Language
    available_from: date
    available_until: date | None
    expires_on: date
    owner_consent: OwnerConsent | None


@dataclass(frozen=True, slots=True)
class SweepResult:
    expired: int = 0
    digests: int = 0
    dropped_matches: int = 0
    pruned_deliveries: int = 0


class ListingsService:
    def __init__(self, runtime: ServiceRuntime, *, sweep_batch: int = 5000) -> None:
        self.runtime = runtime
        self.sweep_batch = sweep_batch

    @property
    def clock(self) -> Clock:
        return self.runtime.clock

    # authorise steps

    @staticmethod
    def _listing_of_staff(principal: Principal, listing_id: str) -> Callable[[UnitOfWork], Awaitable[Listing]]:
        async def authorise(work: UnitOfWork) -> Listing:
            listing = await store.get_listing(work.conn, listing_id, lock=True)
            if listing is None:
                raise UnknownListing(f"no listing {listing_id}")
            principal.ensure_municipality(listing.municipality_code)
            return listing

        return authorise

    @staticmethod
    def _own(principal: Principal, resident_id: str) -> Callable[[UnitOfWork], Awaitable[None]]:
        async def authorise(work: UnitOfWork) -> None:
            ensure_own(principal, resident_id)

        return authorise

    # --- listings (staff) ----------------------------------------------------------------------------

    async def draft(self, write: Write, new: NewListing) -> Outcome:
        principal = write.principal

        async def authorise(work: UnitOfWork) -> None:
            principal.ensure_municipality(new.municipality_code)

        async def act(work: UnitOfWork, _: None) -> Outcome:
            designated = await store.designated_corporations(work.conn, new.municipality_code)
            listing = domain.draft(
                new_id("lst", 16), kind=new.kind, municipality_code=new.municipality_code, publisher=new.publisher,
                corporation_id=new.corporation_id, designated_corporations=designated, area=new.area,
                title=new.title, summary=new.summary, language=new.language, available_from=new.available_from,
                available_until=new.available_until, expires_on=new.expires_on, owner_consent=new.owner_consent,
                created_by=principal.subject, now=self.clock.now(),
            )
            await store.save_listing(work.conn, listing)
            return Outcome(201, json_body(ListingView.of(listing)))

        return await write.run(act, authorise=authorise)

    async def publish(self, write: Write, listing_id: str) -> Outcome:
        async def act(work: UnitOfWork, listing: Listing) -> Outcome:
            now = self.clock.now()
            published = domain.publish(listing, now)
            await store.save_listing(work.conn, published)
            await work.emit(LISTINGS, ListingPublished(
                listing_id=published.listing_id, content=published.content, published_at=now,
            ), subject=published.listing_id)
            matched = await self._match(work.conn, published, now)
            log.info("listing published", listing_id=listing_id, kind=published.content.kind, matched=matched)
            return Outcome(200, json_body(ListingView.of(published)))

        return await write.run(act, authorise=self._listing_of_staff(write.principal, listing_id))

    async def _match(self, conn: Connection, listing: Listing, now: datetime) -> int:
        """The residents this new listing goes to: their digest (at once or weekly) will carry it."""
        residents = [
            wanted.resident_id for wanted, places in await store.candidates(conn, listing.content)
            if domain.matches(listing.content, wanted, places)
        ]
        await store.add_matches(conn, listing.listing_id, residents, now)
        return len(residents)

    async def withdraw(self, write: Write, listing_id: str, reason: ListingWithdrawalReason) -> Outcome:
        async def act(work: UnitOfWork, listing: Listing) -> Outcome:
            now = self.clock.now()
            was_published = listing.status == "published"
            withdrawn = domain.withdraw(listing, reason, now)
            await store.save_listing(work.conn, withdrawn)
            if was_published:  # a draft was never announced
                await work.emit(LISTINGS, ListingWithdrawn(
                    listing_id=listing_id, municipality_code=listing.municipality_code, reason=reason, withdrawn_at=now,
                ), subject=listing_id)
            return Outcome(200, json_body(ListingView.of(withdrawn)))

        return await write.run(act, authorise=self._listing_of_staff(write.principal, listing_id))

    async def listing(self, principal: Principal, listing_id: str) -> ListingView:
        async with self.runtime.pool.acquire() as conn:
            listing = await store.get_listing(conn, listing_id)
        if listing is None:
            raise UnknownListing(f"no listing {listing_id}")
        principal.ensure_municipality(listing.municipality_code)
        return ListingView.of(listing)

    async def listings(self, principal: Principal, f: store.ListingFilter, limit: int,
                       offset: int) -> Page[ListingView]:
        code = f.municipality_code or principal.municipality
        if principal.role is not Role.ADMIN or code is not None:
            principal.ensure_municipality(code or "")
        async with self.runtime.pool.acquire() as conn:
            found, total = await store.listings(
                conn, store.ListingFilter(kind=f.kind, municipality_code=code, statuses=f.statuses), limit, offset,
            )
        return Page(items=[ListingView.of(item) for item in found], total=total, limit=limit, offset=offset)

    # --- public --------------------------------------------------------------------------------------

    async def public_listings(self, f: store.ListingFilter, limit: int, offset: int) -> Page[PublicListingView]:
        public = store.ListingFilter(
            kind=f.kind, municipality_code=f.municipality_code, prefecture_code=f.prefecture_code,
            available_from=f.available_from, available_until=f.available_until, language=f.language,
            statuses=("published",), open_on=self.clock.today(),
        )
        async with self.runtime.pool.acquire() as conn:
            found, total = await store.listings(conn, public, limit, offset)
        return Page(items=[PublicListingView.of(item) for item in found], total=total, limit=limit, offset=offset)

    async def public_listing(self, listing_id: str) -> PublicListingView:
        async with self.runtime.pool.acquire() as conn:
            listing = await store.get_listing(conn, listing_id)
        if listing is None or not listing.is_open(self.clock.today()):
            raise UnknownListing(f"no published listing {listing_id}")
        return PublicListingView.of(listing)

    # --- interests (residents) -----------------------------------------------------------------------

    async def set_interests(
        self, write: Write, resident_id: str, *, kinds: frozenset[ListingKind], municipality_codes: frozenset[str],
        prefecture_codes: frozenset[str], available_from: date | None, available_until: date | None,
        cadence: DigestCadence,
    ) -> Outcome:
        async def act(work: UnitOfWork, _: None) -> Outcome:
            wanted = domain.interests(
                resident_id, kinds=kinds, municipality_codes=municipality_codes, prefecture_codes=prefecture_codes,
                available_from=available_from, available_until=available_until, cadence=cadence,
                now=self.clock.now(),
            )
            await store.save_interests(work.conn, wanted)
            log.info("listing interests consented", resident_id=resident_id, cadence=cadence, kinds=len(kinds))
            return Outcome(200, json_body(InterestsView.of(wanted)))

        return await write.run(act, authorise=self._own(write.principal, resident_id))

    async def revoke_interests(self, write: Write, resident_id: str) -> Outcome:
        async def act(work: UnitOfWork, _: None) -> Outcome:
            removed = await store.delete_interests(work.conn, resident_id)
            log.info("listing interests revoked", resident_id=resident_id, existed=removed)
            return Outcome(204)

        return await write.run(act, authorise=self._own(write.principal, resident_id))

    async def interests(self, principal: Principal, resident_id: str) -> InterestsView | None:
        ensure_own(principal, resident_id)
        async with self.runtime.pool.acquire() as conn:
            wanted: Interests | None = await store.get_interests(conn, resident_id)
        return None if wanted is None else InterestsView.of(wanted)

    # --- "interested", and the contact given to the owner ----------------------------------------------

    async def express_interest(self, write: Write, resident_id: str, listing_id: str, share_contact: bool) -> Outcome:
        principal = write.principal

        async def authorise(work: UnitOfWork) -> Listing:
            ensure_own(principal, resident_id)
            listing = await store.get_listing(work.conn, listing_id)
            if listing is None:
                raise UnknownListing(f"no listing {listing_id}")
            return listing

        async def act(work: UnitOfWork, listing: Listing) -> Outcome:
            interest = domain.express_interest(listing, resident_id, share_contact, self.clock.now())
            await store.save_interest(work.conn, interest)
            return Outcome(200, json_body(InterestView.of(interest)))

        return await write.run(act, authorise=authorise)

    async def withdraw_interest(self, write: Write, resident_id: str, listing_id: str) -> Outcome:
        async def act(work: UnitOfWork, _: None) -> Outcome:
            await store.delete_interest(work.conn, resident_id, listing_id)
            return Outcome(204)

        return await write.run(act, authorise=self._own(write.principal, resident_id))

    async def resident_interests(self, principal: Principal, resident_id: str) -> list[InterestView]:
        ensure_own(principal, resident_id)
        async with self.runtime.pool.acquire() as conn:
            return [InterestView.of(i) for i in await store.interests_of_resident(conn, resident_id)]

    async def listing_interests(self, principal: Principal, listing_id: str) -> list[StaffInterestView]:
        """Who said "interested": resident ids; the registration where staff read a contact only for
        those who consented to give it."""
        async with self.runtime.pool.acquire() as conn:
            listing = await store.get_listing(conn, listing_id)
            if listing is None:
                raise UnknownListing(f"no listing {listing_id}")
            principal.ensure_municipality(listing.municipality_code)
            views = []
            for interest in await store.interests_in_listing(conn, listing_id):
                registration = (await store.registration_with(conn, interest.resident_id, listing.municipality_code)
                                if interest.share_contact else None)
                views.append(StaffInterestView(**InterestView.of(interest).model_dump(), registration_id=registration))
        return views

    async def deliver_contact(self, write: Write, listing_id: str, resident_id: str) -> Outcome:
        """The owner gets the resident's contact: recorded here first (the provision record), then read
        by the municipality's staff in registration (the registration id answered)."""

        async def act(work: UnitOfWork, listing: Listing) -> Outcome:
            interest = await store.get_interest(work.conn, resident_id, listing_id, lock=True)
            registration = await store.registration_with(work.conn, resident_id, listing.municipality_code)
            delivery = domain.deliver_contact(
                new_id("dlv", 16), listing, interest, registration, write.principal.subject, self.clock.now(),
            )
            await store.add_delivery(work.conn, delivery)
            log.info("contact given to a listing's owner", listing_id=listing_id, resident_id=resident_id,
                     recipient_kind=delivery.recipient_kind)
            return Outcome(201, json_body(ContactDeliveryView.of(delivery)))

        return await write.run(act, authorise=self._listing_of_staff(write.principal, listing_id))

    async def deliveries(self, principal: Principal, resident_id: str) -> list[ContactDeliveryView]:
        ensure_own(principal, resident_id)
        async with self.runtime.pool.acquire() as conn:
            return [ContactDeliveryView.of(d) for d in await store.deliveries_of(conn, resident_id)]

    # --- the sweep: expiry, digests, old delivery records ---------------------------------------------

    async def sweep(self) -> SweepResult:
        now, today = self.clock.now(), self.clock.today()
        async with self.runtime.transaction() as work:
            due = await store.claim_due_to_expire(work.conn, today, self.sweep_batch)
            for listing in due:
                expired = domain.expire(listing, today)
                await store.save_listing(work.conn, expired)
                assert expired.expired_on is not None
                await work.emit(LISTINGS, ListingExpired(
                    listing_id=listing.listing_id, municipality_code=listing.municipality_code,
                    expired_on=expired.expired_on,
                ), subject=listing.listing_id)
        async with self.runtime.transaction() as work:
            dropped = await store.drop_closed_matches(work.conn, today)
            digests = await self._send_digests(work, now, today)
        async with self.runtime.pool.acquire() as conn:
            pruned = await store.prune_deliveries(
                conn, now - timedelta(days=365 * domain.DELIVERY_RECORD_YEARS + 1)
            )
        if due or digests or pruned:
            log.info("listings sweep", expired=len(due), digests=digests, dropped_matches=dropped, pruned=pruned)
        return SweepResult(len(due), digests, dropped, pruned)

    async def _send_digests(self, work: UnitOfWork, now: datetime, today: date) -> int:
        pending = await store.claim_pending_matches(work.conn, now, today, self.sweep_batch)
        by_resident: dict[str, list[Listing]] = {}
        for match in pending:
            by_resident.setdefault(match.resident_id, []).append(match.listing)
        wanted = await store.interests_of(work.conn, list(by_resident))
        for resident_id, found in by_resident.items():
            interests = wanted[resident_id]
            digest_id = new_id("dig", 16)
            await work.emit(LISTING_DIGESTS, ListingDigestDue(
                digest_id=digest_id, resident_id=resident_id, cadence=interests.cadence,
                listings=[listing.entry() for listing in found], due_at=now,
            ), subject=resident_id, key=resident_id)
            await store.mark_digested(work.conn, resident_id, [listing.listing_id for listing in found], digest_id, now)
            following = domain.after_digest(interests, now)
            if following.next_digest_at != interests.next_digest_at:
                await store.set_next_digest(work.conn, resident_id, following.next_digest_at)
        return len(by_resident)


# --- consumer side (the consumer's transaction) ----------------------------------------------------


async def record_registrations(conn: Connection, rows: Sequence[tuple[str, str, str, str]]) -> None:
    if rows:
        await store.save_registrations(conn, rows)


async def erase_resident(conn: Connection, resident_id: str, at: datetime) -> None:
    """Erase what this service holds about the person, and remember it (same transaction) so that no
    later event about them writes anything again. The record of contacts given stays (random id only)."""
    await record_erased(conn, resident_id, at)
    counts = await store.erase_resident(conn, resident_id)
    forgotten = await forget_responses_about(conn, resident_id)
    log.info("resident erased", resident_id=resident_id, stored_responses=forgotten, **counts)
