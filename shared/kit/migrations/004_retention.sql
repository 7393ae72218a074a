-- Retention (shared/kit/retention.py) deletes rows by age in small batches: each batch finds its
-- oldest rows through these indexes instead of scanning the whole table.
CREATE INDEX inbox_received_at ON inbox (received_at);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
-- Only published rows are ever pruned; pending ones stay out of this index.
CREATE INDEX outbox_published_at ON outbox (published_at) WHERE published_at IS NOT NULL;

-- The dead letter that parked an inbox row (its `dlq_id` header). A replay carries it back
-- (`dlq_replay`): only that replay re-runs the parked event; any other redelivery of the record is
-- acknowledged as handled. NULL: parked before dead letters had ids (any replay re-runs it).
ALTER TABLE inbox ADD COLUMN dead_letter_id uuid;
