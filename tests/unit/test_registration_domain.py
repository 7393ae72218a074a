"""The registration rules without a database: inputs, registration plans, review decisions, calendar."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from services.registration import domain
from services.registration.attestation import AttestationVerifier, parse_providers
from services.registration.domain import ActivityPick, DesignatedActivity, IdentityVerification, Registration
from shared.kit import my_number
from shared.kit.settings import Settings
from shared.reference import municipality
from shared.stack.identity_verifier import DEVELOPMENT_ISSUER, attest, public_jwks

# 2026-03-01 15:30 UTC is already 2 March in Japan.
NOW = datetime(2026, 3, 1, 15, 30, tzinfo=UTC)
TODAY = date(2026, 3, 2)
HOME = "131016"  # 東京都千代田区
SHIRAHAMA, TANABE, WAKAYAMA = "304018", "302066", "300004"
YOKOHAMA, TSURUMI = "141003", "141011"  # 横浜市 and its ward 鶴見区


def new_id_factory() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"reg-{next(counter)}"


def jpki(verified_at: datetime = NOW - timedelta(days=1)) -> IdentityVerification:
    return IdentityVerification("jpki", verified_at, "https://verifier.example", "attestation-1")


def designated(town: str, code: str, **fields: Any) -> DesignatedActivity:
    entry = domain.new_designated_activity(
        municipality_code=town, code=code, name_ja=f"活動 {code}", name_en=f"Activity {code}", kind="environment",
        season=None, evidence_required=False, now=NOW - timedelta(days=400),
    )
    return replace(entry, **fields)


#: Each town's catalogue in these tests: six published entries, act0 .. act5.
CATALOGUE: dict[str, DesignatedActivity] = {
    entry.id: entry
    for town in (SHIRAHAMA, TANABE, "130001") for entry in (designated(town, f"act{i}") for i in range(6))
}


def acts(*days_ago: int, town: str = SHIRAHAMA) -> list[ActivityPick]:
    """One pick per day given, each of another entry of the town's catalogue."""
    return [ActivityPick(f"{town}-act{i}", TODAY - timedelta(days=d)) for i, d in enumerate(days_ago)]


def registration(code: str, **fields: object) -> Registration:
    values: dict[str, object] = {
        "id": f"r-{code}", "resident_id": "res-1", "municipality_code": code,
        "prefecture_code": municipality(code).prefecture_code, "tier": "basic", "status": "active",
        "derived_from": None, "registered_at": NOW,
    }
    values.update(fields)
    return Registration(**values)  # type: ignore[arg-type]


def plan(
    target: str, tier: domain.Tier = "basic", existing: list[Registration] | None = None,
    legal: str = HOME, identity: IdentityVerification | None = None, activities: list[ActivityPick] | None = None,
    catalogue: dict[str, DesignatedActivity] | None = None,
) -> domain.RegistrationPlan:
    return domain.plan_registration(
        resident_id="res-1", legal_address_code=legal, existing=existing or [], target_code=target, tier=tier,
        identity=identity, activities=activities or [], catalogue=CATALOGUE if catalogue is None else catalogue,
        now=NOW, new_id=new_id_factory(),
    )


# --- Inputs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("given_kana", "stored"), [
    ("ヤマダ ハナコ", "ヤマダ ハナコ"),
    ("やまだ　はなこ", "ヤマダ ハナコ"),
    ("ﾔﾏﾀﾞ ﾊﾅｺ", "ヤマダ ハナコ"),
    ("スミス・ジョン", "スミス・ジョン"),
    ("  コーヘー  ", "コーヘー"),
    ("ゔぁいおりん", "ヴァイオリン"),
])
def test_readings_are_kept_in_katakana(given_kana: str, stored: str) -> None:
    assert domain.normalise_kana(given_kana) == stored


@pytest.mark.parametrize("bad", ["山田 花子", "Yamada", "ヤマダ1", "", "   ", "ー・", "ヤマダ\nハナコ!"])
def test_a_reading_that_is_not_kana_is_refused(bad: str) -> None:
    with pytest.raises(domain.InvalidKana):
        domain.normalise_kana(bad)


