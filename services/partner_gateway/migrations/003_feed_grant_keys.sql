-- The grant keys (`<certificate number>/grants/<grant id>`) whose latest record on a partner's
-- feed is a grant, not a tombstone. When the partner must forget the certificate (consent
-- revoked, resident withdrawn), each gets a tombstone and its row goes, so a compacted feed
-- forgets the grants too. Pseudonymous, like the entitlements: no resident id.
-- Grants sent before this table existed were keyed by the certificate number, which the
-- certificate's tombstone already forgets: nothing to fill in.
CREATE TABLE feed_grant_keys (
    partner             text NOT NULL,
    certificate_number  text NOT NULL,
    grant_id            text NOT NULL,
    seq                 bigserial,
    PRIMARY KEY (partner, certificate_number, grant_id)
);
