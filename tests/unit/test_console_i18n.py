"""The console's catalogue: every key a template or page uses exists in Japanese and English, and
the services' refusals read as sentences in the user's language."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.console import i18n
from shared.contracts.reasons import REJECTION_REASONS, REVOCATION_REASONS

CONSOLE = Path(i18n.__file__).parent
#: ``t('key')`` in templates and ``t("key")`` / ``viewer.t("key")`` / notices in pages.
USES = re.compile(r"""\bt\(\s*['"]([a-z_][a-z0-9_.\-]*)['"]""")
NOTICES = re.compile(r"""redirect\([^)]*?,\s*['"]([a-z_][a-z0-9_.\-]*)['"]""")


def _keys_used() -> set[str]:
    found: set[str] = set()
    for path in [*CONSOLE.glob("templates/**/*.html"), *CONSOLE.glob("**/*.py")]:
        text = path.read_text()
        found |= set(USES.findall(text)) | set(NOTICES.findall(text))
    # ``t('role.' ~ session.staff_role)``: a prefix completed at run time (its values are checked below).
    return {key for key in found if not key.endswith(".")}


def test_every_key_a_page_uses_is_in_the_catalogue() -> None:
    used = _keys_used()
    assert len(used) > 100  # the regex finds the keys (a broken one would pass vacuously)
    assert sorted(used - set(i18n.CATALOGUE)) == []


def test_every_staff_role_and_status_has_a_label() -> None:
    for role in ("reviewer", "manager", "auditor"):
        assert f"role.{role}" in i18n.CATALOGUE
    for status in ("submitted", "approved", "rejected", "valid", "revoked", "expired", "waitlisted", "issued"):
        assert f"status.{status}" in i18n.CATALOGUE


def test_every_entry_has_japanese_and_english() -> None:
    for key, (ja, en) in i18n.CATALOGUE.items():
        assert ja and en, key
        assert ja != en or key in {"donations.pdf"}, key
        # The same placeholders in both languages.
        assert set(re.findall(r"{(\w+)}", ja)) == set(re.findall(r"{(\w+)}", en)), key


def test_a_refusal_is_titled_by_its_code_then_by_its_status() -> None:
    assert i18n.problem_title("stay-below-minimum", 422, "ja") == "年間滞在日数が市町村の要件に足りません。"
    assert i18n.problem_title("stay-below-minimum", 422, "en").startswith("The stay days")
    assert i18n.problem_title("a-code-nobody-knows", 409, "ja") == "現在の状態では行えません。"
    assert i18n.problem_title("a-code-nobody-knows", 418, "en") == "The request was not right."
    assert i18n.problem_title("a-code-nobody-knows", 504, "ja") == "サービスでエラーが起きました。"


def test_labels_of_unknown_values_show_the_value() -> None:
    assert i18n.label("status", "valid", "ja") == "有効"
    assert i18n.label("status", "something_new", "ja") == "something_new"
    assert i18n.label("status", None, "en") == ""


@pytest.mark.parametrize("kind, table", [("rejection", REJECTION_REASONS), ("revocation", REVOCATION_REASONS)])
def test_reason_choices_are_the_published_codes(kind: str, table: dict[str, object]) -> None:
    choices = i18n.reasons(kind, "ja")
    assert [code for code, _ in choices] == list(table)
    assert all(text.startswith(f"{code}: ") for code, text in choices)


def test_csv_headings_are_japanese_for_the_certificate_columns() -> None:
    from services.certification.views import CSV_COLUMNS

    headings = [i18n.csv_heading(column, "ja") for column in CSV_COLUMNS]
    assert headings[:3] == ["証明書番号", "住民ID", "状態"]
    assert all(not re.fullmatch(r"[a-z_]+", h) for h in headings), headings


def test_the_language_is_japanese_unless_english_is_asked_for() -> None:
    assert i18n.language_of(None) == "ja"
    assert i18n.language_of("en") == "en"
    assert i18n.language_of("fr") == "ja"
