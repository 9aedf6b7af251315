"""Credit alerts on every backend: each threshold of the month's credits is reported by
the one check that reaches it first, once per organization and month."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterkit import (
    Category,
    CostTable,
    CreditPlan,
    CustomerPlan,
    Operation,
    Policy,
    Tier,
)
from meterkit.core.credits import alerts_reached
from tests.conftest import FakeClock

MakeMeter = Callable[[Policy], Any]
DAY = 86_400


def _policy(
    allowance: str = "1", alerts: tuple[str, ...] = ("50%", "80%", "100%"), **options: Any
) -> Policy:
    costs = CostTable(
        (Category("read", "0.1", "0.1"), Category("write", "0.3", "0.3")),
        (Operation("items.list", "read", "0.1"), Operation("items.create", "write", "0.3")),
    )
    tiers = options.pop("tiers", [Tier("burst", "key", "100/minute")])
    return Policy(tiers, costs, CreditPlan(allowance, alerts=alerts), **options)


def _alerts(meter: Any, n: int, operation: str = "items.list", **kwargs: Any) -> list[Any]:
    """The alerts of ``n`` checks of key_1 in org_a (or as ``kwargs`` say)."""
    args = {"org": "org_a", **kwargs}
    return [meter.check("key_1", operation=operation, **args).alerts for _ in range(n)]


def test_each_threshold_once_in_order(make_meter: MakeMeter) -> None:
    """Each threshold is reported by the check whose charge reaches it, and only then."""
    meter = make_meter(_policy())
    assert _alerts(meter, 10) == [(), (), (), (), ("50%",), (), (), ("80%",), (), ("100%",)]


def test_one_charge_can_reach_several(make_meter: MakeMeter) -> None:
    """A charge that jumps past two thresholds reports both at once."""
    meter = make_meter(_policy())
    meter.check("key_1", org="org_a", operation="items.list")  # 10%
    found = meter.check("key_1", org="org_a", operation="items.list", cost="0.75")  # 85%
    assert found.alerts == ("50%", "80%")


def test_a_request_refused_for_credits_reaches_the_rest(make_meter: MakeMeter) -> None:
    """A 402 means the month's credits are spent: it reports every threshold not yet
    reported, once; the next 402 reports nothing."""
    meter = make_meter(_policy())
    assert _alerts(meter, 3, "items.create") == [(), ("50%",), ("80%",)]  # 90% used
    refused = meter.check("key_1", org="org_a", operation="items.create")
    assert (refused.allowed, refused.alerts) == (False, ("100%",))
    assert _alerts(meter, 2, "items.create") == [(), ()]
    assert meter.check("key_1", org="org_a", operation="items.list").alerts == ()  # 100% now


def test_a_first_request_refused_for_credits_reports_them_all(make_meter: MakeMeter) -> None:
    """An organization without credits is told so by its month's first request."""
    meter = make_meter(_policy(allowance="0.2"))
    refused = meter.check("key_1", org="org_a", operation="items.create")
    assert (refused.reason, refused.alerts) == ("insufficient_credits", ("50%", "80%", "100%"))
    assert meter.check("key_1", org="org_a", operation="items.list").alerts == ()


def test_refunds_and_top_ups_do_not_repeat_an_alert(make_meter: MakeMeter) -> None:
    """Once reported in a month, a threshold stays reported: a refund or a top-up that
    takes usage back under it, then a charge past it again, reports nothing."""
    meter = make_meter(_policy())
    for _ in range(4):
        meter.check("key_1", org="org_a", operation="items.list")
    fifth = meter.check("key_1", org="org_a", operation="items.list")
    assert fifth.alerts == ("50%",)
    assert meter.refund(fifth) is True  # 40%
    meter.top_up("org_a", "1")  # 20% of 2
    assert _alerts(meter, 6) == [()] * 6  # back to 50% of 2: reported already
    assert _alerts(meter, 6)[-1] == ("80%",)  # 80% of 2


def test_a_new_month_reports_again(make_meter: MakeMeter, clock: FakeClock) -> None:
    """Thresholds are counted per calendar month: the next month reports them again."""
    meter = make_meter(_policy())
    assert ("50%",) in _alerts(meter, 5)
    clock.advance(31 * DAY)
    assert _alerts(meter, 5)[-1] == ("50%",)


