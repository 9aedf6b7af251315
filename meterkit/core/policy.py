"""Policies: rate tiers, a cost table, a credit plan and customer plans, validated and
compiled once.

A :class:`Policy` is data. Building one validates everything and precomputes what
the hot path needs — windows and emission intervals in integer microseconds, prices
in micro-credits, the tiers that apply to each operation — so a check only looks
things up.

The top-level tiers and credits are the plan named ``"default"``. A
:class:`CustomerPlan` changes, for the customers put on it, the amount (and a gcra
tier's burst) of named tiers, turns tiers off, and sets the monthly allowance. It
never changes a tier's window or algorithm: the tier's state (its counts, its
bucket) is the same state under every plan, so that a customer moved from one plan
to another keeps what it spent in the current window (see docs/plans.md).
:meth:`Policy.limits_for` gives an operation's tiers under a plan (and a
per-organization deal, see :func:`deal_of`), compiled once and cached.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import limits

from meterkit.core.credits import MAX_MICRO, from_micro, to_micro
from meterkit.core.routes import check_routes
from meterkit.errors import (
    ConfigurationError,
    InvalidAmountError,
    InvalidRequestError,
    UnknownOperationError,
    UnknownPlanError,
)

__all__ = [
    "ALGORITHMS",
    "DEFAULT_PLAN",
    "Category",
    "CostTable",
    "CreditPlan",
    "CustomerPlan",
    "Deal",
    "Operation",
    "Policy",
    "Tier",
    "deal_of",
    "deal_text",
]

Algorithm = Literal["fixed_window", "sliding_window", "gcra", "sliding_log"]
Scope = Literal["key", "org"]

#: Algorithm names and the small integers backends use for them (also in Lua).
ALGORITHMS: Mapping[str, int] = {
    "fixed_window": 0,
    "sliding_window": 1,
    "gcra": 2,
    "sliding_log": 3,
}
_US = 1_000_000
_MAX_LOG = 100_000  # a sliding log keeps one timestamp per admitted request
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_OP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_ZERO_WINDOW = re.compile(r"(?:/|per)\s*0+\s*[a-z]", re.IGNORECASE)
Amount = str | int | float
#: The plan of every customer not put on another: the policy's top-level tiers and credits.
DEFAULT_PLAN = "default"
#: How a plan (or a deal) changes one tier: a rate (``"5000/hour"``), a table
#: ``{"rate": ..., "burst": ..., "algorithm": ...}``, or ``"off"``.
TierChange = str | limits.RateLimitItem | Mapping[str, object]
#: An organization's negotiated deal as backends keep it: per tier, sorted by name,
#: ``(tier name, algorithm code, window µs, limit, burst)``; a limit of 0 is "off", a
#: burst of 0 "the limit" (and any algorithm but gcra).
Deal = tuple[tuple[str, int, int, int, int], ...]
_CACHE_MAX = 65_536


def _parse_rate(rate: object) -> limits.RateLimitItem:
    if isinstance(rate, limits.RateLimitItem):
        item = rate
    elif isinstance(rate, str):
        try:
            items = limits.parse_many(rate)
        except ValueError:
            raise ConfigurationError(
                f"malformed rate {rate!r}; write it as '1000/hour' or '100 per minute'", "rate"
            ) from None
        if len(items) != 1:
            # limits.parse would keep the first rate and drop the others without a word.
            raise ConfigurationError(
                f"a tier has exactly one rate; give each rate of {rate!r} its own tier", "rate"
            )
        if _ZERO_WINDOW.search(rate):
            # limits reads a window of 0 units as 1 unit.
            raise ConfigurationError(f"the window of {rate!r} is empty", "rate")
        item = items[0]
    else:
        raise ConfigurationError(
            f"a rate is a string such as '1000/hour' or a limits.RateLimitItem, "
            f"not {type(rate).__name__}",
            "rate",
        )
    if item.amount <= 0:
        raise ConfigurationError(f"a rate of {item.amount} admits nothing", "rate")
    if item.get_expiry() <= 0:
        raise ConfigurationError(f"the window of {item} is not positive", "rate")
    return item


def _micro(value: object, location: str) -> int:
    try:
        return to_micro(value, location)
    except InvalidAmountError as exc:
        raise ConfigurationError(str(exc), location) from None


@dataclass(frozen=True)
class Tier:
    """One rate limit: who it counts (``scope``), how many (``rate``), and how.

    ``algorithm`` is one of ``fixed_window`` (UTC-aligned windows), ``sliding_window``
    (weighted two-counter), ``gcra`` (a token bucket of ``burst`` tokens, by default the
    rate's amount) and ``sliding_log`` (exact, one timestamp per admitted request).
    A ``shadow`` tier is computed and reported but never denies. ``operations``, when
    given, limits the tier to those operations.
    """

    name: str
    scope: Scope
    rate: limits.RateLimitItem | str
    algorithm: Algorithm = "fixed_window"
    burst: int | None = None
    shadow: bool = False
    operations: tuple[str, ...] | None = None

    limit: int = field(init=False)
    window: int = field(init=False)  # seconds
    window_us: int = field(init=False)
    interval_us: int = field(init=False)  # gcra emission interval, rounded up
    #: gcra: how far ahead of now a TAT may run (burst × interval), µs
    tau_us: int = field(init=False)
    code: int = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigurationError(
                f"a tier name is 1-64 letters, digits, '_', '.', '-', got {self.name!r}", "name"
            )
        if self.scope not in ("key", "org"):
            raise ConfigurationError(f"scope is 'key' or 'org', got {self.scope!r}", "scope")
        if self.algorithm not in ALGORITHMS:
            raise ConfigurationError(
                f"algorithm is one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}",
                "algorithm",
            )
        item = _parse_rate(self.rate)
        limit = int(item.amount)
        window_us = int(item.get_expiry()) * _US
        burst = self.burst
        if burst is not None:
            if self.algorithm != "gcra":
                raise ConfigurationError("burst applies to the gcra algorithm only", "burst")
            if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
                raise ConfigurationError(f"burst is a positive integer, got {burst!r}", "burst")
        interval_us = -(-window_us // limit)
        if self.algorithm == "sliding_window" and (2 * limit + 1) * window_us > MAX_MICRO:
            raise ConfigurationError(
                "this sliding_window is too large to count exactly; use a shorter window",
                "rate",
            )
        if self.algorithm == "sliding_log" and limit > _MAX_LOG:
            raise ConfigurationError(
                f"a sliding_log keeps one entry per request: at most {_MAX_LOG}", "rate"
            )
        if self.algorithm == "gcra" and (burst or limit) * interval_us > MAX_MICRO:
            raise ConfigurationError("this gcra bucket is too large to time exactly", "burst")
        if not isinstance(self.shadow, bool):
            raise ConfigurationError("shadow is true or false", "shadow")
        ops = self.operations
        if ops is not None:
            if isinstance(ops, str) or not isinstance(ops, Iterable):
                raise ConfigurationError("operations is a list of operation names", "operations")
            ops = tuple(ops)
            if not all(isinstance(o, str) for o in ops):
                raise ConfigurationError("operations is a list of operation names", "operations")
            if not ops:
                raise ConfigurationError(
                    "an empty operations list applies the tier to nothing; omit it to apply "
                    "the tier to every operation",
                    "operations",
                )
            object.__setattr__(self, "operations", ops)
        object.__setattr__(self, "rate", item)
        object.__setattr__(self, "limit", limit)
        object.__setattr__(self, "window", window_us // _US)
        object.__setattr__(self, "window_us", window_us)
        object.__setattr__(self, "interval_us", interval_us)
        object.__setattr__(self, "code", ALGORITHMS[self.algorithm])
        if self.algorithm == "gcra" and burst is None:
            object.__setattr__(self, "burst", limit)
        object.__setattr__(self, "tau_us", self.capacity * interval_us)

    @property
    def capacity(self) -> int:
        """How many requests the tier admits from a clean state at once."""
        return self.burst if self.burst is not None else self.limit

    def describe(self) -> str:
        """A one-line summary, e.g. ``key-burst: 100 per 60s per key (sliding_log)``."""
        extra = f", burst {self.burst}" if self.algorithm == "gcra" else ""
        shadow = ", shadow" if self.shadow else ""
        return (
            f"{self.name}: {self.limit} per {self.window}s per {self.scope} "
            f"({self.algorithm}{extra}{shadow})"
        )


@dataclass(frozen=True)
class Category:
    """A price range for a kind of operation, e.g. writes cost 0.03–0.15 credits."""

    name: str
    min: Amount | object
    max: Amount | object
    description: str = ""
    min_micro: int = field(init=False)
    max_micro: int = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigurationError(f"a category name is a short identifier, got {self.name!r}")
        lo, hi = _micro(self.min, "min"), _micro(self.max, "max")
        if lo > hi:
            raise ConfigurationError(f"min {self.min} is above max {self.max}", "max")
        object.__setattr__(self, "min_micro", lo)
        object.__setattr__(self, "max_micro", hi)


@dataclass(frozen=True)
class Operation:
    """One priced operation (``invoices.list``) in a category, with its permission."""

    name: str
    category: str
    price: Amount | object
    description: str = ""
    permission: str | None = None
    price_micro: int = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _OP_NAME.fullmatch(self.name):
            raise ConfigurationError(f"an operation name is a short identifier, got {self.name!r}")
        object.__setattr__(self, "price_micro", _micro(self.price, "price"))


@dataclass(frozen=True)
class CostTable:
    """Categories with price ranges and the operations priced inside them."""

    categories: tuple[Category, ...]
    operations: tuple[Operation, ...]

    def __post_init__(self) -> None:
        cats = {c.name: c for c in self.categories}
        if len(cats) != len(self.categories):
            raise ConfigurationError("two categories share a name", "categories")
        seen: set[str] = set()
        for i, op in enumerate(self.operations):
            where = f"operations[{i}]"
            if op.name in seen:
                raise ConfigurationError(f"operation {op.name!r} is priced twice", where)
            seen.add(op.name)
            cat = cats.get(op.category)
            if cat is None:
                raise ConfigurationError(f"unknown category {op.category!r}", where + ".category")
            if not cat.min_micro <= op.price_micro <= cat.max_micro:
                raise ConfigurationError(
                    f"price {from_micro(op.price_micro)} of {op.name!r} is outside its "
                    f"category {cat.name!r} ({from_micro(cat.min_micro)}-"
                    f"{from_micro(cat.max_micro)})",
                    where + ".price",
                )
        object.__setattr__(self, "categories", tuple(self.categories))
        object.__setattr__(self, "operations", tuple(self.operations))

    def category(self, name: str) -> Category:
        for cat in self.categories:
            if cat.name == name:
                return cat
        raise KeyError(name)


@dataclass(frozen=True)
class CreditPlan:
    """Credits granted to each organization per calendar month (UTC), no rollover.

    ``alerts`` are thresholds of credit usage, as percents of the month's credits (its
    allowance and top-ups): ``("80%", "100%")``. A check whose charge takes an
    organization's usage to one (or that is refused for credits, which reaches them
    all) reports a credit alert, once per organization, threshold and month, however
    many processes check at once: the backend decides it in the check's atomic step.
    """

    allowance: Amount | object
    period: Literal["month"] = "month"
    alerts: Sequence[str | int] = ()
    allowance_micro: int = field(init=False)
    #: ``alerts`` as whole percents, in increasing order.
    alert_percents: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.period != "month":
            raise ConfigurationError("the only credit period is 'month'", "period")
        object.__setattr__(self, "allowance_micro", _micro(self.allowance, "allowance"))
        object.__setattr__(self, "alert_percents", _alert_percents(self.alerts))
        object.__setattr__(self, "alerts", tuple(f"{p}%" for p in self.alert_percents))


_ALERT = re.compile(r"\s*(\d{1,3})\s*%\s*")


def _alert_percents(alerts: object) -> tuple[int, ...]:
    """Credit alert thresholds as whole percents from 1 to 100, each once, sorted."""
    if isinstance(alerts, (str, bytes)) or not isinstance(alerts, Iterable):
        raise ConfigurationError(
            "is a list of thresholds, percents of the month's credits: ['80%', '100%']",
            "alerts",
        )
    percents: list[int] = []
    for i, alert in enumerate(alerts):
        match = _ALERT.fullmatch(alert) if isinstance(alert, str) else None
        percent = int(match.group(1)) if match else None
        if type(alert) is int:
            percent = alert
        if percent is None or not 1 <= percent <= 100:
            raise ConfigurationError(
                f"a threshold is a whole percent of the month's credits from 1% to 100%, "
                f"such as '80%', not {alert!r}",
                f"alerts[{i}]",
            )
        if percent in percents:
            raise ConfigurationError(f"the threshold {percent}% is given twice", f"alerts[{i}]")
        percents.append(percent)
    return tuple(sorted(percents))


def enforces(tier: Tier, policy_shadow: bool) -> bool:
    """Whether ``tier``'s "no" denies a request: the one rule every backend applies.
    A shadow tier, or any tier of a shadow policy, is computed and reported only."""
    return not (tier.shadow or policy_shadow)


class OperationPlan:
    """What a check of one operation needs, precomputed: price, tiers, header text.

    The policy's own (:meth:`Policy.plan_for`) has the default plan's tiers; one of
    :meth:`Policy.limits_for` has the tiers in force under a plan and a deal. ``on``
    lists the positions, in ``base.tiers``, of the tiers that apply (a plan may turn
    tiers off), and ``allowance`` is the monthly allowance the plan gives.
    """

    __slots__ = (
        "allowance",
        "base",
        "category",
        "header_raw",
        "header_text",
        "header_tiers",
        "key_plan",
        "name",
        "on",
        "plan",
        "policy_header",
        "price",
        "price_text",
        "tier_index",
        "tiers",
    )

    def __init__(
        self,
        op: Operation,
        tiers: tuple[Tier, ...],
        indexes: tuple[int, ...],
        *,
        allowance: int = 0,
        plan: str = DEFAULT_PLAN,
        base: OperationPlan | None = None,
        on: tuple[int, ...] | None = None,
    ) -> None:
        self.name = op.name
        self.category = op.category
        self.price = op.price_micro
        self.tiers = tiers
        self.tier_index = indexes
        self.plan = plan
        self.allowance = allowance
        self.base = self if base is None else base
        self.on = tuple(range(len(tiers))) if on is None else on
        #: The key's plan, when the request names it (see :meth:`Policy.keyed`).
        self.key_plan: str | None = None
        # Each tier's real quota and window; a gcra tier's bucket is a vendor parameter
        # (draft-ietf-httpapi-ratelimit-headers asks for a prefix on those).
        self.policy_header = ", ".join(
            f'"{t.name}";q={t.limit};w={t.window}'
            + (f";meterkit-burst={t.burst}" if t.algorithm == "gcra" else "")
            for t in tiers
        )
        #: Per tier, what computing its ``RateLimit`` figures reads: the bucket's size
        #: for a gcra tier (0 for the others), tau and emission interval in µs, whether
        #: the tier alone is in shadow mode.
        self.header_tiers = tuple(
            (t.capacity if t.algorithm == "gcra" else 0, t.tau_us, t.interval_us, t.shadow)
            for t in tiers
        )
        self.price_text = str(from_micro(op.price_micro))
        # What Decision's headers hold apart from integers, so that rendering them is
        # one %-format per header: RateLimit-Policy; RateLimit with a %d for each
        # tier's r and t (tier names are identifiers: no % to escape); each tier's
        # X-RateLimit-Limit; the price; an integer's format. As text, and as the bytes
        # an ASGI server sends.
        rate = ", ".join(f'"{t.name}";r=%d;t=%d' for t in tiers)
        limits = tuple(str(t.limit) for t in tiers)
        self.header_text = (self.policy_header, rate, limits, self.price_text, "%d")
        self.header_raw = (
            self.policy_header.encode(),
            rate.encode(),
            tuple(limit.encode() for limit in limits),
            self.price_text.encode(),
            b"%d",
        )

    def __repr__(self) -> str:
        return f"OperationPlan({self.name!r}, plan={self.plan!r}, tiers={list(self.tiers)!r})"


def _rate_text(limit: int, window: int) -> str:
    """``5000/hour`` (or ``5000 per 7200 seconds``): a rate as people write it."""
    unit = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}.get(window)
    return f"{limit}/{unit}" if unit else f"{limit} per {window} seconds"


def _changed(base: Tier, change: object, where: str) -> Tier | None:
    """``base`` as ``change`` makes it under a plan or a deal (None: turned off).

    A plan may change the amount of a tier (and a gcra tier's burst) but neither its
    window nor its algorithm: the tier keeps one state under every plan, and a count
    kept in one window or algorithm means nothing in another."""
    if change == "off":
        return None
    algorithm: object = None
    burst: object = None
    if isinstance(change, (str, limits.RateLimitItem)):
        rate: object = change
        rate_at = where
    elif isinstance(change, Mapping):
        unknown = sorted(str(k) for k in change if k not in ("rate", "burst", "algorithm"))
        if unknown:
            raise ConfigurationError(
                f"a tier change takes rate, burst and algorithm, not {', '.join(unknown)}", where
            )
        if "rate" not in change:
            raise ConfigurationError("a tier change needs its rate", where)
        rate, burst, algorithm = change["rate"], change.get("burst"), change.get("algorithm")
        rate_at = f"{where}.rate"
    else:
        raise ConfigurationError(
            "a tier change is a rate such as '5000/hour', a table with rate (and burst), "
            f"or 'off', not {type(change).__name__}",
            where,
        )
    if algorithm is not None and algorithm != base.algorithm:
        raise ConfigurationError(
            f"a plan keeps each tier's algorithm ({base.name!r} is {base.algorithm}): its "
            "state would not carry over from one algorithm to another; define another tier "
            "and turn this one off in the plan",
            f"{where}.algorithm",
        )
    try:
        item = _parse_rate(rate)
    except ConfigurationError as exc:
        raise ConfigurationError(exc.detail, rate_at) from None
    if burst is not None and base.algorithm != "gcra":
        raise ConfigurationError("burst applies to the gcra algorithm only", f"{where}.burst")
    try:
        tier = Tier(
            base.name,
            base.scope,
            item,
            base.algorithm,
            burst,  # type: ignore[arg-type]
            base.shadow,
            base.operations,
        )
    except ConfigurationError as exc:
        raise exc.at(where) from None
    if tier.window_us != base.window_us:
        raise ConfigurationError(
            f"a plan keeps each tier's window ({base.name!r} counts per {base.window} s, "
            f"not {tier.window} s): a count kept in one window means nothing in another; "
            "define another tier and turn this one off in the plan",
            rate_at,
        )
    return tier


def _from_numbers(base: Tier, limit: int, burst: int) -> Tier:
    """``base`` with a deal's numbers (checked when the deal was made)."""
    item = limits.RateLimitItemPerSecond(limit, base.window)
    gcra_burst = burst if base.algorithm == "gcra" and burst else None
    return Tier(
        base.name, base.scope, item, base.algorithm, gcra_burst, base.shadow, base.operations
    )


@dataclass(frozen=True)
class CustomerPlan:
    """A plan customers are put on at run time (``meter.set_plan``): ``Pro``, ``Free``.

    ``tiers`` changes named tiers of the policy, each to a rate (``"5000/hour"``), a
    table ``{"rate": ..., "burst": ...}`` or ``"off"``; a tier not named keeps the
    policy's rate. A change keeps the tier's window and algorithm (see
    docs/plans.md). ``allowance`` is the monthly credit allowance, by default the
    policy's. Checked against the tiers when the :class:`Policy` is made.
    """

    name: str
    tiers: Mapping[str, TierChange] = field(default_factory=dict)
    allowance: Amount | object | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigurationError(
                f"a plan name is 1-64 letters, digits, '_', '.', '-', got {self.name!r}", "name"
            )
        if self.name == DEFAULT_PLAN:
            raise ConfigurationError(
                "the plan named 'default' is the policy's top-level tiers and credits", "name"
            )
        if not isinstance(self.tiers, Mapping):
            raise ConfigurationError("tiers maps tier names to rates or 'off'", "tiers")
        object.__setattr__(self, "tiers", dict(self.tiers))


class _PlanLimits:
    """A plan, compiled: each tier's change by name (None: off), and the allowance."""

    __slots__ = ("allowance", "changes", "name")

    def __init__(self, name: str, changes: dict[str, Tier | None], allowance: int) -> None:
        self.name = name
        self.changes = changes
        self.allowance = allowance


def deal_of(policy: Policy, limits_: Mapping[str, object]) -> Deal:
    """An organization's negotiated deal (``meter.set_limits``), checked against
    ``policy``: tier names to rates, tables or ``"off"``, as in a plan. Raises
    :class:`~meterkit.errors.InvalidRequestError` naming the tier."""
    if not isinstance(limits_, Mapping):
        raise InvalidRequestError(
            "limits maps tier names to rates such as '50000/hour', tables or 'off', "
            f"not {type(limits_).__name__}"
        )
    tiers = {t.name: t for t in policy.tiers}
    deal = []
    for name, change in limits_.items():
        base = tiers.get(name) if isinstance(name, str) else None
        if base is None:
            raise InvalidRequestError(
                f"unknown tier {name!r}: the policy's tiers are {', '.join(tiers) or 'none'}"
            )
        try:
            tier = _changed(base, change, name)
        except ConfigurationError as exc:
            raise InvalidRequestError(str(exc)) from None
        if tier is None:
            deal.append((name, base.code, base.window_us, 0, 0))
        else:
            burst = tier.capacity if tier.algorithm == "gcra" else 0
            deal.append((name, base.code, base.window_us, tier.limit, burst))
    return tuple(sorted(deal))


def deal_text(deal: Deal) -> dict[str, str | dict[str, object]]:
    """A deal as people write it: ``{"org-hour": "50000/hour", "trial": "off"}`` (a gcra
    tier with a burst of its own: ``{"rate": ..., "burst": ...}``)."""
    out: dict[str, str | dict[str, object]] = {}
    for name, _, window_us, limit, burst in deal:
        if not limit:
            out[name] = "off"
            continue
        rate = _rate_text(limit, window_us // _US)
        out[name] = {"rate": rate, "burst": burst} if burst and burst != limit else rate
    return out


class Policy:
    """Rate tiers, a cost table and a credit plan, validated and compiled once.

    Build one in code, load one with :meth:`from_toml`, or take the seed's with
    :meth:`crane_ledger`. A policy is immutable; the meter and its backends share it.
    """

    __slots__ = (
        "_limits",
        "_plan_limits",
        "_plans",
        "costs",
        "credits",
        "name",
        "plans",
        "routes",
        "shadow",
        "tiers",
    )

    def __init__(
        self,
        tiers: Sequence[Tier],
        costs: CostTable,
        credits: CreditPlan,
        *,
        shadow: bool = False,
        name: str = "custom",
        routes: Mapping[str, str] | None = None,
        plans: Iterable[CustomerPlan] = (),
    ) -> None:
        tiers = tuple(tiers)
        for i, t in enumerate(tiers):
            if not isinstance(t, Tier):
                raise ConfigurationError("each tier is a meterkit.Tier", f"tiers[{i}]")
        names = [t.name for t in tiers]
        for i, t in enumerate(tiers):
            if names.index(t.name) != i:
                raise ConfigurationError(f"two tiers are named {t.name!r}", f"tiers[{i}].name")
        known = {op.name for op in costs.operations}
        for i, t in enumerate(tiers):
            for op_name in t.operations or ():
                if op_name not in known:
                    raise ConfigurationError(
                        f"unknown operation {op_name!r}", f"tiers[{i}].operations"
                    )
        routes = dict(routes or {})
        check_routes(routes, known)
        if not isinstance(shadow, bool):
            raise ConfigurationError("shadow is true or false", "shadow")
        self.tiers = tiers
        self.costs = costs
        self.credits = credits
        self.shadow = shadow
        self.name = name
        self.routes = routes
        ops: dict[str, OperationPlan] = {}
        for op in costs.operations:
            applies = [
                (i, t)
                for i, t in enumerate(tiers)
                if t.operations is None or op.name in t.operations
            ]
            ops[op.name] = OperationPlan(
                op,
                tuple(t for _, t in applies),
                tuple(i for i, _ in applies),
                allowance=credits.allowance_micro,
            )
        self._plans = ops
        self.plans: dict[str, CustomerPlan] = {}
        self._plan_limits: dict[str, _PlanLimits] = {}
        if isinstance(plans, (str, Mapping)) or not isinstance(plans, Iterable):
            raise ConfigurationError("plans is a list of meterkit.CustomerPlan", "plans")
        by_name = {t.name: t for t in tiers}
        for plan in plans:
            if not isinstance(plan, CustomerPlan):
                raise ConfigurationError("each plan is a meterkit.CustomerPlan", "plans")
            where = f"plans.{plan.name}"
            if plan.name in self.plans:
                raise ConfigurationError(f"two plans are named {plan.name!r}", where)
            changes: dict[str, Tier | None] = {}
            for tier_name, change in plan.tiers.items():
                base = by_name.get(tier_name)
                if base is None:
                    raise ConfigurationError(
                        f"unknown tier {tier_name!r}: a plan changes the policy's tiers "
                        f"({', '.join(by_name) or 'none'})",
                        f"{where}.tiers.{tier_name}",
                    )
                changes[tier_name] = _changed(base, change, f"{where}.tiers.{tier_name}")
            allowance = (
                credits.allowance_micro
                if plan.allowance is None
                else _micro(plan.allowance, f"{where}.allowance")
            )
            self.plans[plan.name] = plan
            self._plan_limits[plan.name] = _PlanLimits(plan.name, changes, allowance)
        self._limits: dict[tuple[object, ...], OperationPlan] = {}

    def __repr__(self) -> str:
        return (
            f"Policy(name={self.name!r}, tiers={[t.name for t in self.tiers]}, "
            f"operations={len(self._plans)}, allowance={from_micro(self.credits.allowance_micro)}"
            + (f", plans={list(self.plans)}" if self.plans else "")
            + ")"
        )

    # -- lookups ---------------------------------------------------------------

    def plan_for(self, operation: str) -> OperationPlan:
        """The compiled plan of one operation; :class:`UnknownOperationError` if unpriced."""
        try:
            return self._plans[operation]
        except (KeyError, TypeError):
            raise UnknownOperationError(
                f"unknown operation {operation!r}: it is not in the policy's cost table"
            ) from None

    def check_plan(self, plan: object) -> str:
        """``plan`` if it names one of the policy's plans (or ``"default"``), else
        :class:`~meterkit.errors.UnknownPlanError`."""
        if plan == DEFAULT_PLAN or (isinstance(plan, str) and plan in self._plan_limits):
            return plan
        known = ", ".join([DEFAULT_PLAN, *self._plan_limits])
        raise UnknownPlanError(f"unknown plan {plan!r}: this policy's plans are {known}")

    def allowance_of(self, plan: str | None) -> int:
        """The monthly allowance (µ-credits) ``plan`` gives; the default plan's for
        ``None`` or a name this policy does not know."""
        found = self._plan_limits.get(plan) if plan is not None else None
        return self.credits.allowance_micro if found is None else found.allowance

    def _under(
        self,
        tier: Tier,
        org_plan: str | None,
        key_plan: str | None,
        dealt: Mapping[str, tuple[int, int, int, int]],
    ) -> Tier | None:
        """``tier`` under the plans and deal in force (None: off): see :meth:`limits_for`."""
        known = self._plan_limits
        source = known.get(key_plan if tier.scope == "key" and key_plan is not None else org_plan)  # type: ignore[arg-type]
        now: Tier | None = tier
        if source is not None and tier.name in source.changes:
            now = source.changes[tier.name]
        terms = dealt.get(tier.name)
        if terms is not None and terms[:2] == (tier.code, tier.window_us):
            limit, burst = terms[2], terms[3]
            now = _from_numbers(tier, limit, burst) if limit else None
        return now

    def keyed(self, op: OperationPlan, key_plan: str) -> OperationPlan:
        """``op`` for a request that names its key's plan (an ``ApiKey`` from a key store
        that keeps one), which then wins over the plan a backend keeps for the key:
        backends find it in ``op.key_plan``. Cached."""
        slot = (op, "keyed", key_plan)
        found = self._limits.get(slot)
        if found is None:
            base = op.base
            found = OperationPlan(
                self.operations.get(base.name)
                or Operation(base.name, base.category, from_micro(base.price)),
                base.tiers,
                base.tier_index,
                allowance=base.allowance,
                base=base,
            )
            found.key_plan = key_plan
            self._limits[slot] = found
        return found

    def plan_in_force(self, org_plan: str | None, key_plan: str | None = None) -> str:
        """The plan a check is under: the key's if it has one, else the organization's;
        ``"default"`` for none, or for a name this policy does not know."""
        name = key_plan if key_plan is not None else org_plan
        return name if name is not None and name in self._plan_limits else DEFAULT_PLAN

    def tiers_under(
        self, org_plan: str | None = None, key_plan: str | None = None, deal: Deal = ()
    ) -> tuple[Tier, ...]:
        """Every tier of the policy as it applies under these plans and this deal (the
        rule of :meth:`limits_for`); a tier turned off is left out."""
        dealt = {name: (code, window, limit, burst) for name, code, window, limit, burst in deal}
        under = (self._under(t, org_plan, key_plan, dealt) for t in self.tiers)
        return tuple(t for t in under if t is not None)

    def limits_for(
        self,
        op: OperationPlan,
        org_plan: str | None = None,
        key_plan: str | None = None,
        deal: Deal = (),
    ) -> OperationPlan:
        """``op`` as it applies under the organization's plan, the key's plan and the
        organization's deal: the rule every backend follows (docs/plans.md).

        Key-scoped tiers follow the key's plan when it has one, else the organization's;
        organization-scoped tiers and the allowance follow the organization's plan (they
        count the whole organization); a deal changes any tier on top of both, and
        applies only while the tier has the algorithm and window it was made for. A plan
        name the policy does not know (one removed since it was assigned) counts as
        ``"default"``. ``Decision.plan`` names the key's plan if it has one, else the
        organization's. Cached: the same arguments give the same object.
        """
        if org_plan is None and key_plan is None and not deal:
            return op
        slot = (op, org_plan, key_plan, deal)
        found = self._limits.get(slot)
        if found is not None:
            return found
        known = self._plan_limits
        dealt = {name: (code, window, limit, burst) for name, code, window, limit, burst in deal}
        tiers: list[Tier] = []
        indexes: list[int] = []
        on: list[int] = []
        base = op.base
        for position, tier in enumerate(base.tiers):
            now = self._under(tier, org_plan, key_plan, dealt)
            if now is not None:
                tiers.append(now)
                indexes.append(base.tier_index[position])
                on.append(position)
        org = known.get(org_plan) if org_plan is not None else None
        name = self.plan_in_force(org_plan, key_plan)
        operation = self.operations.get(base.name) or Operation(
            base.name, base.category, from_micro(base.price)
        )
        found = OperationPlan(
            operation,
            tuple(tiers),
            tuple(indexes),
            allowance=org.allowance if org is not None else self.credits.allowance_micro,
            plan=name,
            base=base,
            on=tuple(on),
        )
        if len(self._limits) >= _CACHE_MAX:
            self._limits.clear()
        self._limits[slot] = found
        return found

    @property
    def operations(self) -> Mapping[str, Operation]:
        return {op.name: op for op in self.costs.operations}

    def price(self, operation: str) -> object:
        """The table price of ``operation`` in credits, as a ``Decimal``."""
        return from_micro(self.plan_for(operation).price)

    # -- constructors ------------------------------------------------------------

    @classmethod
    def crane_ledger(cls) -> Policy:
        """The seed's policy: 1000/hour per key, 10000/hour per org, 100/minute burst."""
        text = resources.files("meterkit").joinpath("policies/crane_ledger.toml").read_text("utf-8")
        return cls.from_toml(text)

    @classmethod
    def from_toml(cls, source: str | os.PathLike[str] | bytes) -> Policy:
        """Load a policy from TOML text, bytes or a file path.

        A ``str`` is taken as a path when it is one line ending in ``.toml``; otherwise
        as TOML text. Every mistake raises :class:`ConfigurationError` naming where it
        is, e.g. ``tiers[2].rate: malformed rate 'often'``.
        """
        if isinstance(source, os.PathLike) or (
            isinstance(source, str) and "\n" not in source and source.strip().endswith(".toml")
        ):
            try:
                data: str | bytes = Path(source).read_bytes()
            except OSError as exc:
                raise ConfigurationError(f"cannot read policy file: {exc.strerror}") from None
            except ValueError:  # a NUL in the path
                raise ConfigurationError("a policy file's path holds a NUL character") from None
        elif isinstance(source, (str, bytes)):
            data = source
        else:
            raise ConfigurationError(
                f"a policy source is TOML text or a path, not {type(source).__name__}"
            )
        from meterkit.core.toml import decode

        return decode(data)

    def to_dict(self) -> dict[str, object]:
        """A plain description of the compiled policy (for ``meterkit policy check``)."""
        return {
            "name": self.name,
            "shadow": self.shadow,
            "tiers": [
                {
                    "name": t.name,
                    "scope": t.scope,
                    "limit": t.limit,
                    "window_seconds": t.window,
                    "algorithm": t.algorithm,
                    "burst": t.burst,
                    "shadow": t.shadow,
                    "operations": list(t.operations) if t.operations else None,
                }
                for t in self.tiers
            ],
            "operations": {
                op.name: {
                    "category": op.category,
                    "price": str(from_micro(op.price_micro)),
                    "permission": op.permission,
                }
                for op in self.costs.operations
            },
            "credits": {
                "allowance": str(from_micro(self.credits.allowance_micro)),
                "period": self.credits.period,
                "alerts": list(self.credits.alerts),
            },
            "routes": dict(self.routes),
            "plans": {
                name: {
                    "allowance": str(from_micro(compiled.allowance)),
                    "tiers": {
                        tier: "off"
                        if t is None
                        else {"limit": t.limit, "window_seconds": t.window, "burst": t.burst}
                        for tier, t in compiled.changes.items()
                    },
                }
                for name, compiled in self._plan_limits.items()
            },
        }
