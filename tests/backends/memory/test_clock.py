"""The memory backend's clock: bad readings are typed errors that change nothing, and
a clock that calls back into the meter cannot deadlock it."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest

from meterkit import InvalidRequestError, MemoryBackend, Meter, Policy
from tests.conftest import FakeClock

BAD_READINGS: list[Any] = [
    None,
    "now",
    math.nan,
    math.inf,
    -math.inf,
    1e300,
    253_402_300_800.0,  # 10000-01-01: past the last calendar month
    -1.0,
]


@pytest.mark.parametrize("reading", BAD_READINGS, ids=repr)
def test_a_bad_clock_reading_is_a_typed_error_and_changes_nothing(
    clock: FakeClock, reading: Any
) -> None:
    """check, peek, usage, top_up and refund refuse a reading that is not a finite
    time in 1970..9999 with InvalidRequestError; the next good reading finds every
    count, balance and the high-water mark as they were."""
    readings: list[Any] = []

    def flaky() -> Any:
        return readings.pop() if readings else clock()

    meter = Meter(Policy.crane_ledger(), MemoryBackend(clock=flaky))
    first = meter.check("key_1", org="org_1", operation="invoices.list")
    before = meter.usage("org_1")
    calls = [
        lambda: meter.check("key_1", org="org_1", operation="invoices.list"),
        lambda: meter.peek("key_1", org="org_1", operation="invoices.list"),
        lambda: meter.usage("org_1"),
        lambda: meter.top_up("org_1", "5"),
        lambda: meter.refund(first),
    ]
    for call in calls:
        readings.append(reading)
        with pytest.raises(InvalidRequestError, match=r"^clock "):
            call()
        readings.clear()
    after = meter.usage("org_1")
    assert after == before
    assert meter.check("key_1", org="org_1", operation="invoices.list").allowed
    assert meter.usage("org_1").requests == 2


def test_a_clock_that_calls_back_into_the_meter_does_not_deadlock(clock: FakeClock) -> None:
    """The clock is read before the backend's lock is taken: a clock that asks the
    meter for usage (or checks) from inside a check is answered."""
    meter: Meter | None = None
    calls: list[int] = []

    def curious() -> float:
        if meter is not None and not calls:  # once: the first check's reading
            calls.append(1)
            meter.usage("org_1")
            meter.check("key_2", org="org_1", operation="invoices.list")
        return clock()

    meter = Meter(Policy.crane_ledger(), MemoryBackend(clock=curious))
    done: list[bool] = []
    worker = threading.Thread(
        target=lambda: done.append(
            meter.check("key_1", org="org_1", operation="invoices.list").allowed
        ),
        daemon=True,
    )
    worker.start()
    worker.join(10)  # only a deadlock takes this long
    assert not worker.is_alive(), "the check deadlocked on its own clock"
    assert done == [True]
    assert meter.usage("org_1").requests == 2
