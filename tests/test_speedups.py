"""The compiled lanes (meterkit/_speedups.c) decide exactly as the generated Python.

A ``MemoryBackend(native=True)`` runs each operation's common case in C over the same
state as the Python; anything else it hands to the Python before consuming. These
tests feed one random trace to a compiled and a pure-Python meter, side by side, and
compare every decision, every error, the usage and every piece of state after it:
all four algorithms, key and org scopes, a shadow tier, a shadow policy, test mode,
idempotency keys, priced-by-size costs, refunds, allowances, top-ups, month turns,
clocks that step back, ids the C code leaves to Python, and sweeps made frequent.

``METERKIT_REQUIRE_SPEEDUPS=1`` (set by .ci/run) turns a missing extension into a
failure instead of a skip.
"""

from __future__ import annotations

import gc
import os
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import meterkit._memory as memory_module
from meterkit import (
    Category,
    CostTable,
    CreditPlan,
    Decision,
    MemoryBackend,
    Meter,
    MeterkitError,
    Operation,
    Plan,
    Policy,
    Tier,
)
from meterkit._native import speedups
from tests.conftest import FakeClock

if speedups is None:
    if os.environ.get("METERKIT_REQUIRE_SPEEDUPS", "") not in ("", "0"):
        pytest.fail(
            "meterkit._speedups is not built and METERKIT_REQUIRE_SPEEDUPS=1",
            pytrace=False,
        )
    pytest.skip(
        "meterkit._speedups is not built (no C compiler at install)", allow_module_level=True
    )

# "clé_d" is not ASCII: the compiled check leaves its validation to Python.
KEYS = ["key_a", "key_b", "key_c", "key_a", "key_b", "key_c", "clé_d"]
ORGS = ["org_1", "org_2"]
OPS = ["items.list", "items.get", "reports.run", "org.stats"]


def _policy(*, shadow: bool = False) -> Policy:
    tiers = [
        Tier(
            "key-window",
            "key",
            "5/minute",
            "fixed_window",
            operations=("items.list", "items.get", "reports.run"),
        ),
        Tier("org-window", "org", "9/minute", "sliding_window"),
        Tier("key-bucket", "key", "4/10 seconds", "gcra", operations=("items.list", "items.get")),
        Tier(
            "key-log", "key", "3/5 seconds", "sliding_log", operations=("items.list", "items.get")
        ),
        Tier("org-log-shadow", "org", "4/5 seconds", "sliding_log", shadow=True),
    ]
    costs = CostTable(
        (Category("read", "0.01", "0.02"), Category("report", "0.10", "0.50")),
        (
            Operation("items.list", "read", "0.01"),
            Operation("items.get", "read", "0.02"),
            Operation("reports.run", "report", "0.25"),
            Operation("org.stats", "read", "0.01"),  # org-scoped tiers only
        ),
    )
    return Policy(tiers, costs, CreditPlan("1"), shadow=shadow)


@contextmanager
def frequent_sweeps() -> Iterator[None]:
    """Sweeps (GCRA, sliding logs, accounts, idempotency records) every few commits,
    so that traces reach the lanes' hand-over to Python for them."""
    with (
        mock.patch.object(memory_module, "_SWEEP_MIN", 4),
        mock.patch.object(memory_module, "_SWEEP_EVERY", 2),
    ):
        yield