def test_replays_peeks_and_rate_denials_report_nothing(make_meter: MakeMeter) -> None:
    """An idempotent retry answers the first decision without its alerts; a peek and a
    request denied by a rate tier charge nothing and reach nothing."""
    meter = make_meter(_policy(tiers=[Tier("burst", "key", "6/minute")]))
    for _ in range(4):
        meter.check("key_1", org="org_a", operation="items.list")
    assert meter.peek("key_1", org="org_a", operation="items.list").alerts == ()
    first = meter.check("key_1", org="org_a", operation="items.list", idempotency_key="i")
    again = meter.check("key_1", org="org_a", operation="items.list", idempotency_key="i")
    assert (first.alerts, again.alerts, again.replayed) == (("50%",), (), True)
    meter.check("key_1", org="org_a", operation="items.list")  # the sixth a minute: 60%
    denied = meter.check("key_1", org="org_a", operation="items.list", cost="0.3")
    assert (denied.reason, denied.alerts) == ("rate_limited", ())
    assert meter.check("key_2", org="org_a", operation="items.list", cost="0.3").alerts == ("80%",)


def test_organizations_and_modes_are_counted_apart(make_meter: MakeMeter) -> None:
    """Each organization, and each mode of one, has its own month and its own alerts."""
    meter = make_meter(_policy())
    assert _alerts(meter, 5)[-1] == ("50%",)
    assert _alerts(meter, 5, org="org_b")[-1] == ("50%",)
    assert _alerts(meter, 5, mode="test")[-1] == ("50%",)


def test_thresholds_follow_the_allowance_in_force(make_meter: MakeMeter) -> None:
    """A plan's allowance, or one set for the organization, is what the percents are of."""
    policy = _policy(plans=[CustomerPlan("big", {}, "2")])
    meter = make_meter(policy)
    meter.set_plan("org_a", "big")
    assert _alerts(meter, 10)[-1] == ("50%",)  # 1 of 2
    meter.set_allowance("org_b", "0.5")
    assert _alerts(meter, 3, org="org_b") == [(), (), ("50%",)]  # 0.3 of 0.5


def test_a_policy_without_thresholds_reports_none(make_meter: MakeMeter) -> None:
    """Without alerts in the policy, no check reports any, even one refused for credits."""
    meter = make_meter(_policy(alerts=()))
    assert set(_alerts(meter, 12)) == {()}


def test_a_shadow_policy_reports_past_the_allowance(make_meter: MakeMeter) -> None:
    """Shadow credits never deny; their thresholds are reported as usage reaches them."""
    meter = make_meter(_policy(shadow=True))
    found = _alerts(meter, 12)
    assert [i for i, a in enumerate(found) if a] == [4, 7, 9]


@settings(max_examples=200)
@given(
    percents=st.lists(st.integers(1, 100), min_size=1, max_size=5, unique=True).map(
        lambda p: tuple(sorted(p))
    ),
    total=st.integers(0, 2**53 - 1),
    demand=st.integers(0, 2**53 - 1),
)
def test_the_rule_is_exact_in_whole_micro_credits(
    percents: tuple[int, ...], total: int, demand: int
) -> None:
    """A threshold p is reached when the µ-credits used with the request are at least
    p% of the month's credits, rounded up to a whole µ-credit (as check.lua computes
    it without a product past 2**53)."""
    q, r = divmod(total, 100)
    expected = 0
    for p in percents:
        if demand <= 0 or demand < q * p + -(-(r * p) // 100):
            break
        expected += 1
    assert alerts_reached(percents, total, demand) == expected


@pytest.mark.parametrize(
    ("alerts", "location"),
    [
        (("80%", "80 %"), "alerts[1]"),
        (("0%",), "alerts[0]"),
        (("101%",), "alerts[0]"),
        (("80.5%",), "alerts[0]"),
        (("eighty",), "alerts[0]"),
        ("80%", "alerts"),
    ],
)
def test_bad_thresholds_are_refused(alerts: Any, location: str) -> None:
    """Thresholds are whole percents from 1 to 100, each once."""
    from meterkit import ConfigurationError

    with pytest.raises(ConfigurationError) as caught:
        CreditPlan("1", alerts=alerts)
    assert caught.value.location == location


def test_thresholds_are_sorted_and_written_alike() -> None:
    """'100%', 80 and ' 50 % ' are the thresholds 50%, 80% and 100%."""
    plan = CreditPlan("1", alerts=("100%", 80, " 50 % "))
    assert plan.alert_percents == (50, 80, 100)
    assert plan.alerts == ("50%", "80%", "100%")
