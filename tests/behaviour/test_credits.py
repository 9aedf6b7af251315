"""Credit amounts: exact micro-credit integers inside, Decimals at the edges."""

from __future__ import annotations

import math
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterkit import (
    InvalidAmountError,
    InvalidRequestError,
    MeterkitError,
    Policy,
    from_micro,
    to_micro,
)
from meterkit.core.credits import MAX_MICRO, MICRO


@pytest.mark.parametrize(
    ("value", "micro"),
    [
        ("0.01", 10_000),
        ("0.000001", 1),
        (Decimal("0.000001"), 1),
        (Decimal("1.0000000"), 1_000_000),
        ("1e-6", 1),
        ("  2.5 ", 2_500_000),
        (5, 5_000_000),
        (0, 0),
        ("0", 0),
        (Decimal("-0"), 0),
        (0.1, 100_000),
        (0.15, 150_000),
        (1e-6, 1),
        (10000.0, 10_000_000_000),
        ("9007199254.740991", MAX_MICRO),
    ],
)
def test_to_micro_accepts_exact_amounts(value: object, micro: int) -> None:
    """Decimals, strings, ints and shortest-repr floats convert to exact micro-credits."""
    assert to_micro(value) == micro


@pytest.mark.parametrize(
    "value",
    [
        math.nan,
        math.inf,
        -math.inf,
        "nan",
        "sNaN",
        "Infinity",
        Decimal("NaN"),
        -1,
        "-0.01",
        -0.5,
        Decimal("-0.000001"),
        "0.0000001",
        0.1234567,
        1e-7,
        "1e-30",
        "1.0000000000000000000000000001",
        "1e-9999999",
        "1e999999",
        Decimal("1e999999"),
        "9007199254.740992",
        2**53,
        True,
        False,
        None,
        [],
        b"1",
        "",
        "abc",
        "1,5",
    ],
)
def test_to_micro_refuses_inexact_or_invalid_amounts(value: object) -> None:
    """NaN, infinities, negatives, sub-micro precision, overflow and non-numbers are refused."""
    with pytest.raises(InvalidAmountError) as info:
        to_micro(value, "cost")
    assert isinstance(info.value, InvalidRequestError)
    assert isinstance(info.value, MeterkitError)
    assert isinstance(info.value, ValueError)
    assert "cost" in str(info.value)


def test_from_micro_is_exact_and_prints_plainly() -> None:
    """Micro-credits come back as exact Decimals that print without float noise."""
    assert from_micro(10_000) == Decimal("0.01")
    assert str(from_micro(10_000)) == "0.01"
    assert str(from_micro(150_000)) == "0.15"
    assert str(from_micro(10_000_000_000)) == "10000"
    assert str(from_micro(9_999_990_000)) == "9999.99"
    assert str(from_micro(0)) == "0"
    assert from_micro(MAX_MICRO) == Decimal(MAX_MICRO) / MICRO


@given(st.integers(0, MAX_MICRO))
def test_micro_round_trips_through_decimal_and_text(micro: int) -> None:
    """Every representable amount survives Decimal and its text form unchanged."""
    amount = from_micro(micro)
    assert to_micro(amount) == micro
    assert to_micro(str(amount)) == micro


@given(st.integers(0, 10**9), st.integers(0, 6))
def test_floats_with_at_most_six_decimals_are_exact(units: int, places: int) -> None:
    """A float whose shortest repr has at most six decimals means exactly that amount."""
    exact = Decimal(units).scaleb(-places)  # at most 10 digits: repr round-trips them
    assert to_micro(float(exact)) == units * 10 ** (6 - places)


@given(st.integers(1, 10**20).filter(lambda n: n % 10 != 0), st.integers(7, 40))
def test_more_than_six_decimal_places_are_refused(digits: int, places: int) -> None:
    """Any amount with a nonzero seventh (or later) decimal is refused, whatever its size."""
    value = Decimal(digits).scaleb(-places)
    with pytest.raises(InvalidAmountError):
        to_micro(value)
    with pytest.raises(InvalidAmountError):
        to_micro(str(value))


def test_from_micro_is_exact_whatever_the_callers_decimal_context() -> None:
    """A caller's low decimal precision does not round balances or prices."""
    import decimal

    from meterkit import from_micro

    with decimal.localcontext() as ctx:
        ctx.prec = 3
        assert str(from_micro(9_999_990_000)) == "9999.99"
        assert str(from_micro(2**53 - 1)) == "9007199254.740991"


def test_top_ups_past_the_exact_range_are_refused_before_anything_is_written(
    make_meter: Callable[[Policy], Any],
) -> None:
    """Two legal top-ups whose sum passes 2^53 - 1 µ-credits: the second raises
    InvalidAmountError and writes nothing; checks and usage go on (issue 17, item 6)."""
    from meterkit import InvalidAmountError

    meter = make_meter(Policy.crane_ledger())
    meter.top_up("org_1", "9007199254")
    before = meter.usage("org_1")
    with pytest.raises(InvalidAmountError):
        meter.top_up("org_1", "9007199254")
    assert meter.usage("org_1") == before
    assert meter.check("key_1", org="org_1", operation="invoices.list").allowed


def test_a_refund_returns_only_what_the_backend_recorded(
    make_meter: Callable[[Policy], Any],
) -> None:
    """A caller-built Decision is refused, whatever it claims (more than was charged,
    or a charge id the backend never issued): usage never goes below what was really
    spent, and a refund returns only what a check charged."""
    from meterkit import Decision, InvalidRequestError

    meter = make_meter(Policy.crane_ledger())
    real = meter.check("key_1", org="org_1", operation="invoices.list")
    before = meter.usage("org_1")
    forgeries = [
        Decision(real.request, real.outcome._replace(charged=4_990_000)),
        Decision(real.request, real.outcome._replace(charge_id="made-up", charged=1)),
        Decision(real.request, real.outcome),  # even a copy of a real one
    ]
    for forged in forgeries:
        with pytest.raises(InvalidRequestError, match="built by hand"):
            meter.refund(forged)
        assert meter.usage("org_1") == before
    assert meter.refund(real) is True
    assert meter.usage("org_1").credits_used == 0
