"""Notification: which events become which messages, and every message in Japanese and English.

``sample_events`` is shared with the integration tests: one event of every kind that makes a
message, with facts the assertions below look for in the text.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from services.notification.domain import (
    KINDS,
    LANGUAGES,
    Amount,
    Notice,
    Place,
    Reason,
    RetryPolicy,
    email_consent,
    format_amount,
    format_date,
    is_permanent_smtp_failure,
    notice_for,
    scrub_address,
)
from services.notification.templates import (
    TemplateError,
    check_templates,
    parse_template,
    render,
    write_fact,
)
from shared.contracts.base import EventData
from shared.contracts.certification import (
    ApplicationRejected,
    ApplicationSubmitted,
    CertificateExpired,
    CertificateExpiring,
    CertificateIssued,
    CertificateRenewed,
    CertificateRevoked,
)
from shared.contracts.common import Language
from shared.contracts.donation import DonationReceived, OneStopExceptionVoided
from shared.contracts.listings import DigestEntry, ListingDigestDue
from shared.contracts.reasons import CANCELLATION_REASONS, REASONS, REVOCATION_REASONS
from shared.contracts.registration import (
    ConsentState,
    Contact,
    PremiumApproved,
    PremiumExpired,
    PremiumRejected,
    PremiumRequested,
    ResidentRegistered,
)
from shared.contracts.sealed import resident_subject
from shared.contracts.subsidy import (
    GrantCancelled,
    GrantIssued,
    GrantRedeemed,
    GrantRedemptionRejected,
    GrantWaitlisted,
)
from tests.support import opened_for_tests, seal_for_tests

SHIRAHAMA = "304018"  # 和歌山県白浜町
WAKAYAMA = "300004"  # 和歌山県
SADO = "152242"  # 新潟県佐渡市
KAMISHIHORO = "016331"  # 北海道上士幌町
IKI = "422100"  # 長崎県壱岐市
MITOYO = "372081"  # 香川県三豊市
SUSAKI = "392065"  # 高知県須崎市

# 2026-11-25 20:00 UTC is already 26 November in Japan: dates are written in Japan time.
DECIDED = datetime(2026, 11, 25, 20, 0, tzinfo=UTC)


def registration(
    resident_id: str, *, name: str = "山田 太郎", email: str = "taro@example.jp", language: Language = "ja",
    email_consent: bool = True, municipality: str = SHIRAHAMA, prefecture: str = WAKAYAMA,
    status: str = "active", tier: str = "basic", derived_prefecture: str | None = None,
) -> ResidentRegistered:
    """A registration as registration publishes it, its contact sealed with the tests' key
    (``tests.support.sealed_for`` seals it again with a service's key store before it is fed);
    ``derived_prefecture``: the id of the prefecture registration it brought."""
    contact = Contact(name=name, name_kana="ヤマダ タロウ", email=email, preferred_language=language)
    return ResidentRegistered.model_validate({
        "resident_id": resident_id, "registration_id": f"reg-{resident_id}-{municipality}",
        "municipality_code": municipality, "prefecture_code": prefecture, "tier": tier, "status": status,
        "legal_address_code": "131121",
        "contact": seal_for_tests(resident_subject(resident_id), contact),
        "consents": [ConsentState(purpose="email", granted=email_consent, at=DECIDED - timedelta(days=1))],
        "registered_at": DECIDED, "derived_prefecture_registration_id": derived_prefecture,
    })


def contact_of(event: ResidentRegistered) -> Contact:
    """The contact ``registration`` sealed, opened as the service would."""
    return Contact.model_validate_json(opened_for_tests(event.contact))


def sample_events(resident_id: str) -> dict[str, EventData]:
    """One event per message kind (the key), all about ``resident_id``."""
    certificate = {
        "certificate_number": f"C-304018-{resident_id[-6:]}", "resident_id": resident_id,
        "municipality_code": SHIRAHAMA, "valid_from": date(2026, 11, 26), "valid_until": date(2027, 11, 25),
        "status": "valid",
    }
    grant = {
        "grant_id": f"g-{resident_id}", "program_id": "jal-dual-residence-miles", "partner": "jal",
        "mechanism": "mileage_grant", "certificate_number": certificate["certificate_number"],
        "resident_id": resident_id, "municipality_code": SHIRAHAMA,
    }
    return {
        "registration_confirmed": registration(resident_id),
        "prefecture_registration_confirmed": registration(resident_id, municipality=WAKAYAMA),
        "premium_requested": PremiumRequested(
            resident_id=resident_id, registration_id="reg-p", municipality_code=SADO, activity_count=3,
            requested_at=DECIDED,
        ),
        "premium_approved": PremiumApproved(
            resident_id=resident_id, registration_id="reg-p", municipality_code=SADO,
            valid_until=date(2027, 3, 31), decided_at=DECIDED,
        ),
        "premium_rejected": PremiumRejected(
            resident_id=resident_id, registration_id="reg-p", municipality_code=SADO,
            reason="activity_not_confirmed", decided_at=DECIDED,
        ),
        "application_received": ApplicationSubmitted(
            application_id="A-2026-000123", resident_id=resident_id, municipality_code=SHIRAHAMA,
            primary_residence_code="131121", planned_stay_days=60, housing_basis="rented", submitted_at=DECIDED,
        ),
        "application_rejected": ApplicationRejected(
            application_id="A-2026-000124", resident_id=resident_id, municipality_code=SHIRAHAMA,
            reason="stay_below_minimum", decided_at=DECIDED,
        ),
        "certificate_issued": CertificateIssued.model_validate(
            {**certificate, "application_id": "A-2026-000123", "issued_at": DECIDED}
        ),
        "certificate_renewed": CertificateRenewed.model_validate(
            {**certificate, "valid_from": date(2027, 11, 26), "valid_until": date(2028, 11, 25), "renewed_at": DECIDED}
        ),
        "certificate_expiring": CertificateExpiring.model_validate({**certificate, "days_left": 30}),
        "certificate_expired": CertificateExpired.model_validate(
            {**certificate, "status": "expired", "expired_on": date(2027, 11, 26)}
        ),
        "certificate_revoked": CertificateRevoked.model_validate(
            {**certificate, "status": "revoked", "reason": "false_statement", "revoked_at": DECIDED}
        ),
        "grant_issued": GrantIssued.model_validate({
            **grant, "unit": "miles", "reserved": 30000, "window_from": date(2026, 12, 1),
            "window_until": date(2027, 3, 31), "issued_at": DECIDED,
            "member_number": seal_for_tests(resident_subject(resident_id), "JMB123456789"),
        }),
        "grant_waitlisted": GrantWaitlisted.model_validate(
            {**grant, "unit": "miles", "needed": 30000, "position": 4, "waitlisted_at": DECIDED}
        ),
        "grant_redeemed": GrantRedeemed.model_validate({
            **grant, "partner": "ana", "mechanism": "fare_discount", "program_id": "ana-dual-residence-fare",
            "trip_id": "T-1", "unit": "jpy", "amount": 12500, "trips_counted": 2, "completed": False,
            "redeemed_at": DECIDED,
        }),
        "grant_cancelled": GrantCancelled.model_validate(
            {**grant, "unit": "miles", "released": 30000, "reason": "certificate_revoked", "cancelled_at": DECIDED}
        ),
        "receipt_issued": DonationReceived(
            donation_id="d-1", municipality_code=SHIRAHAMA, donor_id="donor-1", resident_id=resident_id,
            kind="hometown_tax", unit="jpy", amount=30000, earmark="general", payment_date=date(2026, 1, 1),
            calendar_year=2026, received_at=DECIDED, receipt_number="304018-2026-000042",
        ),
        "one_stop_voided": OneStopExceptionVoided(
            donor_id="donor-1", resident_id=resident_id, calendar_year=2026,
            municipality_codes=[SHIRAHAMA, SADO, KAMISHIHORO, IKI, MITOYO, SUSAKI], voided_at=DECIDED,
        ),
        "listing_digest": ListingDigestDue(
            digest_id="dig-1", resident_id=resident_id, cadence="weekly", due_at=DECIDED, listings=[
                DigestEntry(listing_id="lst-1", kind="vacant_house", municipality_code=SHIRAHAMA,
                            title="Seaside house", available_from=date(2026, 12, 1)),
                DigestEntry(listing_id="lst-2", kind="coworking", municipality_code=SADO, title="Ryotsu desks",
                            available_from=date(2026, 12, 1), available_until=date(2027, 3, 31)),
            ],
        ),
    }


#: What each kind's text must contain, in each language (besides the resident's name).
EXPECTED: dict[str, dict[Language, list[str]]] = {
    "registration_confirmed": {
        "ja": ["和歌山県白浜町", "ベーシック", "2026年11月26日", "和歌山県"],
        "en": ["和歌山県白浜町", "basic", "26 November 2026"],
    },
    "prefecture_registration_confirmed": {
        "ja": ["和歌山県へのふるさと住民登録（ベーシック）", "2026年11月26日"],
        "en": ["with 和歌山県 was completed on 26 November 2026", "basic"],
    },
    "premium_requested": {
        "ja": ["新潟県佐渡市", "3件", "2026年11月26日"], "en": ["新潟県佐渡市", "Activities submitted: 3"],
    },
    "premium_approved": {"ja": ["新潟県佐渡市", "2027年3月31日"], "en": ["Valid until: 31 March 2027"]},
    "premium_rejected": {
        "ja": ["理由: 地域での活動の実績を確認できなかったため"],
        "en": ["Reason: your activities in the area could not be confirmed"],
    },
    "application_received": {"ja": ["A-2026-000123", "和歌山県白浜町"], "en": ["Application number: A-2026-000123"]},
    "application_rejected": {
        "ja": ["理由: 予定滞在日数が市町村の定める日数に満たないため", "A-2026-000124"],
        "en": ["Reason: the planned stay is shorter than the municipality requires"],
    },
    "certificate_issued": {
        "ja": ["証明書番号: C-304018-", "有効期間: 2026年11月26日から2027年11月25日まで"],
        "en": ["Certificate number: C-304018-", "Valid from 26 November 2026 until 25 November 2027"],
    },
    "certificate_renewed": {
        "ja": ["2027年11月26日から2028年11月25日まで"],
        "en": ["Now valid from 26 November 2027 until 25 November 2028"],
    },
    "certificate_expiring": {
        "ja": ["あと30日", "2027年11月25日"], "en": ["expires in 30 days", "expires on 25 November 2027"],
    },
    "certificate_expired": {
        "ja": ["2027年11月25日をもって有効期限が切れました"], "en": ["expired after 25 November 2027"],
    },
    "certificate_revoked": {
        "ja": ["理由: 申請内容に事実と異なる点があったため", "2026年11月26日"],
        "en": ["Reason: the application was found to contain statements that are not true", "on 26 November 2026"],
    },
    "grant_issued": {
        "ja": ["30,000マイル", "日本航空", "2026年12月1日から2027年3月31日まで"],
        "en": ["Amount: 30,000 miles", "(JAL)", "Usable from 1 December 2026 until 31 March 2027"],
    },
    "grant_waitlisted": {
        "ja": ["4番目", "30,000マイル"], "en": ["Position on the waiting list: 4", "Amount needed: 30,000 miles"],
    },
    "grant_redeemed": {
        "ja": ["12,500円", "2回", "全日本空輸", "引き続きご利用いただけます"],
        "en": ["¥12,500", "Trips counted so far: 2", "(ANA)", "You can keep using"],
    },
    "grant_cancelled": {
        "ja": ["理由: 二地域居住者証明書が取り消されたため"],
        "en": ["Reason: your dual-resident certificate was revoked"],
    },
    "receipt_issued": {
        "ja": ["304018-2026-000042", "30,000円", "2026年"], "en": ["Receipt number: 304018-2026-000042", "¥30,000"],
    },
    "one_stop_voided": {
        "ja": ["2026年のワンストップ特例", "和歌山県白浜町、新潟県佐渡市", "6団体", "確定申告"],
        "en": ["for 2026", "和歌山県白浜町, 新潟県佐渡市", "Municipalities (6)", "file a tax return"],
    },
    "listing_digest": {
        "ja": ["今週の募集・催しのお知らせ（2件）", "・Seaside house（空き家、和歌山県白浜町、2026年12月1日〜）",
               "・Ryotsu desks（コワーキング、新潟県佐渡市、2026年12月1日〜2027年3月31日）"],
        "en": ["This week's listings for you (2)",
               "- Seaside house (vacant house, 和歌山県白浜町, 1 December 2026 onwards)",
               "- Ryotsu desks (coworking, 新潟県佐渡市, 1 December 2026 to 31 March 2027)"],
    },
}


def test_the_samples_cover_every_kind() -> None:
    assert set(sample_events("r-000001")) == set(KINDS) == set(EXPECTED)


@pytest.mark.parametrize("language", ["ja", "en"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_renders_its_facts_in_both_languages(kind: str, language: Language) -> None:
    event = sample_events("r-000001")[kind]
    notice = notice_for(event)
    assert notice is not None and notice.kind == kind and notice.resident_id == "r-000001"
    rendered = render(notice, language, "山田 太郎")
    text = rendered.subject + "\n" + rendered.body
    assert "山田 太郎" in rendered.body
    for expected in EXPECTED[kind][language]:
        assert expected in text, f"{kind}.{language}: {expected!r} not in\n{text}"
    assert "$" not in text.replace("¥", "")
    assert rendered.subject and "\n" not in rendered.subject
    if language == "en":  # English text never falls back to Japanese words of our own
        assert "様" not in text and "日本航空" not in text


def test_specific_subjects_and_greetings() -> None:
    issued = notice_for(sample_events("r-000001")["certificate_issued"])
    assert issued is not None
    ja = render(issued, "ja", "佐藤 花子")
    en = render(issued, "en", "Hanako Sato")
    assert ja.subject == "二地域居住者証明書を発行しました（C-304018-000001）"
    assert ja.body.startswith("佐藤 花子 様\n")
    assert en.subject == "Your dual-resident certificate is issued (C-304018-000001)"
    assert en.body.startswith("Dear Hanako Sato,\n")


def test_an_unknown_resident_is_greeted_generically() -> None:
    notice = notice_for(sample_events("r-000001")["receipt_issued"])
    assert notice is not None
    assert render(notice, "ja", None).body.startswith("ご登録者 様")
    assert render(notice, "en", None).body.startswith("Dear registrant,")


def test_a_completed_grant_says_so() -> None:
    event = sample_events("r-000001")["grant_redeemed"]
    assert isinstance(event, GrantRedeemed)
    notice = notice_for(event.model_copy(update={"completed": True, "unit": "miles", "amount": 30000}))
    assert notice is not None
    assert "支援の全額をご利用いただきました" in render(notice, "ja", "x").body
    assert "30,000 miles" in render(notice, "en", "x").body
    assert "used your travel support in full" in render(notice, "en", "x").body


def test_an_unknown_partner_is_named_by_its_code() -> None:
    event = sample_events("r-000001")["grant_issued"]
    assert isinstance(event, GrantIssued)
    notice = notice_for(event.model_copy(update={"partner": "newair"}))
    assert notice is not None
    assert "NEWAIR" in render(notice, "en", "x").subject


# -- which events make a message ------------------------------------------------------------------


def test_only_an_active_registration_is_confirmed_in_words_that_fit_it() -> None:
    municipal = notice_for(registration("r-1"))
    assert municipal is not None and municipal.kind == "registration_confirmed"
    # Registering with 白浜町 also registered with 和歌山県: one event, one message.
    with_prefecture = notice_for(registration("r-1", derived_prefecture="reg-r-1-wakayama"))
    assert with_prefecture is not None and with_prefecture.facts["prefecture"] == Place(WAKAYAMA)
    # A registration with the prefecture itself has words of its own: no municipality, no "also registered with".
    direct = notice_for(registration("r-1", municipality=WAKAYAMA))
    assert direct is not None and direct.kind == "prefecture_registration_confirmed"
    assert "municipality" not in direct.facts
    for language in LANGUAGES:
        text = render(direct, language, "x").body
        assert "白浜町" not in text and "にも登録" not in text and "also registered" not in text
    # A premium sign-up pending review is announced by PremiumRequested, not here.
    assert notice_for(registration("r-1", status="pending_review", tier="premium")) is None


def test_donations_without_a_resident_and_unlisted_events_make_no_message() -> None:
    samples = sample_events("r-1")
    receipt = samples["receipt_issued"]
    voided = samples["one_stop_voided"]
    assert notice_for(receipt.model_copy(update={"resident_id": None})) is None
    assert notice_for(voided.model_copy(update={"resident_id": None})) is None
    # A donation of miles has no receipt, so nothing to tell.
    assert notice_for(DonationReceived(
        donation_id="d", municipality_code=SHIRAHAMA, donor_id="x", resident_id="r-1", kind="miles",
        unit="miles", amount=10000, earmark="dual_residence", payment_date=date(2026, 1, 1), calendar_year=2026,
        received_at=DECIDED,
    )) is None
    assert notice_for(PremiumExpired(
        resident_id="r-1", registration_id="x", municipality_code=SADO, expired_on=date(2027, 1, 1)
    )) is None
    assert notice_for(GrantRedemptionRejected(
        grant_id="g", program_id="p", partner="jal", mechanism="mileage_grant", certificate_number="c",
        resident_id="r-1", municipality_code=SHIRAHAMA, trip_id="t", reason="over_count", detail="",
        rejected_at=DECIDED,
    )) is None


# -- formatting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("language", ["ja", "en"])
def test_every_reason_code_is_told_as_its_sentence_and_old_free_text_as_other(language: Language) -> None:
    for kind, codes in REASONS.items():
        for code, text in codes.items():
            assert write_fact(Reason(kind, code), language) == text.in_language(language)
    # A revocation published before the codes carried the staff's words: the resident never reads them.
    old = CertificateRevoked.model_validate(
        {**sample_events("r-9")["certificate_revoked"].model_dump(), "reason": "本人の病気（うつ病）のため"}
    )
    notice = notice_for(old)
    assert notice is not None
    body = render(notice, language, "山田 太郎").body
    assert "うつ病" not in body and REVOCATION_REASONS["other"].in_language(language) in body
    # The legacy texts the platform wrote itself keep their meaning.
    assert write_fact(Reason("cancellation", "certificate revoked: 転居"), language) == (
        CANCELLATION_REASONS["certificate_revoked"].in_language(language)
    )
    assert write_fact(Reason("revocation", "resident withdrew"), language) == (
        REVOCATION_REASONS["resident_withdrawn"].in_language(language)
    )


def test_dates_are_written_in_japan_time() -> None:
    assert format_date(date(2026, 11, 26), "ja") == "2026年11月26日"
    assert format_date(date(2026, 11, 26), "en") == "26 November 2026"
    assert format_date(date(2027, 1, 3), "en") == "3 January 2027"
    assert format_date(datetime(2026, 12, 31, 15, 0, tzinfo=UTC), "ja") == "2027年1月1日"
    assert format_date(datetime(2026, 12, 31, 14, 59, tzinfo=UTC), "ja") == "2026年12月31日"


def test_yen_and_miles() -> None:
    assert format_amount(Amount(30000, "jpy"), "ja") == "30,000円"
    assert format_amount(Amount(30000, "jpy"), "en") == "¥30,000"
    assert format_amount(Amount(1234567, "jpy"), "en") == "¥1,234,567"
    assert format_amount(Amount(30000, "miles"), "ja") == "30,000マイル"
    assert format_amount(Amount(30000, "miles"), "en") == "30,000 miles"
    assert format_amount(Amount(1, "miles"), "en") == "1 mile"
    assert format_amount(Amount(0, "jpy"), "ja") == "0円"


# -- templates -----------------------------------------------------------------------------------


def test_every_template_file_exists_and_parses() -> None:
    check_templates()


def test_malformed_templates_are_refused() -> None:
    with pytest.raises(TemplateError, match="Subject"):
        parse_template("Hello\n\nbody", "x.ja.txt")
    with pytest.raises(TemplateError, match="blank line"):
        parse_template("Subject: hi\nbody", "x.ja.txt")
    template = parse_template("Subject: $a\n\n$b and $$\n", "x.ja.txt")
    assert template.subject.substitute(a="1") == "1"
    assert template.body.substitute(b="2") == "2 and $\n"


def test_a_missing_fact_is_an_error_not_a_blank() -> None:
    notice = Notice("certificate_issued", "r-1", {"municipality": Place(SHIRAHAMA)})
    with pytest.raises(TemplateError, match="certificate_issued"):
        render(notice, "ja", "x")


# -- the contact projection and e-mail retries ---------------------------------------------------


def test_the_latest_email_consent_wins() -> None:
    early = ConsentState(purpose="email", granted=True, at=DECIDED)
    late = ConsentState(purpose="email", granted=False, at=DECIDED + timedelta(hours=1))
    other = ConsentState(purpose="share_certificate", partner="jal", granted=True, at=DECIDED + timedelta(days=1))
    assert email_consent([late, early, other]) == late
    assert email_consent([other]) is None
    assert email_consent([]) is None


def test_backoff_doubles_up_to_a_cap() -> None:
    policy = RetryPolicy(base=timedelta(seconds=30), cap=timedelta(minutes=5), max_attempts=4)
    assert [policy.delay(n).total_seconds() for n in range(1, 7)] == [30, 60, 120, 240, 300, 300]
    assert not policy.gives_up_after(3)
    assert policy.gives_up_after(4)
    assert policy.delay(500) == timedelta(minutes=5)


def test_only_a_5xx_about_the_message_is_permanent() -> None:
    assert is_permanent_smtp_failure("rcpt", 550)
    assert is_permanent_smtp_failure("data", 554)
    assert not is_permanent_smtp_failure("rcpt", 451)
    assert not is_permanent_smtp_failure("connect", None)
    assert not is_permanent_smtp_failure("connect", 554)  # server refuses us: configuration, retry
    assert not is_permanent_smtp_failure("mail", 550)  # our sender address: configuration, retry


def test_failure_reasons_do_not_carry_the_address_or_the_name() -> None:
    reason = "550 5.1.1 <Taro@Example.jp>: Recipient address rejected"
    assert scrub_address(reason, "taro@example.jp") == "550 5.1.1 <<recipient>>: Recipient address rejected"
    echoed = '550 5.1.1 "山田 太郎" <taro@example.jp>: no such user'
    assert scrub_address(echoed, "taro@example.jp", "山田 太郎") == '550 5.1.1 "<name>" <<recipient>>: no such user'
    assert scrub_address("550 no", "taro@example.jp", " ") == "550 no"  # a blank name scrubs nothing
    assert scrub_address("451 try later", None) == "451 try later"
    assert len(scrub_address("x" * 2000, None)) == 500
