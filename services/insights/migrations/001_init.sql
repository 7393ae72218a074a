-- The read model of insights. Every table is a projection of events and is emptied by a rebuild
-- (a new generation re-reads every topic from the earliest offset under a fresh consumer group).

-- The generation the projection belongs to: a rebuild bumps it in the transaction that empties the
-- tables; consumers of an older generation find it changed and apply nothing more.
CREATE TABLE insights_state (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    generation  integer NOT NULL,
    rebuilt_at  timestamptz
);
INSERT INTO insights_state (singleton, generation) VALUES (true, 1);

-- One row per furusato registration. resident_id is kept only to count people once (a person with
-- a registration and a certificate in a municipality is one person); an erasure sets it to NULL.
CREATE TABLE registrations (
    registration_id    text PRIMARY KEY,
    resident_id        text,
    municipality_code  text NOT NULL,
    prefecture_code    text NOT NULL,
    tier               text NOT NULL,
    status             text NOT NULL,
    registered_on      date NOT NULL,
    ended_on           date
);
CREATE INDEX registrations_resident ON registrations (resident_id) WHERE resident_id IS NOT NULL;
CREATE INDEX registrations_area ON registrations (prefecture_code, municipality_code);

CREATE TABLE certificates (
    certificate_number  text PRIMARY KEY,
    resident_id         text,
    municipality_code   text NOT NULL,
    prefecture_code     text NOT NULL,
    status              text NOT NULL,
    valid_from          date NOT NULL,
    valid_until         date NOT NULL,
    issued_on           date
);
CREATE INDEX certificates_resident ON certificates (resident_id) WHERE resident_id IS NOT NULL;
CREATE INDEX certificates_area ON certificates (prefecture_code, municipality_code);

-- Grants carry no resident id here: the figures are per programme.
CREATE TABLE grants (
    grant_id           text PRIMARY KEY,
    program_id         text NOT NULL,
    partner            text NOT NULL,
    mechanism          text NOT NULL,
    municipality_code  text NOT NULL,
    prefecture_code    text NOT NULL,
    unit               text NOT NULL,
    status             text NOT NULL,
    issued             boolean NOT NULL DEFAULT false,
    reserved           bigint NOT NULL DEFAULT 0
);

CREATE TABLE redemptions (
    grant_id           text NOT NULL,
    trip_id            text NOT NULL,
    program_id         text NOT NULL,
    municipality_code  text NOT NULL,
    prefecture_code    text NOT NULL,
    unit               text NOT NULL,
    amount             bigint NOT NULL,
    redeemed_on        date NOT NULL,
    PRIMARY KEY (grant_id, trip_id)
);

-- Donations without the donor: municipality, kind, unit, amount and the month received.
CREATE TABLE donations (
    donation_id        text PRIMARY KEY,
    municipality_code  text NOT NULL,
    prefecture_code    text NOT NULL,
    kind               text NOT NULL,
    unit               text NOT NULL,
    amount             bigint NOT NULL,
    earmark            text NOT NULL,
    received_month     date NOT NULL,
    refunded           boolean NOT NULL DEFAULT false
);

CREATE TABLE plans (
    plan_id            text PRIMARY KEY,
    level              text NOT NULL,
    municipality_code  text NOT NULL,
    prefecture_code    text NOT NULL,
    adopted_on         date NOT NULL,
    withdrawn_on       date
);

CREATE TABLE corporations (
    corporation_id     text PRIMARY KEY,
    municipality_code  text NOT NULL,
    prefecture_code    text NOT NULL,
    designated_on      date NOT NULL,
    revoked_on         date
);
