"""The published lists of decision reasons: why a certificate was revoked, an application or a
premium request rejected, a grant cancelled, a program's budget changed.

Only a code from these lists crosses a service boundary (events, partner feeds, the delivery
record): staff may add a free-text note to a decision, and it stays in the deciding service (its
audit trail or decision row), because free text typed at a counter can name people, illnesses or
addresses that no partner and no other service may receive. Each code has a sentence in Japanese
and English that the notification service writes to the resident.

The ``reason`` fields of the published v1 events stay strings; they carry a code of these lists.
Events published before the lists carried staff text: :func:`reason_code` maps anything that is
not a code (an old free text) to ``other`` wherever a reason is read, so old events still work.

A list may gain codes (consumers treat an unknown code as ``other``); a code is never removed or
renamed. ``python -m shared.contracts.reasons`` writes ``docs/contracts/reasons.md``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, cast, get_args

from shared.contracts.common import Language

ReasonKind = Literal["revocation", "rejection", "cancellation", "budget_change"]

#: Why a municipality revoked a dual-resident certificate.
RevocationReason = Literal[
    "not_residing",
    "legal_address_moved_here",
    "requirements_not_met",
    "false_statement",
    "holder_request",
    "issued_in_error",
    "resident_withdrawn",
    "other",
]
#: Why a certification application or a premium registration request was not approved.
RejectionReason = Literal[
    "stay_below_minimum",
    "residence_not_confirmed",
    "activity_not_confirmed",
    "identity_not_confirmed",
    "documents_incomplete",
    "requirements_not_met",
    "duplicate_request",
    "resident_withdrawn",
    "other",
]
#: Why a travel-support grant was cancelled.
CancellationReason = Literal["certificate_revoked", "resident_withdrawn", "other"]
#: Why a travel program's budget moved (``subsidy.budget.changed`` v2). A staff top-up's own words
#: stay in the subsidy service's ledger; the event says only ``top_up``.
BudgetChangeReason = Literal[
    "opening_balance",
    "top_up",
    "donation",
    "donation_refunded",
    "grant_cancelled",
    "grant_expired",
    "grant_used_up",
    "other",
]

OTHER: Final = "other"
#: A code set by the platform itself when the resident withdraws (staff may choose it too).
RESIDENT_WITHDRAWN: Final = "resident_withdrawn"


@dataclass(frozen=True, slots=True)
class ReasonText:
    """How a code is told to the resident: a sentence ending that follows 「理由: 」/ "Reason: "."""

    ja: str
    en: str

    def in_language(self, language: Language) -> str:
        return self.ja if language == "ja" else self.en


REVOCATION_REASONS: Mapping[str, ReasonText] = {
    "not_residing": ReasonText(
        "当該市町村での滞在・居住の実態が確認できなくなったため",
        "you are no longer found to stay or live in the municipality",
    ),
    "legal_address_moved_here": ReasonText(
        "住民票上の住所を当該市町村に移されたため（二地域居住の対象外となります）",
        "you moved your registered legal address to the municipality, so it is no longer your second region",
    ),
    "requirements_not_met": ReasonText(
        "市町村の定める要件を満たさなくなったため",
        "you no longer meet the municipality's requirements",
    ),
    "false_statement": ReasonText(
        "申請内容に事実と異なる点があったため",
        "the application was found to contain statements that are not true",
    ),
    "holder_request": ReasonText("ご本人からの申出によるため", "you asked for it"),
    "issued_in_error": ReasonText("証明書が誤って発行されていたため", "the certificate was issued in error"),
    "resident_withdrawn": ReasonText("ニチイキを退会されたため", "you withdrew from Nichiiki"),
    "other": ReasonText(
        "その他の理由によるため（詳しくは市町村の窓口にお問い合わせください）",
        "another reason (please ask the municipality for details)",
    ),
}

REJECTION_REASONS: Mapping[str, ReasonText] = {
    "stay_below_minimum": ReasonText(
        "予定滞在日数が市町村の定める日数に満たないため",
        "the planned stay is shorter than the municipality requires",
    ),
    "residence_not_confirmed": ReasonText(
        "滞在先の住居を確認できなかったため",
        "the place you stay at could not be confirmed",
    ),
    "activity_not_confirmed": ReasonText(
        "地域での活動の実績を確認できなかったため",
        "your activities in the area could not be confirmed",
    ),
    "identity_not_confirmed": ReasonText("ご本人確認ができなかったため", "your identity could not be confirmed"),
    "documents_incomplete": ReasonText(
        "提出書類に不足または不備があったため",
        "documents were missing or incomplete",
    ),
    "requirements_not_met": ReasonText(
        "市町村の定める要件を満たしていないため",
        "the municipality's requirements are not met",
    ),
    "duplicate_request": ReasonText(
        "同じ内容の申請が既にあるため",
        "the same request has been made already",
    ),
    "resident_withdrawn": ReasonText("ニチイキを退会されたため", "you withdrew from Nichiiki"),
    "other": ReasonText(
        "その他の理由によるため（詳しくは市町村の窓口にお問い合わせください）",
        "another reason (please ask the municipality for details)",
    ),
}

CANCELLATION_REASONS: Mapping[str, ReasonText] = {
    "certificate_revoked": ReasonText(
        "二地域居住者証明書が取り消されたため",
        "your dual-resident certificate was revoked",
    ),
    "resident_withdrawn": ReasonText("ニチイキを退会されたため", "you withdrew from Nichiiki"),
    "other": ReasonText(
        "その他の理由によるため（詳しくは市町村の窓口にお問い合わせください）",
        "another reason (please ask the municipality for details)",
    ),
}

BUDGET_CHANGE_REASONS: Mapping[str, ReasonText] = {
    "opening_balance": ReasonText("予算の当初額の計上", "the program's opening budget"),
    "top_up": ReasonText("職員による予算の追加", "a top-up by the municipality's staff"),
    "donation": ReasonText("ふるさと納税の寄附による財源の追加", "a hometown-tax donation for the program"),
    "donation_refunded": ReasonText("寄附の返金による減額", "a donation was refunded"),
    "grant_cancelled": ReasonText("助成の取消しによる予約額の戻し入れ", "a cancelled grant released its reservation"),
    "grant_expired": ReasonText("助成の期限切れによる予約額の戻し入れ", "an expired grant released its reservation"),
    "grant_used_up": ReasonText(
        "助成の利用完了による未使用額の戻し入れ", "a used-up grant released what it did not need"
    ),
    "other": ReasonText("その他の理由による変更", "another reason"),
}

REASONS: Mapping[ReasonKind, Mapping[str, ReasonText]] = {
    "revocation": REVOCATION_REASONS,
    "rejection": REJECTION_REASONS,
    "cancellation": CANCELLATION_REASONS,
    "budget_change": BUDGET_CHANGE_REASONS,
}

_CODES_NOTE = (
    " (docs/contracts/reasons.md). Events published before the list carried free text here: a reader "
    "maps any value that is not a code of the list to `other`."
)
#: The ``reason`` fields' descriptions in the published schemas.
REVOCATION_DESCRIPTION = "Why the certificate was revoked: a RevocationReason code" + _CODES_NOTE
REJECTION_DESCRIPTION = "Why it was not approved: a RejectionReason code" + _CODES_NOTE
CANCELLATION_DESCRIPTION = "Why the grant was cancelled: a CancellationReason code" + _CODES_NOTE
BUDGET_CHANGE_DESCRIPTION = (
    "Why the budget moved: a BudgetChangeReason code (docs/contracts/reasons.md); a staff member's own words "
    "stay in the subsidy service's ledger"
)

#: Reasons written by the platform before the lists existed, and what they mean as codes.
_LEGACY_TEXTS: Mapping[ReasonKind, Mapping[str, str]] = {
    "revocation": {"resident withdrew": RESIDENT_WITHDRAWN},
    "rejection": {"resident withdrew": RESIDENT_WITHDRAWN},
    "cancellation": {"certificate revoked": "certificate_revoked"},
    "budget_change": {},
}


def reason_code(kind: ReasonKind, value: str | None) -> str:
    """The published code ``value`` stands for: itself if it is one, ``other`` for anything else
    (a staff text of an event published before the lists, a code added after this build)."""
    if value is None:
        return OTHER
    if value in REASONS[kind]:
        return value
    legacy = _LEGACY_TEXTS[kind]
    # The subsidy service wrote "certificate revoked: <staff text>" into cancellations.
    text = value.split(":", 1)[0].strip().lower()
    return legacy.get(text, OTHER)


def revocation_reason(value: str | None) -> RevocationReason:
    return cast(RevocationReason, reason_code("revocation", value))


def rejection_reason(value: str | None) -> RejectionReason:
    return cast(RejectionReason, reason_code("rejection", value))


def cancellation_reason(value: str | None) -> CancellationReason:
    return cast(CancellationReason, reason_code("cancellation", value))


def budget_change_reason(value: str | None) -> BudgetChangeReason:
    return cast(BudgetChangeReason, reason_code("budget_change", value))


def reason_text(kind: ReasonKind, value: str | None, language: Language) -> str:
    """The sentence telling the resident why, in ``language`` (unknown text: the ``other`` sentence)."""
    return REASONS[kind][reason_code(kind, value)].in_language(language)


# --- the published document ----------------------------------------------------------------------

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "contracts" / "reasons.md"

_SECTIONS: tuple[tuple[ReasonKind, str, str], ...] = (
    ("revocation", "RevocationReason", "`certification.certificate.revoked` (`reason`); "
     "`POST /v1/certificates/{number}/revoke` (`reason_code`)"),
    ("rejection", "RejectionReason", "`certification.application.rejected` and `registration.premium_rejected` "
     "(`reason`); `POST /v1/applications/{id}/reject` and `POST /v1/registrations/{id}/reject` (`reason_code`)"),
    ("cancellation", "CancellationReason", "`subsidy.grant.cancelled` (`reason`); `partner.grant` records "
     "of state `cancelled` (`reason`)"),
    ("budget_change", "BudgetChangeReason", "`subsidy.budget.changed` v2 (`reason`); not told to residents: "
     "the sentences say what moved a program's budget. A staff top-up's own words (`POST "
     "/v1/programs/{id}/budget`, `reason`) stay in the subsidy service's ledger"),
)


def reasons_markdown() -> str:
    """``docs/contracts/reasons.md``: every list with its codes and sentences."""
    lines = [
        "# Decision reasons",
        "",
        "<!-- generated by `python -m shared.contracts.reasons` from shared/contracts/reasons.py -->",
        "",
        "Decisions name their reason by a code of these lists; only the code leaves the deciding service.",
        "Staff may add a free-text `note` to a decision: it is kept in the deciding service (audit trail or",
        "decision row) and is never put in an event, on a partner feed or in the delivery record.",
        "",
        "Consumers map a value that is not a code of the list (a free text of an event published before",
        "the lists, or a code added later) to `other`. Codes are only ever added, never removed or renamed.",
        "The sentences are what the resident reads after 「理由: 」/ \"Reason: \".",
    ]
    for kind, name, where in _SECTIONS:
        lines += ["", f"## {name} ({kind})", "", f"Used in {where}.", "",
                  "| code | 日本語 | English |", "|---|---|---|"]
        lines += [f"| `{code}` | {text.ja} | {text.en} |" for code, text in REASONS[kind].items()]
    return "\n".join(lines) + "\n"


def _check_lists() -> None:
    """The label tables and the Literal lists name the same codes, in the same order."""
    for kind, codes in (
        ("revocation", get_args(RevocationReason)), ("rejection", get_args(RejectionReason)),
        ("cancellation", get_args(CancellationReason)), ("budget_change", get_args(BudgetChangeReason)),
    ):
        if tuple(REASONS[kind]) != codes or OTHER not in codes:  # type: ignore[index]
            raise RuntimeError(f"the {kind} reasons and their sentences disagree")


_check_lists()


if __name__ == "__main__":
    DOCUMENT.write_text(reasons_markdown(), encoding="utf-8")
    sys.stdout.write(f"wrote {DOCUMENT}\n")
