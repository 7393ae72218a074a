"""Bad HTTP input, schema-driven: schemathesis against every service's own OpenAPI.

Each service runs in-process (``service_client``, its consumers and relay included) on database
and topic prefixes of its own, so nothing else writes to its database during the run. For every
operation of its OpenAPI document, schemathesis generates cases from the schema (positive: data
that fits, negative: data that does not) and each case is sent to the app with the bearer token
of one of four principals, in turn: admin, staff of 304018 (白浜町), a resident (whose id is the
path's ``resident_id`` when there is one, so ownership checks pass and the body is looked at),
and partner JAL. For every answer:

- no 5xx, ever;
- every 4xx is ``application/problem+json`` with a ``code``;
- a rejected (4xx) request changed nothing: every table of the service's database, and its outbox
  (by row count and last id: the relay marks rows published in the background), has the same
  content fingerprint after the call as before it. The fingerprint is taken after every call
  (the "after" of one call is the "before" of the next), so every rejected call is checked.

Cases are generated first (hypothesis, seeded: the seed is in every failure message and
``NICHIIKI_FUZZ_SEED`` replays it; ``NICHIIKI_FUZZ_EXAMPLES`` sets the examples per operation and
mode) and then sent from the test's event loop, where the app and its database pool live;
schemathesis' own ASGI transport would start the app a second time on an event loop of its own.
Generation therefore takes no feedback from the answers, and a failure is reported with its curl
command, not shrunk. Operations whose schema cannot be broken (no body, no query, only free strings
in the path) get positive cases only.

Every positive case is also sent once more carrying something PostgreSQL cannot store (hypothesis
seldom generates it within a few examples): a NUL in a string of the body, of the query or of a
path parameter, or an int beyond a ``bigint`` in the body. That one must be refused (4xx, a problem,
nothing changed), never accepted and never a 5xx.

What the fuzz and people found is pinned down by the targeted tests at the end of the file.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, seed
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import HypothesisException
from schemathesis import Case as AnyCase
from schemathesis import GenerationMode

import shared.kit.http
from shared.contracts.topics import FRONTS, SERVICES
from shared.kit.auth import Role, mint_token
from shared.kit.settings import Settings
from shared.stack.backends import Backends
from tests.conftest import make_settings
from tests.support import service_client

pytestmark = [pytest.mark.stack, pytest.mark.timeout(180)]

SEED = int(os.environ.get("NICHIIKI_FUZZ_SEED") or random.randrange(10**9))
#: Examples per operation and generation mode (keeps the whole file within its time budget).
EXAMPLES = int(os.environ.get("NICHIIKI_FUZZ_EXAMPLES", "8"))
SHIRAHAMA = "304018"
PROBLEM_JSON = "application/problem+json"


def build_app(service: str, settings: Settings) -> FastAPI:
    """The service with its background schedules slowed down: nothing but the requests writes."""
    if service == "registration":
        from services.registration.main import create_app as registration_app

        return registration_app(settings, maintenance_interval_s=3600)
    if service == "certification":
        from services.certification.main import CertificationConfig
        from services.certification.main import create_app as certification_app

        return certification_app(settings, config=CertificationConfig(expiry_interval_s=3600))
    if service == "subsidy":
        from services.subsidy.config import SubsidySettings
        from services.subsidy.main import create_app as subsidy_app

        return subsidy_app(settings, SubsidySettings(sweep_interval_s=3600))
    if service == "donation":
        from services.donation.main import create_app as donation_app

        return donation_app(settings)
    if service == "notification":
        from services.notification.main import create_app as notification_app

        return notification_app(settings)
    if service == "planning":
        from services.planning.main import create_app as planning_app

        return planning_app(settings)
    if service == "listings":
        from services.listings.main import ListingsConfig
        from services.listings.main import create_app as listings_app

        return listings_app(settings, config=ListingsConfig(sweep_interval_s=3600))
    if service == "insights":
        from services.insights.main import create_app as insights_app

        return insights_app(settings)
    if service == "identity":
        from services.identity.main import create_app as identity_app

        return identity_app(settings)
    if service != "partner_gateway":
        raise ValueError(f"no app builder for {service}")
    from services.partner_gateway.main import create_app as gateway_app

    return gateway_app(settings)


# --- Cases -----------------------------------------------------------------------------------------


Case = AnyCase[Any]


def negatable(operation: Any) -> bool:
    """Whether the schema can be broken at all: a body, a query, or a constrained path parameter.
    (A free string in the path or a header is never wrong by the schema, and hypothesis would search
    for seconds before giving up.)"""
    if list(operation.body):
        return True
    for parameter in operation.iter_parameters():
        if parameter.location.value == "query":
            return True
        if parameter.location.value == "path" and set(parameter.definition.get("schema", {})) - {"type", "title"}:
            return True
    return False


def generate(schema: Any, mode: GenerationMode) -> list[Case]:
    """Up to EXAMPLES cases of every operation in ``mode``."""
    cases: list[Case] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and not negatable(operation):
            continue

        @seed(SEED)
        @hypothesis_settings(
            max_examples=EXAMPLES, database=None, deadline=None, phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(operation.as_strategy(generation_mode=mode))
        def collect(case: Case) -> None:
            cases.append(case)

        # Unsatisfiable: the schema admits nothing negative for this operation
        with contextlib.suppress(HypothesisException):
            collect()
    return cases


PRINCIPALS = ("admin", "staff", "resident", "partner")


def token_for(settings: Settings, case: Case, index: int) -> str:
    role = PRINCIPALS[index % len(PRINCIPALS)]
    path = case.path_parameters or {}
    subject = str(path["resident_id"]) if role == "resident" and "resident_id" in path else f"{role}-{index}"
    return mint_token(
        settings, subject=subject, role=Role(role),
        municipality=SHIRAHAMA if role == "staff" else None, partner="jal" if role == "partner" else None,
    )


def request_of(case: Case, token: str) -> dict[str, Any] | None:
    """httpx keyword arguments for the case, or None when no HTTP client could send it."""
    kwargs = case.as_transport_kwargs(base_url="http://service")
    headers = {k: v for k, v in (kwargs.get("headers") or {}).items() if k not in ("Connection", "Accept-Encoding")}
    headers["Authorization"] = f"Bearer {token}"
    try:
        for name, value in headers.items():  # HTTP/1.1 header values are latin-1
            name.encode("ascii")
            str(value).encode("latin-1")
    except UnicodeEncodeError:
        return None
    request: dict[str, Any] = {
        "method": kwargs["method"], "url": kwargs["url"], "headers": headers, "params": kwargs.get("params") or None,
    }
    if "json" in kwargs:
        request["content"] = json.dumps(kwargs["json"]).encode()
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        request["content"] = data if isinstance(data, bytes) else str(data).encode()
    return request


NUL = "\x00"
#: One past each end of PostgreSQL's bigint.
BEYOND_BIGINT = (2**63, -(2**63) - 1)


def with_nul(value: object) -> str:
    text = str(value[0] if isinstance(value, list) and value else value)
    return text[: len(text) // 2] + NUL + text[len(text) // 2:]


def leaves(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every scalar of a JSON document, with where it is."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, (*at, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaves(item, (*at, index))
    else:
        yield at, value


def replaced(document: Any, at: tuple[Any, ...], value: Any) -> Any:
    document = copy.deepcopy(document)
    if not at:
        return value
    container = document
    for step in at[:-1]:
        container = container[step]
    container[at[-1]] = value
    return document


def poisoned(case: Case, rng: random.Random) -> tuple[str, Case] | None:
    """The case again with one thing PostgreSQL cannot store in it, and what that is (None: no room for one)."""
    body = case.body if isinstance(case.body, dict | list) else None
    strings = [at for at, leaf in leaves(body) if isinstance(leaf, str)] if body is not None else []
    ints = [at for at, leaf in leaves(body) if isinstance(leaf, int) and not isinstance(leaf, bool)] if body else []
    options = [
        *(["body string"] if strings else []), *(["body int"] if ints else []),
        *(["query"] if case.query else []), *(["path"] if case.path_parameters else []),
    ]
    if not options:
        return None
    where = rng.choice(options)
    derived = case.derive(keep_auth=True)
    if where == "body string":
        at = rng.choice(strings)
        derived.body = replaced(body, at, with_nul(dict(leaves(body))[at]))
        return f"NUL in body {list(at)}", derived
    if where == "body int":
        at, huge = rng.choice(ints), rng.choice(BEYOND_BIGINT)
        derived.body = replaced(body, at, huge)
        return f"{huge} in body {list(at)}", derived
    if where == "query":
        name = rng.choice(sorted(case.query))
        derived.query = {**case.query, name: with_nul(case.query[name])}
        return f"NUL in query {name}", derived
    name = rng.choice(sorted(case.path_parameters))
    # schemathesis puts path parameters into the URL as they are (it generates them percent-encoded)
    derived.path_parameters = {**case.path_parameters, name: f"%00{case.path_parameters[name]}"}
    return f"NUL in path {name}", derived


class QuietErrors:
    """Stands in for the kit's HTTP logger during the run: the traceback of an unhandled error is kept
    for the report instead of rendered (rendering one with its locals takes seconds on a busy machine)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.last: str = ""

    def exception(self, event: str, **fields: Any) -> None:
        self.last = "".join(traceback.format_exc(limit=-3).splitlines(keepends=True)[-8:])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


