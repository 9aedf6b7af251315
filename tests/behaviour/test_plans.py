"""Plans, on every backend (``make_meter``): checks under each plan, a switch in the
middle of a window for each algorithm, a key's plan over its organization's,
negotiated limits, clearing, usage, and bad input that changes nothing.

Times are set, never slept (see test_meter.py's ``at``).
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from meterkit import (
    ApiKey,
    Category,
    CostTable,
    CreditPlan,
    CustomerPlan,
    InvalidRequestError,
    Operation,
    Policy,
    Tier,
    UnknownPlanError,
)
from tests.conftest import FakeClock

US = 1_000_000
MIN = 60 * US
HOUR = 3600 * US
BASE_US = 1_767_225_600 * US  # 2026-01-01T00:00:00Z: an hour's and a month's start
ALGORITHMS = ("fixed_window", "sliding_window", "gcra", "sliding_log")

MakeMeter = Callable[[Policy], Any]


def at(clock: FakeClock, us: int) -> None:
    clock.now = (BASE_US + us) / US


def _costs() -> CostTable:
    return CostTable(
        (Category("read", "0.01", "0.01"), Category("write", "0.03", "0.15")),
        (Operation("items.list", "read", "0.01"), Operation("items.create", "write", "0.05")),
    )


def _policy() -> Policy:
    """Three tiers, and plans that change each of them one way or another."""
    return Policy(
        [
            Tier("key-hour", "key", "4/hour"),
            Tier("org-hour", "org", "6/hour"),
            Tier("key-min", "key", "3/minute", "sliding_log"),
        ],
        _costs(),
        CreditPlan("10"),
        plans=[
            CustomerPlan("free", {"key-hour": "2/hour"}, allowance="0.03"),
            CustomerPlan(
                "pro",
                {"key-hour": "10/hour", "org-hour": "off", "key-min": {"rate": "5/minute"}},
                allowance="100",
            ),
        ],
    )


def _limits(decision: Any) -> dict[str, int]:
    return {t.name: t.limit for t in decision.tiers}


def _admitted(meter: Any, n: int, key: str = "k1", org: str = "o1") -> int:
    return sum(bool(meter.check(key, org=org, operation="items.list")) for _ in range(n))


# -- checks under each plan -----------------------------------------------------------


def test_a_check_uses_the_limits_and_allowance_of_its_organizations_plan(
    make_meter: MakeMeter,
) -> None:
    """Decision.plan, Decision.tiers and the headers show the plan's own limits."""
    meter = make_meter(_policy())
    d = meter.check("k1", org="o1", operation="items.list")
    assert d.plan == "default"
    assert _limits(d) == {"key-hour": 4, "org-hour": 6, "key-min": 3}
    meter.set_plan("o2", "pro")
    d = meter.check("k1", org="o2", operation="items.list")
    assert d.plan == "pro"
    assert _limits(d) == {"key-hour": 10, "key-min": 5}  # org-hour is off under pro
    assert d.headers["RateLimit-Policy"] == '"key-hour";q=10;w=3600, "key-min";q=5;w=60'
    assert d.headers["RateLimit"] == '"key-hour";r=9;t=3600, "key-min";r=4;t=60'
    assert d.balance == Decimal("99.99")  # pro's allowance
    meter.set_plan("o3", "free")
    assert _admitted(meter, 3, org="o3") == 2  # free: 2 an hour per key
    d = meter.check("k1", org="o3", operation="items.list")
    assert (d.plan, d.reason, _limits(d)["key-hour"]) == ("free", "rate_limited", 2)
    assert d.headers["X-RateLimit-Limit"] == "2"


def test_the_default_plan_is_the_policys_own_and_can_be_named(make_meter: MakeMeter) -> None:
    """set_plan(org, "default") is the same as no plan at all."""
    meter = make_meter(_policy())
    meter.set_plan("o1", "pro")
    meter.set_plan("o1", "default")
    d = meter.check("k1", org="o1", operation="items.list")
    assert (d.plan, _limits(d)["key-hour"]) == ("default", 4)
    assert meter.plan_of("o1").org_plan == "default"


def test_credits_follow_the_plans_allowance(make_meter: MakeMeter) -> None:
    """An organization on free runs out of credits at free's allowance, with a 402."""
    meter = make_meter(_policy())
    meter.set_plan("o1", "free")
    assert meter.check("k1", org="o1", operation="items.list")
    assert meter.check("k2", org="o1", operation="items.list")
    assert meter.check("k3", org="o1", operation="items.list")
    d = meter.check("k4", org="o1", operation="items.list")
    assert (d.reason, d.status, d.plan) == ("insufficient_credits", 402, "free")
    usage = meter.usage("o1")
    assert (usage.plan, usage.allowance, usage.credits_left) == ("free", Decimal("0.03"), 0)


