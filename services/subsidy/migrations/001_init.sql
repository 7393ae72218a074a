-- The subsidy service: travel programs, their budgets and ledger, grants, trips, and the
-- projections of certificates and donations it builds from other services' events.

-- Travel programs: one row per (reference program, municipality), or created by an admin.
CREATE TABLE programs (
    program_id         text        PRIMARY KEY,
    reference_program  text,
    title              text        NOT NULL,
    partner            text        NOT NULL,
    municipality_code  text        NOT NULL,
    mechanism          text        NOT NULL CHECK (mechanism IN ('mileage_grant', 'fare_discount', 'fare_voucher')),
    unit               text        NOT NULL CHECK (unit IN ('jpy', 'miles')),
    parameters         jsonb       NOT NULL,
    active_from        date        NOT NULL,
    active_until       date        NOT NULL CHECK (active_until >= active_from),
    created_by         text        NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX programs_by_municipality ON programs (municipality_code, program_id);

-- One budget per (program, unit): what is still available to reserve. Reservations, credits,
-- releases and debits lock and update this row (never below zero); draws do not touch it, they
-- move a grant's reservation to spent under the grant's own row lock, so redemptions of one
-- program never queue on one hot row.
CREATE TABLE budgets (
    program_id  text        NOT NULL REFERENCES programs (program_id),
    unit        text        NOT NULL CHECK (unit IN ('jpy', 'miles')),
    available   bigint      NOT NULL DEFAULT 0 CHECK (available >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (program_id, unit)
);

-- Every movement of a budget is one row, written in the same statement as the change it records.
-- The kind fixes the deltas: available is the budget row, reserved is what open grants still
-- hold (sum of grants.remaining), spent is what grants drew (sum of grants.drawn).
CREATE TABLE budget_ledger (
    entry_id         bigserial   PRIMARY KEY,
    program_id       text        NOT NULL REFERENCES programs (program_id),
    unit             text        NOT NULL,
    kind             text        NOT NULL,
    amount           bigint      NOT NULL CHECK (amount > 0),
    available_delta  bigint      NOT NULL,
    reserved_delta   bigint      NOT NULL,
    spent_delta      bigint      NOT NULL,
    grant_id         text,
    trip_id          text,
    donation_id      text,
    reason           text        NOT NULL DEFAULT '',
    actor            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (
        (kind IN ('opening', 'top_up', 'donation')
            AND available_delta = amount AND reserved_delta = 0 AND spent_delta = 0)
        OR (kind = 'debit' AND available_delta = -amount AND reserved_delta = 0 AND spent_delta = 0)
        OR (kind = 'reserve' AND available_delta = -amount AND reserved_delta = amount AND spent_delta = 0)
        OR (kind = 'draw' AND available_delta = 0 AND reserved_delta = -amount AND spent_delta = amount)
        OR (kind = 'release' AND available_delta = amount AND reserved_delta = -amount AND spent_delta = 0)
    )
);
CREATE INDEX budget_ledger_by_program ON budget_ledger (program_id, unit, entry_id);
CREATE INDEX budget_ledger_by_grant ON budget_ledger (grant_id) WHERE grant_id IS NOT NULL;

-- What this service knows of certificates (from certification.certificates.v1).
CREATE TABLE certificates (
    certificate_number  text        PRIMARY KEY,
    resident_id         text        NOT NULL,
    municipality_code   text        NOT NULL,
    valid_from          date        NOT NULL,
    valid_until         date        NOT NULL,
    status              text        NOT NULL CHECK (status IN ('valid', 'revoked', 'expired')),
    partners            jsonb       NOT NULL DEFAULT '[]',
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE SEQUENCE waitlist_arrival;

-- One grant per certificate, program and certificate year (the validity period, by its start).
-- value = drawn + released + remaining once issued; a grant that never left the waitlist has 0s.
CREATE TABLE grants (
    grant_id            text        PRIMARY KEY,
    program_id          text        NOT NULL REFERENCES programs (program_id),
    certificate_number  text        NOT NULL,
    period_from         date        NOT NULL,
    resident_id         text        NOT NULL,
    municipality_code   text        NOT NULL,
    partner             text        NOT NULL,
    mechanism           text        NOT NULL,
    unit                text        NOT NULL,
    member_number       text,
    status              text        NOT NULL
        CHECK (status IN ('waitlisted', 'issued', 'completed', 'cancelled', 'expired')),
    value               bigint      NOT NULL CHECK (value > 0),
    remaining           bigint      NOT NULL DEFAULT 0 CHECK (remaining >= 0),
    drawn               bigint      NOT NULL DEFAULT 0 CHECK (drawn >= 0),
    released            bigint      NOT NULL DEFAULT 0 CHECK (released >= 0),
    legs_counted        integer     NOT NULL DEFAULT 0 CHECK (legs_counted >= 0),
    window_from         date        NOT NULL,
    window_until        date        NOT NULL,
    waitlist_seq        bigint,
    waitlisted_at       timestamptz,
    issued_at           timestamptz,
    closed_at           timestamptz,
    close_reason        text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (certificate_number, program_id, period_from),
    CHECK (drawn + released + remaining IN (0, value))
);
CREATE INDEX grants_waitlist ON grants (program_id, waitlist_seq) WHERE status = 'waitlisted';
CREATE INDEX grants_by_certificate ON grants (certificate_number);
CREATE INDEX grants_by_resident ON grants (resident_id, created_at);
CREATE INDEX grants_by_program ON grants (program_id, created_at);
CREATE INDEX grants_open_by_window ON grants (window_until) WHERE status IN ('issued', 'waitlisted');

-- Every trip a partner reported, with its outcome; (partner, trip id) is the deduplication key.
CREATE TABLE trips (
    partner             text        NOT NULL,
    trip_id             text        NOT NULL,
    grant_id            text        NOT NULL,
    program_id          text,
    municipality_code   text,
    certificate_number  text        NOT NULL,
    trip_kind           text        NOT NULL CHECK (trip_kind IN ('one_way', 'round_trip')),
    travelled_on        date        NOT NULL,
    discount_jpy        bigint,
    reported_at         timestamptz NOT NULL,
    channel             text        NOT NULL CHECK (channel IN ('kafka', 'http')),
    accepted            boolean     NOT NULL,
    reason              text,
    detail              text        NOT NULL DEFAULT '',
    unit                text,
    amount              bigint      NOT NULL DEFAULT 0 CHECK (amount >= 0),
    trips_counted       integer     NOT NULL DEFAULT 0,
    completed           boolean     NOT NULL DEFAULT false,
    recorded_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (partner, trip_id)
);
CREATE INDEX trips_by_municipality ON trips (municipality_code, recorded_at);
CREATE INDEX trips_by_grant ON trips (grant_id);

-- Donations credited (or not) to a program budget; the donation id makes crediting idempotent.
CREATE TABLE donation_credits (
    donation_id        text        PRIMARY KEY,
    municipality_code  text        NOT NULL,
    program_id         text,
    unit               text        NOT NULL,
    amount             bigint      NOT NULL,
    credited           bigint      NOT NULL DEFAULT 0 CHECK (credited >= 0),
    remainder          bigint      NOT NULL DEFAULT 0 CHECK (remainder >= 0),
    refunded           bigint      NOT NULL DEFAULT 0 CHECK (refunded >= 0),
    status             text        NOT NULL CHECK (status IN ('credited', 'unallocated', 'refunded')),
    note               text        NOT NULL DEFAULT '',
    received_at        timestamptz NOT NULL,
    recorded_at        timestamptz NOT NULL DEFAULT now()
);
