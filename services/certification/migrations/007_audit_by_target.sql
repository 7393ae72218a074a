-- An application's page shows its audit trail (the application and its certificate): read by target,
-- however old, instead of picking it out of the municipality's latest entries.
CREATE INDEX audit_trail_by_target ON audit_trail (target_id, id);