def test_a_switch_keeps_the_credits_spent_this_month(make_meter: MakeMeter) -> None:
    """Moving from pro to free mid-month keeps what was used: the balance is the new
    allowance minus it (here below zero: nothing more is admitted until next month)."""
    meter = make_meter(_policy())
    meter.set_plan("o1", "pro")
    for key in ("k1", "k2", "k3", "k4"):
        assert meter.check(key, org="o1", operation="items.list")
    meter.set_plan("o1", "free")
    usage = meter.usage("o1")
    assert (usage.plan, usage.allowance, usage.credits_used) == (
        "free",
        Decimal("0.03"),
        Decimal("0.04"),
    )
    assert usage.credits_left == Decimal("-0.01")
    assert meter.check("k5", org="o1", operation="items.list").reason == "insufficient_credits"
    meter.set_plan("o1", None)
    assert meter.usage("o1").allowance == 10
    assert meter.check("k5", org="o1", operation="items.list")


def test_an_allowance_of_its_own_wins_over_the_plans(make_meter: MakeMeter) -> None:
    """set_allowance overrides the allowance of whatever plan the organization is on."""
    meter = make_meter(_policy())
    meter.set_plan("o1", "pro")
    meter.set_allowance("o1", "7")
    assert meter.usage("o1").allowance == 7
    assert meter.check("k1", org="o1", operation="items.list").balance == Decimal("6.99")


# -- a switch in the middle of a window -----------------------------------------------------


def _one_tier(algorithm: str) -> Policy:
    return Policy(
        [Tier("t", "key", "5/minute", algorithm)],  # type: ignore[arg-type]
        _costs(),
        CreditPlan("100"),
        plans=[CustomerPlan("small", {"t": "2/minute"}), CustomerPlan("big", {"t": "10/minute"})],
    )


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_switch_mid_window_keeps_the_count_spent(
    make_meter: MakeMeter, clock: FakeClock, algorithm: str
) -> None:
    """Three requests spent under 5/minute: moved to 2/minute, nothing more is admitted
    in that window; moved on to 10/minute, the three still count (a gcra bucket keeps
    its time to refill: 36 s of the 60 s, so 4 more fit, not 7)."""
    meter = make_meter(_one_tier(algorithm))
    at(clock, 0)
    assert _admitted(meter, 3) == 3
    meter.set_plan("o1", "small")
    d = meter.check("k1", org="o1", operation="items.list")
    assert (d.allowed, d.plan, _limits(d)) == (False, "small", {"t": 2})
    assert d.tiers[0].remaining == 0
    meter.set_plan("o1", "big")
    more = 4 if algorithm == "gcra" else 7
    assert _admitted(meter, 12) == more
    # The next window (a full refill, for gcra) gives the new plan's whole limit.
    at(clock, 2 * MIN)
    assert _admitted(meter, 12) == 10


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_switch_back_and_forth_gives_no_fresh_window(
    make_meter: MakeMeter, clock: FakeClock, algorithm: str
) -> None:
    """Down to a small plan and back up: the count is the same one all along, so the
    round trip admits nothing the original plan would not have."""
    meter = make_meter(_one_tier(algorithm))
    at(clock, 0)
    assert _admitted(meter, 5) == 5
    meter.set_plan("o1", "small")
    meter.set_plan("o1", None)
    assert _admitted(meter, 3) == 0
    assert meter.check("k1", org="o1", operation="items.list").retry_after > 0


# -- keys, negotiated limits, clearing --------------------------------------------------------


def test_a_keys_plan_wins_for_its_key_scoped_tiers(make_meter: MakeMeter) -> None:
    """The organization is on pro, one key on free: that key gets free's key-scoped
    tiers, the organization's tiers and allowance stay pro's (org-hour off)."""
    meter = make_meter(_policy())
    meter.set_plan("o1", "pro")
    meter.set_plan("o1", "free", key="k2")
    d1 = meter.check("k1", org="o1", operation="items.list")
    d2 = meter.check("k2", org="o1", operation="items.list")
    assert (d1.plan, _limits(d1)) == ("pro", {"key-hour": 10, "key-min": 5})
    assert (d2.plan, _limits(d2)) == ("free", {"key-hour": 2, "key-min": 3})
    assert d2.balance == Decimal("99.98")  # one pot: pro's allowance
    assigned = meter.plan_of("o1", key="k2")
    assert (assigned.plan, assigned.org_plan, assigned.key_plan) == ("free", "pro", "free")
    assert [t.name for t in assigned.tiers] == ["key-hour", "key-min"]
    assert assigned.allowance == 100
    meter.set_plan("o1", None, key="k2")
    assert meter.check("k2", org="o1", operation="items.list").plan == "pro"
    assert meter.plan_of("o1", key="k2").key_plan is None


