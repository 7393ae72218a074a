"""Events of the certification service.

``certification.applications.v1`` (key: application id) and ``certification.certificates.v1``
(key: certificate number). A certificate (二地域居住者の証明) is issued by a municipality with an
adopted 特定居住促進計画 (specific residence promotion plan).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from pydantic import Field

from shared.contracts.base import EventData
from shared.contracts.common import MunicipalityCode, SealedMembership
from shared.contracts.reasons import REJECTION_DESCRIPTION, REVOCATION_DESCRIPTION
from shared.contracts.topics import APPLICATIONS, CERTIFICATES

HousingBasis = Literal["owned", "rented", "trial_residence", "shared_house", "hotel"]
CertificateStatus = Literal["valid", "revoked", "expired"]


class ApplicationSubmitted(EventData, name="certification.application.submitted", version=2, topic=APPLICATIONS):
    """v2: member numbers are sealed with the resident's data key."""

    application_id: str
    resident_id: str
    municipality_code: MunicipalityCode
    primary_residence_code: MunicipalityCode
    planned_stay_days: int
    housing_basis: HousingBasis
    partners: list[SealedMembership] = []
    submitted_at: datetime


class ApplicationRejected(EventData, name="certification.application.rejected", topic=APPLICATIONS):
    application_id: str
    resident_id: str
    municipality_code: MunicipalityCode
    reason: str = Field(description=REJECTION_DESCRIPTION)
    decided_at: datetime


class _CertificateEvent(EventData):
    certificate_number: str
    resident_id: str
    municipality_code: MunicipalityCode
    valid_from: date
    valid_until: date
    status: CertificateStatus
    #: The partners the resident consented to share this certificate with (v2: member numbers sealed
    #: with the resident's data key).
    partners: list[SealedMembership] = []


class CertificateIssued(_CertificateEvent, name="certification.certificate.issued", version=2, topic=CERTIFICATES):
    application_id: str
    issued_at: datetime


class CertificateRenewed(_CertificateEvent, name="certification.certificate.renewed", version=2, topic=CERTIFICATES):
    renewed_at: datetime


class CertificateRevoked(_CertificateEvent, name="certification.certificate.revoked", version=2, topic=CERTIFICATES):
    reason: str = Field(description=REVOCATION_DESCRIPTION)
    revoked_at: datetime


class CertificateExpiring(_CertificateEvent, name="certification.certificate.expiring", version=2, topic=CERTIFICATES):
    """Sent once, 30 days before valid_until."""

    days_left: int


class CertificateExpired(_CertificateEvent, name="certification.certificate.expired", version=2, topic=CERTIFICATES):
    """Sent once, on the day after valid_until (Japan time)."""

    expired_on: date
