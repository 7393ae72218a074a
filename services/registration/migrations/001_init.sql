-- Registration: people, their registrations with municipalities, premium reviews and consents.
-- Personal data sits in a few nullable columns so an erasure can blank them and keep the rest
-- (dates, municipality, tier, status) for statistics.

CREATE TABLE residents (
    id                  text PRIMARY KEY,          -- the identity provider's subject
    status              text        NOT NULL CHECK (status IN ('active', 'erased')),
    name                text,
    name_kana           text,                      -- full-width katakana
    email               text,
    phone               text,
    date_of_birth       date,
    legal_address_code  text        NOT NULL,      -- erased: coarsened to the prefecture code
    preferred_language  text        NOT NULL CHECK (preferred_language IN ('ja', 'en')),
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    erased_at           timestamptz,
    CHECK (status = 'erased' OR (name IS NOT NULL AND name_kana IS NOT NULL AND email IS NOT NULL
                                 AND date_of_birth IS NOT NULL)),
    CHECK (status = 'active' OR (name IS NULL AND name_kana IS NULL AND email IS NULL AND phone IS NULL
                                 AND date_of_birth IS NULL))
);

CREATE TABLE registrations (
    id                 text PRIMARY KEY,
    resident_id        text        NOT NULL REFERENCES residents (id),
    municipality_code  text        NOT NULL,
    prefecture_code    text        NOT NULL,
    tier               text        NOT NULL CHECK (tier IN ('basic', 'premium')),
    status             text        NOT NULL
        CHECK (status IN ('active', 'pending_review', 'rejected', 'expired', 'withdrawn')),
    derived_from       text REFERENCES registrations (id),  -- a prefecture row that came with a municipal one
    registered_at      timestamptz NOT NULL,
    valid_from         date,                                -- premium validity, Japan dates, inclusive
    valid_until        date,
    ended_at           timestamptz,
    updated_at         timestamptz NOT NULL
);
-- One live registration per person and municipality (the duplicate rule, also under concurrency).
CREATE UNIQUE INDEX registrations_live_once ON registrations (resident_id, municipality_code)
    WHERE status IN ('active', 'pending_review');
CREATE INDEX registrations_by_resident ON registrations (resident_id);
CREATE INDEX registrations_by_municipality ON registrations (municipality_code, registered_at, id);
CREATE INDEX registrations_premium_due ON registrations (valid_until)
    WHERE status = 'active' AND tier = 'premium';

-- The JPKI verification result only: method, time, certificate serial and subject reference.
CREATE TABLE identity_verifications (
    id                  text PRIMARY KEY,
    resident_id         text        NOT NULL REFERENCES residents (id),
    method              text        NOT NULL CHECK (method = 'jpki'),
    verified_at         timestamptz NOT NULL,
    certificate_serial  text,        -- null once erased
    subject_ref         text,        -- null once erased
    recorded_at         timestamptz NOT NULL
);
CREATE INDEX identity_verifications_by_resident ON identity_verifications (resident_id);

-- A premium request (first, upgrade of a basic registration, or yearly renewal) and its decision.
CREATE TABLE premium_reviews (
    id                        text PRIMARY KEY,
    registration_id           text        NOT NULL REFERENCES registrations (id),
    kind                      text        NOT NULL CHECK (kind IN ('initial', 'upgrade', 'renewal')),
    status                    text        NOT NULL CHECK (status IN ('pending', 'approved', 'rejected', 'cancelled')),
    identity_verification_id  text REFERENCES identity_verifications (id),
    requested_at              timestamptz NOT NULL,
    decided_at                timestamptz,
    decided_by                text,       -- the staff member's subject (audit: who, when, why)
    reason                    text,       -- why it was rejected; blanked on erasure
    valid_until               date
);
CREATE UNIQUE INDEX premium_reviews_one_pending ON premium_reviews (registration_id) WHERE status = 'pending';

CREATE TABLE premium_activities (
    review_id      text NOT NULL REFERENCES premium_reviews (id),
    position       integer NOT NULL,
    name           text,                  -- free text of the person: null once erased
    activity_date  date NOT NULL,
    document_ref   text,
    PRIMARY KEY (review_id, position)
);

-- Current consents; partner '' means "not per partner".
CREATE TABLE consents (
    resident_id  text        NOT NULL REFERENCES residents (id),
    purpose      text        NOT NULL CHECK (purpose IN ('email', 'share_certificate', 'newsletter')),
    partner      text        NOT NULL DEFAULT '',
    granted      boolean     NOT NULL,
    changed_at   timestamptz NOT NULL,
    PRIMARY KEY (resident_id, purpose, partner)
);

-- Every grant and revocation, kept as proof of consent.
CREATE TABLE consent_log (
    id           bigserial PRIMARY KEY,
    resident_id  text        NOT NULL,
    purpose      text        NOT NULL,
    partner      text        NOT NULL DEFAULT '',
    granted      boolean     NOT NULL,
    at           timestamptz NOT NULL
);
CREATE INDEX consent_log_by_resident ON consent_log (resident_id, id);
