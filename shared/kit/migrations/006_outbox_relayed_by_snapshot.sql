-- The relay no longer writes each row it published (an UPDATE of published_at: the row written again,
-- with a new entry in each index, a dead version for vacuum). Which rows are relayed is now one
-- snapshot of the database's transactions, kept in one row: every outbox row whose transaction that
-- snapshot sees is on the broker. Each round reads the rows of the transactions that committed since
-- (seen by a newer snapshot, not by the relayed one), in id order, and moves the relayed snapshot on
-- once the broker acknowledged them: one row written per round, none per record (shared/kit/outbox.py).

-- The transaction that wrote the row (the top-level one, as snapshots list them).
ALTER TABLE outbox ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id();
-- Rows relayed before this migration: older than any transaction, so seen by every snapshot.
UPDATE outbox SET xid = '1' WHERE published_at IS NOT NULL;
DROP INDEX outbox_pending;
DROP INDEX outbox_published_at;
ALTER TABLE outbox DROP COLUMN published_at;
-- A round reads the transactions between two snapshots; retention walks the oldest relayed rows.
CREATE INDEX outbox_xid ON outbox (xid);

-- The relay's progress. `relayed`: every row whose transaction it sees is on the broker. A round with
-- more rows than one read takes is read in pages: `upto` is the snapshot the round reads up to, and its
-- rows with an id up to `after_id` are on the broker too.
CREATE TABLE outbox_relay (
    one       boolean     PRIMARY KEY DEFAULT true CHECK (one),
    relayed   pg_snapshot NOT NULL,
    upto      pg_snapshot,
    after_id  bigint
);
-- Sees only transaction ids below 3, the first a transaction gets: the rows marked relayed above.
INSERT INTO outbox_relay (relayed) VALUES ('3:3:');

-- Rows not yet relayed (as far as the stored progress tells: a round's rows count as pending until
-- the relay stores it, in its next statement or 50 ms after). For tests and operators.
CREATE VIEW outbox_pending AS
    SELECT o.* FROM outbox o, outbox_relay r WHERE NOT pg_visible_in_snapshot(o.xid, r.relayed);
