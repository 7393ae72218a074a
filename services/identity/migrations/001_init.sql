-- Identity: accounts, OAuth clients, sessions with rotating refresh tokens, failed sign-ins, signing keys.

-- People who sign in with a password: residents, municipal staff, prefecture and ministry readers, admins.
CREATE TABLE accounts (
    account_id       text        PRIMARY KEY,
    email            text        NOT NULL UNIQUE CHECK (email = lower(email)),
    role             text        NOT NULL CHECK (role IN ('resident', 'staff', 'prefecture', 'ministry', 'admin')),
    password_hash    text        NOT NULL,
    municipality     text        CHECK (municipality ~ '^[0-9]{6}$'),
    staff_role       text        CHECK (staff_role IN ('reviewer', 'manager', 'auditor')),
    prefecture       text        CHECK (prefecture ~ '^[0-9]{6}$'),
    -- TOTP (RFC 6238): a secret is pending until a code confirms it; the last accepted time step
    -- is kept so one code is never accepted twice.
    totp_secret      text,
    totp_enabled     boolean     NOT NULL DEFAULT false,
    totp_last_step   bigint,
    locked_until     timestamptz,
    created_at       timestamptz NOT NULL,
    created_by       text        NOT NULL,
    CHECK ((role = 'staff') = (municipality IS NOT NULL AND staff_role IS NOT NULL)),
    CHECK ((role = 'prefecture') = (prefecture IS NOT NULL)),
    CHECK (NOT totp_enabled OR totp_secret IS NOT NULL)
);

-- Failed sign-ins (wrong password or TOTP code): the lockout counts those of the last window; a
-- successful sign-in, or the lock they caused, clears them.
CREATE TABLE sign_in_failures (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  text        NOT NULL REFERENCES accounts ON DELETE CASCADE,
    at          timestamptz NOT NULL,
    reason      text        NOT NULL CHECK (reason IN ('password', 'totp'))
);
CREATE INDEX sign_in_failures_by_account ON sign_in_failures (account_id, at);

-- Systems that sign in with client credentials: partners' service accounts, the payment provider.
CREATE TABLE clients (
    client_id    text        PRIMARY KEY,
    role         text        NOT NULL CHECK (role IN ('partner', 'payment_provider')),
    partner      text,
    secret_hash  text        NOT NULL,
    created_at   timestamptz NOT NULL,
    created_by   text        NOT NULL,
    CHECK ((role = 'partner') = (partner IS NOT NULL))
);

-- A sign-in session (the tokens' sid): sign-out or a reused refresh token revokes it.
CREATE TABLE sessions (
    session_id      text        PRIMARY KEY,
    account_id      text        NOT NULL REFERENCES accounts ON DELETE CASCADE,
    amr             text[]      NOT NULL,
    -- false: a staff member's sign-in before TOTP enrolment, good for enrolling only (no refresh).
    full_access     boolean     NOT NULL,
    created_at      timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    revoked_at      timestamptz,
    revoked_reason  text        CHECK (revoked_reason IN ('sign_out', 'refresh_token_reused'))
);
CREATE INDEX sessions_by_account ON sessions (account_id);

-- Refresh tokens, by their SHA-256 only; each is used once (rotated), and a second use revokes the session.
CREATE TABLE refresh_tokens (
    token_hash  text        PRIMARY KEY,
    session_id  text        NOT NULL REFERENCES sessions ON DELETE CASCADE,
    issued_at   timestamptz NOT NULL,
    used_at     timestamptz
);
CREATE INDEX refresh_tokens_by_session ON refresh_tokens (session_id);

-- ES256 signing keys. The newest active key signs; a key rotated out stays in the JWKS until the
-- tokens it signed have expired (publish_until). The private key is PKCS#8 PEM, encrypted when
-- NICHIIKI_IDENTITY_KEY_PASSPHRASE is set.
CREATE TABLE signing_keys (
    kid            text        PRIMARY KEY,
    private_pem    text        NOT NULL,
    public_jwk     jsonb       NOT NULL,
    created_at     timestamptz NOT NULL,
    retired_at     timestamptz,
    publish_until  timestamptz,
    CHECK ((retired_at IS NULL) = (publish_until IS NULL))
);
-- One signing key at a time.
CREATE UNIQUE INDEX signing_keys_one_active ON signing_keys ((true)) WHERE retired_at IS NULL;
