"""TTLs of the Lua scripts' state keys with ``clock_skew=0`` (issue 17 items 15, 16).

The conformance suite plays traces with a 60 s grace on every TTL, and no key expires
during a trace, so it cannot see a TTL that is too short. Here no grace is given, and
a state key's expiry is read back from Redis: a key must live until the reference
(the memory backend, which never expires anything) has forgotten the state too, or
Redis would refill a bucket, or restart a window, too early.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterkit import Category, CostTable, CreditPlan, MemoryBackend, Meter, Operation, Policy, Tier
from meterkit.backends.redis.backend import RedisBackend
from tests.conftest import FakeClock, delete_prefix, new_prefix, shared_client


@pytest.fixture
def client(request: pytest.FixtureRequest, redis_url: str) -> Any:
    return shared_client(request, redis_url)


def _policy(tier: Tier) -> Policy:
    return Policy(
        [tier],
        CostTable((Category("c", "0.01", "1"),), (Operation("op", "c", "0.01"),)),
        CreditPlan("1000000"),
    )


def _state_keys(client: Any, prefix: str) -> list[bytes]:
    """The tier state keys under ``prefix`` (not the credit account or allowance)."""
    return [
        k
        for k in client.scan_iter(match=prefix + ":*", count=1000)
        if not k.endswith((b":cr", b":al"))
    ]


@pytest.mark.parametrize("batched", [False, True])
def test_a_check_500_us_before_a_window_ends_gets_a_ttl_of_at_least_1_ms(
    client: Any, batched: bool
) -> None:
    """With 500 µs of the window left, the state's TTL rounds up to 1 ms: rounded down
    to 0 it would be refused by Redis, and every such check would raise."""
    clock = FakeClock(1_767_225_600.9995)  # 500 µs before a second ends
    prefix = new_prefix()
    meter = Meter(
        _policy(Tier("t", "key", "2/second", "fixed_window")),
        RedisBackend(client, prefix=prefix, clock=clock, clock_skew=0),
    )
    try:
        if batched:
            decisions = meter.check_many([("k", "op", "o"), ("k2", "op", "o")])
        else:
            decisions = [meter.check("k", org="o", operation="op")]
        assert all(d.allowed for d in decisions)
    finally:
        delete_prefix(client, prefix)


def test_a_gcra_key_lives_until_its_theoretical_arrival_time(client: Any) -> None:
    """After a burst of 5 at one instant on 10/second, the bucket is full again only
    500 ms later: the key must live that long, not one emission interval (100 ms)."""
    clock = FakeClock()
    prefix = new_prefix()
    meter = Meter(
        _policy(Tier("t", "key", "10/second", "gcra", burst=5)),
        RedisBackend(client, prefix=prefix, clock=clock, clock_skew=0),
    )
    try:
        for _ in range(4):
            assert meter.check("k", org="o", operation="op").allowed
        before = time.time() * 1000
        assert meter.check("k", org="o", operation="op").allowed
        after = time.time() * 1000
        (key,) = _state_keys(client, prefix)
        # (Redis dates it from its clock, truncated to the millisecond)
        assert before + 500 - 1 <= client.pexpiretime(key) <= after + 500 + 1
    finally:
        delete_prefix(client, prefix)


WINDOWS = ("second", "2 seconds", "5 seconds", "minute")
# On a grid of 250 ms: every state key lives 200 ms or more in real time, so none
# expires during a burst even on a busy machine (the last millisecond of a window is
# the test above).
STARTS = (1_767_225_600.0, 1_769_903_995.5, 1_798_761_599.0, 1_767_225_600.75)


#: How much earlier than the real time read before a check Redis may date a TTL from.
SLACK_MS = 20


@st.composite
def tiers(draw: st.DrawFn) -> Tier:
    algorithm = draw(st.sampled_from(("fixed_window", "sliding_window", "gcra", "sliding_log")))
    limit = draw(st.integers(1, 5))
    burst = draw(st.none() | st.integers(1, 6)) if algorithm == "gcra" else None
    window = draw(st.sampled_from(WINDOWS))
    return Tier("t", draw(st.sampled_from(("key", "org"))), f"{limit}/{window}", algorithm, burst)


@settings(max_examples=150, deadline=None)
@given(
    tier=tiers(),
    start=st.sampled_from(STARTS),
    offsets=st.lists(
        st.sampled_from((0, 0, 250_000, 1_000_000, 2_000_000)), min_size=1, max_size=10
    ),
)
def test_every_state_key_lives_until_the_reference_has_forgotten_it(
    client: Any, tier: Tier, start: float, offsets: list[int]
) -> None:
    """Any burst, then: at the latest instant Redis may drop the tier's key, a check
    on the reference backend (which ran the same burst) must see what a fresh one
    sees. ``pexpiretime`` minus the real time before the last check (plus SLACK_MS)
    bounds the key's life from above, so the assertion never fails on a TTL that is
    long enough."""
    policy = _policy(tier)
    clock = FakeClock(start)
    prefix = new_prefix()
    redis = Meter(policy, RedisBackend(client, prefix=prefix, clock=clock, clock_skew=0))
    memory = Meter(policy, MemoryBackend(clock=clock))
    try:
        started = 0.0
        for offset in offsets:
            clock.advance(offset / 1_000_000)
            started = time.time()
            a = memory.check("k", org="o", operation="op")
            b = redis.check("k", org="o", operation="op")
            assert a.outcome.tiers == b.outcome.tiers
        keys = _state_keys(client, prefix)
        assert len(keys) <= 1
        if not keys:
            return  # (nothing admitted was remembered: a limit of 0 left, or denied)
        expires_ms = client.pexpiretime(keys[0])
        if expires_ms == -2:  # expired already (in real time): it lived no longer than now
            expires_ms = time.time() * 1000
        assert expires_ms > 0, "a state key without a TTL"
        # Redis dates a TTL from its own cached clock, truncated to the millisecond,
        # which on a loaded machine lags the real time read before the check (by 3.8 ms
        # seen once): SLACK_MS of it is not taken for a TTL too short. (A TTL one
        # interval short or rounded to 0 is still caught, here and in the tests above.)
        clock.advance(max(0.0, (expires_ms + SLACK_MS) / 1000 - started))
        fresh = Meter(policy, MemoryBackend(clock=clock))
        remembered = memory.peek("k", org="o", operation="op").outcome.tiers
        assert remembered == fresh.peek("k", org="o", operation="op").outcome.tiers
    finally:
        delete_prefix(client, prefix)
