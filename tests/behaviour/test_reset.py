"""Meter.reset_limits, on every backend (``make_meter``): forget a key's or an
organization's rate-limit state, and nothing else."""

from __future__ import annotations

from decimal import Decimal

import pytest

from meterkit import InvalidIdentifierError, InvalidRequestError, Tier
from tests.behaviour.test_meter import MakeMeter, _policy, at
from tests.conftest import FakeClock

TIERS = (
    Tier("key-min", "key", "2/minute"),
    Tier("key-log", "key", "3/minute", "sliding_log"),
    Tier("key-gcra", "key", "2/minute", "gcra", burst=2),
    Tier("org-min", "org", "4/minute", "sliding_window"),
)


def test_resetting_a_key_frees_its_tiers_only(make_meter: MakeMeter, clock: FakeClock) -> None:
    """After reset_limits(org, key) the key is admitted again with its key tiers full;
    the organization's tier, other keys, test mode, credits and usage are untouched."""
    meter = make_meter(_policy(*TIERS))
    at(clock, 0)
    for key in ("a", "a", "b"):
        assert meter.check(key, org="o", operation="items.list").allowed
    assert meter.check("a", org="o", operation="items.list", mode="test").allowed
    assert meter.check("a", org="o", operation="items.list").reason == "rate_limited"
    used = meter.usage("o")

    meter.reset_limits("o", "a")
    again = meter.check("a", org="o", operation="items.list")
    assert again.allowed
    assert [t.remaining for t in again.tiers] == [1, 2, 1, 0]  # the org tier kept its 3
    assert meter.check("b", org="o", operation="items.list").reason == "rate_limited"  # org full
    assert meter.usage("o").requests == used.requests + 1
    assert meter.usage("o").credits_used == used.credits_used + Decimal("0.01")
    test_mode = meter.peek("a", org="o", operation="items.list", mode="test")
    assert [t.remaining for t in test_mode.tiers] == [0, 1, 0, 2]  # its state is its own


def test_resetting_an_organization_frees_its_tiers_only(
    make_meter: MakeMeter, clock: FakeClock
) -> None:
    """reset_limits(org) forgets the organization-scoped tiers; its keys keep theirs."""
    meter = make_meter(_policy(*TIERS))
    at(clock, 0)
    for key in ("a", "a", "b", "c"):
        assert meter.check(key, org="o", operation="items.list").allowed
    assert meter.check("d", org="o", operation="items.list").reason == "rate_limited"
    meter.reset_limits("o")
    assert meter.check("d", org="o", operation="items.list").allowed
    assert meter.check("a", org="o", operation="items.list").reason == "rate_limited"
    meter.reset_limits("unknown_org")  # nothing to forget: fine
    meter.reset_limits("o", "never_seen")


def test_reset_limits_checks_its_arguments(make_meter: MakeMeter) -> None:
    """Bad ids and modes are refused before anything is forgotten."""
    meter = make_meter(_policy(*TIERS))
    with pytest.raises(InvalidIdentifierError):
        meter.reset_limits("o\n", "a")
    with pytest.raises(InvalidIdentifierError):
        meter.reset_limits("o", "a\x1fb")
    with pytest.raises(InvalidRequestError):
        meter.reset_limits("o", "a", mode="staging")
