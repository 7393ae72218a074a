-- Records that must share a partition with another key (e.g. a grant with its certificate on a
-- compacted partner feed) name that key here; the relay places them by it. NULL: by `key`.
ALTER TABLE outbox ADD COLUMN partition_key bytea;
