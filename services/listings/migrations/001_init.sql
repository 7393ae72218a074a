-- Listings: what municipalities and their support corporations publish, residents' interests in
-- them, the matches waiting for a digest, "interested" and the record of contacts given to owners.
-- About residents this database holds only random ids and municipality codes (never a contact).

CREATE TABLE listings (
    listing_id            text        PRIMARY KEY,
    kind                  text        NOT NULL CHECK (kind IN ('vacant_house', 'trial_stay', 'job', 'side_job', 'event',
                                                               'community_activity', 'coworking',
                                                               'childcare_programme')),
    municipality_code     text        NOT NULL CHECK (municipality_code ~ '^[0-9]{6}$'),
    prefecture_code       text        NOT NULL CHECK (prefecture_code ~ '^[0-9]{6}$'),
    publisher             text        NOT NULL CHECK (publisher IN ('municipality', 'support_corporation')),
    corporation_id        text,
    area                  text        NOT NULL,
    title                 text        NOT NULL,
    summary               text        NOT NULL,
    language              text        NOT NULL CHECK (language IN ('ja', 'en')),
    available_from        date        NOT NULL,
    available_until       date,
    expires_on            date        NOT NULL,
    status                text        NOT NULL CHECK (status IN ('draft', 'published', 'withdrawn', 'expired')),
    -- The property owner's consent to publish (who, when, how): staff's record, never in an event.
    owner_name            text,
    owner_consented_on    date,
    owner_consent_method  text        CHECK (owner_consent_method IN ('written', 'electronic', 'in_person')),
    owner_document_ref    text,
    created_by            text        NOT NULL,
    created_at            timestamptz NOT NULL,
    published_at          timestamptz,
    withdrawn_at          timestamptz,
    withdrawal_reason     text,
    expired_on            date,
    -- No consent, no vacant house or trial stay (the domain refuses first; this is the last line).
    CONSTRAINT property_needs_owner_consent CHECK (
        kind NOT IN ('vacant_house', 'trial_stay')
        OR (owner_name IS NOT NULL AND owner_consented_on IS NOT NULL AND owner_consent_method IS NOT NULL))
);
CREATE INDEX listings_public ON listings (status, expires_on, kind);
CREATE INDEX listings_by_municipality ON listings (municipality_code, status);

-- Support corporations as planning.corporations.v1 tells them (designated or revoked).
CREATE TABLE corporations (
    corporation_id     text PRIMARY KEY,
    municipality_code  text NOT NULL,
    name               text NOT NULL,
    designated         boolean NOT NULL
);

-- Where residents belong (registration.residents.v1, certification.certificates.v1): ids and codes only.
CREATE TABLE resident_registrations (
    registration_id    text PRIMARY KEY,
    resident_id        text NOT NULL,
    municipality_code  text NOT NULL,
    prefecture_code    text NOT NULL
);
CREATE INDEX resident_registrations_by_resident ON resident_registrations (resident_id);
CREATE INDEX resident_registrations_by_place ON resident_registrations (municipality_code);
CREATE INDEX resident_registrations_by_prefecture ON resident_registrations (prefecture_code);

CREATE TABLE resident_certificates (
    certificate_number text PRIMARY KEY,
    resident_id        text NOT NULL,
    municipality_code  text NOT NULL
);
CREATE INDEX resident_certificates_by_resident ON resident_certificates (resident_id);
CREATE INDEX resident_certificates_by_place ON resident_certificates (municipality_code);

-- A resident's interests and their consent to receive matching listings (one row: revoking deletes it).
CREATE TABLE interests (
    resident_id         text        PRIMARY KEY,
    kinds               text[]      NOT NULL,
    municipality_codes  text[]      NOT NULL DEFAULT '{}',
    prefecture_codes    text[]      NOT NULL DEFAULT '{}',
    available_from      date,
    available_until     date,
    cadence             text        NOT NULL CHECK (cadence IN ('immediate', 'weekly')),
    consented_at        timestamptz NOT NULL,
    next_digest_at      timestamptz
);

-- A published listing matched to a resident; digest_id once a digest carried it (never twice).
CREATE TABLE matches (
    resident_id  text        NOT NULL,
    listing_id   text        NOT NULL REFERENCES listings ON DELETE CASCADE,
    matched_at   timestamptz NOT NULL,
    digest_id    text,
    digested_at  timestamptz,
    PRIMARY KEY (resident_id, listing_id)
);
CREATE INDEX matches_pending ON matches (resident_id) WHERE digest_id IS NULL;

-- "Interested": and, per listing, the consent that its owner gets the resident's contact.
CREATE TABLE listing_interests (
    resident_id         text        NOT NULL,
    listing_id          text        NOT NULL REFERENCES listings ON DELETE CASCADE,
    share_contact       boolean     NOT NULL,
    expressed_at        timestamptz NOT NULL,
    contact_consent_at  timestamptz,
    PRIMARY KEY (resident_id, listing_id)
);
CREATE INDEX listing_interests_by_listing ON listing_interests (listing_id);

-- The record of each contact given to a listing's owner (to whom, whose, which items, on what basis):
-- kept after the resident's erasure, under the random id only, for three years.
CREATE TABLE contact_deliveries (
    delivery_id      text        PRIMARY KEY,
    listing_id       text        NOT NULL,
    resident_id      text        NOT NULL,
    recipient_kind   text        NOT NULL CHECK (recipient_kind IN ('municipality', 'support_corporation')),
    recipient_id     text        NOT NULL,
    items            text[]      NOT NULL,
    basis            text        NOT NULL,
    registration_id  text        NOT NULL,
    delivered_at     timestamptz NOT NULL,
    delivered_by     text        NOT NULL
);
CREATE INDEX contact_deliveries_by_resident ON contact_deliveries (resident_id, delivered_at DESC);
CREATE INDEX contact_deliveries_age ON contact_deliveries (delivered_at);
