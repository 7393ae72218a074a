"""SAMPLE DATA: a small catalogue of designated activities for the demo towns.

No municipality published these: they stand in for each town's own catalogue of designated activities
(自治体が指定する担い手活動) so that the demo and the tests can ask for premium. Seeded by a ``prepare``
step (``handlers.seed_sample_catalogue``) for 白浜町 and every town of the travel programmes
(``shared/reference/data/travel_programs.csv``), once: an entry a municipality's staff changed or
retired stays as they left it, and each entry is marked ``sample`` until staff change it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from services.registration.domain import ActivityKind, DesignatedActivity, new_designated_activity
from shared.reference import travel_programs

SHIRAHAMA = "304018"  # 和歌山県白浜町, the demo's town


@dataclass(frozen=True, slots=True)
class SampleActivity:
    code: str
    name_ja: str
    name_en: str
    kind: ActivityKind
    season: str | None
    evidence_required: bool


#: Every demo town's sample catalogue (the same six kinds of local work everywhere).
COMMON: tuple[SampleActivity, ...] = (
    SampleActivity("summer-festival", "夏祭りの運営ボランティア", "Volunteer staff at the summer festival",
                   "festival", "7〜8月", False),
    SampleActivity("farm-help", "援農ボランティア（収穫・草刈り）", "Farm help (harvest, weeding)",
                   "farming", "通年", True),
    SampleActivity("cleanup", "海岸・河川の清掃活動", "Beach and river clean-up", "environment", "通年", False),
    SampleActivity("fire-brigade-drill", "消防団・防災訓練への参加", "Volunteer fire brigade and disaster drills",
                   "disaster_prevention", "年2回（6月・11月）", True),
    SampleActivity("event-staff", "地域イベントの運営スタッフ", "Staff at community events",
                   "community_event", "通年", False),
    SampleActivity("kids-support", "子ども食堂・学習支援", "Children's cafeteria and study support",
                   "education", "通年", True),
)

#: 白浜町's own sample entries besides the common ones (the demo's resident picks these).
SHIRAHAMA_ONLY: tuple[SampleActivity, ...] = (
    SampleActivity("shirarahama-beach-cleanup", "白良浜のビーチクリーン", "Shirarahama beach clean-up",
                   "environment", "通年（夏季中心）", False),
    SampleActivity("kumano-kodo-trail-work", "熊野古道の道普請ボランティア", "Kumano Kodo trail maintenance",
                   "environment", "10〜3月", False),
    SampleActivity("ume-harvest", "梅の収穫の手伝い", "Helping with the ume harvest", "farming", "6〜7月", True),
)


def sample_towns() -> list[str]:
    """白浜町, then every municipality of the travel programmes, once each."""
    codes = [SHIRAHAMA, *(code for program in travel_programs() for code in program.municipality_codes)]
    return list(dict.fromkeys(codes))


def sample_catalogue(now: datetime) -> list[DesignatedActivity]:
    entries = []
    for code in sample_towns():
        for sample in (*COMMON, *(SHIRAHAMA_ONLY if code == SHIRAHAMA else ())):
            entries.append(new_designated_activity(
                municipality_code=code, code=sample.code, name_ja=sample.name_ja, name_en=sample.name_en,
                kind=sample.kind, season=sample.season, evidence_required=sample.evidence_required, now=now,
                sample=True,
            ))
    return entries
