"""Meter and AsyncMeter: validate a request, build its plan, ask the backend, decide.

:class:`_MeterCore` validates and plans, and turns outcomes into decisions. Each
method that asks the backend is written once, on :class:`AsyncMeter`; :class:`Meter`'s
is made from it without the ``await`` (:func:`meterkit._twins.blocking`).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date
from time import perf_counter
from typing import TYPE_CHECKING, Any, Literal, overload

from meterkit._twins import blocking
from meterkit.core.credits import to_micro
from meterkit.core.decision import (
    Decision,
    PlanAssignment,
    Usage,
    _Issued,
    build_assignment,
    build_usage,
    issued,
)
from meterkit.core.outcome import Outcome
from meterkit.core.plan import Plan
from meterkit.core.policy import DEFAULT_PLAN, deal_of
from meterkit.errors import (
    AuthenticationError,
    BackendError,
    BackendUnavailable,
    InvalidIdentifierError,
    InvalidRequestError,
    MeterkitError,
    _deprecated,
    looks_like_secret,
)
from meterkit.observe.events import (
    ALLOWED,
    REPORTED_BY_METER,
    Event,
    Observer,
    Observers,
    alert_event,
    check_event,
    degraded_event,
    failure_event,
    refund_event,
)

if TYPE_CHECKING:
    from meterkit.core.backend import AsyncBackend, Backend
    from meterkit.core.policy import Policy
    from meterkit.ledger.history import UsageHistory
    from meterkit.ledger.store import LedgerStore

__all__ = ["AsyncMeter", "Meter"]

_MAX_ID = 256
_SHORT_ID = 19  # a plaintext key is longer (a key id is 16 characters)
_US = 1_000_000
_new = object.__new__
Mode = Literal["live", "test"]
#: One request of :meth:`Meter.check_many`: :meth:`Meter.check`'s arguments as a dict,
#: or a tuple ``(key, operation, org, idempotency_key, cost, mode)`` (the tail optional).
CheckRequest = Mapping[str, Any] | Sequence[Any]
_CHECK_ARGS = ("key", "operation", "org", "idempotency_key", "cost", "mode")
_CHECK_ARG_SET = frozenset(_CHECK_ARGS)
_TUPLE_DEFAULTS = ("", "", None, None, None, "live")  # a tuple request's missing tail


def _bad_id(value: object, what: str) -> InvalidIdentifierError:
    if not isinstance(value, str):
        return InvalidIdentifierError(f"{what} must be a str, not {type(value).__name__}")
    if not value:
        return InvalidIdentifierError(f"{what} must not be empty")
    if len(value) > _MAX_ID:
        return InvalidIdentifierError(f"{what} is longer than {_MAX_ID} characters")
    return InvalidIdentifierError(f"{what} holds control or non-printable characters")


def _secret_id(what: str) -> InvalidIdentifierError:
    return InvalidIdentifierError(
        f"this {what} looks like an API key's secret plaintext: pass the key's id "
        "(or the ApiKey from authenticate), never the plaintext"
    )


def check_mode(mode: object) -> None:
    """Raise unless ``mode`` is ``"live"`` or ``"test"``."""
    if mode != "live" and mode != "test":
        raise InvalidRequestError(f"mode is 'live' or 'test', not {mode!r}")


def check_id(value: object, what: str) -> str:
    """Return ``value`` if it is a usable id (1–256 printable characters), else raise."""
    if type(value) is str and 0 < len(value) <= _MAX_ID and value.isprintable():
        if looks_like_secret(value):
            raise _secret_id(what)
        return value
    raise _bad_id(value, what)


def _ids(key: object, org: object) -> None:
    """Raise unless ``key`` and ``org`` are usable ids (:func:`check_id`'s rules, in
    this order: both well-formed, then neither a secret's plaintext)."""
    if not (type(key) is str and 0 < len(key) <= _MAX_ID and key.isprintable()):
        raise _bad_id(key, "key")
    if not (type(org) is str and 0 < len(org) <= _MAX_ID and org.isprintable()):
        raise _bad_id(org, "org")
    # A plaintext key is never an id (it would reach Redis key names); ids as short
    # as a key id pay nothing for this.
    if (len(key) > _SHORT_ID and looks_like_secret(key)) or (
        len(org) > _SHORT_ID and looks_like_secret(org)
    ):
        raise _secret_id("key" if looks_like_secret(key) else "org")


class _MeterCore:
    """What Meter and AsyncMeter share: planning, validation, deciding."""

    #: The backend as the twin methods call it (AsyncMeter: with awaitable methods).
    _backend: Any
    _apply: Any
    #: A ledger query (AsyncMeter: awaitable, in a worker thread).
    _read_history: Any
    #: check, reporting to the observers (see AsyncMeter._check_observed).
    _check_observed: Any

    def __init__(
        self,
        policy: Policy,
        backend: Any,
        *,
        fail_open: bool = False,
        ledger: Any = None,
        on_decision: Observer | Iterable[Observer] | None = None,
    ) -> None:
        self.policy = policy
        self.backend = backend
        self.fail_open = fail_open
        #: The ledger store that :meth:`Meter.usage` reads past periods from (or None).
        self.ledger: LedgerStore | None = None
        self._owns_ledger = isinstance(ledger, str)
        self._plan_for = policy.plan_for
        # A memory backend's function of each operation, called without apply's frame
        # (nor, for AsyncMeter, a coroutine: it never blocks). None for other backends.
        appliers = getattr(backend, "appliers", None)
        self._appliers: dict[Any, Any] | None = appliers if type(appliers) is dict else None
        self._ops = policy._plans
        self._watch_shadow = policy.shadow or any(t.shadow for t in policy.tiers)
        # An admission may bring more than its check's event: shadow denials, alerts.
        self._noticing = self._watch_shadow or bool(policy.credits.alert_percents)
        #: Denials that shadow mode let through, per tier name (and "credits").
        self.shadow_denials: Counter[str] = Counter()
        #: Checks admitted without the backend because it was unavailable (fail-open).
        self.degraded = 0
        #: The observers, as given (see :mod:`meterkit.observe`).
        self.on_decision = on_decision
        #: What the meter (and an HTTP gate over it) calls with each event; None
        #: when nothing observes it.
        self._notify: Callable[[Event], None] | None = None
        if on_decision is not None:
            observers = Observers(on_decision)
            self._notify = observers.notify
            self._observe = observers.observe
            self._observe_failed = observers.failed
            # Chosen once, here: a meter without observers runs the class's check
            # untouched, and pays nothing for them.
            self.__dict__["check"] = self._check_observed
        # Last, so that no refusal above leaves a store opened from a URL behind.
        if ledger is not None:
            from meterkit.ledger.store import store_from_url

            self.ledger = store_from_url(ledger) if isinstance(ledger, str) else ledger

    def __repr__(self) -> str:
        return f"{type(self).__name__}(policy={self.policy.name!r}, backend={self.backend!r})"

    def _plan(
        self,
        key: Any,
        org: str | None,
        operation: str,
        idempotency_key: str | None,
        cost: object,
        mode: str,
    ) -> Plan:
        if type(key) is not str and hasattr(key, "org") and hasattr(key, "id"):
            # An authenticated ApiKey: its id meters, its org and mode scope.
            if org is not None and org != key.org:
                raise AuthenticationError("organization_not_found")
            key_plan = getattr(key, "plan", None)
            key, org, mode = key.id, key.org, getattr(key, "mode", "live")
            if key_plan is not None:
                # The key store's plan for the key wins over the backend's (a name this
                # policy does not know is the default plan, as everywhere).
                plan = self._plan(key, org, operation, idempotency_key, cost, mode)
                if key_plan not in self.policy.plans:
                    key_plan = DEFAULT_PLAN
                plan.op = self.policy.keyed(plan.op, key_plan)
                return plan
        # The usual ids, tested once each: no longer than a key id (so no secret's
        # plaintext, see _ids), printable. Any other goes through _ids, which says why not.
        if not (
            type(key) is str
            and 0 < len(key) <= _SHORT_ID
            and key.isprintable()
            and type(org) is str
            and 0 < len(org) <= _SHORT_ID
            and org.isprintable()
        ):
            _ids(key, org)
        if mode != "live" and mode != "test":
            raise InvalidRequestError(f"mode is 'live' or 'test', not {mode!r}")
        # (Policy.plan_for's dict, read here: a call less on every check)
        try:
            op = self._ops[operation]
        except (KeyError, TypeError):
            op = self._plan_for(operation)  # raises UnknownOperationError
        price = op.price if cost is None else to_micro(cost, "cost")
        if idempotency_key is not None:
            check_id(idempotency_key, "idempotency_key")
        # Made without Plan.__init__ (its frame is 2.5% of a check), slot by slot.
        plan = _new(Plan)
        plan.policy = self.policy
        plan.op = op
        plan.key = key
        plan.org = org  # type: ignore[assignment]
        plan.mode = mode  # type: ignore[assignment]
        plan.cost = price
        plan.idem = idempotency_key
        return plan

    def _decide(self, plan: Plan, outcome: Outcome) -> Decision:
        decision = issued(plan, outcome)
        # Only shadow tiers can say no to an admitted request.
        if self._watch_shadow and outcome.allowed:
            self._count_shadow(decision)
        return decision

    def _count_shadow(self, decision: Decision) -> None:
        names = decision.would_deny
        if names:
            self.shadow_denials.update(names)

    def _degraded(self, plan: Plan) -> Decision:
        self.degraded += 1
        now = round(time.time() * _US)
        tiers = tuple((t.capacity, 0, 0) for t in plan.op.tiers)
        return issued(plan, Outcome(True, 0, now, 0, tiers, 0, 0, 0, "", False), degraded=True)

    def _report(self, decision: Decision, latency: float) -> None:
        """Tell the observers of a check the backend answered, and of the credit alerts
        it reached first."""
        notify = self._notify
        assert notify is not None
        notify(check_event(decision, latency, self._watch_shadow))
        for threshold in decision.alerts:
            notify(alert_event(decision, threshold))

    def _failed(self, plan: Plan, exc: MeterkitError, latency: float) -> Decision | None:
        """Report a check of ``plan`` that failed with ``exc`` (one of
        :data:`REPORTED_BY_METER`) to the observers: the degraded admission that takes
        its place (fail-open), or None when ``exc`` stands."""
        notify = self._notify
        assert notify is not None
        if self.fail_open and isinstance(exc, BackendUnavailable):
            decision = self._degraded(plan)
            notify(degraded_event(decision, exc, latency))
            return decision
        notify(failure_event(plan, exc, latency))
        return None

    def _plans(self, requests: Iterable[CheckRequest]) -> list[Plan]:
        """Plan every request of a batch, so that bad input raises before any is applied."""
        if isinstance(requests, (str, bytes, Mapping)) or not isinstance(requests, Iterable):
            raise InvalidRequestError(
                "requests is a list of dicts of check() arguments or of tuples, "
                f"not {type(requests).__name__}"
            )
        plans = []
        plan = self._plan
        for i, request in enumerate(requests):
            # The usual shapes first (a dict of known arguments, a tuple of 2 to 6): the
            # batch is planned before Redis sees any of it, so this is Redis idle time.
            if (
                isinstance(request, dict)
                and request.keys() <= _CHECK_ARG_SET
                and ("key" in request and "operation" in request)
            ):
                get = request.get
                plans.append(
                    plan(
                        request["key"],
                        get("org"),
                        request["operation"],
                        get("idempotency_key"),
                        get("cost"),
                        get("mode", "live"),
                    )
                )
                continue
            if isinstance(request, tuple) and 2 <= len(request) <= 6:
                key, operation, org, idem, cost, mode = request + _TUPLE_DEFAULTS[len(request) :]
                plans.append(plan(key, org, operation, idem, cost, mode))
                continue
            plans.append(self._plan_request(i, request))
        return plans

    def _plan_request(self, i: int, request: CheckRequest) -> Plan:
        """One request of a batch in any accepted shape, or the error that says why not."""
        if isinstance(request, Mapping):
            args = dict(request)
        elif isinstance(request, (tuple, list)) and len(request) <= len(_CHECK_ARGS):
            args = dict(zip(_CHECK_ARGS, request, strict=False))
        else:
            raise InvalidRequestError(
                f"requests[{i}] is a dict of check() arguments or a tuple "
                "(key, operation, org, idempotency_key, cost, mode)"
            )
        unknown = sorted(set(args) - set(_CHECK_ARGS))
        if unknown or "key" not in args or "operation" not in args:
            raise InvalidRequestError(
                f"requests[{i}] needs key and operation"
                + (f", and takes no {', '.join(map(repr, unknown))}" if unknown else "")
            )
        return self._plan(
            args["key"],
            args.get("org"),
            args["operation"],
            args.get("idempotency_key"),
            args.get("cost"),
            args.get("mode", "live"),
        )

    def _decide_many(
        self, plans: list[Plan], results: Sequence[Any], return_exceptions: bool, latency: float
    ) -> list[Any]:
        """The batch's decisions (reported to the observers, if any, with the batch's
        ``latency``), raising the first error unless ``return_exceptions``."""
        decisions: list[Any] = []
        first: MeterkitError | None = None
        notify = self._notify
        for plan, result in zip(plans, results, strict=True):
            if not isinstance(result, MeterkitError):
                decision = self._decide(plan, result)
                decisions.append(decision)
                if notify is not None:
                    self._report(decision, latency)
                continue
            instead: Decision | None = None
            if notify is not None and isinstance(result, REPORTED_BY_METER):
                instead = self._failed(plan, result, latency)
            elif self.fail_open and isinstance(result, BackendUnavailable):
                instead = self._degraded(plan)
            if instead is not None:
                decisions.append(instead)
            else:
                first = first or result
                decisions.append(result)
        if first is not None and not return_exceptions:
            raise first
        return decisions

    @staticmethod
    def _refundable(decision: object) -> Decision:
        if not isinstance(decision, Decision):
            raise InvalidRequestError(
                f"refund takes a Decision from check(), not {type(decision).__name__}"
            )
        if type(decision) is not _Issued:
            # Its outcome (charge id, amount) is whatever its maker wrote.
            raise InvalidRequestError("refund takes a Decision from check(), not one built by hand")
        return decision

    def _able(self, method: str) -> Any:
        """The backend's optional ``method`` (``peek``, ``reset_limits``), or a clear
        error for a backend without it."""
        if getattr(self.backend, method, None) is None:
            what = method.replace("_", " ")
            raise InvalidRequestError(f"{type(self.backend).__name__} cannot {what}")
        return getattr(self._backend, method)

    def _history_args(
        self, period: object, since: object, until: object
    ) -> tuple[LedgerStore, date, date]:
        """The ledger and the [since, until) dates of a usage history request."""
        from meterkit.ledger.history import period_bounds

        bounds = period_bounds(period, since, until)
        if self.ledger is None:
            raise InvalidRequestError(
                "usage of a past period is read from a ledger: make the meter with "
                "ledger=<store or URL> (see docs/ledger.md)"
            )
        return self.ledger, *bounds

    def _usage_args(self, org: str, key: str | None, mode: str) -> None:
        check_id(org, "org")
        if key is not None:
            check_id(key, "key")
        if mode not in ("live", "test"):
            raise InvalidRequestError(f"mode is 'live' or 'test', not {mode!r}")


def _history(*args: Any) -> UsageHistory:
    """A ledger query (the ledger's modules are loaded once a meter has a ledger)."""
    from meterkit.ledger.history import history

    return history(*args)


async def _history_in_thread(*args: Any) -> UsageHistory:
    """A ledger query, in a worker thread: SQL drivers block."""
    return await asyncio.to_thread(_history, *args)


class AsyncMeter(_MeterCore):
    """:class:`Meter` for asyncio: the same methods, awaitable.

    Works with an asynchronous backend (``AsyncRedisBackend``) and with
    ``MemoryBackend``, whose calls never block. (Each method is written here once;
    :class:`Meter`'s is made from it.)
    """

    def __init__(
        self,
        policy: Policy,
        backend: AsyncBackend | Backend,
        *,
        fail_open: bool = False,
        ledger: LedgerStore | str | None = None,
        on_decision: Observer | Iterable[Observer] | None = None,
    ) -> None:
        super().__init__(
            policy, backend, fail_open=fail_open, ledger=ledger, on_decision=on_decision
        )
        self._read_history = _history_in_thread
        if not inspect.iscoroutinefunction(getattr(backend, "apply", None)):
            backend = _Awaiting(backend)
        self._backend = backend
        self._apply = backend.apply

    async def check(
        self,
        key: Any,
        *,
        operation: str,
        org: str | None = None,
        idempotency_key: str | None = None,
        cost: object = None,
        mode: Mode = "live",
    ) -> Decision:
        """Admit and charge one request, or consume nothing and say why not.

        ``key`` is a key id or an authenticated ``ApiKey`` (whose org and mode are
        then used). ``cost`` overrides the table price (for operations priced by size).
        """
        # _plan's usual request written out, a frame less (1.1% of a check): a key id
        # and an org no longer than a key id, printable, in either mode; a known
        # operation at its price; no idempotency key. Anything else (an ApiKey first)
        # goes to _plan, which tests the same.
        op = self._ops.get(operation) if type(key) is str and type(operation) is str else None
        if (
            op is not None
            and cost is None
            and idempotency_key is None
            and (mode == "live" or mode == "test")
            and 0 < len(key) <= _SHORT_ID
            and key.isprintable()
            and type(org) is str
            and 0 < len(org) <= _SHORT_ID
            and org.isprintable()
        ):
            plan = _new(Plan)
            plan.policy = self.policy
            plan.op = op
            plan.key = key
            plan.org = org
            plan.mode = mode
            plan.cost = op.price
            plan.idem = None
        else:
            plan = self._plan(key, org, operation, idempotency_key, cost, mode)
        appliers = self._appliers
        fn = appliers.get(plan.op) if appliers is not None else None
        try:
            outcome = fn(plan) if fn is not None else await self._apply(plan)
        except BackendUnavailable:
            if self.fail_open:
                return self._degraded(plan)
            raise
        # _decide and issued written out: two frames less, 3% of a check.
        decision: Decision = _Issued()
        decision._plan = plan
        decision._out = outcome
        decision.allowed = allowed = outcome.allowed
        decision.degraded = False
        if self._watch_shadow and allowed:
            self._count_shadow(decision)
        return decision

    async def _check_observed(
        self,
        key: Any,
        *,
        operation: str,
        org: str | None = None,
        idempotency_key: str | None = None,
        cost: object = None,
        mode: Mode = "live",
    ) -> Decision:
        """:meth:`check`, reported to the observers: this meter's ``check`` when it was
        made with ``on_decision``. The decision is reported once made, after the
        backend has let go of its lock, with the time the backend took."""
        plan = self._plan(key, org, operation, idempotency_key, cost, mode)
        start = perf_counter()
        try:
            outcome = await self._apply(plan)
        except REPORTED_BY_METER as exc:
            degraded = self._failed(plan, exc, perf_counter() - start)
            if degraded is None:
                raise
            return degraded
        latency = perf_counter() - start
        decision = self._decide(plan, outcome)
        if not outcome.allowed or self._noticing:
            self._report(decision, latency)
        else:
            # (check_event's common case, written out: a call less on every check)
            event = Event(
                ALLOWED,
                plan.op.name,
                plan.org,
                plan.key,
                plan.mode,
                None,
                None,
                200,
                latency,
                False,
                (),
                outcome.replayed,
                decision,
            )
            try:
                self._observe(event)
            except Exception:
                self._observe_failed(event)
        return decision

    async def peek(
        self,
        key: Any,
        *,
        operation: str,
        org: str | None = None,
        cost: object = None,
        mode: Mode = "live",
    ) -> Decision:
        """The decision :meth:`check` would give this request now, consuming nothing.

        Every tier and the credits are looked at as a check would, and the answer is
        the same (allowed or not, why, ``retry_after``, each tier's remaining as if
        admitted, the charge and the balance after it), but no tier, credit, usage or
        idempotency record changes, and an admitted peek carries no charge id (there
        is nothing to refund). Another request may change the answer before a check.
        An unavailable backend raises :class:`BackendUnavailable`, ``fail_open`` or
        not: a peek has no answer to make up.
        """
        plan = self._plan(key, org, operation, None, cost, mode)
        peek = self._able("peek")
        return issued(plan, await peek(plan))

    async def reset_limits(self, org: str, key: str | None = None, mode: Mode = "live") -> None:
        """Forget the rate-limit state of ``key`` in ``org`` (its key-scoped tiers), or
        without a key, of ``org`` itself (its organization-scoped tiers): for support,
        after a runaway client is fixed. Credits and usage stay as they are."""
        self._usage_args(org, key, mode)
        reset_limits = self._able("reset_limits")
        await reset_limits(self.policy, org, mode, key)

    @overload
    async def check_many(
        self, requests: Iterable[CheckRequest], *, return_exceptions: Literal[False] = False
    ) -> list[Decision]: ...

    @overload
    async def check_many(
        self, requests: Iterable[CheckRequest], *, return_exceptions: bool
    ) -> list[Decision | MeterkitError]: ...

    async def check_many(
        self, requests: Iterable[CheckRequest], *, return_exceptions: bool = False
    ) -> list[Any]:
        """Check many requests in one round trip; each is still atomic on its own.

        ``requests`` holds dicts of :meth:`check`'s arguments, or tuples ``(key,
        operation, org, idempotency_key, cost, mode)`` whose tail may be left off.
        Every request is validated first: bad input raises before any is applied.
        The answer is one :class:`Decision` per request, in order. An error of one
        request alone (an idempotency conflict) is raised once all the others were
        applied — or, with ``return_exceptions=True``, takes that request's place.
        """
        plans = self._plans(requests)
        start = perf_counter()
        try:
            if getattr(self.backend, "apply_many", None) is not None:
                results = await self._able("apply_many")(plans)
            else:
                results = [await self._apply_or_error(plan) for plan in plans]
        except BackendError as exc:
            if self._notify is None:
                if self.fail_open and isinstance(exc, BackendUnavailable):
                    return [self._degraded(plan) for plan in plans]
                raise
            # Every request of the batch failed alike: each is reported.
            latency = perf_counter() - start
            degraded = [self._failed(plan, exc, latency) for plan in plans]
            if not plans or degraded[0] is None:
                raise
            return degraded
        return self._decide_many(plans, results, return_exceptions, perf_counter() - start)

    async def _apply_or_error(self, plan: Plan) -> Outcome | MeterkitError:
        try:
            outcome: Outcome = await self._apply(plan)
        except MeterkitError as exc:
            return exc
        return outcome

    async def refund(self, decision: Decision) -> bool:
        """Return an admitted decision's credits, once. True if this call refunded them."""
        decision = self._refundable(decision)
        if decision.degraded:
            return False
        notify = self._notify
        if notify is None:
            return bool(await self._backend.refund(decision.request, decision.outcome))
        start = perf_counter()
        try:
            refunded = bool(await self._backend.refund(decision.request, decision.outcome))
        except BackendError as exc:
            notify(failure_event(decision.request, exc, perf_counter() - start))
            raise
        if refunded:
            notify(refund_event(decision, perf_counter() - start))
        return refunded

    @overload
    async def usage(self, org: str, key: str | None = None, mode: Mode = "live") -> Usage: ...

    @overload
    async def usage(
        self,
        org: str,
        key: str | None = None,
        mode: Mode = "live",
        *,
        period: str | None = None,
        since: date | str | None = None,
        until: date | str | None = None,
    ) -> UsageHistory: ...

    async def usage(
        self,
        org: str,
        key: str | None = None,
        mode: Mode = "live",
        *,
        period: str | None = None,
        since: date | str | None = None,
        until: date | str | None = None,
    ) -> Usage | UsageHistory:
        """This period's requests and credits for ``org`` (or one ``key`` of it), from
        the backend's counters, in real time.

        With ``period`` (a month ``"2026-11"`` or a day ``"2026-11-05"``) or ``since``
        and ``until`` (dates, ``until`` excluded): that period's usage per operation,
        key, day and month from the meter's ledger store (``ledger=``), as a
        :class:`~meterkit.ledger.UsageHistory`: any past period, long after the
        backend's counters of it ended.
        """
        self._usage_args(org, key, mode)
        if period is not None or since is not None or until is not None:
            store, first, end = self._history_args(period, since, until)
            found: UsageHistory = await self._read_history(store, org, key, mode, first, end)
            return found
        return build_usage(org, key, await self._backend.usage(self.policy, org, mode))

    async def set_allowance(self, org: str, credits: object, mode: Mode = "live") -> None:
        """Give ``org`` its own monthly allowance (``None``: the policy's again)."""
        check_id(org, "org")
        check_mode(mode)
        micro = None if credits is None else to_micro(credits, "allowance")
        await self._backend.set_allowance(org, mode, micro)

    async def top_up(self, org: str, credits: object, mode: Mode = "live") -> None:
        """Add credits to ``org``'s current month; they expire with it."""
        check_id(org, "org")
        check_mode(mode)
        await self._backend.top_up(org, mode, to_micro(credits, "top-up"))

    async def set_plan(
        self, org: str, plan: str | None, *, key: str | None = None, mode: Mode = "live"
    ) -> None:
        """Put ``org`` on ``plan`` (one of the policy's plans, or ``"default"``), or with
        ``key``, only that key of it (a key's plan wins over its organization's for
        the key-scoped tiers). ``None`` takes the plan away. The next check follows
        it; the counts of the current windows are kept (see docs/plans.md). An unknown
        plan raises :class:`UnknownPlanError` and changes nothing."""
        self._usage_args(org, key, mode)
        if plan is not None:
            self.policy.check_plan(plan)
        set_plan = self._able("set_plan")
        await set_plan(org, mode, plan, key)

    async def set_limits(
        self, org: str, limits: Mapping[str, Any] | None, *, mode: Mode = "live"
    ) -> None:
        """Give ``org`` its negotiated limits, over whatever plan it is on: tier names to
        rates (``{"org-hour": "50000/hour"}``), tables ``{"rate": ..., "burst": ...}``
        or ``"off"``. They replace the organization's limits before; ``None`` (or
        ``{}``) takes them away. A tier the policy does not have, a malformed rate or
        another window raises :class:`InvalidRequestError` and changes nothing."""
        self._usage_args(org, None, mode)
        deal = () if limits is None else deal_of(self.policy, limits)
        set_limits = self._able("set_limits")
        await set_limits(org, mode, deal)

    async def plan_of(
        self, org: str, key: str | None = None, mode: Mode = "live"
    ) -> PlanAssignment:
        """The plans ``org`` (and its ``key``) are on, its negotiated limits, and the
        tiers and allowance they give."""
        self._usage_args(org, key, mode)
        assignment = self._able("assignment")
        return build_assignment(self.policy, org, key, await assignment(org, mode, key))

    async def aclose(self) -> None:
        """Close the backend (``aclose()`` of an asyncio backend, ``close()`` of a
        blocking one), and the ledger store if the meter opened it from a URL."""
        if self._owns_ledger and self.ledger is not None:
            self.ledger.close()
        await self._backend.aclose()

    async def close(self) -> None:
        """Deprecated: :meth:`aclose` (asyncio objects close with ``aclose``)."""
        _deprecated("AsyncMeter.close()", "AsyncMeter.aclose()")
        await self.aclose()

    async def __aenter__(self) -> AsyncMeter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Meter(_MeterCore):
    """Authenticate-then-meter in one call: rate tiers and credits, atomically.

    ``fail_open=True`` admits requests (flagged ``degraded`` and counted in
    ``degraded``) while the backend is unavailable, instead of raising
    :class:`BackendUnavailable`. Whether a degraded request was applied is unknown
    (one that timed out may have run): ``usage()`` says what the backend counted.

    ``on_decision`` takes observers: a callable of a :class:`meterkit.observe.Event`,
    or a list of them (a ``PrometheusObserver``, an ``OTelObserver``, a
    ``LogObserver``…). Each decision, degraded admission, refund, backend error and
    credit alert reaches them after the decision, outside any lock; what one raises is
    logged and changes nothing. Without observers, ``check`` pays nothing for them.
    """

    def __init__(
        self,
        policy: Policy,
        backend: Backend,
        *,
        fail_open: bool = False,
        ledger: LedgerStore | str | None = None,
        on_decision: Observer | Iterable[Observer] | None = None,
    ) -> None:
        if inspect.iscoroutinefunction(getattr(backend, "apply", None)):
            raise InvalidRequestError("this backend is asynchronous: use meterkit.AsyncMeter")
        super().__init__(
            policy, backend, fail_open=fail_open, ledger=ledger, on_decision=on_decision
        )
        self._backend = backend
        self._apply = backend.apply
        self._read_history = _history

    check = blocking(AsyncMeter.check)
    _check_observed = blocking(AsyncMeter._check_observed)
    peek = blocking(AsyncMeter.peek)
    reset_limits = blocking(AsyncMeter.reset_limits)
    check_many = blocking(AsyncMeter.check_many)
    _apply_or_error = blocking(AsyncMeter._apply_or_error)
    refund = blocking(AsyncMeter.refund)
    if TYPE_CHECKING:  # (a twin keeps one signature: usage's two are spelt out here)

        @overload
        def usage(self, org: str, key: str | None = None, mode: Mode = "live") -> Usage: ...

        @overload
        def usage(
            self,
            org: str,
            key: str | None = None,
            mode: Mode = "live",
            *,
            period: str | None = None,
            since: date | str | None = None,
            until: date | str | None = None,
        ) -> UsageHistory: ...

        def usage(self, *args: Any, **kwargs: Any) -> Usage | UsageHistory: ...

    else:
        usage = blocking(AsyncMeter.usage)
    set_allowance = blocking(AsyncMeter.set_allowance)
    top_up = blocking(AsyncMeter.top_up)
    set_plan = blocking(AsyncMeter.set_plan)
    set_limits = blocking(AsyncMeter.set_limits)
    plan_of = blocking(AsyncMeter.plan_of)
    close = blocking(AsyncMeter.aclose)

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Awaiting:
    """A blocking backend seen through ``async`` methods: for :class:`AsyncMeter` over
    ``MemoryBackend``, whose calls never block. ``aclose`` is its ``close``."""

    def __init__(self, backend: object) -> None:
        self._wrapped = backend

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._wrapped, "close" if name == "aclose" else name)

        async def call(*args: Any) -> Any:
            return method(*args)

        setattr(self, name, call)  # made once per method
        return call
