"""A partner's Kafka client for Nichiiki: read your feed, keep the latest state per key, report a trip.

What it does (docs/partners.md explains every step):

1. joins a consumer group named ``<code>.…`` (your Kafka credential may use no other group), reads your
   feed ``partner.<code>.v1`` from the beginning and keeps, per record key, the latest state in a dict:
   certificates under their number, grants under ``<certificate number>/grants/<grant id>``. A
   ``partner.withdrawal`` or a tombstone (a record with no value) forgets: the certificate and all its
   grants, or the one grant;
2. prints a summary once it has read to the end of every partition;
3. with ``--report-trip``: reports one round trip, travelled today, on a grant of yours that is
   ``issued`` (or on ``--grant-id``), as a ``partner.trip.reported`` v2 record on your trips topic
   ``partner.<code>.trips.v1`` with the CloudEvents headers the platform requires, then reads on until
   the platform's answer comes back on the feed (a grant record in state ``redeemed`` or
   ``redemption_rejected`` naming the trip id) and prints it.

Run it against the local stack of ``./nichiiki start`` (the partner-facing broker at 127.0.0.1:19093,
plain text, no credentials)::

    .venv/bin/python -m examples.partners.kafka_feed --partner jal
    .venv/bin/python -m examples.partners.kafka_feed --partner jal --report-trip

and against a deployment (SASL_SSL, SCRAM-SHA-512, the CA certificate the operator gave you)::

    export PARTNER_KAFKA_BOOTSTRAP=kafka-edge.nichiiki.example:9094
    export PARTNER_KAFKA_SECURITY_PROTOCOL=SASL_SSL PARTNER_KAFKA_CA=./nichiiki-ca.crt
    export PARTNER_KAFKA_PASSWORD=...          # the user is partner-<code> unless PARTNER_KAFKA_USERNAME says otherwise
    python kafka_feed.py --partner jal

Every option can come from the environment instead:

=====================================  ============================================  =====================
option                                 environment variable                          default
=====================================  ============================================  =====================
``--partner``                          ``PARTNER_CODE``                              (required)
``--bootstrap``                        ``PARTNER_KAFKA_BOOTSTRAP``                   ``127.0.0.1:19093``
``--security-protocol``                ``PARTNER_KAFKA_SECURITY_PROTOCOL``           ``PLAINTEXT``
``--sasl-mechanism``                   ``PARTNER_KAFKA_SASL_MECHANISM``              ``SCRAM-SHA-512``
``--username``                         ``PARTNER_KAFKA_USERNAME``                    ``partner-<code>``
``--password``                         ``PARTNER_KAFKA_PASSWORD``                    none
``--ca``                               ``PARTNER_KAFKA_CA``                          the system CAs
``--group``                            ``PARTNER_KAFKA_GROUP``                       ``<code>.feed-example``
``--topic-prefix``                     ``PARTNER_TOPIC_PREFIX``                      empty (test stacks only)
=====================================  ============================================  =====================

It needs only ``confluent-kafka`` (``pip install confluent-kafka``) and is one file: copy it. Member
numbers come sealed for you (docs/partners.md, "Member numbers"): ``open_member_number`` opens one
with the key the partner gateway gives (``GET /v1/keys/{kid}``; ``http_feed.py`` fetches it), and
needs ``cryptography`` then.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from types import TracebackType
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer

log = logging.getLogger("nichiiki.partner.kafka_feed")

# The record types of your feed and of your trips (docs/contracts/schemas/<type>.json).
CERTIFICATE = "jp.nichiiki.partner.certificate.v2"
GRANT = "jp.nichiiki.partner.grant.v2"
WITHDRAWAL = "jp.nichiiki.partner.withdrawal.v1"
TRIP_REPORTED = "jp.nichiiki.partner.trip.reported.v2"
#: Between the certificate number and the grant id in a grant record's key.
GRANT_KEY_INFIX = "/grants/"
#: The platform dates trips by the Japanese calendar.
JAPAN = timezone(timedelta(hours=9))
#: The grant states that answer a trip report.
OUTCOMES = ("redeemed", "redemption_rejected")


# --- connecting ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connection:
    """Where your topics are and how you sign in to the partner-facing Kafka cluster."""

    partner: str
    bootstrap: str = "127.0.0.1:19093"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "SCRAM-SHA-512"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_location: str | None = None
    #: Only test stacks put a prefix before every topic name; a deployment has none.
    topic_prefix: str = ""

    @property
    def feed_topic(self) -> str:
        return f"{self.topic_prefix}partner.{self.partner}.v1"

    @property
    def trips_topic(self) -> str:
        return f"{self.topic_prefix}partner.{self.partner}.trips.v1"

    def client_config(self) -> dict[str, str]:
        """librdkafka properties every client of yours needs (add ``group.id`` etc. beside them)."""
        protocol = self.security_protocol.upper()
        config = {"bootstrap.servers": self.bootstrap, "security.protocol": protocol.lower()}
        if protocol in ("SSL", "SASL_SSL"):
            config["ssl.endpoint.identification.algorithm"] = "https"  # check the broker's host name
            if self.ca_location:
                config["ssl.ca.location"] = self.ca_location
        if protocol.startswith("SASL"):
            if not self.password:
                raise ValueError(f"{protocol} needs a password (--password or PARTNER_KAFKA_PASSWORD)")
            config.update({
                "sasl.mechanisms": self.sasl_mechanism,
                "sasl.username": self.username or f"partner-{self.partner}",
                "sasl.password": self.password,
            })
        return config


# --- member numbers: sealed for you -----------------------------------------------------------------


def open_member_number(sealed: dict[str, str], key: str) -> str:
    """A record's ``member_number`` (``{kid, alg, iv, ct}``) opened with ``key`` (the ``k`` of
    ``GET /v1/keys/{kid}``): AES-256-GCM, the kid's bytes as additional data, base64url without padding."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # only when you open one

    def unb64(text: str) -> bytes:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    return AESGCM(unb64(key)).decrypt(unb64(sealed["iv"]), unb64(sealed["ct"]), sealed["kid"].encode()).decode()


