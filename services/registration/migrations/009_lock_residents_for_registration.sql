-- Many registrations of a group-commit batch start with one round trip: what
-- lock_resident_for_registration (008) does for one resident, for a batch's residents (no one twice).
-- The rows are locked in id order, the order every multi-resident lock here takes (the premium expiry
-- job's too), so two batches cannot deadlock on each other's residents. The reads come after the lock,
-- in a statement of its own (a fresh snapshot: 008 says why), and only of the rows locked: an account
-- created meanwhile is not answered unlocked. A wanted id without a row: no active resident (absent or
-- erased).
CREATE FUNCTION lock_residents_for_registration(wanted text[])
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
    locked text[];
BEGIN
    -- LockRows runs above the sort: the rows are locked one after another in id order.
    SELECT coalesce(array_agg(s.id), '{}') INTO locked
    FROM (SELECT p.id FROM residents p WHERE p.id = ANY (wanted) AND p.status = 'active' ORDER BY p.id FOR UPDATE) s;
    RETURN QUERY SELECT
        p.id, p.name, p.name_kana, p.email, p.phone, p.date_of_birth, p.legal_address_code, p.preferred_language,
        p.created_at,
        coalesce((
            SELECT array_agg(ROW(r.id, r.resident_id, r.municipality_code, r.prefecture_code, r.tier, r.status,
                                 r.derived_from, r.registered_at, r.valid_from, r.valid_until,
                                 pr.kind)::registration_state
                             ORDER BY r.registered_at, r.id)
            FROM registrations r
            LEFT JOIN premium_reviews pr ON pr.registration_id = r.id AND pr.status = 'pending'
            WHERE r.resident_id = p.id
        ), '{}'),
        coalesce((
            SELECT array_agg(ROW(c.purpose, c.partner, c.granted, c.changed_at)::consent_state
                             ORDER BY c.purpose, c.partner)
            FROM consents c
            WHERE c.resident_id = p.id
        ), '{}')
    FROM residents p WHERE p.id = ANY (locked);
END
$$;
