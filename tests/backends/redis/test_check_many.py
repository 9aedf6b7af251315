"""check_many on every backend (``make_meter``): many requests, each atomic on its own.

On Redis a batch is one round trip (pipelined; per node on Cluster); on memory it is a
loop. Either way the decisions are the ones the same checks made one by one would get.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from meterkit import (
    Category,
    CostTable,
    CreditPlan,
    InvalidIdentifierError,
    InvalidRequestError,
    Operation,
    Policy,
    Tier,
)

MakeMeter = Callable[[Policy], Any]


def _policy() -> Policy:
    return Policy(
        [
            Tier("key-min", "key", "3/minute"),
            Tier("org-min", "org", "5/minute", "sliding_window"),
            Tier("key-gcra", "key", "4/minute", "gcra", burst=2),
            Tier("key-log", "key", "3/minute", "sliding_log"),
        ],
        CostTable(
            (Category("read", "0.01", "0.01"), Category("write", "0.03", "0.15")),
            (Operation("items.list", "read", "0.01"), Operation("items.create", "write", "0.05")),
        ),
        CreditPlan("0.2"),
    )


REQUESTS: list[Any] = [
    ("k1", "items.list", "o1"),
    {"key": "k1", "operation": "items.create", "org": "o1", "idempotency_key": "a"},
    {"key": "k1", "operation": "items.create", "org": "o1", "idempotency_key": "a"},
    ("k2", "items.create", "o1", None, "0.1"),
    ("k3", "items.list", "o2", None, None, "test"),
    ["k1", "items.list", "o1"],
    ("k1", "items.list", "o1"),
    ("k4", "items.create", "o1"),
    ("k5", "items.create", "o1"),
    ("k6", "items.create", "o1"),
]


def _comparable(decision: Any) -> tuple[Any, ...]:
    out = decision.outcome
    return (*out[:8], bool(out[8]), out[9])


def test_a_batch_decides_as_the_same_checks_one_by_one(make_meter: MakeMeter) -> None:
    """Rate limits, credits, idempotent replays and test mode come out as one by one."""
    batch = make_meter(_policy()).check_many(REQUESTS)
    single = make_meter(_policy())
    one_by_one = []
    for request in REQUESTS:
        if isinstance(request, dict):
            one_by_one.append(single.check(**request))
        else:
            names = ("key", "operation", "org", "idempotency_key", "cost", "mode")
            one_by_one.append(single.check(**dict(zip(names, request, strict=False))))
    assert [_comparable(d) for d in batch] == [_comparable(d) for d in one_by_one]
    # k1's gcra bucket holds 2 (the replay takes none); 0.01 + 0.05 + 0.10 of 0.20 is spent
    # before k4's 0.05; test mode has its own credits.
    assert [d.reason for d in batch] == [None] * 5 + ["rate_limited"] * 2 + [
        "insufficient_credits"
    ] * 3
    assert batch[2].replayed
    assert batch[2].charge_id == batch[1].charge_id


def test_bad_input_anywhere_in_a_batch_raises_before_anything_is_applied(
    make_meter: MakeMeter,
) -> None:
    """One malformed request raises a typed error and none of the batch is counted."""
    meter = make_meter(_policy())
    bad: list[Any] = [
        [("k1", "items.list", "o1"), ("", "items.list", "o1")],
        [("k1", "items.list", "o1"), ("k1", "nope", "o1")],
        [("k1", "items.list", "o1"), {"key": "k1", "operation": "items.list", "colour": 1}],
        [("k1", "items.list", "o1"), {"operation": "items.list", "org": "o1"}],
        [("k1", "items.list", "o1"), ("k1", "items.list", "o1", None, None, "prod")],
        [("k1", "items.list", "o1"), ("k1", "items.list", "o1", None, None, "live", 7)],
        [("k1", "items.list", "o1"), "k1"],
    ]
    for requests in bad:
        with pytest.raises(InvalidRequestError):
            meter.check_many(requests)
    with pytest.raises(InvalidIdentifierError):
        meter.check_many([("k1", "items.list", "o1"), ("k\n", "items.list", "o1")])
    assert meter.usage("o1").requests == 0
    assert meter.check_many([]) == []


def test_one_requests_conflict_is_raised_after_the_rest_or_returned_in_place(
    make_meter: MakeMeter,
) -> None:
    """An idempotency conflict fails that request alone: raised last, or kept in place."""
    meter = make_meter(_policy())
    meter.check("k1", org="o1", operation="items.list", idempotency_key="x")
    requests = [
        ("k2", "items.list", "o1"),
        ("k2", "items.create", "o1", "x"),  # "x" was a k1 items.list request
        ("k3", "items.list", "o1"),
    ]
    with pytest.raises(InvalidRequestError, match="different request"):
        meter.check_many(requests)
    assert meter.usage("o1").requests == 3  # the other two were applied
    results = meter.check_many(requests, return_exceptions=True)
    assert isinstance(results[1], InvalidRequestError)
    assert results[0].allowed
    assert results[2].allowed
    assert meter.usage("o1").requests == 5
