-- Residents erased platform-wide (ResidentWithdrawn), as each service learnt of it: a random id and
-- a time, nothing personal. Consumers drop any later event about them (a late event, a dead letter
-- replayed, a group reset to earliest), so nothing about an erased person is written again.
CREATE TABLE kit_erased_residents (
    resident_id  text PRIMARY KEY,
    erased_at    timestamptz NOT NULL
);