# --- The database's state -------------------------------------------------------------------------


async def fingerprint_sql(pool: asyncpg.Pool) -> str:
    tables = [
        r["table_name"] for r in await pool.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
            "AND table_type = 'BASE TABLE' ORDER BY table_name"
        )
    ]
    parts = []
    for table in tables:
        if table == "outbox":  # the relay sets published_at in the background: rows, not their marks
            parts.append("'outbox', (SELECT json_build_array(count(*), max(id)) FROM outbox)")
        else:
            parts.append(
                f"'{table}', (SELECT json_build_array(count(*), "
                f"md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), ''))) FROM \"{table}\" t)"
            )
    return f"SELECT json_build_object({', '.join(parts)})::text"


async def fingerprint_sees_a_change(pool: asyncpg.Pool, fingerprint: str, state: str) -> None:
    """A self-check: a row written (then rolled back) changes the fingerprint."""
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute(
                "INSERT INTO idempotency_keys (scope, key, request_hash, status_code, body) "
                "VALUES ('fuzz', 'self-check', '', 200, '{}')"
            )
            assert changed_tables(state, await conn.fetchval(fingerprint)) == ["idempotency_keys"]
        finally:
            await transaction.rollback()


@dataclass
class Findings:
    service: str
    calls: int = 0
    rejected: int = 0
    #: accepted calls that changed the database (so the fingerprint does see changes)
    changed: int = 0
    unsendable: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    #: poisoned cases sent, and how many of them the input guards refused (422 naming what was wrong)
    poisoned: int = 0
    poison_refused: int = 0

    def fail(self, case: Case, what: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(f"{case.method} {case.formatted_path}: {what}\n    {case.as_curl_command()}")

    def report(self) -> str:
        return (
            f"{self.service}: {len(self.failures)} failures in {self.calls} calls ({self.unsendable} cases could "
            f"not be sent; seed {SEED}, statuses "
            f"{dict(sorted(self.statuses.items()))}, {self.changed} accepted calls changed the database, "
            f"{self.poison_refused} of {self.poisoned} poisoned calls refused as input):\n" + "\n".join(self.failures)
        )


def check_oauth_error(response: httpx.Response) -> str | None:
    """The token endpoint answers as RFC 6749 §5.2 says (``{"error": ..., "error_description": ...}``
    as application/json), which OAuth clients expect; everything else is problem+json."""
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} OAuth error is not JSON: {response.text[:200]}"
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return f"{response.status_code} OAuth error without an error code: {response.text[:200]}"
    return None


