"""Decisions and usage reports: what a server needs, computed only when asked."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NamedTuple

from meterkit.core.credits import credits_text, from_micro
from meterkit.core.outcome import REASON_CREDITS, REASON_RATE, Outcome
from meterkit.core.plan import Plan
from meterkit.core.policy import ALGORITHMS

if TYPE_CHECKING:
    from meterkit.core.policy import Deal, OperationPlan, Policy, Tier

__all__ = ["Decision", "KeyUsage", "OperationUsage", "PlanAssignment", "TierState", "Usage"]

_US = 1_000_000
_GCRA = ALGORITHMS["gcra"]
_REASONS: tuple[str | None, ...] = (None, "rate_limited", "insufficient_credits")
RATE_LIMIT_MESSAGE = "API rate limit exceeded. Try again later."
CREDITS_MESSAGE = (
    "Insufficient credits for this operation. Credits reset at the start of the next "
    "billing period."
)
# The headers Decision.http_headers writes, in its order; as an ASGI server takes them.
_TEXT_NAMES = (
    "RateLimit-Policy",
    "RateLimit",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "Retry-After",
    "X-Credits-Charged",
    "X-Credits-Remaining",
)
_RAW_NAMES = tuple(name.lower().encode() for name in _TEXT_NAMES)


def _ceil_seconds(us: int) -> int:
    return -(-us // _US)


class TierState(NamedTuple):
    """One tier's state after a check."""

    name: str
    limit: int
    remaining: int
    reset_after: float
    """Seconds until the tier next gives quota back: its window turns (fixed and sliding
    window), its bucket is full again (gcra), its oldest logged request expires
    (sliding_log)."""
    denied: bool
    """This tier said no (in shadow mode it said no but did not deny)."""
    shadow: bool


