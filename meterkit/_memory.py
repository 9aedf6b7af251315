"""The in-memory backend: every algorithm in Python, one lock, bounded state.

State per tier lives in plain dicts keyed by identity (a key id or an org id).
Fixed and sliding windows keep only the current (and previous) window's dict and
drop the older ones whole when the window turns, so eviction costs nothing per
request. GCRA buckets and sliding logs are swept in amortized O(1), paid as debt:
a commit adds 1, one that adds an identity 1 + _SWEEP_EVERY, and a sweep runs once
the debt reaches _SWEEP_EVERY times what the last sweep kept (at least 4096). New
identities thus trigger a sweep before the dict doubles, while a steady set of
identities pays for one pass per _SWEEP_EVERY x len commits (a pass per len
commits was ~7% of a check at 10k keys).

The algorithms here and the Lua script of the Redis backend are the only logic
meterkit writes twice; ``tests/test_conformance.py`` pins them together.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meterkit._plan import (
    REASON_CREDITS,
    REASON_NONE,
    REASON_RATE,
    Outcome,
    Plan,
    TierOutcome,
    month_bounds,
    new_charge_id,
)

if TYPE_CHECKING:
    from meterkit._policy import OperationPlan, Policy, Tier

__all__ = ["MemoryBackend", "RawUsage"]

Clock = Callable[[], float]
_US = 1_000_000
_SWEEP_MIN = 4096
_SWEEP_EVERY = 8
_IDEM_TTL_US = 24 * 3600 * _US
# Ids cannot hold control characters, so this separator cannot be forged by a caller.
_TEST_NS = "\x1ftest\x1f"

#: usage as a backend reports it: (period start µs, period end µs, allowance µ-credits
#: (plan or override, plus top-ups), used µ-credits, requests, {(key, op): [requests, µ]}).
RawUsage = tuple[int, int, int, int, int, dict[tuple[str, str], list[int]]]

# A tier's verdict: (admitted?, retry µs, remaining, reset µs, what commit stores).
_Verdict = tuple[bool, int, int, int, Any]


class _FixedWindow:
    """UTC-aligned windows; at most ``limit`` admitted per window."""

    __slots__ = ("counts", "limit", "wid", "window")

    def __init__(self, tier: Tier) -> None:
        self.limit = tier.limit
        self.window = tier.window_us
        self.wid = -1
        self.counts: dict[str, int] = {}

    def peek(self, ident: str, now: int) -> _Verdict:
        wid = now // self.window
        if wid != self.wid:  # the clock never goes back here (see MemoryBackend._now)
            self.wid = wid
            self.counts = {}
        count = self.counts.get(ident, 0)
        reset = (wid + 1) * self.window - now
        if count < self.limit:
            return True, 0, self.limit - count - 1, reset, count + 1
        return False, reset, 0, reset, None

    def commit(self, ident: str, token: int, now: int) -> None:
        self.counts[ident] = token

    def size(self) -> int:
        return len(self.counts)


class _SlidingWindow:
    """Weighted two-counter window: estimate = prev·(W−e)/W + cur, kept ≤ limit.

    All in integers: admitted iff ``prev·(W−e) + (cur+1)·W ≤ limit·W``.
    """

    __slots__ = ("cur", "limit", "prev", "wid", "window")

    def __init__(self, tier: Tier) -> None:
        self.limit = tier.limit
        self.window = tier.window_us
        self.wid = -1
        self.cur: dict[str, int] = {}
        self.prev: dict[str, int] = {}

    def peek(self, ident: str, now: int) -> _Verdict:
        w, limit = self.window, self.limit
        wid = now // w
        if wid != self.wid:
            self.prev = self.cur if wid == self.wid + 1 else {}
            self.cur = {}
            self.wid = wid
        cur = self.cur.get(ident, 0)
        prev = self.prev.get(ident, 0)
        start = wid * w
        elapsed = now - start
        used = prev * (w - elapsed) + (cur + 1) * w
        reset = start + w - now
        if used <= limit * w:
            return True, 0, (limit * w - used) // w, reset, cur + 1
        if cur + 1 <= limit:  # prev > 0: wait until enough of it has slid out
            retry = start + w - ((limit - 1 - cur) * w) // prev - now
        else:  # this window is full: in the next one, cur becomes prev
            retry = start + w + w - ((limit - 1) * w) // cur - now
        return False, retry, 0, reset, None

    def commit(self, ident: str, token: int, now: int) -> None:
        self.cur[ident] = token

    def size(self) -> int:
        return len(self.cur) + len(self.prev)


class _Gcra:
    """GCRA: one theoretical arrival time (TAT) per identity; a bucket of ``burst``."""

    __slots__ = ("debt", "due", "interval", "tats", "tau")

    def __init__(self, tier: Tier) -> None:
        self.interval = tier.interval_us
        self.tau = tier.capacity * tier.interval_us
        self.tats: dict[str, int] = {}
        self.debt = 0
        self.due = _SWEEP_EVERY * _SWEEP_MIN

    def peek(self, ident: str, now: int) -> _Verdict:
        tat = self.tats.get(ident, now)
        if tat < now:
            tat = now
        new = tat + self.interval
        ahead = new - now
        if ahead <= self.tau:
            return True, 0, (self.tau - ahead) // self.interval, ahead, new
        return False, ahead - self.tau, 0, tat - now, None

    def commit(self, ident: str, token: int, now: int) -> None:
        tats = self.tats
        size = len(tats)
        tats[ident] = token
        self.debt += 1 if len(tats) == size else 1 + _SWEEP_EVERY
        if self.debt >= self.due:
            # A TAT in the past is the same as no state at all.
            self.tats = {k: v for k, v in tats.items() if v > now}
            self.debt = 0
            self.due = _SWEEP_EVERY * max(_SWEEP_MIN, len(self.tats))

    def size(self) -> int:
        return len(self.tats)


class _SlidingLog:
    """Exact: one timestamp per admitted request; ≤ limit in every window of length W."""

    __slots__ = ("debt", "due", "limit", "logs", "window")

    def __init__(self, tier: Tier) -> None:
        self.limit = tier.limit
        self.window = tier.window_us
        self.logs: dict[str, deque[int]] = {}
        self.debt = 0
        self.due = _SWEEP_EVERY * _SWEEP_MIN

    def peek(self, ident: str, now: int) -> _Verdict:
        log = self.logs.get(ident)
        if not log:
            return True, 0, self.limit - 1, self.window, None
        cutoff = now - self.window
        while log and log[0] <= cutoff:
            log.popleft()
        n = len(log)
        if n < self.limit:
            oldest = log[0] if n else now
            return True, 0, self.limit - n - 1, oldest + self.window - now, log
        retry = log[n - self.limit] + self.window - now
        return False, retry, 0, retry, None

    def commit(self, ident: str, token: deque[int] | None, now: int) -> None:
        if token is None:
            self.logs[ident] = deque((now,))
            self.debt += 1 + _SWEEP_EVERY
        else:
            token.append(now)
            self.debt += 1
        if self.debt >= self.due:
            cutoff = now - self.window
            self.logs = {k: v for k, v in self.logs.items() if v and v[-1] > cutoff}
            self.debt = 0
            self.due = _SWEEP_EVERY * max(_SWEEP_MIN, len(self.logs))

    def size(self) -> int:
        return len(self.logs)


_State = _FixedWindow | _SlidingWindow | _Gcra | _SlidingLog
_KINDS: dict[str, type[_FixedWindow] | type[_SlidingWindow] | type[_Gcra] | type[_SlidingLog]] = {
    "fixed_window": _FixedWindow,
    "sliding_window": _SlidingWindow,
    "gcra": _Gcra,
    "sliding_log": _SlidingLog,
}


class _Account:
    """One organization's credits in one calendar month."""

    __slots__ = ("pairs", "period", "refunded", "requests", "topup", "used")

    def __init__(self, period: int) -> None:
        self.period = period
        self.used = 0
        self.requests = 0
        self.topup = 0
        self.pairs: dict[tuple[str, str], list[int]] = {}
        self.refunded: set[str] = set()


