"""What a plan switch promises, for every algorithm, checked by Hypothesis on the memory
backend (the conformance suite holds Redis to it, decision for decision).

A trace runs under one plan, then the organization is moved to another at time t.
Every verdict and ``retry_after`` must equal a model computed from the admitted history
and the plan in force at each admission; from t on, the new plan's promise holds in
every window that starts at or after t, and the window that holds t admits no more
after t than the new limit leaves of what it had spent; and a denied request consumes
nothing (the same request again, at the same instant, gets the same answer).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from meterkit import (
    Category,
    CostTable,
    CreditPlan,
    CustomerPlan,
    MemoryBackend,
    Meter,
    Operation,
    Policy,
    Tier,
)
from tests.behaviour.test_algorithms import admits, earliest
from tests.conftest import FakeClock

US = 1_000_000
BASE_US = 1_767_225_600 * US
ALGORITHMS = ("fixed_window", "sliding_window", "gcra", "sliding_log")


@st.composite
def cases(draw: st.DrawFn) -> tuple[Policy, str | None, int, list[int]]:
    """A policy of one tier with plans "a" and "b" (same window, other amounts and
    bursts), the plan before the switch, the switch's index, and the gaps (µs) before
    each request."""
    algorithm = draw(st.sampled_from(ALGORITHMS))
    window = draw(st.sampled_from([1, 2, 5, 60]))

    def change() -> object:
        rate = f"{draw(st.integers(1, 8))} per {window} seconds"
        if algorithm == "gcra" and draw(st.booleans()):
            return {"rate": rate, "burst": draw(st.integers(1, 8))}
        return rate

    base = f"{draw(st.integers(1, 6))} per {window} seconds"
    tier = Tier("t", "key", base, algorithm)  # type: ignore[arg-type]
    costs = CostTable((Category("free", "0", "0"),), (Operation("op", "free", "0"),))
    plans = [CustomerPlan("a", {"t": change()}), CustomerPlan("b", {"t": change()})]  # type: ignore[dict-item]
    policy = Policy([tier], costs, CreditPlan("0"), plans=plans)
    window_us = window * US
    gaps = draw(
        st.lists(
            st.one_of(
                st.just(0),
                st.integers(1, window_us // 2),
                st.integers(0, 2 * window_us),
            ),
            min_size=4,
            max_size=50,
        )
    )
    switch = draw(st.integers(0, len(gaps)))
    return policy, draw(st.sampled_from([None, "a"])), switch, gaps


def _gcra_admits(tier: Tier, tat: int | None, now: int) -> tuple[bool, int]:
    """A gcra verdict from the TAT the history left (None: no state), and the wait."""
    start = now if tat is None or tat < now else tat
    ahead = start + tier.interval_us - now
    return ahead <= tier.tau_us, max(0, ahead - tier.tau_us)


def _in(times: Sequence[int], lo: int, hi: int) -> int:
    """How many of ``times`` are in (lo, hi]."""
    return sum(1 for t in times if lo < t <= hi)


@given(cases())
def test_after_a_switch_the_new_plan_promise_holds_and_nothing_spent_is_lost(
    case: tuple[Policy, str | None, int, list[int]],
) -> None:
    """Verdicts and waits follow the model through a plan switch; from the switch on,
    the new plan's promise holds, and a denied request changes nothing."""
    policy, first, switch, gaps = case
    clock = FakeClock()
    meter = Meter(policy, MemoryBackend(clock=clock))
    op = policy.plan_for("op")
    if first is not None:
        meter.set_plan("o", first)
    t_us = 0
    switched_at: int | None = None
    history: list[int] = []
    spent = 0  # admissions before the switch (some may share its instant)
    tat: int | None = None
    for i, gap in enumerate(gaps):
        t_us += gap
        clock.now = (BASE_US + t_us) / US
        now = BASE_US + t_us
        if i == switch:
            meter.set_plan("o", "b")
            switched_at, spent = now, len(history)
        plan = "b" if switched_at is not None else first
        tier = policy.limits_for(op, plan).tiers[0]
        if tier.algorithm == "gcra":
            model, wait = _gcra_admits(tier, tat, now)
        else:
            model = admits(tier, history, now)
            wait = 0 if model else earliest(tier, history, now)
        d = meter.check("k", org="o", operation="op")
        assert (d.allowed, d.plan, d.tiers[0].limit) == (model, plan or "default", tier.capacity)
        assert round(d.retry_after * US) == wait
        if d.allowed:
            history.append(now)
            start = now if tat is None or tat < now else tat
            tat = start + tier.interval_us
        else:
            again = meter.check("k", org="o", operation="op")
            assert again.outcome[:8] == d.outcome[:8]  # the denial consumed nothing
    if switched_at is None:
        return
    tier = policy.limits_for(op, "b").tiers[0]
    t, w, limit = switched_at, tier.window_us, tier.limit
    before, after = history[:spent], history[spent:]
    if tier.algorithm in ("fixed_window", "sliding_window"):
        # At most the limit in every aligned window after the switch; in the window of
        # the switch, at most what the new limit leaves of what was spent in it.
        for index, n in Counter(h // w for h in after).items():
            assert n <= max(0, limit - sum(1 for h in before if h // w == index))
    elif tier.algorithm == "sliding_log":
        for u in after:
            assert _in(history, u - w, u) <= max(limit, _in(before, u - w, t))
    else:
        for i, u in enumerate(after):
            for j in range(i, len(after)):
                assert j - i + 1 <= tier.capacity + (after[j] - u) // tier.interval_us
