"""All SQL of the listings service (asyncpg, no ORM): rows in, domain objects out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime

import asyncpg

from services.listings.domain import (
    ContactDelivery,
    Interest,
    Interests,
    Listing,
    ListingStatus,
    OwnerConsent,
    ResidentPlaces,
)
from shared.contracts.listings import ListingContent, ListingKind
from shared.kit.db import Connection

# --- listings --------------------------------------------------------------------------------------

_LISTING_COLUMNS = """
    listing_id, kind, municipality_code, prefecture_code, publisher, corporation_id, area, title, summary, language,
    available_from, available_until, expires_on, status, owner_name, owner_consented_on, owner_consent_method,
    owner_document_ref, created_by, created_at, published_at, withdrawn_at, withdrawal_reason, expired_on
"""


def _listing(row: asyncpg.Record) -> Listing:
    content = ListingContent(
        kind=row["kind"], municipality_code=row["municipality_code"], prefecture_code=row["prefecture_code"],
        publisher=row["publisher"], corporation_id=row["corporation_id"], area=row["area"], title=row["title"],
        summary=row["summary"], language=row["language"], available_from=row["available_from"],
        available_until=row["available_until"], expires_on=row["expires_on"],
    )
    consent = None if row["owner_name"] is None else OwnerConsent(
        row["owner_name"], row["owner_consented_on"], row["owner_consent_method"], row["owner_document_ref"]
    )
    return Listing(
        listing_id=row["listing_id"], content=content, status=row["status"], created_by=row["created_by"],
        created_at=row["created_at"], owner_consent=consent, published_at=row["published_at"],
        withdrawn_at=row["withdrawn_at"], withdrawal_reason=row["withdrawal_reason"], expired_on=row["expired_on"],
    )


async def get_listing(conn: Connection, listing_id: str, *, lock: bool = False) -> Listing | None:
    row = await conn.fetchrow(
        f"SELECT {_LISTING_COLUMNS} FROM listings WHERE listing_id = $1 {'FOR UPDATE' if lock else ''}", listing_id
    )
    return None if row is None else _listing(row)


async def save_listing(conn: Connection, listing: Listing) -> None:
    c, o = listing.content, listing.owner_consent
    await conn.execute(
        f"""
        INSERT INTO listings ({_LISTING_COLUMNS})
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22,
                $23, $24)
        ON CONFLICT (listing_id) DO UPDATE SET
            status = EXCLUDED.status, published_at = EXCLUDED.published_at, withdrawn_at = EXCLUDED.withdrawn_at,
            withdrawal_reason = EXCLUDED.withdrawal_reason, expired_on = EXCLUDED.expired_on
        """,
        listing.listing_id, c.kind, c.municipality_code, c.prefecture_code, c.publisher, c.corporation_id, c.area,
        c.title, c.summary, c.language, c.available_from, c.available_until, c.expires_on, listing.status,
        o.owner_name if o else None, o.consented_on if o else None, o.method if o else None,
        o.document_ref if o else None, listing.created_by, listing.created_at, listing.published_at,
        listing.withdrawn_at, listing.withdrawal_reason, listing.expired_on,
    )


@dataclass(frozen=True, slots=True)
class ListingFilter:
    kind: ListingKind | None = None
    municipality_code: str | None = None
    prefecture_code: str | None = None
    #: Only listings available on some day of [from, until].
    available_from: date | None = None
    available_until: date | None = None
    language: str | None = None
    statuses: Sequence[ListingStatus] | None = None
    #: Only listings not past their expiry on this day (the public view).
    open_on: date | None = None


async def listings(conn: Connection, f: ListingFilter, limit: int, offset: int) -> tuple[list[Listing], int]:
    where = """
        ($1::text IS NULL OR kind = $1) AND ($2::text IS NULL OR municipality_code = $2)
        AND ($3::text IS NULL OR prefecture_code = $3)
        AND ($4::date IS NULL OR available_until IS NULL OR available_until >= $4)
        AND ($5::date IS NULL OR available_from <= $5)
        AND ($6::text IS NULL OR language = $6) AND ($7::text[] IS NULL OR status = ANY($7))
        AND ($8::date IS NULL OR expires_on >= $8)
    """
    args = (f.kind, f.municipality_code, f.prefecture_code, f.available_from, f.available_until, f.language,
            None if f.statuses is None else list(f.statuses), f.open_on)
    rows = await conn.fetch(
        f"SELECT {_LISTING_COLUMNS} FROM listings WHERE {where} "
        "ORDER BY available_from, listing_id LIMIT $9 OFFSET $10", *args, limit, offset,
    )
    total = await conn.fetchval(f"SELECT count(*) FROM listings WHERE {where}", *args)
    return [_listing(row) for row in rows], int(total)


async def claim_due_to_expire(conn: Connection, today: date, limit: int) -> list[Listing]:
    """Published listings past their expiry, locked; another replica skips them (exactly once)."""
    rows = await conn.fetch(
        f"SELECT {_LISTING_COLUMNS} FROM listings WHERE status = 'published' AND expires_on < $1 "
        "ORDER BY expires_on, listing_id LIMIT $2 FOR UPDATE SKIP LOCKED", today, limit,
    )
    return [_listing(row) for row in rows]


# --- support corporations ------------------------------------------------------------------------


async def save_corporation(conn: Connection, corporation_id: str, code: str, name: str | None,
                           designated: bool) -> None:
    await conn.execute(
        """
        INSERT INTO corporations (corporation_id, municipality_code, name, designated) VALUES ($1, $2, $3, $4)
        ON CONFLICT (corporation_id) DO UPDATE SET
            designated = EXCLUDED.designated,
            name = CASE WHEN EXCLUDED.name = '' THEN corporations.name ELSE EXCLUDED.name END
        """,
        corporation_id, code, name or "", designated,
    )


async def designated_corporations(conn: Connection, code: str) -> frozenset[str]:
    rows = await conn.fetch(
        "SELECT corporation_id FROM corporations WHERE municipality_code = $1 AND designated", code
    )
    return frozenset(row["corporation_id"] for row in rows)


# --- where residents belong ----------------------------------------------------------------------


async def save_registrations(conn: Connection, rows: Sequence[tuple[str, str, str, str]]) -> None:
    """(registration id, resident id, municipality code, prefecture code) rows; those of a resident
    this service erased are left out (nothing about them is written again)."""
    # One statement for a consumer's whole run (DO NOTHING also takes a key twice in one statement),
    # the look at the erased included.
    await conn.execute(
        "INSERT INTO resident_registrations (registration_id, resident_id, municipality_code, prefecture_code) "
        "SELECT r.* FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) "
        "AS r(registration_id, resident_id, municipality_code, prefecture_code) "
        f"WHERE {_NOT_ERASED} ON CONFLICT (registration_id) DO NOTHING",
        *(list(column) for column in zip(*rows, strict=True)),
    )


async def delete_registration(conn: Connection, registration_id: str) -> None:
    await conn.execute("DELETE FROM resident_registrations WHERE registration_id = $1", registration_id)


async def save_certificates(conn: Connection, rows: Sequence[tuple[str, str, str]]) -> None:
    """(certificate number, resident id, municipality code) rows, in one statement; those of a
    resident this service erased are left out."""
    if rows:
        await conn.execute(
            "INSERT INTO resident_certificates (certificate_number, resident_id, municipality_code) "
            "SELECT r.* FROM unnest($1::text[], $2::text[], $3::text[]) "
            "AS r(certificate_number, resident_id, municipality_code) "
            f"WHERE {_NOT_ERASED} ON CONFLICT (certificate_number) DO NOTHING",
            *(list(column) for column in zip(*rows, strict=True)),
        )


#: The rows of a batch ``r`` not about a resident in the kit's ledger of erasures (``shared.kit.erasure``).
_NOT_ERASED = "NOT EXISTS (SELECT 1 FROM kit_erased_residents e WHERE e.resident_id = r.resident_id)"


async def delete_certificate(conn: Connection, certificate_number: str) -> None:
    await conn.execute("DELETE FROM resident_certificates WHERE certificate_number = $1", certificate_number)


async def registration_with(conn: Connection, resident_id: str, code: str) -> str | None:
    """The resident's registration with this municipality, if any."""
    value = await conn.fetchval(
        "SELECT registration_id FROM resident_registrations WHERE resident_id = $1 AND municipality_code = $2 "
        "ORDER BY registration_id LIMIT 1", resident_id, code,
    )
    return None if value is None else str(value)