def test_names_are_trimmed_and_control_characters_refused() -> None:
    assert domain.check_name(" 山田　 花子 ") == "山田 花子"
    for bad in ("", "  ", "山田\x00花子"):
        with pytest.raises(domain.InvalidName):
            domain.check_name(bad)


@pytest.mark.parametrize("bad", ["hanako", "hanako@", "@example.jp", "hanako@@example.jp", "花子 @example.jp"])
def test_invalid_email_is_refused(bad: str) -> None:
    with pytest.raises(domain.InvalidEmail):
        domain.check_email(bad)


def test_valid_email_and_phone_pass() -> None:
    assert domain.check_email("hanako.yamada@example.jp") == "hanako.yamada@example.jp"
    for phone in ("090-1234-5678", "03-1234-5678", "+81-90-1234-5678", "0312345678"):
        assert domain.check_phone(phone) == phone
    assert domain.check_phone(None) is None
    for bad in ("090 1234 5678", "call me", "+", "12", "++81-90", "090-1234-5678-"):
        with pytest.raises(domain.InvalidPhone):
            domain.check_phone(bad)


def test_a_resident_id_is_a_plain_identifier_and_never_a_my_number() -> None:
    assert domain.check_resident_id("res-abc_1@idp") == "res-abc_1@idp"
    for bad in ("", "has space", "x" * 129, "123456789018", "id-1234-5678-9018"):
        with pytest.raises(domain.InvalidResidentId):
            domain.check_resident_id(bad)


def test_a_birth_date_may_be_today_in_japan_but_not_later() -> None:
    details = domain.contact("山田 花子", "ヤマダ ハナコ", "hanako@example.jp", None, "ja")
    # NOW is still 1 March in UTC, already 2 March (TODAY) in Japan.
    assert domain.new_resident("res-1", details, TODAY, HOME, NOW).date_of_birth == TODAY
    with pytest.raises(domain.BirthDateInFuture):
        domain.new_resident("res-1", details, TODAY + timedelta(days=1), HOME, NOW)


@pytest.mark.parametrize("text", [
    # 123456789018: a valid check digit (the filter refuses only twelve digits that are a My Number)
    "123456789018", "1234-5678-9018", "1234 5678 9018", "１２３４５６７８９０１８", "番号は123456789018です",
    "1234‐5678‐9018", "1 2 3 4 5 6 7 8 9 0 1 8",
])
def test_twelve_digits_look_like_a_my_number(text: str) -> None:
    assert my_number.looks_like_my_number(text)


@pytest.mark.parametrize("text", [
    "090-1234-5678", "+81-90-1234-5678", "+819012345678", "1234567890123", "2026-03-02T10:00:00+09:00",
    "12345678901", "JPKI-SIGN-7F3A90C2", "棚田の草刈り 2026-02-01",
])
def test_other_numbers_do_not(text: str) -> None:
    assert not my_number.looks_like_my_number(text)


@given(st.text(alphabet="0123456789", min_size=11, max_size=11), st.lists(st.sampled_from([" ", "-", "　"]),
                                                                            max_size=11))
def test_any_twelve_digits_with_separators_are_found(first: str, separators: list[str]) -> None:
    digits = first + str(my_number.check_digit(first))
    text = "".join(d + (separators[i] if i < len(separators) else "") for i, d in enumerate(digits))
    assert my_number.looks_like_my_number(f"番号 {text} です")


def test_the_path_of_a_my_number_is_reported_not_its_value() -> None:
    document = {"name": "山田", "activities": [{"name": "a"}, {"document_ref": "1234-5678-9018"}]}
    assert my_number.find_my_number(document) == "$.activities[1].document_ref"
    with pytest.raises(my_number.MyNumberNotAllowed) as refused:
        my_number.refuse_my_number(document)
    assert "1234" not in refused.value.detail
    assert my_number.find_my_number({"unquoted": 123456789018}) == "$.unquoted"
    assert my_number.find_my_number({"a": {"123456789018": "x"}}) == "$.a (a member name)"
    assert my_number.find_my_number({"count": 3, "flag": True, "nothing": None}) is None


def test_municipality_codes_are_malformed_unknown_or_known() -> None:
    for malformed in ("30401", "3040188", "30401X", "304019", "３０４０１８"):
        with pytest.raises(domain.MalformedMunicipalityCode):
            domain.municipality_from_code(malformed)
    with pytest.raises(domain.UnknownMunicipalityCode):
        domain.municipality_from_code("999997")
    assert domain.municipality_from_code(SHIRAHAMA).full_name == "和歌山県白浜町"


