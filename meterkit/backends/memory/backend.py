"""The in-memory backend: every algorithm in Python, one lock, bounded state.

This is the reference implementation of the four algorithms, the credits and
idempotency; the Lua script of the Redis backend is the only other place they are
written, and ``tests/test_conformance.py`` pins the two together.

Each algorithm is written once, as a snippet of Python source (``_ALGORITHMS``
below, each next to its promise). The first time the backend sees an operation it
writes one function for it (``_APPLY``): the lock, the monotonic clock, the
idempotency replay, that operation's tiers inlined from the snippets (their
parameters as constants: no loop, no method calls, no verdict lists), the credits,
the all-or-nothing commit, the usage record, the charge id and the idempotency
record. It compiles each distinct source once and binds it to this backend's state
(attrs' approach to ``__init__``); that made ``apply`` of the seed policy 1.4x
faster. The source is kept on the function (``fn.__source__``) and in
:mod:`linecache` under a filename such as ``<meterkit apply invoices.list>``, so
tracebacks show the line that failed; :meth:`MemoryBackend.source` returns it.

Customer plans (docs/plans.md): an organization's plan, its negotiated deal and its
keys' plans are kept in ``_assigned``, looked up by the operation's function under
the same lock. A check of an organization on no plan goes on in that function, as
before plans (one look in a dict that is empty until some organization is put on a
plan). One on a plan runs the function written for the tiers in force for it: the
same source (``_BODY``) with that plan's numbers as constants, compiled once per
distinct set of tiers and kept by the organization for its next check.

State per tier lives in plain dicts keyed by identity (a key id or an org id), in
slotted containers shared by every operation (and every policy) that uses a tier of
the same name and parameters: those of the policy's own tier, under every plan, so
that a customer moved to another plan keeps what it spent. Fixed and sliding windows
keep only the current (and previous) window's dict and drop the older ones whole when
the window turns, so eviction costs nothing per request. A sliding log is an
``array('q')`` of admission times per identity, 8 bytes each (times only grow, the
clock being held monotonic, so the log is sorted and trimmed by bisection; a time past
2**63 µs cannot reach it: ``month_bounds`` refuses years past 9999 before anything is
consumed).

No check pauses for long, whatever the number of identities: every tier's state is
split in :data:`_SHARDS` dicts by the identity's hash, so that a dict that grows
(Python resizes a dict in one step) or is swept holds a 256th of the identities.
Window dicts that turn are not freed at once either: they are dropped one shard per
check. GCRA buckets and sliding logs are swept one shard at a time, paid as debt: a
commit adds 1, one that adds an identity 1 + _SWEEP_EVERY, and the next shard is
swept once the debt reaches _SWEEP_EVERY times its size (at least 16). New
identities thus sweep every shard before the state doubles, while a steady set of
identities pays for one pass per _SWEEP_EVERY x len commits. Idempotency records and
accounts of ended months are dropped oldest first, two per new one. Sweeps drop only
state that can no longer matter, so they never change an outcome. Measured by
``python bench/bench_core.py --pauses`` (1,000,000 new keys): see docs/benchmarks.md.
"""

from __future__ import annotations

import heapq
import itertools
import linecache
import textwrap
import threading
import time
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from string import Template
from typing import TYPE_CHECKING, Any, cast

from meterkit.core.credits import MAX_MICRO, alerts_reached, top_up_too_large
from meterkit.core.idempotency import Claim, Held, claim, keep
from meterkit.core.outcome import (
    REASON_CREDITS,
    REASON_NONE,
    REASON_RATE,
    Outcome,
    RawUsage,
    replay,
    unspent,
)
from meterkit.core.plan import END_OF_TIME_US as _END_OF_TIME
from meterkit.core.plan import Plan, bad_clock, clock_us, month_bounds
from meterkit.core.policy import enforces
from meterkit.errors import ConfigurationError
from meterkit.ledger.events import ALLOWANCE, PLAN, REFUND, TOPUP, deal_text, plan_detail
from meterkit.ledger.log import MemoryLog, ledger_full

if TYPE_CHECKING:
    from meterkit.core.policy import Deal, OperationPlan, Policy, Tier
    from meterkit.ledger.reconcile import OrgSnapshot
    from meterkit.ledger.store import LedgerStore

__all__ = ["MemoryBackend"]

Clock = Callable[[], float]
Apply = Callable[[Plan], Outcome]
#: A check under a plan: (plan, organization's identity, idempotency key, now µs).
Variant = Callable[[Plan, str, "str | None", int], Outcome]
_US = 1_000_000
_SWEEP_MIN = 4096
_SWEEP_EVERY = 8
#: Dicts per tier state (a power of two: an identity's is ``hash(id) & _MASK``).
_SHARDS = 256
_MASK = _SHARDS - 1
_SHARD_SWEEP_MIN = _SWEEP_MIN // _SHARDS
_IDEM_TTL_US = 24 * 3600 * _US
# Charge ids of memory backends: a counter, unique in this process, whose state
# (and so whose refunds) is the process's own (Redis's carry a random prefix too).
_CHARGES = itertools.count(1)
#: Functions of checks under plans kept for sharing between organizations (each
#: organization also keeps its own).
_VARIANTS_MAX = 4096
# Ids cannot hold control characters, so this separator cannot be forged by a caller.
_TEST_NS = "\x1ftest\x1f"


# -- tier state: plain containers -------------------------------------------------------


def _shards() -> list[dict[str, Any]]:
    return [{} for _ in range(_SHARDS)]


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

    def live(self, value: array[int], now: int) -> bool:
        # A log whose newest entry is a window old holds nothing that counts.
        return bool(value) and value[-1] > now - self.window


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


