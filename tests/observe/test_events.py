"""The hook: what each event says, when it comes, and what an observer cannot change."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from decimal import Decimal
from typing import Any

import pytest

from meterkit import (
    AsyncMeter,
    BackendError,
    ConfigurationError,
    IdempotencyConflictError,
    MemoryBackend,
    Meter,
    StateError,
)
from meterkit.observe import Background, Event
from tests.conftest import FakeClock
from tests.observe._script import Unreachable, script_policy


class Broken(MemoryBackend):
    """A memory backend that holds something meterkit did not write."""

    def apply(self, plan: Any) -> Any:
        raise StateError("not ours")


def fields(event: Event) -> tuple[Any, ...]:
    """The event without its latency and decision (which vary)."""
    return (
        event.outcome,
        event.operation,
        event.org,
        event.key,
        event.mode,
        event.reason,
        event.tier,
        event.status,
        event.degraded,
        event.shadow,
        event.replayed,
    )


def test_one_event_per_check_saying_what_happened(clock: FakeClock) -> None:
    """Admissions, each denial, shadow, replay, reused key and refund: one event each."""
    events: list[Event] = []
    meter = Meter(script_policy(), MemoryBackend(clock=clock), on_decision=events.append)
    meter.set_allowance("org_b", "0.04")
    meter.check("key_1", org="org_a", operation="items.list")
    meter.check("key_1", org="org_a", operation="items.list")
    meter.check("key_1", org="org_a", operation="items.list")
    meter.check("key_2", org="org_b", operation="items.create", mode="test")
    meter.check("key_2", org="org_b", operation="items.create")
    paid = meter.check("key_3", org="org_a", operation="items.create", idempotency_key="i")
    meter.check("key_3", org="org_a", operation="items.create", idempotency_key="i")
    with pytest.raises(IdempotencyConflictError):
        meter.check("key_3", org="org_a", operation="items.list", idempotency_key="i")
    assert meter.refund(paid) is True
    assert meter.refund(paid) is False  # no second refund, no second event
    allowed = ("allowed", "items.list", "org_a", "key_1", "live", None, None, 200)
    assert [fields(e) for e in events] == [
        (*allowed, False, (), False),
        (*allowed, False, ("trial",), False),
        (
            "denied",
            "items.list",
            "org_a",
            "key_1",
            "live",
            "rate_limited",
            "key-burst",
            429,
            False,
            (),
            False,
        ),
        ("allowed", "items.create", "org_b", "key_2", "test", None, None, 200, False, (), False),
        (
            "denied",
            "items.create",
            "org_b",
            "key_2",
            "live",
            "insufficient_credits",
            "credits",
            402,
            False,
            (),
            False,
        ),
        ("allowed", "items.create", "org_a", "key_3", "live", None, None, 200, False, (), False),
        ("allowed", "items.create", "org_a", "key_3", "live", None, None, 200, False, (), True),
        (
            "refused",
            "items.list",
            "org_a",
            "key_3",
            "live",
            "idempotency_key_reused",
            None,
            422,
            False,
            (),
            False,
        ),
        ("refunded", "items.create", "org_a", "key_3", "live", None, None, 200, False, (), False),
    ]
    assert all(e.latency is not None and 0 <= e.latency < 1 for e in events)
    assert events[0].decision is not None
    assert events[0].decision.charged == Decimal("0.01")
    assert events[-1].decision is paid
    assert events[7].decision is None


def test_backend_failures_and_degraded_admissions(clock: FakeClock) -> None:
    """A failing backend is an error event (by kind) before the error is raised; a
    fail-open meter's admission in its place is a degraded one."""
    events: list[Event] = []
    policy = script_policy()
    with pytest.raises(BackendError):
        Meter(policy, Unreachable(), on_decision=events.append).check(
            "k", org="org_a", operation="items.list"
        )
    with pytest.raises(StateError):
        Meter(policy, Broken(), on_decision=events.append, fail_open=True).check(
            "k", org="org_a", operation="items.list"
        )
    meter = Meter(policy, Unreachable(), on_decision=events.append, fail_open=True)
    decision = meter.check("k", org="org_a", operation="items.list")
    assert decision.degraded
    assert meter.refund(decision) is False
    common = ("items.list", "org_a", "k", "live")
    assert [fields(e) for e in events] == [
        ("error", *common, "backend_unavailable", None, 503, False, (), False),
        ("error", *common, "state_error", None, 503, False, (), False),
        ("allowed", *common, "backend_unavailable", None, 200, True, (), False),
    ]
    assert events[2].decision is decision