class Decision:
    """The answer to one check: admitted or not, why, when to retry, what it cost.

    ``allowed`` is a plain attribute; everything else is computed
    from the backend's outcome when first read, so a server that only looks at
    ``allowed`` pays for nothing more.
    """

    __slots__ = ("_out", "_plan", "allowed", "degraded")

    def __init__(self, plan: Plan, outcome: Outcome, degraded: bool = False) -> None:
        self._plan = plan
        self._out = outcome
        self.allowed: bool = outcome.allowed
        self.degraded = degraded
        """Admitted without checking, because the backend was unavailable (fail-open)."""

    def __repr__(self) -> str:
        return (
            f"Decision(allowed={self.allowed}, reason={self.reason!r}, "
            f"retry_after={self.retry_after}, charged={self.charged}, balance={self.balance}, "
            f"operation={self._plan.op.name!r}, key={self._plan.key!r}, org={self._plan.org!r}, "
            f"plan={self.plan!r})"
        )

    def __bool__(self) -> bool:
        return self.allowed

    @property
    def reason(self) -> str | None:
        """Why it was refused: ``"rate_limited"`` or ``"insufficient_credits"``; None
        when allowed."""
        return _REASONS[self._out.reason]

    @property
    def request(self) -> Plan:
        """The request this decision answered, as the backend saw it (operation, key,
        org, cost)."""
        return self._plan

    @property
    def plan(self) -> str:
        """The customer plan in force for this check: the key's plan if it has one, else
        its organization's (``"default"`` when neither was put on a plan)."""
        limits = self._out.limits
        return "default" if limits is None else limits.plan

    @property
    def limits(self) -> OperationPlan:
        """The operation's tiers as they applied, under the plan in force."""
        limits = self._out.limits
        return self._plan.op if limits is None else limits

    @property
    def outcome(self) -> Outcome:
        """The backend's raw outcome (see :data:`meterkit.core.plan.Outcome`)."""
        return self._out

    @property
    def key(self) -> str:
        return self._plan.key

    @property
    def org(self) -> str:
        return self._plan.org

    @property
    def operation(self) -> str:
        return self._plan.op.name

    @property
    def retry_after(self) -> float:
        """Seconds until a retry is admitted (if nothing else arrives); 0 when allowed."""
        return self._out.retry_after / _US

    @property
    def charged(self) -> Decimal:
        """Credits this request was charged: 0 when denied; a replayed idempotent retry
        reports the first try's charge, and nothing more is charged."""
        return from_micro(self._out.charged)

    @property
    def balance(self) -> Decimal:
        """The organization's credits left this period, after this request."""
        return from_micro(self._out.balance)

    @property
    def charge_id(self) -> str:
        """Identifies the charge for a refund; empty when nothing was charged."""
        return self._out.charge_id

    @property
    def replayed(self) -> bool:
        """This is the first decision for the same idempotency key, returned again."""
        return self._out.replayed

    @property
    def alerts(self) -> tuple[str, ...]:
        """The credit alert thresholds (``"80%"``) this check was the first to reach in
        its organization's month: each is reported by one check only, whichever
        process made it (see ``CreditPlan.alerts``)."""
        return tuple(f"{p}%" for p in self._out.alerts)

    @property
    def resets_at(self) -> datetime:
        """When the organization's credits reset (the next calendar month, UTC)."""
        return datetime.fromtimestamp(self._out.period_end / _US, tz=timezone.utc)

    @property
    def tiers(self) -> tuple[TierState, ...]:
        """Every tier that applied, in the policy's order."""
        policy_shadow = self._plan.policy.shadow
        return tuple(
            TierState(t.name, t.capacity, rem, reset / _US, bool(den), t.shadow or policy_shadow)
            for t, (rem, reset, den) in zip(self.limits.tiers, self._out.tiers, strict=True)
        )

    @property
    def would_deny(self) -> tuple[str, ...]:
        """Tiers (and ``"credits"``) that said no without denying: shadow mode's report."""
        policy_shadow = self._plan.policy.shadow
        names = [
            t.name
            for t, (_, _, den) in zip(self.limits.tiers, self._out.tiers, strict=True)
            if den and (t.shadow or policy_shadow)
        ]
        if policy_shadow and self._out.balance < 0:
            names.append("credits")
        return tuple(names)

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers: IETF ``RateLimit``/``RateLimit-Policy``, legacy ``X-RateLimit-*``,
        ``Retry-After`` on a 429, and the credits charged and left (see :meth:`http_headers`)."""
        return self.http_headers()

    def http_headers(
        self,
        *,
        ietf: bool = True,
        legacy: bool = True,
        credits: bool = True,
        credits_retry_after: bool = False,
    ) -> dict[str, str]:
        """The response headers of this decision, by group.

        - ``ietf``: ``RateLimit-Policy`` (each tier's quota ``q`` and window ``w`` in
          seconds; a gcra tier adds its bucket as ``meterkit-burst``) and ``RateLimit``
          (each tier's remaining ``r``, and ``t``, the seconds within which no more than
          ``r`` can be used: until the window turns, the next gcra token, the oldest
          logged request expiring);
        - ``legacy``: ``X-RateLimit-Limit``/``-Remaining``/``-Reset`` of the tightest tier;
        - ``credits``: ``X-Credits-Charged`` and ``X-Credits-Remaining``.

        A rate-limited request always carries ``Retry-After`` (whole seconds, rounded up),
        and each tier that denied it says ``r=0`` with ``t`` equal to it, so that
        ``Retry-After`` never points before the end of a window the client is shown
        (draft-ietf-httpapi-ratelimit-headers, "Server Behavior"). A request refused
        for credits carries ``Retry-After`` (the start of the next period, often weeks
        away) only with ``credits_retry_after=True``.
        """
        return dict(self._headers(False, ietf, legacy, credits, credits_retry_after))

    def raw_http_headers(
        self,
        *,
        ietf: bool = True,
        legacy: bool = True,
        credits: bool = True,
        credits_retry_after: bool = False,
    ) -> list[tuple[bytes, bytes]]:
        """:meth:`http_headers` as an ASGI server takes them: lower-case names and
        values as bytes, in the same order."""
        return self._headers(True, ietf, legacy, credits, credits_retry_after)

    def _headers(
        self, raw: bool, ietf: bool, legacy: bool, credits: bool, credits_retry_after: bool
    ) -> list[Any]:
        out = self._out
        op = out.limits or self._plan.op
        names = _RAW_NAMES if raw else _TEXT_NAMES
        # (everything but the integers is text already, see OperationPlan.header_text)
        policy_header, rate, limits, price_text, number = op.header_raw if raw else op.header_text
        headers: list[Any] = []
        retry_s = (out.retry_after + 999_999) // _US
        rate_denied = out.reason == REASON_RATE
        if op.tiers and (ietf or legacy):
            tiers = out.tiers
            if len(op.header_tiers) != len(tiers):
                raise ValueError("the outcome's tiers do not match the operation's")
            policy_shadow = self._plan.policy.shadow
            allowed = out.allowed
            figures: list[int] = []  # each tier's r and t
            # X-RateLimit-* describe one tier: the first that denied a rate-limited
            # request, else the one with the fewest remaining, then the soonest t.
            best = denier = -1
            best_rem = best_t = 0
            i = -1
            for (rem, reset, den), (bucket, tau, interval, shadow) in zip(
                tiers, op.header_tiers, strict=True
            ):
                i += 1
                if den and rate_denied and not (shadow or policy_shadow):
                    # A tier that denied: nothing can be used until the retry is due.
                    figures += (0, retry_s)
                    if denier < 0:
                        denier = i
                    continue
                if rem < bucket:
                    # A gcra tier: ``reset`` is until the bucket is full; the next token
                    # comes sooner. A denied request left this bucket one token fuller
                    # than ``reset`` says (see outcome.unspent), unless this tier is one
                    # that said no.
                    tokens = rem + 1 if (allowed or den) else rem
                    reset = reset - tau + tokens * interval
                # (x + 999_999) // 1_000_000 rounds x µs up to whole seconds.
                t = (reset + 999_999) // _US if reset > 0 else 0
                figures += (rem, t)
                if best < 0 or rem < best_rem or (rem == best_rem and t < best_t):
                    best, best_rem, best_t = i, rem, t
            if denier >= 0:
                best, best_rem, best_t = denier, 0, retry_s
            if ietf:
                headers.append((names[0], policy_header))
                headers.append((names[1], rate % tuple(figures)))
            if legacy:
                headers.append((names[2], limits[best]))
                headers.append((names[3], number % best_rem))
                headers.append((names[4], number % best_t))
        if rate_denied or (credits_retry_after and out.reason == REASON_CREDITS):
            headers.append((names[5], number % retry_s))
        if credits:
            charged = out.charged
            if charged == op.price:
                headers.append((names[6], price_text))
            else:
                text = credits_text(charged)
                headers.append((names[6], text.encode() if raw else text))
            text = credits_text(out.balance)
            headers.append((names[7], text.encode() if raw else text))
        return headers

    @property
    def status(self) -> int:
        """The HTTP status a server answers with: 200, 429 or 402."""
        if self.allowed:
            return 200
        return 429 if self._out.reason == REASON_RATE else 402

    @property
    def error(self) -> dict[str, Any] | None:
        """The seed-shaped JSON error body; ``None`` when allowed."""
        if self.allowed:
            return None
        if self._out.reason == REASON_CREDITS:
            return {
                "error": {
                    "type": "billing_error",
                    "code": "insufficient_credits",
                    "message": CREDITS_MESSAGE,
                    "status": 402,
                }
            }
        return {
            "error": {
                "type": "rate_limit_error",
                "code": "rate_limit_exceeded",
                "message": RATE_LIMIT_MESSAGE,
                "retry_after": _ceil_seconds(self._out.retry_after),
                "status": 429,
            }
        }


class _Issued(Decision):
    """A :class:`Decision` that a meter's ``check`` made: the only kind a meter refunds.
    A hand-built ``Decision(plan, outcome)`` may carry any outcome (a charge id and an
    amount of the caller's choosing), so it is refused, at no cost to a check.

    It is made without :meth:`Decision.__init__`, whose frame was 2% of a check: as
    ``_Issued()``, then its four slots (:func:`issued`, and a meter's check inlined)."""

    __slots__ = ()
    __init__ = object.__init__


def issued(plan: Plan, outcome: Outcome, degraded: bool = False) -> Decision:
    """The :class:`Decision` a meter made of ``outcome`` (see :class:`_Issued`)."""
    decision: Decision = _Issued()
    decision._plan = plan
    decision._out = outcome
    decision.allowed = outcome.allowed
    decision.degraded = degraded
    return decision


@dataclass(frozen=True)
class OperationUsage:
    """Requests and credits of one operation in the current period."""

    requests: int
    credits: Decimal


@dataclass(frozen=True)
class KeyUsage:
    """Requests and credits of one API key in the current period."""

    requests: int
    credits: Decimal


@dataclass(frozen=True)
class Usage:
    """The current period's usage of an organization (or of one of its keys).

    ``requests`` and ``credits_used`` cover the organization, or only ``key`` when
    one was asked for; ``allowance`` and ``credits_left`` are always the
    organization's. ``credits_used`` is charges minus refunds, to the micro-credit.
    ``plan`` is the organization's plan, which gives the allowance (unless
    ``set_allowance`` gave the organization one of its own).
    """

    org: str
    key: str | None
    period_start: datetime
    period_end: datetime
    allowance: Decimal
    credits_used: Decimal
    credits_left: Decimal
    requests: int
    operations: dict[str, OperationUsage]
    keys: dict[str, KeyUsage]
    plan: str = "default"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (Decimals as strings, datetimes as ISO 8601)."""
        return {
            "org": self.org,
            "key": self.key,
            "plan": self.plan,
            "period_start": self.period_start.isoformat(),
            "period_end": self.period_end.isoformat(),
            "allowance": str(self.allowance),
            "credits_used": str(self.credits_used),
            "credits_left": str(self.credits_left),
            "requests": self.requests,
            "operations": {
                k: {"requests": v.requests, "credits": str(v.credits)}
                for k, v in self.operations.items()
            },
            "keys": {
                k: {"requests": v.requests, "credits": str(v.credits)} for k, v in self.keys.items()
            },
        }


@dataclass(frozen=True)
class PlanAssignment:
    """What :meth:`Meter.plan_of` reports: the plans an organization (and one of its
    keys) was put on, its negotiated deal, and the tiers and allowance in force.

    ``plan`` is the plan a check of ``key`` (or, without one, of the organization) is
    under; ``org_plan`` is ``"default"`` when the organization was put on no plan;
    ``key_plan`` is None when the key has no plan of its own (or no key was asked
    about). ``limits`` is the deal as it was given (``{"org-hour": "50000/hour"}``).
    ``tiers`` are the policy's tiers as they apply (key-scoped ones under the key's
    plan, if it has one), a tier turned off left out; ``allowance`` is the monthly
    allowance the organization's plan gives (``set_allowance`` may override it).
    """

    org: str
    key: str | None
    plan: str
    org_plan: str
    key_plan: str | None
    limits: dict[str, Any]
    tiers: tuple[Tier, ...]
    allowance: Decimal

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "org": self.org,
            "key": self.key,
            "plan": self.plan,
            "org_plan": self.org_plan,
            "key_plan": self.key_plan,
            "limits": self.limits,
            "tiers": [
                {
                    "name": t.name,
                    "scope": t.scope,
                    "limit": t.limit,
                    "window_seconds": t.window,
                    "algorithm": t.algorithm,
                    "burst": t.burst,
                }
                for t in self.tiers
            ],
            "allowance": str(self.allowance),
        }


def build_assignment(
    policy: Policy,
    org: str,
    key: str | None,
    assigned: tuple[str | None, str | None, Deal],
) -> PlanAssignment:
    """Turn a backend's ``(org plan, key plan, deal)`` into a :class:`PlanAssignment`."""
    from meterkit.core.policy import deal_text

    org_plan, key_plan, deal = assigned
    return PlanAssignment(
        org=org,
        key=key,
        plan=policy.plan_in_force(org_plan, key_plan),
        org_plan=org_plan or "default",
        key_plan=key_plan,
        limits=deal_text(deal),
        tiers=policy.tiers_under(org_plan, key_plan, deal),
        allowance=from_micro(policy.allowance_of(org_plan)),
    )


def build_usage(org: str, key: str | None, raw: tuple[Any, ...]) -> Usage:
    """Turn a backend's raw usage into a :class:`Usage` for ``org`` (or one ``key``)."""
    start, end, allowance, used, requests, pairs = raw[:6]
    plan = raw[6] if len(raw) > 6 else "default"
    ops: dict[str, list[int]] = {}
    keys: dict[str, list[int]] = {}
    for (k, op), (n, micro) in pairs.items():
        if key is not None and k != key:
            continue
        o = ops.setdefault(op, [0, 0])
        o[0] += n
        o[1] += micro
        kk = keys.setdefault(k, [0, 0])
        kk[0] += n
        kk[1] += micro
    if key is not None:
        requests = sum(v[0] for v in ops.values())
        scoped_used = sum(v[1] for v in ops.values())
    else:
        scoped_used = used
    return Usage(
        org=org,
        key=key,
        period_start=datetime.fromtimestamp(start // _US, tz=timezone.utc),
        period_end=datetime.fromtimestamp(end // _US, tz=timezone.utc),
        allowance=from_micro(allowance),
        credits_used=from_micro(scoped_used),
        credits_left=from_micro(allowance - used),
        requests=requests,
        operations={k: OperationUsage(n, from_micro(m)) for k, (n, m) in sorted(ops.items())},
        keys={k: KeyUsage(n, from_micro(m)) for k, (n, m) in sorted(keys.items())},
        plan=plan,
    )
