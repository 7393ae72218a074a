"""What notification holds about a resident, for their data export (``shared/kit/data_export.py``)."""

from shared.kit.data_export import ExportTables

EXPORT_TABLES: ExportTables = {
    "residents": "resident_id = $1",
    "messages": "resident_id = $1",
    "email_outbox": "resident_id = $1",
}
