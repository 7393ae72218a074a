-- Issue 17 (privacy): the gateway's erasures move to the kit's ledger (kit_erased_residents, which
-- every service keeps); the partners' key endpoint finds a resident by (partner, resident_ref); the
-- resident's own provision record (APPI Art. 33) reads the deliveries by resident_ref.

INSERT INTO kit_erased_residents (resident_id, erased_at)
SELECT resident_id, withdrawn_at FROM withdrawn_residents
ON CONFLICT (resident_id) DO NOTHING;
DROP TABLE withdrawn_residents;

CREATE INDEX entitlements_ref ON entitlements (partner, resident_ref) WHERE active;
CREATE INDEX deliveries_resident ON deliveries (resident_ref, partner, id);
