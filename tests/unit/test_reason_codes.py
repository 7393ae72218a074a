"""The published reason lists: one code per decision, a sentence in each language, old text is `other`."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from shared.contracts.reasons import (
    CANCELLATION_REASONS,
    REASONS,
    REJECTION_REASONS,
    REVOCATION_REASONS,
    CancellationReason,
    RejectionReason,
    RevocationReason,
    cancellation_reason,
    reason_code,
    reason_text,
    reasons_markdown,
    rejection_reason,
    revocation_reason,
)


def test_every_list_has_other_and_a_sentence_per_code_in_both_languages() -> None:
    for literal, table in (
        (RevocationReason, REVOCATION_REASONS), (RejectionReason, REJECTION_REASONS),
        (CancellationReason, CANCELLATION_REASONS),
    ):
        assert tuple(table) == get_args(literal) and "other" in table
        for code, text in table.items():
            assert code.isascii() and code == code.lower() and " " not in code
            assert text.ja and text.en and text.ja != text.en


def test_codes_pass_and_anything_else_is_other() -> None:
    assert revocation_reason("false_statement") == "false_statement"
    assert rejection_reason("documents_incomplete") == "documents_incomplete"
    assert cancellation_reason("certificate_revoked") == "certificate_revoked"
    # Free text of events published before the lists (staff words) never passes as it is.
    assert revocation_reason("住所を白浜町に移しました") == "other"
    assert rejection_reason("書類不備") == "other"
    assert cancellation_reason("the resident asked") == "other"
    assert reason_code("revocation", None) == "other"
    # A code of another list is not a code of this one.
    assert revocation_reason("certificate_revoked") == "other"
    # What the platform itself wrote before keeps its meaning.
    assert revocation_reason("resident withdrew") == rejection_reason("resident withdrew") == "resident_withdrawn"
    assert cancellation_reason("certificate revoked: 病気のため転居") == "certificate_revoked"
    assert cancellation_reason("certificate revoked") == "certificate_revoked"


@pytest.mark.parametrize("language", ["ja", "en"])
def test_sentences_by_language(language: str) -> None:
    for kind, table in REASONS.items():
        for code, text in table.items():
            assert reason_text(kind, code, language) == text.in_language(language)  # type: ignore[arg-type]
        assert reason_text(kind, "自由記述", language) == table["other"].in_language(language)  # type: ignore[arg-type]


def test_the_published_document_is_current(repo_root: Path) -> None:
    """docs/contracts/reasons.md is written by `python -m shared.contracts.reasons`."""
    committed = (repo_root / "docs" / "contracts" / "reasons.md").read_text(encoding="utf-8")
    assert committed == reasons_markdown(), "run: python -m shared.contracts.reasons"
    for table in REASONS.values():
        for code in table:
            assert f"| `{code}` |" in committed
