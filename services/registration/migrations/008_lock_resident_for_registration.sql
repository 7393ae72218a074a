-- A registration starts with one round trip instead of three: the resident's row locked, then their
-- registrations (with any pending review) and consents. PL/pgSQL because the reads must come after
-- the lock in statements of their own: a VOLATILE function's statements each take a fresh snapshot
-- (READ COMMITTED), so they see what the request that held the lock before committed. One plain SQL
-- statement would read from a snapshot taken before it waited for the lock, and miss a registration
-- committed meanwhile (the duplicate and premium-limit rules rely on seeing it).
CREATE TYPE registration_state AS (
    id                 text,
    resident_id        text,
    municipality_code  text,
    prefecture_code    text,
    tier               text,
    status             text,
    derived_from       text,
    registered_at      timestamptz,
    valid_from         date,
    valid_until        date,
    pending_review     text
);

CREATE TYPE consent_state AS (
    purpose     text,
    partner     text,
    granted     boolean,
    changed_at  timestamptz
);

-- No row: no active resident of that id (absent or erased).
CREATE FUNCTION lock_resident_for_registration(wanted text)
    RETURNS TABLE (
        id                  text,
        name                text,
        name_kana           text,
        email               text,
        phone               text,
        date_of_birth       date,
        legal_address_code  text,
        preferred_language  text,
        created_at          timestamptz,
        registrations       registration_state[],
        consents            consent_state[]
    )
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    locked residents;
BEGIN
    SELECT * INTO locked FROM residents p WHERE p.id = wanted AND p.status = 'active' FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY SELECT
        locked.id, locked.name, locked.name_kana, locked.email, locked.phone, locked.date_of_birth,
        locked.legal_address_code, locked.preferred_language, locked.created_at,
        coalesce((
            SELECT array_agg(ROW(r.id, r.resident_id, r.municipality_code, r.prefecture_code, r.tier, r.status,
                                 r.derived_from, r.registered_at, r.valid_from, r.valid_until,
                                 pr.kind)::registration_state
                             ORDER BY r.registered_at, r.id)
            FROM registrations r
            LEFT JOIN premium_reviews pr ON pr.registration_id = r.id AND pr.status = 'pending'
            WHERE r.resident_id = wanted
        ), '{}'),
        coalesce((
            SELECT array_agg(ROW(c.purpose, c.partner, c.granted, c.changed_at)::consent_state
                             ORDER BY c.purpose, c.partner)
            FROM consents c
            WHERE c.resident_id = wanted
        ), '{}');
END
$$;
