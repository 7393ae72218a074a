"""The identifiers that cross services: one builder and one parser each, and they agree."""

from __future__ import annotations

import dataclasses

import pytest

from shared.contracts.formats import (
    CertificateNumber,
    CertificateNumberError,
    FormatError,
    ProgramId,
    ProgramIdError,
)
from shared.contracts.topics import SERVICES
from shared.kit.settings import SERVICE_PORTS

SHIRAHAMA = "304018"


# --- certificate numbers ----------------------------------------------------------------------------


def test_a_certificate_number_encodes_municipality_year_and_sequence() -> None:
    assert CertificateNumber.format(SHIRAHAMA, 2026, 7) == "NCH-304018-2026-000007"
    assert CertificateNumber.format(SHIRAHAMA, 2026, 999_999) == "NCH-304018-2026-999999"
    assert CertificateNumber.format("422100", 987, 1) == "NCH-422100-0987-000001"
    assert str(CertificateNumber(SHIRAHAMA, 2026, 42)) == CertificateNumber(SHIRAHAMA, 2026, 42).text


@pytest.mark.parametrize(
    ("code", "year", "sequence"),
    [(SHIRAHAMA, 2026, 1), (SHIRAHAMA, 2026, 999_999), ("011002", 1, 500), ("422100", 9999, 123_456)],
)
def test_a_certificate_number_round_trips(code: str, year: int, sequence: int) -> None:
    text = CertificateNumber.format(code, year, sequence)
    parsed = CertificateNumber.parse(text)
    assert parsed == CertificateNumber(code, year, sequence)
    assert (parsed.municipality_code, parsed.year, parsed.sequence) == (code, year, sequence)
    assert parsed.text == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "42",
        "NCH-422100-2026-00001",  # sequence of 5 digits
        "NCH-422100-2026-0000011",  # of 7
        "NCH-42210-2026-000001",  # code of 5 digits
        "NCH-422100-26-000001",  # year of 2 digits
        "nch-422100-2026-000001",
        "NCH-４２２１００-2026-000001",  # full-width digits
        "NCH-422100-２０２６-000001",
        "NCH-422100-2026-٠٠٠٠٠١",  # Arabic-Indic digits: int() would take them
        "NCH-422100-2026-000001\n",
        " NCH-422100-2026-000001",
        "NCH_422100_2026_000001",
        "NCH-422100-2026-000000",  # no certificate has sequence 0: the counter starts at 1
        "NCH-422100-0000-000001",  # nor year 0
        "NCH-422100-2026-000001/grants/g-1",  # a grant's feed key is not a number
    ],
)
def test_a_malformed_certificate_number_is_refused(text: str) -> None:
    with pytest.raises(CertificateNumberError) as refused:
        CertificateNumber.parse(text)
    assert isinstance(refused.value, FormatError) and isinstance(refused.value, ValueError)


@pytest.mark.parametrize(
    ("code", "year", "sequence"),
    [
        (SHIRAHAMA, 2026, 0),
        (SHIRAHAMA, 2026, 1_000_000),
        (SHIRAHAMA, 10_000, 1),
        (SHIRAHAMA, 0, 1),
        ("30401", 2026, 1),
        ("3040188", 2026, 1),
        ("３０４０１８", 2026, 1),
        ("30401a", 2026, 1),
    ],
)
def test_the_builder_refuses_parts_a_number_cannot_carry(code: str, year: int, sequence: int) -> None:
    with pytest.raises(CertificateNumberError):
        CertificateNumber.format(code, year, sequence)


def test_a_certificate_number_is_a_frozen_value() -> None:
    number = CertificateNumber.parse("NCH-304018-2026-000007")
    with pytest.raises(dataclasses.FrozenInstanceError):
        number.sequence = 8  # type: ignore[misc]
    assert {number, CertificateNumber(SHIRAHAMA, 2026, 7)} == {number}


# --- program ids --------------------------------------------------------------------------------------


def test_a_program_id_round_trips() -> None:
    text = ProgramId.format("jal-dual-residence-miles", SHIRAHAMA)
    assert text == "jal-dual-residence-miles@304018"
    parsed = ProgramId.parse(text)
    assert (parsed.reference, parsed.municipality_code) == ("jal-dual-residence-miles", SHIRAHAMA)
    assert parsed == ProgramId("jal-dual-residence-miles", SHIRAHAMA)
    assert parsed.text == str(parsed) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "jal-dual-residence-miles",  # a bare reference program is a name, not an id
        "jal-dual-residence-miles@",
        "@304018",
        "jal@304018@304018",
        "jal@30401",
        "jal@３０４０１８",
        "JAL-dual-residence-miles@304018",
        "-jal@304018",
        "jal miles@304018",
        "jal@304018\n",
    ],
)
def test_a_malformed_program_id_is_refused(text: str) -> None:
    with pytest.raises(ProgramIdError) as refused:
        ProgramId.parse(text)
    assert isinstance(refused.value, FormatError) and isinstance(refused.value, ValueError)


def test_the_program_id_builder_refuses_parts_it_cannot_carry() -> None:
    for reference, code in (("jal@x", SHIRAHAMA), ("", SHIRAHAMA), ("jal", "30401"), ("jal", "")):
        with pytest.raises(ProgramIdError):
            ProgramId.format(reference, code)


def test_a_donor_names_a_program_id_or_a_bare_reference_program() -> None:
    assert ProgramId.named("jal-dual-residence-miles", SHIRAHAMA) == ProgramId("jal-dual-residence-miles", SHIRAHAMA)
    # an id keeps its own municipality: whether it is the donation's is the caller's rule
    assert ProgramId.named("jal@302066", SHIRAHAMA) == ProgramId("jal", "302066")
    for malformed in ("jal@", "jal@302066@302066", "JAL", ""):
        with pytest.raises(ProgramIdError):
            ProgramId.named(malformed, SHIRAHAMA)


# --- the list of services -------------------------------------------------------------------------------


def test_the_services_are_listed_once_and_every_one_has_a_port() -> None:
    assert len(set(SERVICES)) == len(SERVICES)
    assert {"registration", "certification", "subsidy", "donation", "notification", "partner_gateway", "identity",
            "console"} <= set(SERVICES)
    assert tuple(SERVICE_PORTS) == SERVICES
    assert len(set(SERVICE_PORTS.values())) == len(SERVICES)
