"""The key store of crypto-shredding: one data key per person, destroyed when they are erased.

Personal fields in events are sealed (``shared/contracts/sealed.py``) with the data key of the
person they are about. The keys live in one database of their own (``<prefix>_keyring``, or
``NICHIIKI_KEYRING_DSN`` with credentials of its own), wrapped with a key-encryption key the
operator holds (``NICHIIKI_KEYRING_MASTER_KEY``). Every service reads them through this class:
authenticated by the database, cached in the process for ``keyring_cache_s`` and fetched in one
query per batch. Erasure (``shred``) destroys the key and leaves a tombstone, so no key is ever made
again for that person and every sealed copy anywhere (topics, dead letters, backups) stays unreadable.

A cached key outlives its erasure by at most ``keyring_cache_s`` in another process; an erased key
is remembered for good (erasure is final).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import asyncpg
import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel

from shared.contracts.sealed import Sealed
from shared.kit.auth import ConfigurationError
from shared.kit.errors import DomainError
from shared.kit.migrations import apply_migrations, ensure_database, load_migrations
from shared.kit.settings import Settings, database_of, with_database

log = structlog.get_logger(__name__)

KEYRING_MIGRATIONS = Path(__file__).parent / "keyring_migrations"
KEYRING_DATABASE = "keyring"
#: The development key-encryption key (only with NICHIIKI_ENV=development).
DEVELOPMENT_MASTER_KEY = hashlib.sha256(b"nichiiki development keyring master key").digest()
_NONCE_BYTES = 12
_KEY_BYTES = 32


class SubjectErased(DomainError):
    """Sealing for a person who was erased: nothing about them may be written again."""

    code = "subject-erased"
    status = 410
    title = "This person's data was erased"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def derive_partner_key(resident_key: bytes, kid: str) -> bytes:
    """A partner's key for one resident: HKDF of the resident's key, bound to the whole kid."""
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=kid.encode()).derive(resident_key)


def seal_with(key: bytes, kid: str, plaintext: bytes) -> Sealed:
    nonce = os.urandom(_NONCE_BYTES)
    return Sealed(kid=kid, iv=_b64(nonce), ct=_b64(AESGCM(key).encrypt(nonce, plaintext, kid.encode())))


def open_with(key: bytes, sealed: Sealed) -> bytes:
    """The plaintext; ``InvalidTag`` if the value was tampered with or sealed under another key."""
    return AESGCM(key).decrypt(_unb64(sealed.iv), _unb64(sealed.ct), sealed.kid.encode())


def master_key(settings: Settings) -> bytes:
    if settings.keyring_master_key is not None:
        key = _unb64(settings.keyring_master_key.get_secret_value())
        if len(key) != _KEY_BYTES:
            raise ConfigurationError("NICHIIKI_KEYRING_MASTER_KEY must be 32 bytes, base64url")
        return key
    if settings.env != "development":
        raise ConfigurationError(
            "NICHIIKI_KEYRING_MASTER_KEY is required outside development (32 random bytes, base64url: "
            "python -c 'import os,base64;print(base64.urlsafe_b64encode(os.urandom(32)).decode())')"
        )
    return DEVELOPMENT_MASTER_KEY


def keyring_dsn(settings: Settings) -> str:
    if settings.keyring_dsn is not None:
        return settings.keyring_dsn.get_secret_value()
    return settings.database_dsn(KEYRING_DATABASE)


#: Read the subjects' keys, and make the missing ones (a row made meanwhile elsewhere comes back in
#: neither part: the caller asks for it again).
_FETCH_OR_MAKE = """
    WITH wanted (subject, wrapped_key) AS (
        SELECT * FROM unnest($1::text[], $2::bytea[])
    ), known AS (
        SELECT d.subject, d.wrapped_key FROM data_keys d WHERE d.subject = ANY($1::text[])
    ), made AS (
        INSERT INTO data_keys (subject, wrapped_key)
        SELECT w.subject, w.wrapped_key FROM wanted w WHERE w.subject NOT IN (SELECT k.subject FROM known k)
        ON CONFLICT (subject) DO NOTHING
        RETURNING subject, wrapped_key
    )
    SELECT subject, wrapped_key FROM known UNION ALL SELECT subject, wrapped_key FROM made
