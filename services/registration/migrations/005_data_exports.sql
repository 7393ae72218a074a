-- A resident's data exports: requested here, each service's part gathered from
-- privacy.export-parts.v1. Deleted with the resident's other data on erasure.
CREATE TABLE data_exports (
    export_id     text        PRIMARY KEY,
    resident_id   text        NOT NULL,
    requested_at  timestamptz NOT NULL,
    ready_at      timestamptz
);
CREATE INDEX data_exports_by_resident ON data_exports (resident_id, requested_at DESC);

CREATE TABLE data_export_parts (
    export_id    text        NOT NULL REFERENCES data_exports ON DELETE CASCADE,
    service      text        NOT NULL,
    part         jsonb       NOT NULL,
    provided_at  timestamptz NOT NULL,
    PRIMARY KEY (export_id, service)
);