# --- your state: the latest record per key -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FeedRecord:
    """One record of your feed: ``value`` None is a tombstone (forget the key)."""

    key: str
    value: dict[str, Any] | None
    headers: dict[str, str]
    partition: int
    offset: int

    @property
    def type(self) -> str | None:
        return self.headers.get("ce_type")


def certificate_of_key(key: str) -> str:
    """The certificate number a key belongs to (the key itself for certificate records)."""
    return key.split(GRANT_KEY_INFIX, 1)[0]


@dataclass
class FeedState:
    """What you may know now: the latest record of each key, nothing that was withdrawn."""

    #: certificate number → the latest ``partner.certificate`` value
    certificates: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ``<certificate number>/grants/<grant id>`` → the latest ``partner.grant`` value
    grants: dict[str, dict[str, Any]] = field(default_factory=dict)
    records: int = 0
    tombstones: int = 0
    withdrawals: int = 0
    #: Certificates this run was told to forget (the numbers only, for the summary).
    forgotten: set[str] = field(default_factory=set)

    def apply(self, record: FeedRecord) -> None:
        self.records += 1
        number = certificate_of_key(record.key)
        if record.value is None:  # a tombstone: forget the key (a certificate's: with its grants)
            self.tombstones += 1
            if GRANT_KEY_INFIX in record.key:
                self.grants.pop(record.key, None)
            else:
                self._forget(number)
        elif record.type == WITHDRAWAL:  # consent revoked or resident withdrawn: forget everything of it
            self.withdrawals += 1
            self._forget(number)
        elif record.type == CERTIFICATE:
            self.certificates[record.key] = record.value
            self.forgotten.discard(number)  # consent given again: the certificate is back
        elif record.type == GRANT:
            self.grants[record.key] = record.value
        else:  # a type this client does not know (a newer version): keep reading, look at it later
            log.warning("record of an unknown type %r under key %s skipped", record.type, record.key)

    def _forget(self, number: str) -> None:
        self.certificates.pop(number, None)
        for key in [k for k in self.grants if certificate_of_key(k) == number]:
            del self.grants[key]
        self.forgotten.add(number)

    def grants_of(self, certificate_number: str) -> list[dict[str, Any]]:
        return [v for k, v in self.grants.items() if certificate_of_key(k) == certificate_number]

    def outcome(self, trip_id: str) -> dict[str, Any] | None:
        """The grant record that answers the trip ``trip_id``, once it has arrived."""
        return next(
            (g for g in self.grants.values() if g.get("trip_id") == trip_id and g.get("state") in OUTCOMES), None
        )

    def summary(self) -> str:
        lines = [
            f"{self.records} records read ({self.tombstones} tombstones, {self.withdrawals} withdrawals): "
            f"{len(self.certificates)} certificates, {len(self.grants)} grants known now"
            + (f", {len(self.forgotten)} certificates forgotten" if self.forgotten else "")
        ]
        for number, cert in sorted(self.certificates.items()):
            sealed = cert.get("member_number")
            # Sealed for you: open it with the key of GET /v1/keys/{kid} (``open_member_number``).
            member = f"member number sealed under {sealed['kid'][:20]}…" if sealed else "no member number shared"
            lines.append(
                f"  {number} {cert['status']} {cert['valid_from']}..{cert['valid_until']} "
                f"municipality {cert['municipality_code']}, programs {', '.join(cert['programs'])}, "
                f"resident_ref {str(cert['resident_ref'])[:12]}…, {member}"
            )
            for grant in self.grants_of(number):
                amount = "" if grant.get("amount") is None else f" {grant['amount']} {grant.get('unit')}"
                lines.append(f"    grant {grant['grant_id']} {grant['state']}{amount} ({grant['program_id']})")
        orphans = [k for k in self.grants if certificate_of_key(k) not in self.certificates]
        if orphans:  # compaction can put a grant before its certificate's newer record: it comes later
            lines.append(f"  {len(orphans)} grants whose certificate record has not been read yet")
        return "\n".join(lines)


