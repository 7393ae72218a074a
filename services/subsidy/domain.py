"""The rules of travel subsidies, pure Python: programs, grant values and windows, trips, budgets.

Nothing here does I/O. Amounts are ``int`` (yen or miles) everywhere; a one-way trip is one
*leg* and a round trip two, so mileage grants count "N round trips" as ``2 * N`` legs without
fractions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.contracts.formats import ProgramId, ProgramIdError
from shared.contracts.partners import TripKind
from shared.contracts.sealed import Sealed
from shared.contracts.subsidy import BudgetUnit, Mechanism, RedemptionRefusal
from shared.kit.errors import Conflict, DomainError, Forbidden, NotFound
from shared.reference import TravelProgram, UnknownMunicipality, municipality

GrantStatus = Literal["waitlisted", "issued", "completed", "cancelled", "expired"]
GRANT_STATUSES: tuple[str, ...] = get_args(GrantStatus)
LedgerKind = Literal["opening", "top_up", "donation", "debit", "reserve", "draw", "release"]
Channel = Literal["kafka", "http"]

#: The budget unit of each mechanism: mileage grants pay out miles, the others yen.
UNIT_OF: Mapping[Mechanism, BudgetUnit] = {
    "mileage_grant": "miles", "fare_discount": "jpy", "fare_voucher": "jpy",
}


# --- errors: one per rule a caller can break ------------------------------------------------------


class MunicipalityNotFound(NotFound):
    code = "municipality-not-found"
    title = "No municipality has this code"


def known_municipality(code: str) -> str:
    """A municipality code from a path: 404 if no municipality has it."""
    try:
        municipality(code)
    except UnknownMunicipality:
        raise MunicipalityNotFound(f"no municipality has code {code!r}") from None
    return code


class UnknownProgram(NotFound):
    code = "unknown-program"
    title = "No such program"


class ProgramExists(Conflict):
    code = "program-exists"
    title = "A program with this id exists"


class UnknownPartner(DomainError):
    code = "unknown-partner"
    status = 422
    title = "No partner has this code"


class InvalidProgramParameters(DomainError):
    code = "invalid-program-parameters"
    title = "The program parameters make no sense"


class InvalidProgramPeriod(DomainError):
    code = "invalid-program-period"
    title = "The program's active period ends before it starts"


class ProgramPeriodInPast(DomainError):
    code = "program-period-in-past"
    title = "The program's active period is over already"


class InvalidAmount(DomainError):
    code = "invalid-amount"
    title = "Amounts are positive whole yen or miles"


class UnitMismatch(DomainError):
    code = "unit-mismatch"
    title = "The program's budget is kept in another unit"


class AmountNotConvertible(DomainError):
    code = "amount-not-convertible"
    title = "The amount does not convert to whole miles"


class UnknownGrant(NotFound):
    code = "unknown-grant"
    title = "No such grant for this certificate"


class WrongPartner(Forbidden):
    code = "wrong-partner"
    title = "The grant belongs to another partner's program"


class DuplicateTrip(Conflict):
    code = "duplicate-trip"
    title = "The trip id was already reported with other details"


class InvalidDiscount(DomainError):
    code = "invalid-discount"
    title = "The discount does not fit the grant"


# --- programs -------------------------------------------------------------------------------------


class _Parameters(BaseModel):
    # strict: 1.5, "100" and true are not integers here
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class MileageParameters(_Parameters):
    """After ``required_round_trips`` round trips in the window, ``max_one_ways`` one-ways' worth of miles."""

    required_round_trips: int = Field(ge=1, le=100)
    max_one_ways: int = Field(ge=1, le=100)
    miles_per_one_way: int = Field(ge=1, le=1_000_000)
    window_days: int = Field(ge=1, le=3660)
    #: How many yen buy one mile, to credit yen donations and top-ups to a miles budget.
    jpy_per_mile: int | None = Field(default=None, ge=1, le=10_000)

    @property
    def grant_value(self) -> int:
        return self.max_one_ways * self.miles_per_one_way

    @property
    def window_length(self) -> int | None:
        return self.window_days


