-- Certification: municipality rules, the resident projection, applications, certificates, audit trail.

-- Rules of each municipality with an adopted 特定居住促進計画: seeded from the reference data at
-- start (never overwriting edits), or added by an admin when a municipality adopts a plan later.
CREATE TABLE municipality_rules (
    municipality_code      text        PRIMARY KEY CHECK (municipality_code ~ '^[0-9]{6}$'),
    plan_source            text        NOT NULL CHECK (plan_source IN ('reference', 'admin')),
    plan_adopted_on        date,
    min_stay_days          integer     NOT NULL DEFAULT 30 CHECK (min_stay_days BETWEEN 1 AND 366),
    housing_bases          text[]      NOT NULL
        DEFAULT ARRAY['owned', 'rented', 'trial_residence', 'shared_house', 'hotel']
        CHECK (cardinality(housing_bases) > 0),
    validity_days          integer     NOT NULL DEFAULT 365 CHECK (validity_days BETWEEN 1 AND 1096),
    required_registration  text        NOT NULL DEFAULT 'any_active'
        CHECK (required_registration IN ('any_active', 'premium')),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    updated_by             text        NOT NULL DEFAULT 'system'
);

-- Projection of registration.residents.v1. Only consumers write these three tables, and only from
-- event fields (never now()), so replaying the topic into an empty database rebuilds them exactly.
CREATE TABLE residents (
    resident_id         text        PRIMARY KEY,
    status              text        NOT NULL CHECK (status IN ('active', 'withdrawn')),
    legal_address_code  text,                  -- erased (NULL) once the resident withdraws
    withdrawn_at        timestamptz,
    last_event_at       timestamptz NOT NULL
);

CREATE TABLE resident_registrations (
    registration_id    text        PRIMARY KEY,
    resident_id        text        NOT NULL REFERENCES residents ON DELETE CASCADE,
    municipality_code  text        NOT NULL,
    tier               text        NOT NULL CHECK (tier IN ('basic', 'premium')),
    status             text        NOT NULL
        CHECK (status IN ('active', 'pending_review', 'rejected', 'expired', 'withdrawn')),
    premium_status     text        CHECK (premium_status IN ('requested', 'approved', 'rejected', 'expired')),
    valid_until        date,
    last_event_at      timestamptz NOT NULL
);
CREATE INDEX resident_registrations_by_resident ON resident_registrations (resident_id, municipality_code);

-- The resident's share_certificate consent per partner (last writer wins by the consent's time).
CREATE TABLE share_consents (
    resident_id  text        NOT NULL REFERENCES residents ON DELETE CASCADE,
    partner      text        NOT NULL,
    granted      boolean     NOT NULL,
    at           timestamptz NOT NULL,
    PRIMARY KEY (resident_id, partner)
);

CREATE TABLE applications (
    application_id          text        PRIMARY KEY,
    resident_id             text        NOT NULL,
    municipality_code       text        NOT NULL REFERENCES municipality_rules,
    primary_residence_code  text        NOT NULL,
    planned_stay_days       integer     NOT NULL CHECK (planned_stay_days BETWEEN 1 AND 366),
    housing_basis           text        NOT NULL,
    address_there           text,                  -- personal: erased when the resident withdraws
    partners                jsonb       NOT NULL DEFAULT '[]',
    note                    text,                  -- personal: erased when the resident withdraws
    status                  text        NOT NULL CHECK (status IN ('submitted', 'approved', 'rejected')),
    submitted_at            timestamptz NOT NULL,
    decided_at              timestamptz,
    decided_by              text,
    decision_reason         text,
    certificate_number      text,
    erased_at               timestamptz
);
-- At most one open application per resident and municipality, even under concurrent requests.
CREATE UNIQUE INDEX applications_one_open ON applications (resident_id, municipality_code)
    WHERE status = 'submitted';
CREATE INDEX applications_queue ON applications (municipality_code, status, submitted_at, application_id);
CREATE INDEX applications_by_resident ON applications (resident_id, submitted_at);

-- Certificate numbers NCH-<code6>-<year>-<sequence>: one counter row per municipality and year,
-- incremented in the approval's transaction (the row lock serialises concurrent approvals).
CREATE TABLE certificate_counters (
    municipality_code  text    NOT NULL,
    year               integer NOT NULL,
    last_sequence      integer NOT NULL CHECK (last_sequence BETWEEN 1 AND 999999),
    PRIMARY KEY (municipality_code, year)
);

CREATE TABLE certificates (
    certificate_number  text        PRIMARY KEY CHECK (certificate_number ~ '^NCH-[0-9]{6}-[0-9]{4}-[0-9]{6}$'),
    municipality_code   text        NOT NULL,
    year                integer     NOT NULL,
    sequence            integer     NOT NULL,
    application_id      text        NOT NULL UNIQUE REFERENCES applications,
    resident_id         text        NOT NULL,
    valid_from          date        NOT NULL,
    valid_until         date        NOT NULL,
    status              text        NOT NULL CHECK (status IN ('valid', 'revoked', 'expired')),
    partners            jsonb       NOT NULL DEFAULT '[]',  -- declared memberships (numbers erased on withdrawal)
    issued_at           timestamptz NOT NULL,
    issued_by           text        NOT NULL,
    renewed_at          timestamptz,
    revoked_at          timestamptz,
    revocation_reason   text,
    expiring_sent_at    timestamptz,                          -- claimed by the scheduler: sent once
    expired_at          timestamptz,
    UNIQUE (municipality_code, year, sequence),
    CHECK (valid_until >= valid_from)
);
CREATE INDEX certificates_by_resident ON certificates (resident_id, municipality_code);
CREATE INDEX certificates_by_municipality ON certificates (municipality_code, certificate_number);
CREATE INDEX certificates_to_sweep ON certificates (valid_until) WHERE status = 'valid';

-- Every staff (and system) decision: who, when, what, why. Append-only, enforced by the database.
CREATE TABLE audit_trail (
    id                 bigserial   PRIMARY KEY,
    at                 timestamptz NOT NULL DEFAULT now(),
    actor              text        NOT NULL,
    actor_role         text        NOT NULL,
    municipality_code  text        NOT NULL,
    action             text        NOT NULL,
    target_type        text        NOT NULL,
    target_id          text        NOT NULL,
    reason             text,
    details            jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_trail_by_municipality ON audit_trail (municipality_code, id);

CREATE FUNCTION audit_trail_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_trail is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_trail_no_update_or_delete BEFORE UPDATE OR DELETE ON audit_trail
    FOR EACH ROW EXECUTE FUNCTION audit_trail_is_append_only();
CREATE TRIGGER audit_trail_no_truncate BEFORE TRUNCATE ON audit_trail
    FOR EACH STATEMENT EXECUTE FUNCTION audit_trail_is_append_only();
