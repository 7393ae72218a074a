"""What subsidy holds about a resident, for their data export (``shared/kit/data_export.py``)."""

from shared.kit.data_export import ExportTables

EXPORT_TABLES: ExportTables = {
    "certificates": "resident_id = $1",
    "grants": "resident_id = $1",
    "trips": "grant_id IN (SELECT grant_id FROM grants WHERE resident_id = $1)",
}
