"""What the partner gateway holds about a resident, for their data export (``shared/kit/data_export.py``).

The record of every delivery to partners (APPI Art. 29) is kept per partner under the partner's
pseudonym of the resident, so it is found through the certificates the resident had."""

from shared.kit.data_export import ExportTables

EXPORT_TABLES: ExportTables = {
    "share_consents": "resident_id = $1",
    "certificates": "resident_id = $1",
    "entitlements": "resident_id = $1",
    "grant_states": "resident_id = $1",
    "deliveries": "certificate_number IN (SELECT certificate_number FROM certificates WHERE resident_id = $1)",
}
