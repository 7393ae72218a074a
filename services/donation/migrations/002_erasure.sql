-- Erasure (issue #17). A donor is erased when their resident withdraws or on request: name,
-- address, e-mail, the resident link and the refund reasons of their donations go at once
-- (erased_at). What a receipt must show (donor name and address) stays on the receipt, the
-- municipality's legally kept record, until its retention period ends; the retention job then
-- blanks it (receipts.purged_at) and, once no receipt of the donor keeps anything, the donor
-- (donors.purged_at). See services/donation/domain.py, "erasure and legal retention".
ALTER TABLE donors ADD COLUMN erased_at timestamptz, ADD COLUMN purged_at timestamptz;
-- An erased person's donor record has no address any more.
ALTER TABLE donors DROP CONSTRAINT donors_check;
ALTER TABLE donors ADD CONSTRAINT donors_individual_address
    CHECK (type = 'company' OR address IS NOT NULL OR erased_at IS NOT NULL);
CREATE INDEX donors_awaiting_purge ON donors (id) WHERE erased_at IS NOT NULL AND purged_at IS NULL;

ALTER TABLE receipts ADD COLUMN purged_at timestamptz;
-- A donor's receipts (erasure, retention): found without a scan of every receipt.
CREATE INDEX receipts_donor ON receipts (donor_id);
