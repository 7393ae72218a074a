"""Settings of the subsidy service alone (``NICHIIKI_SUBSIDY_*``): seed budgets and the sweeper.

The numbers are illustrative defaults for demos and tests, not published terms. The opening
miles are chosen so that each JAL municipality can fund exactly one resident (4 × 7,500 miles):
the second resident is waitlisted until a donation or a top-up arrives.
"""

from __future__ import annotations

from datetime import date

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.subsidy.domain import SeedDefaults


class SubsidySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NICHIIKI_SUBSIDY_", extra="ignore")

    #: Opening balance of each seeded miles budget (JAL: one resident's 30,000 miles).
    opening_miles: int = Field(default=30_000, ge=0)
    #: Opening balance of each seeded yen budget.
    opening_jpy: int = Field(default=1_000_000, ge=0)
    programs_active_from: date = date(2025, 4, 1)
    programs_active_until: date = date(2031, 3, 31)
    #: Round trips a mileage grant needs when the reference data does not say (JAL: at least 4).
    required_round_trips: int = Field(default=4, ge=1)
    #: Yen per mile for crediting yen donations to a miles budget.
    jpy_per_mile: int = Field(default=2, ge=1)
    #: Per-leg cap of a fare discount, and legs per certificate year (the envelope reserved).
    max_discount_jpy: int = Field(default=10_000, ge=1)
    discount_max_one_ways: int = Field(default=12, ge=1)
    #: How often grants whose window has ended are expired and their reservation released.
    sweep_interval_s: float = Field(default=300.0, gt=0)
    pool_size: int = Field(default=16, ge=2)
    #: Members of the trips consumer group in this process (each handles its own partitions).
    trip_consumers: int = Field(default=2, ge=1, le=4)

    def seed_defaults(self) -> SeedDefaults:
        return SeedDefaults(
            active_from=self.programs_active_from,
            active_until=self.programs_active_until,
            required_round_trips=self.required_round_trips,
            jpy_per_mile=self.jpy_per_mile,
            max_discount_jpy=self.max_discount_jpy,
            discount_max_one_ways=self.discount_max_one_ways,
        )

    def opening_balance(self, unit: str) -> int:
        return self.opening_miles if unit == "miles" else self.opening_jpy