# -- the algorithms, once each ------------------------------------------------------------
#
# A snippet has two parts. ``check`` runs first for every tier, under the lock; it
# reads the tier's state (``s$i``) for the identity ``$who`` at time ``now`` (µs,
# never going back) and sets ``t$i`` to the tier's TierOutcome: (remaining after
# this request, µs until it resets, 0) if the tier admits it, else (0, µs until it
# resets, 1) -- and then runs ``$deny`` with ``wait$i``, the µs until a retry would be
# admitted (≥ 1). ``commit`` runs once every tier and the credits agreed, and
# consumes. A check may tidy its state (turn a window, trim a log) but consumes
# nothing: a denied request leaves every tier as it found it.
#
# $W is the window in µs, $L the limit; other constants are named where used.
# Locals carry the tier's index, so the snippets of several tiers never collide.

_ALGORITHMS: dict[str, tuple[str, str]] = {
    # Promise: at most $L admitted per UTC-aligned window of $W µs.
    "fixed_window": (
        """\
end$i = s$i.end
if now >= end$i:  # a new window: the old counts go, one shard per check
    end$i = s$i.end = now - now % $W + $W
    s$i.dead += s$i.counts
    s$i.counts = _shards()
elif s$i.dead:
    del s$i.dead[-1]
counts$i = s$i.counts[$sh]
n$i = counts$i.get($who, 0)
reset$i = end$i - now
if n$i < $L:
    t$i = ($L_1 - n$i, reset$i, 0)
else:
    wait$i = reset$i
    t$i = (0, reset$i, 1)
    $deny
""",
        """\
counts$i[$who] = n$i + 1
""",
    ),
    # Promise: at most $L admitted per aligned window, and the weighted estimate
    # prev·(W−e)/W + cur stays ≤ $L (e: the µs elapsed in the window; W−e is the
    # reset); in integers, admitted iff prev·(W−e) + (cur+1)·W ≤ L·W ($LW).
    "sliding_window": (
        """\
end$i = s$i.end
if now >= end$i:  # a new window: the current one becomes the previous one
    end$i = s$i.turn(now, $W)
elif s$i.dead:
    del s$i.dead[-1]
cur$i = s$i.cur[$sh]
c$i = cur$i.get($who, 0)
p$i = s$i.prev[$sh].get($who, 0)
reset$i = end$i - now
used$i = p$i * reset$i + (c$i + 1) * $W
if used$i <= $LW:
    t$i = (($LW - used$i) // $W, reset$i, 0)
else:
    if c$i < $L:  # p$i > 0: wait until enough of it has slid out
        wait$i = reset$i - (($L_1 - c$i) * $W) // p$i
    else:  # this window is full: in the next one, cur becomes prev
        wait$i = reset$i + $W - $L_1W // c$i
    t$i = (0, reset$i, 1)
    $deny
""",
        """\
cur$i[$who] = c$i + 1
""",
    ),
    # Promise: over any interval of d µs, at most burst + d / $I admitted ($I the
    # emission interval, ⌈W / L⌉ µs; $TAU = burst · $I). One TAT per identity.
    "gcra": (
        """\
tats$i = s$i.shards[$sh]
last$i = tats$i.get($who)
tat$i = now if last$i is None or last$i < now else last$i
new$i = tat$i + $I
ahead$i = new$i - now
if ahead$i <= $TAU:
    t$i = (($TAU - ahead$i) // $I, ahead$i, 0)
else:
    wait$i = ahead$i - $TAU
    t$i = (0, tat$i - now, 1)
    $deny
""",
        """\
tats$i[$who] = new$i
s$i.debt += 1 if last$i is not None else $FRESH
if s$i.debt >= s$i.due:
    s$i.sweep(now)
""",
    ),
    # Promise: at most $L admitted in every rolling window of $W µs (exact: one
    # timestamp per admitted request, in an array('q') per identity, ascending).
    "sliding_log": (
        """\
logs$i = s$i.shards[$sh]
log$i = logs$i.get($who)
if not log$i:
    t$i = ($L_1, $W, 0)
else:
    cutoff$i = now - $W
    if log$i[0] <= cutoff$i:  # entries a window old no longer count
        if len(log$i) == 1 or log$i[1] > cutoff$i:
            del log$i[0]  # the usual case: only the oldest
        else:
            del log$i[:bisect_right(log$i, cutoff$i)]
    n$i = len(log$i)
    if n$i < $L:
        t$i = ($L_1 - n$i, log$i[0] + $W - now if n$i else $W, 0)
    else:
        wait$i = log$i[n$i - $L] + $W - now
        t$i = (0, wait$i, 1)
        $deny
""",
        """\
if log$i is None:
    logs$i[$who] = array("q", (now,))
    s$i.debt += $FRESH
else:
    log$i.append(now)
    s$i.debt += 1
if s$i.debt >= s$i.due:
    s$i.sweep(now)
""",
    ),
}

# What a tier that says no does: an enforcing tier denies the request (the longest
# wait wins); a shadow tier (or any tier of a shadow policy) only reports it.
_DENY = """\
denied = True
if wait$i > retry:
    retry = wait$i
"""
_SHADOW = "pass  # shadow: reported, never denies\n"

