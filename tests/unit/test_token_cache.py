"""The verifier's cache of verified tokens: a client's repeated token skips the signature check, and
changes no answer: an expired token, a signed-out session and a key the issuer withdrew are refused
as without it, and what was refused is refused again."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
import pytest

from shared.kit import auth
from shared.kit.auth import JWKS_TTL_S, LEEWAY_S, Role, TokenVerifier, Unauthenticated, mint_token
from shared.kit.settings import Settings
from tests.unit.test_auth import Issuer, verifier


@pytest.fixture
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token PyJWT verifies (its signature and claims)."""
    seen: list[str] = []
    decode = auth._decoder.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(auth._decoder, "decode", counting)  # the decoder the verifier calls
    return seen


def development(**settings: Any) -> tuple[Settings, TokenVerifier]:
    values: dict[str, Any] = {"env": "development", "oidc_issuer": None, "redis_url": None, **settings}
    chosen = Settings(**values)
    return chosen, TokenVerifier(chosen, "registration")


async def test_a_token_verified_once_is_not_verified_again(decodes: list[str]) -> None:
    settings, checker = development()
    token = mint_token(settings, subject="resident-1", role=Role.RESIDENT)
    first = await checker.principal(token)
    again = await checker.principal(token)
    assert again is first and (again.subject, again.role) == ("resident-1", Role.RESIDENT)
    assert decodes == [token]


async def test_an_expired_token_is_refused_though_it_was_verified_before(decodes: list[str]) -> None:
    settings, checker = development()
    now = int(time.time())
    # Past its exp, but within the leeway: accepted for at most one more second.
    expires = now - LEEWAY_S + 1
    claims: dict[str, Any] = {
        "sub": "resident-2", "role": "resident", "iss": settings.jwt_issuer, "aud": "nichiiki-registration",
        "iat": now - 100, "nbf": now - 100, "exp": expires,
    }
    token = jwt.encode(claims, settings.jwt_secret, algorithm="HS256")
    await checker.principal(token)
    await checker.principal(token)
    assert decodes == [token]  # the second answer came from the cache
    await asyncio.sleep(max(0.0, expires + LEEWAY_S - time.time()) + 0.05)  # PyJWT's clock is the wall clock
    with pytest.raises(Unauthenticated, match="expired"):
        await checker.principal(token)
    with pytest.raises(Unauthenticated, match="expired"):
        await checker.principal(token)


class Sessions:
    """Redis as the verifier asks it: whether a session was signed out."""

    def __init__(self) -> None:
        self.revoked: set[str] = set()
        self.asked = 0

    async def exists(self, key: str) -> int:
        self.asked += 1
        return int(key.removeprefix(auth.REVOKED_SESSION_PREFIX) in self.revoked)


async def test_a_signed_out_session_is_refused_though_its_token_was_verified_before(
    decodes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "REVOCATION_CACHE_S", 0.0)  # ask Redis on every request
    settings, checker = development(redis_url="redis://127.0.0.1:1/0")
    sessions = Sessions()
    checker._redis = sessions  # type: ignore[assignment]
    token = mint_token(settings, subject="resident-3", role=Role.RESIDENT, session="session-3")
    assert (await checker.principal(token)).session == "session-3"
    await checker.principal(token)
    assert (decodes, sessions.asked) == ([token], 2)
    sessions.revoked.add("session-3")
    with pytest.raises(Unauthenticated, match="signed out"):
        await checker.principal(token)
    assert decodes == [token]  # refused by the revocation check on a cached token


async def test_the_cache_keeps_at_most_its_size_and_forgets_the_oldest_first(
    decodes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "VERIFIED_TOKENS", 3)
    settings, checker = development()
    tokens = [mint_token(settings, subject=f"resident-{i}", role=Role.RESIDENT) for i in range(5)]
    for token in tokens:
        await checker.principal(token)
    assert len(checker._verified) == 3
    decodes.clear()
    for token in tokens[2:]:  # the newest three: still known
        await checker.principal(token)
    assert decodes == []
    await checker.principal(tokens[0])  # forgotten: verified again
    assert decodes == [tokens[0]] and len(checker._verified) == 3


async def test_a_key_the_issuer_withdraws_stops_working_as_soon_as_without_the_cache(
    issuer: Issuer, decodes: list[str]
) -> None:
    checker = verifier(issuer)
    token = issuer.token()
    await checker.principal(token)
    issuer.published.remove("ec-1")
    await checker.principal(token)  # the keys fetched are not due again yet: still trusted
    assert decodes == [token]
    assert checker.keys is not None
    checker.keys._fetched_at -= JWKS_TTL_S + 1  # due again: the next request fetches the JWKS
    with pytest.raises(Unauthenticated, match="not one the issuer publishes"):
        await checker.principal(token)


async def test_a_fetch_of_the_keys_makes_every_token_be_verified_again(issuer: Issuer, decodes: list[str]) -> None:
    checker = verifier(issuer)
    token = issuer.token()
    await checker.principal(token)
    assert checker.keys is not None
    checker.keys._fetched_at -= JWKS_TTL_S + 1
    await checker.principal(token)
    assert (decodes, issuer.fetches) == ([token, token], 2)


async def test_what_was_refused_is_refused_again(issuer: Issuer, decodes: list[str]) -> None:
    checker = verifier(issuer)
    good = issuer.token()
    await checker.principal(good)
    # Signed by another key under the issuer's kid: the same header as the good token's.
    forged = jwt.encode(jwt.decode(good, options={"verify_signature": False}), Issuer().keys["ec-1"],
                        algorithm="ES256", headers={"kid": "ec-1"})
    assert forged.partition(".")[0] == good.partition(".")[0]
    for _ in range(2):
        with pytest.raises(Unauthenticated, match="Signature verification failed"):
            await checker.principal(forged)
    for malformed in ("not.a.token", good[:-8] + "!!!!!!!!"):
        for _ in range(2):
            with pytest.raises(Unauthenticated, match="invalid bearer token"):
                await checker.principal(malformed)
    assert good in checker._verified and len(checker._verified) == 1