def check_problem(response: httpx.Response) -> str | None:
    if response.request.url.path.startswith("/oauth/") and response.status_code in (400, 401):
        return check_oauth_error(response)
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith(PROBLEM_JSON):
        return f"{response.status_code} as {content_type!r}, not {PROBLEM_JSON}: {response.text[:200]}"
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} problem is not JSON: {response.text[:200]}"
    if not isinstance(body, dict) or not isinstance(body.get("code"), str) or not body["code"]:
        return f"{response.status_code} problem without a code: {response.text[:200]}"
    return None


def changed_tables(before: str, after: str) -> list[str]:
    old, new = json.loads(before), json.loads(after)
    return sorted(t for t in set(old) | set(new) if old.get(t) != new.get(t))


@pytest.fixture
def fuzz_settings(backends: Backends, run_id: str) -> Settings:
    """Database and topic prefixes of this test alone: nothing else writes to the service's database."""
    return make_settings(backends, f"{run_id}fz{uuid.uuid4().hex[:5]}")


#: Fronts serve HTML pages for people, not an API (the console's OpenAPI lists only /healthz,
#: /readyz and /metrics) and have no database to fingerprint: the console's pages are checked per
#: role by tests/unit/test_console_pages.py and in a browser by tests/e2e/test_console.py.
FUZZED = tuple(service for service in SERVICES if service not in FRONTS)


