"""The memory backend's generated code and bounded state.

``MemoryBackend`` writes one function per operation from its algorithm snippets;
these tests hold what that must keep: readable source that tracebacks show, the
lock released when a check fails half-way, state shared between operations and
policies with the same tier, a plan paired with another policy than its own, and
state that stays bounded (and outcomes unchanged) as idle identities are swept.
"""

from __future__ import annotations

import traceback
from typing import Any

import pytest

from meterkit import (
    AsyncMeter,
    Category,
    CostTable,
    CreditPlan,
    MemoryBackend,
    Meter,
    Operation,
    Plan,
    Policy,
    Tier,
)
from tests.conftest import FakeClock


def _policy(tiers: list[Tier], allowance: str = "100", *, shadow: bool = False) -> Policy:
    costs = CostTable(
        (Category("read", "0.01", "0.01"),),
        (Operation("items.list", "read", "0.01"), Operation("items.get", "read", "0.01")),
    )
    return Policy(tiers, costs, CreditPlan(allowance), shadow=shadow)


def test_generated_source_is_readable_and_kept_on_the_function(clock: FakeClock) -> None:
    """The source of an operation's function names its tiers and is kept on the function."""
    policy = Policy.crane_ledger()
    backend = MemoryBackend(clock=clock)
    Meter(policy, backend).check("key_1", org="org_1", operation="invoices.list")
    source = MemoryBackend.source(policy, "invoices.list", system_clock=False)
    for text in (
        "'key-hour', fixed_window, 1000 per 3600 s per key",
        "'org-hour', fixed_window, 10000 per 3600 s per org",
        "'key-burst', sliding_log, 100 per 60 s per key",
    ):
        assert text in source
    fn = backend._applies[policy.plan_for("invoices.list")]
    assert fn.__source__ == source  # type: ignore[attr-defined]
    # "<meterkit apply invoices.list>", or "... #2" if another policy's differs.
    assert fn.__code__.co_filename.startswith("<meterkit apply invoices.list")
    compile(source, "<check>", "exec")
    # On the default clock, the same function reads the system's time in µs.
    default = MemoryBackend.source(policy, "invoices.list")
    assert "_time_ns() // 1000" in default
    assert "_time_ns" not in source


def test_a_failing_check_shows_its_line_and_releases_the_lock(clock: FakeClock) -> None:
    """An error inside a generated function names it in the traceback and leaves the
    backend usable: the lock is released and nothing was consumed (the compiled lane
    raises the clock's error as it came)."""
    state = {"fail": True}

    def flaky() -> float:
        if state["fail"]:
            raise RuntimeError("clock unavailable")
        return clock()

    backend = MemoryBackend(clock=flaky)
    meter = Meter(_policy([Tier("t", "key", "1/hour")]), backend)
    with pytest.raises(RuntimeError, match="clock unavailable") as info:
        meter.check("k", org="o", operation="items.list")
    text = "".join(traceback.format_exception(info.value))
    assert 'File "<meterkit apply items.list' in text
    assert "now = round(clock() * 1000000)" in text
    state["fail"] = False
    assert meter.check("k", org="o", operation="items.list").allowed
    assert not meter.check("k", org="o", operation="items.list").allowed


def test_operations_and_policies_share_a_tier_of_the_same_name_and_rate(
    clock: FakeClock,
) -> None:
    """Two operations, and two policies on one backend, count against one shared tier."""
    backend = MemoryBackend(clock=clock)
    a = Meter(_policy([Tier("per-key", "key", "3/hour")]), backend)
    b = Meter(_policy([Tier("per-key", "key", "3/hour")], allowance="5"), backend)
    assert a.check("k", org="o", operation="items.list").allowed
    assert a.check("k", org="o", operation="items.get").allowed
    assert b.check("k", org="o", operation="items.get").allowed
    denied = b.check("k", org="o", operation="items.list")
    assert not denied.allowed
    assert denied.reason == "rate_limited"


def test_a_plan_paired_with_another_policy_uses_that_policy(clock: FakeClock) -> None:
    """A hand-built plan whose policy is not its operation's own is applied with its
    policy's allowance and shadow mode, as the plan says."""
    own = _policy([Tier("t", "key", "1/hour")], allowance="100")
    other = _policy([Tier("t", "key", "1/hour")], allowance="0.01", shadow=True)
    backend = MemoryBackend(clock=clock)
    op = own.plan_for("items.list")
    first = backend.apply(Plan(own, op, "k", "o", "live", op.price, None))
    assert first[0]
    assert first[6] == 99_990_000
    # The stray pairing: other's allowance (0.01) and shadow mode (nothing denies).
    stray = backend.apply(Plan(other, op, "k", "o2", "live", op.price, None))
    assert stray[0]
    assert stray[6] == 0
    again = backend.apply(Plan(other, op, "k", "o2", "live", op.price, None))
    assert again[0]
    assert again[4] == ((0, again[4][0][1], 1),)
    assert again[6] == -10_000
    assert not backend.apply(Plan(own, op, "k", "o", "live", op.price, None))[0]


