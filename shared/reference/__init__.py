"""Reference data bundled with the project (``shared/reference/data``), loaded lazily once.

- municipalities: every 全国地方公共団体コード (MIC, 2024-01-01) keyed by its 6-digit code;
- plans: adopted 特定居住促進計画 / 広域的地域活性化基盤整備計画, and designated support corporations;
- programs: airline, rail and ferry programs for certified dual residents.
"""

from ._data import ReferenceDataError
from .municipalities import (
    MUNICIPALITY_CODE_PATTERN,
    AmbiguousMunicipality,
    Municipality,
    MunicipalityCode,
    MunicipalityKind,
    UnknownMunicipality,
    check_digit,
    find_municipality,
    find_municipality_by_full_name,
    is_valid_code,
    municipalities,
    municipality,
    prefecture_of,
    prefectures,
)
from .plans import (
    REGIONAL_BASE_PLAN,
    SPECIFIC_RESIDENCE_PLAN,
    Plan,
    PlanLevel,
    SupportCorporation,
    municipalities_with_plan,
    plans,
    support_corporations,
)
from .programs import (
    PartnerKind,
    TravelMechanism,
    TravelProgram,
    UnknownTravelProgram,
    parse_demo_parameters,
    partner_code_of,
    travel_program,
    travel_programs,
)

__all__ = [
    "MUNICIPALITY_CODE_PATTERN",
    "REGIONAL_BASE_PLAN",
    "SPECIFIC_RESIDENCE_PLAN",
    "AmbiguousMunicipality",
    "Municipality",
    "MunicipalityCode",
    "MunicipalityKind",
    "PartnerKind",
    "Plan",
    "PlanLevel",
    "ReferenceDataError",
    "SupportCorporation",
    "TravelMechanism",
    "TravelProgram",
    "UnknownMunicipality",
    "UnknownTravelProgram",
    "check_digit",
    "find_municipality",
    "find_municipality_by_full_name",
    "is_valid_code",
    "municipalities",
    "municipalities_with_plan",
    "municipality",
    "parse_demo_parameters",
    "partner_code_of",
    "plans",
    "prefecture_of",
    "prefectures",
    "support_corporations",
    "travel_program",
    "travel_programs",
]