class VoucherParameters(_Parameters):
    """``voucher_jpy`` per one-way trip, up to ``max_one_ways`` per certificate year."""

    voucher_jpy: int = Field(ge=1, le=10_000_000)
    max_one_ways: int = Field(ge=1, le=1000)
    window_days: int | None = Field(default=None, ge=1, le=3660)

    @property
    def grant_value(self) -> int:
        return self.voucher_jpy * self.max_one_ways

    @property
    def window_length(self) -> int | None:
        return self.window_days


class DiscountParameters(_Parameters):
    """The partner's discount per trip, at most ``max_discount_jpy`` a leg and ``max_one_ways`` legs a year.

    Either a percentage off the fare (``discount_percent``: the ferries, illustrative) or, without
    it, the partner's fixed fares for a limited number of participants (ANA): the fares and the cap
    are the program's terms (``Program.fare_products``, ``Program.participant_cap``), the discount a
    trip reports is what the fixed fare saved."""

    discount_percent: int | None = Field(default=None, ge=1, le=100)
    max_discount_jpy: int = Field(ge=1, le=10_000_000)
    max_one_ways: int = Field(ge=1, le=1000)
    window_days: int | None = Field(default=None, ge=1, le=3660)

    @property
    def grant_value(self) -> int:
        """The per-certificate envelope reserved at issue: every leg at its cap."""
        return self.max_discount_jpy * self.max_one_ways

    @property
    def window_length(self) -> int | None:
        return self.window_days


Parameters = MileageParameters | VoucherParameters | DiscountParameters
_PARAMETER_MODELS: Mapping[Mechanism, type[Parameters]] = {
    "mileage_grant": MileageParameters, "fare_voucher": VoucherParameters, "fare_discount": DiscountParameters,
}


def parse_parameters(mechanism: Mechanism, raw: Mapping[str, Any]) -> Parameters:
    try:
        return _PARAMETER_MODELS[mechanism].model_validate(dict(raw))
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'parameters'}: {e['msg']}" for e in error.errors()
        )
        raise InvalidProgramParameters(f"{mechanism}: {problems}") from error


@dataclass(frozen=True, slots=True)
class FareProduct:
    """A fixed fare the partner sells the program's participants (one way)."""

    route: str
    fare_jpy: int


def check_programme_terms(
    mechanism: Mechanism, parameters: Parameters, fare_products: Sequence[FareProduct], participant_cap: int | None
) -> None:
    """A fare discount is a percentage or fixed fares with a participant cap, never both; fixed fares
    and caps belong to fare discounts only."""
    if participant_cap is not None and participant_cap < 1:
        raise InvalidProgramParameters(f"participant_cap is at least 1, not {participant_cap}")
    for product in fare_products:
        if product.fare_jpy <= 0 or not product.route:
            raise InvalidProgramParameters(f"fare product {product.route!r}: a route and a positive fare in yen")
    if not isinstance(parameters, DiscountParameters):
        if fare_products:
            raise InvalidProgramParameters(f"{mechanism}: fixed fares belong to fare_discount programs")
        return
    if parameters.discount_percent is None and participant_cap is None:
        raise InvalidProgramParameters(
            "fare_discount: either discount_percent, or fixed fares for a limited number of participants "
            "(participant_cap)"
        )
    if parameters.discount_percent is not None and fare_products:
        raise InvalidProgramParameters("fare_discount: fixed fares replace discount_percent; give one of them")


@dataclass(frozen=True, slots=True)
class Program:
    program_id: str
    title: str
    partner: str
    municipality_code: str
    mechanism: Mechanism
    unit: BudgetUnit
    parameters: Parameters
    active_from: date
    active_until: date
    reference_program: str | None = None
    #: The partner's fixed fares for participants (ANA), as published.
    fare_products: tuple[FareProduct, ...] = ()
    #: How many residents the program takes at once (a grant issued or used up holds a place).
    participant_cap: int | None = None
    #: One grant per resident and certificate year in one participating municipality only (JAL).
    one_region_per_year: bool = False

    @property
    def grant_value(self) -> int:
        return self.parameters.grant_value

    @property
    def scheme(self) -> str:
        """What "the same program in another region" means: the reference program, else the program."""
        return self.reference_program or self.program_id

    def is_full(self, participants: int) -> bool:
        """Whether the participant cap leaves no place for one more resident."""
        return self.participant_cap is not None and participants >= self.participant_cap

    def is_active_on(self, day: date) -> bool:
        return self.active_from <= day <= self.active_until

    def window_for(self, year: CertificateYear) -> tuple[date, date] | None:
        """The days trips count in one certificate year: from the year's start, ``window_days``
        long (if set), never past the certificate or the program. None if nothing is left of it."""
        start = max(year.start, self.active_from)
        end = min(year.end, self.active_until)
        length = self.parameters.window_length
        if length is not None:
            end = min(end, year.start + timedelta(days=length - 1))
        return (start, end) if start <= end else None


