"""What one check asks of a backend, and the raw outcome a backend returns.

Both are plain and cheap: a :class:`Plan` is a handful of slots built per request,
an ``Outcome`` a tuple. Every backend — Python under a lock, or one Lua script on
Redis — takes the same plan and returns the same tuple, field for field, so the
conformance suite can compare them decision for decision.
"""

from __future__ import annotations

import calendar
import itertools
import os
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from meterkit.core.policy import OperationPlan, Policy

__all__ = ["Outcome", "Plan", "TierOutcome", "month_bounds", "new_charge_id"]

Mode = Literal["live", "test"]

#: One tier's result: (remaining after this request, µs until it resets, denied?).
#: ``denied`` is 1 when the tier said no (even in shadow mode), else 0.
TierOutcome = tuple[int, int, int]

#: A backend's answer, by position:
#:   0 allowed (bool)        1 reason (0 none, 1 rate_limited, 2 insufficient_credits)
#:   2 now (µs)              3 retry after (µs, 0 when allowed)
#:   4 tiers (TierOutcome per tier of the plan, in policy order)
#:   5 charged (µ-credits)   6 balance after the charge (µ-credits, may go below 0 in shadow)
#:   7 period end (µs)       8 charge id ("" when nothing was charged)
#:   9 replayed (bool: an idempotent retry answered from the first decision)
Outcome = tuple[bool, int, int, int, tuple[TierOutcome, ...], int, int, int, str, bool]

REASON_NONE = 0
REASON_RATE = 1
REASON_CREDITS = 2


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


# A charge id is unique across processes and servers without a syscall per check:
# 64 random bits per process (16 hex digits), then a counter in decimal (str() is
# ~0.1 µs cheaper than formatting it in hex).
# A forked child draws a new prefix so that parent and child never share ids.
_CHARGE_PREFIX = os.urandom(8).hex()
_charge_counter = itertools.count(1)


def _reseed() -> None:
    global _CHARGE_PREFIX, _charge_counter
    _CHARGE_PREFIX = os.urandom(8).hex()
    _charge_counter = itertools.count(1)


os.register_at_fork(after_in_child=_reseed)


def new_charge_id() -> str:
    """A fresh id for one admitted charge, used to refund it exactly once."""
    return _CHARGE_PREFIX + str(next(_charge_counter))
