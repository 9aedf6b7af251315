"""Policies: rate tiers, a cost table and a credit plan, validated and compiled once.

A :class:`Policy` is data. Building one validates everything and precomputes what
the hot path needs — windows and emission intervals in integer microseconds, prices
in micro-credits, the tiers that apply to each operation — so a check only looks
things up.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, TypeVar

import limits
import msgspec

from meterkit.core.credits import MAX_MICRO, from_micro, to_micro
from meterkit.core.routes import check_routes
from meterkit.errors import (
    ConfigurationError,
    InvalidAmountError,
    UnknownOperationError,
)

__all__ = [
    "ALGORITHMS",
    "Category",
    "CostTable",
    "CreditPlan",
    "Operation",
    "Policy",
    "Tier",
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
        if not isinstance(self.name, str) or not _NAME.match(self.name):
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
        if not isinstance(self.name, str) or not _NAME.match(self.name):
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
        if not isinstance(self.name, str) or not _OP_NAME.match(self.name):
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
    """Credits granted to each organization per calendar month (UTC), no rollover."""

    allowance: Amount | object
    period: Literal["month"] = "month"
    allowance_micro: int = field(init=False)

    def __post_init__(self) -> None:
        if self.period != "month":
            raise ConfigurationError("the only credit period is 'month'", "period")
        object.__setattr__(self, "allowance_micro", _micro(self.allowance, "allowance"))


def enforces(tier: Tier, policy_shadow: bool) -> bool:
    """Whether ``tier``'s "no" denies a request: the one rule every backend applies.
    A shadow tier, or any tier of a shadow policy, is computed and reported only."""
    return not (tier.shadow or policy_shadow)


class OperationPlan:
    """What a check of one operation needs, precomputed: price, tiers, header text."""

    __slots__ = (
        "category",
        "header_limits",
        "header_names",
        "name",
        "policy_header",
        "price",
        "price_text",
        "tier_index",
        "tiers",
    )

    def __init__(self, op: Operation, tiers: tuple[Tier, ...], indexes: tuple[int, ...]) -> None:
        self.name = op.name
        self.category = op.category
        self.price = op.price_micro
        self.tiers = tiers
        self.tier_index = indexes
        # Each tier's real quota and window; a gcra tier's bucket is a vendor parameter
        # (draft-ietf-httpapi-ratelimit-headers asks for a prefix on those).
        self.policy_header = ", ".join(
            f'"{t.name}";q={t.limit};w={t.window}'
            + (f";meterkit-burst={t.burst}" if t.algorithm == "gcra" else "")
            for t in tiers
        )
        # Fragments of Decision.headers, so that rendering them only formats integers.
        self.header_names = tuple(f'"{t.name}";r=' for t in tiers)
        self.header_limits = tuple(str(t.limit) for t in tiers)
        self.price_text = str(from_micro(op.price_micro))


class Policy:
    """Rate tiers, a cost table and a credit plan, validated and compiled once.

    Build one in code, load one with :meth:`from_toml`, or take the seed's with
    :meth:`crane_ledger`. A policy is immutable; the meter and its backends share it.
    """

    __slots__ = ("_plans", "costs", "credits", "name", "routes", "shadow", "tiers")

    def __init__(
        self,
        tiers: Sequence[Tier],
        costs: CostTable,
        credits: CreditPlan,
        *,
        shadow: bool = False,
        name: str = "custom",
        routes: Mapping[str, str] | None = None,
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
        plans: dict[str, OperationPlan] = {}
        for op in costs.operations:
            applies = [
                (i, t)
                for i, t in enumerate(tiers)
                if t.operations is None or op.name in t.operations
            ]
            plans[op.name] = OperationPlan(
                op, tuple(t for _, t in applies), tuple(i for i, _ in applies)
            )
        self._plans = plans

    def __repr__(self) -> str:
        return (
            f"Policy(name={self.name!r}, tiers={[t.name for t in self.tiers]}, "
            f"operations={len(self._plans)}, allowance={from_micro(self.credits.allowance_micro)})"
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
        try:
            spec = msgspec.toml.decode(data, type=_PolicySpec)
        except msgspec.ValidationError as exc:
            message, _, where = str(exc).partition(" - at `$")
            raise ConfigurationError(message, where.rstrip("`").lstrip(".")) from None
        except msgspec.DecodeError as exc:
            raise ConfigurationError(f"malformed TOML: {exc}") from None
        except RecursionError:
            raise ConfigurationError("malformed TOML: nested too deeply") from None
        return spec.build()

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
            },
            "routes": dict(self.routes),
        }


# -- the TOML file's shape ---------------------------------------------------------


class _Spec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class _TierSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    name: str
    scope: Scope
    rate: str
    algorithm: Algorithm = "fixed_window"
    burst: int | None = None
    shadow: bool = False
    operations: list[str] | None = None


class _CategorySpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    min: str | int | float
    max: str | int | float
    description: str = ""


class _OperationSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    category: str
    price: str | int | float
    description: str = ""
    permission: str | None = None


class _CreditsSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    allowance: str | int | float
    period: Literal["month"] = "month"


class _PolicySpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    name: str = "custom"
    shadow: bool = False
    credits: _CreditsSpec
    tiers: list[_TierSpec] = []
    categories: dict[str, _CategorySpec]
    operations: dict[str, _OperationSpec]
    routes: dict[str, str] = {}

    def build(self) -> Policy:
        tiers = [_located(f"tiers[{i}]", _tier, t) for i, t in enumerate(self.tiers)]
        categories = tuple(
            _located(f"categories.{name}", _category, name, c)
            for name, c in self.categories.items()
        )
        operations = tuple(
            _located(f"operations.{name}", _operation, name, o)
            for name, o in self.operations.items()
        )
        try:
            costs = CostTable(categories, operations)
        except ConfigurationError as exc:
            # CostTable counts operations by position; the file names them.
            raise _renamed(exc, [o.name for o in operations]) from None
        credits = _located("credits", lambda: CreditPlan(self.credits.allowance))
        return Policy(tiers, costs, credits, shadow=self.shadow, name=self.name, routes=self.routes)


def _tier(t: _TierSpec) -> Tier:
    ops = tuple(t.operations) if t.operations is not None else None
    return Tier(t.name, t.scope, t.rate, t.algorithm, t.burst, t.shadow, ops)


def _category(name: str, c: _CategorySpec) -> Category:
    return Category(name, c.min, c.max, c.description)


def _operation(name: str, o: _OperationSpec) -> Operation:
    return Operation(name, o.category, o.price, o.description, o.permission)


_T = TypeVar("_T")


def _located(where: str, build: Callable[..., _T], *args: object) -> _T:
    try:
        return build(*args)
    except ConfigurationError as exc:
        raise exc.at(where) from None


def _renamed(exc: ConfigurationError, names: list[str]) -> ConfigurationError:
    match = re.match(r"operations\[(\d+)\](.*)", exc.location)
    if not match:
        return exc
    where = f"operations.{names[int(match.group(1))]}{match.group(2)}"
    return ConfigurationError(exc.detail, where)