# --- reading -----------------------------------------------------------------------------------------


def _text(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw or "")


def feed_record(message: Any) -> FeedRecord:
    """A confluent-kafka message of your feed as a :class:`FeedRecord`."""
    raw_headers = message.headers() or []
    pairs = raw_headers.items() if isinstance(raw_headers, dict) else raw_headers
    value = message.value()
    return FeedRecord(
        key=_text(message.key()),
        value=None if value is None else json.loads(value),
        headers={name: _text(raw) for name, raw in pairs},
        partition=int(message.partition()),
        offset=int(message.offset()),
    )


class FeedReader:
    """A consumer of your feed that always starts from the beginning of every partition.

    The feed is compacted: the latest record of every key is kept (tombstones for a while), so reading
    it from the beginning rebuilds your state. This reader keeps its state in memory, so it commits no
    offsets and starts over at every run; a client that keeps its state in a database would commit
    offsets with it and start from them instead."""

    def __init__(self, connection: Connection, *, group: str | None = None, session_timeout_ms: int = 6000) -> None:
        self.connection = connection
        self.group = group or f"{connection.partner}.feed-example"
        if not self.group.startswith(f"{connection.partner}."):
            raise ValueError(f"consumer group ids must start with {connection.partner}. (your ACLs allow no other)")
        self.state = FeedState()
        self._at_end: set[int] = set()
        self._consumer = Consumer({
            **connection.client_config(),
            "group.id": self.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,  # tells us when a partition has been read to its end
            "session.timeout.ms": session_timeout_ms,
        })
        self._consumer.subscribe([connection.feed_topic], on_assign=self._from_the_beginning)

    def _from_the_beginning(self, consumer: Any, partitions: list[Any]) -> None:
        for partition in partitions:
            partition.offset = OFFSET_BEGINNING
        self._at_end.clear()
        consumer.assign(partitions)

    def __enter__(self) -> FeedReader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._consumer.close()  # leaves the group at once

    def caught_up(self) -> bool:
        """Every partition assigned to us has been read to its end (as of the last poll)."""
        assigned = {tp.partition for tp in self._consumer.assignment()}
        return bool(assigned) and assigned <= self._at_end

    def poll(self, timeout_s: float = 0.2) -> FeedRecord | None:
        message = self._consumer.poll(timeout_s)
        if message is None:
            return None
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                self._at_end.add(message.partition() or 0)
            elif error.fatal():
                raise RuntimeError(f"the Kafka client failed: {error}")
            else:  # e.g. the topic's metadata not there yet, a broker restarting: librdkafka retries
                log.info("Kafka: %s", error)
            return None
        record = feed_record(message)
        self._at_end.discard(record.partition)
        self.state.apply(record)
        return record

    def read_until(self, done: Callable[[FeedState], bool], timeout_s: float, what: str = "the condition") -> FeedState:
        """Read until ``done(state)`` holds after every partition was read to its end."""
        deadline = time.monotonic() + timeout_s
        while not (self.caught_up() and done(self.state)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} within {timeout_s:g} s; {self.state.records} records read so far")
            self.poll()
        return self.state

    def catch_up(self, timeout_s: float = 60.0) -> FeedState:
        """Read every partition to its end: your state as of now."""
        return self.read_until(lambda _: True, timeout_s, "not at the end of the feed")


