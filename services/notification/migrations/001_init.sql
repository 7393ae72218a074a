-- Notification: the contact projection, the in-app inbox and the e-mail delivery queue/log.

-- What the service knows to reach a resident, built from registration.residents.v1.
-- A withdrawn resident keeps only this tombstone (no name, no address), so later events
-- about them are recognised and dropped instead of starting a new inbox.
CREATE TABLE residents (
    resident_id          text        PRIMARY KEY,
    name                 text,
    email                text,
    preferred_language   text        NOT NULL DEFAULT 'ja' CHECK (preferred_language IN ('ja', 'en')),
    email_consent        boolean     NOT NULL DEFAULT false,
    email_consent_at     timestamptz,
    -- The address a mail server refused permanently (5xx); cleared when the address changes.
    bounced_email        text,
    bounce_reason        text,
    withdrawn_at         timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- The in-app inbox: one message per (source event, resident).
CREATE TABLE messages (
    id                 uuid        PRIMARY KEY,
    resident_id        text        NOT NULL,
    kind               text        NOT NULL,
    language           text        NOT NULL CHECK (language IN ('ja', 'en')),
    subject            text        NOT NULL,
    body               text        NOT NULL,
    source_event_id    uuid        NOT NULL,
    source_event_type  text        NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    read_at            timestamptz,
    UNIQUE (source_event_id, resident_id)
);
CREATE INDEX messages_by_resident ON messages (resident_id, created_at DESC, id DESC);
CREATE INDEX messages_unread ON messages (resident_id) WHERE read_at IS NULL;

-- E-mails to send and what became of them. Written in the consumer's transaction, sent by a
-- background sender that claims due rows with FOR UPDATE SKIP LOCKED.
--   pending   → due at next_attempt_at
--   sending   → claimed; next_attempt_at is the lease end (a crashed sender's row comes back then)
--   sent      → accepted by the SMTP server
--   failed    → permanently refused (5xx) or gave up after max attempts; never retried
--   cancelled → consent revoked or address gone before it could be sent
CREATE TABLE email_outbox (
    id                 uuid        PRIMARY KEY,
    resident_id        text        NOT NULL,
    channel            text        NOT NULL DEFAULT 'email' CHECK (channel = 'email'),
    kind               text        NOT NULL,
    language           text        NOT NULL CHECK (language IN ('ja', 'en')),
    subject            text        NOT NULL,
    body               text        NOT NULL,
    source_event_id    uuid        NOT NULL,
    source_event_type  text        NOT NULL,
    status             text        NOT NULL DEFAULT 'pending'
                                   CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'cancelled')),
    attempts           integer     NOT NULL DEFAULT 0,
    next_attempt_at    timestamptz NOT NULL DEFAULT now(),
    last_attempt_at    timestamptz,
    last_error         text,
    recipient          text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz,
    UNIQUE (source_event_id, channel, resident_id)
);
CREATE INDEX email_outbox_due ON email_outbox (next_attempt_at) WHERE status IN ('pending', 'sending');
CREATE INDEX email_outbox_by_resident ON email_outbox (resident_id, created_at DESC);
