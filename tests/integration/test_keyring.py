"""The key store of crypto-shredding, on the embedded PostgreSQL: seal, open, erase for good."""

from __future__ import annotations

import asyncpg
import pytest
from cryptography.exceptions import InvalidTag

from shared.contracts.sealed import Sealed, partner_kid, resident_subject
from shared.kit.auth import ConfigurationError
from shared.kit.keyring import Keyring, SubjectErased, keyring_dsn, master_key, open_with
from shared.kit.settings import Settings

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_sealed_value_opens_until_its_person_is_erased(settings: Settings) -> None:
    keyring = Keyring.from_settings(settings)
    other = Keyring.from_settings(settings)  # another process: its own cache
    try:
        kid = resident_subject("r-shred-1")
        sealed = await keyring.seal(kid, "山田 花子 hanako@example.jp")
        assert "hanako" not in sealed.model_dump_json() and "山田" not in sealed.model_dump_json()
        assert await other.open_text(sealed) == "山田 花子 hanako@example.jp"
        assert await keyring.shred(kid) is True
        assert await keyring.open(sealed) is None
        assert await keyring.shred(kid) is False  # erasing twice is the same state
        with pytest.raises(SubjectErased):
            await keyring.seal(kid, "again")  # no key is ever made again for an erased person
        fresh = Keyring.from_settings(settings)
        try:
            assert await fresh.open(sealed) is None
            with pytest.raises(SubjectErased):
                await fresh.seal(kid, "again")
        finally:
            await fresh.close()
    finally:
        await keyring.close()
        await other.close()


async def test_the_stored_key_is_wrapped_and_gone_after_erasure(settings: Settings) -> None:
    keyring = Keyring.from_settings(settings)
    try:
        kid = resident_subject("r-shred-2")
        key = await keyring.key_for_sealing(kid)
        conn = await asyncpg.connect(keyring_dsn(settings))
        try:
            wrapped = await conn.fetchval("SELECT wrapped_key FROM data_keys WHERE subject = $1", kid)
            assert wrapped is not None and key not in wrapped  # never stored in the clear
            await keyring.shred(kid)
            row = await conn.fetchrow("SELECT wrapped_key, shredded_at FROM data_keys WHERE subject = $1", kid)
            assert row is not None and row["wrapped_key"] is None and row["shredded_at"] is not None
        finally:
            await conn.close()
    finally:
        await keyring.close()


async def test_a_partner_key_opens_only_what_was_sealed_for_that_partner(settings: Settings) -> None:
    keyring = Keyring.from_settings(settings)
    try:
        resident = resident_subject("r-shred-3")
        jal = partner_kid("jal", "ref-of-r3-at-jal")
        sealed = await keyring.seal(jal, "JL1234567", subject=resident)
        assert "r-shred-3" not in sealed.model_dump_json()  # a partner never learns the resident id
        partner_key = await keyring.partner_key(resident, jal)
        assert partner_key is not None
        assert open_with(partner_key, sealed) == b"JL1234567"
        assert partner_key != await keyring.partner_key(resident, partner_kid("ana", "ref-of-r3-at-ana"))
        assert partner_key != await keyring.key_for_sealing(resident)
        forged = Sealed(kid=partner_kid("ana", "ref-of-r3-at-ana"), iv=sealed.iv, ct=sealed.ct)
        ana_key = await keyring.partner_key(resident, forged.kid)
        assert ana_key is not None
        with pytest.raises(InvalidTag):  # the kid is bound into the ciphertext, and so is the key
            open_with(ana_key, forged)
        await keyring.shred(resident)
        assert await keyring.partner_key(resident, jal) is None
    finally:
        await keyring.close()


async def test_many_values_open_in_one_round_trip(settings: Settings) -> None:
    keyring = Keyring.from_settings(settings)
    try:
        values = [await keyring.seal(resident_subject(f"r-many-{i}"), f"value {i}") for i in range(20)]
        await keyring.shred(resident_subject("r-many-3"))
        reader = Keyring.from_settings(settings)
        opened = await reader.open_many([*values, None])
        await reader.close()
        assert opened[3] is None and opened[-1] is None
        assert [o.decode() for i, o in enumerate(opened[:-1]) if i != 3 and o is not None] == [
            f"value {i}" for i in range(20) if i != 3
        ]
    finally:
        await keyring.close()


async def test_production_needs_a_master_key() -> None:
    with pytest.raises(ConfigurationError, match="NICHIIKI_KEYRING_MASTER_KEY"):
        master_key(Settings(env="production", keyring_master_key=None))
    with pytest.raises(ConfigurationError, match="32 bytes"):
        master_key(Settings(env="production", keyring_master_key="c2hvcnQ"))