def _state(backend: MemoryBackend) -> Any:
    """Everything a backend holds, as plain comparable values."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, array):
            return list(value)
        if isinstance(value, set):
            return sorted(value)
        if hasattr(value, "__slots__"):
            # ("native" says how a tier sweeps, compiled or not: not state)
            return {
                name: plain(getattr(value, name)) for name in value.__slots__ if name != "native"
            }
        return value

    accounts = plain(backend._accounts)
    for acct in accounts.values():
        acct.pop("refunded")  # charge ids differ between the two meters
    idem = {k: (v[0], v[1], v[2], v[3]) for k, v in backend._idem.items()}
    tiers = {ident: plain(state) for ident, state in backend._tiers.items()}
    return (
        # A compiled meter creates its tiers' (empty) state when it is made, Python on
        # first use: only state that holds something is compared.
        {k: v for k, v in tiers.items() if any(x for x in v.values() if isinstance(x, dict))},
        accounts,
        backend._allowances,
        idem,
        backend._last,
    )


def _same(a: Decision | MeterkitError, b: Decision | MeterkitError) -> None:
    if isinstance(a, MeterkitError) or isinstance(b, MeterkitError):
        assert type(a) is type(b)
        assert str(a) == str(b)
        return
    out_a, out_b = list(a.outcome), list(b.outcome)
    assert bool(out_a[8]) == bool(out_b[8])  # a charge id, or none, on both
    out_a[8] = out_b[8] = ""
    assert out_a == out_b
    assert (a.allowed, a.reason, a.degraded) == (b.allowed, b.reason, b.degraded)
    assert a.headers == b.headers
    assert a.headers == a._headers_python()  # rendered in C, and by the Python
    assert a.error == b.error


check_step = st.tuples(
    st.just("check"),
    st.sampled_from(KEYS),
    st.sampled_from(ORGS),
    st.sampled_from(OPS),
    st.sampled_from(["live", "live", "live", "test"]),
    st.sampled_from([None] * 6 + ["idem-1", "idem-2"]),
    st.sampled_from([None] * 6 + ["0.03", Decimal("0.30")]),
)
other_step = st.one_of(
    st.tuples(
        st.just("advance"),
        st.one_of(
            st.sampled_from(
                [0.0, 1e-6, 5e-7, 0.4999995, 1.0, 4.9, 59.9999995, 3600.0, 31 * 86400.0, -2.0]
            ),
            st.floats(0, 20, allow_nan=False),
        ),
    ),
    st.tuples(st.just("align"), st.sampled_from([5, 10, 60])),
    st.tuples(st.just("refund"), st.integers(0, 50)),
    st.tuples(st.just("allowance"), st.sampled_from(ORGS), st.sampled_from([None, "0.05", "2"])),
    st.tuples(st.just("top_up"), st.sampled_from(ORGS), st.sampled_from(["0.02", "1"])),
)
# Three checks for every other step.
steps = st.lists(
    st.integers(0, 3).flatmap(lambda i: other_step if i == 0 else check_step),
    min_size=10,
    max_size=150,
)


@pytest.mark.parametrize("shadow", [False, True], ids=["enforcing", "shadow-policy"])
@settings(max_examples=300)  # more than the profile's 60: this is the C code's oracle
@given(trace=steps)
def test_compiled_and_python_meters_agree_step_by_step(shadow: bool, trace: list[Any]) -> None:
    """The same trace through a compiled and a pure-Python meter: equal decisions and
    errors at every step, equal usage and equal state at the end."""
    with frequent_sweeps():
        policy = _policy(shadow=shadow)
        clock = FakeClock()
        native = MemoryBackend(clock=clock, native=True)
        python = MemoryBackend(clock=clock, native=False)
        meters = Meter(policy, native), Meter(policy, python)
        assert type(meters[0].check).__name__ == "Checker"
        history: list[tuple[Decision, Decision]] = []
        for step in trace:
            kind = step[0]
            if kind == "advance":
                clock.advance(step[1])
                continue
            if kind == "align":  # exactly onto the next window boundary
                clock.now = (clock.now // step[1] + 1) * step[1]
                continue
            results: list[Any] = []
            for meter in meters:
                try:
                    if kind == "check":
                        _, key, org, op, mode, idem, cost = step
                        results.append(
                            meter.check(
                                key,
                                org=org,
                                operation=op,
                                mode=mode,
                                idempotency_key=idem,
                                cost=cost,
                            )
                        )
                    elif kind == "refund":
                        if history:
                            pair = history[step[1] % len(history)]
                            results.append(meter.refund(pair[meters.index(meter)]))
                    elif kind == "allowance":
                        meter.set_allowance(step[1], step[2])
                    else:
                        meter.top_up(step[1], step[2])
                except MeterkitError as exc:
                    results.append(exc)
            if kind == "check":
                _same(results[0], results[1])
                if isinstance(results[0], Decision):
                    history.append((results[0], results[1]))
            else:
                assert results[:1] == results[1:]
        for org in ORGS:
            for mode in ("live", "test"):
                assert meters[0].usage(org, mode=mode) == meters[1].usage(org, mode=mode)
        assert _state(native) == _state(python)
        # The lanes decided a good share (~45% over the CI profile's traces) of the
        # checks themselves; the rest went to Python by design (see the docstring).


@pytest.mark.parametrize("shadow", [False, True], ids=["enforcing", "shadow-policy"])
def test_compiled_and_python_agree_on_window_boundaries(shadow: bool) -> None:
    """Checks exactly on, just before and just after window edges (5, 10, 60 s and
    their multiples), and after whole idle windows, decide alike in C and Python."""
    policy = _policy(shadow=shadow)
    clock = FakeClock()
    meters = [Meter(policy, MemoryBackend(clock=clock, native=n)) for n in (True, False)]
    start = clock.now
    for edge in (5, 10, 60, 120, 125, 180, 300, 600, 610, 660):
        for offset in (-1e-6, 0.0, 1e-6):
            clock.now = start + edge + offset
            for key in ("key_a", "key_b"):
                for op in ("items.list", "reports.run"):
                    first, second = (m.check(key, org="org_1", operation=op) for m in meters)
                    _same(first, second)
    for edge in (1200, 1320, 1440, 1445, 1570, 1680):  # a whole idle window, then its edge
        clock.now = start + edge
        for op in ("items.list", "reports.run"):
            first, second = (m.check("key_a", org="org_1", operation=op) for m in meters)
            _same(first, second)
    assert _state(meters[0].backend) == _state(meters[1].backend)


@given(
    entries=st.dictionaries(
        st.text(max_size=4),
        st.one_of(
            st.integers(-(2**63), 2**63 - 1),
            st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4).map(lambda v: array("q", v)),
        ),
        max_size=30,
    ),
    cutoff=st.integers(-(2**63), 2**63 - 1),
)
def test_the_compiled_sweep_drops_what_the_python_sweep_drops(
    entries: dict[str, Any], cutoff: int
) -> None:
    """speedups.sweep drops, in place, exactly the GCRA times or logs the Python
    comprehension drops, and keeps the rest (same objects); anything unusual (a value
    of another type, a number past int64) gives None and changes nothing."""
    assert speedups is not None
    for logs in (True, False):
        kind = array if logs else int
        expected = {
            k: v
            for k, v in entries.items()
            if type(v) is kind and (v and v[-1] > cutoff if logs else v > cutoff)
        }
        states = dict(entries)
        kept = speedups.sweep(states, cutoff, logs)
        if all(type(v) is kind for v in entries.values()):
            assert kept == len(expected)
            assert states == expected
            assert all(states[k] is entries[k] for k in states)
        else:
            assert kept is None
            assert states == entries
    # at the cutoff itself: dropped (a TAT or a newest entry at "now - window" is over)
    states = {"a": 5, "b": 6}
    assert speedups.sweep(states, 5, False) == 1
    assert states == {"b": 6}
    logs = {"a": array("q", [1, 5]), "b": array("q", [6]), "c": array("q")}
    assert speedups.sweep(logs, 5, True) == 1
    assert list(logs) == ["b"]
    states = {"k": 2**63}  # past int64: the Python sweep decides
    assert speedups.sweep(states, 0, False) is None
    assert states == {"k": 2**63}
    assert speedups.sweep({"k": 1}, 2**64, False) is None


def test_logs_and_usage_records_made_by_lanes_are_not_tracked_by_the_gc(
    clock: FakeClock,
) -> None:
    """A key's sliding log and usage record made by a lane are left out of Python's
    garbage collector (they hold no references; tracked, a million of them made a full
    collection a 0.4 s pause), and they work on as before."""
    meter = Meter(Policy.crane_ledger(), MemoryBackend(clock=clock, native=True))
    meter.check("key_first", org="org_1", operation="invoices.list")  # opens the account
    for i in range(50):
        meter.check(f"key_{i}", org="org_1", operation="invoices.list")
    backend = meter.backend
    logs = [log for state in backend._tiers.values() for log in getattr(state, "logs", {}).values()]
    pairs = [
        pair
        for account in backend._accounts.values()
        for by_key in account.pairs.values()
        for pair in by_key.values()
    ]
    assert len(logs) == len(pairs) == 51
    assert sum(gc.is_tracked(x) for x in logs + pairs) <= 2  # the account opener's: Python's
    for _ in range(2):
        assert meter.check("key_7", org="org_1", operation="invoices.list").allowed
    gc.collect()
    assert meter.usage("org_1", key="key_7").requests == 3
    assert meter.check("key_7", org="org_1", operation="invoices.list").tiers[2].remaining == 96


def test_the_lanes_decide_the_common_case_themselves(clock: FakeClock) -> None:
    """Steady traffic is decided in C: after the first check of an org (which opens its
    month's account in Python), every admitted or denied check is a lane's."""
    policy = Policy.crane_ledger()
    backend = MemoryBackend(clock=clock)
    meter = Meter(policy, backend)
    for i in range(300):
        meter.check(f"key_{i % 3}", org="org_1", operation="invoices.list")
        clock.advance(0.01)
    lane = backend._applies[policy.plan_for("invoices.list")]
    assert type(lane).__name__ == "Lane"
    assert lane.hits == 299  # 100 admitted per key, then burst denials


def test_native_false_stays_in_python_and_shadow_denials_are_counted(clock: FakeClock) -> None:
    """A backend built with native=False never compiles; through the compiled check,
    a shadow tier's denials are counted as in Python."""
    plain = Meter(Policy.crane_ledger(), MemoryBackend(clock=clock, native=False))
    assert "check" not in vars(plain)
    plain.check("key_1", org="org_1", operation="invoices.list")
    assert all(not hasattr(fn, "hits") for fn in plain.backend._applies.values())
    meters = [Meter(_policy(), MemoryBackend(clock=clock, native=n)) for n in (True, False)]
    assert "check" in vars(meters[0])
    for meter in meters:
        for i in range(12):
            meter.check(f"key_{i % 4}", org="org_1", operation="items.list")
    # org-window admits 9 of the 12; the shadow log (4 per 5 s) said no to 5 of those.
    assert meters[0].shadow_denials == meters[1].shadow_denials == {"org-log-shadow": 5}


def test_checker_hands_unusual_calls_to_python(clock: FakeClock) -> None:
    """Bad input raises the same typed errors through the compiled check, and the
    keyword-only signature is kept."""
    import inspect

    from meterkit import InvalidIdentifierError, UnknownOperationError

    meter = Meter(Policy.crane_ledger(), MemoryBackend(clock=clock))
    assert "operation" in inspect.signature(meter.check).parameters
    with pytest.raises(UnknownOperationError):
        meter.check("key_1", org="org_1", operation="nope")
    with pytest.raises(InvalidIdentifierError):
        meter.check("key\n1", org="org_1", operation="invoices.list")
    with pytest.raises(InvalidIdentifierError):
        meter.check("k" * 257, org="org_1", operation="invoices.list")
    with pytest.raises(TypeError):
        meter.check("key_1", org="org_1")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        meter.check("key_1", "invoices.list")  # type: ignore[misc]
    assert meter.usage("org_1").requests == 0
    assert meter.check("key_1", org="org_1", operation="invoices.list").allowed


# Python 3.12+ warns about fork() in a process with threads; this child only writes.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_charge_ids_are_the_python_format_and_fresh_after_fork() -> None:
    """Charge ids come from the C counter: the process prefix and the counter in
    decimal, as the Python writes them; a forked child draws a new prefix."""
    import meterkit._plan as plan_module

    assert plan_module.new_charge_id is speedups.new_charge_id
    first, second = speedups.new_charge_id(), speedups.new_charge_id()
    prefix = plan_module._CHARGE_PREFIX
    assert first.startswith(prefix)
    assert second.startswith(prefix)
    assert int(second[len(prefix) :]) == int(first[len(prefix) :]) + 1
    assert str(int(first[len(prefix) :])) == first[len(prefix) :]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first id and leave at once
        os.write(write, speedups.new_charge_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child
    assert not child.startswith(prefix)
    assert child.endswith("1")
    assert len(child) == len(prefix) + 1


int64 = st.integers(-(2**63) + 10**6, 2**63 - 10**6)


@given(
    tiers=st.lists(st.tuples(int64, int64, st.integers(0, 1)), min_size=3, max_size=3),
    retry=int64,
    charged=st.one_of(st.just(10_000), int64),
    balance=st.one_of(int64, st.integers(-(10**30), 10**30)),
    allowed=st.booleans(),
)
def test_compiled_headers_render_any_numbers_as_python_does(
    tiers: list[tuple[int, int, int]], retry: int, charged: int, balance: int, allowed: bool
) -> None:
    """Decision.headers from C equals the Python rendering for any outcome numbers:
    negative and huge ones, credits with and without decimals (past int64, Python
    renders them)."""
    policy = Policy.crane_ledger()
    op = policy.plan_for("invoices.list")
    plan = Plan(policy, op, "key_1", "org_1", "live", op.price, None)
    outcome = (allowed, 0 if allowed else 1, 0, retry, tuple(tiers), charged, balance, 0, "", False)
    decision = Decision(plan, outcome)  # type: ignore[arg-type]
    assert decision.headers == decision._headers_python()
    assert list(decision.headers) == list(decision._headers_python())  # the same order


def test_the_compiled_lock_behaves_as_threading_lock() -> None:
    """The backend's compiled lock: taken and given back, by `with` too; giving back a
    free lock is an error; a second taker waits until it is given back."""
    import threading

    lock = speedups.Lock()
    assert MemoryBackend()._lock.__class__ is speedups.Lock
    assert MemoryBackend(native=False)._lock.__class__ is not speedups.Lock
    assert not lock.locked()
    assert lock.acquire() is True
    assert lock.locked()
    lock.release()
    with pytest.raises(RuntimeError, match="release unlocked lock"):
        lock.release()
    with lock:
        assert lock.locked()
    assert not lock.locked()
    order: list[str] = []
    lock.acquire()
    waiter = threading.Thread(target=lambda: (lock.acquire(), order.append("waiter")))
    waiter.start()
    waiter.join(0.05)  # it cannot get the lock yet
    order.append("holder")
    lock.release()
    waiter.join()
    assert order == ["holder", "waiter"]
    assert lock.locked()


def test_a_subclass_that_overrides_check_keeps_its_check(clock: FakeClock) -> None:
    """The compiled check is installed only where Meter.check itself would run."""
    calls: list[str] = []

    class Audited(Meter):
        def check(self, key: Any, **kwargs: Any) -> Decision:  # type: ignore[override]
            calls.append(key)
            return super().check(key, **kwargs)

    meter = Audited(Policy.crane_ledger(), MemoryBackend(clock=clock))
    assert "check" not in vars(meter)
    assert meter.check("key_1", org="org_1", operation="invoices.list").allowed
    assert calls == ["key_1"]
