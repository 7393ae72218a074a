-- Partners registered through the partner gateway (gateway.partners.v1), beside the static seed
-- (PARTNER_CODES): applications may name them, with member numbers of their registered format.
CREATE TABLE registered_partners (
    code                  text PRIMARY KEY,
    member_number_format  text NOT NULL,
    registered_at         timestamptz NOT NULL
);