# The function written for one operation. $name is the operation's name, $body the
# check itself under the default plan (_BODY); a shadow policy never denies for
# credits, a policy without enforcing tiers never for rate. An organization put on a
# plan (or given a deal, or whose keys have plans) is found in b._assigned, under the
# same lock, and its check runs in the function written for the tiers in force for
# it (_VARIANT: the same body with that plan's numbers); $dispatch finds it.
_APPLY = '''\
def bind(b, policy, limits, lock, clock, $states):
    acquire = lock.acquire
    release = lock.release
    shard_of = hash  # (a closure's variable: read faster than a builtin)
    # (the backend's dicts are made once and never replaced: closure variables)
    accounts = b._accounts
    allowances = b._allowances
    idempotency = b._idem
    assigned = b._assigned
    variant = b._variant
    $ledger

    def apply(plan):
        """Check every tier and the credits of one $name request; consume all or none."""
        if plan.policy is not policy:  # an operation is planned by one policy: a stray
            return b._apply_stray(plan)  # pairing gets its own function
        org = plan.org if plan.mode == "live" else _TEST_NS + plan.org
        idem = plan.idem
        # The clock is read before the lock: a clock that calls back into the meter
        # cannot deadlock it, and a bad reading changes nothing.
        $clock
        acquire()
        try:
            if now < b._last:  # the clock stepped back: hold time at the latest seen
                now = b._last
            else:
                b._last = now
            if idem is not None:
                record = idempotency.get((org, idem))
                if record is not None and record[0] > now:
                    return _replay(plan, record)
            $dispatch
            $body
        finally:
            release()

    return apply
'''
# The dispatch of the usual function: an organization's functions by operation (when
# none of its keys has a plan of its own), else the backend's lookup.
_DISPATCH = """\
if assigned:  # (empty until some organization is put on a plan)
    a = assigned.get(org)
    if a is not None:  # its plan, its deal or its keys' plans
        fn = a.fns.get(plan.op) if not a.keys else None
        if fn is None:
            fn = variant(a, plan, False, True)
        return fn(plan, org, idem, now)
"""
# The dispatch of a peek's function (and of a stray pairing's): the backend's lookup.
_DISPATCH_SLOW = """\
if assigned:
    a = assigned.get(org)
    if a is not None:
        return variant(a, plan, $PEEK, False)(plan, org, idem, now)
"""
# The dispatch of an operation whose requests name their key's plan (Policy.keyed).
_DISPATCH_KEYED = """\
return variant(assigned.get(org), plan, $PEEK, False)(plan, org, idem, now)
"""
# The function written for one operation under one plan: called by the operation's
# function, which holds the lock and has read the clock.
_VARIANT = '''\
def bind(b, policy, limits, $states):
    shard_of = hash
    accounts = b._accounts
    allowances = b._allowances
    $ledger

    def run(plan, org, idem, now):
        """Check every tier and the credits of one $name request under plan $plan."""
        $body

    return run
'''
# One check, once the time is known and the lock held.
_BODY = """\
# -- this month's account, and the key's identity in it
start, end = b._period
if not start <= now < end:
    start, end = b._period_of(now)
acct = accounts.get(org)
if acct is None or acct.period != start:
    $open
$ident
$shards
$init
$tiers
# -- credits, checked after the tiers
balance = allowances.get(org, $ALLOWANCE) + acct.topup - acct.used
cost = plan.cost
$credits
$denials
$admit
"""
# What an admitted request does: consume every tier and the credits.
_ADMIT = """\
# -- admitted: consume every tier and the credits
$full
$remember
$commits
acct.used += cost
acct.requests += 1
by_key = acct.pairs.get($OP)
if by_key is None:
    by_key = acct.pairs[$OP] = {}
by_key[plan.key] = by_key.get(plan.key, 0) + $ONE + cost
$charge
$alerts
outcome = _new(_Outcome, (True, $NONE, now, 0, ($outcomes), cost, balance - cost, end,
               $CHARGE_ID, False, limits, $ALERTED))
if idem is not None:
    b._remember(org, idem, plan, now, outcome)
$event
return outcome
"""
# With a ledger (MemoryBackend(ledger=True)): the log, bound once; a check that would
# charge while the log is full is refused before it consumes anything; an admitted
# check appends one tuple (its charge counter, the time, the organization, mode, key,
# operation and cost: see meterkit/ledger/events.py), and nothing else. Only strings
# and ints: the garbage collector stops tracking such a tuple at its first pass, so
# an undrained log costs the collector nothing (a tuple holding the Plan, alive until
# drained, made every check 10% dearer under callgrind).
_LEDGER_BIND = """\
log = b.ledger.entries
log_append = log.append
"""
_LEDGER_FULL = """\
if len(log) >= {capacity}:
    raise _ledger_full({capacity})
"""
_LEDGER_CHARGE = "n = _next_charge()\n"
_LEDGER_EVENT = "log_append((n, now, plan.org, plan.mode, plan.key, $OP, cost))\n"
# What a peek does instead: say so, consume nothing (and keep no new account).
_PEEK = """\
# -- a peek: what check would answer now, and nothing consumed
return _new(_Outcome, (True, $NONE, now, 0, ($outcomes), cost, balance - cost, end, "", False,
                       limits, ()))
"""
# Only for operations with key-scoped tiers.
_IDENT = """\
# Key-scoped state is the key's within its organization (as on Redis, where it must
# sit in the org's Cluster slot; ids hold no control characters, so the separator
# cannot be forged): one string per key and month, kept by the account once admitted,
# shared by every tier that holds the key.
key = acct.idents.get(plan.key)
fresh = key is None
if fresh:
    key = org + "\x1f" + plan.key
"""
# Reading the clock: a clock given to the backend is checked (a number of seconds,
# inside the supported years); the default one is the system's, in whole µs, which
# is both (and time_ns avoids rounding a float).
_USER_CLOCK = """\
try:
    now = round(clock() * 1000000)
except (TypeError, ValueError, OverflowError):
    raise _bad_clock() from None
if not 0 <= now < $END:
    raise _bad_clock(now)
"""
_SYSTEM_CLOCK = "now = _time_ns() // 1000  # the default clock, time.time, in µs\n"
_REMEMBER = """\
if fresh:
    acct.idents[plan.key] = key
"""
_CREDITS = """\
if cost > balance:
    $alerts
    return _new(_Outcome, (False, $CREDITS, now, max(end - now, retry), _unspent(($outcomes)),
                           0, balance, end, "", False, limits, $ALERTED))
"""
_DENIALS = """\
if denied:
    return _new(_Outcome, (False, $RATE, now, retry, _unspent(($outcomes)), 0, balance, end,
                           "", False, limits, ()))
"""
# Credit alerts, for a policy with thresholds ($PERCENTS): those this request reached
# first in its organization's month (the rule: meterkit.core.credits.alerts_reached),
# counted by the account. Admitted, ``acct.used`` holds the charge already; refused for
# credits, it does not. The test of the next threshold is written out: a call less on
# every check below it.
_ALERTS = """\
# -- credit alerts: the thresholds reached first by this request, once in the month
alerts = ()
total = balance + $USED_BEFORE  # (the month's allowance and top-ups)
if acct.alerted < $N and ($DEMAND) * 100 >= total * $PERCENTS[acct.alerted]:
    alerts = acct.reach($PERCENTS, total, $DEMAND)
"""


