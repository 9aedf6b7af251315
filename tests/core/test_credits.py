"""Credit amounts: the integer text of a header is the Decimal's text."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meterkit.core.credits import MAX_MICRO, credits_text, from_micro


@given(
    micro=st.integers(-MAX_MICRO, MAX_MICRO)
    | st.integers(-(10**12), 10**12).map(lambda n: n * 10**6)
    | st.integers(-(10**9), 10**9).map(lambda n: n * 10**4)
)
def test_credits_text_is_the_decimal_text(micro: int) -> None:
    """``credits_text`` writes any amount exactly as ``str(from_micro(...))`` does:
    whole credits without a point, no trailing zeros, a sign for negatives."""
    assert credits_text(micro) == str(from_micro(micro))


def test_credits_text_examples() -> None:
    """The seed's amounts as headers show them."""
    assert credits_text(10_000) == "0.01"
    assert credits_text(9_999_990_000) == "9999.99"
    assert credits_text(10_000_000_000) == "10000"
    assert credits_text(0) == "0"
    assert credits_text(1) == "0.000001"
    assert credits_text(-500_000) == "-0.5"
