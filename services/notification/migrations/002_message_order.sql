-- Messages written in one consumer batch share now() (the transaction's start), so "newest
-- first" came back in arbitrary order within a batch. The statement clock orders them as written.
ALTER TABLE messages ALTER COLUMN created_at SET DEFAULT clock_timestamp();
