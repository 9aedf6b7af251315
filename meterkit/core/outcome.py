"""The raw outcome a backend returns for one plan, and the rules every backend shares
about it: what a denied request leaves unspent, what an idempotent retry replays.

Every backend (Python under a lock, or one Lua script on Redis) returns the same
:class:`Outcome`, field for field, so the conformance suite can compare them decision
for decision. Backends build it in their hot loops as ``tuple.__new__(Outcome, …)``;
everything else reads it by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from meterkit.errors import IdempotencyConflictError

if TYPE_CHECKING:
    from meterkit.core.plan import Plan
    from meterkit.core.policy import OperationPlan

__all__ = [
    "REASON_CREDITS",
    "REASON_NONE",
    "REASON_RATE",
    "Outcome",
    "RawUsage",
    "TierOutcome",
    "replay",
    "unspent",
]

REASON_NONE = 0
REASON_RATE = 1
REASON_CREDITS = 2

#: One tier's result: (remaining after this request, µs until it resets, denied?).
#: ``denied`` is 1 when the tier said no (even in shadow mode), else 0.
TierOutcome = tuple[int, int, int]


class Outcome(NamedTuple):
    """A backend's answer to one plan (times in µs, amounts in µ-credits)."""

    allowed: bool
    #: 0 none, 1 rate_limited (:data:`REASON_RATE`), 2 insufficient_credits
    reason: int
    now: int
    #: 0 when allowed
    retry_after: int
    #: one per tier that applied (see ``limits``), in policy order
    tiers: tuple[TierOutcome, ...]
    charged: int
    #: after the charge; may go below 0 in shadow mode
    balance: int
    period_end: int
    #: "" when nothing was charged
    charge_id: str
    #: an idempotent retry answered from the first decision
    replayed: bool
    #: the operation's tiers as they applied: under the plan in force (``tiers`` has one
    #: result per tier of it), from :meth:`Policy.limits_for`; None for the plan's own
    #: operation plan (the default plan, and hand-made outcomes)
    limits: OperationPlan | None = None
    #: the policy's credit alert thresholds (percents) this check reached first in its
    #: organization's month (see :func:`meterkit.core.credits.alerts_reached`)
    alerts: tuple[int, ...] = ()


#: Usage as a backend reports it: (period start µs, period end µs, allowance µ-credits
#: (plan or override, plus top-ups), used µ-credits, requests, {(key, op): [requests, µ]},
#: the organization's plan). A backend written before plans may leave the plan off.
RawUsage = tuple[int, int, int, int, int, dict[tuple[str, str], list[int]], str]

#: What an idempotency record keeps: (expires µs, key id, operation, cost, first outcome).
IdempotencyRecord = tuple[int, str, str, int, Outcome]


def unspent(results: Sequence[TierOutcome]) -> tuple[TierOutcome, ...]:
    """Tier results of a denied request: nothing was consumed, so an admitting tier
    has one more left than it would have had after this request (exact for all four
    algorithms)."""
    return tuple((r + 1, reset, 0) if not den else (r, reset, den) for r, reset, den in results)


def replay(plan: Plan, record: IdempotencyRecord) -> Outcome:
    """The first decision again, marked replayed; a different request under the same
    idempotency key raises :class:`IdempotencyConflictError`."""
    _, key, operation, cost, first = record
    if key != plan.key or operation != plan.op.name or cost != plan.cost:
        raise IdempotencyConflictError(
            "this idempotency key was first used for a different request "
            f"(key {key!r}, operation {operation!r})"
        )
    # (the first decision reported its alerts: a retry reports none)
    return first._replace(replayed=True, alerts=())
