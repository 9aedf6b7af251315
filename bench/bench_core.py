"""The core engine's speed and memory, against the libraries a user would pick instead.

    python -m pytest bench/bench_core.py --benchmark-only -q -s -p no:cacheprovider
    METERKIT_BENCH_QUICK=1 python -m pytest bench/bench_core.py --benchmark-only -q \
        -p no:cacheprovider
    python bench/bench_core.py --profile     # where the time of one check goes
    python bench/bench_core.py --pauses      # the longest checks while 1M keys arrive

What one check is, on every side (the seed's three tiers, per check):

* meterkit: ``meter.check(key, org=..., operation="invoices.list")`` with the seed
  policy (``Policy.crane_ledger()``: key 1000/hour and org 10000/hour fixed windows,
  key 100/minute sliding log, then the 0.01-credit debit and the per-key usage
  record) on ``MemoryBackend``, returning a ``Decision``; then ``.allowed`` is read
  (and, in one variant, ``.headers``).
* limits: ``MemoryStorage`` and ``FixedWindowRateLimiter`` over the same three
  rates, written the way its users write several limits: ``test`` all, then
  ``hit`` all.
* throttled-py: three ``Throttled`` GCRA limiters (same three rates) on one
  ``MemoryStore``, each ``.limit()``-ed in turn.
* the floor: four dict increments (three tiers and the credits) under one
  ``threading.Lock`` — what any Python implementation must at least do.

Traffic is the same for every side: 10,000 keys in 100 organizations, visited in
a shuffled order after one warm-up visit each (so every side updates existing
state instead of creating it). No side may spend the benchmark being denied (a
denial is cheaper than an admission for every library), so denials are counted
and reported. The peers read the real clock; meterkit's backend gets a simulated
one (``itertools.count``, a C call cheaper than ``time.time``) that advances 5 ms
per check, so the 10,000 keys run at 72 requests/hour each, well inside every tier,
however fast the machine.

Ratios come from interleaved rounds (see ``bench/_interleave.py``), never from
comparing two pytest-benchmark rows measured at different moments; they are
printed and recorded in ``benchmark.extra_info``, and never asserted.
"""

from __future__ import annotations

import gc
import itertools
import os
import random
import sys
import threading
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pytest

import meterkit
from meterkit import MemoryBackend, Meter, Policy, Tier

if __package__ in (None, ""):  # run as a script: python bench/bench_core.py --profile
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._interleave import Interleaved, interleave, time_ops

QUICK = os.environ.get("METERKIT_BENCH_QUICK", "") not in ("", "0")

OPERATION = "invoices.list"
KEYS = 10_000
KEYS_PER_ORG = 100
#: Each key is seen once per this many simulated seconds (72/hour, 1.2/minute);
#: with 100 keys per org, each org twice a second (7,200/hour): all tiers admit.
KEY_PERIOD_S = 50.0
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
SEED = 2026

ROUNDS = 15 if QUICK else 31  # quick: 7 rounds swung the CI median by ±10%
# Rounds of 20 ms read meterkit ~10% slower than rounds of 30 ms (each switch of side
# starts with cold caches, which weighs most on the fastest side): 30 ms in both modes.
ROUND_SECONDS = 0.03
MEMORY_IDENTITIES = 10_000 if QUICK else 100_000
FLAT_SIZES = (1_000, 100_000, 200_000) if QUICK else (1_000, 100_000, 1_000_000)
FLAT_AMORTIZE_MIN = 100_000 if QUICK else 300_000

pytestmark = pytest.mark.benchmark(
    min_time=0.0002, max_time=0.2 if QUICK else 1.0, min_rounds=5, warmup=False
)

Report = Callable[[str], None]


# -- the workload ---------------------------------------------------------------------


