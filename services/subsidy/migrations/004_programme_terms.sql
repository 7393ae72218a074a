-- Programme terms as the partners publish them (issue #19, rule 5).
--   fare_products: the partner's fixed fares for participants ([{"route", "fare_jpy"}], one way);
--   participant_cap: how many residents the program takes at once (a grant issued or used up holds a place);
--   one_region_per_year: a resident gets the program in one participating municipality per certificate year.
ALTER TABLE programs
    ADD COLUMN fare_products        jsonb   NOT NULL DEFAULT '[]',
    ADD COLUMN participant_cap      integer CHECK (participant_cap IS NULL OR participant_cap > 0),
    ADD COLUMN one_region_per_year  boolean NOT NULL DEFAULT false;

-- Programs seeded before this keep their ids, budgets and grants; their terms become the published ones.
-- JAL: one region per resident and certificate year.
UPDATE programs SET one_region_per_year = true WHERE reference_program = 'jal-dual-residence-miles';
-- ANA: fixed fares for a limited number of participants, not a percentage (the cap is illustrative, as
-- the seed's; the fares are those published for 高知県 (39) and 佐賀県 (41); 鳥取県's are not in our sources).
UPDATE programs
SET parameters = parameters - 'discount_percent',
    participant_cap = 100,
    fare_products = CASE left(municipality_code, 2)
        WHEN '39' THEN '[{"route": "羽田–高知", "fare_jpy": 11000}]'::jsonb
        WHEN '41' THEN '[{"route": "羽田–佐賀", "fare_jpy": 14000}]'::jsonb
        ELSE '[]'::jsonb END
WHERE reference_program = 'ana-dual-residence-fare';

-- The one-region rule and the participant cap read a resident's grants under one scheme, and a program's
-- participants.
CREATE INDEX grants_by_resident_program ON grants (resident_id, program_id);
CREATE INDEX grants_participants ON grants (program_id, resident_id) WHERE status IN ('issued', 'completed');
