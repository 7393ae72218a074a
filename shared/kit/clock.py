"""The platform's one clock: instants in UTC, dates by Japanese rules.

A donation's calendar year, a certificate's validity and a grant's year follow the date in
Japan (``Asia/Tokyo``), whatever the server's zone. Every service reads time through a ``Clock``
so a test can set it (``Clock.fixed``) instead of patching functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

JAPAN = ZoneInfo("Asia/Tokyo")


def utc_now() -> datetime:
    return datetime.now(UTC)


def japan_date(at: datetime) -> date:
    """The date in Japan at an instant (a naive instant is taken as UTC)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(JAPAN).date()


@dataclass(frozen=True, slots=True)
class Clock:
    """Where a service reads the time; the default reads the system clock."""

    read: Callable[[], datetime] = field(default=utc_now)

    def now(self) -> datetime:
        """The current instant, timezone-aware (UTC)."""
        return self.read()

    def today(self) -> date:
        """Today's date in Japan."""
        return japan_date(self.read())

    @classmethod
    def fixed(cls, at: datetime) -> Clock:
        """A clock that always reads ``at`` (for tests)."""
        instant = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
        return cls(lambda: instant)

    @classmethod
    def on_date(cls, day: date) -> Clock:
        """A clock reading noon in Japan of ``day`` (for tests that care about the date only)."""
        return cls.fixed(datetime(day.year, day.month, day.day, 12, tzinfo=JAPAN).astimezone(UTC))


SYSTEM_CLOCK = Clock()
