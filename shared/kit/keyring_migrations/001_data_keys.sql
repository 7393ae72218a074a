-- One data key per person, wrapped (AES-GCM) with the key-encryption key the operator holds
-- (NICHIIKI_KEYRING_MASTER_KEY, a KMS in production). Erasure sets key to NULL and keeps the row:
-- the tombstone makes sure no key is ever made again for an erased person.
CREATE TABLE data_keys (
    subject      text PRIMARY KEY,
    wrapped_key  bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    shredded_at  timestamptz,
    CHECK ((wrapped_key IS NULL) = (shredded_at IS NOT NULL))
);
