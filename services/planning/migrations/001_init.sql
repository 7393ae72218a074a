-- Planning: plans and their versions, support corporations, supervision reports, proposals, councils.
-- Nothing here is about a resident as such; member names, report and proposal texts, agendas and
-- minutes are staff's words and never leave this database.

CREATE TABLE plans (
    plan_id                text        PRIMARY KEY,
    level                  text        NOT NULL CHECK (level IN ('prefecture', 'municipality')),
    municipality_code      text        NOT NULL CHECK (municipality_code ~ '^[0-9]{6}$'),
    prefecture_code        text        NOT NULL CHECK (prefecture_code ~ '^[0-9]{6}$'),
    name                   text        NOT NULL,
    status                 text        NOT NULL
        CHECK (status IN ('draft', 'consultation', 'adopted', 'amended', 'withdrawn')),
    covers_dual_residence  boolean     NOT NULL,
    source                 text        NOT NULL CHECK (source IN ('reference', 'staff')),
    adopted_on             date,
    withdrawn_on           date,
    withdrawal_reason      text,
    updated_at             timestamptz NOT NULL DEFAULT now()
);
-- One live (not withdrawn) plan per body and level.
CREATE UNIQUE INDEX plans_live_per_body ON plans (municipality_code, level) WHERE status <> 'withdrawn';
CREATE INDEX plans_by_prefecture ON plans (prefecture_code, level);

CREATE TABLE plan_versions (
    plan_id                  text    NOT NULL REFERENCES plans ON DELETE CASCADE,
    version                  integer NOT NULL CHECK (version >= 1),
    content                  jsonb   NOT NULL,
    status                   text    NOT NULL
        CHECK (status IN ('draft', 'consultation', 'in_force', 'superseded', 'withdrawn')),
    consultation_meeting_id  text,
    consulted_on             date,
    in_force_from            date,
    PRIMARY KEY (plan_id, version)
);

CREATE TABLE corporations (
    corporation_id     text        PRIMARY KEY,
    municipality_code  text        NOT NULL CHECK (municipality_code ~ '^[0-9]{6}$'),
    name               text        NOT NULL,
    services           text[]      NOT NULL DEFAULT '{}',
    status             text        NOT NULL CHECK (status IN ('applied', 'designated', 'revoked')),
    applied_on         date        NOT NULL,
    source             text        NOT NULL CHECK (source IN ('reference', 'staff')),
    designated_on      date,
    revoked_on         date,
    revocation_reason  text,
    revocation_note    text,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX corporations_by_municipality ON corporations (municipality_code, status);

CREATE TABLE supervision_reports (
    report_id       text PRIMARY KEY,
    corporation_id  text NOT NULL REFERENCES corporations,
    period_from     date NOT NULL,
    period_until    date NOT NULL,
    received_on     date NOT NULL,
    summary         text NOT NULL
);
CREATE INDEX supervision_reports_by_corporation ON supervision_reports (corporation_id, received_on);

CREATE TABLE proposals (
    proposal_id        text PRIMARY KEY,
    corporation_id     text NOT NULL REFERENCES corporations,
    municipality_code  text NOT NULL,
    kind               text NOT NULL CHECK (kind IN ('make', 'change')),
    plan_id            text REFERENCES plans,
    summary            text NOT NULL,
    proposed_on        date NOT NULL,
    due_on             date NOT NULL,
    status             text NOT NULL CHECK (status IN ('open', 'accepted', 'declined')),
    answered_on        date,
    answer_reason      text,
    answer_note        text
);
CREATE INDEX proposals_by_municipality ON proposals (municipality_code, status, due_on);

CREATE TABLE councils (
    council_id         text PRIMARY KEY,
    municipality_code  text NOT NULL UNIQUE CHECK (municipality_code ~ '^[0-9]{6}$'),
    name               text NOT NULL,
    formed_on          date NOT NULL
);

CREATE TABLE council_members (
    member_id   text PRIMARY KEY,
    council_id  text NOT NULL REFERENCES councils ON DELETE CASCADE,
    position    integer NOT NULL,
    kind        text NOT NULL,
    name        text NOT NULL,
    joined_on   date NOT NULL
);
CREATE INDEX council_members_by_council ON council_members (council_id, position);

CREATE TABLE council_meetings (
    meeting_id       text PRIMARY KEY,
    council_id       text NOT NULL REFERENCES councils,
    held_on          date NOT NULL,
    agenda           text NOT NULL,
    minutes_summary  text NOT NULL,
    plan_id          text REFERENCES plans
);
CREATE INDEX council_meetings_by_council ON council_meetings (council_id, held_on);
