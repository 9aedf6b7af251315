"""Credit amounts: integers of micro-credits inside, Decimal at the edges.

1 credit = 1,000,000 micro-credits. Lua numbers are doubles, exact below 2**53,
so every balance meterkit keeps stays below that bound (about 9 billion credits).
"""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation

from meterkit._errors import InvalidAmountError

MICRO = 1_000_000
MAX_MICRO = 2**53 - 1
_MICRO_DEC = Decimal(MICRO)

#: What the API accepts as an amount of credits.
Credits = Decimal | str | int | float


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
        scaled = dec.scaleb(6)
        if scaled != scaled.to_integral_value():
            raise InvalidAmountError(
                f"{what} has more than 6 decimal places (the unit is one micro-credit): {value!r}"
            )
        micro = int(scaled)
    if micro < 0:
        raise InvalidAmountError(f"{what} must not be negative, got {value!r}")
    if micro > MAX_MICRO:
        raise InvalidAmountError(f"{what} is too large: {value!r}")
    return micro


def from_micro(micro: int) -> Decimal:
    """Micro-credits as an exact ``Decimal`` number of credits (``10000`` → ``0.01``)."""
    return Decimal(micro) / _MICRO_DEC
