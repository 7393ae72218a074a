-- The municipality's certificates in their listing order (issued_at, number): the CSV download reads
-- them page by page after the last row sent (keyset), an index range per page at any depth.
CREATE INDEX certificates_listing ON certificates (municipality_code, issued_at, certificate_number);
