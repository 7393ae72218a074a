-- Partners as data (issue 16): partners registered through the admin API beside the seed, with
-- their member-number format and how they read their feed; and the per-partner feed log that the
-- HTTP feed (`GET /v1/feed`) serves.

ALTER TABLE partners DROP CONSTRAINT partners_kind_check;
ALTER TABLE partners ADD CONSTRAINT partners_kind_check CHECK (kind IN ('airline', 'rail', 'ferry', 'bus'));
-- 'seed': from the travel programs reference data at every start; 'registered': by an admin.
ALTER TABLE partners ADD COLUMN source text NOT NULL DEFAULT 'seed' CHECK (source IN ('seed', 'registered'));
ALTER TABLE partners ADD COLUMN member_number_format text;
ALTER TABLE partners ADD COLUMN feed_transport text NOT NULL DEFAULT 'kafka'
    CHECK (feed_transport IN ('kafka', 'http'));
ALTER TABLE partners ADD COLUMN registered_by text;

-- Every record put on a partner's feed, written with its outbox row (same transaction). `id`
-- follows insertion; `position` is the cursor, given in commit order by the reader's sequencer
-- (feed.py): a transaction that commits late gets a later position, so a cursor never skips a row.
CREATE TABLE partner_feed_log (
    id            bigserial PRIMARY KEY,
    partner       text NOT NULL,
    key           text NOT NULL,
    value         bytea,               -- the Kafka record's value; NULL: a tombstone
    event_type    text,                -- ce_type (NULL for a tombstone)
    event_id      uuid NOT NULL,       -- ce_id
    subject       text NOT NULL,       -- ce_subject (the certificate number)
    event_time    timestamptz NOT NULL,  -- ce_time
    position      bigint UNIQUE,
    sequenced_at  timestamptz
);
CREATE INDEX partner_feed_log_unsequenced ON partner_feed_log (id) WHERE position IS NULL;
CREATE INDEX partner_feed_log_read ON partner_feed_log (partner, position) WHERE position IS NOT NULL;
CREATE INDEX partner_feed_log_key ON partner_feed_log (partner, key, position);