def test_what_one_may_register_with_and_live_in() -> None:
    assert domain.registrable(WAKAYAMA).is_prefecture
    assert domain.registrable("131016").kind == "ward"  # Tokyo's special wards are municipalities
    with pytest.raises(domain.MunicipalityNotRegistrable):
        domain.registrable(TSURUMI)
    with pytest.raises(domain.MunicipalityNotRegistrable):
        domain.registrable("016951")  # 色丹村
    with pytest.raises(domain.InvalidLegalAddress):
        domain.legal_address("130001")
    assert domain.legal_address(TSURUMI).code == TSURUMI
    assert domain.home_municipality(TSURUMI) == YOKOHAMA


def test_identity_verification_must_be_recent_and_not_in_the_future() -> None:
    with pytest.raises(domain.IdentityNotVerified):
        domain.check_identity(None, NOW)
    with pytest.raises(domain.IdentityVerificationInvalid):
        domain.check_identity(jpki(NOW + timedelta(hours=1)), NOW)
    with pytest.raises(domain.IdentityVerificationInvalid):
        domain.check_identity(jpki(NOW - timedelta(days=366)), NOW)
    assert domain.check_identity(jpki(NOW + timedelta(seconds=20)), NOW)  # clock skew


# --- Identity attestations -----------------------------------------------------------------------

RESIDENT = "5f0c7c1e-3c1b-4a53-9d43-0d6c1f4f2a10"
#: Twelve digits whose last is the check digit of the first eleven (a well-formed individual number).
MY_NUMBER = next(
    candidate for candidate in (f"12345678901{d}" for d in range(10)) if my_number.looks_like_my_number(candidate)
)
BORN = date(1988, 4, 12)


def claims(**changes: Any) -> dict[str, Any]:
    """The claims of a valid attestation issued a minute before NOW; ``None`` removes a claim."""
    issued = int((NOW - timedelta(minutes=1)).timestamp())
    values: dict[str, Any] = {
        "iss": DEVELOPMENT_ISSUER, "sub": RESIDENT, "iat": issued, "exp": issued + 300, "jti": str(uuid.uuid4()),
        "method": "jpki", "verified_at": issued - 30, "birthdate": BORN.isoformat(),
    }
    values.update(changes)
    return {name: value for name, value in values.items() if value is not None}


def check(values: dict[str, Any], now: datetime = NOW) -> IdentityVerification:
    return domain.check_attestation(values, resident_id=RESIDENT, date_of_birth=BORN, now=now)


def test_a_valid_attestation_states_method_provider_time_and_id() -> None:
    values = claims()
    verification = check(values)
    assert verification == IdentityVerification(
        "jpki", datetime.fromtimestamp(values["verified_at"], UTC), DEVELOPMENT_ISSUER, values["jti"])
    # The birth date is checked only when the provider states it.
    assert check(claims(birthdate=None)).method == "jpki"


def test_an_expired_attestation_is_refused() -> None:
    issued = int((NOW - timedelta(minutes=6)).timestamp())
    with pytest.raises(domain.AttestationExpired):
        check(claims(iat=issued, exp=issued + 300, verified_at=issued))
    # 30 s of clock skew are tolerated, not more.
    exp = int(NOW.timestamp()) - 20
    assert check(claims(iat=exp - 300, exp=exp, verified_at=exp - 300))
    with pytest.raises(domain.AttestationExpired):
        check(claims(iat=exp - 300, exp=exp), now=NOW + timedelta(seconds=15))