# --- reporting a trip --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TripReport:
    """A trip as you report it: the record's key, value and CloudEvents headers."""

    key: str
    value: dict[str, Any]
    headers: list[tuple[str, str]]

    @property
    def trip_id(self) -> str:
        return str(self.value["trip_id"])


def trip_report(
    connection: Connection,
    grant: Mapping[str, Any],
    *,
    trip_id: str | None = None,
    trip_kind: str = "round_trip",
    travelled_on: date | None = None,
    discount_jpy: int | None = None,
) -> TripReport:
    """The ``partner.trip.reported`` v2 record of one trip on ``grant`` (a ``partner.grant`` value).

    ``trip_id`` is yours and unique: the platform deduplicates by it, so sending the same report again
    is harmless (it is answered once); the same id with other details is refused (``duplicate_trip``)."""
    now = datetime.now(UTC)
    trip_id = trip_id or f"{connection.partner}-{uuid.uuid4().hex[:12]}"
    value: dict[str, Any] = {
        "grant_id": grant["grant_id"],
        "certificate_number": grant["certificate_number"],
        "trip_id": trip_id,
        "trip_kind": trip_kind,  # one_way | round_trip
        "travelled_on": (travelled_on or datetime.now(JAPAN).date()).isoformat(),
        "reported_at": now.isoformat(),
    }
    if discount_jpy is not None:  # fare_discount programmes only: the discount you granted, in yen
        value["discount_jpy"] = discount_jpy
    headers = [
        # Required by the platform (a record without them is parked, never counted):
        ("ce_specversion", "1.0"),
        ("ce_id", str(uuid.uuid4())),  # unique per record: the platform's idempotency key
        ("ce_source", f"/partners/{connection.partner}"),
        ("ce_type", TRIP_REPORTED),
        ("ce_time", now.isoformat()),  # RFC 3339 with a UTC offset
        # Recommended: what the record is about, and the body's type (only application/json is accepted).
        ("ce_subject", trip_id),
        ("content-type", "application/json"),
    ]
    return TripReport(key=str(grant["grant_id"]), value=value, headers=headers)


