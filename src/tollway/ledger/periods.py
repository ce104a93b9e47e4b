"""Calendar periods of key spend caps: the day, ISO week (Monday) and month that contain a
moment, in the operator's billing time zone (setting ``billing_timezone``, an IANA name).

A period is named by its start in epoch milliseconds; its end is the next period's start, so
daylight-saving days are 23 or 25 hours long, as on a wall clock.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tollway import settings
from tollway.errors import InvalidRequest

PERIODS = ("day", "week", "month")
ADJECTIVE = {"day": "daily", "week": "weekly", "month": "monthly"}
#: Bits of ``holds.cap_periods``: which of the key's caps counted a hold.
PERIOD_BITS = {"day": 1, "week": 2, "month": 4}
#: Time-zone offsets are whole quarter hours, so every period starts on one.
_QUARTER_MS = 900_000


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidRequest(f"unknown time zone {name!r} (use an IANA name such as "
                             "'UTC' or 'Europe/Paris')") from None


@lru_cache(maxsize=1)
def billing_zone() -> ZoneInfo:
    """The configured billing time zone (read once per process)."""
    return zone(settings.get("billing_timezone"))


def _first_day(day: date, period: str) -> date:
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def _next_first_day(first: date, period: str) -> date:
    if period == "day":
        return first + timedelta(days=1)
    if period == "week":
        return first + timedelta(days=7)
    return (first.replace(day=28) + timedelta(days=4)).replace(day=1)


def _ms(day: date, tz: ZoneInfo) -> int:
    return int(datetime.combine(day, time(0), tzinfo=tz).timestamp()) * 1000


@lru_cache(maxsize=4096)
def _bounds(quarter: int, period: str, tz: ZoneInfo) -> tuple[int, int]:
    day = datetime.fromtimestamp(quarter * _QUARTER_MS // 1000, tz).date()
    first = _first_day(day, period)
    return _ms(first, tz), _ms(_next_first_day(first, period), tz)


def bounds(at_ms: int, period: str, tz: ZoneInfo | None = None) -> tuple[int, int]:
    """(start_ms, end_ms) of the ``period`` (day, week, month) that contains ``at_ms``."""
    return _bounds(at_ms // _QUARTER_MS, period, tz or billing_zone())