def _fill(template: str, **values: object) -> str:
    """Substitute ``values``; a value holding several lines keeps its placeholder's
    indentation (a placeholder standing alone on its line is a block)."""
    lines = []
    for line in template.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("$") and stripped[1:] in values:
            block = str(values[stripped[1:]])
            if block and not block.endswith("\n"):
                block += "\n"
            indent = line[: len(line) - len(line.lstrip())]
            lines.append(textwrap.indent(block, indent) if block.strip() else "")
        else:
            lines.append(line)
    return Template("".join(lines)).substitute(values)


def _tier_source(i: int, tier: Tier, enforce: bool) -> tuple[str, str]:
    """The check and commit source of tier ``i`` of an operation."""
    check, commit = _ALGORITHMS[tier.algorithm]
    who = "key" if tier.scope == "key" else "org"
    constants = {
        "i": str(i),
        "who": who,
        "sh": "hk" if who == "key" else "ho",
        "W": str(tier.window_us),
        "L": str(tier.limit),
        "L_1": str(tier.limit - 1),
        "LW": str(tier.limit * tier.window_us),
        "L_1W": str((tier.limit - 1) * tier.window_us),
        "I": str(tier.interval_us),
        "TAU": str(tier.tau_us),
        "FRESH": str(1 + _SWEEP_EVERY),
    }
    deny = _fill(_DENY if enforce else _SHADOW, i=str(i))
    shadow = ", shadow" if tier.shadow else ""
    head = (
        f"# -- tier {i}: {tier.name!r}, {tier.algorithm}, {tier.limit} per {tier.window} s "
        f"per {tier.scope}{shadow}\n"
    )
    check_src = head + _fill(check, deny=deny, **constants)
    commit_src = _fill(commit, **constants)
    if not enforce:  # a tier that said no without denying consumes nothing
        commit_src = f"if not t{i}[2]:\n" + textwrap.indent(commit_src, "    ")
    return check_src, f"# tier {i}: {tier.name!r}\n" + commit_src


def _body_source(
    op: OperationPlan, policy: Policy, *, peek: bool, ledger: int = 0
) -> tuple[str, str]:
    """The check of ``op``'s tiers (as given: the default plan's or another's) and
    credits, once the time is known and the lock held; and its tiers' state names.
    ``ledger``: the capacity of the backend's ledger log (0: none)."""
    checks, commits = [], []
    enforcing = False
    for i, tier in enumerate(op.tiers):
        # (the policy's own rule: a plan paired with another policy follows that one)
        enforce = enforces(tier, policy.shadow)
        enforcing = enforcing or enforce
        check, commit = _tier_source(i, tier, enforce)
        checks.append(check)
        commits.append(commit)
    n = len(op.tiers)
    by_key = any(tier.scope == "key" for tier in op.tiers)
    outcomes = ", ".join(f"t{i}" for i in range(n)) + ("," if n == 1 else "")
    states = ", ".join(f"s{i}" for i in range(n)) or "*_"
    init = "denied = False\nretry = 0" if enforcing else "retry = 0"
    # The policy's own allowance for its own operations (a stray pairing follows the
    # policy it is paired with); a plan's for the operation under that plan.
    allowance = policy.credits.allowance_micro if op.base is op else op.allowance
    percents = policy.credits.alert_percents
    alerted = "alerts" if percents and not peek else "()"

    def alerts_source(used_before: str, demand: str) -> str:
        if not percents or peek:
            return ""
        return _fill(
            _ALERTS,
            USED_BEFORE=used_before,
            DEMAND=demand,
            N=str(len(percents)),
            PERCENTS=repr(percents),
        )

    body = _fill(
        _BODY,
        init=init,
        tiers="".join(checks) or "# no tiers",
        credits=""
        if policy.shadow
        else _fill(
            _CREDITS,
            outcomes=outcomes,
            CREDITS=str(REASON_CREDITS),
            alerts=alerts_source("acct.used", "acct.used + cost"),
            ALERTED=alerted,
        ),
        denials=_fill(_DENIALS, outcomes=outcomes, RATE=str(REASON_RATE)) if enforcing else "",
        admit=_fill(
            _PEEK if peek else _ADMIT,
            commits="".join(commits) or "# no tiers",
            outcomes=outcomes,
            remember=_REMEMBER if by_key and not peek else "",
            full=_LEDGER_FULL.format(capacity=int(ledger)) if ledger else "",
            charge=_LEDGER_CHARGE if ledger else "",
            event=_LEDGER_EVENT if ledger else "",
            CHARGE_ID="str(n)" if ledger else "str(_next_charge())",
            OP=repr(op.name),
            NONE=str(REASON_NONE),
            ONE=str(_ONE_REQUEST),
            alerts=alerts_source("acct.used - cost", "acct.used"),
            ALERTED=alerted,
        ),
        open="acct = _Account(start)" if peek else "acct = b._account(org, start)",
        outcomes=outcomes,
        ident=_IDENT if by_key else "",
        shards="\n".join(
            line
            for line, needed in (
                ("hk = shard_of(key) & $MASK", by_key),
                ("ho = shard_of(org) & $MASK", any(tier.scope == "org" for tier in op.tiers)),
            )
            if needed
        ).replace("$MASK", str(_MASK)),
        ALLOWANCE=str(allowance),
    )
    return body, states


