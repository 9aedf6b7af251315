"""The route table (``"METHOD /path/{param}" = operation``), compiled once into a trie
that matches a request without a regular expression: :class:`Router`."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from meterkit.core.routes import ORG_PARAM, check_routes, parse_route, route_params
from meterkit.http.targets import KEY, SEGMENT, Target

if TYPE_CHECKING:
    from meterkit.core.policy import Policy

# -- the route table ---------------------------------------------------------------------


class Route:
    """One entry of the route table: a method and path template, and its target."""

    __slots__ = ("method", "operation", "params", "permission", "target", "template")

    def __init__(
        self, method: str, template: str, target: Target, params: Mapping[str, int]
    ) -> None:
        self.method = method
        self.template = template
        self.target = target
        self.operation = target.operation
        self.permission = target.permission
        #: Each path parameter and its place in ``path.split("/")``.
        self.params = params

    def __repr__(self) -> str:
        return f"Route({self.method} {self.template} -> {self.operation})"


class _Node:
    """A trie node: literal children by segment, one parameter child, routes by method."""

    __slots__ = ("literal", "param", "routes")

    def __init__(self) -> None:
        self.literal: dict[str, _Node] = {}
        self.param: _Node | None = None
        self.routes: dict[str, Route] = {}


class Router:
    """A route table compiled once into a trie of path segments.

    Matching splits the path on ``/`` and walks the trie, preferring a literal segment
    to a parameter (``/invoices/export`` before ``/invoices/{invoice_id}``). No regular
    expression runs per request. ``HEAD`` falls back to the ``GET`` route. The table
    is checked as a :class:`~meterkit.core.policy.Policy` checks it (one validation).
    """

    __slots__ = ("_heads", "_org_prefixes", "_root", "routes")

    def __init__(
        self,
        routes: Mapping[str, str],
        policy: Policy,
        target: Callable[[str, Mapping[str, int]], Target] | None = None,
    ) -> None:
        operations = policy.operations
        check_routes(routes, operations)
        self._root = _Node()
        self.routes: list[Route] = []
        prefixes: set[tuple[str, ...]] = set()
        heads: set[str] = set()
        for spec, operation in routes.items():
            method, template, segments = parse_route(spec)
            params = route_params(segments)
            if target is None:
                org = (SEGMENT, params[ORG_PARAM]) if ORG_PARAM in params else (KEY, None)
                found = Target(operation, operations[operation].permission, org, (KEY, None), None)
            else:
                found = target(operation, params)
            if ORG_PARAM in params:
                prefixes.add(tuple(segments[: params[ORG_PARAM] - 1]))
            # ("" stands for a route whose first segment is a parameter: every path)
            heads.add("" if segments[0].startswith("{") else segments[0])
            node = self._root
            for seg in segments:
                if seg.startswith("{"):
                    if node.param is None:
                        node.param = _Node()
                    node = node.param
                else:
                    node = node.literal.setdefault(seg, _Node())
            route = Route(method, template, found, params)
            node.routes[method] = route
            self.routes.append(route)
        # Where an organization id sits in paths of this API: ("organizations",) for
        # /organizations/{organization_id}/...; used for paths that match no route.
        self._org_prefixes = tuple(sorted(prefixes, key=len))
        self._heads = frozenset(heads)

    def match(self, method: str, segments: list[str]) -> Route | None:
        """The route of ``method`` on this path (``segments`` = ``path.split("/")``)."""
        # The common case first, without recursion: follow literals where they exist,
        # else the parameter. Only a dead end needs the backtracking walk.
        node = self._root
        for seg in itertools.islice(segments, 1, None):
            child = node.literal.get(seg)
            if child is None:
                child = node.param if seg else None
                if child is None:
                    break
            node = child
        else:
            route = node.routes.get(method)
            if route is not None:
                return route
        found = _walk(self._root, segments, 1, method)
        if found is None:
            if method != "HEAD":
                return None
            method = "GET"
            found = _walk(self._root, segments, 1, method)
            if found is None:
                return None
        return found.routes[method]

    def allowed(self, segments: list[str]) -> list[str]:
        """The methods routed on this path (for a 405's ``Allow``); empty when none."""
        node = _walk(self._root, segments, 1, None)
        if node is None:
            return []
        methods = set(node.routes)
        if "GET" in methods:
            methods.add("HEAD")
        return sorted(methods)

    def org_of(self, segments: list[str]) -> str | None:
        """The organization id in a path that matches no route, if it has one."""
        for prefix in self._org_prefixes:
            n = len(prefix)
            if len(segments) > n + 1 and tuple(segments[1 : n + 1]) == prefix:
                return segments[n + 1] or None
        return None

    def owns(self, segments: list[str]) -> bool:
        """Whether a path is under the API's routes (its first segment starts one)."""
        heads = self._heads
        return "" in heads or (len(segments) > 1 and segments[1] in heads)


def _walk(node: _Node, segments: list[str], i: int, method: str | None) -> _Node | None:
    """The trie node of the path, for ``method`` (or for any method when None)."""
    if i == len(segments):
        if method is None:
            return node if node.routes else None
        return node if method in node.routes else None
    seg = segments[i]
    child = node.literal.get(seg)
    if child is not None:
        found = _walk(child, segments, i + 1, method)
        if found is not None:
            return found
    if node.param is not None and seg:
        return _walk(node.param, segments, i + 1, method)
    return None
