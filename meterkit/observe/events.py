"""What leaves a meter: one :class:`Event` per decision, refusal, degraded admission,
refund, backend error and credit alert, handed to the observers given as
``on_decision``.

An event is a frozen record of plain values (strings, numbers, flags) and, for a check,
the :class:`~meterkit.Decision` itself. Every field holds public ids only: a key's id,
never its plaintext. The meter already refuses plaintexts as ids; the HTTP gate drops
any value it read from a request that is not a usable id or looks like a secret
(:func:`safe_id`), so an event can go to logs, metric labels and span attributes as
it is.

Observers are called through :class:`Observers`, after the decision, outside any
lock, in the thread (or task) that made the decision. One that raises is logged
(:data:`logger`, at most one line with its traceback per observer a minute) and
changes nothing: the caller gets the decision it would have had without observers.
One that blocks holds up its caller, so anything slow (a network call) belongs
behind :class:`~meterkit.observe.Background`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from meterkit.errors import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    IdempotencyConflictError,
    StateError,
    looks_like_secret,
)

if TYPE_CHECKING:
    from meterkit.core.decision import Decision
    from meterkit.core.plan import Plan

__all__ = [
    "ALERT",
    "ALLOWED",
    "DECIDED",
    "DENIED",
    "ERROR",
    "LATENCY_BUCKETS",
    "OUTCOMES",
    "REFUNDED",
    "REFUSED",
    "REPORTED_BY_METER",
    "Event",
    "Observer",
    "Observers",
    "alert_event",
    "check_event",
    "degraded_event",
    "error_kind",
    "failure_event",
    "refund_event",
    "refusal_event",
    "safe_id",
]

logger = logging.getLogger("meterkit")

#: A check admitted (``degraded`` when the backend was not asked).
ALLOWED = "allowed"
#: A check the backend refused: a rate tier (429) or the credits (402).
DENIED = "denied"
#: A request refused before or instead of a check: a bad key (401, 403), no such route
#: (404, 405), a malformed request (400), an idempotency key reused (422).
REFUSED = "refused"
#: The backend failed (the caller got :class:`~meterkit.BackendError`, or a 503).
ERROR = "error"
#: An admitted request's credits were given back.
REFUNDED = "refunded"
#: An organization's credit usage crossed one of the policy's alert thresholds.
ALERT = "alert"
#: Every ``Event.outcome``.
OUTCOMES = (ALLOWED, DENIED, REFUSED, ERROR, REFUNDED, ALERT)
#: The outcomes of a request's decision (refunds and alerts come after one).
DECIDED = (ALLOWED, DENIED, REFUSED, ERROR)

#: The buckets of latency histograms, in seconds: from 10 µs (a check in memory) to 1 s
#: (Redis's default timeout), so that both backends' checks fall inside them.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)

#: Errors of a check that the meter reports itself (the HTTP gate reports the others).
REPORTED_BY_METER = (BackendError, IdempotencyConflictError)

_MAX_ID = 256


class Event(msgspec.Struct, frozen=True, gc=False):
    """One thing that happened to a request, as observers see it.

    ``outcome`` is one of :data:`OUTCOMES`; ``reason`` says why, in the words of the
    error bodies: ``rate_limited`` or ``insufficient_credits`` for a denial, the
    refusal's code (``invalid_api_key``, ``not_found``, ``idempotency_key_reused``, …),
    the failure's kind (``backend_unavailable``, ``backend_error``, ``state_error``;
    also on an admission ``degraded`` by one), or an alert's threshold (``"80%"``).
    ``tier`` is the tier that denied (the first, in policy order; ``"credits"`` for
    the credits), ``status`` the HTTP status it answers to, ``latency`` the seconds
    the backend took (None when it was not asked). ``shadow`` names the tiers (and
    ``"credits"``) that would have denied in shadow mode; ``replayed`` marks an
    idempotent retry answered with the first decision. ``decision`` is the check's
    :class:`~meterkit.Decision` (None for refusals and errors), for anything more.

    Events are immutable, and made fast: one is made per check.
    """

    outcome: str
    operation: str | None
    org: str | None
    key: str | None
    mode: str | None
    reason: str | None
    tier: str | None
    status: int
    latency: float | None
    degraded: bool = False
    shadow: tuple[str, ...] = ()
    replayed: bool = False
    decision: Decision | None = None

    def to_dict(self) -> dict[str, Any]:
        """The event's fields as a JSON-ready dict, without ``decision`` (a check's
        charge and balance come as strings of credits)."""
        fields = msgspec.structs.asdict(self)
        decision = fields.pop("decision")
        fields["shadow"] = list(self.shadow)
        if decision is not None:
            fields["charged"] = str(decision.charged)
            fields["balance"] = str(decision.balance)
        return fields


#: What an observer is: a callable of an :class:`Event` (its result is ignored).
Observer = Callable[[Event], object]


def safe_id(value: object) -> str | None:
    """``value`` if it is a usable, public id (1–256 printable characters, nothing shaped
    like a key's plaintext), else None: for values read from a request."""
    if (
        type(value) is str
        and 0 < len(value) <= _MAX_ID
        and value.isprintable()
        and not looks_like_secret(value)
    ):
        return value
    return None


def check_event(decision: Decision, latency: float, shadow: bool) -> Event:
    """The event of a check the backend answered in ``latency`` seconds; ``shadow``: the
    meter's policy has shadow tiers (so ``would_deny`` is worth reading)."""
    plan = decision._plan
    if decision.allowed:
        return Event(
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
            decision.would_deny if shadow else (),
            decision._out.replayed,
            decision,
        )
    status = decision.status
    if status == 402:
        tier: str | None = "credits"
    else:
        tier = next((t.name for t in decision.tiers if t.denied and not t.shadow), None)
    return Event(
        DENIED,
        plan.op.name,
        plan.org,
        plan.key,
        plan.mode,
        decision.reason,
        tier,
        status,
        latency,
        False,
        (),
        decision._out.replayed,
        decision,
    )


def error_kind(exc: BaseException) -> str:
    """The ``reason`` of an event for a backend failure: ``backend_unavailable``,
    ``state_error`` or ``backend_error``."""
    if isinstance(exc, BackendUnavailable):
        return "backend_unavailable"
    if isinstance(exc, StateError):
        return "state_error"
    return "backend_error"


def degraded_event(decision: Decision, exc: BaseException, latency: float) -> Event:
    """The event of an admission made without the backend, which failed with ``exc``."""
    plan = decision._plan
    return Event(
        ALLOWED,
        plan.op.name,
        plan.org,
        plan.key,
        plan.mode,
        error_kind(exc),
        None,
        200,
        latency,
        degraded=True,
        decision=decision,
    )


def failure_event(plan: Plan, exc: BaseException, latency: float | None) -> Event:
    """The event of a check (or refund) of ``plan`` that failed with ``exc``: a backend
    error, or an idempotency key first used for another request."""
    if isinstance(exc, IdempotencyConflictError):
        outcome, reason, status = REFUSED, "idempotency_key_reused", 422
    else:
        outcome, reason, status = ERROR, error_kind(exc), 503
    return Event(
        outcome, plan.op.name, plan.org, plan.key, plan.mode, reason, None, status, latency
    )


def refund_event(decision: Decision, latency: float) -> Event:
    """The event of an admitted decision whose credits were given back."""
    plan = decision._plan
    return Event(
        REFUNDED,
        plan.op.name,
        plan.org,
        plan.key,
        plan.mode,
        None,
        None,
        200,
        latency,
        replayed=decision.replayed,
        decision=decision,
    )


def refusal_event(
    reason: str,
    status: int,
    *,
    operation: str | None = None,
    org: object = None,
    key: object = None,
    mode: object = None,
) -> Event:
    """The event of a request refused before a check (by the HTTP gate). ``org`` and
    ``key`` may come from the request: any that is not a safe id is left out."""
    return Event(
        REFUSED,
        operation,
        safe_id(org),
        safe_id(key),
        mode if mode == "live" or mode == "test" else None,
        reason,
        None,
        status,
        None,
    )


def alert_event(decision: Decision, threshold: str) -> Event:
    """The event of the check whose charge took its organization's credit usage past
    ``threshold`` (``"80%"``) of its allowance, in this period."""
    plan = decision._plan
    return Event(
        ALERT,
        plan.op.name,
        plan.org,
        plan.key,
        plan.mode,
        threshold,
        None,
        200,
        None,
        decision=decision,
    )


# -- calling observers -------------------------------------------------------------------

#: At most one logged failure (with its traceback) per observer per this many seconds.
_FAILURE_LOG_EVERY = 60.0


class _Failures:
    """How often each observer failed, so that a broken one logs a line a minute, not
    one per request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[int, float] = {}
        self._quiet: dict[int, int] = {}

    def report(self, observer: object, event: Event) -> None:
        now = time.monotonic()
        who = id(observer)
        with self._lock:
            last = self._last.get(who)
            if last is not None and now - last < _FAILURE_LOG_EVERY:
                self._quiet[who] = self._quiet.get(who, 0) + 1
                return
            self._last[who] = now
            quiet = self._quiet.pop(who, 0)
        logger.error(
            "meterkit: observer %r failed on a %s event (%s); the decision stands%s",
            observer,
            event.outcome,
            event.operation,
            f" ({quiet} more failures since the last report)" if quiet else "",
            exc_info=True,
        )


class Observers:
    """A meter's observers, called as one.

    :meth:`notify` calls each of them with an event, in order, and logs what any
    raises. A hot path may call :attr:`observe` itself (the one observer, or all of
    them, each guarded) and :meth:`failed` when it raises: one call less per event.
    """

    __slots__ = ("_failures", "observe", "observers")

    def __init__(self, observers: Observer | Iterable[Observer]) -> None:
        chosen: tuple[Observer, ...]
        if callable(observers):
            chosen = (observers,)
        elif isinstance(observers, Iterable) and not isinstance(observers, (str, bytes)):
            chosen = tuple(observers)
        else:
            chosen = ()
        if not chosen or not all(callable(observer) for observer in chosen):
            raise ConfigurationError(
                "is a callable of an Event (such as a PrometheusObserver), or a list of them",
                "on_decision",
            )
        self.observers = chosen
        self._failures = _Failures()
        #: Calls the observers with an event; raises what a lone observer raises.
        self.observe: Observer = chosen[0] if len(chosen) == 1 else self._each

    def __repr__(self) -> str:
        return f"Observers({', '.join(map(repr, self.observers))})"

    def notify(self, event: Event) -> None:
        """Call every observer with ``event``; log what any of them raises."""
        try:
            self.observe(event)
        except Exception:
            self.failed(event)

    def failed(self, event: Event) -> None:
        """Log the exception being handled, raised by :attr:`observe` on ``event``."""
        self._failures.report(self.observers[0], event)

    def _each(self, event: Event) -> None:
        for observe in self.observers:
            try:
                observe(event)
            except Exception:
                self._failures.report(observe, event)