def apply_source(
    op: OperationPlan,
    policy: Policy,
    *,
    peek: bool = False,
    stray: bool = False,
    system_clock: bool = True,
    ledger: int = 0,
) -> str:
    """The Python source of the function that applies ``op`` of ``policy`` (with
    ``peek``, of the one that answers the same without consuming anything), for a
    backend on the system clock or on a clock of its own, with a ledger log of
    ``ledger`` events at most (0: none)."""
    ledger = 0 if peek else ledger
    body, states = _body_source(op, policy, peek=peek, ledger=ledger)
    return _fill(
        _APPLY,
        name=op.name,
        states=states,
        body=body,
        ledger=_LEDGER_BIND if ledger else "",
        dispatch=_fill(
            _DISPATCH_KEYED
            if op.key_plan is not None
            else (_DISPATCH_SLOW if peek or stray else _DISPATCH),
            PEEK=str(peek),
        ),
        clock=_SYSTEM_CLOCK if system_clock else _USER_CLOCK,
        END=str(_END_OF_TIME),
    )


def variant_source(
    limits: OperationPlan, policy: Policy, *, peek: bool = False, ledger: int = 0
) -> str:
    """The Python source of the function that applies ``limits`` (an operation under
    a plan, see :meth:`Policy.limits_for`) once the lock is held and the time known."""
    ledger = 0 if peek else ledger
    body, states = _body_source(limits, policy, peek=peek, ledger=ledger)
    return _fill(
        _VARIANT,
        name=limits.name,
        plan=repr(limits.plan),
        states=states,
        body=body,
        ledger=_LEDGER_BIND if ledger else "",
    )


# Compiled binders, by source: backends (and policies) with the same operations
# share the code, and only bind their own state to it. Each has its own filename.
_BINDERS: dict[str, Callable[..., Apply]] = {}
_FILENAMES: set[str] = set()


def _binder(source: str, name: str) -> Callable[..., Apply]:
    bind = _BINDERS.get(source)
    if bind is not None:
        return bind
    filename = f"<meterkit apply {name}>"
    n = 1
    while filename in _FILENAMES:  # another policy's operation of the same name
        n += 1
        filename = f"<meterkit apply {name} #{n}>"
    _FILENAMES.add(filename)
    namespace: dict[str, object] = {
        "_TEST_NS": _TEST_NS,
        "_replay": replay,
        "_unspent": unspent,
        "_new": tuple.__new__,
        "_Outcome": Outcome,
        "_bad_clock": bad_clock,
        "_next_charge": _CHARGES.__next__,
        "_time_ns": time.time_ns,
        "_Account": _Account,
        "array": array,
        "bisect_right": bisect_right,
        "_shards": _shards,
        "_ledger_full": ledger_full,
    }
    exec(compile(source, filename, "exec"), namespace)
    # Tracebacks and inspect read generated code from linecache, as with attrs.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    bind = _BINDERS[source] = cast("Callable[..., Apply]", namespace["bind"])
    return bind


#: An account's usage of one (key, operation) is one int: requests above this bit,
#: µ-credits below (each charge is at most 2**53, see credits.MAX_MICRO: 2**43 of them
#: fit, even in a shadow policy, whose credits never deny). An int, unlike an object,
#: is no work for Python's garbage collector, which a million keys would make pause.
_REQUEST_SHIFT = 96
_ONE_REQUEST = 1 << _REQUEST_SHIFT
_MICRO_MASK = _ONE_REQUEST - 1


class _Account:
    """One organization's credits in one calendar month."""

    __slots__ = ("alerted", "idents", "pairs", "period", "refunded", "requests", "topup", "used")

    def __init__(self, period: int) -> None:
        self.period = period
        # key id -> "org\x1fkey", the key's identity in key-scoped tier state.
        self.idents: dict[str, str] = {}
        self.used = 0
        self.requests = 0
        self.topup = 0
        # By operation, then key: the hot path finds a pair without building a tuple.
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