def test_a_key_on_the_default_plan_in_an_organization_on_pro(make_meter: MakeMeter) -> None:
    """A key put on "default" keeps the default plan's key tiers while its
    organization is on pro."""
    meter = make_meter(_policy())
    meter.set_plan("o1", "pro")
    meter.set_plan("o1", "default", key="k1")
    d = meter.check("k1", org="o1", operation="items.list")
    assert (d.plan, _limits(d)) == ("default", {"key-hour": 4, "key-min": 3})


def test_a_key_store_plan_wins_over_the_backends(make_meter: MakeMeter) -> None:
    """A check with an ApiKey that carries a plan runs under it."""
    meter = make_meter(_policy())
    meter.set_plan("o1", "pro", key="k1")
    key = ApiKey(
        id="k1", org="o1", mode="live", created_at=0.0, secret_hash="", last_four="", plan="free"
    )
    d = meter.check(key, operation="items.list")
    assert (d.plan, _limits(d)["key-hour"]) == ("free", 2)
    assert meter.check("k1", org="o1", operation="items.list").plan == "pro"


def test_negotiated_limits_apply_over_any_plan_and_clear(make_meter: MakeMeter) -> None:
    """set_limits changes named tiers for one organization, whatever its plan (even a
    tier the plan turns off); None takes the deal away."""
    meter = make_meter(_policy())
    meter.set_limits("o1", {"org-hour": "50/hour", "key-min": "off"})
    d = meter.check("k1", org="o1", operation="items.list")
    assert (d.plan, _limits(d)) == ("default", {"key-hour": 4, "org-hour": 50})
    meter.set_plan("o1", "pro")
    d = meter.check("k1", org="o1", operation="items.list")
    assert (d.plan, _limits(d)) == ("pro", {"key-hour": 10, "org-hour": 50})
    assigned = meter.plan_of("o1")
    assert assigned.limits == {"key-min": "off", "org-hour": "50/hour"}
    meter.set_limits("o1", None)
    assert _limits(meter.check("k1", org="o1", operation="items.list")) == {
        "key-hour": 10,
        "key-min": 5,
    }
    assert meter.plan_of("o1").limits == {}


def test_a_negotiated_gcra_burst(make_meter: MakeMeter) -> None:
    """A deal may give a gcra tier a burst of its own."""
    policy = Policy([Tier("g", "org", "60/minute", "gcra", burst=2)], _costs(), CreditPlan("9"))
    meter = make_meter(policy)
    assert _admitted(meter, 5) == 2
    meter.set_limits("o2", {"g": {"rate": "60/minute", "burst": 4}})
    assert _admitted(meter, 6, org="o2") == 4
    assert meter.plan_of("o2").limits == {"g": {"rate": "60/minute", "burst": 4}}


def test_clearing_everything_is_the_default_plan_again(make_meter: MakeMeter) -> None:
    """With its plan, its keys' plans and its deal taken away, an organization is on the
    default plan, and plan_of says so."""
    meter = make_meter(_policy())
    meter.set_plan("o1", "pro")
    meter.set_plan("o1", "free", key="k1")
    meter.set_limits("o1", {"org-hour": "9/hour"})
    meter.set_plan("o1", None)
    meter.set_plan("o1", None, key="k1")
    meter.set_limits("o1", {})
    assigned = meter.plan_of("o1", key="k1")
    assert (assigned.plan, assigned.org_plan, assigned.key_plan, assigned.limits) == (
        "default",
        "default",
        None,
        {},
    )
    assert _limits(meter.check("k1", org="o1", operation="items.list")) == {
        "key-hour": 4,
        "org-hour": 6,
        "key-min": 3,
    }


def test_test_mode_has_plans_of_its_own(make_meter: MakeMeter) -> None:
    """A plan set for live traffic leaves the organization's test traffic alone."""
    meter = make_meter(_policy())
    meter.set_plan("o1", "pro")
    assert meter.check("k1", org="o1", operation="items.list", mode="test").plan == "default"
    meter.set_plan("o1", "free", mode="test")
    assert meter.check("k1", org="o1", operation="items.list", mode="test").plan == "free"
    assert meter.check("k1", org="o1", operation="items.list").plan == "pro"


def test_a_replay_answers_with_the_plan_of_the_first_decision(make_meter: MakeMeter) -> None:
    """An idempotent retry after a plan switch is the first decision, plan and all."""
    meter = make_meter(_policy())
    meter.set_plan("o1", "pro")
    first = meter.check("k1", org="o1", operation="items.list", idempotency_key="i1")
    meter.set_plan("o1", "free")
    again = meter.check("k1", org="o1", operation="items.list", idempotency_key="i1")
    assert again.replayed
    assert (again.plan, again.tiers, again.headers) == (first.plan, first.tiers, first.headers)


