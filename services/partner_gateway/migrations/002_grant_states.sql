-- The latest event of every grant, kept whether or not its partner may see it right now, so a
-- partner that gets its entitlement back (consent given again) is sent its open grants again.
CREATE TABLE grant_states (
    partner             text  NOT NULL,
    grant_id            text  NOT NULL,
    certificate_number  text  NOT NULL,
    resident_id         text  NOT NULL,
    event_id            uuid  NOT NULL,
    event_type          text  NOT NULL,
    data                bytea NOT NULL,
    last_seq            bigserial,
    PRIMARY KEY (partner, grant_id)
);
CREATE INDEX grant_states_certificate ON grant_states (partner, certificate_number);
CREATE INDEX grant_states_resident ON grant_states (resident_id);
