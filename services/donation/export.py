"""What donation holds about a resident (as a donor), for their data export (``shared/kit/data_export.py``)."""

from shared.kit.data_export import ExportTables

_DONOR = "donor_id IN (SELECT id FROM donors WHERE resident_id = $1)"

EXPORT_TABLES: ExportTables = {
    "donors": "resident_id = $1",
    "donations": _DONOR,
    "receipts": _DONOR,
    "one_stop_applications": _DONOR,
    "donor_years": _DONOR,
}
