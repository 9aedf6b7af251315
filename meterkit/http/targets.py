"""Where the organization and the caller of a request come from, and what it costs:
the ``org``, ``caller`` and ``cost`` options, compiled once into the :class:`Target`
of each operation."""

from __future__ import annotations

import re
from collections.abc import Callable, Container, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from meterkit.core.credits import to_micro
from meterkit.errors import (
    ConfigurationError,
    InvalidAmountError,
)

if TYPE_CHECKING:
    pass

# -- where the organization and the caller come from ------------------------------------

# A source is (kind, argument): how a value is read from a request.
KEY = 0  # org: the authenticated key's own; caller: the bearer key
SEGMENT = 1  # a path segment of a table route (argument: its index)
PARAM = 2  # a path parameter by name (the framework's, or a table route's)
HEADER = 3  # a header by (lower-cased) name
CALL = 4  # a callable of the RequestView
IP = 5  # caller: the client's address, behind trusted proxies
AUTO = 6  # org: {organization_id} of a table route when it has one, else the key

Source = tuple[int, Any]
DEFAULT: Any = object()


def _source(spec: object, what: str, allowed: tuple[str, ...]) -> Source:
    """A ``"key"``/``"ip"``/``"path:<param>"``/``"header:<name>"`` spec or a callable, parsed."""
    if callable(spec):
        return (CALL, spec)
    if isinstance(spec, str):
        kind, _, name = spec.partition(":")
        if kind in allowed:
            if kind == "key" and not name:
                return (KEY, None)
            if kind == "ip" and not name:
                return (IP, None)
            if kind == "path" and name.isidentifier():
                return (PARAM, name)
            if kind == "header" and re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
                return (HEADER, name.lower())
    shapes = ", ".join(
        {"key": "'key'", "ip": "'ip'", "path": "'path:<param>'", "header": "'header:<name>'"}[k]
        for k in allowed
    )
    raise ConfigurationError(f"is one of {shapes} or a callable of the request, not {spec!r}", what)


def org_source(spec: object, what: str = "org") -> Source:
    if spec is None:
        return (AUTO, None)
    return _source(spec, what, ("key", "path", "header"))


def caller_source(spec: object, what: str = "caller") -> Source:
    return _source(spec, what, ("key", "ip", "header"))


def cost_of(spec: object, what: str = "cost") -> Any:
    """None (the table price), a callable of the request, or a fixed amount (checked now)."""
    if spec is None or callable(spec):
        return spec
    try:
        to_micro(spec, what)
    except InvalidAmountError as exc:
        raise ConfigurationError(str(exc), what) from None
    return spec


_T = TypeVar("_T")


def per_operation(
    spec: object, operations: Container[str], what: str, parse: Callable[[object, str], _T]
) -> tuple[_T | None, dict[str, _T]]:
    """An option given once, or per operation as a mapping (``"*"``: the others)."""
    if not isinstance(spec, Mapping):
        return parse(spec, what), {}
    default = None
    chosen: dict[str, _T] = {}
    for name, value in spec.items():
        if name == "*":
            default = parse(value, f"{what}['*']")
        elif isinstance(name, str) and name in operations:
            chosen[name] = parse(value, f"{what}[{name!r}]")
        else:
            raise ConfigurationError(f"unknown operation {name!r}", what)
    return default, chosen


class Target:
    """One metered operation as a request reaches it, compiled once: the operation and
    its permission, where its organization and caller come from, and its cost."""

    __slots__ = ("by_key", "caller", "cost", "operation", "org", "permission")

    def __init__(
        self, operation: str, permission: str | None, org: Source, caller: Source, cost: Any
    ) -> None:
        self.operation = operation
        self.permission = permission
        self.org = org
        self.caller = caller
        #: The caller is the bearer key, authenticated by the key store.
        self.by_key = caller[0] == KEY
        self.cost = cost

    def __repr__(self) -> str:
        return f"Target({self.operation!r})"