@cache
def traffic(n_keys: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(warm-up order, timed order) of ``n_keys`` (key, org) pairs, every key once in each."""
    pool = [(f"key_{i:07d}", f"org_{i // KEYS_PER_ORG:05d}") for i in range(n_keys)]
    timed = pool[:]
    random.Random(SEED).shuffle(timed)
    return pool, timed


def sim_clock(n_keys: int) -> Callable[[], float]:
    """UNIX seconds that advance by one step per read: each key comes every KEY_PERIOD_S."""
    return itertools.count(T0, KEY_PERIOD_S / n_keys).__next__


@dataclass
class Side:
    """One implementation, ready to run: ``run()`` checks the next request of the traffic.

    ``fresh()`` gives it new, warmed-up state (every key seen once), outside any timing:
    the default-clock ratio calls it before each round, so that no side spends the run
    being denied (a denial costs less than an admission on every side)."""

    name: str
    run: Callable[[], None]
    fresh: Callable[[], None]
    denied: list[int] = field(default_factory=lambda: [0])


def meterkit_side(
    n_keys: int = KEYS, *, headers: bool = False, default_clock: bool = False, ledger: bool = False
) -> Side:
    """The seed policy on MemoryBackend; reads ``.allowed`` (and ``.headers`` if asked).
    Its clock is the simulated one, or with ``default_clock`` the default
    (``time.time``), as a user gets it. With ``ledger``, the backend keeps a ledger
    (``MemoryBackend(ledger=True)``), emptied before each round, untimed, as a drain
    in the same process would keep it."""
    warm, timed = traffic(n_keys)
    nxt = itertools.cycle(timed).__next__
    denied = [0]
    check: Callable[..., Any]

    def fresh() -> None:
        nonlocal check
        clock = None if default_clock else sim_clock(n_keys)
        backend = MemoryBackend(clock, ledger=ledger)
        check = Meter(Policy.crane_ledger(), backend).check
        for key, org in warm:
            check(key, org=org, operation=OPERATION)
        if backend.ledger is not None:
            log = backend.ledger

            def drained() -> None:  # (what a drain does between rounds, untimed)
                log.entries.clear()

            sides_fresh[0] = drained

    sides_fresh: list[Callable[[], None]] = [fresh]
    fresh()
    if headers:

        def run() -> None:
            key, org = nxt()
            decision = check(key, org=org, operation=OPERATION)
            decision.headers  # noqa: B018 - reading it is the work being measured
            if not decision.allowed:
                denied[0] += 1

    else:

        def run() -> None:
            key, org = nxt()
            if not check(key, org=org, operation=OPERATION).allowed:
                denied[0] += 1

    name = "meterkit+headers" if headers else "meterkit+ledger" if ledger else "meterkit"
    return Side(name, run, sides_fresh[0], denied)


def planned_policy() -> Policy:
    """The seed policy with a plan "pro" that raises every tier and the allowance."""
    seed = Policy.crane_ledger()
    pro = meterkit.CustomerPlan(
        "pro",
        {"key-hour": "5000/hour", "org-hour": "50000/hour", "key-burst": "300/minute"},
        allowance="50000",
    )
    return Policy(
        seed.tiers, seed.costs, seed.credits, name=seed.name, routes=seed.routes, plans=[pro]
    )


def plan_side(n_keys: int = KEYS, *, assigned: bool) -> Side:
    """The seed policy with a plan, on MemoryBackend with the simulated clock: every
    organization on the plan (``assigned``), or on the default plan while some other
    organization is on the plan (so the backend looks each one up)."""
    warm, timed = traffic(n_keys)
    nxt = itertools.cycle(timed).__next__
    denied = [0]
    check: Callable[..., Any]
    policy = planned_policy()

    def fresh() -> None:
        nonlocal check
        meter = Meter(policy, MemoryBackend(clock=sim_clock(n_keys)))
        meter.set_plan("org_elsewhere", "pro")
        if assigned:
            for org in sorted({org for _, org in warm}):
                meter.set_plan(org, "pro")
        check = meter.check
        for key, org in warm:
            check(key, org=org, operation=OPERATION)

    fresh()

    def run() -> None:
        key, org = nxt()
        if not check(key, org=org, operation=OPERATION).allowed:
            denied[0] += 1

    return Side("meterkit plan" if assigned else "meterkit default plan", run, fresh, denied)


def limits_side(n_keys: int = KEYS) -> Side:
    """limits: three fixed windows on MemoryStorage, test all then hit all."""
    import limits
    from limits.storage import MemoryStorage
    from limits.strategies import FixedWindowRateLimiter

    warm, timed = traffic(n_keys)
    key_hour, org_hour = limits.parse("1000/hour"), limits.parse("10000/hour")
    key_burst = limits.parse("100/minute")
    denied = [0]
    test: Callable[..., bool]
    hit: Callable[..., bool]

    def check(key: str, org: str) -> bool:
        if test(key_hour, key) and test(org_hour, org) and test(key_burst, key):
            hit(key_hour, key)
            hit(org_hour, org)
            hit(key_burst, key)
            return True
        return False

    def fresh() -> None:
        nonlocal test, hit
        limiter = FixedWindowRateLimiter(MemoryStorage())
        test, hit = limiter.test, limiter.hit
        for key, org in warm:
            check(key, org)

    fresh()
    nxt = itertools.cycle(timed).__next__

    def run() -> None:
        key, org = nxt()
        if not check(key, org):
            denied[0] += 1

    return Side("limits", run, fresh, denied)


def throttled_side(n_keys: int = KEYS) -> Side:
    """throttled-py: three GCRA limiters on one MemoryStore, each limited in turn."""
    from throttled import RateLimiterType, Throttled, rate_limiter, store

    warm, timed = traffic(n_keys)
    gcra = RateLimiterType.GCRA.value
    denied = [0]
    key_hour: Callable[[str], Any]
    org_hour: Callable[[str], Any]
    key_burst: Callable[[str], Any]

    def fresh() -> None:
        nonlocal key_hour, org_hour, key_burst
        # The default store is an LRU of 1024 entries: it would evict live state.
        mem = store.MemoryStore(options={"MAX_SIZE": 4 * n_keys + 1024})

        def limiter(quota: Any, prefix: str) -> Callable[[str], Any]:
            return Throttled(using=gcra, quota=quota, store=mem, key_prefix=prefix).limit

        key_hour = limiter(rate_limiter.per_hour(1000), "key-hour")
        org_hour = limiter(rate_limiter.per_hour(10000), "org-hour")
        key_burst = limiter(rate_limiter.per_min(100), "key-burst")
        for key, org in warm:
            key_hour(key), org_hour(org), key_burst(key)

    fresh()
    nxt = itertools.cycle(timed).__next__

    def run() -> None:
        key, org = nxt()
        if key_hour(key).limited or org_hour(org).limited or key_burst(key).limited:
            denied[0] += 1

    return Side("throttled-py", run, fresh, denied)


def floor_side(n_keys: int = KEYS) -> Side:
    """Four dict increments (three tiers, the credits) under one lock."""
    warm, timed = traffic(n_keys)
    lock = threading.Lock()
    key_hour: dict[str, int]
    org_hour: dict[str, int]
    key_burst: dict[str, int]
    credits: dict[str, int]

    def check(key: str, org: str) -> None:
        with lock:
            key_hour[key] = key_hour.get(key, 0) + 1
            org_hour[org] = org_hour.get(org, 0) + 1
            key_burst[key] = key_burst.get(key, 0) + 1
            credits[org] = credits.get(org, 0) + 10_000

    def fresh() -> None:
        nonlocal key_hour, org_hour, key_burst, credits
        key_hour, org_hour, key_burst, credits = {}, {}, {}, {}
        for key, org in warm:
            check(key, org)

    fresh()
    nxt = itertools.cycle(timed).__next__

    def run() -> None:
        key, org = nxt()
        check(key, org)

    return Side("floor", run, fresh)


def _assert_admitted(side: Side, figures: Report) -> None:
    """meterkit's workload is deterministic: a denial means the benchmark measures the
    wrong path. The peers read the real clock; their denials are only reported."""
    if side.denied[0]:
        figures(f"NOTE {side.name}: {side.denied[0]} checks denied during the benchmark")
    if side.name.startswith("meterkit"):
        assert side.denied[0] == 0, f"{side.name} was denied {side.denied[0]} times"


# -- one implementation at a time (the pytest-benchmark table) ----------------------------


def test_floor_four_increments_under_lock(benchmark: Any) -> None:
    """Time four dict increments under one lock: the floor of any Python implementation."""
    side = floor_side()
    benchmark(side.run)


def test_meterkit_check(benchmark: Any, figures: Report) -> None:
    """Time meterkit's full seed check on MemoryBackend, reading ``Decision.allowed``."""
    side = meterkit_side()
    benchmark(side.run)
    _assert_admitted(side, figures)


def test_meterkit_check_headers(benchmark: Any, figures: Report) -> None:
    """Time meterkit's full seed check and the rendering of its HTTP headers."""
    side = meterkit_side(headers=True)
    benchmark(side.run)
    _assert_admitted(side, figures)


def test_limits_three_fixed_windows(benchmark: Any, figures: Report) -> None:
    """Time limits (MemoryStorage, fixed windows) testing then hitting three limits."""
    side = limits_side()
    benchmark(side.run)
    _assert_admitted(side, figures)


def test_throttled_three_gcra(benchmark: Any, figures: Report) -> None:
    """Time throttled-py limiting three GCRA limiters on its MemoryStore."""
    side = throttled_side()
    benchmark(side.run)
    _assert_admitted(side, figures)


# -- interleaved ratios ---------------------------------------------------------------------


def run_ratios(
    rounds: int = ROUNDS,
    round_seconds: float = ROUND_SECONDS,
    n_keys: int = KEYS,
    default_clock: bool = False,
) -> tuple[Interleaved, list[Side]]:
    """Build every side afresh and run them in interleaved rounds."""
    sides = [
        meterkit_side(n_keys, default_clock=default_clock),
        meterkit_side(n_keys, headers=True, default_clock=default_clock),
        limits_side(n_keys),
        throttled_side(n_keys),
        floor_side(n_keys),
    ]
    candidates = {s.name: s.run for s in sides}
    # On the default clock, state is made afresh before every round: the rounds of the
    # fastest side would otherwise run its keys past their 100/minute and be denied.
    fresh = {s.name: s.fresh for s in sides} if default_clock else None
    result = interleave(candidates, rounds=rounds, round_seconds=round_seconds, before_round=fresh)
    return result, sides


def test_ratio_interleaved(benchmark: Any, figures: Report) -> None:
    """Print meterkit's speed-up over limits and throttled-py, from interleaved rounds."""
    result, sides = benchmark.pedantic(run_ratios, rounds=1, iterations=1)
    figures(f"interleaved rounds (µs per check), {'quick' if QUICK else 'full'} mode:")
    figures(result.table())
    lines = [
        ("limits", "meterkit", "meterkit/limits memory", 4.0),
        ("throttled-py", "meterkit", "meterkit/throttled-py memory", 3.5),
        ("limits", "meterkit+headers", "meterkit+headers/limits memory", None),
        ("throttled-py", "meterkit+headers", "meterkit+headers/throttled-py memory", None),
    ]
    for slow, fast, label, target in lines:
        ratio = result.ratio(slow, fast)
        note = ""
        if target is not None:
            note = f"  [target >= {target:g}x: {'met' if ratio >= target else 'NOT met'}]"
        figures(result.ratio_line(slow, fast, label) + note)
        benchmark.extra_info[f"ratio {label}"] = round(ratio, 3)
    floor = result.ratio("meterkit", "floor")
    figures(f"FLOOR meterkit costs {floor:.2f}x the floor (four dict increments under a lock)")
    benchmark.extra_info["meterkit/floor"] = round(floor, 3)
    for name in result.names:
        benchmark.extra_info[f"{name} µs/check (median)"] = round(result.median_us(name), 3)
    for side in sides:
        _assert_admitted(side, figures)


def run_plan_ratios(
    rounds: int = ROUNDS, round_seconds: float = ROUND_SECONDS
) -> tuple[Interleaved, list[Side]]:
    """A check with no plans in the policy, under the default plan of a policy with
    plans, and under an assigned plan, interleaved."""
    sides = [meterkit_side(), plan_side(assigned=False), plan_side(assigned=True)]
    result = interleave({s.name: s.run for s in sides}, rounds=rounds, round_seconds=round_seconds)
    return result, sides


def test_ratio_plans(benchmark: Any, figures: Report) -> None:
    """Print what plans cost a check: under an assigned plan against the default plan
    (target: within 1.15x), and the default plan of a policy with plans against a
    policy without any."""
    result, sides = benchmark.pedantic(run_plan_ratios, rounds=1, iterations=1)
    figures(f"plans, interleaved rounds (µs per check), {'quick' if QUICK else 'full'} mode:")
    figures(result.table())
    plan = result.ratio("meterkit plan", "meterkit default plan")
    met = "met" if plan <= 1.15 else "NOT met"
    figures(
        f"RATIO plan/default plan memory: {plan:.3f}x the time of a default-plan check "
        f"(median of {result.rounds} rounds)  [target <= 1.15x: {met}]"
    )
    unused = result.ratio("meterkit default plan", "meterkit")
    figures(
        f"RATIO default plan/no plans memory: {unused:.3f}x the time of a check with no "
        f"plans in the policy (median of {result.rounds} rounds)"
    )
    benchmark.extra_info["plan/default plan memory"] = round(plan, 3)
    benchmark.extra_info["default plan/no plans memory"] = round(unused, 3)
    for side in sides:
        _assert_admitted(side, figures)


def test_ratio_ledger(benchmark: Any, figures: Report) -> None:
    """Print what the memory ledger costs a check: with ``MemoryBackend(ledger=True)``
    against without (emptied before each round, untimed, as a drain would keep it)."""

    def run() -> tuple[Interleaved, list[Side]]:
        sides = [meterkit_side(), meterkit_side(ledger=True)]
        fresh = {sides[1].name: sides[1].fresh}  # (the log emptied; the state goes on)
        result = interleave(
            {s.name: s.run for s in sides},
            rounds=ROUNDS,
            round_seconds=ROUND_SECONDS,
            before_round=fresh,
        )
        return result, sides

    result, sides = benchmark.pedantic(run, rounds=1, iterations=1)
    figures(f"ledger, interleaved rounds (µs per check), {'quick' if QUICK else 'full'} mode:")
    figures(result.table())
    ratio = result.ratio("meterkit+ledger", "meterkit")
    figures(
        f"RATIO ledger/no ledger memory: {ratio:.3f}x the time of a check without the "
        f"ledger (median of {result.rounds} rounds)"
    )
    benchmark.extra_info["ledger/no ledger memory"] = round(ratio, 3)
    for side in sides:
        _assert_admitted(side, figures)


DEFAULT_CLOCK_KEYS = 2_000  # in 20 organizations


def test_ratio_default_clock(benchmark: Any, figures: Report) -> None:
    """The same sides as :func:`test_ratio_interleaved`, 2,000 keys in 20 organizations,
    every side on the default clock (``time.time``): what a user gets. Each side gets
    fresh, warmed-up state before each round (untimed), so that every check of the
    run is an admission, on every side: run back to back, the fastest side ran its
    keys past 100/minute and was measured on cheaper denials."""
    result, sides = benchmark.pedantic(
        lambda: run_ratios(n_keys=DEFAULT_CLOCK_KEYS, default_clock=True),
        rounds=1,
        iterations=1,
    )
    figures(f"default clock, {DEFAULT_CLOCK_KEYS:,} keys in 20 orgs (µs per check):")
    figures(result.table())
    for slow, target in (("limits", 4.0), ("throttled-py", 3.5)):
        ratio = result.ratio(slow, "meterkit")
        met = "met" if ratio >= target else "NOT met"
        figures(
            result.ratio_line(slow, "meterkit", f"meterkit/{slow} memory, default clock")
            + f"  [target >= {target:g}x: {met}]"
        )
        benchmark.extra_info[f"ratio meterkit/{slow} default clock"] = round(ratio, 3)
    for side in sides:
        _assert_admitted(side, figures)


# -- memory per identity-tier ----------------------------------------------------------------


class StepClock:
    """A clock that moves only when told: UNIX seconds."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _one_tier_policy(algorithm: str | None) -> Policy:
    seed = Policy.crane_ledger()
    tiers = [] if algorithm is None else [Tier("t", "key", "1000/hour", algorithm)]  # type: ignore[arg-type]
    return Policy(tiers, seed.costs, seed.credits)


@cache
def traced_bytes(policy: Policy | None, n: int, window_s: float = 3600.0) -> int:
    """Bytes that ``n`` keys (100 per org) leave behind: each seen twice, one window apart.

    ``None`` is the policy without tiers (the baseline: accounts and usage records).
    Two visits one window apart is the steady state of an identity active in every
    window (a sliding window then holds it in both its counters). The ids are
    created before tracing starts: an id is the caller's string, shared by all of
    its tiers. Every check must be admitted, or the figure would be meaningless.
    """
    policy = policy if policy is not None else _one_tier_policy(None)
    clock = StepClock()
    meter = Meter(policy, MemoryBackend(clock=clock))
    pairs = [(f"key_{i:07d}", f"org_{i // KEYS_PER_ORG:05d}") for i in range(n)]
    check = meter.check
    check("warm-up", org="org_00000", operation=OPERATION)  # tier states, the period
    denied = 0
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for pass_ in range(2):
            for key, org in pairs:
                clock.now += 1e-4
                denied += not check(key, org=org, operation=OPERATION).allowed
            if pass_ == 0:
                clock.now += window_s
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert denied == 0, f"{denied} of {2 * n} checks denied: the figure would be wrong"
    return used


@pytest.mark.parametrize("algorithm", ["fixed_window", "sliding_window", "gcra", "sliding_log"])
def test_memory_per_identity_tier(benchmark: Any, figures: Report, algorithm: str) -> None:
    """Print the traced bytes per identity-tier of each algorithm (100k identities)."""
    n = MEMORY_IDENTITIES

    def measure() -> tuple[int, int]:
        return traced_bytes(_one_tier_policy(algorithm), n), traced_bytes(None, n)

    with_tier, without = benchmark.pedantic(measure, rounds=1, iterations=1)
    per = (with_tier - without) / n
    extra = " (keeps one timestamp per admitted request; reported apart)" * (
        algorithm == "sliding_log"
    )
    figures(
        f"MEMORY {algorithm}: {per:.0f} bytes per active identity-tier "
        f"({n:,} identities, tracemalloc){extra}"
    )
    benchmark.extra_info["bytes per identity-tier"] = round(per, 1)
    benchmark.extra_info["identities"] = n


def test_memory_seed_policy_per_key(benchmark: Any, figures: Report) -> None:
    """Print the traced bytes per key of the seed policy: three tiers and the usage record."""
    n = MEMORY_IDENTITIES
    total = benchmark.pedantic(
        traced_bytes, args=(Policy.crane_ledger(), n), rounds=1, iterations=1
    )
    big = sys.getsizeof(1000)
    figures(
        f"MEMORY seed policy: {total / n:.0f} bytes per key (key-hour, org-hour, key-burst "
        f"and the key's usage record, plus its share of the org's state; {n:,} keys, 100 per "
        f"org). Counters here are small; a count past 256 is its own int object ({big} bytes)."
    )
    benchmark.extra_info["bytes per key"] = round(total / n, 1)


# -- flatness: cost per check against the number of distinct keys -------------------------------


@cache
def flat_side(n_keys: int) -> Side:
    return meterkit_side(n_keys)


def _size(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1_000}k"


@pytest.mark.parametrize("n_keys", FLAT_SIZES, ids=_size)
def test_flat_meterkit_check(benchmark: Any, figures: Report, n_keys: int) -> None:
    """Time meterkit's seed check with this many distinct, active keys."""
    side = flat_side(n_keys)
    benchmark(side.run)
    benchmark.extra_info["distinct keys"] = n_keys
    _assert_admitted(side, figures)


def test_flat_interleaved(benchmark: Any, figures: Report) -> None:
    """Print the cost per check at each key count relative to 1k keys, from interleaved rounds."""
    sides = {_size(n): flat_side(n) for n in FLAT_SIZES}
    small, large = _size(FLAT_SIZES[0]), _size(FLAT_SIZES[-1])
    # The same traffic through four bare dicts: how much of the slope is the machine's.
    floors = {
        f"floor {small}": floor_side(FLAT_SIZES[0]),
        f"floor {large}": floor_side(FLAT_SIZES[-1]),
    }

    def measure() -> Interleaved:
        return interleave(
            {name: s.run for name, s in {**sides, **floors}.items()},
            rounds=ROUNDS,
            round_seconds=ROUND_SECONDS,
        )

    result = benchmark.pedantic(measure, rounds=1, iterations=1)
    figures("flatness (µs per check by distinct keys, interleaved):")
    figures(result.table())
    for n in FLAT_SIZES[1:]:
        big = _size(n)
        ratio = result.ratio(big, small)
        figures(
            f"FLAT meterkit {big} keys / {small} keys: {ratio:.2f}x the cost per check "
            f"(median of {result.rounds} rounds; 1.00 is flat)"
        )
        benchmark.extra_info[f"{big}/{small}"] = round(ratio, 3)
    if len(FLAT_SIZES) > 2:
        # Past the CPU caches the slope is what is left of any per-key cost.
        mid = _size(FLAT_SIZES[-2])
        ratio = result.ratio(large, mid)
        figures(
            f"FLAT meterkit {large} keys / {mid} keys: {ratio:.2f}x the cost per check "
            f"(median of {result.rounds} rounds)"
        )
        benchmark.extra_info[f"{large}/{mid}"] = round(ratio, 3)
    floor = result.ratio(f"floor {large}", f"floor {small}")
    figures(
        f"FLAT floor {large} keys / {small} keys: {floor:.2f}x (four dict increments; "
        "the part of the slope any dict-based implementation pays in memory latency)"
    )
    benchmark.extra_info[f"floor {large}/{small}"] = round(floor, 3)
    # Short rounds show a typical check; state sweeps (amortized O(1), one pass over a
    # tier's dict every few len(dict) commits) land in few of them. One long run per size
    # shows the amortized cost, sweeps and window turns included.
    amortized = []
    for n in FLAT_SIZES:
        checks = max(n, FLAT_AMORTIZE_MIN)
        took = time_ops(sides[_size(n)].run, checks)
        amortized.append(f"{_size(n)} {took / checks * 1e6:.2f}")
        benchmark.extra_info[f"amortized µs {_size(n)}"] = round(took / checks * 1e6, 3)
    figures(
        "FLAT amortized µs per check over one run of max(keys, "
        f"{FLAT_AMORTIZE_MIN:,}) checks, sweeps included: " + ", ".join(amortized)
    )
    if QUICK:
        figures("FLAT quick mode: the 1M-key size is reduced to 200k (METERKIT_BENCH_QUICK=1)")
    for side in sides.values():
        _assert_admitted(side, figures)


# -- where the time goes (python bench/bench_core.py --profile) --------------------------------


def profile(checks: int = 200_000) -> None:
    """Print the cost of each stage of one check (interleaved), then a cProfile table."""
    import cProfile
    import pstats

    from meterkit import Decision, Plan

    warm, timed = traffic(KEYS)
    policy = Policy.crane_ledger()
    backend = MemoryBackend(clock=sim_clock(KEYS))
    meter = Meter(policy, backend)
    for key, org in warm:
        meter.check(key, org=org, operation=OPERATION)
    op = policy.plan_for(OPERATION)
    nxt = itertools.cycle(timed).__next__
    plans = itertools.cycle([Plan(policy, op, k, o, "live", op.price, None) for k, o in timed])
    next_plan = plans.__next__
    decision = meter.check("key_0000000", org="org_00000", operation=OPERATION)
    outcome = decision.outcome
    plan_of = meter._plan
    apply = backend.apply
    check = meter.check

    def traffic_only() -> None:
        nxt()

    def validate_and_plan() -> None:
        key, org = nxt()
        plan_of(key, org, OPERATION, None, None, "live")

    def backend_apply() -> None:
        apply(next_plan())

    def decision_only() -> None:
        Decision(decision.request, outcome)

    def headers_only() -> None:
        Decision(decision.request, outcome).headers  # noqa: B018

    def full_check() -> None:
        key, org = nxt()
        check(key, org=org, operation=OPERATION).allowed  # noqa: B018

    stages = {
        "traffic loop only": traffic_only,
        "Meter._plan (validate, build Plan)": validate_and_plan,
        "MemoryBackend.apply": backend_apply,
        "Decision(plan, outcome)": decision_only,
        "Decision + .headers": headers_only,
        "Meter.check + .allowed": full_check,
    }
    result = interleave(stages, rounds=ROUNDS, round_seconds=ROUND_SECONDS)
    print(f"meterkit {meterkit.__version__}, Python {sys.version.split()[0]}: stages of one check")
    print(result.table())
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [full_check() for _ in range(checks)])
    print(f"\ncProfile of {checks:,} checks (cProfile inflates call-heavy code):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(14)


# -- pauses (python bench/bench_core.py --pauses) ------------------------------------------


def _flood(keys: int) -> list[float]:
    """Each of ``keys`` first checks (each a new key, 10,000 organizations) on the seed
    policy with the default clock, timed one by one (seconds)."""
    import time

    meter = Meter(Policy.crane_ledger(), MemoryBackend())
    check = meter.check
    clock = time.perf_counter
    took = []
    for i in range(keys):
        key, org = f"key_{i:07d}", f"org_{i % 10_000:05d}"
        start = clock()
        check(key, org=org, operation="invoices.list")
        took.append(clock() - start)
    return took


def _longest(took: list[float], n: int = 5) -> str:
    worst = sorted(range(len(took)), key=took.__getitem__)[-n:][::-1]
    return ", ".join(f"{took[i] * 1e3:.2f} ms (key {i:,})" for i in worst)


def pauses(keys: int = 1_000_000) -> None:
    """The longest checks while ``keys`` new keys arrive (issue 11: at most 5 ms), with
    Python's garbage collector off (meterkit's own work: growing, sweeping and dropping
    its state) and on (what a user gets by default); then one full collection over the
    state, before and after ``gc.freeze()``."""
    import time

    gc.collect()
    gc.disable()
    try:
        took = _flood(keys)
    finally:
        gc.enable()
    print(f"PAUSES {keys:,} new keys, the seed policy, default clock")
    print(f"  gc off: longest {_longest(took)}; over 5 ms: {sum(t > 0.005 for t in took)}")
    gc.collect()
    took = _flood(keys)
    print(f"  gc on:  longest {_longest(took)}; over 5 ms: {sum(t > 0.005 for t in took)}")
    meter = Meter(Policy.crane_ledger(), MemoryBackend())
    for i in range(keys):
        meter.check(f"key_{i:07d}", org=f"org_{i % 10_000:05d}", operation="invoices.list")
    start = time.perf_counter()
    gc.collect()
    full = (time.perf_counter() - start) * 1e3
    gc.freeze()
    start = time.perf_counter()
    gc.collect()
    frozen = (time.perf_counter() - start) * 1e3
    gc.unfreeze()
    print(
        f"  a full gc.collect() over that state: {full:.1f} ms; after gc.freeze(): {frozen:.1f} ms"
    )


if __name__ == "__main__":
    if "--profile" in sys.argv:
        profile()
    elif "--pauses" in sys.argv:
        pauses()
    else:
        print(__doc__)