def test_a_batch_reports_each_request_and_its_failures(clock: FakeClock) -> None:
    """check_many reports every decision; a batch whose backend fails reports each
    request's failure; a fail-open batch reports each degraded admission."""
    events: list[Event] = []
    meter = Meter(script_policy(), MemoryBackend(clock=clock), on_decision=events.append)
    meter.check("k", org="org_a", operation="items.create", idempotency_key="i")
    results = meter.check_many(
        [("k", "items.list", "org_a"), ("k", "items.list", "org_a", "i")],
        return_exceptions=True,
    )
    assert isinstance(results[1], IdempotencyConflictError)
    assert [e.outcome for e in events] == ["allowed", "allowed", "refused"]
    events.clear()
    with pytest.raises(BackendError):
        Meter(script_policy(), Unreachable(), on_decision=events.append).check_many(
            [("k", "items.list", "org_a")] * 2
        )
    assert [e.outcome for e in events] == ["error", "error"]
    events.clear()
    degraded = Meter(
        script_policy(), Unreachable(), on_decision=events.append, fail_open=True
    ).check_many([("k", "items.list", "org_a")] * 2)
    assert all(d.degraded for d in degraded)
    assert [(e.outcome, e.degraded) for e in events] == [("allowed", True)] * 2


def test_bad_input_raises_before_any_event(clock: FakeClock) -> None:
    """A call refused for its arguments reaches no backend and reports nothing."""
    events: list[Event] = []
    meter = Meter(script_policy(), MemoryBackend(clock=clock), on_decision=events.append)
    with pytest.raises(ValueError, match="operation"):
        meter.check("k", org="org_a", operation="nope")
    assert events == []


async def test_the_asyncio_meter_reports_through_the_same_hook(clock: FakeClock) -> None:
    """AsyncMeter's events are Meter's, for checks, batches, refunds and failures."""
    events: list[Event] = []
    meter = AsyncMeter(script_policy(), MemoryBackend(clock=clock), on_decision=events.append)
    first = await meter.check("k", org="org_a", operation="items.create")
    await meter.check_many([("k", "items.list", "org_a")] * 2)
    assert await meter.refund(first)
    down = AsyncMeter(script_policy(), Unreachable(), on_decision=events.append, fail_open=True)
    await down.check("k", org="org_a", operation="items.list")
    assert [(e.outcome, e.operation, e.degraded) for e in events] == [
        ("allowed", "items.create", False),
        ("allowed", "items.list", False),
        ("denied", "items.list", False),
        ("refunded", "items.create", False),
        ("allowed", "items.list", True),
    ]