@pytest.mark.parametrize("algorithm", ["gcra", "sliding_log"])
def test_idle_identities_are_swept(clock: FakeClock, algorithm: str) -> None:
    """Identities seen once and then idle for a window are dropped by the amortized
    sweeps, so state stays bounded by recent traffic, and a swept key is admitted as new."""
    policy = _policy([Tier("t", "key", "1/minute", algorithm)], allowance="10000")  # type: ignore[arg-type]
    backend = MemoryBackend(clock=clock)
    check = Meter(policy, backend).check
    rounds, per_round = 8, 10_000
    for r in range(rounds):
        for i in range(per_round):
            assert check(f"k{r}_{i}", org="o", operation="items.list").allowed
        clock.advance(61)  # every key of this round is idle for a window from now on
    # Without sweeps, all 80k identities would be held; a sweep keeps only live ones.
    held = backend.size() - 1  # one account
    assert held < 5 * per_round, held
    assert check("k0_0", org="o", operation="items.list").allowed
    assert not check("k0_0", org="o", operation="items.list").allowed


def test_a_sliding_log_trims_several_expired_entries_at_once(clock: FakeClock) -> None:
    """After a quiet window, a log full of expired times admits a whole burst again."""
    meter = Meter(_policy([Tier("t", "key", "5/minute", "sliding_log")]), MemoryBackend(clock))
    for _ in range(5):
        assert meter.check("k", org="o", operation="items.list").allowed
        clock.advance(1)
    denied = meter.check("k", org="o", operation="items.list")
    assert not denied.allowed
    assert denied.retry_after == 55
    clock.advance(57.5)  # the first three expired, two remain
    remaining = [meter.check("k", org="o", operation="items.list") for _ in range(4)]
    assert [d.allowed for d in remaining] == [True, True, True, False]
    assert remaining[2].tiers[0].remaining == 0


def test_expired_idempotency_records_and_ended_months_accounts_are_dropped(
    clock: FakeClock,
) -> None:
    """Records past their 24 h and accounts of an ended month go, oldest first, as new
    ones come (two per new one): what is held stays bounded by recent traffic."""
    policy = _policy([Tier("t", "key", "1000/minute")], allowance="10000")
    backend = MemoryBackend(clock=clock)
    check = Meter(policy, backend).check
    per_round = 5_000
    for r in range(3):
        for i in range(per_round):
            org = f"o{r}_{i}"
            assert check("k", org=org, operation="items.list", idempotency_key="i").allowed
        clock.advance(32 * 86_400)  # the month ended and every record expired
    # Each round holds its orgs' accounts and records; the rounds before were dropped.
    assert len(backend._idem) <= per_round * 1.5
    assert len(backend._accounts) <= per_round * 1.5
    # A dropped record is gone for good: the same key is a new request now.
    assert not check("k", org="o0_0", operation="items.list", idempotency_key="i").replayed


def test_turned_windows_are_dropped_a_shard_at_a_time(clock: FakeClock) -> None:
    """A window that turns does not free its counts in one go: its shards wait on a
    list and one goes per check, so the list is empty after as many checks."""
    from meterkit.backends.memory.state import _SHARDS

    policy = _policy([Tier("t", "key", "5/minute", "fixed_window")], allowance="10000")
    backend = MemoryBackend(clock=clock)
    check = Meter(policy, backend).check
    for i in range(2_000):
        check(f"k{i}", org="o", operation="items.list")
    clock.advance(60)
    (state,) = backend._tiers.values()
    check("k0", org="o", operation="items.list")
    assert len(state.dead) == _SHARDS  # type: ignore[union-attr]
    for i in range(_SHARDS):
        check(f"k{i}", org="o", operation="items.list")
    assert state.dead == []  # type: ignore[union-attr]
    assert backend.size() == _SHARDS + 1


async def test_a_meter_calls_the_operations_function_and_a_subclass_apply_still_counts(
    clock: Any,
) -> None:
    """Meters call the memory backend's function of an operation directly once apply
    made it (a frame less, and no coroutine for AsyncMeter); a subclass with its own
    ``apply`` offers none, so every check goes through it."""
    policy = Policy.crane_ledger()
    backend = MemoryBackend(clock=clock)
    assert backend.appliers == {}
    meter, ameter = Meter(policy, backend), AsyncMeter(policy, backend)
    meter.check("key_1", org="org_1", operation="invoices.list")  # (made by apply)
    assert list(backend.appliers or ()) == [policy.plan_for("invoices.list")]

    def not_called(plan: Any) -> Any:
        raise AssertionError("apply was called")

    meter._apply = ameter._apply = not_called  # type: ignore[method-assign]
    first = meter.check("key_1", org="org_1", operation="invoices.list")
    second = await ameter.check("key_1", org="org_1", operation="invoices.list")
    assert (first.tiers[0].remaining, second.tiers[0].remaining) == (998, 997)

    calls = []

    class Counted(MemoryBackend):
        def apply(self, plan: Any) -> Any:
            calls.append(plan.op.name)
            return super().apply(plan)

    counted = Counted(clock=clock)
    assert counted.appliers is None
    for _ in range(3):
        Meter(policy, counted).check("key_1", org="org_1", operation="invoices.list")
    assert calls == ["invoices.list"] * 3