@pytest.mark.parametrize(("case", "changes"), [
    ("lives longer than 10 minutes", {"exp": int(NOW.timestamp()) + 600}),
    ("expires before it is issued", {"exp": int((NOW - timedelta(minutes=2)).timestamp())}),
    ("issued in the future", {"iat": int((NOW + timedelta(minutes=2)).timestamp()),
                              "exp": int((NOW + timedelta(minutes=5)).timestamp())}),
    ("not valid yet", {"nbf": int((NOW + timedelta(minutes=2)).timestamp())}),
    ("another method", {"method": "password"}),
    ("no method", {"method": None}),
    ("no jti", {"jti": None}),
    ("a verification after the attestation", {"verified_at": int((NOW + timedelta(minutes=1)).timestamp())}),
    ("a verification time as text", {"verified_at": "2026-03-01T15:00:00Z"}),
    ("a birth date that is no date", {"birthdate": "12 April 1988"}),
    ("a My Number in a claim", {"individual_number": f"{MY_NUMBER[:4]}-{MY_NUMBER[4:8]}-{MY_NUMBER[8:]}"}),
])
def test_an_attestation_breaking_a_rule_is_invalid(case: str, changes: dict[str, Any]) -> None:
    with pytest.raises(domain.AttestationInvalid):
        check(claims(**changes))


def test_an_attestation_about_another_person_is_refused() -> None:
    with pytest.raises(domain.AttestationSubjectMismatch):
        check(claims(sub="another-resident"))
    with pytest.raises(domain.AttestationSubjectMismatch):
        check(claims(birthdate="1990-01-01"))


def test_a_verification_more_than_a_year_old_is_refused() -> None:
    with pytest.raises(domain.IdentityVerificationInvalid):
        check(claims(verified_at=int((NOW - timedelta(days=366)).timestamp())))


def verifier(providers: dict[str, Any] | None = None) -> AttestationVerifier:
    return AttestationVerifier(parse_providers(json.dumps(providers or {DEVELOPMENT_ISSUER: public_jwks()})))


def test_the_provider_signature_is_checked() -> None:
    token = attest(RESIDENT, jti="attestation-7")
    assert verifier().claims(token)["jti"] == "attestation-7"
    another_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(domain.AttestationInvalid, match="signature"):
        verifier().claims(attest(RESIDENT, key=another_key))
    with pytest.raises(domain.AttestationInvalid, match="signature"):  # a trusted kid, another key
        verifier().claims(token[: token.rindex(".") + 1] + attest(RESIDENT, key=another_key).rsplit(".", 1)[1])
    with pytest.raises(domain.AttestationInvalid, match="issuer"):
        verifier().claims(attest(RESIDENT, issuer="https://verifier.example"))
    with pytest.raises(domain.AttestationInvalid, match="compact JWS"):
        verifier().claims("not.a.token")


def test_only_es256_is_accepted_never_none_nor_a_shared_secret() -> None:
    issued = int(NOW.timestamp())
    values = {"iss": DEVELOPMENT_ISSUER, "sub": RESIDENT, "iat": issued, "exp": issued + 300, "jti": "x",
              "method": "jpki", "verified_at": issued}
    for token in (jwt.encode(values, "", algorithm="none"),
                  jwt.encode(values, "a shared secret of at least thirty-two bytes", algorithm="HS256")):
        with pytest.raises(domain.AttestationInvalid, match="not accepted"):
            verifier().claims(token)


def test_providers_are_trusted_by_issuer_and_development_only_in_development() -> None:
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(other_key.public_key()))  # no kid: tried in turn
    configured = json.dumps({"https://verifier.example": {"keys": [other_jwk]}})
    production = AttestationVerifier.from_settings(Settings(env="production"), configured)
    assert set(production.providers) == {"https://verifier.example"}
    token = attest(RESIDENT, issuer="https://verifier.example", key=other_key)
    assert production.claims(token)["iss"] == "https://verifier.example"
    with pytest.raises(domain.AttestationInvalid, match="issuer"):  # the development key is not trusted
        production.claims(attest(RESIDENT))
    # Another provider's key does not sign for this one.
    with pytest.raises(domain.AttestationInvalid):
        production.claims(attest(RESIDENT, issuer="https://verifier.example"))
    assert AttestationVerifier.from_settings(Settings(env="production"), "").providers == {}
    development = AttestationVerifier.from_settings(Settings(env="development"), configured)
    assert set(development.providers) == {"https://verifier.example", DEVELOPMENT_ISSUER}
    assert development.claims(attest(RESIDENT))["sub"] == RESIDENT


