"""What listings holds about a resident, for their data export (``shared/kit/data_export.py``)."""

from shared.kit.data_export import ExportTables

EXPORT_TABLES: ExportTables = {
    "interests": "resident_id = $1",
    "matches": "resident_id = $1",
    "listing_interests": "resident_id = $1",
    # The record of their contact given to listings' owners (also GET /v1/residents/{id}/listing-deliveries).
    "contact_deliveries": "resident_id = $1",
    "resident_registrations": "resident_id = $1",
    "resident_certificates": "resident_id = $1",
}
