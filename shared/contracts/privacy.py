"""A resident's data export (APPI Art. 33: disclosure of what is held about them), gathered through events.

Registration publishes ``ExportRequested`` on ``registration.exports.v1``; every service that holds
data about residents answers with ``ExportPartProvided`` on ``privacy.export-parts.v1``: its part,
sealed with the resident's data key (so an export in flight dies with the key, like everything
else about them). Registration gathers the parts into one archive (JSON and a PDF in Japanese).
"""

from __future__ import annotations

from datetime import datetime

from shared.contracts.base import EventData
from shared.contracts.sealed import Sealed
from shared.contracts.topics import EXPORT_PARTS, EXPORT_REQUESTS

#: The services that answer an export request (registration adds its own part itself).
EXPORT_SERVICES: tuple[str, ...] = EXPORT_PARTS.producers


class ExportRequested(EventData, name="registration.export.requested", topic=EXPORT_REQUESTS):
    export_id: str
    resident_id: str
    requested_at: datetime


class ExportPartProvided(EventData, name="privacy.export_part.provided", topic=EXPORT_PARTS):
    export_id: str
    resident_id: str
    service: str
    #: The service's part as a JSON object, sealed with the resident's data key.
    part: Sealed
    provided_at: datetime
