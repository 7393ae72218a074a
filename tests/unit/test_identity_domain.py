"""The identity provider's pure rules: passwords, account shapes, lockout, TOTP, refresh-token
verdicts, the claims of an access token, how long a rotated key stays published."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pyotp
import pytest

from services.identity import crypto
from services.identity.domain import (
    ACCESS_TOKEN_LIFETIME,
    IDENTITY_AUDIENCE,
    Account,
    AccountRole,
    Client,
    ClientRole,
    Grantee,
    InvalidAccount,
    InvalidClient,
    InvalidEmail,
    RefreshState,
    StaffRole,
    WeakPassword,
    accepted_totp_step,
    access_claims,
    amr_of,
    audiences,
    check_account_shape,
    check_client,
    check_password,
    is_locked,
    judge_refresh,
    lock_after_failure,
    must_enrol_totp,
    new_account_id,
    normalise_email,
    publish_until,
    published,
    session_lifetime,
    totp_step,
    totp_uri,
)
from services.registration.domain import check_resident_id
from shared.kit.my_number import looks_like_my_number

NOW = datetime(2026, 4, 1, 3, 0, 15, tzinfo=UTC)
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


# --- passwords and e-mail ------------------------------------------------------------------------


def test_a_password_has_twelve_characters_and_is_not_the_email() -> None:
    assert check_password("twelve chars", "hanako@example.jp") == "twelve chars"
    with pytest.raises(WeakPassword, match="at least 12"):
        check_password("elevenchars", "hanako@example.jp")
    with pytest.raises(WeakPassword, match="e-mail"):
        check_password("Hanako@Example.JP", "hanako@example.jp")
    with pytest.raises(WeakPassword, match="e-mail"):
        check_password("hanako.yamada", "hanako.yamada@example.jp")
    with pytest.raises(WeakPassword, match="at most"):
        check_password("x" * 257, "hanako@example.jp")


def test_an_email_is_lower_cased_and_must_look_like_one() -> None:
    assert normalise_email("  Hanako@Example.JP ") == "hanako@example.jp"
    for bad in ("hanako", "hanako@localhost", "a b@example.jp", "@example.jp", "x@" + "a" * 250 + ".jp"):
        with pytest.raises(InvalidEmail):
            normalise_email(bad)


# --- accounts and clients ------------------------------------------------------------------------


def test_staff_name_a_municipality_and_a_staff_role() -> None:
    check_account_shape(AccountRole.STAFF, municipality_code="304018", staff_role=StaffRole.REVIEWER, prefecture=None)
    for municipality, staff_role in (("304018", None), (None, StaffRole.MANAGER), ("300004", StaffRole.AUDITOR),
                                     ("999999", StaffRole.REVIEWER), ("30401", StaffRole.REVIEWER)):
        with pytest.raises(InvalidAccount):
            check_account_shape(AccountRole.STAFF, municipality_code=municipality, staff_role=staff_role,
                                prefecture=None)
    with pytest.raises(InvalidAccount, match="only staff"):
        check_account_shape(AccountRole.MINISTRY, municipality_code="304018", staff_role=None, prefecture=None)


def test_prefecture_readers_name_a_prefecture_and_residents_are_never_made_by_an_admin() -> None:
    check_account_shape(AccountRole.PREFECTURE, municipality_code=None, staff_role=None, prefecture="300004")
    with pytest.raises(InvalidAccount, match="prefecture code"):
        check_account_shape(AccountRole.PREFECTURE, municipality_code=None, staff_role=None, prefecture="304018")
    with pytest.raises(InvalidAccount, match="only prefecture readers"):
        check_account_shape(AccountRole.ADMIN, municipality_code=None, staff_role=None, prefecture="300004")
    with pytest.raises(InvalidAccount, match="sign up"):
        check_account_shape(AccountRole.RESIDENT, municipality_code=None, staff_role=None, prefecture=None)
    check_account_shape(AccountRole.MINISTRY, municipality_code=None, staff_role=None, prefecture=None)


def test_a_partner_client_names_a_known_partner_and_only_it_does() -> None:
    check_client("partner-jal", ClientRole.PARTNER, "jal")
    check_client("payment-provider", ClientRole.PAYMENT_PROVIDER, None)
    with pytest.raises(InvalidClient, match="names its partner"):
        check_client("partner-x", ClientRole.PARTNER, "Jet Star!")
    with pytest.raises(InvalidClient, match="only partner"):
        check_client("payment-provider", ClientRole.PAYMENT_PROVIDER, "jal")
    with pytest.raises(InvalidClient, match="client id"):
        check_client("Partner JAL", ClientRole.PARTNER, "jal")


def test_a_resident_id_never_looks_like_a_my_number() -> None:
    draws: Iterator[str] = iter(["ab123456789018" + "cd" * 9, "abcdef" * 5 + "01"])
    resident_id = new_account_id(AccountRole.RESIDENT, lambda: next(draws))
    assert resident_id == "res-" + "abcdef" * 5 + "01"  # the first draw held twelve digits in a row
    assert check_resident_id(resident_id) == resident_id  # registration takes it as a resident id


@pytest.mark.parametrize("role", [AccountRole.STAFF, AccountRole.PREFECTURE, AccountRole.MINISTRY, AccountRole.ADMIN])
def test_a_staff_or_admin_account_id_never_looks_like_a_my_number(role: AccountRole) -> None:
    draws: Iterator[str] = iter(["ab123456789018" + "cd" * 9, "abcdef" * 5 + "01"])
    account_id = new_account_id(role, lambda: next(draws))
    assert account_id == "usr-" + "abcdef" * 5 + "01"  # the first draw held twelve digits in a row
    assert not looks_like_my_number(account_id)  # it may appear in a path: /accounts/{id}/totp/reset


# --- lockout -------------------------------------------------------------------------------------


def test_the_fifth_failure_within_the_window_locks_for_fifteen_minutes() -> None:
    assert lock_after_failure(4, NOW) is None
    until = lock_after_failure(5, NOW)
    assert until == NOW + timedelta(minutes=15)
    assert is_locked(until, NOW + timedelta(minutes=14, seconds=59))
    assert not is_locked(until, NOW + timedelta(minutes=15))
    assert not is_locked(None, NOW)


# --- TOTP ----------------------------------------------------------------------------------------


def test_a_totp_code_is_accepted_once_within_one_step_either_side() -> None:
    totp = pyotp.TOTP(SECRET)
    step = totp_step(NOW)
    assert accepted_totp_step(SECRET, totp.at(NOW), NOW, None) == step
    assert accepted_totp_step(SECRET, totp.at(NOW - timedelta(seconds=30)), NOW, None) == step - 1
    assert accepted_totp_step(SECRET, totp.at(NOW + timedelta(seconds=30)), NOW, None) == step + 1
    assert accepted_totp_step(SECRET, totp.at(NOW - timedelta(seconds=60)), NOW, None) is None
    # Used once: the same step (or an earlier one) is refused, the next one is not.
    assert accepted_totp_step(SECRET, totp.at(NOW), NOW, step) is None
    assert accepted_totp_step(SECRET, totp.at(NOW + timedelta(seconds=30)), NOW, step) == step + 1
    for malformed in ("", "12345", "1234567", "abcdef"):
        assert accepted_totp_step(SECRET, malformed, NOW, None) is None


def test_the_otpauth_uri_names_the_issuer_account_and_secret() -> None:
    uri = totp_uri(SECRET, "reviewer@shirahama.example")
    assert uri.startswith("otpauth://totp/Nichiiki:reviewer@shirahama.example?")
    parsed = pyotp.parse_uri(uri)
    assert isinstance(parsed, pyotp.TOTP)
    assert (parsed.secret, parsed.issuer, parsed.name) == (SECRET, "Nichiiki", "reviewer@shirahama.example")


def test_staff_without_totp_must_enrol_residents_need_not() -> None:
    staff = Account("usr-1", "s@example.jp", AccountRole.STAFF, "h", municipality="304018",
                    staff_role=StaffRole.REVIEWER)
    assert must_enrol_totp(staff)
    assert not must_enrol_totp(Account("usr-2", "s2@example.jp", AccountRole.STAFF, "h", municipality="304018",
                                       staff_role=StaffRole.REVIEWER, totp_secret=SECRET, totp_enabled=True))
    assert not must_enrol_totp(Account("res-1", "r@example.jp", AccountRole.RESIDENT, "h"))
    assert session_lifetime(AccountRole.RESIDENT) > session_lifetime(AccountRole.STAFF) == timedelta(hours=12)


# --- refresh tokens ------------------------------------------------------------------------------


def test_a_refresh_token_is_good_once_in_a_live_session() -> None:
    expires = NOW + timedelta(days=1)
    assert judge_refresh(RefreshState(None, None, expires, True), NOW) == "ok"
    assert judge_refresh(None, NOW) == "unknown"
    assert judge_refresh(RefreshState(NOW, None, expires, True), NOW) == "reused"
    assert judge_refresh(RefreshState(None, NOW, expires, True), NOW) == "revoked"
    assert judge_refresh(RefreshState(NOW, NOW, expires, True), NOW) == "revoked"  # revoked already: nothing more
    assert judge_refresh(RefreshState(None, None, NOW, True), NOW) == "expired"
    assert judge_refresh(RefreshState(None, None, expires, False), NOW) == "enrolment_only"


# --- access tokens -------------------------------------------------------------------------------


def test_every_service_is_an_audience_with_dashes() -> None:
    listed = audiences(["registration", "certification", "partner_gateway", "identity"])
    assert listed == ["nichiiki-registration", "nichiiki-certification", "nichiiki-partner-gateway", IDENTITY_AUDIENCE]


def test_a_staff_token_carries_municipality_and_staff_role_only() -> None:
    account = Account("usr-1", "s@example.jp", AccountRole.STAFF, "h", municipality="304018",
                      staff_role=StaffRole.MANAGER)
    claims = access_claims(Grantee.of_account(account), issuer="https://id.example", audience=["a", "b"], now=NOW,
                           jti="j1", session_id="s1", amr=amr_of(True))
    assert claims == {
        "iss": "https://id.example", "sub": "usr-1", "aud": ["a", "b"], "iat": int(NOW.timestamp()),
        "nbf": int(NOW.timestamp()), "exp": int((NOW + ACCESS_TOKEN_LIFETIME).timestamp()), "jti": "j1",
        "sid": "s1", "role": "staff", "municipality": "304018", "staff_role": "manager", "amr": ["pwd", "otp"],
    }
    assert claims["exp"] - claims["iat"] == 900
    shorter = access_claims(Grantee.of_account(account), issuer="i", audience=["a"], now=NOW, jti="j",
                            lifetime=timedelta(minutes=5))
    assert shorter["exp"] - shorter["iat"] == 300


def test_readers_residents_and_clients_carry_their_own_claims() -> None:
    reader = Account("usr-2", "p@example.jp", AccountRole.PREFECTURE, "h", prefecture="300004")
    claims = access_claims(Grantee.of_account(reader), issuer="i", audience=["a"], now=NOW, jti="j", session_id="s",
                           amr=amr_of(False))
    assert (claims["role"], claims["prefecture"], claims["amr"]) == ("prefecture", "300004", ["pwd"])
    assert not {"municipality", "staff_role", "partner"} & set(claims)
    resident = access_claims(Grantee.of_account(Account("res-1", "r@example.jp", AccountRole.RESIDENT, "h")),
                             issuer="i", audience=["a"], now=NOW, jti="j", session_id="s", amr=["pwd"])
    assert set(resident) == {"iss", "sub", "aud", "iat", "nbf", "exp", "jti", "sid", "role", "amr"}
    partner = access_claims(Grantee.of_client(Client("partner-jal", ClientRole.PARTNER, "h", "jal")),
                            issuer="i", audience=["a"], now=NOW, jti="j")
    assert (partner["sub"], partner["role"], partner["partner"]) == ("partner-jal", "partner", "jal")
    assert "sid" not in partner and "amr" not in partner  # client credentials: no session
    provider = access_claims(Grantee.of_client(Client("payment-provider", ClientRole.PAYMENT_PROVIDER, "h")),
                             issuer="i", audience=["a"], now=NOW, jti="j")
    assert provider["role"] == "payment_provider" and "partner" not in provider


# --- signing keys and secrets --------------------------------------------------------------------


def test_a_rotated_key_stays_published_until_its_tokens_expired() -> None:
    until = publish_until(NOW)
    assert until == NOW + timedelta(seconds=3600) + timedelta(minutes=5)
    assert publish_until(NOW, timedelta(seconds=600)) == NOW + timedelta(minutes=15)
    assert published(None, None, NOW)
    assert published(NOW, until, until - timedelta(seconds=1))
    assert not published(NOW, until, until)


def test_a_jwk_is_public_and_named_by_its_thumbprint() -> None:
    key = crypto.new_signing_key()
    jwk = crypto.public_jwk(key)
    assert set(jwk) == {"kty", "crv", "x", "y", "kid", "use", "alg"}
    assert (jwk["kty"], jwk["crv"], jwk["use"], jwk["alg"]) == ("EC", "P-256", "sig", "ES256")
    assert jwk == crypto.public_jwk(key.public_key())
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", jwk["kid"])
    encrypted = crypto.private_pem(key, "passphrase")
    assert "ENCRYPTED" in encrypted
    assert crypto.public_jwk(crypto.load_private_pem(encrypted, "passphrase")) == jwk


def test_secrets_are_kept_as_argon2id_hashes() -> None:
    hashed = crypto.hash_secret("correct horse battery")
    assert hashed.startswith("$argon2id$")
    assert crypto.verify_secret(hashed, "correct horse battery")
    assert not crypto.verify_secret(hashed, "correct horse battery!")
    assert not crypto.verify_secret(None, "correct horse battery")
    assert not crypto.verify_secret("not a hash", "correct horse battery")
