"""Use cases of the partner gateway, one unit of work each: load, decide (domain), save, emit.

Consumed events change the projection (consents, certificates, entitlements) and, in the same
transaction, put the partner records in the outbox and write the delivery record. The Redis
verification cache is never written here: each entitlement change queues its key, and the cache
sync (``cache.py``) writes Redis after the commit.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from pydantic_core import to_jsonable_python

from services.partner_gateway import store
from services.partner_gateway.domain import (
    ApiKeyNotFound,
    Certificate,
    ConsentBasis,
    Entitlement,
    FeedTransport,
    GrantEvent,
    Partner,
    PartnerExists,
    PartnerKind,
    PartnerNotFound,
    ShareConsent,
    WithdrawalReason,
    accept_trip,
    api_key_hash,
    api_key_prefix,
    certificate_record,
    check_member_number_format,
    delivered_items,
    entitlement,
    feed_key,
    grant_record,
    new_api_key,
    new_pseudonym_key,
    reporting_partner,
    start_of_day,
    supersedes,
    withdrawal_record,
)
from services.partner_gateway.feed import FeedSignal
from shared.contracts import acls
from shared.contracts.base import event_model
from shared.contracts.certification import (
    CertificateExpired,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
)
from shared.contracts.partners import (
    PartnerCertificate,
    PartnerGrant,
    PartnerRegistered,
    PartnerWithdrawal,
    TripReported,
    grant_key,
)
from shared.contracts.sealed import Sealed, partner_kid, resident_subject
from shared.contracts.subsidy import GrantIssued
from shared.contracts.topics import (
    GATEWAY_PARTNERS,
    GATEWAY_TRIPS,
    PARTNER_CODES,
    Topic,
    partner_feed,
    partner_trips,
)
from shared.kit.clock import Clock, japan_date
from shared.kit.consumer import HandlerContext, Run
from shared.kit.db import Connection
from shared.kit.erasure import erased_among, forget_responses_about, is_erased, record_erased
from shared.kit.kafka_admin import ensure_topics
from shared.kit.keyring import Keyring, SubjectErased
from shared.kit.my_number import refuse_my_number
from shared.kit.service import ServiceRuntime, UnitOfWork
from shared.kit.settings import Settings
from shared.kit.use_case import Outcome, Write
from shared.reference import travel_programs

if TYPE_CHECKING:
    from services.partner_gateway.auth import ApiKeyCache
    from services.partner_gateway.cache import VerificationCache

log = structlog.get_logger(__name__)

SERVICE = "partner_gateway"

CertificateEvent = CertificateIssued | CertificateRenewed | CertificateRevoked | CertificateExpired


class PartnerDirectory:
    """The partners (seeded and registered), loaded at start before any consumer runs; a partner
    registered here is added at once (``add``), one registered through another replica by the
    periodic reload (``feed.watch``) or as soon as an event names it (``learn``).

    ``on_new`` is told the codes each change brings that were not known here (the trips consumer
    then subscribes to their topics: ``main.create_app``)."""

    def __init__(
        self, partners: Sequence[Partner] = (), on_new: Callable[[list[str]], None] | None = None
    ) -> None:
        self._partners = {p.code: p for p in partners}
        self.on_new = on_new

    def replace(self, partners: Sequence[Partner]) -> None:
        self._set({p.code: p for p in partners})

    def add(self, partner: Partner) -> None:
        self._set({**self._partners, partner.code: partner})

    def _set(self, partners: dict[str, Partner]) -> None:
        new = [code for code in partners if code not in self._partners]
        self._partners = partners
        if new and self.on_new is not None:
            self.on_new(new)

    async def learn(self, conn: Connection, codes: Iterable[str]) -> None:
        """Reload from the database if any of these codes is unknown here (registered elsewhere)."""
        if any(code not in self._partners for code in codes):
            self.replace(await store.load_partners(conn))

    def get(self, code: str) -> Partner | None:
        return self._partners.get(code)

    def __contains__(self, code: object) -> bool:
        return code in self._partners

    def __iter__(self) -> Iterator[Partner]:
        return iter(self._partners.values())

    def __len__(self) -> int:
        return len(self._partners)


class TodayInJapan:
    """Today's date in Japan by a clock, for the verification hot path: a clock reading and two
    comparisons while the day lasts (``Clock.today`` converts every instant to Japan time, which
    would double the time this path spends on the date)."""

    __slots__ = ("_day", "_end", "_read", "_start")

    def __init__(self, clock: Clock) -> None:
        self._read = clock.now
        self._start = self._end = datetime.min.replace(tzinfo=UTC)  # an empty day: the first call computes
        self._day = date.min

    def __call__(self) -> date:
        now = self._read()
        if self._start <= now < self._end:
            return self._day
        day = japan_date(now)
        # Kept in UTC, the clock's zone: comparing instants of one tzinfo is the cheap comparison.
        self._start = start_of_day(day).astimezone(UTC)
        self._end = start_of_day(day + timedelta(days=1)).astimezone(UTC)
        self._day = day
        return day


@dataclass
class Gateway:
    """What the HTTP layer needs, built once by the composition root (``app.state.gateway``)."""

    runtime: ServiceRuntime
    partners: PartnerDirectory
    api_keys: ApiKeyCache
    verification: VerificationCache
    #: Wakes the HTTP feed's long polls (``feed.py``).
    feed: FeedSignal = field(default_factory=FeedSignal)
    #: Today in Japan by the runtime's clock: the day a verification answers for.
    today: TodayInJapan = field(init=False)

    def __post_init__(self) -> None:
        self.today = TodayInJapan(self.runtime.clock)


# --- Start-up ----------------------------------------------------------------------------------


async def seed_partners(conn: Connection) -> list[Partner]:
    """Create or refresh the partners from the travel programs reference data (idempotent)."""
    by_partner: dict[str, list[tuple[str, str]]] = {}
    described: dict[str, tuple[str, PartnerKind]] = {}
    for program in travel_programs():
        described[program.partner_code] = (program.partner, program.partner_kind)
        by_partner.setdefault(program.partner_code, []).extend(
            (program.program_id, code) for code in program.municipality_codes
        )
    async with conn.transaction():
        for code, programs in by_partner.items():
            name, kind = described[code]
            created = await store.seed_partner(
                conn, code=code, name=name, kind=kind, programs=programs, new_key=new_pseudonym_key(),
            )
            if created:
                log.info("partner seeded", partner=code, programs=len(programs))
    return await store.load_partners(conn)


# --- The feed: records to one partner, each one recorded (APPI Art. 29) -------------------------


@dataclass
class Feed:
    """Puts partner records in the outbox of the handler's transaction and records each delivery.

    Keys on the compacted feed (``domain.feed_key``): a certificate's records under its number, a
    grant's under ``<number>/grants/<grant id>`` on the certificate's partition. The gateway
    remembers which grant keys a partner's feed holds, so that forgetting a certificate tombstones
    each of them too.

    ``deliveries``: a list shared by the feeds of a set-based run, written in one statement at its
    end (``store.insert_deliveries``; nothing in a handler reads them back); None: each at once.
    """

    ctx: HandlerContext
    deliveries: list[store.Delivery] | None = None

    async def seal(self, partner: str, resident_ref: str, resident_id: str | None, number: str | None) -> Sealed | None:
        """A member number sealed for the partner (kid ``partner:<code>:<ref>``, its key derived from
        the resident's, so it dies with them). ``SubjectErased`` if the resident's key was destroyed:
        the caller sends nothing (the ResidentWithdrawn that follows withdraws what was sent)."""
        if number is None:
            return None
        if resident_id is None:
            raise SubjectErased("the resident was erased")
        keyring: Keyring | None = self.ctx.keyring
        if keyring is None:
            raise RuntimeError("the gateway's consumers need the keyring")
        return await keyring.seal(partner_kid(partner, resident_ref), number, subject=resident_subject(resident_id))

    async def send(
        self, partner: str, record: PartnerCertificate | PartnerGrant | PartnerWithdrawal, *,
        municipality_code: str, basis: ConsentBasis, cause: uuid.UUID | None = None,
    ) -> None:
        number = record.certificate_number
        key, partition_key = feed_key(record)
        envelope = await self.ctx.emit(
            partner_feed(partner), record, subject=number, key=key, partition_key=partition_key
        )
        if isinstance(record, PartnerGrant):
            await store.grant_key_sent(self.ctx.conn, partner, number, record.grant_id)
        await self._record(store.Delivery(
            partner=partner, resident_ref=record.resident_ref, certificate_number=number,
            municipality_code=municipality_code, record_type=record.event_type,
            items=delivered_items(record), basis=basis, event_id=envelope.id,
            cause_event_id=cause or self.ctx.envelope.id,
            # The same record for the HTTP feed's log (``GET /v1/feed``), written with the delivery.
            record=store.FeedRecord(key, envelope.data, envelope.type, number, envelope.time),
        ))

    async def tombstone(self, partner: str, number: str, *, resident_ref: str, municipality_code: str,
                        basis: ConsentBasis, grant_id: str | None = None) -> None:
        """A null value under the certificate's key (or one grant's key, on the certificate's
        partition): log compaction then forgets it."""
        if grant_id is None:
            key, partition_key, items = number, None, ["certificate_number"]
        else:
            key, partition_key, items = grant_key(number, grant_id), number, ["certificate_number", "grant_id"]
        event_id = await self.ctx.tombstone(
            partner_feed(partner), subject=number, key=key, partition_key=partition_key
        )
        await self._record(store.Delivery(
            partner=partner, resident_ref=resident_ref, certificate_number=number,
            municipality_code=municipality_code, record_type="tombstone", items=items,
            basis=basis, event_id=event_id, cause_event_id=self.ctx.envelope.id,
            record=store.FeedRecord(key, None, None, number, datetime.now(UTC)),
        ))

    async def withdraw(self, state: store.EntitlementState, reason: WithdrawalReason, basis: ConsentBasis) -> None:
        """Tell the partner to forget the certificate and its grants (withdrawal, a tombstone for
        each grant key it holds, then the certificate's tombstone); stop showing it."""
        partner, number = state.partner, state.certificate_number
        record = withdrawal_record(number, state.resident_ref, reason, basis.at)
        await self.send(partner, record, municipality_code=state.municipality_code, basis=basis)
        grant_ids = await store.take_grant_keys(self.ctx.conn, partner, number)
        for grant_id in grant_ids:
            await self.tombstone(
                partner, number, resident_ref=state.resident_ref, municipality_code=state.municipality_code,
                basis=basis, grant_id=grant_id,
            )
        await self.tombstone(
            partner, number, resident_ref=state.resident_ref, municipality_code=state.municipality_code, basis=basis,
        )
        await store.withdraw_entitlement(self.ctx.conn, partner, number, reason, basis)
        log.info("partner told to forget a certificate", partner=partner, certificate_number=number,
                 reason=reason, grants=len(grant_ids))

    async def _record(self, delivery: store.Delivery) -> None:
        if self.deliveries is None:
            await store.insert_deliveries(self.ctx.conn, [delivery])
        else:
            self.deliveries.append(delivery)


# --- Consumed events ----------------------------------------------------------------------------
#
# Consents and certificate events come in runs (``router.on_many``): a run is applied in a few
# statements whatever its length, and ends as applying its events one by one in order would.


def certificate_changed_at(event: CertificateEvent) -> datetime:
    match event:
        case CertificateIssued():
            return event.issued_at
        case CertificateRenewed():
            return event.renewed_at
        case CertificateRevoked():
            return event.revoked_at
        case CertificateExpired():
            return start_of_day(event.expired_on)


def certificate_of(event: CertificateEvent, member_numbers: Sequence[str | None]) -> Certificate:
    """The certificate an event states, with its member numbers opened (``member_numbers``: one per
    membership, in order)."""
    return Certificate(
        number=event.certificate_number, resident_id=event.resident_id, municipality_code=event.municipality_code,
        valid_from=event.valid_from, valid_until=event.valid_until, status=event.status,
        memberships={m.partner: n for m, n in zip(event.partners, member_numbers, strict=True)},
        changed_at=certificate_changed_at(event),
    )


#: What a certificate event does for one partner: send it the view, or withdraw what it was sent.
FeedAction = Entitlement | store.EntitlementState


async def apply_certificate_events(partners: PartnerDirectory, run: Run[CertificateEvent]) -> None:
    """Project the certificates and send each new state to every entitled partner, nothing to others.

    Split where a certificate repeats (issued, then revoked in the same run), so that each chunk
    reads and writes a certificate's rows once, and later chunks see what earlier ones wrote."""
    # A partner registered through another replica may be named before the periodic reload.
    await partners.learn(run.conn, {m.partner for _, event in run for m in event.partners})
    deliveries: list[store.Delivery] = []
    for chunk in run.split(key=lambda event: event.certificate_number):
        await _apply_certificate_chunk(partners, chunk, deliveries)
    await store.insert_deliveries(run.conn, deliveries)


async def _apply_certificate_chunk(
    partners: PartnerDirectory, chunk: Run[CertificateEvent], deliveries: list[store.Delivery],
) -> None:
    """Certificate events with distinct numbers: read all, decide, write all, then emit in event order."""
    conn = chunk.conn
    applied = await _certificates_to_apply(conn, chunk)
    if not applied:
        return
    await store.save_certificates(conn, [(certificate, ctx.envelope.time) for ctx, certificate in applied])
    consents = await store.share_consents_of(conn, {certificate.resident_id for _, certificate in applied})
    current = await store.entitlements_of_certificates(conn, [certificate.number for _, certificate in applied])
    plans = [
        (ctx, certificate, _feed_actions(partners, certificate, consents.get(certificate.resident_id, {}),
                                         current.get(certificate.number, {})))
        for ctx, certificate in applied
    ]
    # The new views first (one statement): held grants, delivered below, read them.
    await store.save_entitlements(conn, [
        (action, certificate.resident_id, certificate.changed_at)
        for _, certificate, actions in plans for action in actions if isinstance(action, Entitlement)
    ])
    held = await store.take_held_grants(conn, [certificate.number for _, certificate in applied])
    for ctx, certificate, actions in plans:
        feed = Feed(ctx, deliveries)
        for action in actions:
            if isinstance(action, Entitlement):
                try:
                    sealed = await feed.seal(action.partner, action.resident_ref, certificate.resident_id,
                                             action.member_number)
                except SubjectErased:
                    log.info("certificate of an erased resident not sent", certificate_number=certificate.number)
                    continue
                await feed.send(action.partner, certificate_record(action, certificate.changed_at, sealed),
                                municipality_code=action.municipality_code, basis=action.basis)
            else:  # e.g. the membership was dropped
                basis = ConsentBasis("consent_revocation", certificate.changed_at)
                await feed.withdraw(action, "consent_revoked", basis)
        for event_id, event_type, data in held.get(certificate.number, ()):
            model = event_model(event_type)
            if model is not None:
                await deliver_grant(feed, model.model_validate_json(data), event_id=event_id)  # type: ignore[arg-type]


async def _certificates_to_apply(
    conn: Connection, chunk: Sequence[tuple[HandlerContext, CertificateEvent]]
) -> list[tuple[HandlerContext, Certificate]]:
    """The chunk's events that change something: not of an erased resident (in the ledger, or whose
    sealed member numbers no longer open: their key was destroyed before the withdrawal reached
    here), not older than the last applied event of their certificate (a DLQ replay, say). Locks the
    known certificates' rows."""
    erased = await erased_among(conn, {event.resident_id for _, event in chunk})
    numbers = await _member_numbers(chunk)
    for ctx, event in chunk:
        memberships = zip(event.partners, numbers[ctx.envelope.id], strict=True)
        if any(m.member_number is not None and n is None for m, n in memberships):
            erased.add(event.resident_id)
    last_times = await store.certificate_event_times(
        conn, [event.certificate_number for _, event in chunk if event.resident_id not in erased]
    )
    applied: list[tuple[HandlerContext, Certificate]] = []
    for ctx, event in chunk:
        number = event.certificate_number
        if event.resident_id in erased:
            log.info("certificate event of an erased resident dropped", certificate_number=number,
                     event_id=str(ctx.envelope.id))
            continue
        last = last_times.get(number)
        if last is not None and ctx.envelope.time < last:
            log.warning("stale certificate event skipped", certificate_number=number, event_id=str(ctx.envelope.id))
            continue
        applied.append((ctx, certificate_of(event, numbers[ctx.envelope.id])))
    return applied


async def _member_numbers(
    chunk: Sequence[tuple[HandlerContext, CertificateEvent]],
) -> dict[uuid.UUID, list[str | None]]:
    """Event id → its memberships' member numbers opened, in order (one key-store query for the
    chunk); None where none was given or it no longer opens (the resident's key was destroyed)."""
    sealed = [m.member_number for _, event in chunk for m in event.partners]
    opened: Iterator[bytes | None] = iter([None] * len(sealed))
    if any(sealed):
        keyring = chunk[0][0].keyring
        if keyring is None:
            raise RuntimeError("the gateway's consumers need the keyring")
        opened = iter(await keyring.open_many(sealed))
    return {
        ctx.envelope.id: [None if (n := next(opened)) is None else n.decode() for _ in event.partners]
        for ctx, event in chunk
    }


def _feed_actions(
    partners: PartnerDirectory, certificate: Certificate, consents: Mapping[str, ShareConsent],
    current: Mapping[str, store.EntitlementState],
) -> list[FeedAction]:
    """Per partner, in directory order: the view to send if it may see the certificate, else the
    entitlement to withdraw if it was showing it."""
    actions: list[FeedAction] = []
    for partner in partners:
        view = entitlement(partner, certificate, consents.get(partner.code), withdrawn=False)
        if view is not None:
            actions.append(view)
            continue
        previous = current.get(partner.code)
        if previous is not None and previous.active:
            actions.append(previous)
    return actions


@dataclass(frozen=True, slots=True)
class ConsentChange:
    """A share_certificate consent given or revoked, as an event states it (partner None: every partner)."""

    ctx: HandlerContext
    resident_id: str
    partner: str | None
    consent: ShareConsent


async def apply_share_consents(partners: PartnerDirectory, changes: Sequence[ConsentChange]) -> None:
    """Record each consent that supersedes the one on record; for a resident who holds certificates,
    withdraw or (re)send what it now allows (one by one: rare, and each may send grants again)."""
    if not changes:
        return
    conn = changes[0].ctx.conn
    erased = await erased_among(conn, {change.resident_id for change in changes})
    facts = [
        (change, partner)
        for change in changes if change.resident_id not in erased
        for partner in _partners_named(partners, change)
    ]
    if not facts:
        return
    on_record = await store.lock_share_consents(conn, {(change.resident_id, p.code) for change, p in facts})
    superseding: list[tuple[ConsentChange, Partner]] = []
    for change, partner in facts:  # in order: a later change is weighed against an earlier one of the run
        key = (change.resident_id, partner.code)
        if supersedes(change.consent, on_record.get(key)):
            on_record[key] = change.consent
            superseding.append((change, partner))
    if not superseding:
        return
    keys = {(change.resident_id, partner.code) for change, partner in superseding}
    await store.save_share_consents(conn, {key: on_record[key] for key in keys})
    # Certificates do not change during a run of consents: read them once.
    certificates_of = await store.certificates_of_residents(conn, {change.resident_id for change, _ in superseding})
    deliveries: list[store.Delivery] = []
    for change, partner in superseding:
        certificates = certificates_of.get(change.resident_id)
        if certificates:
            await _reconcile_partner(Feed(change.ctx, deliveries), partner, change.resident_id, change.consent,
                                     certificates)
    await store.insert_deliveries(conn, deliveries)


def _partners_named(partners: PartnerDirectory, change: ConsentChange) -> list[Partner]:
    if change.partner is None:
        # Consent is per partner: a grant that names none allows nothing; a revocation that names
        # none revokes every partner.
        return [] if change.consent.granted else list(partners)
    partner = partners.get(change.partner)
    if partner is None:
        log.info("consent for an unknown partner ignored", partner=change.partner)
        return []
    return [partner]


async def _reconcile_partner(
    feed: Feed, partner: Partner, resident_id: str, consent: ShareConsent, certificates: Sequence[Certificate]
) -> None:
    conn = feed.ctx.conn
    for certificate in certificates:
        previous = await store.entitlement_state(conn, partner.code, certificate.number)
        view = entitlement(partner, certificate, consent, withdrawn=False)
        if view is None and previous is not None and previous.active:
            await feed.withdraw(previous, "consent_revoked", ConsentBasis("consent_revocation", consent.at))
        elif view is not None and (previous is None or not previous.active):
            try:
                sealed = await feed.seal(partner.code, view.resident_ref, resident_id, view.member_number)
            except SubjectErased:
                log.info("certificate of an erased resident not sent", certificate_number=certificate.number)
                continue
            await store.save_entitlement(conn, view, resident_id, consent.at)
            await feed.send(partner.code, certificate_record(view, consent.at, sealed),
                            municipality_code=view.municipality_code, basis=view.basis)
            # The partner was told to forget this certificate's grants (or never saw them): send
            # each grant's latest state again, so it knows every grant id it may report trips on.
            for event_id, event_type, data in await store.grant_states(conn, partner.code, certificate.number):
                model = event_model(event_type)
                if model is not None:
                    grant = model.model_validate_json(data)
                    await deliver_grant(feed, grant, event_id=event_id)  # type: ignore[arg-type]


async def apply_resident_withdrawn(
    ctx: HandlerContext, partners: PartnerDirectory, resident_id: str, at: datetime
) -> None:
    """Erasure: every partner that saw the resident is told to forget (their keys for it die with the
    resident's key, destroyed by registration), then the gateway forgets too: the resident id and
    member numbers go from every table, the HTTP feed log keeps only the withdrawal and tombstones,
    stored answers about them go; the delivery record stays, pseudonymous (APPI Art. 29–30)."""
    conn = ctx.conn
    if not await record_erased(conn, resident_id, at):
        return
    deliveries: list[store.Delivery] = []
    feed = Feed(ctx, deliveries)
    basis = ConsentBasis("resident_withdrawal", at)
    withdrawn = await store.active_entitlements_of(conn, resident_id)
    for state in withdrawn:
        await feed.withdraw(state, "resident_withdrawn", basis)
    await store.insert_deliveries(conn, deliveries)
    sent_now = [d.event_id for d in deliveries]
    for state in withdrawn:
        await store.forget_feed_records(conn, state.partner, state.certificate_number, sent_now)
    await store.erase_resident(conn, resident_id)
    await forget_responses_about(conn, resident_id)
    log.info("resident withdrawn from every partner feed", certificates=len(withdrawn))


async def apply_grant_event(
    ctx: HandlerContext, partners: PartnerDirectory, event: GrantEvent
) -> None:
    """Send a grant to its partner if the partner may see the certificate; hold it if unknown yet."""
    conn = ctx.conn
    if event.partner not in partners or await is_erased(conn, event.resident_id):
        return
    # Sealed for the platform, a member number no longer opens once the resident's key was destroyed
    # (the withdrawal not read here yet): an erased resident's grant, dropped.
    if (
        isinstance(event, GrantIssued) and event.member_number is not None and ctx.keyring is not None
        and await ctx.keyring.open(event.member_number) is None
    ):
        log.info("grant of an erased resident dropped", grant_id=event.grant_id)
        return
    await store.remember_grant(
        conn, partner=event.partner, grant_id=event.grant_id, number=event.certificate_number,
        resident_id=event.resident_id, event_id=ctx.envelope.id, event_type=event.event_type, data=ctx.envelope.data,
    )
    if await store.certificate(conn, event.certificate_number) is None:
        # The certificate event is on another topic and may come later: keep the grant until then.
        await store.hold_grant(
            conn, number=event.certificate_number, resident_id=event.resident_id, event_id=ctx.envelope.id,
            event_type=event.event_type, data=ctx.envelope.data,
        )
        return
    await deliver_grant(Feed(ctx), event, event_id=ctx.envelope.id)


async def deliver_grant(feed: Feed, event: GrantEvent, *, event_id: uuid.UUID) -> None:
    state = await store.entitlement_state(feed.ctx.conn, event.partner, event.certificate_number)
    if state is None or not state.active:
        log.info("grant for a partner without entitlement dropped", partner=event.partner, grant_id=event.grant_id)
        return
    try:
        sealed = await feed.seal(event.partner, state.resident_ref, state.resident_id, state.member_number)
    except SubjectErased:
        log.info("grant of an erased resident not sent", partner=event.partner, grant_id=event.grant_id)
        return
    record = grant_record(event, state.resident_ref, sealed)
    await feed.send(
        event.partner, record, municipality_code=state.municipality_code, basis=state.basis, cause=event_id
    )


# --- Trips partners report (partner.<code>.trips.v1, on the edge) --------------------------------


def trip_topics(partner_codes: Iterable[str]) -> list[Topic]:
    """The trip topics the gateway reads, one per partner it knows: the one place that decides
    them (asked again at each subscription of the trips consumer, ``main.create_app``)."""
    return [partner_trips(code) for code in partner_codes]


def partner_topics(partner_codes: Iterable[str]) -> list[Topic]:
    """Each partner's topics: its feed and its trips on the edge, and (inside) the dead letters of
    its trips, where the gateway parks what it refuses. The registry names them for the seed only."""
    topics: list[Topic] = []
    for code in partner_codes:
        trips = partner_trips(code)
        dead_letters = Topic(trips.dlq, 1, "original key", SERVICE, description=f"Dead letters of {trips.name}.")
        topics += [partner_feed(code), trips, dead_letters]
    return topics


async def forward_trip(ctx: HandlerContext, partners: PartnerDirectory, report: TripReported) -> None:
    """Accept a partner's trip report as the partner whose topic it was written to and forward it
    inside (``gateway.trips.v1``, keyed by grant id), where subsidy counts it against the grant.

    Refused, so parked by the consumer with the reason and nothing forwarded: a My Number anywhere
    in it (the first place partner text enters the platform), a record naming another partner.
    Whose grant it is stays subsidy's to judge: a grant of another partner is answered there
    exactly as a grant that does not exist."""
    refuse_my_number(report.model_dump(mode="json"), where="trip report")
    # The correlation id is the partner's text too, and the forwarded event carries it on.
    refuse_my_number({"correlation_id": ctx.envelope.correlation_id}, where="trip report's headers")
    partner = reporting_partner(ctx.topic.removeprefix(ctx.settings.topic_prefix), partners)
    accepted = accept_trip(report, partner)
    await ctx.emit(GATEWAY_TRIPS, accepted, subject=accepted.trip_id, key=accepted.grant_id)
    log.info("trip forwarded", partner=partner, grant_id=accepted.grant_id, trip_id=accepted.trip_id)


# --- Credentials (HTTP, admin) -------------------------------------------------------------------
#
# Both run through the kit's use-case runner (``Write.run``): an admin may act on any partner's
# keys, so the route's role check is the permission check and ``authorise`` only finds the target.

#: The answer that holds a secret must not be kept by a cache on the way.
NO_STORE = {"cache-control": "no-store"}


def api_key_fields(key: store.ApiKey) -> dict[str, Any]:
    """An API key's metadata as JSON (its hash and secret are never part of it)."""
    fields: dict[str, Any] = to_jsonable_python(key)
    return fields


async def create_api_key(write: Write, partners: PartnerDirectory, partner_code: str, label: str | None) -> Outcome:
    """A new API key for the partner. The secret is in the first answer only: just its hash is
    stored, and a replay (same Idempotency-Key) answers the key's metadata without ``api_key``."""
    if partner_code not in partners:
        raise PartnerNotFound(f"no partner {partner_code!r}")
    created_by = write.principal.subject

    async def act(work: UnitOfWork) -> Outcome:
        secret = new_api_key()
        key = await store.insert_api_key(
            work.conn, partner=partner_code, key_hash=api_key_hash(secret), prefix=api_key_prefix(secret),
            label=label, created_by=created_by,
        )
        log.info("partner API key created", partner=partner_code, key_id=str(key.id), by=created_by)
        metadata = api_key_fields(key)
        return Outcome(201, {**metadata, "api_key": secret}, replay_body=metadata, headers=NO_STORE)

    return await write.run(act)


async def revoke_api_key(write: Write, partners: PartnerDirectory, partner_code: str, key_id: uuid.UUID) -> Outcome:
    """Revoke a key (again is harmless: 204, the first revocation time stays)."""
    if partner_code not in partners:
        raise PartnerNotFound(f"no partner {partner_code!r}")
    revoked_by = write.principal.subject

    async def authorise(work: UnitOfWork) -> store.ApiKey:
        # The key of this partner, locked: a concurrent revocation waits for this one.
        key = await store.api_key_of(work.conn, partner_code, key_id)
        if key is None:
            raise ApiKeyNotFound(f"partner {partner_code} has no API key {key_id}")
        return key

    async def act(work: UnitOfWork, key: store.ApiKey) -> Outcome:
        if key.revoked_at is None:
            await store.revoke_api_key(work.conn, key_id, revoked_by)
            log.info("partner API key revoked", partner=partner_code, key_id=str(key_id), by=revoked_by)
        return Outcome(204)

    return await write.run(act, authorise=authorise)


# --- Registering a partner (HTTP, admin) -----------------------------------------------------------
#
# Partners as data (issue 16): the seed of the travel programmes plus partners an admin registers.
# Registration stores the partner, issues its first API key, creates its two edge topics, and
# announces it on ``gateway.partners.v1`` (certification and subsidy keep a projection of it).


@dataclass(frozen=True, slots=True)
class NewPartner:
    code: str
    name: str
    kind: PartnerKind
    member_number_format: str
    feed_transport: FeedTransport
    #: (program id, municipality code): the programmes it runs where, which decide whose
    #: certificates it may see (as the travel programmes do for the seed).
    programs: tuple[tuple[str, str], ...] = ()


def partner_fields(partner: NewPartner, settings: Settings) -> dict[str, Any]:
    return {
        "code": partner.code, "name": partner.name, "kind": partner.kind,
        "member_number_format": partner.member_number_format, "feed_transport": partner.feed_transport,
        "feed_topic": partner_feed(partner.code).name, "trips_topic": partner_trips(partner.code).name,
        "http_feed": "/v1/feed",
        "programs": [{"program_id": p, "municipality_code": m} for p, m in partner.programs],
        "kafka": kafka_access(partner.code, settings),
    }


def kafka_access(code: str, settings: Settings) -> dict[str, Any]:
    """What the partner's Kafka access is, said plainly: a SCRAM user and ACLs are possible only on a
    cluster with SASL; the embedded broker (the local stack) has neither, so none is made there."""
    own_edge = settings.partner_kafka_bootstrap not in (None, settings.kafka_bootstrap)
    protocol = settings.partner_kafka_security_protocol if own_edge else settings.kafka_security_protocol
    topics = [partner_feed(code), partner_trips(code)]
    if not protocol.startswith("SASL"):
        return {
            "credentials": None,
            "note": "the partner-facing cluster listens without SASL (the embedded broker cannot do SASL or ACLs): "
            "no SCRAM user or ACL was made; on this stack the partner's isolation is the edge cluster's design. "
            "Read the feed over HTTP (GET /v1/feed with the API key) or deploy with SASL_SSL.",
        }
    found = acls.bindings(topics, partners=[code], prefix=settings.topic_prefix)
    return {
        "credentials": "to_be_created",
        "username": acls.username(acls.partner_principal(code)),
        "mechanism": settings.partner_kafka_sasl_mechanism if own_edge else settings.kafka_sasl_mechanism,
        "note": "the gateway does not administer SCRAM users: create this user with a random password and "
        "run the ACL commands below with the cluster's admin credentials (deploy/kafka/setup.sh does the same "
        "for the seed partners).",
        "acl_commands": acls.kafka_acls_commands(
            [b for b in found if b.principal == acls.partner_principal(code)]
        ),
    }


async def register_partner(write: Write, partners: PartnerDirectory, partner: NewPartner, label: str | None) -> Outcome:
    """Register a partner, issue its first API key (in this answer only), create its edge topics and
    announce it (``partner_gateway.partner.registered``). A code taken (seed or registered) is a 409."""
    check_member_number_format(partner.member_number_format)
    settings = write.runtime.settings
    registered_by = write.principal.subject

    async def act(work: UnitOfWork) -> Outcome:
        if partner.code in PARTNER_CODES or partner.code in partners:
            raise PartnerExists(f"partner {partner.code!r} exists")
        # Topics first (idempotent): the relay must never meet a record for a topic not yet there.
        await ensure_topics(settings, partner_topics([partner.code]))
        if not await store.register_partner(
            work.conn, code=partner.code, name=partner.name, kind=partner.kind,
            member_number_format=partner.member_number_format, feed_transport=partner.feed_transport,
            programs=partner.programs, new_key=new_pseudonym_key(), registered_by=registered_by,
        ):
            raise PartnerExists(f"partner {partner.code!r} exists")
        secret = new_api_key()
        key = await store.insert_api_key(
            work.conn, partner=partner.code, key_hash=api_key_hash(secret), prefix=api_key_prefix(secret),
            label=label or "registration", created_by=registered_by,
        )
        at = write.runtime.clock.now()
        await work.emit(
            GATEWAY_PARTNERS,
            PartnerRegistered(
                code=partner.code, name=partner.name, kind=partner.kind,
                member_number_format=partner.member_number_format, feed_transport=partner.feed_transport,
                registered_at=at,
            ),
            subject=partner.code, key=partner.code,
        )
        log.info("partner registered", partner=partner.code, kind=partner.kind, feed=partner.feed_transport,
                 programs=len(partner.programs), by=registered_by)
        body = {**partner_fields(partner, settings), "registered_at": at.isoformat(),
                "api_key_id": str(key.id), "api_key_prefix": key.prefix}
        return Outcome(201, {**body, "api_key": secret}, replay_body=body, headers=NO_STORE)

    outcome = await write.run(act)
    # After the commit: this process serves the partner at once (other replicas: feed.watch, learn).
    async with write.runtime.pool.acquire() as conn:
        partners.replace(await store.load_partners(conn))
    return outcome
