"""``nichiiki demo``: the whole resident journey on the running platform, one line per step.

Resident A registers with 和歌山県白浜町 (basic, then premium: JPKI identity and three of the town's
designated activities, picked from its public catalogue; approved by the town's staff), applies for
dual-resident certification with a JAL Mileage Bank number, and the staff approve. JAL's own
consumer (``confluent_kafka``, a consumer group reading ``partner.jal.v1`` from the beginning)
receives the consented certificate and the grant; the subsidy service grants the JAL mileage
program (the 白浜町 program funds exactly one resident: 30,000 miles); JAL reports four round trips
and the miles are credited once. Resident B follows to a certificate, and B's grant is
waitlisted; a hometown-tax donation earmarked ``dual_residence`` raises the budget and releases it.
Last, both residents find every message in their in-app inbox and in the SMTP sink.

Everyone signs in at the embedded identity provider (``services/identity``, docs/identity.md), as
they would on a real platform: the residents sign up and sign in with a password (their account id
is their resident id), the town's staff with a password and a TOTP code, JAL and the payment
provider with client credentials; the staff, admin and client credentials are the development ones
the identity service seeds with ``NICHIIKI_ENV=development``. Tokens are refreshed (or the party
signs in again) before they expire.

:class:`Journey` runs against any set of service URLs (the end-to-end test passes its own fleet);
:func:`run_demo` runs it against the platform that ``nichiiki start`` is running.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import string
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from email.utils import getaddresses
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pyotp

from shared.contracts.formats import ProgramId
from shared.contracts.partners import PartnerCertificate, PartnerGrant, certificate_of_key
from shared.contracts.topics import SERVICES
from shared.kit.clock import SYSTEM_CLOCK
from shared.kit.kafka_security import KafkaConnection
from shared.kit.settings import Settings
from shared.reference import municipality
from shared.stack.identity_verifier import attest

__all__ = [
    "A_INBOX",
    "B_INBOX",
    "FeedRecord",
    "Journey",
    "JourneyError",
    "JourneyResult",
    "ResidentFacts",
    "run_demo",
]

T = TypeVar("T")

Printer = Callable[[str], None]
MailboxReader = Callable[[], list[EmailMessage]]

SHIRAHAMA = "304018"
JAL_PROGRAM = ProgramId.format("jal-dual-residence-miles", SHIRAHAMA)
#: What resident A did in 白浜町: entries of the town's sample catalogue of designated activities.
DEMO_ACTIVITIES = ("shirarahama-beach-cleanup", "kumano-kodo-trail-work", "ume-harvest")
JAL_FEED = "partner.jal.v1"
#: What a partner record may carry (docs/services/partner_gateway.md): never a name, an address...
PARTNER_RECORD_FIELDS = frozenset({
    "certificate_number", "status", "valid_from", "valid_until", "municipality_code", "programs",
    "resident_ref", "member_number", "changed_at",
})
#: Every message each resident gets on the way (docs/services/notification.md), as kind: count.
A_INBOX: Mapping[str, int] = {
    "registration_confirmed": 1, "premium_requested": 1, "premium_approved": 1, "application_received": 1,
    "certificate_issued": 1, "grant_issued": 1, "grant_redeemed": 4,
}
B_INBOX: Mapping[str, int] = {
    "registration_confirmed": 1, "application_received": 1, "certificate_issued": 1, "grant_waitlisted": 1,
    "grant_issued": 1,
}
ROUND_TRIPS = 4
DONATION_JPY = 60_000

# The development credentials the identity service seeds with NICHIIKI_ENV=development
# (services/identity/development.py, docs/identity.md; shared/ does not import services/).
#: 白浜町's manager: approves, and tops up the program's budget when an earlier run used it.
STAFF_LOGIN = ("manager@shirahama.example", "nichiiki-dev-manager-pass")
#: The one the demo suggests trying by hand (not the demo's own: a TOTP code is good once per account).
TRY_STAFF_LOGIN = ("reviewer@shirahama.example", "nichiiki-dev-reviewer-pass")
ADMIN_LOGIN = ("admin@nichiiki.example", "nichiiki-dev-admin-pass")
STAFF_TOTP_SECRET = "NICHIIKIDEMOSTAFFTOTPSECRET23456"
JAL_CLIENT = ("partner-jal", "nichiiki-dev-jal-secret")
PAYMENT_CLIENT = ("payment-provider", "nichiiki-dev-payment-secret")
#: A token this close to its expiry is refreshed (or its holder signs in again) before it is used.
REFRESH_MARGIN_S = 60.0
TOTP_STEP_S = 30
#: How long a sign-in waits in all for a rate limit (429 Retry-After) to pass.
SIGN_IN_PATIENCE_S = 60.0


def _stdout(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _today() -> date:
    return SYSTEM_CLOCK.today()


def _tag(length: int = 6) -> str:
    """Letters only: no run of digits in a request body can ever look like a My Number."""
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(length))


def _member_number() -> str:
    """A JAL Mileage Bank number: 9 digits."""
    return str(100_000_000 + secrets.randbelow(900_000_000))


def _miles(amount: int) -> str:
    return f"{amount:,} miles"


def _kinds(kinds: Iterable[str], order: Iterable[str] = ()) -> str:
    """``a, b ×4, c``: each kind once with its count, in ``order`` first (the journey's), then as seen."""
    counted = Counter(kinds)
    ranked = [kind for kind in order if kind in counted] + [kind for kind in counted if kind not in order]
    return ", ".join(f"{kind} ×{counted[kind]}" if counted[kind] > 1 else kind for kind in ranked)


# --- results -------------------------------------------------------------------------------------


class JourneyError(RuntimeError):
    """A step did not reach its outcome: names the step and what was (or was not) seen."""

    def __init__(self, step: int, title: str, detail: str) -> None:
        super().__init__(f"step {step} ({title}): {detail}")
        self.step = step
        self.title = title
        self.detail = detail


@dataclass(frozen=True, slots=True)
class FeedRecord:
    """One record of a partner feed as the partner's client sees it (``data`` None: a tombstone)."""

    key: str
    ce_type: str | None
    data: dict[str, Any] | None
    raw: bytes | None
    partition: int
    offset: int


@dataclass
class ResidentFacts:
    label: str
    resident_id: str
    name: str
    name_kana: str
    email: str
    member_number: str
    legal_address_code: str
    #: Their own phone, birth date and address in the town (distinct per person: the privacy test
    #: looks for each of them after an erasure).
    phone: str = ""
    date_of_birth: str = ""
    address_there: str = ""
    #: The identity account's password (the resident id is the account's id, known after sign-up).
    password: str = ""
    registration_id: str = ""
    premium_valid_until: str | None = None
    application_id: str = ""
    certificate_number: str = ""
    certificate_valid_from: str = ""
    certificate_valid_until: str = ""
    grant_id: str = ""
    #: The grant's states in the order the journey saw them, e.g. ``["waitlisted", "issued"]``.
    grant_states: list[str] = field(default_factory=list)
    #: Inbox message kinds, oldest first.
    inbox: list[str] = field(default_factory=list)
    #: Template kinds of the e-mails to the resident's address in the SMTP sink, oldest first.
    emails: list[str] = field(default_factory=list)


@dataclass
class JourneyResult:
    run_tag: str
    resident_a: ResidentFacts
    resident_b: ResidentFacts
    #: Every record of JAL's feed about A's or B's certificate, in the order JAL read them.
    jal_feed: list[FeedRecord] = field(default_factory=list)
    #: The answers to JAL's four trip reports (``POST /v1/redemptions``).
    trips: list[dict[str, Any]] = field(default_factory=list)
    miles_credited: int = 0
    budget_topped_up: int = 0
    donation_id: str = ""
    receipt_number: str | None = None
    donation_miles: int = 0
    #: False when the platform sends e-mail to a server other than its SMTP sink.
    emails_checked: bool = False
    lines: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --- JAL's consumer ------------------------------------------------------------------------------


class PartnerFeed:
    """A partner reading its feed with its own librdkafka client: a consumer group, from the beginning.

    The consumer polls in a worker thread (``asyncio.to_thread``) for the whole journey, so its
    group join overlaps the first steps; the journey waits for records with :meth:`wait_for`.
    """

    def __init__(self, settings: Settings, topic: str, group: str) -> None:
        self.topic = topic
        self.group = group
        # The feed is on the partner-facing cluster (the internal one when it has no bootstrap of its own).
        self._config: dict[str, object] = {
            **KafkaConnection.edge(settings).confluent_config(), "group.id": group, "auto.offset.reset": "earliest",
            "enable.auto.commit": True, "session.timeout.ms": max(settings.kafka_session_timeout_ms, 2000),
            "heartbeat.interval.ms": settings.kafka_heartbeat_interval_ms, "fetch.wait.max.ms": 50,
            "client.id": f"{group}-client",
        }
        self._records: list[FeedRecord] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_error: str | None = None
        self.assigned = False

    def start(self) -> None:
        self._task = asyncio.create_task(asyncio.to_thread(self._consume))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    def records(self) -> list[FeedRecord]:
        with self._lock:
            return list(self._records)

    def _consume(self) -> None:
        try:
            self._poll()
        except Exception as error:  # reported by the step that waits for a record, never lost
            self.last_error = f"the consumer stopped: {error!r}"

    def _poll(self) -> None:
        from confluent_kafka import Consumer

        consumer = Consumer(self._config)
        try:
            consumer.subscribe([self.topic])
            while not self._stop.is_set():
                message = consumer.poll(0.2)
                if not self.assigned and consumer.assignment():
                    self.assigned = True
                if message is None:
                    continue
                error = message.error()
                if error is not None:
                    self.last_error = str(error)  # e.g. the topic's metadata not there yet: keep polling
                    if error.fatal():
                        raise RuntimeError(str(error))
                    continue
                raw_headers = message.headers() or []
                pairs = raw_headers.items() if isinstance(raw_headers, dict) else raw_headers
                headers = {k: v.decode() if isinstance(v, bytes) else (v or "") for k, v in pairs}
                key = message.key()
                value = message.value()
                record = FeedRecord(
                    key=key.decode() if isinstance(key, bytes) else str(key),
                    ce_type=headers.get("ce_type"),
                    data=json.loads(value) if value is not None else None,
                    raw=bytes(value) if value is not None else None,
                    partition=message.partition() or 0,
                    offset=message.offset() or 0,
                )
                with self._lock:
                    self._records.append(record)
        finally:
            consumer.close()


# --- signing in ----------------------------------------------------------------------------------


@dataclass
class Credential:
    """How one party of the journey signs in at the identity service, and the tokens it holds."""

    label: str
    #: The token request without its one-time parts: a password grant (``username``, ``password``)
    #: or a client credentials grant (``client_id``, ``client_secret``).
    grant: dict[str, str]
    #: Staff pass TOTP at every sign-in: the base32 secret their codes come from.
    totp_secret: str | None = None
    access_token: str = ""
    refresh_token: str | None = None
    #: ``time.monotonic()`` at which the access token expires.
    expires_at: float = 0.0

    @classmethod
    def password(cls, label: str, username: str, password: str, totp_secret: str | None = None) -> Credential:
        return cls(label, {"grant_type": "password", "username": username, "password": password}, totp_secret)

    @classmethod
    def client(cls, label: str, client_id: str, secret: str) -> Credential:
        return cls(label, {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret})

    @property
    def fresh(self) -> bool:
        return bool(self.access_token) and self.expires_at - time.monotonic() > REFRESH_MARGIN_S

    def forget(self) -> None:
        """The services refused the token (signed out, keys rotated away): sign in again."""
        self.access_token, self.refresh_token, self.expires_at = "", None, 0.0


# --- the journey ---------------------------------------------------------------------------------


class Journey:
    """The resident journey over the services' HTTP APIs and JAL's feed, printing each step."""

    def __init__(
        self,
        urls: Mapping[str, str],
        settings: Settings,
        mailbox: MailboxReader | None,
        *,
        printer: Printer | None = None,
        step_timeout: float = 30.0,
    ) -> None:
        missing = [name for name in SERVICES if name not in urls]
        if missing:
            raise ValueError(f"the journey needs every service; no URL for {', '.join(missing)}")
        self.urls = {name: url.rstrip("/") for name, url in urls.items()}
        self.settings = settings
        self.mailbox = mailbox
        self.printer = printer or _stdout
        self.step_timeout = step_timeout
        self.tag = _tag()
        self.town = municipality(SHIRAHAMA).full_name
        self.today = _today()
        self._step = 0
        self._title = "preparing"
        self._http: httpx.AsyncClient | None = None
        self._feed: PartnerFeed | None = None
        self._donated_before = 0
        self.result = JourneyResult(
            run_tag=self.tag,
            resident_a=self._person("A", "山田 花子", "ヤマダ ハナコ", "hanako.yamada", "131016", "1985-06-15"),
            resident_b=self._person("B", "鈴木 一郎", "スズキ イチロウ", "ichiro.suzuki", "271004", "1978-11-03"),
        )
        self.identity_url = self.urls["identity"]
        self._staff = Credential.password(
            f"{self.town.removeprefix('和歌山県')} staff", *STAFF_LOGIN, totp_secret=STAFF_TOTP_SECRET
        )
        self._admin = Credential.password("the admin", *ADMIN_LOGIN)
        self._jal = Credential.client("JAL", *JAL_CLIENT)
        self._payments = Credential.client("the payment provider", *PAYMENT_CLIENT)
        self._residents: dict[str, Credential] = {}

    def _person(
        self, label: str, name: str, kana: str, mailbox: str, legal_address: str, born: str
    ) -> ResidentFacts:
        # The resident id is the identity account's id, known once the resident signs up.
        return ResidentFacts(
            label=label, resident_id="", name=name, name_kana=kana, email=f"{mailbox}.{self.tag}@example.jp",
            member_number=_member_number(), legal_address_code=legal_address,
            phone=f"090-{secrets.randbelow(9000) + 1000}-{secrets.randbelow(9000) + 1000}", date_of_birth=born,
            address_there=f"和歌山県西牟婁郡白浜町{secrets.randbelow(900) + 100}番地 ({self.tag} {label})",
            password=f"demo-{secrets.token_urlsafe(12)}",
        )

    def sign_in_hints(self) -> list[str]:
        """Where and how to sign in by hand after the journey: one staff member, one resident."""
        staff, staff_password = TRY_STAFF_LOGIN
        a = self.result.resident_a
        console = self.urls.get("console")
        lines = [
            *([f"Try the pages at the console {console}/ (docs/console.md): staff at {console}/staff, "
               f"residents at {console}/my — the same sign-ins as below"] if console else []),
            f"Sign in yourself at the identity service {self.identity_url} (POST /oauth/token; docs/identity.md):",
            f"  {self.town} staff: {staff} / {staff_password} + a TOTP code for the secret {STAFF_TOTP_SECRET} "
            f"(python -c \"import pyotp; print(pyotp.TOTP('{STAFF_TOTP_SECRET}').now())\")",
        ]
        if a.resident_id:
            lines.append(f"  resident {a.label} ({a.name}): {a.email} / {a.password}")
        lines.append(
            f"  e.g. curl -X POST {self.identity_url}/oauth/token -d grant_type=password -d username={staff} "
            f"-d password={staff_password} -d totp=<code>"
        )
        return lines

    # -- running ------------------------------------------------------------------------------

    async def run(self) -> JourneyResult:
        started = time.monotonic()
        a, b = self.result.resident_a, self.result.resident_b
        self._say(f"Nichiiki demo — the resident journey with {self.town} (run {self.tag})")
        # a partner's consumer groups start with "<code>." (its ACLs allow no other)
        self._feed = PartnerFeed(self.settings, self.settings.topic(JAL_FEED), f"jal.demo-{self.tag}")
        self._feed.start()
        try:
            async with httpx.AsyncClient(timeout=15.0) as self._http:
                await self._sign_in_parties()
                await self._prepare_budget()
                await self._register(a, premium=True)
                await self._certify(a)
                await self._jal_receives_certificate(a)
                await self._grant_issued(a)
                await self._report_trips(a)
                await self._miles_credited(a)
                await self._register(b, premium=False)
                await self._certify(b)
                await self._grant_waitlisted(b)
                await self._donate()
                await self._waitlist_released(b)
                await self._plan_proposal()
                await self._inbox(a, A_INBOX)
                await self._inbox(b, B_INBOX)
                await self._emails(a, A_INBOX)
                await self._emails(b, B_INBOX)
        except JourneyError as error:
            self._say(f"✗ {error.step}. {error.title} — {error.detail}")
            raise
        finally:
            await self._feed.stop()
            numbers = {a.certificate_number, b.certificate_number} - {""}
            self.result.jal_feed = [r for r in self._feed.records() if certificate_of_key(r.key) in numbers]
        self.result.seconds = time.monotonic() - started
        self._say(
            f"The journey is complete ({self.result.seconds:.1f} s): 2 certificates, "
            f"{_miles(self.result.miles_credited)} credited to A, B's grant released by a ¥{DONATION_JPY:,} donation, "
            f"{len(a.inbox) + len(b.inbox)} inbox messages"
            + (f" and {len(a.emails) + len(b.emails)} e-mails." if self.result.emails_checked else ".")
        )
        return self.result

    # -- printing and failing ------------------------------------------------------------------

    def _say(self, line: str) -> None:
        self.result.lines.append(line)
        self.printer(line)

    def _begin(self, title: str) -> None:
        self._step += 1
        self._title = title

    def _done(self, line: str) -> None:
        self._say(f"✓ {self._step}. {line}")

    def _fail(self, detail: str) -> JourneyError:
        return JourneyError(self._step, self._title, detail)

    # -- HTTP ----------------------------------------------------------------------------------

    def _resident_token(self, who: ResidentFacts) -> Credential:
        credential = self._residents.get(who.label)
        if credential is None:
            raise self._fail(f"{who.label} has not signed up yet")
        return credential

    async def _call(
        self, method: str, service: str, path: str, token: Credential, body: object = None,
        ok: tuple[int, ...] = (200, 201), idempotency_key: str | None = None,
    ) -> httpx.Response:
        assert self._http is not None
        url = f"{self.urls[service]}/v1{path}"
        for attempt in (1, 2):
            headers = {"Authorization": f"Bearer {await self._bearer(token)}"}
            if idempotency_key is not None:
                headers["Idempotency-Key"] = idempotency_key
            try:
                response = await self._http.request(method, url, json=body, headers=headers)
            except httpx.HTTPError as error:
                raise self._fail(f"{service} did not answer {method} {path}: {error!r}") from error
            if response.status_code != 401 or 401 in ok or attempt == 2:
                break
            token.forget()  # e.g. the session was signed out meanwhile: sign in again, once
        if response.status_code not in ok:
            raise self._fail(f"{service} answered {response.status_code} to {method} {path}: {_problem(response)}")
        return response

    async def _json(
        self, method: str, service: str, path: str, token: Credential, body: object = None,
        ok: tuple[int, ...] = (200, 201), idempotency_key: str | None = None,
    ) -> Any:
        return (await self._call(method, service, path, token, body, ok, idempotency_key)).json()

    # -- signing in -----------------------------------------------------------------------------

    async def _oauth(self, form: dict[str, str]) -> httpx.Response:
        """``POST /oauth/token`` (form-encoded), waiting out a sign-in rate limit (429 Retry-After)."""
        assert self._http is not None
        deadline = time.monotonic() + SIGN_IN_PATIENCE_S
        while True:
            try:
                response = await self._http.post(f"{self.identity_url}/oauth/token", data=form)
            except httpx.HTTPError as error:
                raise self._fail(f"the identity service did not answer POST /oauth/token: {error!r}") from error
            wait = float(response.headers.get("retry-after", "1") or 1)
            if response.status_code != 429 or time.monotonic() + wait > deadline:
                return response
            await asyncio.sleep(wait)

    def _signed_in(self, credential: Credential, response: httpx.Response) -> None:
        answer = response.json()
        if answer.get("totp_enrolment_required"):
            raise self._fail(f"{credential.label} must enrol TOTP first: the account has no TOTP secret")
        credential.access_token = str(answer["access_token"])
        credential.refresh_token = answer.get("refresh_token")
        credential.expires_at = time.monotonic() + float(answer.get("expires_in", 900))

    def _refused(self, credential: Credential, response: httpx.Response) -> JourneyError:
        who = credential.grant.get("username") or credential.grant.get("client_id")
        hint = (
            " — the demo signs in with the development credentials the identity service seeds with "
            "NICHIIKI_ENV=development (docs/identity.md)" if response.status_code in (400, 401) else ""
        )
        return self._fail(
            f"the identity service refused {credential.label} ({who}): {response.status_code} {_oauth_error(response)}"
            f"{hint}"
        )

    async def _sign_in(self, credential: Credential) -> None:
        """A new sign-in: the grant as it is, or, for staff, with the TOTP code of the current step. A
        code is good once per account, so when an earlier sign-in (the last run of the demo) spent this
        step, the next step's code, which the provider accepts too, and if need be the one after that."""
        if credential.totp_secret is None:
            response = await self._oauth(credential.grant)
            if response.status_code != 200:
                raise self._refused(credential, response)
            self._signed_in(credential, response)
            return
        totp = pyotp.TOTP(credential.totp_secret)
        step = int(time.time()) // TOTP_STEP_S
        for _ in range(3):
            # The provider accepts a step either side of now: wait until this one is the next at most.
            early = step * TOTP_STEP_S - TOTP_STEP_S - time.time()
            if early > 0:
                await asyncio.sleep(early + 0.5)
            response = await self._oauth({**credential.grant, "totp": totp.at(step * TOTP_STEP_S)})
            if response.status_code == 200:
                self._signed_in(credential, response)
                return
            if "totp" not in _oauth_error(response).lower():
                break  # not the code: the password, a lock, the account
            step += 1
        raise self._refused(credential, response)

    async def _bearer(self, credential: Credential) -> str:
        """A live access token: the one held, else a refreshed one, else a new sign-in."""
        if credential.fresh:
            return credential.access_token
        if credential.refresh_token:
            response = await self._oauth({"grant_type": "refresh_token", "refresh_token": credential.refresh_token})
            if response.status_code == 200:
                self._signed_in(credential, response)
                return credential.access_token
            credential.forget()  # the session ended (30 days, 12 hours for staff): sign in again
        await self._sign_in(credential)
        return credential.access_token

    async def _sign_in_parties(self) -> None:
        self._title = "signing in at the identity service"
        for credential in (self._staff, self._jal):
            await self._bearer(credential)
        self._say(
            f"· signed in at the identity service {self.identity_url}: {self._staff.label} "
            f"{STAFF_LOGIN[0]} (password + TOTP), JAL {JAL_CLIENT[0]} (client credentials)"
        )

    async def _sign_up(self, who: ResidentFacts) -> Credential:
        """The resident's own account at the identity service; its id is their resident id everywhere."""
        assert self._http is not None
        try:
            response = await self._http.post(
                f"{self.identity_url}/v1/accounts/residents", json={"email": who.email, "password": who.password},
                headers={"Idempotency-Key": f"demo-{self.tag}-{who.label}-sign-up"},
            )
        except httpx.HTTPError as error:
            raise self._fail(f"the identity service did not answer the sign-up: {error!r}") from error
        if response.status_code != 201:
            raise self._fail(f"the identity service answered {response.status_code} to the sign-up: "
                             f"{_problem(response)}")
        who.resident_id = str(response.json()["account_id"])
        credential = self._residents[who.label] = Credential.password(
            f"resident {who.label}", who.email, who.password
        )
        await self._bearer(credential)
        subject = _subject(credential.access_token)
        if subject != who.resident_id:
            raise self._fail(f"{who.label}'s token names {subject!r}, not the account {who.resident_id}")
        self._say(f"· {who.label} signed up at the identity service ({who.email}) and signed in: resident id "
                  f"{who.resident_id}")
        return credential

    async def _until(self, what: str, check: Callable[[], Awaitable[tuple[T | None, str]]]) -> T:
        """Poll ``check`` (→ the outcome or None, and what it saw) until the outcome shows."""
        deadline = time.monotonic() + self.step_timeout
        delay = 0.05
        seen = "nothing yet"
        while True:
            outcome, seen = await check()
            if outcome is not None:
                return outcome
            if time.monotonic() > deadline:
                raise self._fail(f"{what} did not happen within {self.step_timeout:g} s (last seen: {seen})")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    # -- the steps -----------------------------------------------------------------------------

    async def _prepare_budget(self) -> None:
        """The 白浜町 JAL program must fund exactly one resident for B to wait: a fresh platform does;
        after an earlier run, top it up to one grant's worth (it never holds more unless someone added it)."""
        self._title = "the JAL program's budget"
        program = await self._json("GET", "subsidy", f"/programs/{JAL_PROGRAM}", self._staff)
        value, available, waiting = _budget(program)
        if waiting or available < value:
            amount = value * waiting + value - available
            await self._json(
                "POST", "subsidy", f"/programs/{JAL_PROGRAM}/budget", self._staff,
                {"unit": "miles", "amount": amount, "reason": f"demo {self.tag}: fund exactly one resident"},
                idempotency_key=f"demo-{self.tag}-budget",
            )
            self.result.budget_topped_up = amount
            program = await self._json("GET", "subsidy", f"/programs/{JAL_PROGRAM}", self._staff)
            value, available, waiting = _budget(program)
            self._say(f"· an earlier run used the budget: 白浜町 staff topped it up by {_miles(amount)}")
        if available != value or waiting:
            raise self._fail(
                f"the program has {_miles(available)} available and {waiting} grants waiting; the demo shows the "
                f"waitlist only when it funds exactly one resident ({_miles(value)}): run it on a fresh platform"
            )
        self._say(
            f"· {self.town}'s JAL mileage program ({JAL_PROGRAM}): {_miles(available)} available — "
            f"exactly one resident's grant of {_miles(value)}"
        )

    async def _register(self, who: ResidentFacts, *, premium: bool) -> None:
        self._begin(f"{who.label} registers with {self.town}")
        token = await self._sign_up(who)
        await self._json("POST", "registration", "/residents", token, {
            "name": who.name, "name_kana": who.name_kana, "email": who.email, "phone": who.phone,
            "date_of_birth": who.date_of_birth,
            "legal_address_code": who.legal_address_code, "preferred_language": "ja",
            "consents": [{"purpose": "email"}, {"purpose": "share_certificate", "partner": "jal"}],
        }, idempotency_key=f"demo-{self.tag}-{who.label}-account")
        registration = await self._json(
            "POST", "registration", f"/residents/{who.resident_id}/registrations", token,
            {"municipality_code": SHIRAHAMA, "tier": "basic"}, idempotency_key=f"demo-{self.tag}-{who.label}-basic",
        )
        who.registration_id = registration["id"]
        prefecture = municipality(registration["prefecture_code"]).full_name
        self._done(
            f"{who.name} (resident {who.label}, lives in {municipality(who.legal_address_code).full_name}) registered "
            f"with {self.town}: basic, {registration['status']} (and with {prefecture}); consents: e-mail, "
            "share the certificate with JAL"
        )
        if not premium:
            return

        self._begin(f"{who.label} asks for premium")
        # Premium activities are the town's designated ones: read its public catalogue and pick three.
        catalogue = await self._json("GET", "registration", f"/public/municipalities/{SHIRAHAMA}/activities", token)
        entries = {entry["id"]: entry for entry in catalogue["items"]}
        wanted = [f"{SHIRAHAMA}-{code}" for code in DEMO_ACTIVITIES]
        picked = [entries[i] for i in wanted if i in entries]
        picked += [entry for i, entry in entries.items() if i not in wanted][: 3 - len(picked)]
        if len(picked) < 3:
            raise self._fail(f"{self.town} publishes {len(entries)} designated activities; premium needs 3")
        activities = [
            {"activity_id": entry["id"], "date": (self.today - timedelta(days=days)).isoformat(),
             # evidence where the town asks for it: a reference to the photo the app uploaded
             "document_ref": f"demo-{self.tag}-photo-{n}" if entry["evidence_required"] else None}
            for n, (entry, days) in enumerate(zip(picked, (20, 55, 110), strict=False))
        ]
        names = [entry["name_ja"] for entry in picked]
        upgrade = await self._json(
            "POST", "registration", f"/residents/{who.resident_id}/registrations", token, {
                "municipality_code": SHIRAHAMA, "tier": "premium",
                # The development identity-verification provider's signed attestation of a JPKI check
                # (registration trusts its key only with NICHIIKI_ENV=development).
                "attestation": attest(who.resident_id, "jpki", verified_at=datetime.now(UTC) - timedelta(minutes=3)),
                "activities": activities,
            }, idempotency_key=f"demo-{self.tag}-{who.label}-premium",
        )
        if upgrade["id"] != who.registration_id or upgrade.get("awaiting_review") is None:
            raise self._fail(f"expected the basic registration to await review as an upgrade, got {upgrade}")
        self._done(
            f"{who.label} asked for premium: JPKI identity verified (signed attestation), 3 of the town's designated "
            f"activities ({'、'.join(names)}) — awaiting {self.town}'s review"
        )

        self._begin(f"{self.town} staff approve the premium registration")
        queue = await self._json(
            "GET", "registration", f"/registrations?municipality={SHIRAHAMA}&awaiting_review=true&limit=200",
            self._staff,
        )
        if who.registration_id not in {item["id"] for item in queue["items"]} and queue["total"] <= 200:
            raise self._fail(f"the registration {who.registration_id} is not in the staff's review queue")
        approved = await self._json(
            "POST", "registration", f"/registrations/{who.registration_id}/approve", self._staff,
            idempotency_key=f"demo-{self.tag}-{who.label}-approve",
        )
        who.premium_valid_until = approved["valid_until"]
        self._done(f"{self.town.removeprefix('和歌山県')} staff approved the premium registration "
                   f"(valid until {approved['valid_until']})")

    async def _certify(self, who: ResidentFacts) -> None:
        token = self._resident_token(who)
        self._begin(f"{who.label} applies for dual-resident certification")
        await self._notification_knows(who)
        body = {
            "municipality_code": SHIRAHAMA, "planned_stay_days": 90, "housing_basis": "rented",
            "address_there": who.address_there, "primary_residence_code": who.legal_address_code,
            "partners": [{"partner": "jal", "member_number": who.member_number}],
        }
        waited: list[str] = []

        async def submitted() -> tuple[dict[str, Any] | None, str]:
            response = await self._call(
                "POST", "certification", "/applications", token, body, ok=(201, 409, 422),
                idempotency_key=f"demo-{self.tag}-{who.label}-application",
            )
            if response.status_code == 201:
                return response.json(), "submitted"
            code = _problem_code(response)
            # The registration's events are still on their way to the certification service. It answers
            # 409 resident-not-yet-known, or, when the consent events (published at account creation)
            # arrived first, 422 registration-required / partner-consent-missing: retry those too.
            if code in ("resident-not-yet-known", "registration-required", "partner-consent-missing"):
                waited.append(code)
                return None, f"{response.status_code} {code}"
            raise self._fail(f"certification answered {response.status_code}: {_problem(response)}")

        application = await self._until("the application", submitted)
        who.application_id = application["application_id"]
        note = (
            f" — after {len(waited)} {'retry' if len(waited) == 1 else 'retries'} ({_kinds(waited)}): "
            "the registration was still on its way"
            if waited else ""
        )
        self._done(
            f"{who.label} applied for dual-resident certification with {self.town} (90 days a year, rented; "
            f"JAL Mileage Bank {who.member_number}){note}"
        )

        self._begin(f"{self.town} staff approve the application")
        queue = await self._json("GET", "certification", f"/applications?municipality={SHIRAHAMA}&limit=200",
                                 self._staff)
        if who.application_id not in {item["application_id"] for item in queue["items"]} and queue["total"] <= 200:
            raise self._fail(f"the application {who.application_id} is not in the staff's review queue")
        certificate = await self._json(
            "POST", "certification", f"/applications/{who.application_id}/approve", self._staff,
            idempotency_key=f"demo-{self.tag}-{who.label}-certify",
        )
        who.certificate_number = certificate["certificate_number"]
        who.certificate_valid_from = certificate["valid_from"]
        who.certificate_valid_until = certificate["valid_until"]
        self._done(
            f"{self.town.removeprefix('和歌山県')} staff approved: certificate {who.certificate_number}, valid "
            f"{certificate['valid_from']} to {certificate['valid_until']}"
        )

    async def _notification_knows(self, who: ResidentFacts) -> None:
        """Wait until the notification service has the resident's contact (their registration_confirmed).

        Works around a notification race: it consumes the registration and application topics in one
        batch with no order between them, and an application handled before the registration finds no
        contact, so its e-mail is never sent (and the inbox message has a generic greeting).
        """
        token = self._resident_token(who)

        async def confirmed() -> tuple[bool | None, str]:
            page = await self._json("GET", "notification", f"/residents/{who.resident_id}/notifications", token)
            kinds = [item["kind"] for item in page["items"]]
            return ("registration_confirmed" in kinds or None), _kinds(kinds) or "no message yet"

        await self._until(f"{who.label}'s registration confirmed in the inbox", confirmed)

    async def _feed_records(self, who: ResidentFacts, what: str, match: Callable[[FeedRecord], bool]) -> FeedRecord:
        feed = self._feed
        assert feed is not None

        async def seen() -> tuple[FeedRecord | None, str]:
            records = [r for r in feed.records() if certificate_of_key(r.key) == who.certificate_number]
            for record in records:
                if match(record):
                    return record, "found"
            state = "joined the group" if feed.assigned else "still joining its consumer group"
            error = f", last client error: {feed.last_error}" if feed.last_error else ""
            return None, f"JAL's consumer {state}, {len(records)} records about {who.certificate_number}{error}"

        return await self._until(f"{what} on JAL's feed", seen)

    async def _jal_receives_certificate(self, who: ResidentFacts) -> None:
        self._begin("JAL's feed receives the certificate")
        record = await self._feed_records(
            who, "the certificate", lambda r: r.ce_type == PartnerCertificate.event_type and r.data is not None
        )
        data = record.data or {}
        try:
            PartnerCertificate.model_validate(data)  # what JAL's client checks against the published schema
        except ValueError as error:
            raise self._fail(f"JAL's record does not fit {PartnerCertificate.event_type}: {error}") from error
        extra = set(data) - PARTNER_RECORD_FIELDS
        raw = (record.raw or b"").decode()
        # The member number too: it is sealed for JAL (opened with GET /v1/keys/{kid}, docs/partners.md).
        leaked = [value for value in (who.name, who.email, who.resident_id, who.name_kana, who.member_number)
                  if value in raw]
        if extra or leaked:
            raise self._fail(f"JAL's record carries more than it may: fields {sorted(extra)}, values {leaked}")
        sealed = data.get("member_number") or {}
        if sealed.get("kid") != f"partner:jal:{data.get('resident_ref')}":
            raise self._fail(f"JAL's record has no member number sealed for JAL: {sealed!r}")
        group = self._feed.group if self._feed else ""
        self._done(
            f"JAL's own consumer (group {group}) read the certificate from {self.settings.topic(JAL_FEED)}: "
            f"{data['certificate_number']} {data['status']}, resident_ref {str(data['resident_ref'])[:12]}…, "
            f"JAL Mileage Bank number sealed for JAL — no name, address, e-mail or resident id"
        )

    async def _grant(self, who: ResidentFacts, status: str) -> dict[str, Any]:
        token = self._resident_token(who)

        async def grant() -> tuple[dict[str, Any] | None, str]:
            page = await self._json("GET", "subsidy", f"/residents/{who.resident_id}/grants", token)
            grants = [g for g in page["items"] if g["program_id"] == JAL_PROGRAM]
            for item in grants:
                if item["status"] == status:
                    return item, status
            return None, ", ".join(g["status"] for g in grants) or "no grant yet"

        found = await self._until(f"a {status} JAL grant for {who.label}", grant)
        who.grant_id = found["grant_id"]
        if not who.grant_states or who.grant_states[-1] != status:
            who.grant_states.append(status)
        return found

    async def _grant_issued(self, who: ResidentFacts) -> None:
        self._begin(f"the subsidy service grants {who.label} the JAL mileage program")
        grant = await self._grant(who, "issued")
        on_feed = await self._feed_records(who, "the grant", _grant_record("issued"))
        if (on_feed.data or {}).get("grant_id") != grant["grant_id"]:
            raise self._fail(f"JAL's feed names grant {(on_feed.data or {}).get('grant_id')}, not {grant['grant_id']}")
        self._done(
            f"The subsidy service granted {who.label} the JAL mileage program: {_miles(grant['value'])} reserved "
            f"for {ROUND_TRIPS} round trips by {grant['window_until']} (JAL's feed has the grant too)"
        )

    async def _report_trips(self, who: ResidentFacts) -> None:
        for n in range(1, ROUND_TRIPS + 1):
            self._begin(f"JAL reports round trip {n} of {ROUND_TRIPS}")
            answer = await self._json("POST", "subsidy", "/redemptions", self._jal, {
                "grant_id": who.grant_id, "certificate_number": who.certificate_number,
                "trip_id": f"JL-{self.tag}-{who.label}-{n}", "trip_kind": "round_trip",
                "travelled_on": self.today.isoformat(),
            }, ok=(201,))
            self.result.trips.append(answer)
            if not answer["accepted"]:
                raise self._fail(f"the trip was refused: {answer['reason']} ({answer['detail']})")
            outcome = (
                f"grant completed, {_miles(answer['amount'])} to credit" if answer["completed"]
                else f"{answer['trips_counted']} of {2 * ROUND_TRIPS} one-way legs counted"
            )
            self._done(f"JAL reported round trip {n} of {ROUND_TRIPS} (羽田 ⇄ 南紀白浜, {self.today}): accepted — "
                       f"{outcome}")

    async def _miles_credited(self, who: ResidentFacts) -> None:
        self._begin("the miles are credited")
        grant = await self._grant(who, "completed")
        credited = [t for t in self.result.trips if t["amount"] > 0]
        if len(credited) != 1 or not credited[0]["completed"]:
            raise self._fail(f"expected one crediting answer, got {credited}")
        await self._feed_records(
            who, "the redeemed grant",
            lambda r: r.ce_type == PartnerGrant.event_type and (r.data or {}).get("state") == "redeemed"
            and ((r.data or {}).get("amount") or 0) > 0,
        )
        self.result.miles_credited = int(grant["drawn"])
        self._done(
            f"{_miles(grant['drawn'])} credited to the resident's JAL Mileage Bank account, "
            f"once: the grant is {grant['status']} ({grant['legs_counted']} legs), and JAL's feed shows the redemption"
        )

    async def _grant_waitlisted(self, who: ResidentFacts) -> None:
        self._begin(f"{who.label}'s grant waits for budget")
        await self._grant(who, "waitlisted")
        await self._feed_records(who, "the waitlisted grant", _grant_record("waitlisted"))
        program = await self._json("GET", "subsidy", f"/programs/{JAL_PROGRAM}", self._staff)
        _, available, waiting = _budget(program)
        self._done(
            f"{who.label} got certificate {who.certificate_number}, but the JAL grant is WAITLISTED "
            f"({waiting} waiting): the program has {_miles(available)} left (JAL's feed says so too)"
        )

    async def _donated_miles(self) -> int:
        """Miles the program's ledger has credited from donations so far."""
        program = await self._json("GET", "subsidy", f"/programs/{JAL_PROGRAM}", self._staff)
        by_kind: dict[str, int] = next(
            (b["ledger"]["by_kind"] for b in program["budgets"] if b["unit"] == "miles"), {}
        )
        return int(by_kind.get("donation", 0))

    async def _donate(self) -> None:
        self._begin("a hometown-tax donation for the program")
        self._donated_before = await self._donated_miles()
        confirmation = {
            "payment_reference": f"demo-{self.tag}-furusato-nozei", "municipality_code": SHIRAHAMA,
            "kind": "hometown_tax", "amount": DONATION_JPY, "earmark": "dual_residence",
            "payment_date": self.today.isoformat(),
            "donor": {"type": "individual", "name": "紀州 梅子", "address": "大阪府大阪市北区梅田一丁目"},
        }
        # The payment provider confirms payments; where the donation service still admits only the
        # admin (403 to the provider), the admin does.
        response = await self._call("POST", "donation", "/donations", self._payments, confirmation,
                                    ok=(200, 201, 403))
        if response.status_code == 403:
            response = await self._call("POST", "donation", "/donations", self._admin, confirmation)
        donation = response.json()
        self.result.donation_id = donation["id"]
        self.result.receipt_number = donation.get("receipt_number")
        self._done(
            f"紀州 梅子 gave ¥{DONATION_JPY:,} in hometown tax to {self.town}, earmarked dual residence "
            f"(receipt {donation.get('receipt_number')})"
        )

    async def _waitlist_released(self, who: ResidentFacts) -> None:
        self._begin(f"the donation releases {who.label}'s grant")
        grant = await self._grant(who, "issued")
        await self._feed_records(who, "the released grant", _grant_record("issued"))
        self.result.donation_miles = await self._donated_miles() - self._donated_before
        self._done(
            f"The donation raised the budget by {_miles(self.result.donation_miles)} (¥{DONATION_JPY:,} at "
            f"¥{DONATION_JPY // max(self.result.donation_miles, 1)} a mile) and released {who.label}'s grant: issued, "
            f"{_miles(grant['value'])} reserved"
        )

    async def _plan_proposal(self) -> None:
        """A support corporation the town designated proposes a change to its 特定居住促進計画 (staff record
        what it submitted), and the town's manager answers, as the act requires."""
        self._begin("a support corporation proposes a plan change; the town answers")
        corporations = await self._json("GET", "planning", f"/municipalities/{SHIRAHAMA}/corporations", self._staff)
        designated = [c for c in corporations["items"] if c["status"] == "designated"]
        jal = [c for c in designated if c["name"] == "日本航空(株)"]
        corporation = (jal or designated or [None])[0]
        plans = await self._json("GET", "planning", f"/municipalities/{SHIRAHAMA}/plans", self._staff)
        plan = next((p for p in plans["items"] if p["level"] == "municipality" and p["status"] in (
            "adopted", "amended")), None)
        if corporation is None or plan is None:
            raise self._fail(f"{self.town} has no designated support corporation or no adopted plan in planning")
        proposal = await self._json(
            "POST", "planning", f"/corporations/{corporation['corporation_id']}/proposals", self._staff,
            {"kind": "change", "plan_id": plan["plan_id"],
             "summary": f"拠点施設に空港からの移動手段を加える (demo {self.tag})"},
        )
        answered = await self._json(
            "POST", "planning", f"/proposals/{proposal['proposal_id']}/answer", self._staff,
            {"decision": "accepted", "reason_code": "will_amend_plan"},
        )
        self._done(
            f"{corporation['name']} proposed a change to {self.town}'s {plan['name']} (answer due "
            f"{proposal['due_on']}); the town {answered['status']} it ({answered['answer_reason']})"
        )

    async def _inbox(self, who: ResidentFacts, expected: Mapping[str, int]) -> None:
        token = self._resident_token(who)
        self._begin(f"{who.label}'s in-app inbox")

        async def inbox() -> tuple[list[str] | None, str]:
            page = await self._json("GET", "notification", f"/residents/{who.resident_id}/notifications?limit=100",
                                    token)
            kinds = [item["kind"] for item in reversed(page["items"])]
            return (kinds if _covers(kinds, expected) else None), _kinds(kinds) or "empty"

        who.inbox = await self._until(f"every message in {who.label}'s inbox ({_kinds(_expand(expected))})", inbox)
        self._done(f"{who.label}'s inbox has {len(who.inbox)} messages: {_kinds(who.inbox, expected)}")

    async def _emails(self, who: ResidentFacts, expected: Mapping[str, int]) -> None:
        self._begin(f"{who.label}'s e-mails")
        reader = self.mailbox
        if reader is None:
            self._done(f"{who.label}'s e-mails go to the SMTP server in NICHIIKI_SMTP_URL, not the local sink: "
                       "not checked here")
            return

        async def mails() -> tuple[list[str] | None, str]:
            messages = await asyncio.to_thread(reader)
            kinds = [str(m.get("X-Nichiiki-Template", "?")) for m in messages if _addressed_to(m, who.email)]
            return (kinds if _covers(kinds, expected) else None), _kinds(kinds) or "none"

        who.emails = await self._until(f"every e-mail to {who.email} in the SMTP sink", mails)
        self.result.emails_checked = True
        self._done(f"{len(who.emails)} e-mails to {who.email} in the SMTP sink: {_kinds(who.emails, expected)}")


# --- helpers -------------------------------------------------------------------------------------


def _oauth_error(response: httpx.Response) -> str:
    """An OAuth error answer (``error``, ``error_description``), or a problem, in a few words."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict) and "error" in body:
        return f"{body['error']}: {body.get('error_description', '')}"
    return _problem(response)


def _subject(token: str) -> str:
    """The ``sub`` of a token (read, not verified: the services verify it)."""
    try:
        claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    except (IndexError, ValueError):
        return ""
    return str(claims.get("sub", "")) if isinstance(claims, dict) else ""


def _problem_code(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    return str(body.get("code", "")) if isinstance(body, dict) else ""


def _problem(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict) and "code" in body:
        return f"{body['code']}: {body.get('detail') or body.get('title')}"
    return json.dumps(body, ensure_ascii=False)[:300]


def _budget(program: dict[str, Any]) -> tuple[int, int, int]:
    """The program's grant value, the miles still available, and how many grants wait."""
    miles = next((b for b in program["budgets"] if b["unit"] == "miles"), None)
    available = int(miles["available"]) if miles else 0
    return int(program["grant_value"]), available, int(program["grants"].get("waitlisted", 0))


def _grant_record(state: str) -> Callable[[FeedRecord], bool]:
    return lambda r: r.ce_type == PartnerGrant.event_type and (r.data or {}).get("state") == state


def _expand(expected: Mapping[str, int]) -> list[str]:
    return [kind for kind, n in expected.items() for _ in range(n)]


def _covers(kinds: list[str], expected: Mapping[str, int]) -> bool:
    counted = Counter(kinds)
    return all(counted[kind] >= n for kind, n in expected.items())


def _addressed_to(message: EmailMessage, address: str) -> bool:
    fields = [str(message.get(name, "")) for name in ("To", "X-Envelope-To")]
    return any(found.lower() == address.lower() for _, found in getaddresses(fields))


# --- against the running platform ----------------------------------------------------------------


def run_demo(settings: Settings, printer: Printer | None = None) -> int:
    """The journey on the platform ``nichiiki start`` runs (its services, broker and SMTP sink)."""
    from shared.cli.platform import read_run_file, settings_for_running_platform
    from shared.stack.smtp_sink import read_mailbox

    running = read_run_file(settings)
    if running is None:
        sys.stderr.write(
            f"the platform is not running (no live launcher in {settings.state_dir / 'run.json'}): "
            "start it with `./nichiiki start`, or `./nichiiki start --demo` to start it and run the demo\n"
        )
        return 1
    urls = {name: str(info["url"]) for name, info in running["services"].items()}
    missing = [name for name in SERVICES if name not in urls]
    if missing:
        sys.stderr.write(f"the running platform has no {', '.join(missing)} service: the demo needs every service\n")
        return 1
    mailbox_dir = Path(running["mailbox"]) if running.get("servers", {}).get("smtp") else None

    def mailbox() -> list[EmailMessage]:
        assert mailbox_dir is not None
        return read_mailbox(mailbox_dir)

    journey = Journey(
        urls, settings_for_running_platform(settings), mailbox if mailbox_dir is not None else None, printer=printer
    )
    try:
        asyncio.run(journey.run())
    except JourneyError as error:
        sys.stderr.write(f"the demo stopped at {error}\n")
        return 1
    for line in journey.sign_in_hints():
        journey.printer(line)
    return 0
