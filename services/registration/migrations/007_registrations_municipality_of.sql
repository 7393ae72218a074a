-- The premium requests awaiting review, counted: the few pending reviews each look up their
-- registration's municipality in this index alone (an index-only nested loop), where the count
-- otherwise hash-joined every registration of the municipality (100,000 rows for one pending 1,000).
CREATE INDEX registrations_municipality_of ON registrations (id) INCLUDE (municipality_code);
