"""Meter.peek, on every backend (``make_meter``): check's answer, nothing consumed."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from meterkit import (
    InvalidRequestError,
    MemoryBackend,
    Meter,
    Tier,
    UnknownOperationError,
)
from tests.behaviour.test_meter import MIN, MakeMeter, _policy, at
from tests.conftest import FakeClock


def same_answer(peeked: Any, checked: Any) -> None:
    """A peek and the check after it agree on everything a caller reads."""
    assert peeked.allowed == checked.allowed
    assert peeked.reason == checked.reason
    assert peeked.status == checked.status
    assert peeked.retry_after == checked.retry_after
    assert peeked.charged == checked.charged
    assert peeked.balance == checked.balance
    assert peeked.outcome[4] == checked.outcome[4]  # every tier: remaining, reset, denied
    assert peeked.error == checked.error


def test_a_peek_answers_as_the_next_check_and_consumes_nothing(
    make_meter: MakeMeter, clock: FakeClock
) -> None:
    """Peeks before each check of a burst answer what that check answers; any number
    of them leaves tiers, credits and usage where they were."""
    meter = make_meter(_policy(Tier("key-min", "key", "3/minute"), Tier("org-day", "org", "5/day")))
    at(clock, 0)
    for step in range(5):
        for _ in range(3):
            peeked = meter.peek("k", org="o", operation="items.list")
        at(clock, step * 1_000)
        peeked = meter.peek("k", org="o", operation="items.list")
        checked = meter.check("k", org="o", operation="items.list")
        same_answer(peeked, checked)
        assert peeked.charge_id == ""
    usage = meter.usage("o")
    assert usage.requests == 3  # the three checks the burst admitted, no peek
    assert usage.credits_used == Decimal("0.03")


def test_a_peek_reports_credits_running_out_as_a_check_does(
    make_meter: MakeMeter, clock: FakeClock
) -> None:
    """Without credits left, a peek answers 402 with the month's end as retry_after."""
    meter = make_meter(_policy(Tier("key-min", "key", "10/minute"), allowance="0.05"))
    at(clock, 0)
    assert meter.check("k", org="o", operation="items.create").allowed
    peeked = meter.peek("k", org="o", operation="items.create")
    assert not peeked.allowed
    assert peeked.reason == "insufficient_credits"
    same_answer(peeked, meter.check("k", org="o", operation="items.create"))
    assert meter.peek("k", org="o", operation="items.create", cost="0").allowed


def test_a_peek_in_a_new_month_leaves_the_old_account_alone(
    make_meter: MakeMeter, clock: FakeClock
) -> None:
    """A peek at the start of a month writes nothing, not even the month's turn; the
    check after it still sees last month's usage end and a fresh allowance."""
    meter = make_meter(_policy(Tier("key-min", "key", "10/minute"), allowance="0.05"))
    at(clock, 0)
    meter.check("k", org="o", operation="items.create")
    at(clock, 31 * 24 * 60 * MIN)  # 2026-02-01
    peeked = meter.peek("k", org="o", operation="items.create")
    assert peeked.allowed
    assert meter.usage("o").requests == 0
    same_answer(peeked, meter.check("k", org="o", operation="items.create"))


def test_a_peek_takes_a_check_s_arguments_and_refuses_what_check_refuses(
    make_meter: MakeMeter, clock: FakeClock
) -> None:
    """Bad input raises the error check would raise; an admitted peek refunds nothing."""
    meter = make_meter(_policy(Tier("key-min", "key", "3/minute")))
    at(clock, 0)
    with pytest.raises(UnknownOperationError):
        meter.peek("k", org="o", operation="nothing.here")
    with pytest.raises(InvalidRequestError):
        meter.peek("k", org="o", operation="items.list", mode="staging")
    peeked = meter.peek("k", org="o", operation="items.list", mode="test")
    assert peeked.allowed
    assert meter.refund(peeked) is False
    assert meter.usage("o", mode="test").requests == 0


def test_a_backend_without_peek_is_refused_clearly(clock: FakeClock) -> None:
    """A backend of your own without peek: InvalidRequestError naming it."""

    class Plain(MemoryBackend):
        peek = None  # type: ignore[assignment]

    meter = Meter(_policy(Tier("key-min", "key", "3/minute")), Plain(clock=clock))
    with pytest.raises(InvalidRequestError, match="Plain cannot peek"):
        meter.peek("k", org="o", operation="items.list")


def test_a_peek_keeps_nothing_in_memory(clock: FakeClock) -> None:
    """On MemoryBackend a peek of a new organization, key and month
    adds no account, identity or tier state (it may tidy: drop what a window turn or
    a trimmed log no longer needs, as a check's look does)."""
    backend = MemoryBackend(clock=clock)
    meter = Meter(
        _policy(Tier("key-min", "key", "3/minute"), Tier("org-day", "org", "5/day")), backend
    )
    at(clock, 0)
    meter.check("k", org="o", operation="items.list")
    size, accounts = backend.size(), dict(backend._accounts)
    meter.peek("k2", org="o", operation="items.list")
    meter.peek("k", org="o2", operation="items.list")
    assert backend.size() == size
    at(clock, 31 * 24 * 60 * MIN)
    meter.peek("k", org="o", operation="items.list")
    assert backend.size() <= size
    assert backend._accounts == accounts
    assert backend._accounts["o"].idents == {"k": "o\x1fk"}