def test_peek_and_check_many_follow_the_plans(make_meter: MakeMeter) -> None:
    """A peek and a batch see the same plans as single checks."""
    meter = make_meter(_policy())
    meter.set_plan("o1", "pro")
    meter.set_plan("o2", "free", key="k2")
    for _ in range(2):  # (the second finds the functions the first made)
        peeked = meter.peek("k1", org="o1", operation="items.list")
        assert (peeked.plan, _limits(peeked)["key-hour"], peeked.charge_id) == ("pro", 10, "")
    assert meter.check("k1", org="o1", operation="items.list").tiers[0].remaining == 9
    peeked = meter.peek("k1", org="o1", operation="items.list")
    assert (peeked.tiers[0].remaining, meter.usage("o1").requests) == (8, 1)  # nothing spent
    batch = meter.check_many(
        [("k1", "items.list", "o1"), ("k2", "items.list", "o2"), ("k3", "items.list", "o2")]
    )
    assert [d.plan for d in batch] == ["pro", "free", "default"]
    assert [_limits(d)["key-hour"] for d in batch] == [10, 2, 4]


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda m: m.set_plan("o1", "gold"), UnknownPlanError, "unknown plan 'gold'"),
        (lambda m: m.set_plan("o1", "gold", key="k1"), UnknownPlanError, "unknown plan"),
        (lambda m: m.set_plan("o1", 7), UnknownPlanError, "unknown plan 7"),
        (lambda m: m.set_plan("", "pro"), InvalidRequestError, "org must not be empty"),
        (lambda m: m.set_plan("o1", "pro", mode="prod"), InvalidRequestError, "mode"),
        (lambda m: m.set_limits("o1", {"nope": "1/hour"}), InvalidRequestError, "unknown tier"),
        (lambda m: m.set_limits("o1", {"org-hour": "often"}), InvalidRequestError, "malformed"),
        (lambda m: m.set_limits("o1", {"org-hour": "0/hour"}), InvalidRequestError, "admits"),
        (lambda m: m.set_limits("o1", {"org-hour": "9/day"}), InvalidRequestError, "window"),
        (
            lambda m: m.set_limits("o1", {"org-hour": {"rate": "9/hour", "algorithm": "gcra"}}),
            InvalidRequestError,
            "algorithm",
        ),
        (
            lambda m: m.set_limits("o1", {"org-hour": {"rate": "9/hour", "burst": 3}}),
            InvalidRequestError,
            "burst applies to the gcra algorithm only",
        ),
        (lambda m: m.set_limits("o1", ["org-hour"]), InvalidRequestError, "maps tier names"),
        (lambda m: m.set_limits("o1", {"org-hour": 9}), InvalidRequestError, "not int"),
    ],
)
def test_bad_plan_input_raises_a_typed_error_and_changes_nothing(
    make_meter: MakeMeter, call: Callable[[Any], None], error: type[Exception], words: str
) -> None:
    """An unknown plan, an unknown tier, a malformed rate, another window or algorithm:
    a typed error, and the organization keeps its plan, deal and limits."""
    meter = make_meter(_policy())
    meter.set_plan("o1", "free")
    meter.set_limits("o1", {"org-hour": "8/hour"})
    before = meter.plan_of("o1", key="k1")
    with pytest.raises(error, match=words):
        call(meter)
    assert meter.plan_of("o1", key="k1") == before
    d = meter.check("k1", org="o1", operation="items.list")
    assert (d.plan, _limits(d)) == ("free", {"key-hour": 2, "org-hour": 8, "key-min": 3})


def test_a_plan_the_policy_no_longer_has_is_the_default_plan(
    make_meter: MakeMeter, clock: FakeClock
) -> None:
    """An organization assigned a plan that a later policy dropped is checked under the
    default plan (on every backend alike) and reported so; its counts stay."""
    old = _policy()
    meter = make_meter(old)
    meter.set_plan("o1", "pro")
    assert _admitted(meter, 2) == 2
    new = Policy(old.tiers, old.costs, old.credits, plans=[old.plans["free"]])
    assert new.plan_in_force("pro") == "default"
    later = meter_on(meter, new)
    d = later.check("k1", org="o1", operation="items.list")
    assert (d.plan, _limits(d)["key-hour"], d.tiers[0].remaining) == ("default", 4, 1)
    assert later.plan_of("o1").plan == "default"


def meter_on(meter: Any, policy: Policy) -> Any:
    """Another meter of ``policy`` on ``meter``'s backend (and event loop)."""
    inner = getattr(meter, "_meter", meter)
    other = type(inner)(policy, inner.backend)
    if inner is meter:
        return other
    return type(meter)(other, meter._loop)