def test_an_observer_that_raises_changes_no_decision(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Decisions, charges and usage are those of a meter without observers; the failure
    is logged once with its traceback, not once per request."""

    def broken(event: Event) -> None:
        raise RuntimeError("observer bug")

    seen: list[Event] = []
    plain_clock = FakeClock(clock.now)
    observed = Meter(script_policy(), MemoryBackend(clock=clock), on_decision=[broken, seen.append])
    alone = Meter(script_policy(), MemoryBackend(clock=clock), on_decision=broken)
    plain = Meter(script_policy(), MemoryBackend(clock=plain_clock))
    with caplog.at_level(logging.ERROR, logger="meterkit"):
        for meter in (observed, alone, plain):
            answers = []
            for key in ("k1", "k1", "k1", "k2"):
                decision = meter.check(key, org="org_a", operation="items.create")
                answers.append((decision.allowed, decision.reason, decision.charged))
            answers.append(meter.refund(decision))
            answers.append(meter.usage("org_a").credits_used)
            if meter is observed:
                expected = answers
            assert answers == expected
    assert len(seen) == 5  # the observer after the broken one still hears every event
    failures = [r for r in caplog.records if "failed on a" in r.getMessage()]
    assert len(failures) == 2  # one per broken observer list (a line a minute each)
    assert failures[0].exc_info is not None
    assert "decision stands" in failures[0].getMessage()


def test_the_observer_is_called_outside_the_backends_lock(clock: FakeClock) -> None:
    """An observer may call the meter again (a read under the backend's lock) without
    deadlocking: the lock was let go before the event."""
    usage: list[Any] = []
    meter: Meter

    def reads_usage(event: Event) -> None:
        if event.outcome == "allowed":
            usage.append(meter.usage("org_a").requests)

    meter = Meter(script_policy(), MemoryBackend(clock=clock), on_decision=reads_usage)
    done = threading.Event()

    def run() -> None:
        meter.check("k", org="org_a", operation="items.list")
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(5), "the check did not finish: the observer ran under the lock"
    assert usage == [1]  # and after the charge


def test_a_meter_without_observers_runs_the_plain_check() -> None:
    """No observer: the meter's check is the class's own, untouched; with one, the
    observed check is chosen once, when the meter is made."""
    plain = Meter(script_policy(), MemoryBackend())
    assert "check" not in vars(plain)
    assert plain.check.__func__ is Meter.check  # type: ignore[attr-defined]
    observed = Meter(script_policy(), MemoryBackend(), on_decision=lambda e: None)
    assert observed.check.__func__ is Meter._check_observed  # type: ignore[attr-defined]
    assert AsyncMeter(script_policy(), MemoryBackend()).check.__func__ is AsyncMeter.check  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", ["print", 42, [], [print, "x"]])
def test_on_decision_must_be_callables(bad: Any) -> None:
    """on_decision is a callable or a list of them; anything else is refused at once."""
    with pytest.raises(ConfigurationError) as caught:
        Meter(script_policy(), MemoryBackend(), on_decision=bad)
    assert caught.value.location == "on_decision"


def test_event_to_dict_is_json_ready(clock: FakeClock) -> None:
    """to_dict gives plain values, with the charge and balance of a check as strings."""
    import json

    events: list[Event] = []
    meter = Meter(script_policy(), MemoryBackend(clock=clock), on_decision=events.append)
    meter.check("k", org="org_a", operation="items.create")
    data = events[0].to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["charged"] == "0.05"
    assert data["balance"] == "99.95"
    assert data["shadow"] == []
    assert "decision" not in data


def test_a_slow_observer_behind_background_holds_up_no_check(clock: FakeClock) -> None:
    """Background hands events to its own thread: checks return while the observer is
    blocked, every event arrives once it is free, and a full queue drops (and counts)."""
    release = threading.Event()
    seen: list[str] = []

    def slow(event: Event) -> None:
        release.wait(10)
        seen.append(event.outcome)

    background = Background(slow, capacity=3)
    meter = Meter(script_policy(), MemoryBackend(clock=clock), on_decision=background)
    started = time.monotonic()
    decisions = [meter.check(f"k{i}", org="org_a", operation="items.list") for i in range(6)]
    assert time.monotonic() - started < 5  # not 6 x 10 s
    assert all(d.allowed for d in decisions)
    release.set()
    assert background.flush(10)
    # the first event was taken by the thread at once or not: 3 or 4 got through
    assert len(seen) + background.dropped == 6
    assert 3 <= len(seen) <= 4
    background.close(5)


def test_background_picks_events_and_reports_failures(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """accept= filters on the caller's side; what the observer raises is logged."""
    seen: list[Event] = []

    def picky(event: Event) -> None:
        seen.append(event)
        raise RuntimeError("bug")

    background = Background(picky, accept=lambda e: e.outcome == "denied")
    meter = Meter(script_policy(), MemoryBackend(clock=clock), on_decision=background)
    with caplog.at_level(logging.ERROR, logger="meterkit"):
        for _ in range(4):
            meter.check("k", org="org_a", operation="items.list")
        assert background.flush(10)
    assert [e.outcome for e in seen] == ["denied", "denied"]
    assert any("failed on a denied event" in r.getMessage() for r in caplog.records)
    background.close(5)


@pytest.mark.parametrize(
    ("options", "where"), [({"capacity": 0}, "capacity"), ({"observer": 3}, "observer")]
)
def test_background_refuses_bad_options(options: dict[str, Any], where: str) -> None:
    """A capacity below one, or an observer that is not callable, is refused."""
    arguments: dict[str, Any] = {"observer": print, **options}
    with pytest.raises(ConfigurationError) as caught:
        Background(**arguments)
    assert caught.value.location == where


def test_events_from_many_threads_reach_the_observer_once_each(clock: FakeClock) -> None:
    """Under concurrent checks every decision is reported exactly once."""
    seen: list[Event] = []
    lock = threading.Lock()

    def record(event: Event) -> None:
        with lock:
            seen.append(event)

    meter = Meter(script_policy(), MemoryBackend(clock=clock), on_decision=record)

    def run(n: int) -> None:
        for i in range(50):
            meter.check(f"k{n}-{i}", org="org_a", operation="items.list")

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 200
    assert len({e.key for e in seen}) == 200


def test_asyncio_checks_in_one_turn_each_report(clock: FakeClock) -> None:
    """Concurrent tasks' checks each get their event."""
    seen: list[Event] = []

    async def main() -> None:
        meter = AsyncMeter(script_policy(), MemoryBackend(clock=clock), on_decision=seen.append)
        await asyncio.gather(
            *(meter.check(f"k{i}", org="org_a", operation="items.list") for i in range(10))
        )

    asyncio.run(main())
    assert sorted(e.key or "" for e in seen) == sorted(f"k{i}" for i in range(10))
