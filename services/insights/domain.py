"""The rules of insights: what each event changes in the read model, who may read which scope,
small-cell suppression of public figures, and the KPI line.

Pure: no I/O. The store applies the ``Change`` rows this module derives, in order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Literal

from shared.contracts.base import EventData
from shared.contracts.certification import (
    CertificateExpired,
    CertificateExpiring,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
)
from shared.contracts.donation import DonationReceived, DonationRefunded
from shared.contracts.planning import CorporationDesignated, CorporationRevoked, PlanAdopted, PlanWithdrawn
from shared.contracts.registration import (
    PremiumApproved,
    PremiumExpired,
    PremiumRejected,
    RegistrationWithdrawn,
    ResidentRegistered,
    ResidentWithdrawn,
)
from shared.contracts.subsidy import (
    GrantCancelled,
    GrantExpired,
    GrantIssued,
    GrantRedeemed,
    GrantWaitlisted,
)
from shared.kit.auth import Principal, Role
from shared.kit.clock import japan_date
from shared.kit.errors import DomainError, Forbidden
from shared.reference import UnknownMunicipality, municipality, prefecture_of

#: Every event type the read model applies (the others on its topics are skipped by the router).
PROJECTED: tuple[type[EventData], ...] = (
    ResidentRegistered, PremiumApproved, PremiumRejected, PremiumExpired, RegistrationWithdrawn, ResidentWithdrawn,
    CertificateIssued, CertificateRenewed, CertificateRevoked, CertificateExpiring, CertificateExpired,
    GrantIssued, GrantWaitlisted, GrantRedeemed, GrantCancelled, GrantExpired,
    DonationReceived, DonationRefunded,
    PlanAdopted, PlanWithdrawn, CorporationDesignated, CorporationRevoked,
)

#: 広域的地域活性化基盤整備法 as amended in 2024 came into force on 1 November 2024; the KPIs count
#: five years from then: 600 municipal plans (特定居住促進計画) and 600 support corporations.
ENTRY_INTO_FORCE = date(2024, 11, 1)
KPI_DEADLINE = date(2029, 10, 31)
KPI_TARGET = 600

#: Public figures show no count of people under this (the cell is withheld, see ``suppress``).
MIN_PUBLIC_CELL = 10

Op = Literal[
    "register", "approve_premium", "reject_premium", "end_registration", "erase",
    "certificate", "grant_waitlisted", "grant_issued", "grant_ended", "redemption",
    "donation", "refund", "plan_adopted", "plan_withdrawn", "designated", "corporation_revoked",
]


@dataclass(frozen=True, slots=True)
class Change:
    """One row change of the read model: the store has one statement per ``op``."""

    op: Op
    args: tuple[object, ...]


def _prefecture(code: str) -> str:
    """The prefecture of a municipality code; the code itself when the table does not know it (a
    figure is never lost to a code the reference data lacks)."""
    with contextlib.suppress(UnknownMunicipality):
        return prefecture_of(code).code
    return code


def _month(day: date) -> date:
    return day.replace(day=1)


def changes_of(events: Iterable[EventData], erased: dict[str, date]) -> list[Change]:
    """The row changes of these events in order. ``erased``: residents known to be erased, with the
    day (it grows with each ``ResidentWithdrawn``): their ids are never written, their events still
    count, and a registration of theirs read again (a rebuild) ends on the day of the erasure, as
    it did when the erasure was first applied."""
    out: list[Change] = []

    def rid(resident_id: str | None) -> str | None:
        return None if resident_id is None or resident_id in erased else resident_id

    for e in events:
        match e:
            case ResidentRegistered():
                for r in e.registrations():  # with the prefecture's it brought
                    out.append(Change("register", (
                        r.registration_id, rid(r.resident_id), r.municipality_code, r.prefecture_code, r.tier,
                        r.status, japan_date(r.registered_at),
                    )))
                    if r.resident_id in erased:
                        out.append(Change("end_registration", (r.registration_id, "withdrawn", erased[r.resident_id])))
            case PremiumApproved():
                out.append(Change("approve_premium", (e.registration_id,)))
            case PremiumRejected():
                out.append(Change("reject_premium", (e.registration_id,)))
            case PremiumExpired():
                out.append(Change("end_registration", (e.registration_id, "expired", e.expired_on)))
            case RegistrationWithdrawn():
                out.append(Change("end_registration", (e.registration_id, "withdrawn", japan_date(e.withdrawn_at))))
            case ResidentWithdrawn():
                erased.setdefault(e.resident_id, japan_date(e.withdrawn_at))
                out.append(Change("erase", (e.resident_id, japan_date(e.withdrawn_at))))
            case CertificateIssued() | CertificateRenewed() | CertificateRevoked() | CertificateExpiring() \
                    | CertificateExpired():
                issued_on = japan_date(e.issued_at) if isinstance(e, CertificateIssued) else None
                out.append(Change("certificate", (
                    e.certificate_number, rid(e.resident_id), e.municipality_code, _prefecture(e.municipality_code),
                    e.status, e.valid_from, e.valid_until, issued_on,
                )))
            case GrantWaitlisted():
                out.append(Change("grant_waitlisted", (
                    e.grant_id, e.program_id, e.partner, e.mechanism, e.municipality_code,
                    _prefecture(e.municipality_code), e.unit,
                )))
            case GrantIssued():
                out.append(Change("grant_issued", (
                    e.grant_id, e.program_id, e.partner, e.mechanism, e.municipality_code,
                    _prefecture(e.municipality_code), e.unit, e.reserved,
                )))
            case GrantRedeemed():
                out.append(Change("redemption", (
                    e.grant_id, e.trip_id, e.program_id, e.municipality_code, _prefecture(e.municipality_code),
                    e.unit, e.amount, japan_date(e.redeemed_at), e.completed,
                )))
            case GrantCancelled():
                out.append(Change("grant_ended", (e.grant_id, "cancelled")))
            case GrantExpired():
                out.append(Change("grant_ended", (e.grant_id, "expired")))
            case DonationReceived():
                out.append(Change("donation", (
                    e.donation_id, e.municipality_code, _prefecture(e.municipality_code), e.kind, e.unit, e.amount,
                    e.earmark, _month(japan_date(e.received_at)),
                )))
            case DonationRefunded():
                out.append(Change("refund", (e.donation_id,)))
            case PlanAdopted():
                out.append(Change("plan_adopted", (
                    e.plan_id, e.level, e.municipality_code, e.prefecture_code, e.adopted_on,
                )))
            case PlanWithdrawn():
                out.append(Change("plan_withdrawn", (e.plan_id, e.withdrawn_on)))
            case CorporationDesignated():
                out.append(Change("designated", (
                    e.corporation_id, e.municipality_code, _prefecture(e.municipality_code), e.designated_on,
                )))
            case CorporationRevoked():
                out.append(Change("corporation_revoked", (e.corporation_id, e.revoked_on)))
            case _:
                pass  # a type on these topics the figures do not need
    return out


def resident_ids(events: Iterable[EventData]) -> set[str]:
    """Every resident id these events name (to look up which were erased, in one query)."""
    return {found for e in events if isinstance(found := getattr(e, "resident_id", None), str)}


# --- who reads what ------------------------------------------------------------------------------


class OutOfScope(Forbidden):
    code = "out-of-scope"


class UnknownArea(DomainError):
    code = "unknown-area"
    status = 422
    title = "No such prefecture or municipality"


@dataclass(frozen=True, slots=True)
class Scope:
    """The area a reading covers: everything, one prefecture, or one municipality."""

    prefecture: str | None = None
    municipality: str | None = None

    @property
    def label(self) -> str:
        return self.municipality or self.prefecture or "national"


def scope_for(principal: Principal | None, prefecture: str | None, municipality_code: str | None) -> Scope:
    """The scope a reader asked for, narrowed to what they may see (``None``: the public, who see
    everything but only suppressed). Ministry and admin: any; a prefecture reader: their prefecture
    or one of its municipalities; municipal staff: their municipality."""
    if municipality_code is not None:
        try:
            found = municipality(municipality_code)
        except UnknownMunicipality as error:
            raise UnknownArea(str(error)) from None
        if found.kind == "prefecture":
            raise UnknownArea(f"{municipality_code} is a prefecture: ask with prefecture=")
        if prefecture is not None and found.prefecture_code != prefecture:
            raise UnknownArea(f"{municipality_code} is not in prefecture {prefecture}")
        prefecture = found.prefecture_code
    elif prefecture is not None:
        try:
            found = municipality(prefecture)
        except UnknownMunicipality as error:
            raise UnknownArea(str(error)) from None
        if found.kind != "prefecture":
            raise UnknownArea(f"{prefecture} is not a prefecture")
    asked = Scope(prefecture, municipality_code)
    if principal is None or principal.role in (Role.MINISTRY, Role.ADMIN):
        return asked
    if principal.role is Role.PREFECTURE:
        if asked.prefecture is None:
            return Scope(principal.prefecture)
        if asked.prefecture != principal.prefecture:
            raise OutOfScope(f"prefecture {principal.prefecture} only")
        return asked
    if principal.role is Role.STAFF and principal.municipality is not None:
        own = principal.municipality
        if asked.municipality not in (None, own) or asked.prefecture not in (None, _prefecture(own)):
            raise OutOfScope(f"municipality {own} only")
        return Scope(_prefecture(own), own)
    raise OutOfScope(f"the role {principal.role.value} reads no insights")


# --- figures -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegistrationFigure:
    """Active registrations of one municipality (or of a prefecture itself) by tier."""

    municipality_code: str
    prefecture_code: str
    basic: int
    premium: int

    @property
    def total(self) -> int:
        return self.basic + self.premium


@dataclass(frozen=True, slots=True)
class MonthlyRegistrations:
    municipality_code: str
    month: date
    tier: str
    new: int
    ended: int


@dataclass(frozen=True, slots=True)
class CertificateFigure:
    municipality_code: str
    prefecture_code: str
    valid: int
    revoked: int
    expired: int


@dataclass(frozen=True, slots=True)
class ProgrammeFigure:
    program_id: str
    partner: str
    municipality_code: str
    unit: str
    issued: int
    waitlisted: int
    active: int
    reserved: int
    #: Miles or yen redeemed (the unit says which), and the trips counted.
    spent: int
    trips: int


@dataclass(frozen=True, slots=True)
class DonationFigure:
    municipality_code: str
    kind: str
    unit: str
    month: date
    count: int
    amount: int
    refunded: int


@dataclass(frozen=True, slots=True)
class RelationshipFigure:
    """People connected to a municipality: with an active registration there, with a valid
    certificate there, and either (one person counted once)."""

    municipality_code: str
    prefecture_code: str
    registered: int
    certified: int
    people: int
    population: int | None = None

    @property
    def per_1000(self) -> float | None:
        if not self.population:
            return None
        return round(self.people * 1000 / self.population, 3)


@dataclass(frozen=True, slots=True)
class KpiPoint:
    """A month end: what was in force then (None for months still to come) and the line."""

    month_end: date
    plans: int | None
    corporations: int | None
    line: float


@dataclass(frozen=True, slots=True)
class Kpis:
    as_of: date
    plans_in_force: int
    plans_made: int
    corporations_designated: int
    corporations_made: int
    line_today: float
    series: list[KpiPoint] = field(default_factory=list)
    target: int = KPI_TARGET
    entry_into_force: date = ENTRY_INTO_FORCE
    deadline: date = KPI_DEADLINE


def kpi_line(on: date) -> float:
    """Where a steady pace to 600 by the deadline stands on ``on`` (0 before entry into force)."""
    total = (KPI_DEADLINE - ENTRY_INTO_FORCE).days + 1
    elapsed = min(max((on - ENTRY_INTO_FORCE).days + 1, 0), total)
    return round(KPI_TARGET * elapsed / total, 1)


def month_ends(until: date) -> list[date]:
    """The last day of every month from entry into force through the deadline or ``until``,
    whichever is later (the chart shows the whole five years)."""
    last = max(until, KPI_DEADLINE)
    out, year, month = [], ENTRY_INTO_FORCE.year, ENTRY_INTO_FORCE.month
    while (year, month) <= (last.year, last.month):
        nxt = date(year + (month == 12), month % 12 + 1, 1)
        out.append(date.fromordinal(nxt.toordinal() - 1))
        year, month = nxt.year, nxt.month
    return out


def in_force_on(spans: Sequence[tuple[date, date | None]], on: date) -> int:
    """How many of these (start, end) spans are in force on ``on`` (an end day is no longer in force)."""
    return sum(1 for start, end in spans if start <= on and (end is None or end > on))


def kpis(plan_spans: Sequence[tuple[date, date | None]], corporation_spans: Sequence[tuple[date, date | None]],
         today: date) -> Kpis:
    """Municipal plans and support corporations in force against the 600 + 600 line, per month end
    (the current month counted as of today; months to come carry the line only)."""
    series = []
    for end in month_ends(today):
        started = end.replace(day=1) <= today
        on = min(end, today)
        series.append(KpiPoint(
            end, in_force_on(plan_spans, on) if started else None,
            in_force_on(corporation_spans, on) if started else None, kpi_line(end),
        ))
    return Kpis(
        as_of=today, plans_in_force=in_force_on(plan_spans, today), plans_made=len(plan_spans),
        corporations_designated=in_force_on(corporation_spans, today), corporations_made=len(corporation_spans),
        line_today=kpi_line(today), series=series,
    )


# --- small-cell suppression ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SuppressedRow:
    """A public row: ``cells`` by column, the row total last; a withheld cell is None."""

    key: str
    group: str
    cells: dict[str, int | None]

    @property
    def suppressed(self) -> list[str]:
        return [name for name, value in self.cells.items() if value is None]


def suppress(rows: Sequence[tuple[str, str, dict[str, int]]], total: str | None = None, *,
             group_sums: bool = False, minimum: int = MIN_PUBLIC_CELL) -> list[SuppressedRow]:
    """Withhold every count under ``minimum`` (primary suppression), then enough others that none
    can be worked out again (complementary suppression).

    ``rows``: (key, group, {column: count}); ``total`` names the column that is the sum of the
    others, if one is. Sums a reader could subtract from: the row total, and, with ``group_sums``
    (when each group's column sums are published too), each column's sum over a group. Wherever
    exactly one cell of such a sum is withheld, the smallest shown cell of it is withheld too, until
    no sum has exactly one. What this does not cover: sums across different tables or releases
    (a reader comparing last month's table with this one), which a publication must watch itself.
    """
    cells = [{name: value for name, value in counts.items()} for _, _, counts in rows]
    hidden = [{name for name, value in counts.items() if value < minimum} for counts in cells]
    parts = [name for name in (cells[0] if cells else {}) if name != total]

    def settle(members: list[tuple[int, str]]) -> bool:
        withheld = [(i, c) for i, c in members if c in hidden[i]]
        if len(withheld) != 1:
            return False
        shown = [(cells[i][c], i, c) for i, c in members if c not in hidden[i]]
        if not shown:
            return False
        _, i, c = min(shown)
        hidden[i].add(c)
        return True

    changed = True
    while changed:
        changed = False
        if total is not None:
            for i in range(len(cells)):
                changed |= settle([(i, c) for c in parts] + [(i, total)])
        if not group_sums:
            continue
        groups: dict[str, list[int]] = {}
        for i, (_, group, _) in enumerate(rows):
            groups.setdefault(group, []).append(i)
        for indices in groups.values():
            for column in cells[0] if cells else {}:
                changed |= settle([(i, column) for i in indices])
    return [
        SuppressedRow(key, group, {name: (None if name in hidden[i] else value) for name, value in cells[i].items()})
        for i, (key, group, _) in enumerate(rows)
    ]


def with_population(figure: RelationshipFigure, population: int | None) -> RelationshipFigure:
    return replace(figure, population=population)