def test_consents_per_partner_only_for_sharing_the_certificate() -> None:
    domain.check_consent_target("share_certificate", "jal")
    domain.check_consent_target("email", None)
    with pytest.raises(domain.ConsentPartnerRequired):
        domain.check_consent_target("share_certificate", None)
    with pytest.raises(domain.UnknownPartner):
        domain.check_consent_target("share_certificate", "zipair")
    with pytest.raises(domain.ConsentPartnerNotAllowed):
        domain.check_consent_target("newsletter", "ana")


# --- Registration plans --------------------------------------------------------------------------


def test_a_basic_registration_brings_a_derived_prefecture_one() -> None:
    result = plan(SHIRAHAMA)
    assert result.is_new and result.review is None
    assert (result.registration.status, result.registration.prefecture_code) == ("active", WAKAYAMA)
    derived = result.derived_prefecture
    assert derived is not None and derived.municipality_code == WAKAYAMA
    assert derived.derived_from == result.registration.id and result.prefecture_registration_id == derived.id


def test_a_live_prefecture_registration_is_reused() -> None:
    prefecture = registration(WAKAYAMA, derived_from="r-x")
    result = plan(TANABE, existing=[registration(SHIRAHAMA), prefecture])
    assert result.derived_prefecture is None and result.prefecture_registration_id == prefecture.id
    ended = registration(WAKAYAMA, status="withdrawn")
    assert plan(TANABE, existing=[ended]).derived_prefecture is not None


def test_a_prefecture_directly_derives_nothing() -> None:
    result = plan(WAKAYAMA)
    assert result.derived_prefecture is None and result.prefecture_registration_id is None


def test_duplicates_are_conflicts_but_ended_registrations_are_not() -> None:
    with pytest.raises(domain.AlreadyRegistered):
        plan(SHIRAHAMA, existing=[registration(SHIRAHAMA)])
    with pytest.raises(domain.AlreadyRegistered):
        plan(WAKAYAMA, existing=[registration(WAKAYAMA, derived_from="r-x")])
    for status in ("withdrawn", "rejected", "expired"):
        assert plan(SHIRAHAMA, existing=[registration(SHIRAHAMA, status=status)]).is_new


def test_a_basic_registration_may_ask_for_premium() -> None:
    basic = registration(SHIRAHAMA)
    result = plan(SHIRAHAMA, "premium", [basic], identity=jpki(), activities=acts(1, 2, 3))
    assert not result.is_new and result.review == "upgrade" and result.registration.id == basic.id
    assert result.registration.status == "active" and result.registration.tier == "basic"
    under_review = replace(basic, pending_review="upgrade")
    with pytest.raises(domain.AlreadyRegistered):
        plan(SHIRAHAMA, "premium", [under_review], identity=jpki(), activities=acts(1, 2, 3))


def test_premium_rules() -> None:
    ok = plan(SHIRAHAMA, "premium", identity=jpki(), activities=acts(0, 100, 365))
    assert ok.registration.status == "pending_review" and ok.review == "initial"
    with pytest.raises(domain.ProofNotForBasic):
        plan(SHIRAHAMA, "basic", activities=acts(1, 2, 3))
    with pytest.raises(domain.IdentityNotVerified):
        plan(SHIRAHAMA, "premium", activities=acts(1, 2, 3))
    with pytest.raises(domain.PremiumInHomeMunicipality):
        plan(HOME, "premium", identity=jpki(), activities=acts(1, 2, 3))
    with pytest.raises(domain.PremiumInHomeMunicipality):  # a ward's municipality is its city
        plan(YOKOHAMA, "premium", legal=TSURUMI, identity=jpki(), activities=acts(1, 2, 3))
    # The home prefecture is allowed: the rule names the municipality.
    assert plan("130001", "premium", identity=jpki(), activities=acts(1, 2, 3, town="130001")).review == "initial"
    with pytest.raises(domain.NotEnoughActivities):
        plan(SHIRAHAMA, "premium", identity=jpki(), activities=acts(1, 2))
    with pytest.raises(domain.NotEnoughActivities):
        plan(SHIRAHAMA, "premium", identity=jpki(), activities=[ActivityPick(f"{SHIRAHAMA}-act0", TODAY)] * 3)
    with pytest.raises(domain.ActivityOutOfRange):
        plan(SHIRAHAMA, "premium", identity=jpki(), activities=acts(1, 2, -1))
    with pytest.raises(domain.ActivityOutOfRange):
        plan(SHIRAHAMA, "premium", identity=jpki(), activities=acts(1, 2, 366))


