"""A policy's TOML file: its shape, checked field by field as msgspec decodes it; the
:class:`~meterkit.core.policy.Policy` it builds; and the line of the file that a
policy error points to, as ``meterkit policy check`` prints it
(``policy.toml:121: invalid policy: routes.'GET /usage': …``).

It reads no file: :meth:`Policy.from_toml` hands it the text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal, TypeVar

import msgspec

from meterkit.core.policy import (
    Algorithm,
    Category,
    CostTable,
    CreditPlan,
    CustomerPlan,
    Operation,
    Policy,
    Scope,
    Tier,
    TierChange,
)
from meterkit.errors import ConfigurationError

__all__ = ["PolicySpec", "decode", "error_line", "locate"]


def decode(data: str | bytes) -> Policy:
    """The policy of TOML ``data``; every mistake raises :class:`ConfigurationError`
    naming where it is, e.g. ``tiers[2].rate: malformed rate 'often'``."""
    try:
        spec = msgspec.toml.decode(data, type=PolicySpec)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$")
        raise ConfigurationError(message, where.rstrip("`").lstrip(".")) from None
    except msgspec.DecodeError as exc:
        raise ConfigurationError(f"malformed TOML: {exc}") from None
    except RecursionError:
        raise ConfigurationError("malformed TOML: nested too deeply") from None
    return spec.build()


# -- the file's shape ----------------------------------------------------------------


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
    alerts: list[str | int] = []


class _TierChangeSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    rate: str
    burst: int | None = None
    algorithm: Algorithm | None = None


class _PlanSpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    allowance: str | int | float | None = None
    tiers: dict[str, str | _TierChangeSpec] = {}

    def build(self, name: str) -> CustomerPlan:
        changes: dict[str, TierChange] = {}
        for tier, change in self.tiers.items():
            if isinstance(change, str):
                changes[tier] = change
            else:
                table: dict[str, object] = {"rate": change.rate}
                if change.burst is not None:
                    table["burst"] = change.burst
                if change.algorithm is not None:
                    table["algorithm"] = change.algorithm
                changes[tier] = table
        return CustomerPlan(name, changes, self.allowance)


class PolicySpec(_Spec, kw_only=True, forbid_unknown_fields=True):
    name: str = "custom"
    shadow: bool = False
    credits: _CreditsSpec
    tiers: list[_TierSpec] = []
    categories: dict[str, _CategorySpec]
    operations: dict[str, _OperationSpec]
    routes: dict[str, str] = {}
    plans: dict[str, _PlanSpec] = {}

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
        credits = _located(
            "credits", lambda: CreditPlan(self.credits.allowance, alerts=self.credits.alerts)
        )
        plans = [_located(f"plans.{name}", p.build, name) for name, p in self.plans.items()]
        return Policy(
            tiers,
            costs,
            credits,
            shadow=self.shadow,
            name=self.name,
            routes=self.routes,
            plans=plans,
        )


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


# -- where in a TOML file a policy error is ------------------------------------------


def _split_dotted(header: str) -> list[str]:
    """``operations."invoices.pdf"`` -> ``["operations", "invoices.pdf"]``."""
    parts: list[str] = []
    for match in re.finditer(r'\s*("(?:[^"\\]|\\.)*"|\'[^\']*\'|[^.\s]+)\s*(?:\.|$)', header):
        token = match.group(1)
        parts.append(token[1:-1] if token[:1] in "\"'" else token)
    return parts


def locate(text: str, location: str) -> int | None:
    """The line (1-based) of ``text`` that a policy error's ``location`` points to.

    ``location`` is what :class:`ConfigurationError` names: ``tiers[2].rate``,
    ``operations.invoices.pdf.price``, ``credits.allowance``, ``name``. Table headers
    are matched first, then the key inside the table. None when not found (a policy
    written with inline tables, say).
    """
    if not location:
        return None
    lines = text.splitlines()
    # (location prefix of the table, first line index, end line index)
    tables: list[tuple[str, int, int]] = [("", 0, len(lines))]
    counts: dict[str, int] = {}
    for number, line in enumerate(lines):
        stripped = line.strip()
        match = re.match(r"^(\[\[?)\s*(.+?)\s*\]\]?\s*(#.*)?$", stripped)
        if not match:
            continue
        name = ".".join(_split_dotted(match.group(2)))
        if match.group(1) == "[[":
            index = counts.get(name, 0)
            counts[name] = index + 1
            name = f"{name}[{index}]"
        prev = tables[-1]
        tables[-1] = (prev[0], prev[1], number)
        tables.append((name, number, len(lines)))
    best: tuple[str, int, int] | None = None
    for table in tables:
        prefix = table[0]
        inside = (
            prefix == "" or location == prefix or location.startswith((prefix + ".", prefix + "["))
        )
        if inside and (best is None or len(prefix) > len(best[0])):
            best = table
    if best is None:
        return None
    prefix, first, end = best
    rest = location[len(prefix) :].lstrip(".")
    if not rest:
        return first + 1
    key = re.split(r"[.\[]", rest, maxsplit=1)[0] if rest[:1] not in "'\"" else rest
    key = key.strip("'\"")
    pattern = re.compile(r'^\s*(?:"' + re.escape(key) + r'"|' + re.escape(key) + r")\s*=")
    for number in range(first, end):
        if pattern.match(lines[number]):
            return number + 1
    return first + 1 if prefix else None


def _resolve_entry(text: str, exc: ConfigurationError) -> str:
    """Name the table entry msgspec shows as ``[...]``: ``operations[...].price`` becomes
    ``operations.invoices.pdf.price``, found by validating one entry at a time."""
    head, _, rest = exc.location.partition("[...]")
    try:
        data = msgspec.toml.decode(text)
    except msgspec.DecodeError:
        return exc.location
    table = data.get(head) if isinstance(data, dict) else None
    if not isinstance(table, dict):
        return exc.location
    for name, entry in table.items():
        try:
            msgspec.convert({**data, head: {name: entry}}, PolicySpec)
        except msgspec.ValidationError as err:
            if str(err).partition(" - at `$")[0] == exc.detail:
                return f"{head}.{name}{rest}"
    return exc.location


def error_line(text: str, exc: ConfigurationError) -> tuple[str, int | None]:
    """Where in ``text`` the policy error ``exc`` is: its location, with the name of
    a table entry that msgspec shows as ``[...]`` filled in, and the line (1-based;
    None when it cannot be found)."""
    location = exc.location
    if "[...]" in location:
        location = _resolve_entry(text, exc)
    unknown = re.search(r"unknown field `([^`]+)`", exc.detail)
    line = locate(text, f"{location}.{unknown.group(1)}".lstrip(".")) if unknown else None
    line = line or locate(text, location)
    if line is None:  # a TOML syntax error names its line in its message
        match = re.search(r"\(at line (\d+), column \d+\)", exc.detail)
        line = int(match.group(1)) if match else None
    return location, line
