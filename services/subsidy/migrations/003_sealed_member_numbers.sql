-- Crypto-shredding (issue #17): member numbers are kept as the certificate carried them, sealed with
-- the resident's data key (a `Sealed` JSON object), never in clear; shredding the key makes every copy
-- unreadable and a withdrawal nulls them. Numbers stored in clear before this cannot be sealed in SQL:
-- they are dropped (the partners received them with the grant already; a grant still waitlisted is
-- issued without one, and the partner asks the resident at the counter).
ALTER TABLE grants ALTER COLUMN member_number TYPE jsonb USING NULL;
UPDATE certificates
SET partners = COALESCE(
        (SELECT jsonb_agg(jsonb_build_object('partner', p->>'partner', 'member_number', NULL))
         FROM jsonb_array_elements(partners) AS p),
        '[]'::jsonb)
WHERE partners @? '$[*].member_number ? (@ != null)';
