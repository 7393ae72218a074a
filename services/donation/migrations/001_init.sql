-- Donation service: donors, donations, receipts, one-stop applications, fund ledger.

-- A donor: a person (individual) or a company. donor_key is the natural identity the payment
-- notifications are matched on (resident id, corporate number, or normalised name + address).
CREATE TABLE donors (
    id                uuid        PRIMARY KEY,
    donor_key         text        NOT NULL UNIQUE,
    type              text        NOT NULL CHECK (type IN ('individual', 'company')),
    name              text        NOT NULL,
    address           text,
    resident_id       text,
    email             text,
    head_office_code  text,
    corporate_number  text,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    CHECK (type = 'company' OR address IS NOT NULL),
    CHECK (type = 'individual' OR head_office_code IS NOT NULL)
);
CREATE INDEX donors_resident ON donors (resident_id) WHERE resident_id IS NOT NULL;

-- A confirmed payment. seq is the order donations were recorded in: it is drawn after the
-- receipt counter's row lock, so within one municipality and year it follows the receipt numbers.
CREATE TABLE donations (
    id                  uuid        PRIMARY KEY,
    seq                 bigserial   NOT NULL,
    payment_reference   text        NOT NULL UNIQUE,
    request_hash        text        NOT NULL,
    municipality_code   text        NOT NULL,
    donor_id            uuid        NOT NULL REFERENCES donors (id),
    kind                text        NOT NULL CHECK (kind IN ('hometown_tax', 'corporate', 'miles')),
    unit                text        NOT NULL CHECK (unit IN ('jpy', 'miles')),
    amount              bigint      NOT NULL CHECK (amount > 0),
    earmark             text        NOT NULL CHECK (earmark IN ('dual_residence', 'general')),
    program_id          text,
    project             text,
    payment_date        date        NOT NULL,
    calendar_year       integer     NOT NULL,
    one_stop_requested  boolean     NOT NULL,
    received_at         timestamptz NOT NULL,
    refunded_at         timestamptz,
    refund_reason       text,
    CHECK ((kind = 'miles') = (unit = 'miles')),
    CHECK (kind <> 'corporate' OR amount >= 100000)
);
CREATE INDEX donations_municipality_year ON donations (municipality_code, calendar_year, seq);
CREATE INDEX donations_donor_year ON donations (donor_id, calendar_year, seq);

-- The last receipt number handed out per municipality and calendar year. It is incremented in
-- the donation's own transaction (the row lock serialises one municipality-year), so a rollback
-- gives the number back and the sequence stays gapless.
CREATE TABLE receipt_counters (
    municipality_code  text    NOT NULL,
    calendar_year      integer NOT NULL,
    last_number        bigint  NOT NULL CHECK (last_number > 0),
    PRIMARY KEY (municipality_code, calendar_year)
);

-- 寄附金受領証明書: what the receipt shows, frozen when it was issued.
CREATE TABLE receipts (
    number             text        PRIMARY KEY,
    municipality_code  text        NOT NULL,
    calendar_year      integer     NOT NULL,
    sequence           bigint      NOT NULL,
    donation_id        uuid        NOT NULL UNIQUE REFERENCES donations (id),
    donor_id           uuid        NOT NULL REFERENCES donors (id),
    donor_name         text        NOT NULL,
    donor_address      text        NOT NULL,
    amount_jpy         bigint      NOT NULL CHECK (amount_jpy > 0),
    donation_date      date        NOT NULL,
    issued_at          timestamptz NOT NULL,
    status             text        NOT NULL DEFAULT 'issued' CHECK (status IN ('issued', 'cancelled')),
    cancelled_at       timestamptz,
    reissue_count      integer     NOT NULL DEFAULT 0,
    last_reissued_at   timestamptz,
    UNIQUE (municipality_code, calendar_year, sequence)
);

-- Fund ledger: every movement of a municipality's fund (earmark, unit) is a row; the balance is
-- the sum of the rows, never a mutable total.
CREATE TABLE fund_ledger (
    id                 bigserial   PRIMARY KEY,
    municipality_code  text        NOT NULL,
    earmark            text        NOT NULL CHECK (earmark IN ('dual_residence', 'general')),
    unit               text        NOT NULL CHECK (unit IN ('jpy', 'miles')),
    entry              text        NOT NULL CHECK (entry IN ('donation', 'refund', 'transfer', 'transfer_reversal')),
    amount             bigint      NOT NULL,
    donation_id        uuid        REFERENCES donations (id),
    program_id         text,
    recorded_at        timestamptz NOT NULL,
    CHECK ((entry IN ('donation', 'transfer_reversal')) = (amount > 0)),
    CHECK (amount <> 0)
);
CREATE INDEX fund_ledger_fund ON fund_ledger (municipality_code, earmark, unit, id);
CREATE INDEX fund_ledger_donation ON fund_ledger (donation_id);

-- One-stop exception (ワンストップ特例) per donor and calendar year.
CREATE TABLE donor_years (
    donor_id            uuid        NOT NULL REFERENCES donors (id),
    calendar_year       integer     NOT NULL,
    one_stop_requested  boolean     NOT NULL DEFAULT false,
    voided_at           timestamptz,
    void_announced_at   timestamptz,
    PRIMARY KEY (donor_id, calendar_year)
);

-- The distinct municipalities a donor gave hometown-tax donations to in a year (refunds count down).
CREATE TABLE donor_year_municipalities (
    donor_id           uuid        NOT NULL,
    calendar_year      integer     NOT NULL,
    municipality_code  text        NOT NULL,
    donations          integer     NOT NULL CHECK (donations > 0),
    first_donation_at  timestamptz NOT NULL,
    PRIMARY KEY (donor_id, calendar_year, municipality_code),
    FOREIGN KEY (donor_id, calendar_year) REFERENCES donor_years (donor_id, calendar_year)
);

-- One application per donation. Only the fact of receipt and verification is kept, never the
-- My Number or the documents themselves.
CREATE TABLE one_stop_applications (
    id                 uuid        PRIMARY KEY,
    donation_id        uuid        NOT NULL UNIQUE REFERENCES donations (id),
    donor_id           uuid        NOT NULL REFERENCES donors (id),
    calendar_year      integer     NOT NULL,
    municipality_code  text        NOT NULL,
    received_on        date        NOT NULL,
    recorded_at        timestamptz NOT NULL,
    verified           boolean     NOT NULL DEFAULT false,
    verified_at        timestamptz,
    status             text        NOT NULL CHECK (status IN ('valid', 'void', 'late')),
    voided_at          timestamptz
);
CREATE INDEX one_stop_applications_donor_year ON one_stop_applications (donor_id, calendar_year);
