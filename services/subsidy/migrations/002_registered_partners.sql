-- Partners registered through the partner gateway (gateway.partners.v1), beside the static seed
-- (PARTNER_CODES): programmes may be created for them.
CREATE TABLE registered_partners (
    code           text PRIMARY KEY,
    name           text NOT NULL,
    registered_at  timestamptz NOT NULL
);
