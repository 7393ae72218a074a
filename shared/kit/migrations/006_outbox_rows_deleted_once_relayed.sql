-- The relay deletes a row once the broker has acknowledged it (shared/kit/outbox.py): nothing reads
-- a row after that. Marking it published instead wrote the row a second time, with a new entry in
-- every index, and retention deleted it an hour later.
-- A relay of the version before (it reads and marks by published_at) fails against this table until
-- it is replaced, publishing nothing; a relay of this version takes the lead meanwhile.
DELETE FROM outbox WHERE published_at IS NOT NULL;
DROP INDEX outbox_published_at;
DROP INDEX outbox_pending;
ALTER TABLE outbox DROP COLUMN published_at;