@pytest.mark.parametrize("service", FUZZED)
async def test_bad_input_gets_a_problem_and_changes_nothing(
    service: str, fuzz_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    errors = QuietErrors(shared.kit.http.log)
    monkeypatch.setattr(shared.kit.http, "log", errors)
    app = build_app(service, fuzz_settings)
    schema = schemathesis.openapi.from_dict(app.openapi())
    rng = random.Random(SEED)
    cases: list[tuple[Case, str | None]] = []
    for case in generate(schema, GenerationMode.POSITIVE):
        cases.append((case, None))
        if (variant := poisoned(case, rng)) is not None:
            cases.append((variant[1], variant[0]))
    cases += [(case, None) for case in generate(schema, GenerationMode.NEGATIVE)]
    findings = Findings(service)
    async with service_client(app) as client:
        pool: asyncpg.Pool = app.state.runtime.pool
        fingerprint = await fingerprint_sql(pool)
        state: str = await pool.fetchval(fingerprint)
        await fingerprint_sees_a_change(pool, fingerprint, state)
        for index, (case, poison) in enumerate(cases):
            request = request_of(case, token_for(fuzz_settings, case, index))
            if request is None:
                findings.unsendable += 1
                continue
            response = await client.request(**request)
            after: str = await pool.fetchval(fingerprint)
            findings.calls += 1
            findings.statuses[response.status_code] = findings.statuses.get(response.status_code, 0) + 1
            if poison is not None:
                findings.poisoned += 1
                if response.status_code < 400:
                    findings.fail(case, f"{poison}: accepted with {response.status_code}: {response.text[:200]}")
                elif response.status_code == 422 and response.json().get("code") == "invalid-request":
                    findings.poison_refused += 1
            if response.status_code >= 500:
                findings.fail(case, f"{poison or ''} {response.status_code}: {response.text[:200]}\n{errors.last}")
                errors.last = ""
            elif response.status_code >= 400:
                findings.rejected += 1
                problem = check_problem(response)
                if problem is not None:
                    findings.fail(case, problem)
                changed = changed_tables(state, after)
                if changed:
                    findings.fail(case, f"refused with {response.status_code} yet changed {changed}")
            elif after != state:
                findings.changed += 1
            state = after
    assert findings.calls > 0 and findings.rejected > 0 and findings.poison_refused > 0, findings.report()
    assert not findings.failures, findings.report()


# --- What the fuzz found, pinned down -------------------------------------------------------------

HUGE = 2**63  # one more than PostgreSQL's bigint holds
TOKYO = "東京"  # not latin-1: cannot go into an HTTP header as it is
TARGETED: dict[str, list[str]] = {
    "certification": [
        f"/v1/applications?municipality={SHIRAHAMA}&offset={HUGE}",
        f"/v1/residents/res-1/applications?offset={HUGE}",
        f"/v1/municipalities/{SHIRAHAMA}/certificates?offset={HUGE}",
        f"/v1/municipalities/{SHIRAHAMA}/audit?offset={HUGE}",
        f"/v1/municipalities/{TOKYO}/certificates.csv",
    ],
    "subsidy": [
        f"/v1/programs/jal-dual-residence-miles@{SHIRAHAMA}/ledger?offset={HUGE}",
        f"/v1/residents/res-1/grants?offset={HUGE}",
        f"/v1/municipalities/{TOKYO}/redemptions.csv",
    ],
    "donation": [
        f"/v1/municipalities/{SHIRAHAMA}/donations?offset={HUGE}",
        f"/v1/municipalities/{SHIRAHAMA}/funds/ledger?offset={HUGE}",
        f"/v1/municipalities/{TOKYO}/donations.csv?year=2026",
    ],
    "partner_gateway": [f"/v1/deliveries?offset={HUGE}"],
}


@pytest.mark.parametrize("service", sorted(TARGETED))
async def test_what_the_fuzz_found_gets_a_problem_not_a_500(
    service: str, fuzz_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared.kit.http, "log", QuietErrors(shared.kit.http.log))
    app = build_app(service, fuzz_settings)
    admin = {"Authorization": f"Bearer {mint_token(fuzz_settings, subject='admin-1', role=Role.ADMIN)}"}
    answers: dict[str, int] = {}
    async with service_client(app) as client:
        for path in TARGETED[service]:
            response = await client.get(path, headers=admin)
            answers[path] = response.status_code
            if response.status_code < 500:
                assert response.status_code >= 400 and check_problem(response) is None, response.text
    failed = {path: status for path, status in answers.items() if status >= 500}
    assert not failed, f"5xx for {failed}"


# What PostgreSQL cannot store, as reported (issue 14): each refused as input, naming where it is.
DONATION = {
    "payment_reference": "pay-issue14-1", "municipality_code": SHIRAHAMA, "kind": "hometown_tax", "amount": 10_000,
    "payment_date": "2025-01-10", "donor": {"type": "individual", "name": "山田 花子", "address": "東京都千代田区1-1"},
}
DONOR = {"type": "individual", "name": "山田 花子", "address": "東京都千代田区1-1", "resident_id": "res-issue14"}
PROGRAM = f"jal-dual-residence-miles@{SHIRAHAMA}"
TRIP = {
    "grant_id": "grant-issue14", "certificate_number": f"NCH-{SHIRAHAMA}-2025-000001", "trip_id": "trip-1",
    "trip_kind": "one_way", "travelled_on": "2025-01-10",
}


@dataclass(frozen=True)
class Unstorable:
    role: str
    method: str
    path: str
    #: where the 422 says the fault is (its ``errors[].loc``)
    where: list[str | int]
    body: Any = None
    params: dict[str, str] | None = None


UNSTORABLE: dict[str, list[Unstorable]] = {
    "donation": [
        Unstorable("admin", "POST", "/v1/donations", ["body", "payment_reference"],
                   {**DONATION, "payment_reference": f"pay-{NUL}-1"}),
        Unstorable("admin", "POST", "/v1/donations", ["body", "amount"], {**DONATION, "amount": 2**63}),
        Unstorable("admin", "POST", "/v1/donors", ["body", "individual", "name"], {**DONOR, "name": f"山田{NUL}"}),
        Unstorable("admin", "POST", "/v1/donors", ["body", "individual", "resident_id"],
                   {**DONOR, "resident_id": f"res-{NUL}"}),
        Unstorable("admin", "GET", "/v1/residents/res-%00/donor", ["path"]),
    ],
    "subsidy": [
        Unstorable("staff", "POST", f"/v1/programs/{PROGRAM}/budget", ["body", "amount"],
                   {"unit": "miles", "amount": 2**63, "reason": "issue 14"}),
        Unstorable("partner", "POST", "/v1/redemptions", ["body", "trip_id"], {**TRIP, "trip_id": f"trip-{NUL}"}),
        Unstorable("staff", "GET", f"/v1/municipalities/{SHIRAHAMA}/redemptions", ["query", "program_id"],
                   params={"program_id": f"{PROGRAM}{NUL}"}),
        Unstorable("admin", "GET", "/v1/programs/jal%00/ledger", ["path"]),
    ],
    "partner_gateway": [
        Unstorable("admin", "POST", "/v1/partners/jal/api-keys", ["body", "label"], {"label": f"ops{NUL}"}),
        Unstorable("admin", "GET", "/v1/deliveries", ["query", "partner"], params={"partner": f"jal{NUL}"}),
    ],
    "registration": [
        Unstorable("staff", "GET", "/v1/registrations", ["query", "q"], params={"q": f"山田{NUL}"}),
    ],
    "certification": [
        Unstorable("staff", "GET", "/v1/applications", ["query", "municipality"], params={"municipality": f"{NUL}"}),
        Unstorable("admin", "GET", "/v1/residents/res-%00/applications", ["path"]),
    ],
    "notification": [Unstorable("admin", "GET", "/v1/residents/res-%00/notifications", ["path"])],
}


@pytest.mark.parametrize("service", sorted(UNSTORABLE))
async def test_what_postgresql_cannot_store_is_a_422_naming_the_field(
    service: str, fuzz_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared.kit.http, "log", QuietErrors(shared.kit.http.log))
    app = build_app(service, fuzz_settings)
    tokens = {
        "admin": mint_token(fuzz_settings, subject="admin-1", role=Role.ADMIN),
        "staff": mint_token(fuzz_settings, subject="staff-1", role=Role.STAFF, municipality=SHIRAHAMA),
        "partner": mint_token(fuzz_settings, subject="partner-1", role=Role.PARTNER, partner="jal"),
    }
    wrong: dict[str, str] = {}
    async with service_client(app) as client:
        pool: asyncpg.Pool = app.state.runtime.pool
        fingerprint = await fingerprint_sql(pool)
        before: str = await pool.fetchval(fingerprint)
        for case in UNSTORABLE[service]:
            response = await client.request(
                case.method, case.path, params=case.params, headers={"Authorization": f"Bearer {tokens[case.role]}"},
                json=case.body,
            )
            answer = response.json()
            places = [error.get("loc") for error in answer.get("errors", [])]
            if response.status_code != 422 or answer.get("code") != "invalid-request" or case.where not in places:
                wrong[f"{case.method} {case.path} {case.params or ''}"] = f"{response.status_code} {response.text}"
            else:
                assert check_problem(response) is None
                assert ".".join(map(str, case.where)) in answer["detail"]
        assert changed_tables(before, await pool.fetchval(fingerprint)) == []
    assert not wrong, wrong