"""


async def _keep_session(conn: asyncpg.Connection) -> None:
    """No reset on release (a round trip per use): the keyring's connections hold no session state
    (no advisory locks, LISTENs or settings); asyncpg still rolls back an open transaction."""


class Keyring:
    """Seal and open personal data; erase a person by destroying their key."""

    def __init__(self, dsn: str, master: bytes, *, cache_s: float = 30.0, admin_dsn: str | None = None) -> None:
        self._dsn = dsn
        self._admin_dsn = admin_dsn
        self._kek = AESGCM(master)
        self._cache_s = cache_s
        #: subject → (key or None when erased, when fetched); erased subjects are kept for good.
        self._cache: dict[str, tuple[bytes | None, float]] = {}
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()
        #: Keys for sealing asked and not yet answered (queued, or in the statement on the wire).
        self._asked: dict[str, asyncio.Future[bytes | None]] = {}
        self._queued: list[str] = []
        self._writer: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        admin = None if settings.keyring_dsn is not None else with_database(settings.pg_dsn or "", "postgres")
        return cls(keyring_dsn(settings), master_key(settings), cache_s=settings.keyring_cache_s, admin_dsn=admin)

    async def _connections(self) -> asyncpg.Pool:
        """The pool, opened (and the store migrated) on first use: most services seal or open rarely."""
        if self._pool is not None:
            return self._pool
        async with self._opening:
            if self._pool is None:
                if self._admin_dsn is not None:
                    await ensure_database(self._admin_dsn, database_of(self._dsn))
                conn = await asyncpg.connect(self._dsn)
                try:
                    await apply_migrations(conn, load_migrations(KEYRING_MIGRATIONS, "keyring"))
                finally:
                    await conn.close()
                self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=4, reset=_keep_session)
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # --- keys -------------------------------------------------------------------------------------

    def _unwrap(self, subject: str, wrapped: bytes) -> bytes:
        return self._kek.decrypt(wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:], subject.encode())

    def _wrap(self, subject: str, key: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._kek.encrypt(nonce, key, subject.encode())

    def _cached(self, subject: str) -> tuple[bool, bytes | None]:
        hit = self._cache.get(subject)
        if hit is None:
            return False, None
        key, at = hit
        if key is None or time.monotonic() - at < self._cache_s:
            return True, key
        return False, None

    def _erased_here(self, subject: str) -> bool:
        hit = self._cache.get(subject)
        return hit is not None and hit[0] is None

    async def keys(self, subjects: Iterable[str]) -> dict[str, bytes | None]:
        """Each subject's data key; None for an erased person or one who has no key yet."""
        found: dict[str, bytes | None] = {}
        missing: list[str] = []
        for subject in dict.fromkeys(subjects):
            hit, key = self._cached(subject)
            if hit:
                found[subject] = key
            else:
                missing.append(subject)
        if missing:
            pool = await self._connections()
            rows = await pool.fetch(
                "SELECT subject, wrapped_key FROM data_keys WHERE subject = ANY($1::text[])", missing
            )
            now = time.monotonic()
            for row in rows:
                key = None if row["wrapped_key"] is None else self._unwrap(row["subject"], row["wrapped_key"])
                self._cache[row["subject"]] = (key, now)
                found[row["subject"]] = key
            for subject in missing:
                found.setdefault(subject, None)  # no key yet: not cached, it may be made any moment
        return found

    async def key_for_sealing(self, subject: str) -> bytes:
        """The subject's key, made on first use; ``SubjectErased`` once they were erased.

        Keys asked for while a statement is on the wire are fetched or made together in the next
        one (one round trip and at most one commit for all of them): under load, batches grow by
        themselves; alone, a key is asked at once."""
        hit, key = self._cached(subject)
        if hit and key is not None:
            return key
        if hit:
            raise SubjectErased(f"{subject} was erased")
        asked = self._asked.get(subject)
        if asked is None:
            asked = self._asked[subject] = asyncio.get_running_loop().create_future()
            self._queued.append(subject)
            if self._writer is None:
                self._writer = asyncio.create_task(self._answer_queued())
        # Shielded: a caller that gives up does not fail the others waiting for the same statement.
        key = await asyncio.shield(asked)
        if key is None:
            raise SubjectErased(f"{subject} was erased")
        return key

    async def _answer_queued(self) -> None:
        """Fetch or make the queued keys, a statement at a time, until none is queued."""
        try:
            while self._queued:
                subjects, self._queued = self._queued, []
                try:
                    keys = await self._fetch_or_make(subjects)
                except Exception as error:  # each caller of this statement gets it (the runner may retry)
                    for subject in subjects:
                        self._asked.pop(subject).set_exception(error)
                    continue
                except BaseException:  # cancelled (shutting down): so is every caller still waiting
                    for subject in [*subjects, *self._queued]:
                        self._asked.pop(subject).cancel()
                    self._queued = []
                    raise
                for subject in subjects:
                    self._asked.pop(subject).set_result(keys[subject])
        finally:
            self._writer = None

    async def _fetch_or_make(self, subjects: Sequence[str]) -> dict[str, bytes | None]:
        """Each subject's key (None: erased), made where there is none yet. Existing keys are only
        read (no write, no commit to flush); a subject another process makes a key for meanwhile is
        read again in the next statement."""
        pool = await self._connections()
        wanted = sorted(set(subjects))  # one order everywhere: concurrent inserts never deadlock
        keys: dict[str, bytes | None] = {}
        while wanted:
            fresh = {subject: os.urandom(_KEY_BYTES) for subject in wanted}
            wrapped = {subject: self._wrap(subject, fresh[subject]) for subject in wanted}
            rows = await pool.fetch(_FETCH_OR_MAKE, wanted, [wrapped[subject] for subject in wanted])
            now = time.monotonic()
            for row in rows:
                subject, stored = row["subject"], row["wrapped_key"]
                # A key made by this statement is the fresh one: no need to unwrap it again.
                key = None if stored is None else fresh[subject] if stored == wrapped[subject] else (
                    self._unwrap(subject, stored)
                )
                if self._erased_here(subject):
                    key = None  # shredded by this process while the statement was on the wire: final
                self._cache[subject] = (key, now)
                keys[subject] = key
            wanted = [subject for subject in wanted if subject not in keys]
        return keys

    async def shred(self, subject: str) -> bool:
        """Destroy the subject's key for good (True if a key was destroyed now); idempotent."""
        pool = await self._connections()
        destroyed = await pool.fetchval(
            """
            WITH before AS (SELECT wrapped_key IS NOT NULL AS had FROM data_keys WHERE subject = $1)
            INSERT INTO data_keys (subject, wrapped_key, shredded_at) VALUES ($1, NULL, now())
            ON CONFLICT (subject) DO UPDATE SET wrapped_key = NULL,
                                                shredded_at = COALESCE(data_keys.shredded_at, now())
            RETURNING COALESCE((SELECT had FROM before), false)
            """,
            subject,
        )
        self._cache[subject] = (None, time.monotonic())
        log.info("data key shredded", subject=subject, destroyed=bool(destroyed))
        return bool(destroyed)

    # --- sealing ----------------------------------------------------------------------------------

    async def seal(self, kid: str, value: str | bytes | BaseModel, *, subject: str | None = None) -> Sealed:
        """Seal a value under ``kid``: the subject's own key, or (a partner's kid, with the resident's
        ``subject``) the key derived from it for that partner."""
        if isinstance(value, BaseModel):
            plaintext = value.model_dump_json().encode()
        elif isinstance(value, str):
            plaintext = value.encode()
        else:
            plaintext = value
        key = await self.key_for_sealing(subject or kid)
        if subject is not None and subject != kid:
            key = derive_partner_key(key, kid)
        return seal_with(key, kid, plaintext)

    async def open_many(self, sealed: Sequence[Sealed | None]) -> list[bytes | None]:
        """Plaintexts in order; None where the value is absent or its person was erased. (What is
        sealed for a partner is the partner's to open, with ``partner_key``.)"""
        keys = await self.keys(s.kid for s in sealed if s is not None)
        opened: list[bytes | None] = []
        for value in sealed:
            key = None if value is None else keys.get(value.kid)
            if value is None or key is None:
                opened.append(None)
                continue
            try:
                opened.append(open_with(key, value))
            except InvalidTag:
                log.warning("sealed value does not open under its key", kid=value.kid)
                opened.append(None)
        return opened

    async def open(self, sealed: Sealed | None) -> bytes | None:
        return (await self.open_many([sealed]))[0]

    async def open_text(self, sealed: Sealed | None) -> str | None:
        opened = await self.open(sealed)
        return None if opened is None else opened.decode()

    async def partner_key(self, subject: str, kid: str) -> bytes | None:
        """The key a partner opens ``kid`` with (derived from the resident ``subject``'s; None once
        the resident is erased)."""
        key = (await self.keys([subject]))[subject]
        return None if key is None else derive_partner_key(key, kid)