class MemoryBackend:
    """All state in this process's memory, guarded by one lock. Thread-safe.

    ``clock`` is a zero-argument callable returning UNIX seconds (default
    ``time.time``). Time never runs backwards here: a clock that steps back is
    held at the latest time seen.
    """

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock: Clock = clock if clock is not None else time.time
        self._lock = threading.Lock()
        self._last = 0
        self._tiers: dict[tuple[object, ...], _State] = {}
        # Per operation: (state, counts the key (else the org)?, tier) for each tier,
        # so that the hot loop neither indexes the tiers nor compares scope strings.
        self._op_states: dict[OperationPlan, tuple[tuple[_State, bool, Tier], ...]] = {}
        self._accounts: dict[str, _Account] = {}
        self._account_creations = 0
        self._allowances: dict[str, int] = {}
        self._idem: dict[tuple[str, str], tuple[int, str, str, int, Outcome]] = {}
        self._idem_commits = 0
        self._period = (0, 0)

    def __repr__(self) -> str:
        return f"MemoryBackend(identities={self.size()})"

    # -- time ---------------------------------------------------------------------

    def _now(self) -> int:
        now = round(self._clock() * _US)
        if now < self._last:
            return self._last
        self._last = now
        return now

    def _period_of(self, now: int) -> tuple[int, int]:
        period = self._period
        if not period[0] <= now < period[1]:
            period = self._period = month_bounds(now)
        return period

    # -- state ---------------------------------------------------------------------

    def _states(self, op: OperationPlan) -> tuple[tuple[_State, bool, Tier], ...]:
        states = []
        for tier in op.tiers:
            # Tiers with the same name and parameters share counters across policies.
            ident = (tier.name, tier.scope, tier.algorithm, tier.limit, tier.window_us, tier.burst)
            state = self._tiers.get(ident)
            if state is None:
                state = self._tiers[ident] = _KINDS[tier.algorithm](tier)
            states.append((state, tier.scope == "key", tier))
        result = self._op_states[op] = tuple(states)
        return result

    def _account(self, org: str, period: int) -> _Account:
        acct = self._accounts.get(org)
        if acct is None or acct.period != period:
            self._account_creations += 1
            if self._account_creations >= _SWEEP_MIN and self._account_creations >= len(
                self._accounts
            ):
                # Accounts of ended months can no longer matter (amortized O(1)).
                self._account_creations = 0
                self._accounts = {k: a for k, a in self._accounts.items() if a.period == period}
            acct = self._accounts[org] = _Account(period)
        return acct

    def size(self) -> int:
        """How many identity-tier states, accounts and idempotency records are held."""
        with self._lock:
            return (
                sum(s.size() for s in self._tiers.values())
                + len(self._accounts)
                + len(self._idem)
            )

    # -- the one atomic step ---------------------------------------------------------

    def apply(self, plan: Plan) -> Outcome:
        """Check every tier and the credits of ``plan``; consume all of them or none."""
        op = plan.op
        if plan.mode == "live":
            key, org = plan.key, plan.org
        else:
            key, org = _TEST_NS + plan.key, _TEST_NS + plan.org
        policy = plan.policy
        with self._lock:
            now = self._now()
            if plan.idem is not None:
                record = self._idem.get((org, plan.idem))
                if record is not None and record[0] > now:
                    return _replay(plan, record)
            states = self._op_states.get(op)
            if states is None:
                states = self._states(op)
            verdicts = []
            results: list[TierOutcome] = []
            retry = 0
            denied = False
            for state, by_key, tier in states:
                ident = key if by_key else org
                ok, wait, remaining, reset, token = state.peek(ident, now)
                if ok:
                    verdicts.append((state, ident, token))
                    results.append((remaining, reset, 0))
                else:
                    results.append((0, reset, 1))
                    if not (tier.shadow or policy.shadow):
                        denied = True
                        if wait > retry:
                            retry = wait
            start, end = self._period
            if not start <= now < end:
                start, end = self._period_of(now)
            acct = self._accounts.get(org)
            if acct is None or acct.period != start:
                acct = self._account(org, start)
            allowance = self._allowances.get(org, policy.credits.allowance_micro) + acct.topup
            balance = allowance - acct.used
            cost = plan.cost
            if cost > balance and not policy.shadow:
                return (False, REASON_CREDITS, now, max(end - now, retry), _unspent(results),
                        0, balance, end, "", False)
            if denied:
                return (False, REASON_RATE, now, retry, _unspent(results),
                        0, balance, end, "", False)
            for state, ident, token in verdicts:
                state.commit(ident, token, now)
            acct.used += cost
            acct.requests += 1
            pair = acct.pairs.get((plan.key, op.name))
            if pair is None:
                acct.pairs[(plan.key, op.name)] = [1, cost]
            else:
                pair[0] += 1
                pair[1] += cost
            charge = new_charge_id()
            outcome: Outcome = (True, REASON_NONE, now, 0, tuple(results),
                                cost, balance - cost, end, charge, False)
            if plan.idem is not None:
                self._remember(org, plan.idem, plan, now, outcome)
            return outcome

    def _remember(self, org: str, idem: str, plan: Plan, now: int, outcome: Outcome) -> None:
        self._idem[(org, idem)] = (
            now + _IDEM_TTL_US, plan.key, plan.op.name, plan.cost, outcome
        )
        self._idem_commits += 1
        if self._idem_commits >= _SWEEP_MIN and self._idem_commits >= len(self._idem):
            self._idem_commits = 0
            self._idem = {k: v for k, v in self._idem.items() if v[0] > now}

    # -- refunds, usage, allowances ------------------------------------------------

    def refund(self, plan: Plan, outcome: Outcome) -> bool:
        """Return an admitted outcome's credits once; False if already refunded or gone."""
        charge = outcome[8]
        if not outcome[0] or not charge:
            return False
        org = plan.org if plan.mode == "live" else _TEST_NS + plan.org
        start, _ = month_bounds(outcome[2])
        with self._lock:
            if start != self._period_of(self._now())[0]:
                return False  # an ended month is closed, even if the org was idle since
            acct = self._accounts.get(org)
            if acct is None or acct.period != start or charge in acct.refunded:
                return False
            acct.refunded.add(charge)
            amount = outcome[5]
            acct.used -= amount
            pair = acct.pairs.get((plan.key, plan.op.name))
            if pair is not None:
                pair[1] -= amount
            if plan.idem is not None:
                # A refunded request did not happen as far as billing goes: its retry
                # is a new request. A newer request that reused the key keeps its record.
                record = self._idem.get((org, plan.idem))
                if record is not None and record[4][8] == charge:
                    del self._idem[(org, plan.idem)]
            return True

    def usage(self, policy: Policy, org: str, mode: str = "live") -> RawUsage:
        """This month's credits and requests of ``org``, per (key, operation)."""
        ident = org if mode == "live" else _TEST_NS + org
        with self._lock:
            now = self._now()
            start, end = self._period_of(now)
            acct = self._accounts.get(ident)
            if acct is None or acct.period != start:
                acct = _Account(start)
            allowance = self._allowances.get(ident, policy.credits.allowance_micro) + acct.topup
            pairs = {k: list(v) for k, v in acct.pairs.items()}
            return start, end, allowance, acct.used, acct.requests, pairs

    def set_allowance(self, org: str, mode: str, micro: int | None) -> None:
        """Set ``org``'s monthly allowance (None: back to the policy's)."""
        ident = org if mode == "live" else _TEST_NS + org
        with self._lock:
            if micro is None:
                self._allowances.pop(ident, None)
            else:
                self._allowances[ident] = micro

    def top_up(self, org: str, mode: str, micro: int) -> None:
        """Add credits to ``org``'s current month only (no rollover)."""
        ident = org if mode == "live" else _TEST_NS + org
        with self._lock:
            now = self._now()
            start, _ = self._period_of(now)
            self._account(ident, start).topup += micro

    def close(self) -> None:
        """Nothing to release; here so every backend can be closed the same way."""


def _unspent(results: list[TierOutcome]) -> tuple[TierOutcome, ...]:
    """Tier results of a denied request: nothing was consumed, so an admitting tier
    has one more left than it would have had after this request (exact for all four
    algorithms)."""
    return tuple((r + 1, reset, 0) if not den else (r, reset, den) for r, reset, den in results)


def _replay(plan: Plan, record: tuple[int, str, str, int, Outcome]) -> Outcome:
    from meterkit._errors import InvalidRequestError

    _, key, operation, cost, first = record
    if key != plan.key or operation != plan.op.name or cost != plan.cost:
        raise InvalidRequestError(
            "this idempotency key was first used for a different request "
            f"(key {key!r}, operation {operation!r})"
        )
    return (*first[:9], True)