# --- interests and matches -------------------------------------------------------------------------


def _interests(row: asyncpg.Record) -> Interests:
    return Interests(
        resident_id=row["resident_id"], kinds=frozenset(row["kinds"]),
        municipality_codes=frozenset(row["municipality_codes"]), prefecture_codes=frozenset(row["prefecture_codes"]),
        available_from=row["available_from"], available_until=row["available_until"], cadence=row["cadence"],
        consented_at=row["consented_at"], next_digest_at=row["next_digest_at"],
    )


_INTEREST_COLUMNS = (
    "resident_id, kinds, municipality_codes, prefecture_codes, available_from, available_until, cadence, "
    "consented_at, next_digest_at"
)


async def get_interests(conn: Connection, resident_id: str) -> Interests | None:
    row = await conn.fetchrow(f"SELECT {_INTEREST_COLUMNS} FROM interests WHERE resident_id = $1", resident_id)
    return None if row is None else _interests(row)


async def save_interests(conn: Connection, wanted: Interests) -> None:
    await conn.execute(
        f"""
        INSERT INTO interests ({_INTEREST_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        ON CONFLICT (resident_id) DO UPDATE SET
            kinds = EXCLUDED.kinds, municipality_codes = EXCLUDED.municipality_codes,
            prefecture_codes = EXCLUDED.prefecture_codes, available_from = EXCLUDED.available_from,
            available_until = EXCLUDED.available_until, cadence = EXCLUDED.cadence,
            consented_at = EXCLUDED.consented_at, next_digest_at = EXCLUDED.next_digest_at
        """,
        wanted.resident_id, sorted(wanted.kinds), sorted(wanted.municipality_codes), sorted(wanted.prefecture_codes),
        wanted.available_from, wanted.available_until, wanted.cadence, wanted.consented_at, wanted.next_digest_at,
    )