def test_at_most_three_premium_places_including_requests_under_review() -> None:
    held = [
        registration("016331", tier="premium"),
        registration("372081", tier="premium", status="pending_review", pending_review="initial"),
        registration("422100", pending_review="upgrade"),  # a basic one asking for premium
    ]
    with pytest.raises(domain.PremiumLimitReached):
        plan(SHIRAHAMA, "premium", held, identity=jpki(), activities=acts(1, 2, 3))
    freed = [*held[:2], replace(held[2], pending_review=None), registration("152242", tier="premium",
                                                                            status="expired")]
    assert plan(SHIRAHAMA, "premium", freed, identity=jpki(), activities=acts(1, 2, 3)).is_new


# --- Review decisions ----------------------------------------------------------------------------


def test_approval_makes_premium_valid_one_year_from_today_in_japan() -> None:
    pending = registration(SHIRAHAMA, tier="premium", status="pending_review", pending_review="initial")
    approved = domain.approve(pending, NOW)
    assert (approved.status, approved.valid_from, approved.valid_until) == ("active", TODAY, date(2027, 3, 2))
    assert approved.pending_review is None
    with pytest.raises(domain.AlreadyDecided):
        domain.approve(approved, NOW)
    leap = datetime(2028, 2, 29, 3, 0, tzinfo=UTC)
    assert domain.approve(pending, leap).valid_until == date(2029, 2, 28)


def test_an_early_renewal_keeps_the_days_left() -> None:
    active = registration(SHIRAHAMA, tier="premium", valid_from=date(2025, 5, 1), valid_until=date(2026, 5, 1),
                          pending_review="renewal")
    renewed = domain.approve(active, NOW)
    assert (renewed.valid_from, renewed.valid_until) == (date(2026, 5, 2), date(2027, 5, 1))
    lapsed = replace(active, status="expired", valid_until=date(2026, 2, 1))
    assert domain.approve(lapsed, NOW).valid_until == date(2027, 3, 2)


def test_a_rejection_ends_only_a_first_request() -> None:
    first = registration(SHIRAHAMA, tier="premium", status="pending_review", pending_review="initial")
    assert domain.reject(first).status == "rejected"
    upgrade = registration(SHIRAHAMA, pending_review="upgrade")
    assert (domain.reject(upgrade).tier, domain.reject(upgrade).status) == ("basic", "active")
    renewal = registration(SHIRAHAMA, tier="premium", valid_until=date(2026, 5, 1), pending_review="renewal")
    assert domain.reject(renewal) == replace(renewal, pending_review=None)
    with pytest.raises(domain.AlreadyDecided):
        domain.reject(registration(SHIRAHAMA))


def test_renewal_needs_activities_of_the_current_year() -> None:
    active = registration(SHIRAHAMA, tier="premium", valid_from=TODAY - timedelta(days=200),
                          valid_until=TODAY + timedelta(days=165))
    domain.plan_renewal(active, acts(1, 50, 199), CATALOGUE, NOW)
    with pytest.raises(domain.ActivityOutOfRange):
        domain.plan_renewal(active, acts(1, 50, 201), CATALOGUE, NOW)
    with pytest.raises(domain.ReviewPending):
        domain.plan_renewal(replace(active, pending_review="renewal"), acts(1, 2, 3), CATALOGUE, NOW)
    with pytest.raises(domain.NotRenewable):
        domain.plan_renewal(registration(SHIRAHAMA), acts(1, 2, 3), CATALOGUE, NOW)
    with pytest.raises(domain.NotRenewable):
        domain.plan_renewal(replace(active, status="expired"), acts(1, 2, 3), CATALOGUE, NOW)


# --- Withdrawal ----------------------------------------------------------------------------------


def test_the_derived_prefecture_follows_the_last_municipal_registration() -> None:
    prefecture = registration(WAKAYAMA, derived_from="r-304018")
    town, city = registration(SHIRAHAMA), registration(TANABE)
    assert domain.derived_prefecture_to_release(WAKAYAMA, [replace(town, status="withdrawn"), city,
                                                           prefecture]) is None
    assert domain.derived_prefecture_to_release(WAKAYAMA, [replace(town, status="withdrawn"), prefecture]) == prefecture
    direct = replace(prefecture, derived_from=None)
    assert domain.derived_prefecture_to_release(WAKAYAMA, [direct]) is None
    upgraded = replace(prefecture, tier="premium")
    assert domain.derived_prefecture_to_release(WAKAYAMA, [upgraded]) is None


