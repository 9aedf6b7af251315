"""Conformance of the response records: ``lua/response.lua`` does what the memory backend
(``meterkit.core.idempotency``, the reference) does.

Hypothesis draws traces over a few (organization, mode, caller, idempotency key)
slots: charges made (a charge's first decision, at the current time), claims by
retries (with one of two fingerprints, lock times of 1 or 60 s), ends of runs (a
payload, a response too large to keep, or nothing), and clock steps across the lock
time and the 24 hours. Memory and Redis (standalone and Cluster) play the same trace
on the same fake clock and must answer every claim alike.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterkit import MemoryBackend, Policy, StateError
from meterkit.backends.redis.backend import RedisBackend
from meterkit.core.idempotency import BUSY, DONE, REUSED, RUN, Held, claim, keep
from meterkit.core.outcome import Outcome
from meterkit.core.plan import Plan
from tests.conftest import FakeClock, delete_prefix, new_prefix, shared_client

POLICY = Policy.crane_ledger()
OP = POLICY.plan_for("invoices.create")
# (org, mode, caller, idempotency key): ids with ':' and braces, the same key string in
# two organizations, modes and callers, and callers whose ids could run into the key's.
SLOTS = (
    ("org_a", "live", "key_1", "k"),
    ("org_b", "live", "key_1", "k"),
    ("org_a", "test", "key_1", "k"),
    ("org_a", "live", "key_2", "k"),
    ("o{x}", "live", "a:b", "c"),
    ("o{x}", "live", "a", "b:c"),
)
STEPS_US = (0, 1, 999_999, 1_000_000, 59_999_999, 60_000_000, 61_000_000, 3_600_000_000)
DAY_US = 86_400_000_000
PAYLOADS = (b"", b"\x93\xcd\x00\xc9\x90\xc4\x02{}", b"line\nbreaks\n\x00and nul", b"x" * 3000)

# Most steps on the first slot, so that a trace meets the same record again and again.
slots = st.sampled_from((0, 0, 0, 0, 1, 2, 3, 4, 5))
steps = st.one_of(
    st.tuples(st.just("charge"), slots),
    st.tuples(
        st.just("claim"),
        slots,
        st.integers(0, 2),  # which of the slot's charges (the newest when fewer)
        st.sampled_from(("fp-1", "fp-2")),
        st.sampled_from((1_000_000, 60_000_000)),
    ),
    st.tuples(
        st.just("keep"),
        slots,
        st.integers(0, 2),
        st.sampled_from(("fp-1", "fp-2")),
        st.integers(0, 3),  # whose run: the first attempt (0) or a claim's
        st.none() | st.sampled_from(PAYLOADS),
    ),
    st.tuples(st.just("wait"), st.sampled_from(STEPS_US) | st.sampled_from((DAY_US, DAY_US - 1))),
)


def plan_of(slot: int) -> Plan:
    org, mode, key, idem = SLOTS[slot]
    return Plan(POLICY, OP, key, org, mode, 50_000, idem)  # type: ignore[arg-type]


def outcome_of(charge: str, first_us: int) -> Outcome:
    return Outcome(True, 0, first_us, 0, (), 50_000, 0, 0, charge, False)


def play(trace: list[tuple[Any, ...]], client: Any) -> None:
    clock = FakeClock()
    memory = MemoryBackend(clock=clock)
    prefix = new_prefix()
    redis = RedisBackend(client, prefix=prefix, clock=clock)
    charges: dict[int, list[Outcome]] = {}
    tokens: dict[int, list[str]] = {}
    made = 0
    try:
        for i, step in enumerate(trace):
            now = round(clock() * 1_000_000)
            where = f"step {i}: {step}"
            if step[0] == "charge":
                made += 1
                charges.setdefault(step[1], []).append(outcome_of(f"c{made}", now))
                continue
            if step[0] == "wait":
                clock.advance(step[1] / 1_000_000)
                continue
            slot = step[1]
            held = charges.get(slot)
            if not held:
                continue
            outcome = held[min(step[2], len(held) - 1)]
            if step[0] == "claim":
                _, _, _, fp, lock = step
                token = f"t{i}"
                tokens.setdefault(slot, []).append(token)
                a = memory.claim_response(plan_of(slot), outcome, fp, token, lock)
                b = redis.claim_response(plan_of(slot), outcome, fp, token, lock)
                assert a == b, where
            else:
                _, _, _, fp, whose, payload = step
                runs = ["", *tokens.get(slot, [])]
                token = runs[min(whose, len(runs) - 1)]
                memory.keep_response(plan_of(slot), outcome, fp, token, payload)
                redis.keep_response(plan_of(slot), outcome, fp, token, payload)
        # Every record ends alike: a last claim of each charge, after the lock time.
        clock.advance(61)
        for slot, outcomes in charges.items():
            for outcome in outcomes:
                a = memory.claim_response(plan_of(slot), outcome, "fp-1", "last", 60_000_000)
                b = redis.claim_response(plan_of(slot), outcome, "fp-1", "last", 60_000_000)
                assert a == b, f"last claim of {outcome.charge_id} in slot {slot}"
    finally:
        delete_prefix(client, prefix)


@settings(max_examples=150)
@given(trace=st.lists(steps, min_size=1, max_size=40))
def test_redis_answers_claims_as_memory_does(client: Any, trace: list[tuple[Any, ...]]) -> None:
    """Random traces of charges, claims, kept and freed runs and clock steps get the same
    claim verdicts (and waits, and kept payloads) from Redis as from memory."""
    play(trace, client)


def test_a_hand_written_trace(client: Any) -> None:
    """The first attempt's mark, a take-over after the lock time, a late first attempt
    that finds the mark taken, the kept response, a reused key, another charge's record
    and the end of the 24 hours agree on both."""
    trace: list[tuple[Any, ...]] = [
        ("charge", 0),
        ("claim", 0, 0, "fp-1", 60_000_000),  # the first attempt runs: wait 60 s
        ("wait", 59_999_999),
        ("claim", 0, 0, "fp-1", 60_000_000),  # 1 µs left
        ("wait", 1),
        ("claim", 0, 0, "fp-1", 60_000_000),  # taken over (token t4)
        ("keep", 0, 0, "fp-1", 0, b"first, late"),  # refused: t4 holds the mark
        ("claim", 0, 0, "fp-2", 60_000_000),  # another request under the key
        ("keep", 0, 0, "fp-1", 1, b"taken over"),
        ("claim", 0, 0, "fp-1", 60_000_000),  # the kept response
        ("claim", 0, 0, "fp-2", 60_000_000),
        ("charge", 1),
        ("keep", 1, 0, "fp-1", 0, None),  # ended with nothing kept: free
        ("claim", 1, 0, "fp-1", 60_000_000),  # runs at once
        ("keep", 1, 0, "fp-1", 1, b""),  # too large to keep
        ("claim", 1, 0, "fp-1", 60_000_000),
        ("charge", 1),  # a new charge of the same key: the old record does not count
        ("claim", 1, 1, "fp-1", 60_000_000),
        ("wait", DAY_US),
        ("claim", 0, 0, "fp-1", 60_000_000),
    ]
    play(trace, client)


def test_the_rule_itself() -> None:
    """The reference rule step by step: the first attempt's own mark, a take-over, a late
    keep refused, the kept response, a reused key, a freed key, another charge."""
    first, lock = 1_000_000, 60_000_000
    assert claim(None, "c1", first, "f", "t1", lock, first + 5) == ((BUSY, lock - 5), None)
    verdict, taken = claim(None, "c1", first, "f", "t1", lock, first + lock)
    assert verdict == (RUN, None)
    assert taken == Held("L", "c1", "f", "t1", first + 2 * lock, b"", first + DAY_US)
    assert keep(taken, "c1", first, "f", "", b"late", first + lock + 1) is None
    assert claim(taken, "c1", first, "g", "t2", lock, first + lock + 1) == ((REUSED, None), None)
    done = keep(taken, "c1", first, "f", "t1", b"kept", first + lock + 2)
    assert done is not None
    assert claim(done, "c1", first, "f", "t2", lock, first + lock + 3) == ((DONE, b"kept"), None)
    assert keep(done, "c1", first, "f", "t9", b"other", first + lock + 3) is None
    freed = keep(None, "c1", first, "f", "", None, first + 10)
    assert freed is not None
    assert claim(freed, "c1", first, "f", "t3", lock, first + 11)[0] == (RUN, None)
    assert claim(done, "c2", first, "f", "t3", lock, first + 5)[0] == (BUSY, lock - 5)
    assert claim(done, "c1", first, "f", "t3", lock, first + DAY_US) == ((RUN, None), None)


def test_a_record_meterkit_did_not_write_is_a_state_error(redis_url: str, request: Any) -> None:
    """A response record holding something else raises StateError, as every other key does."""
    client = shared_client(request, redis_url)
    prefix = new_prefix()
    redis = RedisBackend(client, prefix=prefix, clock=FakeClock())
    try:
        client.set(redis._codec.response_key(plan_of(0)), b"not a record")
        with pytest.raises(StateError):
            redis.claim_response(plan_of(0), outcome_of("c1", 0), "f", "t", 60_000_000)
    finally:
        delete_prefix(client, prefix)
