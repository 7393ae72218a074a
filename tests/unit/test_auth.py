"""Token verification: what the identity provider signs is accepted, everything else is refused.

The issuer is a stand-in served through httpx's mock transport: a discovery document and a JWKS
with real ES256 / RS256 keys (``cryptography``), so the verifier runs its real code path.
"""

from __future__ import annotations

import functools
import json
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, RSAAlgorithm
from jwt.api_jws import PyJWS

from shared.kit import auth
from shared.kit.auth import (
    ConfigurationError,
    Role,
    StaffRole,
    TokenVerifier,
    Unauthenticated,
    audience,
    mint_token,
)
from shared.kit.http import create_app
from shared.kit.settings import Settings

ISSUER = "https://id.example.jp/realms/wakayama"


class Issuer:
    """A stand-in OIDC issuer: its keys, its JWKS, and tokens signed as it would sign them."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {"ec-1": ec.generate_private_key(ec.SECP256R1())}
        self.published: list[str] = ["ec-1"]
        self.fetches = 0

    def rotate(self, kid: str, key: Any) -> None:
        self.keys[kid] = key
        self.published.append(kid)

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid in self.published:
            key = self.keys[kid]
            if isinstance(key, ec.EllipticCurvePrivateKey):
                jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
                jwk.update(alg="ES256")
            else:
                jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
                jwk.update(alg="RS256")
            keys.append({**jwk, "kid": kid, "use": "sig"})
        return {"keys": keys}

    def transport(self) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/.well-known/openid-configuration"):
                return httpx.Response(200, json={"issuer": ISSUER, "jwks_uri": f"{ISSUER}/protocol/certs"})
            if request.url.path.endswith("/protocol/certs"):
                self.fetches += 1
                return httpx.Response(200, json=self.jwks())
            return httpx.Response(404)

        return httpx.MockTransport(handle)

    def token(self, kid: str = "ec-1", **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER, "sub": "staff-42", "aud": [audience("certification")], "iat": now, "nbf": now,
            "exp": now + 900, "jti": str(uuid.uuid4()), "role": "staff", "municipality": "304018",
            "staff_role": "reviewer",
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        key = self.keys[kid]
        algorithm = "ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256"
        return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid})


@pytest.fixture
def issuer() -> Issuer:
    return Issuer()


def verifier(issuer: Issuer, **settings: Any) -> TokenVerifier:
    values: dict[str, Any] = {"env": "production", "oidc_issuer": ISSUER, "redis_url": None, **settings}
    return TokenVerifier(
        Settings(**values), "certification", http=httpx.AsyncClient(transport=issuer.transport())
    )


def test_a_service_outside_development_refuses_to_start_without_an_issuer() -> None:
    with pytest.raises(ConfigurationError, match="NICHIIKI_OIDC_ISSUER is not set"):
        create_app(service="certification", settings=Settings(env="production", oidc_issuer=None), routers=[])
    # development runs without one (the development key), and production with one
    create_app(service="certification", settings=Settings(env="development", oidc_issuer=None), routers=[])
    create_app(service="certification", settings=Settings(env="production", oidc_issuer=ISSUER), routers=[])


async def test_a_token_of_the_issuer_is_accepted_with_its_claims(issuer: Issuer) -> None:
    principal = await verifier(issuer).principal(issuer.token(sid="session-1"))
    assert (principal.subject, principal.role, principal.municipality, principal.staff_role, principal.session) == (
        "staff-42", Role.STAFF, "304018", StaffRole.REVIEWER, "session-1")


def _refusals(issuer: Issuer) -> dict[str, Callable[[], str]]:
    other = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())

    def forged() -> str:  # signed by a key the issuer does not publish, under its kid
        return jwt.encode(jwt.decode(issuer.token(), options={"verify_signature": False}), other,
                          algorithm="ES256", headers={"kid": "ec-1"})

    def unpublished() -> str:
        issuer.keys["ec-9"] = other
        return issuer.token(kid="ec-9")

    def unsigned() -> str:
        claims = jwt.decode(issuer.token(), options={"verify_signature": False})
        return jwt.encode(claims, "", algorithm="none")

    def development_key() -> str:
        return mint_token(Settings(env="production"), subject="admin", role=Role.ADMIN)

    return {
        "another audience": lambda: issuer.token(aud=[audience("donation")]),
        "another issuer": lambda: issuer.token(iss="https://evil.example/realms/x"),
        "expired": lambda: issuer.token(iat=now - 4000, nbf=now - 4000, exp=now - 100),
        "not yet valid": lambda: issuer.token(nbf=now + 600),
        "lives too long": lambda: issuer.token(exp=now + 7200),
        "no expiry": lambda: issuer.token(exp=None),
        "signed by another key under the issuer's kid": forged,
        "a kid the issuer does not publish": unpublished,
        "alg none": unsigned,
        "development key in production": development_key,
        "unknown role": lambda: issuer.token(role="superuser"),
        "staff without a staff role": lambda: issuer.token(staff_role=None),
        "staff without a municipality": lambda: issuer.token(municipality=None),
        "not a token": lambda: "not.a.token",
    }


@pytest.mark.parametrize("case", sorted(_refusals(Issuer())))
async def test_what_the_issuer_did_not_sign_as_expected_is_refused(issuer: Issuer, case: str) -> None:
    with pytest.raises(Unauthenticated):
        await verifier(issuer).principal(_refusals(issuer)[case]())


async def test_keys_are_cached_and_a_rotated_key_is_fetched_once_it_signs(issuer: Issuer) -> None:
    checker = verifier(issuer)
    for _ in range(5):
        await checker.principal(issuer.token())
    assert issuer.fetches == 1
    issuer.rotate("rsa-2", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    checker.keys._fetched_at -= 60  # type: ignore[union-attr]  # past the minimum refresh interval
    principal = await checker.principal(issuer.token(kid="rsa-2", role="partner", partner="jal"))
    assert (principal.role, principal.partner, issuer.fetches) == (Role.PARTNER, "jal", 2)


async def test_development_tokens_work_only_in_development() -> None:
    settings = Settings(env="development", oidc_issuer=None, redis_url=None)
    token = mint_token(settings, subject="staff-1", role=Role.STAFF, municipality="304018",
                       staff_role=StaffRole.AUDITOR)
    principal = await TokenVerifier(settings, "certification").principal(token)
    assert (principal.role, principal.staff_role) == (Role.STAFF, StaffRole.AUDITOR)
    issuer = Issuer()
    with pytest.raises(Unauthenticated, match="HS256"):
        await verifier(issuer).principal(token)


async def test_an_entra_style_token_is_read_through_the_claim_mapping(issuer: Issuer) -> None:
    """Entra ID: one audience (the API application's id) for every service, the role as a single app
    role in ``roles``, and the municipality from a directory extension attribute."""
    checker = verifier(issuer, oidc_audience="api-app-id",
                       oidc_claim_map={"municipality": "extension_app_municipality"})
    staff = issuer.token(aud="api-app-id", role=None, staff_role=None, municipality=None,
                         roles=["staff.auditor"], extension_app_municipality="304018")
    principal = await checker.principal(staff)
    assert (principal.role, principal.staff_role, principal.municipality) == (Role.STAFF, StaffRole.AUDITOR, "304018")
    partner = await checker.principal(issuer.token(aud="api-app-id", role=None, roles=["partner.jal"]))
    assert (principal.role, partner.role, partner.partner) == (Role.STAFF, Role.PARTNER, "jal")
    with pytest.raises(Unauthenticated):  # the service's own audience is no longer the one accepted
        await checker.principal(issuer.token())
    with pytest.raises(Unauthenticated):  # two app roles: which one it acts as is not for us to guess
        await checker.principal(issuer.token(aud="api-app-id", role=None, roles=["admin", "resident"]))


# --- The decoder: PyJWT's checks at a lower cost per fresh token -----------------------------------


def _answer(read: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", read()
    except Exception as error:
        return type(error).__name__, str(error)


def _segments() -> list[bytes]:
    fixed = [
        b"", b"e30", b"eyJhIjoxfQ", b"eyJhIjoxfQ==", b"eyJhIjoxfQ=", b"abc=", b"a", b"ab", b"abc", b"abcd", b"abcde",
        b"ab!c", b"ab+c", b"ab/c", b"ab c", b"ab\nc", b"e30\n", b"AB", b"AA", b"====", b"A===", b"AAA=", b"AB==",
        "é".encode(), b"-_-_", b"_w", b"_x",
    ]
    rng = random.Random(22)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    fuzz = [
        "".join(rng.choice(alphabet + ("=+/ .\n" if rng.random() < 0.3 else "")) for _ in range(rng.randrange(13)))
        .encode() for _ in range(3000)
    ]
    return fixed + fuzz


def test_a_segment_is_read_exactly_as_pyjwt_reads_it() -> None:
    for segment in _segments():
        ours = _answer(functools.partial(auth._Segments._decode_base64url_segment, segment, "payload"))
        theirs = _answer(functools.partial(PyJWS._decode_base64url_segment, segment, "payload"))
        assert ours == theirs, segment


def _development_tokens(settings: Settings) -> dict[str, str]:
    good = mint_token(settings, subject="resident-1", role=Role.RESIDENT)
    header, payload, signature = good.split(".")
    now = int(time.time())

    def signed(**claims: Any) -> str:
        values = {"sub": "resident-1", "role": "resident", "iss": settings.jwt_issuer,
                  "aud": [audience("registration")], "iat": now, "nbf": now, "exp": now + 600, **claims}
        return jwt.encode({k: v for k, v in values.items() if v is not None}, settings.jwt_secret, algorithm="HS256")

    flipped = "A" if payload[10] != "A" else "B"
    return {
        "good": good,
        "expired": signed(iat=now - 4000, nbf=now - 4000, exp=now - 100),
        "expired within the leeway": signed(iat=now - 4000, nbf=now - 4000, exp=now - 5),
        "not yet valid": signed(nbf=now + 600),
        "another audience": signed(aud=[audience("donation")]),
        "another issuer": signed(iss="https://evil.example"),
        "no expiry": signed(exp=None),
        "payload tampered": f"{header}.{payload[:10]}{flipped}{payload[11:]}.{signature}",
        "signature tampered": f"{header}.{payload}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BA'}",
        "signature cut": f"{header}.{payload}.{signature[:-1]}",
        "padded segment": f"{header}.{payload}==.{signature}",
        "bad character": f"{header}.{payload[:5]}!{payload[6:]}.{signature}",
        "another key": jwt.encode(
            {"sub": "x", "iss": settings.jwt_issuer, "aud": audience("registration"), "iat": now, "exp": now + 60},
            "another-key-of-32-bytes-or-more!!", algorithm="HS256",
        ),
        "alg none": jwt.encode(jwt.decode(good, options={"verify_signature": False}), "", algorithm="none"),
        "two segments": f"{header}.{payload}",
        "not a token": "not.a.token",
    }


def test_the_decoder_answers_every_token_as_pyjwt_does(issuer: Issuer) -> None:
    settings = Settings(env="development", oidc_issuer=None, redis_url=None)
    options = {"require": ["sub", "exp", "iat", "iss", "aud"]}
    for name, token in _development_tokens(settings).items():
        for algorithms in (["HS256"], ["none"]):
            kwargs: dict[str, Any] = {"algorithms": algorithms, "audience": audience("registration"),
                                      "issuer": settings.jwt_issuer, "leeway": 30, "options": options}
            ours = _answer(functools.partial(auth._decoder.decode, token, settings.jwt_secret, **kwargs))
            theirs = _answer(functools.partial(jwt.decode, token, settings.jwt_secret, **kwargs))
            assert ours == theirs, name
    key = jwt.PyJWK(issuer.jwks()["keys"][0]).key
    for token in (issuer.token(), issuer.token(aud=[audience("donation")]), issuer.token()[:-3] + "AAA"):
        kwargs = {"algorithms": ["ES256"], "audience": audience("certification"), "issuer": ISSUER, "leeway": 30}
        ours = _answer(functools.partial(auth._decoder.decode, token, key, **kwargs))
        assert ours == _answer(functools.partial(jwt.decode, token, key, **kwargs))


async def test_development_tokens_are_refused_when_expired_or_tampered_and_read_as_before() -> None:
    settings = Settings(env="development", oidc_issuer=None, redis_url=None)
    tokens = _development_tokens(settings)
    checker = TokenVerifier(settings, "registration")
    for _ in range(2):  # the second time from the cache of verified tokens, for the good one
        principal = await checker.principal(tokens["good"])
        assert (principal.subject, principal.role, principal.session) == ("resident-1", Role.RESIDENT, None)
    for name, token in tokens.items():
        if name not in ("good", "expired within the leeway"):
            for _ in range(2):  # refused, and refused again
                with pytest.raises(Unauthenticated):
                    await checker.principal(token)


def test_the_development_key_is_checked_once_and_a_refused_key_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    prepared: list[str | bytes] = []
    prepare = HMACAlgorithm.prepare_key

    def counting(self: HMACAlgorithm, key: str | bytes) -> bytes:
        prepared.append(key)
        return prepare(self, key)

    settings = Settings(env="development")
    tokens = [mint_token(settings, subject=f"resident-{index}", role=Role.RESIDENT) for index in range(3)]
    monkeypatch.setattr(HMACAlgorithm, "prepare_key", counting)
    decoder = auth._Decoder()
    for token in tokens:
        decoder.decode(token, settings.jwt_secret, algorithms=["HS256"], audience=audience("registration"))
    assert prepared == [settings.jwt_secret]
    pem = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n"
    for _ in range(2):
        with pytest.raises(jwt.InvalidKeyError):
            decoder.decode(token, pem, algorithms=["HS256"], audience=audience("registration"))
    assert prepared == [settings.jwt_secret, pem, pem]
