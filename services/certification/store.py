"""All SQL of the certification service (asyncpg, no ORM): rows in, domain objects out."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Sequence
from datetime import date, datetime
from typing import Any, cast

import asyncpg

from services.certification.domain import (
    Application,
    Approval,
    AuditEntry,
    Certificate,
    ConsentRow,
    MunicipalityRules,
    Registration,
    RegistrationRow,
    Resident,
    ResidentRow,
)
from shared.contracts.common import PartnerMembership
from shared.contracts.formats import CertificateNumber
from shared.kit.db import Connection

# --- municipality rules (each municipality's certification scheme) --------------------------------

_RULES_COLUMNS = """
    municipality_code, plan_source, plan_adopted_on, min_stay_days, housing_bases, validity_days,
    required_registration, legal_basis, scheme_valid_from, scheme_valid_until
"""


def _rules(row: asyncpg.Record) -> MunicipalityRules:
    return MunicipalityRules(
        municipality_code=row["municipality_code"], min_stay_days=row["min_stay_days"],
        housing_bases=tuple(row["housing_bases"]), validity_days=row["validity_days"],
        required_registration=row["required_registration"], plan_source=row["plan_source"],
        plan_adopted_on=row["plan_adopted_on"], legal_basis=row["legal_basis"],
        valid_from=row["scheme_valid_from"], valid_until=row["scheme_valid_until"],
    )


async def seed_rules(conn: Connection, schemes: Sequence[MunicipalityRules]) -> int:
    """Add the reference schemes (default rules); rows that exist (maybe edited) stay as they are.

    A town seeded on a model-project basis whose plan the reference data now lists moves to the
    plan basis (its rules stay): the reference data learnt of the plan."""
    result: str = await conn.execute(
        """
        INSERT INTO municipality_rules (municipality_code, plan_source, plan_adopted_on, legal_basis)
        SELECT code, 'reference', adopted_on, basis
        FROM unnest($1::text[], $2::date[], $3::text[]) AS p(code, adopted_on, basis)
        ON CONFLICT (municipality_code) DO UPDATE
        SET legal_basis = 'plan', plan_adopted_on = EXCLUDED.plan_adopted_on, updated_at = now()
        WHERE EXCLUDED.legal_basis = 'plan' AND municipality_rules.legal_basis = 'model_project'
            AND municipality_rules.plan_source = 'reference'
        """,
        [s.municipality_code for s in schemes], [s.plan_adopted_on for s in schemes],
        [s.legal_basis for s in schemes],
    )
    return int(result.split()[-1])


async def get_rules(conn: Connection, code: str, *, lock: bool = False) -> MunicipalityRules | None:
    row = await conn.fetchrow(
        f"SELECT {_RULES_COLUMNS} FROM municipality_rules WHERE municipality_code = $1"
        + (" FOR UPDATE" if lock else ""),
        code,
    )
    return None if row is None else _rules(row)


async def list_rules(conn: Connection, limit: int, offset: int) -> tuple[list[MunicipalityRules], int]:
    rows = await conn.fetch(
        f"SELECT {_RULES_COLUMNS} FROM municipality_rules ORDER BY municipality_code LIMIT $1 OFFSET $2",
        limit, offset,
    )
    total = await conn.fetchval("SELECT count(*) FROM municipality_rules")
    return [_rules(row) for row in rows], int(total)


async def save_rules(conn: Connection, rules: MunicipalityRules, by: str) -> bool:
    """Write a scheme's rules and period (staff's edit); its basis and plan are left as they are."""
    result: str = await conn.execute(
        """
        UPDATE municipality_rules
        SET min_stay_days = $2, housing_bases = $3, validity_days = $4, required_registration = $5,
            scheme_valid_from = $6, scheme_valid_until = $7, updated_at = now(), updated_by = $8
        WHERE municipality_code = $1
        """,
        rules.municipality_code, rules.min_stay_days, list(rules.housing_bases), rules.validity_days,
        rules.required_registration, rules.valid_from, rules.valid_until, by,
    )
    return result.endswith(" 1")


async def upsert_scheme(conn: Connection, scheme: MunicipalityRules, by: str) -> None:
    """Write a scheme whole (a plan recorded or withdrawn: the basis changes, the rules come along)."""
    await conn.execute(
        """
        INSERT INTO municipality_rules
            (municipality_code, plan_source, plan_adopted_on, min_stay_days, housing_bases, validity_days,
             required_registration, legal_basis, scheme_valid_from, scheme_valid_until, updated_by)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
        ON CONFLICT (municipality_code) DO UPDATE
        SET plan_source = EXCLUDED.plan_source, plan_adopted_on = EXCLUDED.plan_adopted_on,
            min_stay_days = EXCLUDED.min_stay_days, housing_bases = EXCLUDED.housing_bases,
            validity_days = EXCLUDED.validity_days, required_registration = EXCLUDED.required_registration,
            legal_basis = EXCLUDED.legal_basis, scheme_valid_from = EXCLUDED.scheme_valid_from,
            scheme_valid_until = EXCLUDED.scheme_valid_until, updated_at = now(), updated_by = EXCLUDED.updated_by
        """,
        scheme.municipality_code, scheme.plan_source, scheme.plan_adopted_on, scheme.min_stay_days,
        list(scheme.housing_bases), scheme.validity_days, scheme.required_registration, scheme.legal_basis,
        scheme.valid_from, scheme.valid_until, by,
    )


# --- the resident projection ---------------------------------------------------------------------


async def withdrawn_among(conn: Connection, resident_ids: Iterable[str]) -> set[str]:
    """Which of these residents withdrew (their tombstone makes late events be ignored): the
    projection's tombstone or the kit's ledger of erasures (which a rebuilt projection still has)."""
    rows = await conn.fetch(
        """
        SELECT resident_id FROM residents WHERE resident_id = ANY($1::text[]) AND status = 'withdrawn'
        UNION SELECT resident_id FROM kit_erased_residents WHERE resident_id = ANY($1::text[])
        """,
        list(set(resident_ids)),
    )
    return {row["resident_id"] for row in rows}


def _registration(row: asyncpg.Record) -> Registration:
    return Registration(
        registration_id=row["registration_id"], municipality_code=row["municipality_code"], tier=row["tier"],
        status=row["status"], premium_status=row["premium_status"], valid_until=row["valid_until"],
    )


async def get_registrations(conn: Connection, registration_ids: Iterable[str]) -> dict[str, Registration]:
    rows = await conn.fetch(
        """
        SELECT registration_id, municipality_code, tier, status, premium_status, valid_until
        FROM resident_registrations WHERE registration_id = ANY($1::text[])
        """,
        list(set(registration_ids)),
    )
    return {row["registration_id"]: _registration(row) for row in rows}


async def save_projection(
    conn: Connection, residents: Collection[ResidentRow], registrations: Collection[RegistrationRow],
    consents: Collection[ConsentRow], *, unless_withdrawn: Collection[str] = (),
) -> set[str]:
    """Write what a run of registration events changed, in one statement (one round trip):

    - residents: new ones inserted as active, known active ones refreshed (a NULL address keeps
      the known one);
    - registrations: each written whole; one keeps the resident it was first saved under;
    - share consents: last writer wins by the consent's own time (an older fact never overrides a
      newer one).

    ``unless_withdrawn``: residents to look up in the same statement (``withdrawn_among``): no row
    of one who withdrew is written, and the ones who did are returned (a run that needs no stored
    state is folded whole and filtered here, without a round trip of its own for the look-up).

    Each table is written once, by its own part of the statement; the foreign keys of registrations
    and consents on residents are checked at its end, when the residents are in."""
    if not (residents or registrations or consents or unless_withdrawn):
        return set()
    saved = [r.registration for r in registrations]
    rows = await conn.fetch(
        _SAVE_PROJECTION,
        [r.resident_id for r in residents], [r.legal_address_code for r in residents],
        [r.last_event_at for r in residents],
        [g.registration_id for g in saved], [r.resident_id for r in registrations],
        [g.municipality_code for g in saved], [g.tier for g in saved], [g.status for g in saved],
        [g.premium_status for g in saved], [g.valid_until for g in saved], [r.last_event_at for r in registrations],
        [r.resident_id for r in consents], [r.consent.partner for r in consents], [r.consent.granted for r in consents],
        [r.consent.at for r in consents],
        list(set(unless_withdrawn)),
    )
    return {row["resident_id"] for row in rows}


# Data-modifying CTEs all see the snapshot the statement started with: ``withdrawn`` is who had
# withdrawn before any of this run's rows were written, as a look-up before the statement would be.
_SAVE_PROJECTION = """
    WITH withdrawn AS (
        SELECT resident_id FROM residents WHERE resident_id = ANY($16::text[]) AND status = 'withdrawn'
        UNION SELECT resident_id FROM kit_erased_residents WHERE resident_id = ANY($16::text[])
    ), saved_residents AS (
        INSERT INTO residents (resident_id, status, legal_address_code, last_event_at)
        SELECT r.resident_id, 'active', r.legal_address_code, r.last_event_at
        FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS r(resident_id, legal_address_code, last_event_at)
        WHERE r.resident_id NOT IN (SELECT resident_id FROM withdrawn)
        ON CONFLICT (resident_id) DO UPDATE
        SET legal_address_code = COALESCE(EXCLUDED.legal_address_code, residents.legal_address_code),
            last_event_at = EXCLUDED.last_event_at
        WHERE residents.status = 'active'
    ), saved_registrations AS (
        INSERT INTO resident_registrations
            (registration_id, resident_id, municipality_code, tier, status, premium_status, valid_until,
             last_event_at)
        SELECT g.* FROM unnest($4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::date[],
                               $11::timestamptz[])
            AS g(registration_id, resident_id, municipality_code, tier, status, premium_status, valid_until,
                 last_event_at)
        WHERE g.resident_id NOT IN (SELECT resident_id FROM withdrawn)
        ON CONFLICT (registration_id) DO UPDATE
        SET municipality_code = EXCLUDED.municipality_code, tier = EXCLUDED.tier, status = EXCLUDED.status,
            premium_status = EXCLUDED.premium_status, valid_until = EXCLUDED.valid_until,
            last_event_at = EXCLUDED.last_event_at
    ), saved_consents AS (
        INSERT INTO share_consents (resident_id, partner, granted, at)
        SELECT c.* FROM unnest($12::text[], $13::text[], $14::boolean[], $15::timestamptz[])
            AS c(resident_id, partner, granted, at)
        WHERE c.resident_id NOT IN (SELECT resident_id FROM withdrawn)
        ON CONFLICT (resident_id, partner) DO UPDATE SET granted = EXCLUDED.granted, at = EXCLUDED.at
        WHERE share_consents.at <= EXCLUDED.at
    )
    SELECT resident_id FROM withdrawn
