"""What one check asks of a backend (:class:`Plan`), and the calendar month it is
charged to (:func:`month_bounds`).

A plan is a handful of slots built per request; every backend takes the same plan
and returns the same :class:`~meterkit.core.outcome.Outcome`.
"""

from __future__ import annotations

import calendar
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Literal

from meterkit.errors import InvalidRequestError

if TYPE_CHECKING:
    from meterkit.core.policy import OperationPlan, Policy

__all__ = ["END_OF_TIME_US", "Plan", "bad_clock", "clock_us", "month_bounds"]

Mode = Literal["live", "test"]


class Plan:
    """One request as a backend sees it: operation plan, identities, cost, idempotency key."""

    __slots__ = ("cost", "idem", "key", "mode", "op", "org", "policy")

    def __init__(
        self,
        policy: Policy,
        op: OperationPlan,
        key: str,
        org: str,
        mode: Mode,
        cost: int,
        idem: str | None,
    ) -> None:
        self.policy = policy
        self.op = op
        self.key = key
        self.org = org
        self.mode = mode
        self.cost = cost
        self.idem = idem

    def __repr__(self) -> str:
        return (
            f"Plan(op={self.op.name!r}, key={self.key!r}, org={self.org!r}, mode={self.mode!r}, "
            f"cost={self.cost}, idem={self.idem!r})"
        )


_US = 1_000_000


def month_bounds(now_us: int) -> tuple[int, int]:
    """The calendar month (UTC) holding ``now_us``, as [start, end) in microseconds."""
    day = datetime.fromtimestamp(now_us // _US, tz=timezone.utc)
    start = calendar.timegm((day.year, day.month, 1, 0, 0, 0))
    year, month = (day.year + 1, 1) if day.month == 12 else (day.year, day.month + 1)
    end = calendar.timegm((year, month, 1, 0, 0, 0))
    return start * _US, end * _US


#: Clock readings are refused outside [1970, year 10000): the calendar months of
#: credits end there, and a time past it would stick as a backend's high-water mark.
END_OF_TIME_US = 253_402_300_800 * _US


def bad_clock(now: int | None = None) -> InvalidRequestError:
    """The error for a clock reading that cannot be a time (``now``: µs, out of range)."""
    if now is None:
        return InvalidRequestError("clock returned something that is not a finite number")
    return InvalidRequestError(
        "clock returned a time outside 1970-01-01 .. 9999-12-31 (UTC); nothing was changed"
    )


def clock_us(seconds: object) -> int:
    """A clock's reading (UNIX seconds) in whole µs, or :func:`bad_clock`'s error."""
    try:
        now = round(seconds * _US)  # type: ignore[operator]
    except (TypeError, ValueError, OverflowError):
        raise bad_clock() from None
    if not 0 <= now < END_OF_TIME_US:
        raise bad_clock(now)
    return now
