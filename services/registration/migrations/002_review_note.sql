-- A rejection's reason is a code of the published list (docs/contracts/reasons.md); the staff's own
-- words on the decision are kept here, in this service only, and blanked on erasure like the reason.
ALTER TABLE premium_reviews ADD COLUMN note text;
