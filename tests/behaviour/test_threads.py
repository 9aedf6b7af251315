"""Concurrency: threads racing for the last units of a tier or a balance never overshoot.

Eight real threads start together at a ``threading.Barrier`` while the fake clock stands
still, so every admission has to come out of the same quota. Each test races several
rounds (a fresh key or org each), since one race may happen not to interleave.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest

from meterkit import Category, CostTable, CreditPlan, Meter, Operation, Policy, Tier

THREADS = 8
ATTEMPTS = 40  # per thread: 320 in all, for 100 to be had
ROUNDS = 5


def _policy(*tiers: Tier, allowance: str = "100") -> Policy:
    costs = CostTable(
        (Category("read", "0.01", "0.01"),), (Operation("items.list", "read", "0.01"),)
    )
    return Policy(tiers, costs, CreditPlan(allowance))


@pytest.fixture(autouse=True)
def _switch_often() -> Iterator[None]:
    """Make the interpreter switch threads as often as it can, to interleave the checks."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


@pytest.fixture
def threaded_meter(make_meter: Callable[[Policy], Any]) -> Iterator[Callable[[Policy], Meter]]:
    """``make_meter`` for synchronous meters, closed after the test."""
    made: list[Meter] = []

    def make(policy: Policy) -> Meter:
        meter = make_meter(policy)
        if not isinstance(meter, Meter):
            pytest.skip("an asyncio meter runs on one event loop, not from several threads")
        made.append(meter)
        return meter

    yield make
    for meter in made:
        meter.close()


def _race(work: Callable[[int], list[Any]]) -> list[Any]:
    """Run ``work(i)`` on eight threads released together; return all results, re-raise errors."""
    barrier = threading.Barrier(THREADS)
    results: list[list[Any]] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = work(i)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]
    return [d for r in results for d in r]


@pytest.mark.parametrize("algorithm", ["fixed_window", "sliding_window", "gcra", "sliding_log"])
def test_eight_threads_on_one_key_get_exactly_the_burst(
    threaded_meter: Callable[[Policy], Meter], algorithm: str
) -> None:
    """Eight threads hammering one key with a 100-request burst tier get exactly 100 admitted."""
    tier = Tier("burst", "key", "100/minute", algorithm)  # type: ignore[arg-type]
    meter = threaded_meter(_policy(tier))
    for r in range(ROUNDS):
        key = f"key_{r}"
        decisions = _race(
            lambda i, key=key: [
                meter.check(key, org="org_a", operation="items.list") for _ in range(ATTEMPTS)
            ]
        )
        admitted = [d for d in decisions if d.allowed]
        assert len(admitted) == 100
        assert len({d.charge_id for d in admitted}) == 100
        assert {d.reason for d in decisions if not d.allowed} == {"rate_limited"}
        assert sorted(d.tiers[0].remaining for d in admitted) == list(range(100))
        usage = meter.usage("org_a", key=key)
        assert usage.requests == 100
        assert usage.credits_used == Decimal("1.00")


def test_eight_keys_of_one_org_share_its_tier_exactly(
    threaded_meter: Callable[[Policy], Meter],
) -> None:
    """Eight threads with eight keys of one org get exactly the org tier's 100 between them."""
    meter = threaded_meter(_policy(Tier("org", "org", "100/minute", "sliding_log")))
    for r in range(ROUNDS):
        org = f"org_{r}"
        decisions = _race(
            lambda i, org=org: [
                meter.check(f"key_{i}", org=org, operation="items.list") for _ in range(ATTEMPTS)
            ]
        )
        assert sum(d.allowed for d in decisions) == 100
        assert sum(k.requests for k in meter.usage(org).keys.values()) == 100


def test_threads_never_overdraw_the_credits(threaded_meter: Callable[[Policy], Meter]) -> None:
    """With one credit at 0.01 a call, racing threads get exactly 100 calls and a zero balance."""
    meter = threaded_meter(_policy(allowance="1"))
    for r in range(ROUNDS):
        org = f"org_{r}"
        decisions = _race(
            lambda i, org=org: [
                meter.check(f"key_{i}", org=org, operation="items.list") for _ in range(ATTEMPTS)
            ]
        )
        assert sum(d.allowed for d in decisions) == 100
        assert {d.reason for d in decisions if not d.allowed} == {"insufficient_credits"}
        assert min(d.balance for d in decisions if d.allowed) == 0
        usage = meter.usage(org)
        assert (usage.credits_used, usage.credits_left) == (Decimal(1), Decimal(0))


def test_threads_retrying_one_idempotency_key_are_charged_once(
    threaded_meter: Callable[[Policy], Meter],
) -> None:
    """Eight threads sending the same idempotent request get one charge and one decision."""
    meter = threaded_meter(_policy())
    for r in range(ROUNDS):
        idem = f"pay-{r}"
        decisions = _race(
            lambda i, idem=idem: [
                meter.check("key_a", org="org_a", operation="items.list", idempotency_key=idem)
                for _ in range(5)
            ]
        )
        assert all(d.allowed for d in decisions)
        assert len({d.charge_id for d in decisions}) == 1
        assert sum(not d.replayed for d in decisions) == 1
    assert meter.usage("org_a").credits_used == Decimal("0.01") * ROUNDS