async def delete_interests(conn: Connection, resident_id: str) -> bool:
    """Revoking the consent: the interests go, and so do the matches not yet told."""
    await conn.execute("DELETE FROM matches WHERE resident_id = $1 AND digest_id IS NULL", resident_id)
    return str(await conn.execute("DELETE FROM interests WHERE resident_id = $1", resident_id)) != "DELETE 0"


async def candidates(conn: Connection, content: ListingContent) -> list[tuple[Interests, ResidentPlaces]]:
    """Residents with consented interests of the listing's kind who belong to its municipality or
    prefecture, with where they belong (the domain decides the rest)."""
    rows = await conn.fetch(
        f"""
        SELECT {", ".join("i." + c.strip() for c in _INTEREST_COLUMNS.split(","))},
               coalesce((SELECT array_agg(DISTINCT r.municipality_code) FROM resident_registrations r
                         WHERE r.resident_id = i.resident_id), '{{}}') AS registered,
               coalesce((SELECT array_agg(DISTINCT r.prefecture_code) FROM resident_registrations r
                         WHERE r.resident_id = i.resident_id), '{{}}') AS prefectures,
               coalesce((SELECT array_agg(DISTINCT c.municipality_code) FROM resident_certificates c
                         WHERE c.resident_id = i.resident_id), '{{}}') AS certified
        FROM interests i
        WHERE $1 = ANY(i.kinds) AND (
            EXISTS (SELECT 1 FROM resident_registrations r WHERE r.resident_id = i.resident_id
                    AND (r.municipality_code = $2 OR r.prefecture_code = $3))
            OR EXISTS (SELECT 1 FROM resident_certificates c WHERE c.resident_id = i.resident_id
                       AND c.municipality_code = $2))
        """,
        content.kind, content.municipality_code, content.prefecture_code,
    )
    return [
        (_interests(row), ResidentPlaces(frozenset(row["registered"]), frozenset(row["prefectures"]),
                                         frozenset(row["certified"])))
        for row in rows
    ]


async def add_matches(conn: Connection, listing_id: str, resident_ids: Iterable[str], at: datetime) -> None:
    await conn.executemany(
        "INSERT INTO matches (resident_id, listing_id, matched_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        [(resident_id, listing_id, at) for resident_id in resident_ids],
    )


@dataclass(frozen=True, slots=True)
class PendingMatch:
    resident_id: str
    listing: Listing


async def claim_pending_matches(conn: Connection, now: datetime, today: date, limit: int) -> list[PendingMatch]:
    """Matches not yet told whose resident's digest is due, locked (another replica skips them): each
    is carried by exactly one digest. Listings no longer open are left for ``drop_closed_matches``."""
    rows = await conn.fetch(
        f"""
        SELECT m.resident_id, {", ".join("l." + c.strip() for c in _LISTING_COLUMNS.split(","))}
        FROM matches m
        JOIN interests i ON i.resident_id = m.resident_id
        JOIN listings l ON l.listing_id = m.listing_id
        WHERE m.digest_id IS NULL AND l.status = 'published' AND l.expires_on >= $2
          AND (i.cadence = 'immediate' OR i.next_digest_at <= $1)
        ORDER BY m.resident_id, m.matched_at, m.listing_id
        LIMIT $3
        FOR UPDATE OF m SKIP LOCKED
        """,
        now, today, limit,
    )
    return [PendingMatch(row["resident_id"], _listing(row)) for row in rows]


async def drop_closed_matches(conn: Connection, today: date) -> int:
    """Matches of listings withdrawn or expired before they were told: nothing to tell any more."""
    result = await conn.execute(
        "DELETE FROM matches m USING listings l WHERE m.listing_id = l.listing_id AND m.digest_id IS NULL "
        "AND (l.status <> 'published' OR l.expires_on < $1)", today,
    )
    return int(str(result).split()[-1])


async def mark_digested(conn: Connection, resident_id: str, listing_ids: Sequence[str], digest_id: str,
                        at: datetime) -> None:
    await conn.execute(
        "UPDATE matches SET digest_id = $3, digested_at = $4 WHERE resident_id = $1 AND listing_id = ANY($2)",
        resident_id, list(listing_ids), digest_id, at,
    )


