-- Staff notes leave the append-only audit trail for a table of their own (issue #17): a note is
-- free text typed at a counter and may name the resident's illness or family, so it is erased when
-- the resident withdraws; the audit entry stays (who decided what, when, and the reason code).
CREATE TABLE audit_notes (
    audit_id  bigint PRIMARY KEY,  -- audit_trail.id (no foreign key: TRUNCATE must meet the trigger, not a key)
    note      text   NOT NULL
);

INSERT INTO audit_notes (audit_id, note)
SELECT id, details->>'note' FROM audit_trail WHERE details ? 'note' AND details->>'note' IS NOT NULL;

-- The one change ever made to audit entries: their notes moved out, once, by this migration.
ALTER TABLE audit_trail DISABLE TRIGGER audit_trail_no_update_or_delete;
UPDATE audit_trail SET details = details - 'note' WHERE details ? 'note';
ALTER TABLE audit_trail ENABLE TRIGGER audit_trail_no_update_or_delete;
