"""The route table's rules (``[routes]``: ``"METHOD /path/{param}" = operation``),
checked when a :class:`~meterkit.core.policy.Policy` is made, so that a policy that
loads is one the HTTP middleware accepts: one validation, for ``Policy``, ``meterkit
policy check`` and the gate alike. Pure: no I/O.

A route need not name an organization: where the organization comes from (the key,
a path parameter, a header, a callable) is the middleware's choice, and a choice that
a table cannot serve (``org="path:project_id"`` on a route without ``{project_id}``)
is refused when the middleware is built, naming the route.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Final

from meterkit.errors import ConfigurationError

__all__ = ["ORG_PARAM", "check_routes", "parse_route", "route_params"]

#: The path parameter that names the organization in the seed's routes: a route that
#: has it takes its organization from there unless the middleware says otherwise.
ORG_PARAM: Final = "organization_id"
_METHOD_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def parse_route(spec: str) -> tuple[str, str, list[str]]:
    """``(method, template, segments)`` of ``"GET /a/{b}"``, or the error saying why not."""
    method, _, template = spec.strip().partition(" ")
    template = template.strip()
    where = f"routes.{spec!r}"
    if not method or not set(method) <= _METHOD_CHARS:
        raise ConfigurationError(
            f"a route is 'METHOD /path/{{param}}', with the method in capitals, got {spec!r}",
            where,
        )
    if not template.startswith("/") or "?" in template or "#" in template:
        raise ConfigurationError(f"a route's path starts with '/', got {template!r}", where)
    segments = template.split("/")[1:]
    names: set[str] = set()
    for seg in segments:
        if not seg:
            raise ConfigurationError(f"empty segment in {template!r}", where)
        if seg.startswith("{") or seg.endswith("}") or "{" in seg or "}" in seg:
            name = seg[1:-1]
            if not (seg.startswith("{") and seg.endswith("}")) or not name.isidentifier():
                raise ConfigurationError(
                    f"a parameter is a whole segment such as {{invoice_id}}, got {seg!r}", where
                )
            if name in names:
                raise ConfigurationError(f"parameter {{{name}}} appears twice", where)
            names.add(name)
    return method, template, segments


def route_params(segments: list[str]) -> dict[str, int]:
    """Each parameter of a parsed template and its place in ``path.split("/")`` (the
    empty string before the leading slash is place 0)."""
    return {seg[1:-1]: i + 1 for i, seg in enumerate(segments) if seg.startswith("{")}


def check_routes(routes: Mapping[str, str], operations: Container[str]) -> None:
    """Refuse a route table the middleware could not serve: a malformed route, an
    unknown operation, or one method and path routed twice (parameter names aside)."""
    seen: dict[tuple[str, tuple[str, ...]], str] = {}
    for spec, operation in routes.items():
        where = f"routes.{spec!r}"
        if not isinstance(spec, str) or not isinstance(operation, str):
            raise ConfigurationError("a route is a string mapped to an operation's name", where)
        method, template, segments = parse_route(spec)
        if operation not in operations:
            raise ConfigurationError(f"unknown operation {operation!r}", where)
        shape = (method, tuple("{}" if seg.startswith("{") else seg for seg in segments))
        if shape in seen:
            raise ConfigurationError(
                f"{method} {template} is routed twice (also as {seen[shape]})", where
            )
        seen[shape] = template
