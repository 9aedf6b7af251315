"""Idempotency-Key against a reference model: Hypothesis interleaves requests, retries,
answers, runs that never end and clock steps, on a fake clock, through the gate (as a
blocking shell drives it) on the memory backend and on Redis.

The model is the promise written out: a key's first request runs and is charged; a
retry gets the kept response (byte for byte, marked as a replay), 422 for another body,
409 while a run holds the key (the first attempt for the lock time from its charge, a
retry that took over for the lock time from its start); a run that ended with nothing
kept (a 5xx, a status not kept, a body cut short) frees the key for the next retry; a
5xx of a first attempt is refunded, so its retry is a new first request. Above all: a
key's handler never runs again while a response of its charge is kept (24 hours).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import meterkit
from meterkit.backends.redis.backend import RedisBackend
from meterkit.http.gate import Admission, Gate, RequestView, Response
from tests.conftest import FakeClock, delete_prefix, new_prefix, shared_client

ORG = "org_a"
PATH = f"/organizations/{ORG}/invoices"
LOCK = 60
DAY = 86_400  # (25 steps of a day at most: every refund falls in the month of its charge)
MAX_BODY = 64
KEYS = ("k1", "k2")
BODIES = (b'{"amount": 1}', b'{"amount": 2}')
#: How a run ends: its status, whether its body is too large to keep, whether it ends.
ENDINGS = {
    "kept": (201, False, True),
    "too large": (201, True, True),
    "not kept": (403, False, True),
    "failed": (500, False, True),
    "cut short": (201, False, False),
}

# Mostly one key and one body, so that a trace meets its own records again and again.
sends = st.tuples(
    st.just("send"),
    st.sampled_from(KEYS[:1] * 3 + KEYS[1:]),
    st.sampled_from(BODIES[:1] * 3 + BODIES[1:]),
)
steps = st.one_of(
    sends,
    sends,
    st.tuples(st.just("end"), st.integers(0, 3), st.sampled_from(sorted(ENDINGS))),
    st.tuples(st.just("die"), st.integers(0, 3)),  # a run whose process died: it never ends
    st.tuples(st.just("wait"), st.sampled_from((1, 30, 59, 60, 61, 3_600, DAY - 1, DAY))),
)


@dataclass
class Run:
    """A run of the handler under way."""

    number: int
    key: str
    body: bytes
    token: str  # "" for a first attempt (its mark is its charge's record)
    charge: int
    admission: Admission


@dataclass
class Slot:
    """What the model knows of one idempotency key: its charge and response record."""

    charge: int = 0  # 0: none (or refunded, or gone)
    first: int = 0
    #: (kind, body sent, response body or None when too large, run token, lock end)
    record: tuple[str, bytes, bytes | None, str, int] | None = None
    kept_since: list[int] = field(default_factory=list)


def answer(gate: Gate, admission: Admission, status: int, body: bytes, whole: bool) -> None:
    """What a blocking shell does with the app's answer: headers, refund, keep."""
    extra = gate.answered(admission, status)
    if extra is None:
        extra = gate.finish_blocking(admission, status)
    keeping = admission.keeping
    assert keeping is not None
    keeping.start(status, [("Content-Type", "application/json")], extra)
    keeping.add(body, last=whole)
    gate.keep_blocking(admission)


