"""Every topic of the platform, named once: partitions, key, who writes and who reads it.

Two clusters: the **internal** one carries every service topic and partners are never given it;
the **edge** (``NICHIIKI_PARTNER_KAFKA_BOOTSTRAP``) carries only what partners touch, one topic per
partner each way: its feed ``partner.<code>.v1`` (written by the gateway, read by that partner) and
its trip reports ``partner.<code>.trips.v1`` (written by that partner, read by the gateway, which
stamps the partner from the topic and forwards the trip inside on ``gateway.trips.v1``). The
gateway is the only service on both; dead letters stay internal.

Partner feeds are one topic per partner (``partner.<code>.v1``), compacted. A certificate's records
(``partner.certificate``, ``partner.withdrawal``) are keyed by the certificate number, each grant's
records (``partner.grant``) by ``<certificate number>/grants/<grant id>`` and placed on the
certificate's partition, so compaction keeps the latest record (or the tombstone) of the
certificate and of each of its grants, and a partner still reads a certificate and its grants in
order. Every consumed topic has a dead-letter twin ``<topic>.dlq``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

DLQ_SUFFIX = ".dlq"
Cluster = Literal["internal", "edge"]

#: The platform's services, each its own process; each but the fronts (below) has its own database
#: and they are the only consumers that park dead letters. ``identity`` is the embedded identity
#: provider: it publishes no events and hears only a resident's erasure.
SERVICES: tuple[str, ...] = (
    "registration", "certification", "subsidy", "donation", "notification", "partner_gateway", "identity",
    "planning", "insights", "listings", "console",
)
#: Fronts for people (the staff console and resident pages): they call the others' HTTP APIs with the
#: signed-in user's token and have no database and no Kafka client of their own.
FRONTS: tuple[str, ...] = ("console",)
#: The services with a database and Kafka clients of their own.
BACKENDS: tuple[str, ...] = tuple(s for s in SERVICES if s not in FRONTS)


@dataclass(frozen=True, slots=True)
class Topic:
    name: str
    partitions: int
    key: str
    producer: str
    consumers: tuple[str, ...] = ()
    compacted: bool = False
    description: str = ""
    cluster: Cluster = "internal"
    #: Further services that write here (a conversation every service takes part in, e.g. exports).
    co_producers: tuple[str, ...] = ()

    @property
    def producers(self) -> tuple[str, ...]:
        """Every service that writes here (a dead-letter topic names its writers comma-separated)."""
        return (*self.producer.split(","), *self.co_producers)

    @property
    def dlq(self) -> str:
        return self.name + DLQ_SUFFIX


RESIDENTS = Topic(
    "registration.residents.v1", 4, "resident id", "registration",
    ("certification", "notification", "partner_gateway", "insights", "listings"),
    description="Residents, their furusato registrations, consents and withdrawal.",
)
#: A resident's erasure alone, for the services that keep something about residents but none of their
#: registrations: on the residents topic they fetched and skipped every registration to learn of one (the
#: broker's CPU per registration 0.29 → 0.25 ms when they stopped, docs/benchmarks.md). The residents topic
#: still carries the erasure, in order with the registrations, for those that keep them.
ERASURES = Topic(
    "registration.erasures.v1", 2, "resident id", "registration", ("subsidy", "donation", "identity"),
    description="Residents erased (the same erasure as registration.resident.withdrawn on registration.residents.v1).",
)
APPLICATIONS = Topic(
    "certification.applications.v1", 4, "application id", "certification", ("notification",),
    description="Dual-resident applications: submitted, rejected.",
)
CERTIFICATES = Topic(
    "certification.certificates.v1", 4, "certificate number", "certification",
    ("subsidy", "notification", "partner_gateway", "insights", "listings"),
    description="Certificates: issued, renewed, revoked, expiring, expired.",
)
GRANTS = Topic(
    "subsidy.grants.v1", 4, "certificate number", "subsidy", ("notification", "partner_gateway", "insights"),
    description="Travel grants: issued, waitlisted, redeemed, rejected redemptions, cancelled, expired.",
)
BUDGETS = Topic(
    "subsidy.budgets.v1", 2, "program id", "subsidy", (),
    description="Program budget changes (JPY and miles).",
)
DONATIONS = Topic(
    "donation.donations.v1", 4, "municipality code", "donation", ("subsidy", "notification", "insights"),
    description="Donations received (a money donation with its receipt), refunds, one-stop exception voided.",
)
DELIVERIES = Topic(
    "notification.deliveries.v1", 2, "resident id (an e-mail's record); the first message's id (an inbox record)",
    "notification", (),
    description="What was sent to whom by which channel (no message body).",
)
EXPORT_REQUESTS = Topic(
    "registration.exports.v1", 2, "resident id", "registration",
    ("certification", "subsidy", "donation", "notification", "partner_gateway", "listings"),
    description="A resident asked for everything the platform holds about them (APPI Art. 33 disclosure): each "
    "service answers with its part on privacy.export-parts.v1.",
)
EXPORT_PARTS = Topic(
    "privacy.export-parts.v1", 2, "resident id", "certification", ("registration",),
    co_producers=("subsidy", "donation", "notification", "partner_gateway", "listings"),
    description="Each service's part of a resident's data export, sealed with the resident's data key; "
    "registration gathers them into one archive.",
)
GATEWAY_TRIPS = Topic(
    "gateway.trips.v1", 4, "grant id", "partner_gateway", ("subsidy",),
    description="Trips partners reported against a grant, accepted by the gateway with the partner taken from "
    "the topic the partner wrote to (never from the record).",
)
GATEWAY_PARTNERS = Topic(
    "gateway.partners.v1", 1, "partner code", "partner_gateway", ("certification", "subsidy", "registration"),
    compacted=True,
    description="Partners registered through the gateway's admin API (beyond the seed of PARTNER_CODES): code, "
    "kind, member-number format, feed transport. The registry of partners is the seed plus this topic.",
)

PLANS = Topic(
    "planning.plans.v1", 2, "plan id", "planning", ("certification", "insights"),
    description="Dual-residence plans (prefectural 広域的地域活性化基盤整備計画, municipal 特定居住促進計画): "
    "submitted for consultation, adopted, amended (a new version), withdrawn; adopted and amended versions carry "
    "their public content.",
)
CORPORATIONS = Topic(
    "planning.corporations.v1", 2, "corporation id", "planning", ("insights", "listings"),
    description="Support corporations (特定居住支援法人): designated, supervision reports received, revoked; their "
    "proposals to make or change a plan and the municipality's answers (keyed by the corporation).",
)
COUNCILS = Topic(
    "planning.councils.v1", 1, "council id", "planning", (),
    description="Councils (特定居住促進協議会): formed, membership changed (counts by kind), meetings held and the "
    "plan they consulted on. No member names, agendas or minutes.",
)
LISTINGS = Topic(
    "listings.listings.v1", 2, "listing id", "listings", (),
    description="Listings municipalities and their support corporations publish for dual residents (vacant houses, "
    "trial stays, jobs, events, coworking, childcare programmes): published, withdrawn, expired. Public content "
    "and ids only; the owner's consent record stays in the listings service.",
)
LISTING_DIGESTS = Topic(
    "listings.digests.v1", 2, "resident id", "listings", ("notification",),
    description="A digest of new listings due to one resident (immediate or weekly): the resident id and the "
    "listings' public content; notification turns it into a message and an e-mail.",
)

#: The key scheme of every partner feed (see ``shared.contracts.partners``).
PARTNER_FEED_KEY = (
    "certificate number for partner.certificate and partner.withdrawal; "
    "<certificate number>/grants/<grant id> for partner.grant, on the partition of the certificate number "
    "(murmur2, the Kafka default partitioner); a tombstone (null value) forgets its key"
)
_PARTNER_FEED_READING = (
    "Compaction keeps the latest record of each key: a partner keeps, per key, the latest state. Every "
    "record of a certificate, its grants' included, is on the certificate's partition, in order; ce_subject "
    "is always the certificate number. A partner.withdrawal is followed by a tombstone for each grant key "
    "and then for the certificate key: forget the certificate and all its grants."
)

#: The shape every partner feed shares; the real topics are ``partner_feed(code)``.
PARTNER_FEED = Topic(
    "partner.<partner>.v1", 2, PARTNER_FEED_KEY, "partner_gateway", ("partners",), compacted=True,
    description="What one partner may see: consented certificates and its grants (one topic per partner). "
    + _PARTNER_FEED_READING, cluster="edge",
)
_PARTNER_TRIPS_READING = (
    "Only this partner writes here; the partner is the topic's: a record naming another partner is parked."
)
#: The shape every partner's trip topic shares; the real topics are ``partner_trips(code)``.
PARTNER_TRIPS = Topic(
    "partner.<partner>.trips.v1", 2, "grant id", "partners", ("partner_gateway",),
    description="Trips one partner carried out under its grants (one topic per partner). " + _PARTNER_TRIPS_READING,
    cluster="edge",
)

#: Partners with a feed of their own (seeded from the travel programs reference data). The static seed
#: only: partners registered later come through ``gateway.partners.v1`` (``GATEWAY_PARTNERS``).
PARTNER_CODES: tuple[str, ...] = ("jal", "ana", "jreast", "sadokisen", "kyushuyusen")


def partner_feed(code: str) -> Topic:
    return Topic(
        f"partner.{code}.v1", 2, PARTNER_FEED_KEY, "partner_gateway", (code,), compacted=True,
        description=f"What partner {code} may see: consented certificates and its grants. " + _PARTNER_FEED_READING,
        cluster="edge",
    )


def partner_trips(code: str) -> Topic:
    return Topic(
        f"partner.{code}.trips.v1", 2, "grant id", code, ("partner_gateway",),
        description=f"Trips partner {code} carried out under its grants. " + _PARTNER_TRIPS_READING, cluster="edge",
    )


_PARTNER_TOPIC = re.compile(r"^partner\.(?P<code>[a-z0-9_-]+)\.(?:trips\.)?v1$")


def partner_of_topic(name: str) -> str | None:
    """The partner a partner topic belongs to (``partner.jal.trips.v1`` → ``jal``), else None."""
    found = _PARTNER_TOPIC.match(name)
    return None if found is None else found["code"]


def cluster_of(name: str) -> Cluster:
    """The cluster a topic lives on, by its name (without a test prefix): partner topics on the edge,
    everything else, their dead letters included, inside."""
    return "edge" if partner_of_topic(name) is not None else "internal"


CORE_TOPICS: tuple[Topic, ...] = (
    RESIDENTS, ERASURES, APPLICATIONS, CERTIFICATES, GRANTS, BUDGETS, DONATIONS, DELIVERIES, GATEWAY_TRIPS,
    GATEWAY_PARTNERS, EXPORT_REQUESTS, EXPORT_PARTS, PLANS, CORPORATIONS, COUNCILS, LISTINGS, LISTING_DIGESTS,
)
PARTNER_TOPICS: tuple[Topic, ...] = tuple(
    topic for code in PARTNER_CODES for topic in (partner_feed(code), partner_trips(code))
)
ALL_TOPICS: tuple[Topic, ...] = CORE_TOPICS + PARTNER_TOPICS


def dead_letter_topics() -> tuple[Topic, ...]:
    return tuple(
        Topic(t.dlq, 1, "original key", ",".join(t.consumers), description=f"Dead letters of {t.name}.")
        for t in ALL_TOPICS
        if any(consumer in SERVICES for consumer in t.consumers)
    )


def topic_by_name(name: str) -> Topic:
    for topic in ALL_TOPICS + dead_letter_topics():
        if topic.name == name:
            return topic
    raise KeyError(name)
