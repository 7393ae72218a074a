-- The expiring list (the console's "certificates expiring in 30 days"): the municipality's valid
-- certificates by the day their validity ends, an index range instead of reading them all.
CREATE INDEX certificates_expiring ON certificates (municipality_code, valid_until, certificate_number)
    WHERE status = 'valid';
