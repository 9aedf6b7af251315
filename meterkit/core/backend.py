"""The backend interface: apply a plan atomically, refund, report usage, set allowances;
and the small store of the HTTP gate's idempotent responses."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from meterkit.core.idempotency import Claim
    from meterkit.core.outcome import Outcome, RawUsage
    from meterkit.core.plan import Plan
    from meterkit.core.policy import Policy

__all__ = ["AsyncBackend", "AsyncResponseStore", "Backend", "ResponseStore"]


@runtime_checkable
class Backend(Protocol):
    """A synchronous store of limits and credits. ``apply`` is the one atomic step.

    A backend may also offer ``peek(plan) -> Outcome``: what ``apply`` would answer
    now, consuming nothing (``Meter.peek`` uses it; meterkit's backends have it).
    """

    def apply(self, plan: Plan) -> Outcome: ...

    def refund(self, plan: Plan, outcome: Outcome) -> bool: ...

    def usage(self, policy: Policy, org: str, mode: str = "live") -> RawUsage: ...

    def set_allowance(self, org: str, mode: str, micro: int | None) -> None: ...

    def top_up(self, org: str, mode: str, micro: int) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class AsyncBackend(Protocol):
    """The asyncio twin of :class:`Backend`: the same methods, awaitable."""

    async def apply(self, plan: Plan) -> Outcome: ...

    async def refund(self, plan: Plan, outcome: Outcome) -> bool: ...

    async def usage(self, policy: Policy, org: str, mode: str = "live") -> RawUsage: ...

    async def set_allowance(self, org: str, mode: str, micro: int | None) -> None: ...

    async def top_up(self, org: str, mode: str, micro: int) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class ResponseStore(Protocol):
    """Where the HTTP gate keeps the first response of an idempotency key, next to the
    charge's own record (meterkit's backends are all one): the rule of
    :mod:`meterkit.core.idempotency`, one atomic step per call."""

    def claim_response(
        self, plan: Plan, outcome: Outcome, fingerprint: str, token: str, lock_us: int
    ) -> Claim: ...

    def keep_response(
        self, plan: Plan, outcome: Outcome, fingerprint: str, token: str, payload: bytes | None
    ) -> None: ...


@runtime_checkable
class AsyncResponseStore(Protocol):
    """The asyncio twin of :class:`ResponseStore`."""

    async def claim_response(
        self, plan: Plan, outcome: Outcome, fingerprint: str, token: str, lock_us: int
    ) -> Claim: ...

    async def keep_response(
        self, plan: Plan, outcome: Outcome, fingerprint: str, token: str, payload: bytes | None
    ) -> None: ...
