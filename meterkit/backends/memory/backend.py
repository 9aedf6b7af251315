"""The in-memory backend: every algorithm in Python, one lock, bounded state.

This is the reference implementation of the four algorithms, the credits and
idempotency; the Lua script of the Redis backend is the only other place they are
written, and ``tests/test_conformance.py`` pins the two together. Three modules:
:mod:`~meterkit.backends.memory.source` writes the code (the algorithms' snippets and
the function of each operation), :mod:`~meterkit.backends.memory.state` holds what it
reads and changes (tier state, accounts, plan assignments), and this one binds the two
under one lock in :class:`MemoryBackend`.

Each algorithm is written once, as a snippet of Python source (``_ALGORITHMS`` in
``source.py``, each next to its promise). The first time the backend sees an operation it
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
the window turns, so eviction costs nothing per request. A sliding log is a
``bytearray`` of admission times per identity, 8 bytes each (times only grow, the
clock being held monotonic, so the log is sorted and trimmed by bisection; a time past
2**63 µs cannot reach it: ``month_bounds`` refuses years past 9999 before anything is
consumed). Nothing kept per identity is an object Python's garbage collector tracks
(strings, ints, bytearrays), so its full collections do not grow with the identities.

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
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, cast

from meterkit.backends.memory.source import (
    _CHARGES,
    _TEST_NS,
    _binder,
    apply_source,
    variant_source,
)
from meterkit.backends.memory.state import (
    _MICRO_MASK,
    _REQUEST_SHIFT,
    Apply,
    Variant,
    _Account,
    _Assignment,
    _new_state,
    _set_plan,
    _State,
    _state_id,
)
from meterkit.core.credits import MAX_MICRO, top_up_too_large
from meterkit.core.idempotency import Claim, Held, claim, keep
from meterkit.core.outcome import (
    Outcome,
    RawUsage,
)
from meterkit.core.plan import Plan, clock_us, month_bounds
from meterkit.errors import ConfigurationError
from meterkit.ledger.events import ALLOWANCE, PLAN, REFUND, TOPUP, deal_text, plan_detail
from meterkit.ledger.log import MemoryLog, ledger_full

if TYPE_CHECKING:
    from meterkit.core.policy import Deal, OperationPlan, Policy
    from meterkit.ledger.reconcile import OrgSnapshot
    from meterkit.ledger.store import LedgerStore

__all__ = ["MemoryBackend"]

Clock = Callable[[], float]
_US = 1_000_000
_IDEM_TTL_US = 24 * 3600 * _US
#: Functions of checks under plans kept for sharing between organizations (each
#: organization also keeps its own).
_VARIANTS_MAX = 4096


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
        # plan, made at its first apply (see appliers).
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

    @property
    def appliers(self) -> dict[OperationPlan, Apply] | None:
        """What :meth:`apply` calls, by operation plan, once made by its first call: a
        meter calls them directly, a frame less per check (each tests its plan's
        policy, as :meth:`apply` would). None when a subclass has its own ``apply``."""
        return self._applies if type(self).apply is MemoryBackend.apply else None

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
            requests = sum(n for n, _ in pairs.values())
            return start, end, allowance, acct.used, requests, pairs, named

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