@dataclass(frozen=True, slots=True)
class CertificateYear:
    """One year of a certificate's validity, counted from its valid_from: grants are per year."""

    start: date
    end: date


def _add_years(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February
        return day.replace(year=day.year + years, day=28)


def certificate_years(valid_from: date, valid_until: date, today: date, limit: int = 10) -> list[CertificateYear]:
    """The certificate years that are not over yet. A renewal extends valid_until under the same
    valid_from, so it adds the years it reaches into and keeps the years already granted."""
    years: list[CertificateYear] = []
    for k in range(limit):
        start = _add_years(valid_from, k)
        if start > valid_until:
            break
        end = min(_add_years(valid_from, k + 1) - timedelta(days=1), valid_until)
        if end >= today:
            years.append(CertificateYear(start, end))
    return years


def check_program_period(active_from: date, active_until: date, today: date) -> None:
    if active_until < active_from:
        raise InvalidProgramPeriod(f"active_until {active_until} is before active_from {active_from}")
    if active_until < today:
        raise ProgramPeriodInPast(f"active_until {active_until} is in the past (today is {today} in Japan)")


@dataclass(frozen=True, slots=True)
class SeedDefaults:
    """Illustrative numbers for programs seeded from the reference data (configurable)."""

    active_from: date
    active_until: date
    required_round_trips: int
    jpy_per_mile: int
    max_discount_jpy: int
    discount_max_one_ways: int


def seed_program(reference: TravelProgram, municipality_code: str, defaults: SeedDefaults) -> Program:
    """The program row of one reference program in one participating municipality."""
    demo = dict(reference.demo_parameters)
    raw: dict[str, Any]
    if reference.mechanism == "mileage_grant":
        raw = {
            "required_round_trips": demo.get("required_round_trips", defaults.required_round_trips),
            "max_one_ways": demo["max_one_ways"],
            "miles_per_one_way": demo["miles_per_one_way"],
            "window_days": demo["window_days"],
            "jpy_per_mile": demo.get("jpy_per_mile", defaults.jpy_per_mile),
        }
    elif reference.mechanism == "fare_voucher":
        raw = {"voucher_jpy": demo["voucher_jpy"], "max_one_ways": demo["max_one_ways"]}
    else:
        raw = {
            "max_discount_jpy": demo.get("max_discount_jpy", defaults.max_discount_jpy),
            "max_one_ways": demo.get("max_one_ways", defaults.discount_max_one_ways),
        }
        if "discount_percent" in demo:
            raw["discount_percent"] = demo["discount_percent"]
    return Program(
        program_id=ProgramId.format(reference.program_id, municipality_code),
        title=f"{reference.partner}: {reference.seed_terms}",
        partner=reference.partner_code,
        municipality_code=municipality_code,
        mechanism=reference.mechanism,
        unit=UNIT_OF[reference.mechanism],
        parameters=parse_parameters(reference.mechanism, raw),
        active_from=defaults.active_from,
        active_until=defaults.active_until,
        reference_program=reference.program_id,
        fare_products=tuple(
            FareProduct(route=product.route, fare_jpy=product.fare_jpy)
            for product in reference.fare_products_for(municipality_code)
        ),
        participant_cap=demo.get("participant_cap"),
        one_region_per_year=reference.one_region_per_year,
    )


@dataclass(frozen=True, slots=True)
class HeldGrant:
    """A grant a resident holds (or held) under the same scheme, in any municipality."""

    grant_id: str
    municipality_code: str
    status: GrantStatus
    window_from: date
    window_until: date


def one_region_conflict(
    program: Program, municipality_code: str, window: tuple[date, date], held: Sequence[HeldGrant]
) -> HeldGrant | None:
    """Under a one-region program (JAL: a grant per resident per certificate year in one region only),
    the resident's grant of another municipality whose window overlaps this one (a cancelled grant
    does not count). None: the grant may be made."""
    if not program.one_region_per_year:
        return None
    for grant in held:
        if grant.municipality_code == municipality_code or grant.status == "cancelled":
            continue
        if grant.window_from <= window[1] and window[0] <= grant.window_until:
            return grant
    return None


def resolve_program_id(named: str, municipality_code: str) -> str:
    """A donor may name our program id or the reference program (then: its row for the municipality)."""
    try:
        return ProgramId.named(named, municipality_code).text
    except ProgramIdError:
        return named  # the id of no program of ours: the lookup finds none and the donation stays unallocated


# --- budgets --------------------------------------------------------------------------------------

#: How each ledger kind moves a budget: (available, reserved, spent) per unit of amount.
_LEDGER_EFFECTS: Mapping[LedgerKind, tuple[int, int, int]] = {
    "opening": (1, 0, 0),
    "top_up": (1, 0, 0),
    "donation": (1, 0, 0),
    "debit": (-1, 0, 0),
    "reserve": (-1, 1, 0),
    "draw": (0, -1, 1),
    "release": (1, -1, 0),
}


def ledger_deltas(kind: LedgerKind, amount: int) -> tuple[int, int, int]:
    if amount <= 0:
        raise ValueError(f"a ledger amount is positive, not {amount}")
    a, r, s = _LEDGER_EFFECTS[kind]
    return a * amount, r * amount, s * amount


def check_positive_amount(amount: int, what: str = "amount") -> None:
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise InvalidAmount(f"{what} must be a positive integer, not {amount!r}")


@dataclass(frozen=True, slots=True)
class Conversion:
    credited: int  # in the program's unit
    remainder: int  # in the given unit, not credited


def convert_to_program_unit(program: Program, unit: BudgetUnit, amount: int) -> Conversion:
    """Credit ``amount`` of ``unit`` to the program's budget: same unit as is, yen to miles at
    the program's ``jpy_per_mile`` (whole miles; the yen left over are the remainder)."""
    if unit == program.unit:
        return Conversion(amount, 0)
    rate = getattr(program.parameters, "jpy_per_mile", None)
    if unit == "jpy" and program.unit == "miles" and isinstance(rate, int):
        return Conversion(amount // rate, amount % rate)
    raise UnitMismatch(f"program {program.program_id} keeps its budget in {program.unit}, not {unit}")


def convert_top_up(program: Program, unit: BudgetUnit, amount: int) -> int:
    """Top-ups must convert exactly: staff never lose yen to rounding."""
    check_positive_amount(amount)
    conversion = convert_to_program_unit(program, unit, amount)
    if conversion.remainder or conversion.credited <= 0:
        rate = getattr(program.parameters, "jpy_per_mile", None)
        raise AmountNotConvertible(f"{amount} yen is not a whole number of miles at {rate} yen per mile")
    return conversion.credited


@dataclass(frozen=True, slots=True)
class FundingCandidate:
    program: Program
    #: The arrival number of the program's first waitlisted grant, if any grant waits.
    waiting_since: int | None


def choose_program_for_donation(
    candidates: Sequence[FundingCandidate], unit: BudgetUnit, today: date
) -> Program | None:
    """Where a donation that names no program goes, among the municipality's programs: active
    ones that can take the unit; same unit before converted; the longest waiting queue first;
    then by program id."""
    usable: list[tuple[int, int, str, Program]] = []
    for candidate in candidates:
        program = candidate.program
        if not program.is_active_on(today):
            continue
        try:
            convert_to_program_unit(program, unit, 1)
        except UnitMismatch:
            continue
        waiting = candidate.waiting_since if candidate.waiting_since is not None else 2**62
        usable.append((0 if program.unit == unit else 1, waiting, program.program_id, program))
    return min(usable, key=lambda c: c[:3])[3] if usable else None


# --- grants ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertificateState:
    certificate_number: str
    resident_id: str
    municipality_code: str
    valid_from: date
    valid_until: date
    status: Literal["valid", "revoked", "expired"]


@dataclass(frozen=True, slots=True)
class GrantState:
    grant_id: str
    program_id: str
    certificate_number: str
    resident_id: str
    municipality_code: str
    partner: str
    mechanism: Mechanism
    unit: BudgetUnit
    #: As the certificate carried it: sealed with the resident's data key (never opened here).
    member_number: Sealed | None
    status: GrantStatus
    value: int
    remaining: int
    legs_counted: int
    window_from: date
    window_until: date
    waitlist_seq: int | None


@dataclass(frozen=True, slots=True)
class Trip:
    trip_kind: TripKind
    travelled_on: date
    discount_jpy: int | None = None

    @property
    def legs(self) -> int:
        return 2 if self.trip_kind == "round_trip" else 1


@dataclass(frozen=True, slots=True)
class Accepted:
    amount: int  # drawn from the grant's reservation now
    legs_counted: int  # after this trip
    completed: bool
    release: int = 0  # the reservation left over on completion, back to the budget


@dataclass(frozen=True, slots=True)
class Refused:
    reason: RedemptionRefusal
    detail: str


Decision = Accepted | Refused


def check_discount(mechanism: Mechanism, discount_jpy: int | None) -> None:
    """The shape of a report: only fare-discount trips carry a discount, a positive number of yen."""
    if mechanism == "fare_discount":
        if discount_jpy is None or discount_jpy <= 0:
            raise InvalidDiscount("a fare_discount trip reports discount_jpy, a positive number of yen")
    elif discount_jpy is not None:
        raise InvalidDiscount(f"a {mechanism} trip carries no discount_jpy")


def decide_trip(
    grant: GrantState, certificate: CertificateState, trip: Trip, parameters: Parameters, today: date
) -> Decision:
    """Whether one reported trip counts against the grant, and what it draws."""
    if certificate.status == "revoked":
        return Refused("certificate_revoked", f"certificate {certificate.certificate_number} was revoked")
    if certificate.status == "expired" or trip.travelled_on > certificate.valid_until:
        return Refused("certificate_expired", f"certificate valid until {certificate.valid_until}")
    if grant.status == "waitlisted":
        return Refused("grant_not_active", "the grant is still on the waitlist")
    if grant.status == "cancelled":
        return Refused("grant_not_active", "the grant was cancelled")
    if not grant.window_from <= trip.travelled_on <= grant.window_until:
        return Refused(
            "outside_window",
            f"travelled on {trip.travelled_on}, window {grant.window_from} to {grant.window_until}",
        )
    if trip.travelled_on > today + timedelta(days=1):
        return Refused("outside_window", f"travelled on {trip.travelled_on}, which is in the future")
    if grant.status == "expired":
        return Refused("grant_not_active", "the grant expired")
    if grant.status == "completed":
        return Refused("over_count", "the grant is used up")
    legs_after = grant.legs_counted + trip.legs
    if isinstance(parameters, MileageParameters):
        required = 2 * parameters.required_round_trips
        if legs_after >= required:
            return Accepted(grant.remaining, legs_after, completed=True)
        return Accepted(0, legs_after, completed=False)
    if legs_after > parameters.max_one_ways:
        left = parameters.max_one_ways - grant.legs_counted
        return Refused("over_count", f"{left} of {parameters.max_one_ways} one-way trips left this year")
    completed = legs_after == parameters.max_one_ways
    if isinstance(parameters, VoucherParameters):
        amount = trip.legs * parameters.voucher_jpy
    else:
        amount = trip.discount_jpy or 0
        cap = trip.legs * parameters.max_discount_jpy
        if amount > cap:
            return Refused("over_count", f"discount {amount} yen is over the cap of {cap} yen for this trip")
    if amount > grant.remaining:  # cannot happen while value = cap * count; kept as the last guard
        return Refused("over_count", f"{grant.remaining} {grant.unit} left on the grant")
    release = grant.remaining - amount if completed else 0
    return Accepted(amount, legs_after, completed=completed, release=release)


def trips_fingerprint(
    grant_id: str, certificate_number: str, trip_kind: str, travelled_on: date, discount_jpy: int | None
) -> tuple[str, str, str, date, int | None]:
    """What makes two reports with one trip id the same report (a retry) rather than a reuse."""
    return (grant_id, certificate_number, trip_kind, travelled_on, discount_jpy)


def waitlisted_window_over(window_until: date, today: date) -> bool:
    return window_until < today