def play(meter: Any, clock: FakeClock, trace: list[tuple[Any, ...]]) -> None:
    store = meterkit.MemoryKeyStore(clock=clock)
    plaintext, _ = store.create(org=ORG, permissions=["*"])
    gate = Gate(meter, store, idempotency_max_body=MAX_BODY)
    slots = {key: Slot() for key in KEYS}
    runs: list[Run] = []
    charges = refunds = numbers = 0
    for i, step in enumerate(trace):
        now = round(clock())
        where = f"step {i}: {step}"
        if step[0] == "wait":
            clock.advance(step[1])
            continue
        if step[0] in ("end", "die"):
            if not runs:
                continue
            run = runs.pop(step[1] % len(runs))
            if step[0] == "die":
                continue
            status, large, whole = ENDINGS[step[2]]
            body = b'{"run": %d}' % run.number + (b" " * MAX_BODY if large else b"")
            answer(gate, run.admission, status, body, whole)
            slot = slots[run.key]
            if status == 500 and run.token == "":
                refunds += 1  # (a first attempt's charge: refunded, whatever came since)
                if run.charge == slot.charge:
                    slot.charge, slot.record = 0, None  # the retry is a new request
                continue
            if run.charge != slot.charge:
                continue  # (its charge is gone: nothing of it counts any more)
            held = slot.record
            if slot.first + DAY <= now or (held is not None and held[0] == "D"):
                continue
            if held is not None and held[0] == "L" and held[3] != run.token and held[4] > now:
                continue
            if status == 201 and whole:
                slot.record = ("D", run.body, None if large else body, "", 0)
                slot.kept_since.append(now)
            else:
                slot.record = ("F", run.body, None, "", 0)
            continue
        _, key, sent = step
        headers = {"authorization": f"Bearer {plaintext}", "idempotency-key": key}
        view = RequestView("POST", PATH, headers=headers, body=sent)
        found = gate.admit_blocking(view)
        slot = slots[key]
        if slot.charge and slot.first + DAY <= now:
            slot.charge, slot.record = 0, None  # the charge's 24 hours are over
        held = slot.record
        expected: Any
        if not slot.charge:
            expected = "first"
        elif held is not None and held[1] != sent:
            expected = 422
        elif held is not None and held[0] == "D":
            expected = ("replay", held[2])
        elif (held is None and slot.first + LOCK > now) or (
            held is not None and held[0] == "L" and held[4] > now
        ):
            expected = 409  # the first attempt's mark, or a retry's
        else:
            expected = "take over"
        if isinstance(found, Admission):
            assert expected in ("first", "take over"), where
            assert not (slot.charge and any(t >= slot.first for t in slot.kept_since)), where
            numbers += 1
            token = found.keeping.token if found.keeping is not None else None
            if expected == "first":
                assert token == "", where
                charges += 1
                slot.charge, slot.first, slot.record = charges, now, None
            else:
                assert token, where
                slot.record = ("L", sent, None, token, now + LOCK)
            runs.append(Run(numbers, key, sent, token or "", slot.charge, found))
            continue
        assert isinstance(found, Response), where
        if isinstance(expected, tuple):
            kept = expected[1]
            if kept is None:
                assert (found.status, b"response_too_large" in found.body) == (409, True), where
            else:
                assert (found.status, found.body) == (201, kept), where
                assert ("Idempotent-Replayed", "true") in found.headers, where
        else:
            assert found.status == expected, where
            assert all(name != "Idempotent-Replayed" for name, _ in found.headers), where
    usage = meter.usage(ORG)
    price = meterkit.from_micro(meter.policy.plan_for("invoices.create").price)
    assert (usage.requests, usage.credits_used) == (charges, price * (charges - refunds))


@pytest.fixture(params=["memory", "redis"])
def meter_on(request: pytest.FixtureRequest) -> Any:
    """A function ``clock -> Meter`` on the memory backend, then on Redis."""
    policy = meterkit.Policy.crane_ledger()
    if request.param == "memory":
        return lambda clock: meterkit.Meter(policy, meterkit.MemoryBackend(clock=clock))
    client = shared_client(request, request.getfixturevalue("redis_url"))

    def make(clock: FakeClock) -> Any:
        prefix = new_prefix()
        request.addfinalizer(lambda: delete_prefix(client, prefix))
        return meterkit.Meter(policy, RedisBackend(client, prefix=prefix, clock=clock))

    return make


A, B = ("send", "k1", BODIES[0]), ("send", "k1", BODIES[1])


@settings(max_examples=120)
@given(trace=st.lists(steps, min_size=1, max_size=25))
# A late first attempt whose key a retry took over; then the retry's answer is kept.
@example(trace=[A, ("wait", 60), A, ("end", 0, "kept"), A, ("end", 0, "kept"), A, B])
# Kept, too large, not kept and failed (refunded), each retried.
@example(trace=[A, ("end", 0, "too large"), A, ("send", "k2", BODIES[0]), ("end", 0, "not kept")])
@example(trace=[A, ("end", 0, "failed"), A, A, ("end", 0, "cut short"), A, ("wait", DAY), A])
def test_the_gate_keeps_the_promise_of_the_model(meter_on: Any, trace: list[Any]) -> None:
    """Every request of a random interleaving gets what the model says (a run, the kept
    response, 409, 422), and no key's handler runs again while a response of its charge
    is kept; every charge is made once."""
    clock = FakeClock()
    play(meter_on(clock), clock, trace)