"""


async def mark_withdrawn(conn: Connection, resident_id: str, withdrawn_at: datetime, at: datetime) -> None:
    """Keep a tombstone (so late events are ignored), erase the address, drop registrations and consents."""
    await conn.execute(
        """
        INSERT INTO residents (resident_id, status, legal_address_code, withdrawn_at, last_event_at)
        VALUES ($1, 'withdrawn', NULL, $2, $3)
        ON CONFLICT (resident_id) DO UPDATE
        SET status = 'withdrawn', legal_address_code = NULL, withdrawn_at = EXCLUDED.withdrawn_at,
            last_event_at = EXCLUDED.last_event_at
        """,
        resident_id, withdrawn_at, at,
    )
    await conn.execute("DELETE FROM resident_registrations WHERE resident_id = $1", resident_id)
    await conn.execute("DELETE FROM share_consents WHERE resident_id = $1", resident_id)


async def load_resident(conn: Connection, resident_id: str, *, lock: bool = False) -> Resident | None:
    """The resident as the projection knows them; ``lock`` makes a concurrent withdrawal wait for us."""
    row = await conn.fetchrow(
        "SELECT resident_id, status, legal_address_code FROM residents WHERE resident_id = $1"
        + (" FOR SHARE" if lock else ""),
        resident_id,
    )
    if row is None:
        return None
    registrations = await conn.fetch(
        """
        SELECT registration_id, municipality_code, tier, status, premium_status, valid_until
        FROM resident_registrations WHERE resident_id = $1 ORDER BY registration_id
        """,
        resident_id,
    )
    consented = await conn.fetch(
        "SELECT partner FROM share_consents WHERE resident_id = $1 AND granted", resident_id
    )
    return Resident(
        resident_id=row["resident_id"], status=row["status"], legal_address_code=row["legal_address_code"],
        registrations=tuple(_registration(r) for r in registrations),
        consented_partners=frozenset(r["partner"] for r in consented),
    )


async def consented_partners(conn: Connection, resident_ids: Iterable[str]) -> dict[str, frozenset[str]]:
    rows = await conn.fetch(
        "SELECT resident_id, partner FROM share_consents WHERE resident_id = ANY($1::text[]) AND granted",
        list(set(resident_ids)),
    )
    result: dict[str, set[str]] = {}
    for row in rows:
        result.setdefault(row["resident_id"], set()).add(row["partner"])
    return {resident: frozenset(partners) for resident, partners in result.items()}


# --- applications --------------------------------------------------------------------------------

_APPLICATION_COLUMNS = """
    application_id, resident_id, municipality_code, primary_residence_code, planned_stay_days, housing_basis,
    address_there, partners, note, status, submitted_at, decided_at, decided_by, decision_reason,
    certificate_number
