"""Each algorithm's promise, checked by Hypothesis on a fake microsecond clock.

The promises (DESIGN.md): fixed_window admits at most ``limit`` per aligned UTC window;
sliding_log at most ``limit`` in every rolling window of length W; gcra at most
``burst + d // T`` over any interval of length d (T the emission interval); and
sliding_window at most ``limit`` per aligned window with its weighted estimate never
above ``limit``. Besides the promises, each request's verdict and ``retry_after`` are
compared with a small model computed from the admitted history alone, and a denied
request must change nothing at all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import given, settings, target
from hypothesis import strategies as st

from meterkit import Category, CostTable, CreditPlan, MemoryBackend, Meter, Operation, Policy, Tier
from tests.conftest import FakeClock

US = 1_000_000
HOUR = 3600 * US
BASE_US = 1_767_225_600 * US  # 2026-01-01T00:00:00Z
ALGORITHMS = ("fixed_window", "sliding_window", "gcra", "sliding_log")


def _at(clock: FakeClock, t: int) -> None:
    clock.now = (BASE_US + t) / US


def _free_policy(tier: Tier) -> Policy:
    costs = CostTable((Category("free", "0", "0"),), (Operation("op", "free", "0"),))
    return Policy([tier], costs, CreditPlan("0"))


# -- a model of each algorithm, from the admitted history ----------------------------------


def admits(tier: Tier, history: Sequence[int], now: int) -> bool:
    """Whether ``tier`` admits one more request at ``now`` after ``history`` was admitted."""
    w, limit = tier.window_us, tier.limit
    if tier.algorithm == "fixed_window":
        return sum(1 for h in history if h // w == now // w) < limit
    if tier.algorithm == "sliding_log":
        return sum(1 for h in history if h > now - w) < limit
    if tier.algorithm == "sliding_window":
        cur = sum(1 for h in history if h // w == now // w)
        prev = sum(1 for h in history if h // w == now // w - 1)
        return prev * (w - now % w) + (cur + 1) * w <= limit * w
    interval = tier.interval_us
    tat = None
    for h in history:
        tat = (h if tat is None or tat < h else tat) + interval
    start = now if tat is None or tat < now else tat
    return start + interval - now <= tier.capacity * interval


def earliest(tier: Tier, history: Sequence[int], now: int) -> int:
    """The fewest µs after ``now`` at which ``tier`` admits again (binary search)."""
    lo, hi = 0, 4 * tier.window_us + (tier.capacity + 1) * tier.interval_us
    assert admits(tier, history, now + hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if admits(tier, history, now + mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


# -- single-tier traces -----------------------------------------------------------------------


@st.composite
def tiers(draw: st.DrawFn, algorithm: str | None = None) -> Tier:
    algorithm = algorithm or draw(st.sampled_from(ALGORITHMS))
    limit = draw(st.integers(1, 6))
    window = draw(st.sampled_from([1, 2, 5, 60]))
    burst = draw(st.none() | st.integers(1, 6)) if algorithm == "gcra" else None
    return Tier("t", "key", f"{limit} per {window} seconds", algorithm, burst)  # type: ignore[arg-type]


Step = tuple[str, int]


def _steps(window_us: int, limit: int) -> st.SearchStrategy[list[Step]]:
    gap = st.one_of(
        st.just(0),
        st.integers(1, 2 * window_us // limit),
        st.integers(0, 2 * window_us),
    )
    step = st.one_of(
        gap.map(lambda g: ("gap", g)),
        st.sampled_from([("exact", 0), ("early", 0)]),
    )
    return st.lists(step, min_size=10, max_size=60)


@st.composite
def single_tier_traces(
    draw: st.DrawFn, algorithm: str | None = None
) -> tuple[Tier, int, list[Step]]:
    tier = draw(tiers(algorithm))
    start = draw(st.integers(0, tier.window_us))
    return tier, start, draw(_steps(tier.window_us, tier.limit))


def _run(tier: Tier, start: int, steps: list[Step]) -> list[tuple[int, bool, int]]:
    """Run a trace on a fresh meter; check every verdict and retry against the model.

    ``exact`` re-sends the last denied request after exactly its retry_after, ``early``
    one microsecond sooner; nothing else arrives in between.
    """
    clock = FakeClock()
    meter = Meter(_free_policy(tier), MemoryBackend(clock=clock))
    t = start
    admitted: list[int] = []
    trace: list[tuple[int, bool, int]] = []
    last_denial: tuple[int, int] | None = None
    for kind, gap in steps:
        expect: bool | None = None
        if kind == "gap" or last_denial is None:
            t += gap
        else:
            t = last_denial[0] + last_denial[1] - (kind == "early")
            expect = kind == "exact"
        _at(clock, t)
        now = BASE_US + t
        model = admits(tier, admitted, now)
        d = meter.check("k", org="o", operation="op")
        retry = round(d.retry_after * US)
        assert d.allowed == model, (kind, t)
        if expect is not None:
            assert d.allowed == expect, f"{kind} retry at {t} µs"
        if d.allowed:
            admitted.append(now)
            assert retry == 0
            last_denial = None
        else:
            assert retry == earliest(tier, admitted, now)
            assert d.error is not None
            assert d.error["error"]["retry_after"] == -(-retry // US)
            last_denial = (t, retry)
        trace.append((now, d.allowed, retry))
    return trace


@given(single_tier_traces())
def test_each_algorithm_matches_its_model_and_retry_after_is_exact(
    case: tuple[Tier, int, list[Step]],
) -> None:
    """Every verdict equals the model's; retry_after is the earliest admitting instant."""
    _run(*case)


