"""Conformance: the Lua scripts do exactly what the memory backend (the reference) does.

Hypothesis draws a random policy (all four algorithms, key and org scopes, bursts,
shadow tiers, operation-limited tiers, policy-level shadow, small allowances, credit
alert thresholds, customer plans that change or turn off tiers and change the
allowance) and a random trace (checks with idempotency keys, cost overrides and test
mode; time steps from one microsecond to a month; peeks; refunds; top-ups; allowance
overrides; usage reports; organizations and keys moved between plans, negotiated
limits, keys that carry a plan of their own, plan reports), and plays it against
``MemoryBackend`` and ``RedisBackend`` (standalone and Cluster) on the same fake
clock. Every step must agree: the whole ``Outcome`` tuple (only the charge ids
differ, by design) with the tiers in force and the credit alerts reached, each
refund's result, each usage and plan report and each error.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterkit import (
    ApiKey,
    Category,
    CostTable,
    CreditPlan,
    CustomerPlan,
    InvalidRequestError,
    MemoryBackend,
    Meter,
    MeterkitError,
    Operation,
    Policy,
    Tier,
)
from meterkit.backends.redis.backend import RedisBackend
from tests.conftest import FakeClock, delete_prefix, new_prefix, shared_client

# Ids with ':' and braces: the key layout must stay unambiguous and, on Cluster, keep
# every key of one organization in one slot. "o{x}" and "o%7Bx%7D" must not collide.
ORGS = ("org_a", "o{x}", "o%7Bx%7D", "o:b")
KEYS = (("key_1", 0), ("key:2", 0), ("k{3}", 1), ("key_4", 2), ("k 5", 3))
OPERATIONS = ("items.list", "items.create", "reports.run")
WINDOWS = ("second", "2 seconds", "5 seconds", "minute", "hour")
STEPS_US = (
    0,
    1,
    999,
    250_000,
    1_000_000,
    1_000_001,
    4_999_999,
    61_000_000,
    3_600_000_000,
    86_400_000_000,
    31 * 86_400_000_000,
)
STARTS = (
    1_767_225_600.0,  # 2026-01-01T00:00:00Z, a month's first µs
    1_769_903_995.5,  # 2026-01-31T23:59:55.5Z, just before a month ends
    1_835_477_999.9,  # 2028-02-29T23:39:59.9Z, a leap day
    1_798_761_599.0,  # 2026-12-31T23:59:59Z, a year's last second
)
COSTS = (None, "0", "0.000001", "0.07", "1.5")
#: Plan names: a policy has the first 0 to 2 of them; "p3" is never one of its plans.
PLANS = ("p1", "p2", "p3", "default")
AMOUNTS = ("0", "0.01", "0.2", "5")
#: Credit alert thresholds of a policy.
ALERTS: tuple[tuple[str, ...], ...] = ((), ("50%",), ("80%", "100%"), ("1%", "33%", "99%", "100%"))


@st.composite
def tiers(draw: st.DrawFn, index: int) -> Tier:
    algorithm = draw(st.sampled_from(("fixed_window", "sliding_window", "gcra", "sliding_log")))
    limit = draw(st.integers(1, 5))
    window = draw(st.sampled_from(WINDOWS))
    burst = draw(st.none() | st.integers(1, 6)) if algorithm == "gcra" else None
    ops = draw(st.none() | st.lists(st.sampled_from(OPERATIONS), min_size=1, max_size=2))
    return Tier(
        f"t{index}",
        draw(st.sampled_from(("key", "org"))),
        f"{limit}/{window}",
        algorithm,
        burst,
        shadow=draw(st.integers(0, 4)) == 0,
        operations=tuple(ops) if ops else None,
    )


@st.composite
def policies(draw: st.DrawFn, *, planned: bool = False) -> Policy:
    """A random policy; ``planned``: one with tiers and at least one customer plan."""
    n = draw(st.integers(1 if planned else 0, 4))
    costs = CostTable(
        (
            Category("read", "0.01", "0.01"),
            Category("write", "0.03", "0.15"),
            Category("report", "0.10", "0.25"),
        ),
        (
            Operation("items.list", "read", "0.01"),
            Operation("items.create", "write", "0.05"),
            Operation("reports.run", "report", "0.25"),
        ),
    )
    allowance = draw(st.sampled_from(("0", "0.05", "0.3", "2", "10000")))
    shadow = draw(st.integers(0, 5)) == 0
    drawn = [draw(tiers(i)) for i in range(n)]
    plans = []
    for name in PLANS[: draw(st.integers(1 if planned else 0, 2))]:
        changes: dict[str, object] = {}
        for tier in drawn:
            kind = draw(st.integers(0, 3))
            if kind == 1:
                changes[tier.name] = "off"
            elif kind >= 2:
                rate = f"{draw(st.integers(1, 6))} per {tier.window} seconds"
                burst = draw(st.none() | st.integers(1, 6)) if tier.algorithm == "gcra" else None
                changes[tier.name] = rate if burst is None else {"rate": rate, "burst": burst}
        plan_allowance = draw(st.none() | st.sampled_from(("0", "0.05", "0.3", "2")))
        plans.append(CustomerPlan(name, changes, plan_allowance))  # type: ignore[arg-type]
    alerts = draw(st.sampled_from(ALERTS))
    return Policy(drawn, costs, CreditPlan(allowance, alerts=alerts), shadow=shadow, plans=plans)


def deal(policy: Policy, seed: int) -> dict[str, object] | None:
    """Negotiated limits made from ``seed`` for ``policy``'s tiers, three bits a tier:
    none, "off", or 1 to 6 per the tier's window (for gcra, some with a burst of 2);
    seed 0 takes them away (None)."""
    if seed == 0:
        return None
    limits: dict[str, object] = {}
    for i, tier in enumerate(policy.tiers):
        kind = (seed >> (3 * i)) % 8
        rate = f"{kind - 1} per {tier.window} seconds"
        if kind == 1:
            limits[tier.name] = "off"
        elif kind % 2 and tier.algorithm == "gcra":
            limits[tier.name] = {"rate": rate, "burst": 2}
        elif kind >= 2:
            limits[tier.name] = rate
    return limits


modes = st.sampled_from(("live", "live", "test"))
steps = st.one_of(
    st.tuples(
        st.just("check"),
        st.integers(0, len(KEYS) - 1),
        st.sampled_from(OPERATIONS),
        st.none() | st.sampled_from(("i1", "i2", "i:3")),
        st.sampled_from(COSTS),
        modes,
    ),
    st.tuples(
        st.just("check"),
        st.integers(0, len(KEYS) - 1),
        st.just("items.list"),
        st.none(),
        st.none(),
        st.just("live"),
    ),
    st.tuples(st.just("advance"), st.sampled_from(STEPS_US)),
    st.tuples(st.just("refund"), st.integers(0, 60)),
    st.tuples(st.just("top_up"), st.sampled_from(ORGS), st.sampled_from(AMOUNTS), modes),
    st.tuples(
        st.just("allowance"), st.sampled_from(ORGS), st.none() | st.sampled_from(AMOUNTS), modes
    ),
    st.tuples(st.just("usage"), st.sampled_from(ORGS), modes),
    st.tuples(
        st.just("peek"),
        st.integers(0, len(KEYS) - 1),
        st.sampled_from(OPERATIONS),
        st.sampled_from(COSTS),
        modes,
    ),
    st.tuples(st.just("plan"), st.sampled_from(ORGS), st.none() | st.sampled_from(PLANS), modes),
    st.tuples(
        st.just("key_plan"),
        st.integers(0, len(KEYS) - 1),
        st.none() | st.sampled_from(PLANS),
        modes,
    ),
    st.tuples(st.just("limits"), st.sampled_from(ORGS), st.integers(0, 4095), modes),
    st.tuples(
        st.just("key_check"),
        st.integers(0, len(KEYS) - 1),
        st.sampled_from(OPERATIONS),
        st.sampled_from(PLANS),
    ),
    st.tuples(st.just("plan_of"), st.integers(0, len(KEYS) - 1), modes),
)


# Traces that move organizations and keys between plans often, with checks in between.
plan_steps = st.one_of(
    st.tuples(
        st.just("check"),
        st.integers(0, len(KEYS) - 1),
        st.sampled_from(OPERATIONS),
        st.none() | st.sampled_from(("i1", "i2")),
        st.none(),
        st.just("live"),
    ),
    st.tuples(st.just("advance"), st.sampled_from(STEPS_US[:9])),
    st.tuples(
        st.just("plan"), st.sampled_from(ORGS[:2]), st.none() | st.sampled_from(PLANS), modes
    ),
    st.tuples(st.just("key_plan"), st.integers(0, 2), st.none() | st.sampled_from(PLANS), modes),
    st.tuples(st.just("limits"), st.sampled_from(ORGS[:2]), st.integers(0, 4095), modes),
    st.tuples(
        st.just("key_check"),
        st.integers(0, len(KEYS) - 1),
        st.sampled_from(OPERATIONS),
        st.sampled_from(PLANS),
    ),
    st.tuples(
        st.just("peek"),
        st.integers(0, len(KEYS) - 1),
        st.sampled_from(OPERATIONS),
        st.none(),
        st.just("live"),
    ),
    st.tuples(st.just("usage"), st.sampled_from(ORGS[:2]), modes),
    st.tuples(st.just("plan_of"), st.integers(0, len(KEYS) - 1), modes),
)


def _comparable(outcome: tuple[Any, ...]) -> tuple[Any, ...]:
    """The outcome without its charge id (random by design), but with whether it has one,
    and the tiers in force as numbers."""
    limits = outcome[10]
    applied = (limits.plan, limits.on, limits.allowance, [t.describe() for t in limits.tiers])
    return (*outcome[:8], bool(outcome[8]), outcome[9], applied, outcome[11])


def _run(meter: Meter, call: str, *args: Any, **kwargs: Any) -> Any:
    try:
        return getattr(meter, call)(*args, **kwargs)
    except MeterkitError as exc:
        return exc


def _same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, BaseException) or isinstance(b, BaseException):
        assert (type(a), str(a)) == (type(b), str(b)), where
    else:
        assert a == b, where


def _agree(a: Any, b: Any, where: str) -> bool:
    """Both decisions agree (True), or both calls raised the same error (False)."""
    if isinstance(a, BaseException) or isinstance(b, BaseException):
        _same(a, b, where)
        return False
    assert _comparable(a.outcome) == _comparable(b.outcome), where
    return True


def _check_args(step: tuple[Any, ...]) -> dict[str, Any]:
    _, k, operation, idem, cost, mode = step
    key, org = KEYS[k][0], ORGS[KEYS[k][1]]
    return {
        "key": key,
        "org": org,
        "operation": operation,
        "idempotency_key": idem,
        "cost": cost,
        "mode": mode,
    }


def play(
    policy: Policy, start: float, trace: list[tuple[Any, ...]], client: Any, batched: bool = False
) -> None:
    """Play ``trace`` on both backends, asserting that every step agrees.

    ``batched``: checks in a row (no other step between them) go to ``check_many`` on
    both backends, so that Redis runs them through its batch script (memory, the
    reference, applies them one by one)."""
    clock = FakeClock(start)
    memory = Meter(policy, MemoryBackend(clock=clock))
    prefix = new_prefix()
    redis = Meter(policy, RedisBackend(client, prefix=prefix, clock=clock))
    admitted: list[tuple[Any, Any]] = []
    try:
        i = 0
        while i < len(trace):
            step = trace[i]
            where = f"step {i}: {step}"
            kind = step[0]
            if kind == "check" and batched:
                run = [step]
                while i + len(run) < len(trace) and trace[i + len(run)][0] == "check":
                    run.append(trace[i + len(run)])
                requests = [_check_args(s) for s in run]
                many_a = memory.check_many(requests, return_exceptions=True)
                many_b = redis.check_many(requests, return_exceptions=True)
                for j, (a, b) in enumerate(zip(many_a, many_b, strict=True)):
                    where = f"step {i + j}: {run[j]} (in a batch of {len(run)})"
                    if _agree(a, b, where):
                        admitted.append((a, b))
                i += len(run)
                continue
            i += 1
            if kind == "check":
                args = _check_args(step)
                a = _run(memory, "check", **args)
                b = _run(redis, "check", **args)
                if _agree(a, b, where):
                    admitted.append((a, b))
            elif kind == "peek":
                _, k, operation, cost, mode = step
                args = {
                    "key": KEYS[k][0],
                    "org": ORGS[KEYS[k][1]],
                    "operation": operation,
                    "cost": cost,
                    "mode": mode,
                }
                _agree(_run(memory, "peek", **args), _run(redis, "peek", **args), where)
            elif kind == "advance":
                clock.advance(step[1] / 1_000_000)
            elif kind == "refund":
                if admitted:
                    a, b = admitted[step[1] % len(admitted)]
                    assert memory.refund(a) == redis.refund(b), where
            elif kind == "top_up":
                _, org, amount, mode = step
                memory.top_up(org, amount, mode=mode)
                redis.top_up(org, amount, mode=mode)
            elif kind == "allowance":
                _, org, amount, mode = step
                memory.set_allowance(org, amount, mode=mode)
                redis.set_allowance(org, amount, mode=mode)
            elif kind == "plan":
                _, org, name, mode = step
                a = _run(memory, "set_plan", org, name, mode=mode)
                _same(a, _run(redis, "set_plan", org, name, mode=mode), where)
            elif kind == "key_plan":
                _, k, name, mode = step
                args = (ORGS[KEYS[k][1]], name)
                a = _run(memory, "set_plan", *args, key=KEYS[k][0], mode=mode)
                _same(a, _run(redis, "set_plan", *args, key=KEYS[k][0], mode=mode), where)
            elif kind == "limits":
                _, org, seed, mode = step
                limits = deal(policy, seed)
                a = _run(memory, "set_limits", org, limits, mode=mode)
                _same(a, _run(redis, "set_limits", org, limits, mode=mode), where)
            elif kind == "key_check":
                _, k, operation, name = step
                key = ApiKey(
                    id=KEYS[k][0],
                    org=ORGS[KEYS[k][1]],
                    mode="live",
                    created_at=0.0,
                    secret_hash="",
                    last_four="",
                    plan=name,
                )
                a = _run(memory, "check", key, operation=operation)
                b = _run(redis, "check", key, operation=operation)
                if _agree(a, b, where):
                    admitted.append((a, b))
            elif kind == "plan_of":
                _, k, mode = step
                args = (ORGS[KEYS[k][1]], KEYS[k][0], mode)
                assert memory.plan_of(*args) == redis.plan_of(*args), where
            else:
                _, org, mode = step
                assert memory.usage(org, mode=mode) == redis.usage(org, mode=mode), where
        for org in ORGS:
            for mode in ("live", "test"):
                final = f"final usage of {org} ({mode})"
                assert memory.usage(org, mode=mode) == redis.usage(org, mode=mode), final
                final = f"final plans of {org} ({mode})"
                assert memory.plan_of(org, "key_1", mode) == redis.plan_of(org, "key_1", mode)
    finally:
        delete_prefix(client, prefix)


@settings(max_examples=400)
@given(
    policy=policies(),
    start=st.sampled_from(STARTS),
    trace=st.lists(steps, min_size=1, max_size=80),
    batched=st.booleans(),
)
def test_redis_matches_memory_step_by_step(
    client: Any, policy: Policy, start: float, trace: list[tuple[Any, ...]], batched: bool
) -> None:
    """Random policies and traces give the same outcomes, refunds, usage and errors on
    both, whether Redis gets each check alone or runs of checks as one batch."""
    play(policy, start, trace, client, batched)


@settings(max_examples=150)
@given(
    policy=policies(planned=True),
    start=st.sampled_from(STARTS),
    trace=st.lists(plan_steps, min_size=20, max_size=60),
    batched=st.booleans(),
)
def test_plans_are_decided_alike_step_by_step(
    client: Any, policy: Policy, start: float, trace: list[tuple[Any, ...]], batched: bool
) -> None:
    """Policies with customer plans, and traces that switch plans, deals and key plans
    between checks: the same outcomes (tiers in force included), reports and errors."""
    play(policy, start, trace, client, batched)


def test_a_hand_written_trace_covers_every_feature(client: Any) -> None:
    """A fixed trace through rollover, replay, conflict, refunds and shadow agrees on both."""
    policy = Policy(
        [
            Tier("fw", "key", "2/second"),
            Tier("sw", "org", "3/5 seconds", "sliding_window"),
            Tier("gc", "key", "2/second", "gcra", burst=3),
            Tier("sl", "key", "3/minute", "sliding_log"),
            Tier("trial", "key", "1/hour", shadow=True),
        ],
        CostTable(
            (Category("read", "0.01", "0.01"), Category("write", "0.03", "0.15")),
            (Operation("items.list", "read", "0.01"), Operation("items.create", "write", "0.05")),
        ),
        CreditPlan("0.1", alerts=("50%", "90%", "100%")),
    )
    check = ("check", 0, "items.list", None, None, "live")
    trace: list[tuple[Any, ...]] = [
        check,
        check,
        check,  # the fixed window's third is denied
        ("advance", 1_000_000),
        ("check", 0, "items.create", "i1", None, "live"),
        ("check", 0, "items.create", "i1", None, "live"),  # replayed
        ("check", 0, "items.list", "i1", None, "live"),  # conflict: another operation
        ("check", 0, "items.create", "i1", "0.07", "live"),  # conflict: another cost
        ("refund", 3),
        ("refund", 3),  # once only
        ("check", 0, "items.create", "i1", None, "live"),  # a new request after the refund
        ("check", 2, "items.list", None, None, "test"),
        ("usage", ORGS[0], "live"),
        ("usage", ORGS[1], "test"),
        ("advance", 1_000_000),
        check,
        ("advance", 1_000_000),
        check,
        check,
        ("top_up", ORGS[0], "0.2", "live"),
        ("allowance", ORGS[0], "0.01", "live"),
        ("advance", 61_000_000),
        check,
        ("allowance", ORGS[0], None, "live"),
        ("advance", 31 * 86_400_000_000),
        ("refund", 0),
        check,
        ("usage", ORGS[0], "live"),
    ]
    play(policy, STARTS[1], trace, client)
    play(policy, STARTS[1], trace, client, batched=True)


def test_a_hand_written_trace_through_plans_agrees(client: Any) -> None:
    """A fixed trace that moves organizations and keys between plans mid-window, gives
    and takes deals, and names plans from a key store agrees on both."""
    base = Policy(
        [
            Tier("fw", "key", "3/second"),
            Tier("sw", "org", "4/5 seconds", "sliding_window"),
            Tier("gc", "key", "2/second", "gcra", burst=3),
            Tier("sl", "key", "3/minute", "sliding_log"),
        ],
        CostTable(
            (Category("read", "0.01", "0.01"), Category("write", "0.03", "0.15")),
            (Operation("items.list", "read", "0.01"), Operation("items.create", "write", "0.05")),
        ),
        CreditPlan("0.3"),
        plans=[
            CustomerPlan("p1", {"fw": "1/second", "gc": {"rate": "4/second", "burst": 1}}, "0.1"),
            CustomerPlan("p2", {"sw": "off", "sl": "6/minute", "fw": "off"}, "5"),
        ],
    )
    check = ("check", 0, "items.list", None, None, "live")
    trace: list[tuple[Any, ...]] = [
        check,
        check,
        ("plan", ORGS[0], "p1", "live"),
        check,  # fw: 2 spent of p1's 1
        ("check", 0, "items.create", "i1", None, "live"),
        ("advance", 1_000_000),
        check,
        ("plan", ORGS[0], "p2", "live"),
        check,
        check,
        ("key_plan", 0, "p1", "live"),
        check,
        ("limits", ORGS[0], 0o5450, "live"),  # sw 4, gc 3 (a 333,334 µs interval), sl 4
        check,
        ("check", 0, "items.create", "i1", None, "live"),  # replayed under p1's limits
        ("key_check", 0, "items.list", "p2"),
        ("key_check", 1, "items.list", "default"),
        ("plan_of", 0, "live"),
        ("usage", ORGS[0], "live"),
        ("advance", 61_000_000),
        ("plan", ORGS[0], "p3", "live"),  # an unknown plan: the same error on both
        ("key_plan", 0, None, "live"),
        ("limits", ORGS[0], 0, "live"),
        check,
        ("advance", 31 * 86_400_000_000),
        ("plan", ORGS[0], None, "live"),
        check,
        ("plan_of", 0, "live"),
    ]
    play(base, STARTS[1], trace, client)
    play(base, STARTS[1], trace, client, batched=True)


def test_the_month_in_lua_is_the_calendar_month_in_python(redis_url: str, request: Any) -> None:
    """The script's calendar arithmetic gives Python's month bounds across leap years and eras."""
    from meterkit.backends.redis.scripts import script as _script
    from meterkit.core.plan import month_bounds

    client = shared_client(request, redis_url)
    probe = _script("usage").text.split("\n-- meterkit usage", 1)[0] + (
        "\nlocal out = {}\nfor i = 1, #ARGV do\n"
        "  local s, e = month(tonumber(ARGV[i]))\n"
        "  out[#out + 1] = s\n  out[#out + 1] = e\nend\nreturn out\n"
    )
    day = 86_400_000_000
    instants = [0, 1, day - 1, 59 * day, 60 * day - 1]
    for year_start in range(0, 400 * 365 * day, 97 * day + 12_345_678_901):
        instants += [year_start, year_start + 1]
    instants += [
        951_782_400_000_000,  # 2000-02-29
        4_107_542_399_999_999,  # 2100-02-28T23:59:59.999999
        4_107_542_400_000_000,  # 2100-03-01
        1_835_477_999_900_000,
    ]
    got = client.eval(probe, 0, *instants)
    want = [b for t in instants for b in month_bounds(t)]
    assert got == want


def test_costs_and_balances_stay_exact_up_to_2_to_the_53(redis_url: str, request: Any) -> None:
    """Credits near 2**53 micro-credits are debited to the micro-credit on both backends."""
    client = shared_client(request, redis_url)
    policy = Policy(
        [],
        CostTable((Category("any", "0", "1"),), (Operation("op", "any", "0.000001"),)),
        CreditPlan(Decimal(2**53 - 1) / 1_000_000),
    )
    clock = FakeClock()
    prefix = new_prefix()
    memory = Meter(policy, MemoryBackend(clock=clock))
    redis = Meter(policy, RedisBackend(client, prefix=prefix, clock=clock))
    try:
        for cost in ("0.000001", "1234567.891011", "0.000003"):
            a = memory.check("k", org="o", operation="op", cost=cost)
            b = redis.check("k", org="o", operation="op", cost=cost)
            assert _comparable(a.outcome) == _comparable(b.outcome)
        assert redis.usage("o") == memory.usage("o")
        assert redis.usage("o").credits_left == Decimal(2**53 - 1 - 1 - 1234567891011 - 3) / 10**6
    finally:
        delete_prefix(client, prefix)


def test_conflict_errors_are_the_same_type_and_text(redis_url: str, request: Any) -> None:
    """An idempotency key reused for another request raises the same error on both."""
    client = shared_client(request, redis_url)
    policy = Policy.crane_ledger()
    clock = FakeClock()
    prefix = new_prefix()
    try:
        for meter in (
            Meter(policy, MemoryBackend(clock=clock)),
            Meter(policy, RedisBackend(client, prefix=prefix, clock=clock)),
        ):
            meter.check("key_1", org="org_1", operation="invoices.list", idempotency_key="x")
            with pytest.raises(InvalidRequestError, match="different request"):
                meter.check("key_2", org="org_1", operation="invoices.list", idempotency_key="x")
    finally:
        delete_prefix(client, prefix)
