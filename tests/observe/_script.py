"""The scripted sequence the observer tests replay on every backend.

One of each thing an observer must count: admissions, a denial by a rate tier and one
for credits, a shadow tier's report, an idempotent replay and a reused idempotency
key, a refund, and a backend outage (one check refused with ``BackendUnavailable``,
one admitted degraded by a fail-open meter). :data:`EXPECTED` says what each metric
holds afterwards; the Prometheus and OpenTelemetry tests assert it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest

from meterkit import (
    BackendUnavailable,
    Category,
    CostTable,
    CreditPlan,
    IdempotencyConflictError,
    MemoryBackend,
    Meter,
    Operation,
    Policy,
    Tier,
)
from tests.conftest import FakeClock

#: An outage: a context giving (a meter, a fail-open meter) whose backend is down,
#: both reporting to the observers given.
Outage = Callable[[Any], AbstractContextManager[tuple[Meter, Meter]]]


def script_policy() -> Policy:
    """Two calls a minute per key, and a shadow GCRA tier of one a minute."""
    costs = CostTable(
        (Category("read", "0.01", "0.01"), Category("write", "0.03", "0.15")),
        (Operation("items.list", "read", "0.01"), Operation("items.create", "write", "0.05")),
    )
    tiers = (
        Tier("key-burst", "key", "2/minute"),
        Tier("trial", "key", "1/minute", "gcra", shadow=True),
    )
    return Policy(tiers, costs, CreditPlan("100"))


class Unreachable(MemoryBackend):
    """A memory backend whose store has gone away: every call raises BackendUnavailable."""

    def apply(self, plan: Any) -> Any:
        raise BackendUnavailable("the store is down")


def memory_outage(policy: Policy) -> Outage:
    """An outage of the memory backend: meters over :class:`Unreachable`."""

    class _Outage:
        def __init__(self, observers: Any) -> None:
            self.observers = observers

        def __enter__(self) -> tuple[Meter, Meter]:
            down = Unreachable()
            return (
                Meter(policy, down, on_decision=self.observers),
                Meter(policy, down, on_decision=self.observers, fail_open=True),
            )

        def __exit__(self, *exc: object) -> None:
            return None

    return _Outage


def run_script(meter: Meter, clock: FakeClock, outage: Outage) -> dict[str, Any]:
    """Replay the sequence on ``meter`` (which reports to its observers) and return its
    decisions by name."""
    seen: dict[str, Any] = {}
    meter.set_allowance("org_b", "0.04")
    seen["first"] = meter.check("key_1", org="org_a", operation="items.list")
    # The shadow GCRA tier (one a minute) would say no to the second at once.
    seen["shadowed"] = meter.check("key_1", org="org_a", operation="items.list")
    seen["rate"] = meter.check("key_1", org="org_a", operation="items.list")
    seen["credits"] = meter.check("key_2", org="org_b", operation="items.create")
    clock.advance(120)
    seen["paid"] = meter.check("key_3", org="org_a", operation="items.create", idempotency_key="i1")
    seen["replay"] = meter.check(
        "key_3", org="org_a", operation="items.create", idempotency_key="i1"
    )
    with pytest.raises(IdempotencyConflictError):
        meter.check("key_4", org="org_a", operation="items.create", idempotency_key="i1")
    seen["refunded"] = meter.refund(seen["paid"])
    with outage(meter.on_decision) as (closed, fail_open):
        with pytest.raises(BackendUnavailable):
            closed.check("key_5", org="org_a", operation="items.list")
        seen["degraded"] = fail_open.check("key_5", org="org_a", operation="items.list")
    assert [seen[n].allowed for n in ("first", "shadowed", "rate", "credits", "paid")] == [
        True,
        True,
        False,
        False,
        True,
    ]
    assert seen["shadowed"].would_deny == ("trial",)
    assert seen["replay"].replayed
    assert seen["refunded"] is True
    assert seen["degraded"].degraded
    return seen


#: What the metrics hold after :func:`run_script` (an empty reason: none).
EXPECTED: dict[str, dict[tuple[str, ...], float]] = {
    "decisions": {
        ("items.list", "allowed", ""): 2,
        ("items.list", "denied", "rate_limited"): 1,
        ("items.create", "denied", "insufficient_credits"): 1,
        ("items.create", "allowed", ""): 2,  # the first and its replay
        ("items.create", "refused", "idempotency_key_reused"): 1,
        ("items.list", "error", "backend_unavailable"): 1,
        ("items.list", "allowed", "backend_unavailable"): 1,  # degraded
    },
    "tier_refusals": {("items.list", "key-burst"): 1, ("items.create", "credits"): 1},
    "degraded": {("items.list",): 1},
    "shadow_denials": {("items.list", "trial"): 1},
    # the outage's refused check, and the degraded admission
    "backend_errors": {("backend_unavailable",): 2},
    "refunds": {("items.create",): 1},
    "replays": {("items.create",): 1},
    # every call that reached the backend: 3 reads and the outage's 2; 4 checks and the
    # refund of items.create
    "latency_count": {("items.list",): 5, ("items.create",): 5},
}


def expected_series() -> Iterator[tuple[str, tuple[str, ...], float]]:
    """Every (metric, labels, value) of :data:`EXPECTED`."""
    for metric, series in EXPECTED.items():
        for labels, value in series.items():
            yield metric, labels, value
