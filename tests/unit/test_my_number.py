from __future__ import annotations

import uuid

import pytest

from shared.kit.my_number import MyNumberNotAllowed, find_my_number, looks_like_my_number, refuse_my_number


@pytest.mark.parametrize(
    "text", ["123456789012", "1234-5678-9012", "1234 5678 9012", "１２３４５６７８９０１２", "番号は123456789012"]
)
def test_twelve_digits_in_any_writing_look_like_a_my_number(text: str) -> None:
    assert looks_like_my_number(text)


@pytest.mark.parametrize(
    "text",
    [
        "+81-90-1234-5678",  # an international phone number
        "1234567890123",  # 13 digits: a corporate number
        "12345678901",
        "0123e4567-e89b-12d3-a456-426614174000",
        "8f0e2a44-1c1d-4c2b-9f3e-123456789012",  # a UUID whose last group is all digits
    ],
)
def test_other_numbers_and_system_ids_pass(text: str) -> None:
    assert not looks_like_my_number(text)


def test_the_path_is_reported_never_the_value_and_exempt_fields_are_skipped() -> None:
    document = {"donor": {"notes": ["ok", "1234-5678-9012"]}, "payment_reference": "123456789012"}
    assert find_my_number(document, exempt={"payment_reference"}) == "$.donor.notes[1]"
    with pytest.raises(MyNumberNotAllowed) as refused:
        refuse_my_number(document, exempt={"payment_reference"})
    assert "1234" not in refused.value.detail
    assert find_my_number({"payment_reference": "123456789012"}, exempt={"payment_reference"}) is None
    assert find_my_number({"123456789012": 1}) == "$ (a member name)"
    assert find_my_number({"n": 123456789012}) == "$.n"
    assert find_my_number({"id": str(uuid.UUID("8f0e2a44-1c1d-4c2b-9f3e-123456789012"))}) is None
