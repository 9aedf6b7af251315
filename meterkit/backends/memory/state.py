"""The memory backend's state: each tier's counters, timestamps and logs in slotted
containers split in shards (so that no dict a check touches holds more than a 256th
of the identities), an organization's monthly account, and its plan assignment. Plain
containers: the functions :mod:`~meterkit.backends.memory.source` writes read and
change them under the backend's lock."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from struct import Struct
from typing import TYPE_CHECKING, Any

from meterkit.core.credits import alerts_reached
from meterkit.core.outcome import Outcome
from meterkit.core.plan import Plan

if TYPE_CHECKING:
    from meterkit.core.policy import Deal, OperationPlan, Tier

_SWEEP_MIN = 4096
_SWEEP_EVERY = 8
#: Dicts per tier state (a power of two: an identity's is ``hash(id) & _MASK``).
_SHARDS = 256
_MASK = _SHARDS - 1
_SHARD_SWEEP_MIN = _SWEEP_MIN // _SHARDS

Apply = Callable[[Plan], Outcome]
#: A check under a plan: (plan, organization's identity, idempotency key, now µs).
Variant = Callable[[Plan, str, "str | None", int], Outcome]


# -- tier state: plain containers -------------------------------------------------------


def _shards() -> list[dict[str, Any]]:
    return [{} for _ in range(_SHARDS)]


# A sliding log: its times (µs, ascending) packed 8 bytes each in a bytearray, which
# the garbage collector does not track (an array('q') is tracked: with a million
# keys, each of Python's full collections walked a million logs, for up to 0.8 s).
_TIME = Struct("q")  # (native order and size: memoryview's "q" reads it alike)
#: ``time_at(log, offset=0)``: the 1-tuple of the time at byte ``offset`` of a log.
time_at = _TIME.unpack_from
#: ``packed(time)``: a time as a log's 8 bytes.
packed = _TIME.pack


def older(log: bytearray, cutoff: int) -> int:
    """How many bytes of ``log`` hold times at or before ``cutoff`` (bisection)."""
    with memoryview(log) as raw, raw.cast("q") as times:
        return bisect_right(times, cutoff) << 3


class _FixedWindow:
    """Counts per identity in the current UTC-aligned window, which ends at ``end`` µs;
    ``dead``: shards of windows past, dropped one per check."""

    __slots__ = ("counts", "dead", "end")

    def __init__(self) -> None:
        self.end = 0
        self.counts: list[dict[str, int]] = _shards()
        self.dead: list[dict[str, int]] = []

    def size(self) -> int:
        return sum(map(len, self.counts))

    def forget(self, who: str) -> None:
        self.counts[hash(who) & _MASK].pop(who, None)


class _SlidingWindow:
    """Counts per identity in the current window (ending at ``end`` µs) and the one before."""

    __slots__ = ("cur", "dead", "end", "prev")

    def __init__(self) -> None:
        self.end = 0
        self.cur: list[dict[str, int]] = _shards()
        self.prev: list[dict[str, int]] = _shards()
        self.dead: list[dict[str, int]] = []

    def turn(self, now: int, window: int) -> int:
        """Start the window holding ``now``: the current one becomes the previous one
        (or, after a window without requests, both are empty). Its end."""
        self.dead += self.prev
        if now < self.end + window:
            self.prev = self.cur
        else:
            self.dead += self.cur
            self.prev = _shards()
        self.cur = _shards()
        self.end = now - now % window + window
        return self.end

    def size(self) -> int:
        return sum(map(len, self.cur)) + sum(map(len, self.prev))

    def forget(self, who: str) -> None:
        h = hash(who) & _MASK
        self.cur[h].pop(who, None)
        self.prev[h].pop(who, None)


class _Swept:
    """State swept one shard at a time (see the module's docstring)."""

    __slots__ = ("debt", "due", "hand", "shards")

    def __init__(self) -> None:
        self.shards: list[dict[str, Any]] = _shards()
        self.debt = 0
        self.due = _SWEEP_EVERY * _SHARD_SWEEP_MIN
        self.hand = 0

    def live(self, value: Any, now: int) -> bool:  # pragma: no cover - per subclass
        raise NotImplementedError

    def sweep(self, now: int) -> None:
        """Drop the dead entries of the next shard."""
        hand = self.hand
        live = self.live
        self.shards[hand] = {k: v for k, v in self.shards[hand].items() if live(v, now)}
        self.hand = hand = (hand + 1) & _MASK
        self.debt = 0
        self.due = _SWEEP_EVERY * max(_SHARD_SWEEP_MIN, len(self.shards[hand]))

    def size(self) -> int:
        return sum(map(len, self.shards))

    def forget(self, who: str) -> None:
        self.shards[hash(who) & _MASK].pop(who, None)


class _Gcra(_Swept):
    """The theoretical arrival time (TAT, µs) of each identity's next request."""

    __slots__ = ()

    def live(self, value: int, now: int) -> bool:
        return value > now  # a TAT in the past is the same as no state at all


class _SlidingLog(_Swept):
    """The admission times (µs, ascending) of each identity, at most the tier's limit."""

    __slots__ = ("window",)

    def __init__(self, window_us: int) -> None:
        super().__init__()
        self.window = window_us

    def live(self, value: bytearray, now: int) -> bool:
        # A log whose newest entry is a window old holds nothing that counts.
        return bool(value) and time_at(value, len(value) - 8)[0] > now - self.window


_State = _FixedWindow | _SlidingWindow | _Gcra | _SlidingLog


def _state_id(tier: Tier) -> tuple[object, ...]:
    """What a tier's state is kept under: tiers with the same name and parameters share
    counters across operations and policies. ``tier`` is the policy's own (the default
    plan's): under every other plan the tier keeps this state, with other numbers."""
    return (tier.name, tier.scope, tier.algorithm, tier.limit, tier.window_us, tier.burst)


def _new_state(tier: Tier) -> _State:
    if tier.algorithm == "fixed_window":
        return _FixedWindow()
    if tier.algorithm == "sliding_window":
        return _SlidingWindow()
    if tier.algorithm == "gcra":
        return _Gcra()
    return _SlidingLog(tier.window_us)


#: An account's usage of one (key, operation) is one int: requests above this bit,
#: µ-credits below (each charge is at most 2**53, see credits.MAX_MICRO: 2**43 of them
#: fit, even in a shadow policy, whose credits never deny). An int, unlike an object,
#: is no work for Python's garbage collector, which a million keys would make pause.
_REQUEST_SHIFT = 96
_ONE_REQUEST = 1 << _REQUEST_SHIFT
_MICRO_MASK = _ONE_REQUEST - 1


class _Account:
    """One organization's credits in one calendar month."""

    __slots__ = ("alerted", "idents", "pairs", "period", "refunded", "topup", "used")

    def __init__(self, period: int) -> None:
        self.period = period
        # key id -> "org\x1fkey", the key's identity in key-scoped tier state.
        self.idents: dict[str, str] = {}
        self.used = 0
        self.topup = 0
        # By operation, then key: the hot path finds a pair without building a tuple.
        # (The month's requests are their sum, counted when asked: not once per check.)
        self.pairs: dict[str, dict[str, int]] = {}
        self.refunded: set[str] = set()
        #: How many of the policy's credit alert thresholds were reached this month.
        self.alerted = 0

    def reach(self, percents: tuple[int, ...], total: int, demand: int) -> tuple[int, ...]:
        """The thresholds of ``percents`` a request of ``demand`` reaches first this
        month (see :func:`meterkit.core.credits.alerts_reached`), now counted as
        reached."""
        reached = alerts_reached(percents, total, demand)
        if reached <= self.alerted:
            return ()
        first = percents[self.alerted : reached]
        self.alerted = reached
        return first


def _set_plan(a: _Assignment, plan: str | None, key: str | None) -> None:
    if key is None:
        # (the default plan is no plan at all: the organization's checks stay on the
        # operation's own function)
        a.plan = None if plan == "default" else plan
    elif plan is None:
        a.keys.pop(key, None)
    else:
        a.keys[key] = plan


class _Assignment:
    """What one organization (of one mode) was put on: its plan, its deal, its keys'
    plans; and the functions of its checks, by operation (while no key has a plan)."""

    __slots__ = ("deal", "fns", "keys", "plan")

    def __init__(self) -> None:
        self.plan: str | None = None
        self.deal: Deal = ()
        self.keys: dict[str, str] = {}
        self.fns: dict[OperationPlan, Variant] = {}

    def empty(self) -> bool:
        return self.plan is None and not self.deal and not self.keys
