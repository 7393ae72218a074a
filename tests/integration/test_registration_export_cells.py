"""The registrations CSV's cells are formatted by PostgreSQL (issue 18: the download no longer costs
the service's one event loop Python work per cell): each cell must be exactly what the kit's
``csv_export.cell`` makes of the row's value in Japan time — whole seconds and fractions, dates,
empty values, formulas defused, the review's kind."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import asyncpg
import pytest
from fastapi import FastAPI

from services.registration import store
from services.registration.main import create_app
from shared.kit.clock import JAPAN
from shared.kit.csv_export import cell
from shared.kit.db import Connection
from shared.kit.service import ServiceRuntime
from shared.kit.settings import Settings
from shared.reference import municipality
from tests.support import service_client

NAHA = "472018"  # 沖縄県那覇市: no other test registers there


@pytest.fixture(scope="module")
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    app: FastAPI = create_app(settings, maintenance_interval_s=3600)
    async with service_client(app):
        runtime: ServiceRuntime = app.state.runtime
        yield runtime.pool


async def _seed(conn: Connection) -> None:
    people = [
        ("cells-1", "=HYPERLINK(\"http://x\")", "+81-3-1234-5678", "-a@example.jp",
         dt.datetime(2026, 3, 1, 15, 0, 0, tzinfo=dt.UTC)),
        ("cells-2", "山田 花子", None, "@b@example.jp", dt.datetime(2026, 3, 1, 15, 0, 0, 123456, tzinfo=dt.UTC)),
        ("cells-3", "佐藤\t次郎", "090", "c@example.jp", dt.datetime(2026, 3, 1, 15, 0, 1, 5, tzinfo=dt.UTC)),
    ]
    for resident_id, name, phone, email, at in people:
        await conn.execute(
            """
            INSERT INTO residents (id, status, name, name_kana, email, phone, date_of_birth, legal_address_code,
                                   preferred_language, created_at, updated_at)
            VALUES ($1, 'active', $2, 'ヤマダ', $3, $4, date '1980-01-01', '131016', 'ja', now(), now())
            ON CONFLICT (id) DO NOTHING
            """,
            resident_id, name, email, phone,
        )
        premium = resident_id == "cells-2"
        await conn.execute(
            """
            INSERT INTO registrations (id, resident_id, municipality_code, prefecture_code, tier, status,
                                       registered_at, updated_at, valid_from, valid_until)
            VALUES ('reg-' || $1, $1, $2, '47', $3, $4, $5, now(), $6, $7) ON CONFLICT (id) DO NOTHING
            """,
            resident_id, NAHA, "premium" if premium else "basic", "pending_review" if premium else "active", at,
            dt.date(2026, 4, 1) if premium else None, dt.date(2027, 3, 31) if premium else None,
        )
    await conn.execute(
        """
        INSERT INTO premium_reviews (id, registration_id, kind, status, requested_at)
        VALUES ('review-cells-2', 'reg-cells-2', 'initial', 'pending', now()) ON CONFLICT (id) DO NOTHING
        """
    )


def _python_cells(item: store.ListedRegistration) -> tuple[str, ...]:
    """The cells as the export wrote them before (Python per cell)."""
    r = item.registration
    values: list[object] = [
        r.id, r.resident_id, r.municipality_code, municipality(r.municipality_code).full_name, r.tier, r.status,
        r.registered_at, r.valid_from, r.valid_until, r.pending_review, item.name, item.name_kana, item.email,
        item.phone, item.preferred_language,
    ]
    return tuple(cell(v.astimezone(JAPAN) if isinstance(v, dt.datetime) else v) for v in values)


async def test_the_databases_cells_are_the_kits_cells(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await _seed(conn)
        f = store.RegistrationFilter(municipality_code=NAHA)
        listed = await store.registrations_after(conn, f, None, 10)
        first = await store.export_page(conn, f, municipality(NAHA).full_name, None, 2)
        rest = await store.export_page(conn, f, municipality(NAHA).full_name, first.next_after, 2)
    expected = [_python_cells(item) for item in listed]
    assert len(expected) == 3
    assert first.rows + rest.rows == expected
    assert first.next_after is not None and rest.next_after is None  # a short page is the last
    assert expected[0][10] == "'=HYPERLINK(\"http://x\")" and expected[0][13] == "'+81-3-1234-5678"
    assert expected[0][6] == "2026-03-02T00:00:00+09:00" and expected[1][6] == "2026-03-02T00:00:00.123456+09:00"
    assert expected[1][7:10] == ("2026-04-01", "2027-03-31", "initial") and expected[1][13] == ""
