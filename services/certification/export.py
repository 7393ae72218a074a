"""What certification holds about a resident, for their data export (``shared/kit/data_export.py``)."""

from shared.kit.data_export import ExportTables

EXPORT_TABLES: ExportTables = {
    "residents": "resident_id = $1",
    "resident_registrations": "resident_id = $1",
    "share_consents": "resident_id = $1",
    "applications": "resident_id = $1",
    "certificates": "resident_id = $1",
    # Decisions on their applications and certificates (who decided, when, what).
    "audit_trail": "target_id IN (SELECT application_id FROM applications WHERE resident_id = $1 "
    "UNION SELECT certificate_number FROM certificates WHERE resident_id = $1)",
}
