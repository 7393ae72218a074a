-- The kit's own tables, present in every service database.

-- Transactional outbox: written in the business transaction, relayed to Kafka in id order.
CREATE TABLE outbox (
    id             bigserial PRIMARY KEY,
    event_id       uuid        NOT NULL UNIQUE,
    topic          text        NOT NULL,
    key            bytea,
    header_names   text[]      NOT NULL,
    header_values  bytea[]     NOT NULL,
    payload        bytea,  -- NULL is a tombstone (compacted partner feeds)
    created_at     timestamptz NOT NULL DEFAULT now(),
    published_at   timestamptz
);
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at IS NULL;

-- Inbox: one row per (consumer, event) handled; 'parked' rows went to the DLQ and may be replayed.
CREATE TABLE inbox (
    consumer     text        NOT NULL,
    event_id     uuid        NOT NULL,
    topic        text        NOT NULL,
    status       text        NOT NULL CHECK (status IN ('done', 'parked')),
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- Idempotency-Key: a repeated POST returns the first result instead of acting twice.
CREATE TABLE idempotency_keys (
    scope         text        NOT NULL,
    key           text        NOT NULL,
    request_hash  text        NOT NULL,
    status_code   integer     NOT NULL,
    body          jsonb       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);