"""


def _partners_json(partners: Sequence[PartnerMembership]) -> str:
    return json.dumps([membership.model_dump() for membership in partners])


def _partners(raw: str) -> tuple[PartnerMembership, ...]:
    return tuple(PartnerMembership.model_validate(item) for item in json.loads(raw))


def _application(row: asyncpg.Record) -> Application:
    return Application(
        application_id=row["application_id"], resident_id=row["resident_id"],
        municipality_code=row["municipality_code"], primary_residence_code=row["primary_residence_code"],
        planned_stay_days=row["planned_stay_days"], housing_basis=row["housing_basis"],
        address_there=row["address_there"], partners=_partners(row["partners"]), note=row["note"],
        status=row["status"], submitted_at=row["submitted_at"], decided_at=row["decided_at"],
        decided_by=row["decided_by"], decision_reason=row["decision_reason"],
        certificate_number=row["certificate_number"],
    )


class OpenApplicationConflict(Exception):
    """The one-open-application index refused a concurrent twin."""


async def insert_application(conn: Connection, application: Application) -> None:
    try:
        async with conn.transaction():  # a savepoint: the caller's transaction survives the conflict
            await conn.execute(
                f"""
                INSERT INTO applications ({_APPLICATION_COLUMNS})
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11, $12, $13, $14, $15)
                """,
                *_application_values(application),
            )
    except asyncpg.UniqueViolationError as error:
        if error.constraint_name == "applications_one_open":
            raise OpenApplicationConflict from error
        raise


def _application_values(application: Application) -> tuple[Any, ...]:
    a = application
    return (
        a.application_id, a.resident_id, a.municipality_code, a.primary_residence_code, a.planned_stay_days,
        a.housing_basis, a.address_there, _partners_json(a.partners), a.note, a.status, a.submitted_at,
        a.decided_at, a.decided_by, a.decision_reason, a.certificate_number,
    )


async def save_decision(conn: Connection, application: Application) -> None:
    await conn.execute(
        """
        UPDATE applications
        SET status = $2, decided_at = $3, decided_by = $4, decision_reason = $5, certificate_number = $6
        WHERE application_id = $1
        """,
        application.application_id, application.status, application.decided_at, application.decided_by,
        application.decision_reason, application.certificate_number,
    )


async def get_application(conn: Connection, application_id: str, *, lock: bool = False) -> Application | None:
    row = await conn.fetchrow(
        f"SELECT {_APPLICATION_COLUMNS} FROM applications WHERE application_id = $1"
        + (" FOR UPDATE" if lock else ""),
        application_id,
    )
    return None if row is None else _application(row)


async def has_open_application(conn: Connection, resident_id: str, municipality_code: str) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT 1 FROM applications WHERE resident_id = $1 AND municipality_code = $2 AND status = 'submitted'",
            resident_id, municipality_code,
        )
    )


async def open_applications_of(conn: Connection, resident_id: str) -> list[Application]:
    rows = await conn.fetch(
        f"""
        SELECT {_APPLICATION_COLUMNS} FROM applications
        WHERE resident_id = $1 AND status = 'submitted' ORDER BY submitted_at FOR UPDATE
        """,
        resident_id,
    )
    return [_application(row) for row in rows]


async def list_applications(
    conn: Connection, *, municipality_code: str | None, resident_id: str | None, status: str | None,
    housing_basis: str | None, limit: int, offset: int, after: str | None = None,
) -> tuple[list[Application], int]:
    """Oldest first (the review queue's order), filtered by whatever is given; ``after``: only those
    after that application in this order (keyset: a deep page is an index range, not OFFSET's scan)."""
    where, args = _conditions(municipality_code=municipality_code, resident_id=resident_id, status=status,
                              housing_basis=housing_basis)
    n = len(args)
    keyset = (
        "" if after is None else
        " AND (submitted_at, application_id) > (SELECT submitted_at, application_id FROM applications"
        f" WHERE application_id = ${n + 3})"
    )
    rows = await conn.fetch(
        f"""
        SELECT {_APPLICATION_COLUMNS} FROM applications WHERE {where}{keyset}
        ORDER BY submitted_at, application_id LIMIT ${n + 1} OFFSET ${n + 2}
        """,
        *args, limit, offset, *(() if after is None else (after,)),
    )
    total = await conn.fetchval(f"SELECT count(*) FROM applications WHERE {where}", *args)
    return [_application(row) for row in rows], int(total)


def _conditions(**equal: object) -> tuple[str, list[object]]:
    """Only the conditions a list's filter sets: a generic plan of a prepared `$n IS NULL OR col = $n`
    (which PostgreSQL may switch to after five runs) cannot make it an index condition; one statement
    per set of conditions keeps every plan on the listing indexes."""
    clauses, args = ["TRUE"], []
    for column, value in equal.items():
        if value is not None:
            args.append(value)
            clauses.append(f"{column} = ${len(args)}")
    return " AND ".join(clauses), args


async def erase_applications(conn: Connection, resident_id: str, at: datetime) -> None:
    """Erase what an application holds about the person (address, note, member numbers)."""
    await conn.execute(
        """
        UPDATE applications
        SET address_there = NULL, note = NULL, erased_at = $2,
            partners = COALESCE(
                (SELECT jsonb_agg(jsonb_build_object('partner', p->>'partner', 'member_number', NULL))
                 FROM jsonb_array_elements(partners) AS p),
                '[]'::jsonb)
        WHERE resident_id = $1
        """,
        resident_id, at,
    )


# --- certificates --------------------------------------------------------------------------------

_CERTIFICATE_COLUMNS = """
    certificate_number, municipality_code, resident_id, application_id, valid_from, valid_until, status,
    partners, issued_at, issued_by, renewed_at, revoked_at, revocation_reason
"""


def _certificate(row: asyncpg.Record) -> Certificate:
    return Certificate(
        certificate_number=row["certificate_number"], municipality_code=row["municipality_code"],
        resident_id=row["resident_id"], application_id=row["application_id"], valid_from=row["valid_from"],
        valid_until=row["valid_until"], status=row["status"], partners=_partners(row["partners"]),
        issued_at=row["issued_at"], issued_by=row["issued_by"], renewed_at=row["renewed_at"],
        revoked_at=row["revoked_at"], revocation_reason=row["revocation_reason"],
    )


async def issue_certificate(conn: Connection, approval: Approval, audit: AuditEntry) -> str:
    """Take the municipality's next number and record the approval under it, in one statement.

    The counter row stays locked from the increment until commit and every approval of the town
    waits for it, so callers run this last (only the outbox row follows). The decision, the
    certificate and the audit entry (its details gain the number) are written by the same
    statement. A rollback undoes the increment with the rest: numbers stay gapless. The number is
    composed in SQL (the sequence exists only inside the statement) as ``CertificateNumber`` does,
    and checked against it; the counter's CHECK keeps the sequence to 6 digits.
    """
    a, application = approval, approval.application
    row = await conn.fetchrow(
        """
        WITH counter AS (
            INSERT INTO certificate_counters (municipality_code, year, last_sequence) VALUES ($2, $3, 1)
            ON CONFLICT (municipality_code, year)
            DO UPDATE SET last_sequence = certificate_counters.last_sequence + 1
            RETURNING last_sequence AS sequence,
                format('NCH-%s-%s-%s', municipality_code, lpad(year::text, 4, '0'), lpad(last_sequence::text, 6, '0'))
                    AS number
        ), decision AS (
            UPDATE applications SET status = 'approved', decided_at = $8, decided_by = $9,
                certificate_number = counter.number
            FROM counter WHERE application_id = $1
        ), certificate AS (
            INSERT INTO certificates
                (certificate_number, municipality_code, year, sequence, application_id, resident_id, valid_from,
                 valid_until, status, partners, issued_at, issued_by)
            SELECT counter.number, $2, $3, counter.sequence, $1, $4, $5, $6, 'valid', $7::jsonb, $8, $9
            FROM counter
        ), audit AS (
            INSERT INTO audit_trail
                (at, actor, actor_role, municipality_code, action, target_type, target_id, reason, details)
            SELECT $10, $11, $12, $13, $14, $15, $16, $17,
                $18::jsonb || jsonb_build_object('certificate_number', counter.number)
            FROM counter
        )
        SELECT number, sequence FROM counter
        """,
        application.application_id, application.municipality_code, a.year, application.resident_id, a.valid_from,
        a.valid_until, _partners_json(application.partners), a.at, a.by, *_audit_values(audit),
    )
    assert row is not None  # the upsert always returns its row
    number: str = row["number"]
    # A number partners and the gateway would refuse must not be issued: roll the approval back.
    if number != CertificateNumber.format(application.municipality_code, a.year, row["sequence"]):
        raise RuntimeError(f"certificate number {number!r} composed in SQL differs from CertificateNumber")
    return number


async def save_certificate(conn: Connection, certificate: Certificate, *, reset_expiring: bool = False) -> None:
    c = certificate
    await conn.execute(
        """
        UPDATE certificates
        SET valid_until = $2, status = $3, partners = $4::jsonb, renewed_at = $5, revoked_at = $6,
            revocation_reason = $7,
            expiring_sent_at = CASE WHEN $8 THEN NULL ELSE expiring_sent_at END
        WHERE certificate_number = $1
        """,
        c.certificate_number, c.valid_until, c.status, _partners_json(c.partners), c.renewed_at, c.revoked_at,
        c.revocation_reason, reset_expiring,
    )


async def get_certificate(conn: Connection, number: str, *, lock: bool = False) -> Certificate | None:
    row = await conn.fetchrow(
        f"SELECT {_CERTIFICATE_COLUMNS} FROM certificates WHERE certificate_number = $1"
        + (" FOR UPDATE" if lock else ""),
        number,
    )
    return None if row is None else _certificate(row)


async def valid_certificate_number(conn: Connection, resident_id: str, municipality_code: str) -> str | None:
    number: str | None = await conn.fetchval(
        """
        SELECT certificate_number FROM certificates
        WHERE resident_id = $1 AND municipality_code = $2 AND status = 'valid' LIMIT 1
        """,
        resident_id, municipality_code,
    )
    return number


async def valid_certificates_of(conn: Connection, resident_id: str) -> list[Certificate]:
    rows = await conn.fetch(
        f"""
        SELECT {_CERTIFICATE_COLUMNS} FROM certificates
        WHERE resident_id = $1 AND status = 'valid' ORDER BY certificate_number FOR UPDATE
        """,
        resident_id,
    )
    return [_certificate(row) for row in rows]


async def erase_certificate_member_numbers(conn: Connection, resident_id: str) -> None:
    await conn.execute(
        """
        UPDATE certificates
        SET partners = COALESCE(
                (SELECT jsonb_agg(jsonb_build_object('partner', p->>'partner', 'member_number', NULL))
                 FROM jsonb_array_elements(partners) AS p),
                '[]'::jsonb)
        WHERE resident_id = $1
        """,
        resident_id,
    )


async def list_certificates(
    conn: Connection, *, municipality_code: str | None, resident_id: str | None, status: str | None,
    limit: int | None, offset: int = 0, valid_until_before: date | None = None,
) -> tuple[list[Certificate], int]:
    """In issue order; ``valid_until_before``: only those whose validity ends before that day, soonest
    first (the expiring list: an index range of ``certificates_expiring``, not a scan of them all)."""
    where, args = _conditions(municipality_code=municipality_code, resident_id=resident_id, status=status)
    order = "issued_at, certificate_number"
    if valid_until_before is not None:
        args.append(valid_until_before)
        where += f" AND valid_until < ${len(args)}"
        order = "valid_until, certificate_number"
    n = len(args)
    rows = await conn.fetch(
        f"SELECT {_CERTIFICATE_COLUMNS} FROM certificates WHERE {where} ORDER BY {order} "
        f"LIMIT ${n + 1} OFFSET ${n + 2}",
        *args, limit, offset,
    )
    total = await conn.fetchval(f"SELECT count(*) FROM certificates WHERE {where}", *args)
    return [_certificate(row) for row in rows], int(total)


#: Where a certificate listing stands: the last row's (issued_at, number), the list's unique order.
CertificateKey = tuple[datetime, str]


def certificate_key(certificate: Certificate) -> CertificateKey:
    return certificate.issued_at, certificate.certificate_number


async def certificates_after(
    conn: Connection, municipality_code: str, status: str | None, after: CertificateKey | None, limit: int
) -> list[Certificate]:
    """The municipality's next ``limit`` certificates after ``after`` in the list's order (keyset)."""
    where = "municipality_code = $1 AND ($2::text IS NULL OR status = $2)"
    args: list[object] = [municipality_code, status]
    if after is not None:
        where += " AND (issued_at, certificate_number) > ($3, $4)"
        args += after
    rows = await conn.fetch(
        f"""
        SELECT {_CERTIFICATE_COLUMNS} FROM certificates WHERE {where}
        ORDER BY issued_at, certificate_number LIMIT ${len(args) + 1}
        """,
        *args, limit,
    )
    return [_certificate(row) for row in rows]


async def claim_expiring(conn: Connection, first_day: date, last_day: date, limit: int) -> list[Certificate]:
    """Mark the certificates whose notice is due as notified, and return them (skipping rows a
    concurrent replica holds): the mark and the outbox row commit together, so each is sent once."""
    rows = await conn.fetch(
        f"""
        UPDATE certificates SET expiring_sent_at = now()
        WHERE certificate_number IN (
            SELECT certificate_number FROM certificates
            WHERE status = 'valid' AND expiring_sent_at IS NULL AND valid_until BETWEEN $1 AND $2
            ORDER BY valid_until, certificate_number LIMIT $3
            FOR UPDATE SKIP LOCKED
        ) AND status = 'valid' AND expiring_sent_at IS NULL
        RETURNING {_CERTIFICATE_COLUMNS}
        """,
        first_day, last_day, limit,
    )
    return sorted((_certificate(row) for row in rows), key=lambda c: c.certificate_number)


async def claim_expired(conn: Connection, today: date, limit: int) -> list[Certificate]:
    """Expire the valid certificates whose last day is before ``today`` and return them (claimed once)."""
    rows = await conn.fetch(
        f"""
        UPDATE certificates SET status = 'expired', expired_at = now()
        WHERE certificate_number IN (
            SELECT certificate_number FROM certificates
            WHERE status = 'valid' AND valid_until < $1
            ORDER BY valid_until, certificate_number LIMIT $2
            FOR UPDATE SKIP LOCKED
        ) AND status = 'valid'
        RETURNING {_CERTIFICATE_COLUMNS}
        """,
        today, limit,
    )
    return sorted((_certificate(row) for row in rows), key=lambda c: c.certificate_number)


# --- audit trail ---------------------------------------------------------------------------------


async def append_audit(conn: Connection, entry: AuditEntry) -> None:
    """Append the entry; a staff note goes beside it, in ``audit_notes`` (erasable, the entry is not)."""
    await conn.execute(
        """
        WITH entry AS (
            INSERT INTO audit_trail
                (at, actor, actor_role, municipality_code, action, target_type, target_id, reason, details)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb)
            RETURNING id
        )
        INSERT INTO audit_notes (audit_id, note) SELECT id, $10 FROM entry WHERE $10::text IS NOT NULL
        """,
        *_audit_values(entry), entry.note,
    )


async def erase_audit_notes(conn: Connection, resident_id: str) -> int:
    """Delete the staff notes on the resident's applications and certificates; how many. The entries
    stay: who decided what, when, and the reason code."""
    result: str = await conn.execute(
        """
        DELETE FROM audit_notes USING audit_trail AS a
        WHERE audit_notes.audit_id = a.id AND (
            (a.target_type = 'application'
             AND a.target_id IN (SELECT application_id FROM applications WHERE resident_id = $1))
            OR (a.target_type = 'certificate'
                AND a.target_id IN (SELECT certificate_number FROM certificates WHERE resident_id = $1)))
        """,
        resident_id,
    )
    return int(result.split()[-1])


def _audit_values(entry: AuditEntry) -> tuple[Any, ...]:
    return (
        entry.at, entry.actor, entry.actor_role, entry.municipality_code, entry.action, entry.target_type,
        entry.target_id, entry.reason, json.dumps(dict(entry.details), default=str),
    )


async def list_audit(
    conn: Connection, municipality_code: str, limit: int, offset: int, application_id: str | None = None
) -> tuple[list[dict[str, Any]], int]:
    """Newest first; ``application_id``: only the entries about that application and its certificate
    (an application's page: its trail however old, read from ``audit_trail_by_target``)."""
    where, args = "a.municipality_code = $1", [municipality_code]
    if application_id is not None:
        where += (" AND a.target_id IN ($2, (SELECT certificate_number FROM certificates"
                  " WHERE application_id = $2))")
        args.append(application_id)
    n = len(args)
    rows = await conn.fetch(
        f"""
        SELECT a.id, a.at, a.actor, a.actor_role, a.municipality_code, a.action, a.target_type, a.target_id,
               a.reason, CASE WHEN n.note IS NULL THEN a.details ELSE a.details || jsonb_build_object('note', n.note)
                         END AS details
        FROM audit_trail AS a LEFT JOIN audit_notes AS n ON n.audit_id = a.id
        WHERE {where} ORDER BY a.id DESC LIMIT ${n + 1} OFFSET ${n + 2}
        """,
        *args, limit, offset,
    )
    total = await conn.fetchval(f"SELECT count(*) FROM audit_trail AS a WHERE {where}", *args)
    items = [{**dict(row), "details": cast(dict[str, Any], json.loads(row["details"]))} for row in rows]
    return items, int(total)


# --- partners registered through the partner gateway (gateway.partners.v1) -----------------------


async def save_registered_partners(conn: Connection, rows: Sequence[tuple[str, str, datetime]]) -> None:
    """Upsert (code, member-number format, registered at); a later registration event wins."""
    if not rows:
        return
    await conn.execute(
        """
        INSERT INTO registered_partners (code, member_number_format, registered_at)
        SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[])
        ON CONFLICT (code) DO UPDATE SET member_number_format = excluded.member_number_format,
            registered_at = excluded.registered_at
        WHERE registered_partners.registered_at <= excluded.registered_at
        """,
        [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
    )


async def registered_partner_formats(conn: Connection | asyncpg.Pool, codes: Iterable[str]) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT code, member_number_format FROM registered_partners WHERE code = ANY($1::text[])", list(codes)
    )
    return {row["code"]: row["member_number_format"] for row in rows}