def send_trip(connection: Connection, report: TripReport, timeout_s: float = 30.0) -> None:
    """Produce the report to your trips topic and wait until the broker has it (acks=all)."""
    producer = Producer({**connection.client_config(), "acks": "all", "linger.ms": 0})
    failures: list[str] = []

    def delivered(error: Any, message: Any) -> None:
        if error is not None:
            failures.append(str(error))

    producer.produce(
        connection.trips_topic, key=report.key.encode(), value=json.dumps(report.value).encode(),
        headers=[(name, raw.encode()) for name, raw in report.headers], on_delivery=delivered,
    )
    if producer.flush(timeout_s) != 0:
        raise TimeoutError(f"the trip {report.trip_id} was not delivered within {timeout_s:g} s")
    if failures:
        raise RuntimeError(f"the trip {report.trip_id} was not delivered: {failures[0]}")


def reportable_grant(state: FeedState, grant_id: str | None = None) -> dict[str, Any] | None:
    """The grant to report a trip on: ``grant_id``'s, else the first ``issued`` grant of a valid certificate."""
    for grant in state.grants.values():
        if grant_id is not None:
            if grant["grant_id"] == grant_id:
                return grant
            continue
        certificate = state.certificates.get(grant["certificate_number"], {})
        if grant["state"] == "issued" and certificate.get("status") == "valid":
            return grant
    return None


# --- the command -------------------------------------------------------------------------------------


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--partner", default=_env("PARTNER_CODE"), help="your partner code, e.g. jal")
    parser.add_argument("--bootstrap", default=_env("PARTNER_KAFKA_BOOTSTRAP", "127.0.0.1:19093"))
    parser.add_argument("--security-protocol", default=_env("PARTNER_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT"),
                        choices=["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"])
    parser.add_argument("--sasl-mechanism", default=_env("PARTNER_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
                        choices=["SCRAM-SHA-512", "SCRAM-SHA-256"])
    parser.add_argument("--username", default=_env("PARTNER_KAFKA_USERNAME"), help="default: partner-<code>")
    parser.add_argument("--password", default=_env("PARTNER_KAFKA_PASSWORD"))
    parser.add_argument("--ca", default=_env("PARTNER_KAFKA_CA"), help="the CA certificate (PEM) of the cluster")
    parser.add_argument("--group", default=_env("PARTNER_KAFKA_GROUP"), help="default: <code>.feed-example")
    parser.add_argument("--topic-prefix", default=_env("PARTNER_TOPIC_PREFIX", ""), help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each step")
    parser.add_argument("--report-trip", action="store_true", help="report one round trip, travelled today")
    parser.add_argument("--grant-id", default=None, help="the grant to report it on (default: an issued one)")
    args = parser.parse_args(argv)
    if not args.partner:
        parser.error("--partner (or PARTNER_CODE) is required")
    return args


def connection_of(args: argparse.Namespace) -> Connection:
    return Connection(
        partner=args.partner, bootstrap=args.bootstrap, security_protocol=args.security_protocol,
        sasl_mechanism=args.sasl_mechanism, username=args.username, password=args.password,
        ca_location=args.ca, topic_prefix=args.topic_prefix,
    )


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    connection = connection_of(args)
    with FeedReader(connection, group=args.group) as reader:
        state = reader.catch_up(args.timeout)
        _out(f"{connection.feed_topic}:\n{state.summary()}")
        if not args.report_trip:
            return 0
        grant = reportable_grant(state, args.grant_id)
        if grant is None:
            _out("no issued grant of a valid certificate to report a trip on")
            return 1
        report = trip_report(connection, grant)
        send_trip(connection, report, args.timeout)
        _out(f"reported trip {report.trip_id} on grant {grant['grant_id']} to {connection.trips_topic}")
        reader.read_until(lambda s: s.outcome(report.trip_id) is not None, args.timeout,
                          f"no answer to trip {report.trip_id}")
        outcome = state.outcome(report.trip_id) or {}
        detail = outcome.get("reason") or f"{outcome.get('amount')} {outcome.get('unit')}"
        _out(f"the platform answered trip {report.trip_id}: {outcome.get('state')} ({detail})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
