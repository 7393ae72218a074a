-- Premium identity arrives as an identity-verification provider's signed attestation (a JWS): the
-- provider (its iss) and the attestation's id (its jti) are recorded with the verification, and the
-- unique index makes each attestation usable once, decided in the request's own transaction.
-- Rows from before have neither: a result the app stated itself, not verified by this service.
ALTER TABLE identity_verifications ADD COLUMN provider text;
ALTER TABLE identity_verifications ADD COLUMN attestation_id text;
ALTER TABLE identity_verifications
    ADD CONSTRAINT identity_verifications_attested CHECK ((provider IS NULL) = (attestation_id IS NULL));
CREATE UNIQUE INDEX identity_verifications_attestation_once ON identity_verifications (provider, attestation_id);
