-- Each municipality's catalogue of designated activities (自治体が指定する担い手活動): premium requests
-- pick from it. Retired entries stay (picks refer to them); `sample` marks the demo towns' seeded
-- sample data until staff change an entry.
CREATE TABLE designated_activities (
    id                 text PRIMARY KEY,          -- <municipality code>-<code>
    municipality_code  text        NOT NULL,
    code               text        NOT NULL,
    name_ja            text        NOT NULL,
    name_en            text        NOT NULL,
    kind               text        NOT NULL CHECK (kind IN ('festival', 'farming', 'environment',
                                                            'disaster_prevention', 'community_event',
                                                            'education', 'other')),
    season             text,
    evidence_required  boolean     NOT NULL,
    status             text        NOT NULL CHECK (status IN ('published', 'retired')),
    sample             boolean     NOT NULL DEFAULT false,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    retired_at         timestamptz,
    UNIQUE (municipality_code, code),
    CHECK ((status = 'retired') = (retired_at IS NOT NULL))
);

-- A pick names a catalogue entry; rows from before hold the free-text name instead. Both are the
-- resident's data: blanked on erasure (the date stays).
ALTER TABLE premium_activities ADD COLUMN activity_id text REFERENCES designated_activities (id);
