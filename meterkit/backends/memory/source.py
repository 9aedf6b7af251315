"""The memory backend's code: each algorithm written once as a snippet of Python source
(``_ALGORITHMS``, each next to its promise), and the function written, compiled and
bound for each operation (``_APPLY``) or each set of tiers under a plan (``_VARIANT``):
see :mod:`meterkit.backends.memory.backend` for why and what it costs."""

from __future__ import annotations

import itertools
import linecache
import textwrap
import time
from collections.abc import Callable
from string import Template
from typing import TYPE_CHECKING, cast

from meterkit.backends.memory.state import (
    _MASK,
    _ONE_REQUEST,
    _SWEEP_EVERY,
    Apply,
    _Account,
    _shards,
    older,
    packed,
    time_at,
)
from meterkit.core.outcome import (
    REASON_CREDITS,
    REASON_NONE,
    REASON_RATE,
    Outcome,
    replay,
    unspent,
)
from meterkit.core.plan import END_OF_TIME_US as _END_OF_TIME
from meterkit.core.plan import bad_clock
from meterkit.core.policy import enforces
from meterkit.ledger.log import ledger_full

if TYPE_CHECKING:
    from meterkit.core.policy import OperationPlan, Policy, Tier

# Charge ids of memory backends: a counter, unique in this process, whose state
# (and so whose refunds) is the process's own (Redis's carry a random prefix too).
_CHARGES = itertools.count(1)
# Ids cannot hold control characters, so this separator cannot be forged by a caller.
_TEST_NS = "\x1ftest\x1f"


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
    # timestamp per admitted request, ascending, packed 8 bytes each in a bytearray
    # per identity: a bytearray is not tracked by Python's garbage collector, so a
    # million logs add nothing to its full collections, where arrays would).
    "sliding_log": (
        """\
logs$i = s$i.shards[$sh]
log$i = logs$i.get($who)
if not log$i:
    t$i = ($L_1, $W, 0)
else:
    cutoff$i = now - $W
    first$i = _time_at(log$i)[0]
    if first$i <= cutoff$i:  # entries a window old no longer count
        if len(log$i) == 8 or _time_at(log$i, 8)[0] > cutoff$i:
            del log$i[:8]  # the usual case: only the oldest
        else:
            del log$i[:_older(log$i, cutoff$i)]
        first$i = _time_at(log$i)[0] if log$i else 0
    n$i = len(log$i) >> 3
    if n$i < $L:
        t$i = ($L_1 - n$i, first$i + $W - now if n$i else $W, 0)
    else:
        wait$i = _time_at(log$i, (n$i - $L) << 3)[0] + $W - now
        t$i = (0, wait$i, 1)
        $deny
""",
        """\
if log$i is None:
    logs$i[$who] = bytearray(_packed(now))
    s$i.debt += $FRESH
else:
    log$i += _packed(now)
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
        "_time_at": time_at,
        "_packed": packed,
        "_older": older,
        "_shards": _shards,
        "_ledger_full": ledger_full,
    }
    exec(compile(source, filename, "exec"), namespace)
    # Tracebacks and inspect read generated code from linecache, as with attrs.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    bind = _BINDERS[source] = cast("Callable[..., Apply]", namespace["bind"])
    return bind