class MemoryBackend:
    """All state in this process's memory, guarded by one lock. Thread-safe.

    ``clock`` is a zero-argument callable returning UNIX seconds (default
    ``time.time``). Time never runs backwards here: a clock that steps back is
    held at the latest time seen.

    ``ledger=True`` (or a capacity, default 1,000,000 events) keeps a ledger: every
    admitted charge, refund, top-up, allowance and plan change is appended to
    ``self.ledger`` (a :class:`~meterkit.ledger.MemoryLog`) in the same step, for a
    :class:`~meterkit.ledger.Drain` in this process to move into SQL; when it is full,
    checks that would charge raise :class:`~meterkit.errors.LedgerFullError`.
    """

    def __init__(self, clock: Clock | None = None, *, ledger: bool | int = False) -> None:
        self._clock: Clock = clock if clock is not None else time.time
        #: The ledger's log (``ledger=True``, or its capacity), or None: see
        #: :mod:`meterkit.ledger.log`.
        self.ledger: MemoryLog | None = None
        if ledger is not False:
            self.ledger = MemoryLog() if ledger is True else MemoryLog(ledger)
        self._capacity = 0 if self.ledger is None else self.ledger.capacity
        self._lock = threading.Lock()
        self._last = 0
        # Tier state by (name, scope, algorithm, limit, window, burst): tiers with the
        # same name and parameters share counters across operations and policies.
        self._tiers: dict[tuple[object, ...], _State] = {}
        # The function that applies each operation (see apply_source), by operation
        # plan; a plan paired with another policy than its own, by (plan, policy).
        self._applies: dict[OperationPlan, Apply] = {}
        self._strays: dict[tuple[OperationPlan, Policy], Apply] = {}
        self._peeks: dict[tuple[OperationPlan, Policy], Apply] = {}
        self._accounts: dict[str, _Account] = {}
        # Orgs in the order their accounts were opened (an account of an ended month
        # is dropped when its org comes round, two per account opened).
        self._opened: deque[tuple[str, int]] = deque()
        self._allowances: dict[str, int] = {}
        self._idem: dict[tuple[str, str], tuple[int, str, str, int, Outcome]] = {}
        # Records in the order they were written, which is the order they expire in.
        self._idem_order: deque[tuple[int, tuple[str, str]]] = deque()
        # The HTTP gate's response records (meterkit.core.idempotency), by (org, key,
        # idempotency key), and their expiries, soonest first.
        self._responses: dict[tuple[str, str, str], Held] = {}
        self._response_expiries: list[tuple[int, tuple[str, str, str]]] = []
        self._period = (0, 0)
        # Plans, deals and key plans by organization's identity (see set_plan); the
        # functions of checks under a plan, by (tiers in force, policy, peek).
        self._assigned: dict[str, _Assignment] = {}
        self._variants: dict[tuple[OperationPlan, Policy, bool], Variant] = {}

    def __repr__(self) -> str:
        return f"MemoryBackend(identities={self.size()})"

    # -- time ---------------------------------------------------------------------

    def _read_clock(self) -> int:
        """The clock in µs, checked (call it before taking the lock)."""
        return clock_us(self._clock())

    def _hold(self, now: int) -> int:
        """``now``, held monotonic (under the lock)."""
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

    def _states(self, op: OperationPlan) -> list[_State]:
        """The state of each tier of ``op`` (under the lock): the policy's own tier's,
        whatever plan ``op`` has the numbers of."""
        states = []
        base = op.base.tiers
        for position in op.on:
            tier = base[position]
            ident = _state_id(tier)
            state = self._tiers.get(ident)
            if state is None:
                state = self._tiers[ident] = _new_state(tier)
            states.append(state)
        return states

    def _bind(
        self, op: OperationPlan, policy: Policy, *, peek: bool = False, stray: bool = False
    ) -> Apply:
        """Write, compile (once per distinct source) and bind the function of ``op``
        (``peek``: the one that consumes nothing)."""
        with self._lock:
            states = self._states(op)
        system_clock = self._clock is time.time
        source = apply_source(
            op, policy, peek=peek, stray=stray, system_clock=system_clock, ledger=self._capacity
        )
        name = f"{op.name} peek" if peek else op.name
        fn = _binder(source, name)(self, policy, op, self._lock, self._clock, *states)
        fn.__qualname__ = f"MemoryBackend.{'peek' if peek else 'apply'}[{op.name}]"
        fn.__source__ = source  # type: ignore[attr-defined]
        return fn

    def _variant(self, a: _Assignment | None, plan: Plan, peek: bool, fast: bool) -> Variant:
        """The function of ``plan``'s check under the tiers in force for its key in the
        organization ``a`` describes (called with the lock held); kept in ``a.fns``
        for the next check when ``fast``."""
        key_plan = plan.op.key_plan
        org_plan: str | None = None
        deal: Deal = ()
        if a is not None:
            org_plan, deal = a.plan, a.deal
            if key_plan is None and a.keys:
                key_plan = a.keys.get(plan.key)
        limits = plan.policy.limits_for(plan.op, org_plan, key_plan, deal)
        slot = (limits, plan.policy, peek)
        fn = self._variants.get(slot)
        if fn is None:
            source = variant_source(limits, plan.policy, peek=peek, ledger=self._capacity)
            name = f"{limits.name} {limits.plan}" + (" peek" if peek else "")
            bind = cast("Callable[..., Variant]", _binder(source, name))
            fn = bind(self, plan.policy, limits, *self._states(limits))
            fn.__source__ = source  # type: ignore[attr-defined]
            if len(self._variants) >= _VARIANTS_MAX:
                self._variants.clear()  # (only shared functions go: each org keeps its own)
            self._variants[slot] = fn
        if fast and a is not None and not a.keys:
            a.fns[plan.op] = fn
        return fn

    @staticmethod
    def source(
        policy: Policy, operation: str, plan: str | None = None, *, system_clock: bool = True
    ) -> str:
        """The Python source a backend writes and runs for ``operation`` of ``policy``:
        the four algorithms, the credits and idempotency, as one check executes them
        (on the default clock; ``system_clock=False``: on a clock given to it); with
        ``plan``, the function a check under that plan runs (once the operation's own
        function has read the clock, taken the lock and found the organization's plan)."""
        op = policy.plan_for(operation)
        if plan is None:
            return apply_source(op, policy, system_clock=system_clock)
        return variant_source(policy.limits_for(op, policy.check_plan(plan)), policy)

    def _account(self, org: str, period: int) -> _Account:
        acct = self._accounts.get(org)
        if acct is None or acct.period != period:
            accounts, opened = self._accounts, self._opened
            # Accounts of ended months can no longer matter: two looked at per opening.
            for _ in range(min(2, len(opened))):
                entry = opened.popleft()
                held = accounts.get(entry[0])
                if held is None or held.period != entry[1]:
                    continue  # (that account was replaced since: a newer entry has it)
                if held.period != period:
                    del accounts[entry[0]]
                else:
                    opened.append(entry)  # current: it comes round again later
            acct = accounts[org] = _Account(period)
            opened.append((org, period))
        return acct

    def size(self) -> int:
        """How many identity-tier states, accounts and idempotency records are held."""
        with self._lock:
            return (
                sum(s.size() for s in self._tiers.values())
                + len(self._accounts)
                + len(self._idem)
                + len(self._responses)
            )

    # -- the one atomic step ---------------------------------------------------------

    def apply(self, plan: Plan) -> Outcome:
        """Check every tier and the credits of ``plan``; consume all of them or none."""
        fn = self._applies.get(plan.op)
        if fn is None:
            fn = self._applies[plan.op] = self._bind(plan.op, plan.policy)
        return fn(plan)

    def reset_limits(
        self, policy: Policy, org: str, mode: str = "live", key: str | None = None
    ) -> None:
        """Forget the rate-limit state of ``key`` in ``org`` (in every key-scoped tier of
        ``policy``), or without a key, of ``org`` itself (every org-scoped tier).
        Credits and usage stay."""
        who = org if mode == "live" else _TEST_NS + org
        if key is not None:
            who += "\x1f" + key
        scope = "org" if key is None else "key"
        with self._lock:
            for tier in policy.tiers:
                state = self._tiers.get(_state_id(tier))
                if tier.scope != scope or state is None:
                    continue
                state.forget(who)

    def peek(self, plan: Plan) -> Outcome:
        """What :meth:`apply` would answer for ``plan`` now, consuming nothing: no tier,
        no credit, no usage, no idempotency record (``plan`` has no idempotency key)."""
        pair = (plan.op, plan.policy)
        fn = self._peeks.get(pair)
        if fn is None:
            fn = self._peeks[pair] = self._bind(plan.op, plan.policy, peek=True)
        return fn(plan)

    def _apply_stray(self, plan: Plan) -> Outcome:
        pair = (plan.op, plan.policy)
        fn = self._strays.get(pair)
        if fn is None:
            fn = self._strays[pair] = self._bind(plan.op, plan.policy, stray=True)
        return fn(plan)

    def _remember(self, org: str, idem: str, plan: Plan, now: int, outcome: Outcome) -> None:
        records, order = self._idem, self._idem_order
        # Expired records go oldest first, up to two per record written.
        for _ in range(2):
            if not order or order[0][0] > now:
                break
            expires, name = order.popleft()
            held = records.get(name)
            if held is not None and held[0] == expires:
                del records[name]
        expires = now + _IDEM_TTL_US
        records[(org, idem)] = (expires, plan.key, plan.op.name, plan.cost, outcome)
        order.append((expires, (org, idem)))

    # -- the HTTP gate's responses of idempotency keys ------------------------------

    def claim_response(
        self, plan: Plan, outcome: Outcome, fingerprint: str, token: str, lock_us: int
    ) -> Claim:
        """A retry of ``plan`` (its idempotency key replayed ``outcome``) asks to run:
        see :func:`meterkit.core.idempotency.claim`."""
        name = self._response_name(plan)
        now = self._read_clock()
        with self._lock:
            now = self._hold(now)
            answer, new = claim(
                self._responses.get(name),
                outcome.charge_id,
                outcome.now,
                fingerprint,
                token,
                lock_us,
                now,
            )
            if new is not None:
                self._put_response(name, new, now)
            return answer

    def keep_response(
        self, plan: Plan, outcome: Outcome, fingerprint: str, token: str, payload: bytes | None
    ) -> None:
        """A run of ``plan`` ended with ``payload`` to keep for its retries (None:
        nothing): see :func:`meterkit.core.idempotency.keep`."""
        name = self._response_name(plan)
        now = self._read_clock()
        with self._lock:
            now = self._hold(now)
            held = self._responses.get(name)
            new = keep(held, outcome.charge_id, outcome.now, fingerprint, token, payload, now)
            if new is not None:
                self._put_response(name, new, now)

    @staticmethod
    def _response_name(plan: Plan) -> tuple[str, str, str]:
        org = plan.org if plan.mode == "live" else _TEST_NS + plan.org
        return (org, plan.key, plan.idem or "")

    def _put_response(self, name: tuple[str, str, str], held: Held, now: int) -> None:
        records, expiries = self._responses, self._response_expiries
        # Expired records go soonest first, up to two per record written.
        for _ in range(2):
            if not expiries or expiries[0][0] > now:
                break
            expires, gone = heapq.heappop(expiries)
            found = records.get(gone)
            if found is not None and found.expires == expires:
                del records[gone]
        old = records.get(name)
        if old is None or old.expires != held.expires:
            heapq.heappush(expiries, (held.expires, name))
        records[name] = held

    # -- refunds, usage, allowances ------------------------------------------------

    def refund(self, plan: Plan, outcome: Outcome) -> bool:
        """Return an admitted outcome's credits once; False if already refunded or gone."""
        charge = outcome.charge_id
        if not outcome.allowed or not charge:
            return False
        org = plan.org if plan.mode == "live" else _TEST_NS + plan.org
        start, _ = month_bounds(outcome.now)
        now = self._read_clock()
        with self._lock:
            now = self._hold(now)
            if start != self._period_of(now)[0]:
                return False  # an ended month is closed, even if the org was idle since
            acct = self._accounts.get(org)
            if acct is None or acct.period != start or charge in acct.refunded:
                return False
            amount = outcome.charged
            by_key = acct.pairs.get(plan.op.name, {})
            pair = by_key.get(plan.key)
            # Only what was recorded comes back: never more than this key and operation
            # were charged this month (a caller-built outcome cannot make usage negative).
            if pair is None or not 0 <= amount <= min(pair & _MICRO_MASK, acct.used):
                return False
            self._room()
            acct.refunded.add(charge)
            acct.used -= amount
            by_key[plan.key] = pair - amount
            if self.ledger is not None:
                self._log(now, REFUND, plan.org, plan.mode, plan.key, plan.op.name, amount, charge)
            if plan.idem is not None:
                # A refunded request did not happen as far as billing goes: its retry
                # is a new request. A newer request that reused the key keeps its record.
                record = self._idem.get((org, plan.idem))
                if record is not None and record[4].charge_id == charge:
                    del self._idem[(org, plan.idem)]
            return True

    def usage(self, policy: Policy, org: str, mode: str = "live") -> RawUsage:
        """This month's credits and requests of ``org``, per (key, operation)."""
        ident = org if mode == "live" else _TEST_NS + org
        now = self._read_clock()
        with self._lock:
            now = self._hold(now)
            start, end = self._period_of(now)
            acct = self._accounts.get(ident)
            if acct is None or acct.period != start:
                acct = _Account(start)
            assigned = self._assigned.get(ident)
            org_plan = assigned.plan if assigned is not None else None
            plan_allowance = policy.allowance_of(org_plan)
            allowance = self._allowances.get(ident, plan_allowance) + acct.topup
            pairs = {
                (key, op): [pair >> _REQUEST_SHIFT, pair & _MICRO_MASK]
                for op, by_key in acct.pairs.items()
                for key, pair in by_key.items()
            }
            named = org_plan if org_plan is not None and org_plan in policy.plans else "default"
            return start, end, allowance, acct.used, acct.requests, pairs, named

    def set_allowance(self, org: str, mode: str, micro: int | None) -> None:
        """Set ``org``'s monthly allowance (None: back to the policy's)."""
        ident = org if mode == "live" else _TEST_NS + org
        now = self._read_clock() if self.ledger is not None else 0
        with self._lock:
            if self.ledger is not None:
                self._room()
                self._log(
                    self._hold(now), ALLOWANCE, org, mode, "", "", -1 if micro is None else micro
                )
            if micro is None:
                self._allowances.pop(ident, None)
            else:
                self._allowances[ident] = micro

    def set_plan(self, org: str, mode: str, plan: str | None, key: str | None = None) -> None:
        """Put ``org`` (or, with ``key``, one of its keys) on ``plan`` (None: take it
        off; the organization then has the policy's default plan, the key its
        organization's). The next check of the organization follows it."""
        if key is None:
            change = ("plan", "", "" if plan is None or plan == "default" else plan)
        else:
            change = ("key", key, plan or "")
        self._assign(org, mode, lambda a: _set_plan(a, plan, key), change)

    def set_limits(self, org: str, mode: str, deal: Deal) -> None:
        """Give ``org`` its negotiated deal (see :func:`meterkit.core.policy.deal_of`),
        replacing any before; ``()`` takes it away."""
        self._assign(
            org, mode, lambda a: setattr(a, "deal", tuple(deal)), ("deal", "", deal_text(deal))
        )

    def _assign(
        self,
        org: str,
        mode: str,
        change: Callable[[_Assignment], None],
        event: tuple[str, str, str],
    ) -> None:
        ident = org if mode == "live" else _TEST_NS + org
        now = self._read_clock() if self.ledger is not None else 0
        with self._lock:
            if self.ledger is not None:
                what, key, value = event
                self._room()
                self._log(
                    self._hold(now), PLAN, org, mode, key, "", 0, "", plan_detail(what, value)
                )
            a = self._assigned.get(ident)
            if a is None:
                a = _Assignment()
            else:
                # A new object: a check that found the old one keeps its functions.
                old, a = a, _Assignment()
                a.plan, a.deal, a.keys = old.plan, old.deal, dict(old.keys)
            change(a)
            if a.empty():
                self._assigned.pop(ident, None)
            else:
                self._assigned[ident] = a

    def assignment(
        self, org: str, mode: str, key: str | None = None
    ) -> tuple[str | None, str | None, Deal]:
        """``org``'s plan, ``key``'s plan (None when not given or not set) and deal."""
        ident = org if mode == "live" else _TEST_NS + org
        with self._lock:
            a = self._assigned.get(ident)
            if a is None:
                return None, None, ()
            return a.plan, a.keys.get(key) if key is not None else None, a.deal

    def top_up(self, org: str, mode: str, micro: int) -> None:
        """Add credits to ``org``'s current month only (no rollover)."""
        ident = org if mode == "live" else _TEST_NS + org
        now = self._read_clock()
        with self._lock:
            now = self._hold(now)
            start, _ = self._period_of(now)
            acct = self._accounts.get(ident)
            if acct is not None and acct.period == start and acct.topup + micro > MAX_MICRO:
                raise top_up_too_large()
            self._room()
            self._account(ident, start).topup += micro
            if self.ledger is not None:
                self._log(now, TOPUP, org, mode, "", "", micro)

    # -- the ledger ---------------------------------------------------------------------

    def _room(self) -> None:
        """Raise :class:`LedgerFullError` when the ledger's log is full (under the lock,
        before anything changes)."""
        log = self.ledger
        if log is not None and len(log.entries) >= log.capacity:
            raise ledger_full(log.capacity)

    def _log(
        self,
        now: int,
        kind: str,
        org: str,
        mode: str,
        key: str,
        operation: str,
        micro: int,
        charge: str = "",
        detail: str = "",
    ) -> None:
        """Append a money event other than a check's to the ledger's log (under the
        lock; see meterkit/ledger/events.py for the tuple)."""
        assert self.ledger is not None
        n = _CHARGES.__next__()
        self.ledger.entries.append((n, now, kind, org, mode, key, operation, micro, charge, detail))

    def ledger_snapshot(
        self, orgs: Iterable[tuple[str, str]] | None, store: LedgerStore
    ) -> tuple[Iterator[OrgSnapshot], int, int]:
        """Every organization's counters of this month and the ledger's undrained
        events, in one step (under the lock), for :func:`meterkit.ledger.reconcile`;
        ``orgs`` limits it to those (organization, mode) pairs."""
        from meterkit.ledger.reconcile import OrgSnapshot

        log = self.ledger
        if log is None:
            raise ConfigurationError(
                "this MemoryBackend keeps no ledger: make it with MemoryBackend(ledger=True)",
                "backend",
            )
        now = self._read_clock()
        counters: dict[tuple[str, str], tuple[dict[tuple[str, str], list[int]], int]] = {}
        with self._lock:
            start, end = self._period_of(self._hold(now))
            for ident, acct in self._accounts.items():
                if acct.period != start:
                    continue
                org, mode = (
                    (ident[len(_TEST_NS) :], "test")
                    if ident.startswith(_TEST_NS)
                    else (ident, "live")
                )
                pairs = {
                    (key, op): [pair >> _REQUEST_SHIFT, pair & _MICRO_MASK]
                    for op, by_key in acct.pairs.items()
                    for key, pair in by_key.items()
                }
                counters[(org, mode)] = (pairs, acct.topup)
            undrained = log.snapshot()
            # (every event so far is before this position; later ones are past it)
            upto = (log.source, (0, _CHARGES.__next__()))
        wanted = sorted(counters) if orgs is None else list(orgs)
        seen = set(wanted)
        for pair in store.orgs(start, end):
            if orgs is None and pair not in seen:
                wanted.append(pair)
                seen.add(pair)

        def snapshots() -> Iterator[OrgSnapshot]:
            for org, mode in wanted:
                pairs, topup = counters.get((org, mode), ({}, 0))
                mine = [e for e in undrained if e.org == org and e.mode == mode]
                yield OrgSnapshot(org, mode, start, end, pairs, topup, mine, upto)

        return snapshots(), start, end

    def close(self) -> None:
        """Nothing to release; here so every backend can be closed the same way."""
