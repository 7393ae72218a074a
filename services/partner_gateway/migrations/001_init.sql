-- Partner gateway: partners and their credentials, the consent and certificate projection,
-- per-partner entitlements (what the feed and the verification endpoint may show), the APPI
-- Art. 29 delivery record, grants held until their certificate is known, and the queue that
-- keeps the Redis verification cache in step with committed entitlements.

-- Partners: seeded (idempotently) at every start from the travel programs reference data.
CREATE TABLE partners (
    code           text PRIMARY KEY,
    name           text NOT NULL,
    kind           text NOT NULL CHECK (kind IN ('airline', 'rail', 'ferry')),
    -- HMAC key of the pseudonymous resident reference: random, generated once, never logged.
    pseudonym_key  bytea NOT NULL CHECK (octet_length(pseudonym_key) = 32),
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE partner_programs (
    partner            text NOT NULL REFERENCES partners (code),
    program_id         text NOT NULL,
    municipality_code  text NOT NULL,
    PRIMARY KEY (partner, program_id, municipality_code)
);

-- API keys: only the SHA-256 of the secret is kept; the secret is shown once, at creation.
CREATE TABLE partner_api_keys (
    id          uuid PRIMARY KEY,
    partner     text NOT NULL REFERENCES partners (code),
    key_hash    text NOT NULL UNIQUE,
    prefix      text NOT NULL,
    label       text,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_by  text,
    revoked_at  timestamptz
);
CREATE INDEX partner_api_keys_partner ON partner_api_keys (partner, created_at);

-- Residents who asked for erasure: nothing about them leaves the gateway again.
CREATE TABLE withdrawn_residents (
    resident_id   text PRIMARY KEY,
    withdrawn_at  timestamptz NOT NULL
);

-- The latest share_certificate consent per resident and partner (newest `at` wins).
CREATE TABLE share_consents (
    resident_id  text NOT NULL,
    partner      text NOT NULL,
    granted      boolean NOT NULL,
    at           timestamptz NOT NULL,
    PRIMARY KEY (resident_id, partner)
);

-- Certificates as last announced by the certification service.
CREATE TABLE certificates (
    certificate_number  text PRIMARY KEY,
    resident_id         text NOT NULL,
    municipality_code   text NOT NULL,
    valid_from          date NOT NULL,
    valid_until         date NOT NULL,
    status              text NOT NULL CHECK (status IN ('valid', 'revoked', 'expired')),
    memberships         jsonb NOT NULL,  -- [{"partner": "jal", "member_number": "..."}]
    changed_at          timestamptz NOT NULL,
    event_time          timestamptz NOT NULL  -- ce_time of the last applied event
);
CREATE INDEX certificates_resident ON certificates (resident_id);

-- One row per partner that ever saw a certificate: what that partner may see (active) or that
-- it was told to forget it (not active). `version` orders the Redis cache writes.
CREATE SEQUENCE entitlement_version;

CREATE TABLE entitlements (
    partner             text NOT NULL REFERENCES partners (code),
    certificate_number  text NOT NULL,
    resident_id         text,  -- NULL once the resident withdrew
    resident_ref        text NOT NULL,
    municipality_code   text NOT NULL,
    programs            text[] NOT NULL,
    member_number       text,
    status              text NOT NULL CHECK (status IN ('valid', 'revoked', 'expired')),
    valid_from          date NOT NULL,
    valid_until         date NOT NULL,
    active              boolean NOT NULL,
    withdrawn_reason    text CHECK (withdrawn_reason IN ('consent_revoked', 'resident_withdrawn')),
    consent_source      text NOT NULL,
    consent_at          timestamptz NOT NULL,
    changed_at          timestamptz NOT NULL,
    version             bigint NOT NULL,
    PRIMARY KEY (partner, certificate_number)
);
CREATE INDEX entitlements_resident ON entitlements (resident_id, partner);
CREATE INDEX entitlements_version ON entitlements (version);

-- Grant events that arrived before their certificate (another topic, no order across topics).
CREATE TABLE held_grants (
    id                  bigserial PRIMARY KEY,
    certificate_number  text NOT NULL,
    resident_id         text NOT NULL,
    event_id            uuid NOT NULL UNIQUE,
    event_type          text NOT NULL,
    data                bytea NOT NULL,
    held_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX held_grants_certificate ON held_grants (certificate_number, id);
CREATE INDEX held_grants_resident ON held_grants (resident_id);

-- APPI Art. 29: one row per record handed to a partner (which partner, whose data by
-- pseudonym, which items, on which consent, when), written with the outbox row.
CREATE TABLE deliveries (
    id                  bigserial PRIMARY KEY,
    partner             text NOT NULL,
    resident_ref        text NOT NULL,
    certificate_number  text NOT NULL,
    municipality_code   text NOT NULL,
    record_type         text NOT NULL,  -- ce_type, or 'tombstone'
    items               text[] NOT NULL,
    consent_purpose     text NOT NULL,
    consent_source      text NOT NULL,
    consent_at          timestamptz NOT NULL,
    event_id            uuid NOT NULL UNIQUE,  -- ce_id of the record sent
    cause_event_id      uuid,                  -- ce_id of the event that caused it
    delivered_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX deliveries_partner ON deliveries (partner, delivered_at);
CREATE INDEX deliveries_municipality ON deliveries (municipality_code, delivered_at);
CREATE INDEX deliveries_time ON deliveries (delivered_at);

-- Entitlements changed since the Redis cache last saw them (drained after each commit).
CREATE TABLE verify_cache_queue (
    id                  bigserial PRIMARY KEY,
    partner             text NOT NULL,
    certificate_number  text NOT NULL
);