def _admitted(case: tuple[Tier, int, list[Step]]) -> list[int]:
    return [t for t, ok, _ in _run(*case) if ok]


@given(single_tier_traces("fixed_window"))
def test_fixed_window_admits_at_most_limit_per_aligned_window(
    case: tuple[Tier, int, list[Step]],
) -> None:
    """fixed_window: no UTC-aligned window ever holds more than ``limit`` admitted requests."""
    tier = case[0]
    per_window = Counter(t // tier.window_us for t in _admitted(case))
    assert all(n <= tier.limit for n in per_window.values())


@given(single_tier_traces("sliding_log"))
def test_sliding_log_admits_at_most_limit_in_every_rolling_window(
    case: tuple[Tier, int, list[Step]],
) -> None:
    """sliding_log: any window [t, t+W) holds at most ``limit`` admitted requests."""
    tier = case[0]
    times = _admitted(case)
    j = 0
    for i in range(len(times)):
        while j < len(times) and times[j] - times[i] < tier.window_us:
            j += 1
        assert j - i <= tier.limit


@given(single_tier_traces("gcra"))
def test_gcra_admits_at_most_burst_plus_elapsed_over_interval(
    case: tuple[Tier, int, list[Step]],
) -> None:
    """gcra: over any interval of length d at most burst + d // T requests are admitted."""
    tier = case[0]
    times = _admitted(case)
    for i in range(len(times)):
        for j in range(i, len(times)):
            d = times[j] - times[i]
            assert j - i + 1 <= tier.capacity + d // tier.interval_us
            # T is rounded up, so the nominal rate bounds it too.
            assert (j - i + 1 - tier.capacity) * tier.window_us <= d * tier.limit


@given(single_tier_traces("sliding_window"))
def test_sliding_window_estimate_never_exceeds_limit(case: tuple[Tier, int, list[Step]]) -> None:
    """sliding_window: at most ``limit`` per aligned window, and the weighted estimate ≤ limit."""
    tier = case[0]
    w, limit = tier.window_us, tier.limit
    times = _admitted(case)
    assert all(n <= limit for n in Counter(t // w for t in times).values())
    for i, t in enumerate(times):
        upto = times[: i + 1]
        cur = sum(1 for h in upto if h // w == t // w)
        prev = sum(1 for h in upto if h // w == t // w - 1)
        assert prev * (w - t % w) + cur * w <= limit * w  # prev·(W−e)/W + cur ≤ limit


# -- many tiers and credits: all or nothing --------------------------------------------------

KEYS = {"k1": "org_a", "k2": "org_a", "k3": "org_b"}


def _multi_policy() -> Policy:
    costs = CostTable(
        (Category("read", "0.01", "0.01"), Category("write", "0.03", "0.15")),
        (Operation("items.list", "read", "0.01"), Operation("items.create", "write", "0.05")),
    )
    tiers = [
        Tier("k-fixed", "key", "3 per 10 seconds", "fixed_window"),
        Tier("o-sliding", "org", "5 per 10 seconds", "sliding_window"),
        Tier("k-gcra", "key", "2 per 4 seconds", "gcra", burst=3),
        Tier("o-log", "org", "4 per 6 seconds", "sliding_log", operations=("items.create",)),
    ]
    return Policy(tiers, costs, CreditPlan("0.3"))


Request = tuple[str, str, "str | None", str]  # key, operation, cost, mode
MultiStep = tuple[str, int, Request]

requests = st.tuples(
    st.sampled_from(sorted(KEYS)),
    st.sampled_from(["items.list", "items.create"]),
    st.sampled_from([None, None, "0", "0.2"]),
    st.sampled_from(["live", "live", "test"]),
)
multi_steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("gap"),
            st.one_of(st.just(0), st.integers(0, 3 * US), st.integers(0, 12 * US)),
            requests,
        ),
        st.tuples(st.sampled_from(["exact", "early"]), st.just(0), requests),
    ),
    min_size=20,
    max_size=80,
)


def _check(meter: Meter, request: Request) -> Any:
    key, op, cost, mode = request
    return meter.check(key, org=KEYS[key], operation=op, cost=cost, mode=mode)  # type: ignore[arg-type]


def _same(outcome: tuple[Any, ...]) -> tuple[Any, ...]:
    """An outcome without its charge id (fresh per charge, so never equal across meters)."""
    return outcome[:8] + outcome[9:]


def _usage(meter: Meter) -> list[dict[str, Any]]:
    return [
        meter.usage(org, key=key, mode=mode).to_dict()
        for org in ("org_a", "org_b")
        for key in (None, *sorted(KEYS))
        for mode in ("live", "test")
    ]


@settings(max_examples=40)
@given(multi_steps)
def test_a_denied_check_changes_no_tier_and_no_balance(steps: list[MultiStep]) -> None:
    """A twin meter that never saw the denied requests decides everything else identically."""
    policy = _multi_policy()
    clock_a, clock_b = FakeClock(), FakeClock()
    full = Meter(policy, MemoryBackend(clock=clock_a))
    twin = Meter(policy, MemoryBackend(clock=clock_b))
    t = 0
    last_denial: tuple[int, int, Request] | None = None
    for kind, gap, request in steps:
        expect: bool | None = None
        if kind == "gap" or last_denial is None:
            t += gap
        else:
            t = last_denial[0] + last_denial[1] - (kind == "early")
            request = last_denial[2]
            expect = kind == "exact"
        _at(clock_a, t)
        d = _check(full, request)
        if expect is not None:
            assert d.allowed == expect, f"{kind} retry at {t} µs"
        if d.allowed:
            _at(clock_b, t)
            assert _same(_check(twin, request).outcome) == _same(d.outcome)
            last_denial = None
        else:
            assert d.charged == 0
            last_denial = (t, round(d.retry_after * US), request)
    # Both read at the same instant: a denied retry may have taken the full meter's
    # clock into the next month, where the twin (which saw no denial) has not been.
    _at(clock_b, t)
    assert _usage(full) == _usage(twin)
    for clock in (clock_a, clock_b):
        _at(clock, t + US)
    for probe in [
        (k, op, None, m)
        for k in sorted(KEYS)
        for op in ("items.create", "items.list")
        for m in ("live", "test")
    ]:
        assert _same(_check(full, probe).outcome) == _same(_check(twin, probe).outcome)


# -- the seed's promise -----------------------------------------------------------------------

SEED_KEYS = {f"key_{i:02}": ("org_a" if i < 14 else "org_b") for i in range(16)}


def _seed_meter() -> tuple[Meter, FakeClock]:
    clock = FakeClock()
    policy = Policy.crane_ledger()
    meter = Meter(policy, MemoryBackend(clock=clock))
    # Enough credits that only the rate limits speak.
    for org in ("org_a", "org_b"):
        meter.set_allowance(org, "1000000")
    return meter, clock


def _assert_seed_promise(admitted: list[tuple[int, str, str]]) -> None:
    """≤ 1000 per key per clock hour, ≤ 10000 per org per clock hour, ≤ 100 per key per 60 s."""
    per_key_hour = Counter((key, t // HOUR) for t, key, _ in admitted)
    per_org_hour = Counter((org, t // HOUR) for t, _, org in admitted)
    assert max(per_key_hour.values(), default=0) <= 1000
    assert max(per_org_hour.values(), default=0) <= 10000
    by_key: dict[str, list[int]] = {}
    for t, key, _ in admitted:
        by_key.setdefault(key, []).append(t)
    for times in by_key.values():
        j = 0
        for i in range(len(times)):
            while j < len(times) and times[j] - times[i] < 60 * US:
                j += 1
            assert j - i <= 100


# One step: wait some minutes, then from a few keys at once a burst of requests.
Burst = tuple[int, frozenset[str], int, int, int]

bursts = st.lists(
    st.tuples(
        st.integers(0, 3),  # minutes to wait
        st.frozensets(st.sampled_from(sorted(SEED_KEYS)), min_size=6),  # keys sending
        st.integers(1, 130),  # requests per key
        st.sampled_from([0, 1, 250_000, 590_000]),  # µs between requests
        st.integers(0, 59),  # second of the minute the burst starts at
    ),
    min_size=10,
    max_size=40,
)


@settings(max_examples=15)
@given(bursts)
def test_crane_ledger_keeps_the_seeds_literal_promise(steps: list[Burst]) -> None:
    """The seed policy never admits more than 1000/key or 10000/org per clock hour, 100/key/60 s."""
    meter, clock = _seed_meter()
    minute = 0
    t = 0
    admitted: list[tuple[int, str, str]] = []
    for wait, keys, count, spacing, second in steps:
        minute += wait
        t = max(t, minute * 60 * US + second * US)
        for _ in range(count):
            _at(clock, t)
            for key in sorted(keys):
                if meter.check(key, org=SEED_KEYS[key], operation="invoices.list").allowed:
                    admitted.append((BASE_US + t, key, SEED_KEYS[key]))
            t += spacing
        minute = t // (60 * US)
    _assert_seed_promise(admitted)
    per_org_hour = Counter((org, t // HOUR) for t, _, org in admitted)
    target(max(per_org_hour.values(), default=0), label="busiest org-hour")


def _drive(
    meter: Meter,
    clock: FakeClock,
    plan: Callable[[int], list[str]],
    minutes: int,
) -> list[tuple[int, str, str]]:
    """Each minute, send 100 requests spread over it from each key ``plan(minute)`` names."""
    admitted = []
    for minute in range(minutes):
        for i in range(100):
            t = minute * 60 * US + i * 500_000
            _at(clock, t)
            for key in plan(minute):
                if meter.check(key, org=SEED_KEYS[key], operation="invoices.list").allowed:
                    admitted.append((BASE_US + t, key, SEED_KEYS[key]))
    return admitted


def test_crane_ledger_limits_each_bind_exactly() -> None:
    """Pushed past each seed limit, the seed policy admits exactly up to it in the hour."""
    meter, clock = _seed_meter()
    # Twelve keys of org_a send 100 per minute for 11 minutes: 13200 asked for.
    keys = sorted(SEED_KEYS)[:12]
    admitted = _drive(meter, clock, lambda minute: keys, 11)
    _assert_seed_promise(admitted)
    per_org = Counter(org for _, _, org in admitted)
    assert per_org["org_a"] == 10000
    assert max(Counter(key for _, key, _ in admitted).values()) < 1000
    # Alone in its org, one key bursting 100 per minute gets 1000 in the hour, no more.
    solo_meter, solo_clock = _seed_meter()
    solo = sorted(SEED_KEYS)[-1]
    alone = _drive(solo_meter, solo_clock, lambda minute: [solo], 15)
    _assert_seed_promise(alone)
    assert len(alone) == 1000
    # The next clock hour opens both again.
    _at(clock, HOUR)
    _at(solo_clock, HOUR)
    assert meter.check(keys[0], org="org_a", operation="invoices.list").allowed
    assert solo_meter.check(solo, org="org_b", operation="invoices.list").allowed