async def interests_of(conn: Connection, resident_ids: Sequence[str]) -> dict[str, Interests]:
    rows = await conn.fetch(
        f"SELECT {_INTEREST_COLUMNS} FROM interests WHERE resident_id = ANY($1::text[])", list(resident_ids)
    )
    return {row["resident_id"]: _interests(row) for row in rows}


async def set_next_digest(conn: Connection, resident_id: str, at: datetime | None) -> None:
    await conn.execute("UPDATE interests SET next_digest_at = $2 WHERE resident_id = $1", resident_id, at)


# --- "interested" and contact deliveries ----------------------------------------------------------


def _interest(row: asyncpg.Record) -> Interest:
    return Interest(row["resident_id"], row["listing_id"], row["share_contact"], row["expressed_at"],
                    row["contact_consent_at"])


async def get_interest(conn: Connection, resident_id: str, listing_id: str, *, lock: bool = False) -> Interest | None:
    row = await conn.fetchrow(
        "SELECT resident_id, listing_id, share_contact, expressed_at, contact_consent_at FROM listing_interests "
        f"WHERE resident_id = $1 AND listing_id = $2 {'FOR UPDATE' if lock else ''}", resident_id, listing_id,
    )
    return None if row is None else _interest(row)


async def save_interest(conn: Connection, interest: Interest) -> None:
    await conn.execute(
        """
        INSERT INTO listing_interests (resident_id, listing_id, share_contact, expressed_at, contact_consent_at)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (resident_id, listing_id) DO UPDATE SET
            share_contact = EXCLUDED.share_contact, expressed_at = EXCLUDED.expressed_at,
            contact_consent_at = EXCLUDED.contact_consent_at
        """,
        interest.resident_id, interest.listing_id, interest.share_contact, interest.expressed_at,
        interest.contact_consent_at,
    )


async def delete_interest(conn: Connection, resident_id: str, listing_id: str) -> bool:
    result = await conn.execute(
        "DELETE FROM listing_interests WHERE resident_id = $1 AND listing_id = $2", resident_id, listing_id
    )
    return str(result) != "DELETE 0"


async def interests_in_listing(conn: Connection, listing_id: str) -> list[Interest]:
    rows = await conn.fetch(
        "SELECT resident_id, listing_id, share_contact, expressed_at, contact_consent_at FROM listing_interests "
        "WHERE listing_id = $1 ORDER BY expressed_at, resident_id", listing_id,
    )
    return [_interest(row) for row in rows]


async def interests_of_resident(conn: Connection, resident_id: str) -> list[Interest]:
    rows = await conn.fetch(
        "SELECT resident_id, listing_id, share_contact, expressed_at, contact_consent_at FROM listing_interests "
        "WHERE resident_id = $1 ORDER BY expressed_at DESC, listing_id", resident_id,
    )
    return [_interest(row) for row in rows]


def _delivery(row: asyncpg.Record) -> ContactDelivery:
    return ContactDelivery(
        row["delivery_id"], row["listing_id"], row["resident_id"], row["recipient_kind"], row["recipient_id"],
        tuple(row["items"]), row["basis"], row["registration_id"], row["delivered_at"], row["delivered_by"],
    )


async def add_delivery(conn: Connection, d: ContactDelivery) -> None:
    await conn.execute(
        "INSERT INTO contact_deliveries (delivery_id, listing_id, resident_id, recipient_kind, recipient_id, items, "
        "basis, registration_id, delivered_at, delivered_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        d.delivery_id, d.listing_id, d.resident_id, d.recipient_kind, d.recipient_id, list(d.items), d.basis,
        d.registration_id, d.delivered_at, d.delivered_by,
    )


async def deliveries_of(conn: Connection, resident_id: str) -> list[ContactDelivery]:
    rows = await conn.fetch(
        "SELECT * FROM contact_deliveries WHERE resident_id = $1 ORDER BY delivered_at DESC, delivery_id", resident_id
    )
    return [_delivery(row) for row in rows]


async def prune_deliveries(conn: Connection, before: datetime) -> int:
    result = await conn.execute("DELETE FROM contact_deliveries WHERE delivered_at < $1", before)
    return int(str(result).split()[-1])


# --- erasure ---------------------------------------------------------------------------------------


async def erase_resident(conn: Connection, resident_id: str) -> dict[str, int]:
    """Everything about the resident but the record of contacts given (kept, under the random id)."""
    counts: dict[str, int] = {}
    for table in ("interests", "matches", "listing_interests", "resident_registrations", "resident_certificates"):
        result = await conn.execute(f"DELETE FROM {table} WHERE resident_id = $1", resident_id)
        counts[table] = int(str(result).split()[-1])
    return counts