def test_what_may_be_withdrawn() -> None:
    prefecture = registration(WAKAYAMA, derived_from="r-304018")
    town = registration(SHIRAHAMA)
    with pytest.raises(domain.DerivedRegistration):
        domain.check_withdrawable(prefecture, [town, prefecture])
    assert domain.check_withdrawable(prefecture, [replace(town, status="withdrawn"), prefecture])
    assert domain.check_withdrawable(town, [town, prefecture])
    assert not domain.check_withdrawable(replace(town, status="withdrawn"), [])
    with pytest.raises(domain.RegistrationClosed):
        domain.check_withdrawable(replace(town, status="rejected"), [])


def test_calendar_helpers() -> None:
    # New Year's Eve 15:00 UTC is New Year's Day in Japan: the validity starts then.
    pending = registration(SHIRAHAMA, tier="premium", status="pending_review", pending_review="initial")
    assert domain.approve(pending, datetime(2026, 12, 31, 15, 0, tzinfo=UTC)).valid_from == date(2027, 1, 1)
    assert domain.add_years(date(2024, 2, 29), 1) == date(2025, 2, 28)
    assert domain.add_years(date(2025, 3, 1), -1) == date(2024, 3, 1)


# --- Designated activities: premium picks from the municipality's catalogue ----------------------


def premium_with(activities: list[ActivityPick], catalogue: dict[str, DesignatedActivity] | None = None,
                 target: str = SHIRAHAMA) -> domain.RegistrationPlan:
    return plan(target, "premium", identity=jpki(), activities=activities, catalogue=catalogue)


def test_premium_needs_three_distinct_designated_activities() -> None:
    act0 = f"{SHIRAHAMA}-act0"
    assert premium_with(acts(1, 2, 3)).review == "initial"
    # One entry on three days is one designated activity, not three.
    with pytest.raises(domain.NotEnoughActivities, match="1 distinct"):
        premium_with([ActivityPick(act0, TODAY - timedelta(days=d)) for d in (1, 2, 3)])
    with pytest.raises(domain.NotEnoughActivities, match="2 distinct"):
        premium_with([*acts(1, 2), ActivityPick(act0, TODAY - timedelta(days=9))])
    # A fourth pick repeating one is fine once three distinct ones are there.
    assert premium_with([*acts(1, 2, 3), ActivityPick(act0, TODAY - timedelta(days=9))]).review == "initial"


def test_activities_are_the_municipalitys_own_designated_ones() -> None:
    with pytest.raises(domain.ActivityOfAnotherMunicipality, match=r"activities\[2\]"):
        premium_with([*acts(1, 2), *acts(3, 4, 5, town=TANABE)[2:]])
    with pytest.raises(domain.UnknownActivity, match=r"activities\[0\]"):
        premium_with([ActivityPick(f"{SHIRAHAMA}-freely-named", TODAY), *acts(1, 2, 3)[1:]])
    with pytest.raises(domain.UnknownActivity):  # a town that designated nothing takes no premium request
        premium_with(acts(1, 2, 3), catalogue={})
    # The same picks for 田辺市 are its own there.
    assert premium_with(acts(1, 2, 3, town=TANABE), target=TANABE).review == "initial"


def test_activities_are_dated_within_the_year() -> None:
    assert premium_with(acts(0, 200, 365)).review == "initial"  # the day one year ago counts
    with pytest.raises(domain.ActivityOutOfRange):
        premium_with(acts(0, 200, 366))
    with pytest.raises(domain.ActivityOutOfRange):
        premium_with(acts(-1, 2, 3))


def test_a_retired_activity_counts_only_when_done_before_its_retirement() -> None:
    # Retired 10 days before NOW: on 20 February in Japan (NOW - 10 days is 00:30 on 20 February there).
    retired = designated(SHIRAHAMA, "act0", status="retired", retired_at=NOW - timedelta(days=10))
    assert retired.retired_on == date(2026, 2, 20)
    catalogue = {**CATALOGUE, retired.id: retired}
    assert premium_with(acts(11, 2, 3), catalogue).review == "initial"
    with pytest.raises(domain.ActivityRetired, match=r"activities\[0\]"):
        premium_with(acts(10, 2, 3), catalogue)


