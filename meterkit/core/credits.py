"""Credit amounts: integers of micro-credits inside, Decimal at the edges.

1 credit = 1,000,000 micro-credits. Lua numbers are doubles, exact below 2**53,
so every balance meterkit keeps stays below that bound (about 9 billion credits).
"""

from __future__ import annotations

import math
from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow

from meterkit.errors import InvalidAmountError

MICRO = 1_000_000
MAX_MICRO = 2**53 - 1
_MICRO_DEC = Decimal(MICRO)
# Scaling must be exact: the default context would round a 29th digit away (or flush a
# tiny amount to zero) without a word, and raise decimal.Overflow on huge exponents.
_EXACT = Context(prec=60, traps=[InvalidOperation, Inexact, Overflow])


def to_micro(value: object, what: str = "amount") -> int:
    """Convert an amount of credits to micro-credits, refusing anything inexact.

    Accepts ``Decimal``, ``str`` and ``int``; a ``float`` goes through its shortest
    repr (``0.1`` means ``Decimal("0.1")``). NaN, infinities, negatives, values finer
    than one micro-credit and values past 2**53 micro-credits raise
    :class:`InvalidAmountError`.
    """
    if type(value) is int:
        micro = value * MICRO
    else:
        if isinstance(value, bool) or not isinstance(value, (Decimal, str, int, float)):
            raise InvalidAmountError(
                f"{what} must be a Decimal, str, int or float, not {type(value).__name__}"
            )
        if isinstance(value, float):
            if not math.isfinite(value):
                raise InvalidAmountError(f"{what} must be finite, got {value!r}")
            value = repr(value)
        try:
            dec = Decimal(value.strip()) if isinstance(value, str) else Decimal(value)
        except InvalidOperation:
            raise InvalidAmountError(f"{what} is not a number: {value!r}") from None
        if not dec.is_finite():
            raise InvalidAmountError(f"{what} must be finite, got {value!r}")
        try:
            scaled = dec.scaleb(6, _EXACT)
        except Overflow:  # a subclass of Inexact
            raise InvalidAmountError(f"{what} is too large: {value!r}") from None
        except Inexact:  # it needs rounding: digits finer than one micro-credit
            scaled = None
        if scaled is None or scaled != scaled.to_integral_value():
            raise InvalidAmountError(
                f"{what} has more than 6 decimal places (the unit is one micro-credit): {value!r}"
            )
        micro = int(scaled)
    if micro < 0:
        raise InvalidAmountError(f"{what} must not be negative, got {value!r}")
    if micro > MAX_MICRO:
        raise InvalidAmountError(f"{what} is too large: {value!r}")
    return micro


# Our own context, so a caller who lowers the thread's decimal precision cannot round
# a balance: 2**53 micro-credits need 16 digits.
_DIVIDE = Context(prec=28).divide


def from_micro(micro: int) -> Decimal:
    """Micro-credits as an exact ``Decimal`` number of credits (``10000`` → ``0.01``)."""
    return _DIVIDE(Decimal(micro), _MICRO_DEC)


def credits_text(micro: int) -> str:
    r"""``str(from_micro(micro))``, from integers alone (a header per request needs it:
    a ``Decimal`` division costs several times more): ``"0.01"``, ``"10000"``,
    ``"-0.5"``, no trailing zeros, never an exponent (\|micro\| < 2**63)."""
    if micro < 0:
        return "-" + credits_text(-micro)
    whole, fraction = divmod(micro, MICRO)
    if not fraction:
        return str(whole)
    # (str(fraction + MICRO)[1:] is the fraction's six digits, without a format spec)
    return f"{whole}.{str(fraction + MICRO)[1:].rstrip('0')}"


def top_up_too_large() -> InvalidAmountError:
    """The error for a top-up that would take a month's top-ups past :data:`MAX_MICRO`
    (every backend checks before it writes anything)."""
    return InvalidAmountError(
        f"this top-up would take the month's top-ups past {from_micro(MAX_MICRO)} credits; "
        "nothing was added"
    )


def alerts_reached(percents: tuple[int, ...], total: int, demand: int) -> int:
    """How many credit alert thresholds (``percents`` of the month's credits, increasing)
    a request reaches: those with ``demand`` (the µ-credits used with the request's
    charge) at or past ``percents[i]`` % of ``total`` (the month's allowance and
    top-ups). A request that uses nothing reaches none; one refused for credits asks
    for more than ``total``, and so reaches them all. (check.lua writes this rule for
    Redis, without a product past 2**53.)"""
    if demand <= 0:
        return 0
    reached = 0
    for percent in percents:
        if demand * 100 < total * percent:
            break
        reached += 1
    return reached