def test_evidence_is_needed_where_the_municipality_says_so() -> None:
    strict = designated(SHIRAHAMA, "act1", evidence_required=True)
    catalogue = {**CATALOGUE, strict.id: strict}
    with pytest.raises(domain.ActivityEvidenceRequired, match=r"activities\[1\]"):
        premium_with(acts(1, 2, 3), catalogue)
    picks = acts(1, 2, 3)
    picks[1] = replace(picks[1], document_ref="photo-2026-02-28")
    assert premium_with(picks, catalogue).review == "initial"


def test_renewal_picks_from_the_catalogue_too() -> None:
    active = registration(TANABE, tier="premium", valid_from=TODAY - timedelta(days=200))
    domain.plan_renewal(active, acts(1, 2, 3, town=TANABE), CATALOGUE, NOW)
    with pytest.raises(domain.ActivityOfAnotherMunicipality):
        domain.plan_renewal(active, acts(1, 2, 3), CATALOGUE, NOW)
    with pytest.raises(domain.NotEnoughActivities):
        domain.plan_renewal(active, [ActivityPick(f"{TANABE}-act0", TODAY - timedelta(days=d)) for d in (1, 2, 3)],
                            CATALOGUE, NOW)


def test_a_catalogue_entry_is_checked_when_published() -> None:
    entry = designated(SHIRAHAMA, "beach-cleanup")
    assert (entry.id, entry.status, entry.sample, entry.retired_on) == (f"{SHIRAHAMA}-beach-cleanup", "published",
                                                                        False, None)
    for bad_code in ("", "Beach", "beach cleanup", "-beach", "x" * 41):
        with pytest.raises(domain.InvalidActivityCode):
            designated(SHIRAHAMA, bad_code)
    with pytest.raises(domain.InvalidActivityName):
        domain.new_designated_activity(municipality_code=SHIRAHAMA, code="x", name_ja=" \u3000", name_en="X",
                                       kind="other", season=None, evidence_required=False, now=NOW)
    with pytest.raises(domain.MunicipalityNotRegistrable):  # a ward designates nothing: its city does
        designated(TSURUMI, "x")


def test_changing_and_retiring_a_catalogue_entry() -> None:
    entry = replace(designated(SHIRAHAMA, "cleanup"), sample=True)
    assert domain.change_designated_activity(entry, {"name_ja": "活動 cleanup"}, NOW) is entry  # nothing changed
    changed = domain.change_designated_activity(entry, {"name_ja": "浜の清掃", "season": None,
                                                        "evidence_required": True}, NOW)
    assert (changed.name_ja, changed.season, changed.evidence_required, changed.updated_at) == (
        "浜の清掃", None, True, NOW)
    assert changed.sample is False  # the municipality's own entry now
    retired = domain.retire_designated_activity(changed, NOW)
    assert retired is not None and (retired.status, retired.retired_on) == ("retired", TODAY)
    assert domain.retire_designated_activity(retired, NOW) is None
    with pytest.raises(domain.DesignatedActivityRetired):
        domain.change_designated_activity(retired, {"name_ja": "別名"}, NOW)


def test_the_sample_catalogue_covers_every_programme_town() -> None:
    from services.registration.sample_activities import sample_catalogue
    from shared.reference import travel_programs

    entries = sample_catalogue(NOW)
    by_town: dict[str, list[DesignatedActivity]] = {}
    for entry in entries:
        by_town.setdefault(entry.municipality_code, []).append(entry)
    towns = {SHIRAHAMA} | {code for program in travel_programs() for code in program.municipality_codes}
    assert set(by_town) == towns
    assert len({e.id for e in entries}) == len(entries)
    assert all(e.sample and e.status == "published" for e in entries)
    assert all(len(listed) >= domain.MIN_ACTIVITIES for listed in by_town.values())
    assert {"304018-ume-harvest", "304018-shirarahama-beach-cleanup"} <= {e.id for e in by_town[SHIRAHAMA]}
