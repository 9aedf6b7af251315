"""The HTTP side of metering, written once: a request gate that does no I/O.

:mod:`meterkit.http.asgi` and :mod:`meterkit.http.wsgi` are thin shells around :class:`Gate`.
A shell reads the few things the gate needs out of its server's request (method,
path, scheme, peer address, three headers), and the gate answers with one of:

- ``None``: the request is not metered (an excluded path); run the app untouched;
- a :class:`Response`: refuse now (plain HTTP, no such route, a malformed header);
- a :class:`Pending` request: authenticate ``pending.authorization`` for
  ``pending.org`` with ``pending.permission``, then ask :meth:`Gate.unrouted` whether
  the path has an operation, then check ``pending.operation`` with the meter.

The shell makes those two calls — blocking or awaited, the only difference between
the shells — and hands any meterkit error to :meth:`Gate.failure`, a decision to
:meth:`Gate.refusal` (a denial) or :meth:`Gate.admitted_headers` (the headers to add
to the app's response), and the app's status to :meth:`Gate.refunds`.

Per request, in this order: excluded paths pass; HTTPS is required; the route is
looked up (a trie compiled once from ``policy.routes``); the key is authenticated
for the path's organization with the operation's permission; unknown routes of an
authenticated caller get 404 (405 when only the method is wrong); the meter admits
and charges, or refuses with the seed's body, status and headers.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
from collections.abc import Container, Iterable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final

import msgspec

from meterkit.core.credits import from_micro
from meterkit.core.routes import ORG_PARAM, parse_route
from meterkit.errors import (
    AuthenticationError,
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    InvalidIdentifierError,
    InvalidRequestError,
    MeterkitError,
)

if TYPE_CHECKING:
    from meterkit.core.decision import Decision
    from meterkit.core.policy import Policy

__all__ = ["REFUNDED", "Admission", "Gate", "Pending", "Response", "Route", "Router"]

logger = logging.getLogger("meterkit")

_MAX_IDEMPOTENCY_KEY: Final = 256
_encode = msgspec.json.Encoder().encode
JSON: Final = ("Content-Type", "application/json")


def error_body(type_: str, code: str, message: str, status: int) -> bytes:
    """A JSON error body in the seed's shape."""
    return _encode({"error": {"type": type_, "code": code, "message": message, "status": status}})


HTTPS_REQUIRED_BODY: Final = error_body(
    "invalid_request_error", "https_required", "All API requests must be made over HTTPS.", 403
)
NOT_FOUND_BODY: Final = error_body(
    "invalid_request_error", "not_found", "No API endpoint matches this path.", 404
)
METHOD_NOT_ALLOWED_BODY: Final = error_body(
    "invalid_request_error",
    "method_not_allowed",
    "This API endpoint does not accept this HTTP method.",
    405,
)
INVALID_IDEMPOTENCY_KEY_BODY: Final = error_body(
    "invalid_request_error",
    "invalid_idempotency_key",
    "The Idempotency-Key header must be 1 to 256 printable characters without commas, sent once.",
    400,
)
IDEMPOTENCY_KEY_REUSED_BODY: Final = error_body(
    "invalid_request_error",
    "idempotency_key_reused",
    "This Idempotency-Key was already used for a different request.",
    422,
)
INVALID_REQUEST_BODY: Final = error_body(
    "invalid_request_error", "invalid_request", "The request could not be processed.", 400
)
UNAVAILABLE_BODY: Final = error_body(
    "api_error",
    "service_unavailable",
    "The API is temporarily unavailable. Try again shortly.",
    503,
)


class Response:
    """An answer the gate gives in the app's place: status, headers, JSON body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"Response(status={self.status}, body={self.body!r})"

    @property
    def status_line(self) -> str:
        """``"403 Forbidden"``: the status as WSGI spells it."""
        return status_line(self.status)


_STATUS_LINES = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}


def status_line(status: int) -> str:
    """The WSGI status line of ``status`` (``"429 Too Many Requests"``)."""
    line = _STATUS_LINES.get(status)
    return line if line is not None else f"{status} Unknown"


def _fixed(status: int, body: bytes, *extra: tuple[str, str]) -> Response:
    return Response(status, [JSON, ("Content-Length", str(len(body))), *extra], body)


class Route:
    """One entry of ``policy.routes``: a method and path template, and its operation."""

    __slots__ = ("method", "operation", "org_index", "permission", "template")

    def __init__(
        self, method: str, template: str, operation: str, permission: str | None, org_index: int
    ) -> None:
        self.method = method
        self.template = template
        self.operation = operation
        self.permission = permission
        #: Which ``/``-separated segment of the path (0 is the empty one before the
        #: leading slash) holds the organization id.
        self.org_index = org_index

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
    """``policy.routes`` compiled once into a trie of path segments.

    Matching splits the path on ``/`` and walks the trie, preferring a literal segment
    to a parameter (``/invoices/export`` before ``/invoices/{invoice_id}``). No regular
    expression runs per request. ``HEAD`` falls back to the ``GET`` route.
    """

    __slots__ = ("_org_prefixes", "_root", "routes")

    def __init__(self, routes: Mapping[str, str], policy: Policy) -> None:
        operations = policy.operations
        self._root = _Node()
        self.routes: list[Route] = []
        prefixes: set[tuple[str, ...]] = set()
        for spec, operation in routes.items():
            method, template, segments = parse_route(spec)
            op = operations.get(operation)
            if op is None:
                raise ConfigurationError(f"unknown operation {operation!r}", f"routes.{spec!r}")
            org_index = segments.index("{" + ORG_PARAM + "}") + 1
            prefixes.add(tuple(segments[: org_index - 1]))
            node = self._root
            for seg in segments:
                if seg.startswith("{"):
                    if node.param is None:
                        node.param = _Node()
                    node = node.param
                else:
                    node = node.literal.setdefault(seg, _Node())
            # (a method and template routed twice was refused by the Policy itself)
            route = Route(method, template, operation, op.permission, org_index)
            node.routes[method] = route
            self.routes.append(route)
        # Where an organization id sits in paths of this API: ("organizations",) for
        # /organizations/{organization_id}/...; used for paths that match no route.
        self._org_prefixes = tuple(sorted(prefixes, key=len))

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


class _Proxies:
    """Addresses whose ``X-Forwarded-Proto`` is believed: IPs, networks, or ``*``."""

    __slots__ = ("addresses", "anyone", "networks")

    def __init__(self, trusted: Iterable[str]) -> None:
        if isinstance(trusted, str):
            trusted = [trusted]
        if not isinstance(trusted, Iterable):
            raise ConfigurationError(
                "trusted_proxies is a list of IP addresses or networks", "trusted_proxies"
            )
        self.anyone = False
        self.addresses: set[str] = set()
        networks = []
        for i, entry in enumerate(trusted):
            if not isinstance(entry, str):
                raise ConfigurationError(
                    f"a trusted proxy is an IP address or network, not {entry!r}",
                    f"trusted_proxies[{i}]",
                )
            entry = entry.strip()
            if entry == "*":
                self.anyone = True
                continue
            try:
                if "/" in entry:
                    networks.append(ipaddress.ip_network(entry, strict=False))
                else:
                    # Both the given spelling and the canonical one, for a set lookup.
                    self.addresses.add(entry)
                    self.addresses.add(str(ipaddress.ip_address(entry)))
            except ValueError:
                raise ConfigurationError(
                    f"{entry!r} is not an IP address or network", f"trusted_proxies[{i}]"
                ) from None
        self.networks = tuple(networks)

    def __contains__(self, peer: str | None) -> bool:
        if peer is None:
            return False
        if self.anyone or peer in self.addresses:
            return True
        if not self.networks:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self.networks)


def forwarded_https(value: str) -> bool:
    """Whether every proxy hop listed in ``X-Forwarded-Proto`` says ``https``.

    A chain such as ``https, http`` is refused: some hop spoke plain HTTP, or a client
    made up the first value, and either way the request cannot be called secure.
    """
    return all(part.strip().lower() == "https" for part in value.split(","))


def _exclusions(exclude: Iterable[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    if isinstance(exclude, str):
        exclude = [exclude]
    if not isinstance(exclude, Iterable):
        raise ConfigurationError("exclude is a list of paths", "exclude")
    exact: set[str] = set()
    prefixes: list[str] = []
    for i, path in enumerate(exclude):
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigurationError(
                f"an excluded path starts with '/' (add '*' for a prefix), not {path!r}",
                f"exclude[{i}]",
            )
        if path.endswith("*"):
            prefixes.append(path[:-1])
        else:
            exact.add(path)
    return frozenset(exact), tuple(prefixes)


class Pending:
    """A request to authenticate and check: what the shell passes to the key store and meter."""

    __slots__ = (
        "authorization",
        "idempotency_key",
        "method",
        "operation",
        "org",
        "permission",
        "segments",
    )

    def __init__(
        self,
        org: str,
        route: Route | None,
        authorization: str | bytes | None,
        idempotency_key: str | None,
        method: str,
        segments: list[str],
    ) -> None:
        self.org = org
        self.authorization = authorization
        self.idempotency_key = idempotency_key
        self.method = method
        self.segments = segments
        #: None when no route matches: the caller is still authenticated, then refused.
        self.operation = route.operation if route is not None else None
        self.permission = route.permission if route is not None else None


class Admission:
    """What the middleware learnt about an admitted request, for the app to read.

    The ASGI middleware puts it in ``scope["meterkit"]`` (and ``request.state.meterkit``
    in Starlette and FastAPI); the WSGI one in ``environ["meterkit"]``.
    """

    __slots__ = ("decision", "key")

    def __init__(self, key: Any, decision: Decision) -> None:
        #: The authenticated :class:`~meterkit.ApiKey` (id, org, mode, permissions, …).
        self.key = key
        #: The meter's :class:`~meterkit.Decision`: operation, credits charged and left, …
        self.decision = decision

    def __repr__(self) -> str:
        return f"Admission(key={self.key.id!r}, operation={self.decision.operation!r})"


# Invalid marker for a header sent more than once where once is the rule.
DUPLICATE: Final = "\x00"


#: The statuses refunded by default: what the app refused to serve (404 not found, 405
#: method not allowed, 422 unreadable body: a framework's own answers) and its failures.
REFUNDED: frozenset[int] = frozenset({404, 405, 422, *range(500, 600)})


class Gate:
    """Everything the middlewares decide, for one policy and one set of options.

    ``trusted_proxies``: addresses (or networks, or ``"*"``) whose ``X-Forwarded-Proto``
    is believed, for servers that do not rewrite the scheme themselves.
    ``exclude``: paths that are not metered at all (``"/health"``, or ``"/docs*"`` for a
    prefix); they skip HTTPS, authentication and metering.
    ``refund_statuses``: app answers whose credits are returned (default
    :data:`REFUNDED`: 404, 405 and 422, which the framework gives a request the app did
    not serve or could not read, and every 5xx; ``()`` never refunds).
    ``require_https=False`` is for local development only.
    """

    __slots__ = (
        "_excluded",
        "_excluded_prefixes",
        "_proxies",
        "refund_statuses",
        "require_https",
        "router",
    )

    def __init__(
        self,
        policy: Policy,
        *,
        trusted_proxies: Iterable[str] = (),
        exclude: Iterable[str] = (),
        refund_statuses: Container[int] = REFUNDED,
        require_https: bool = True,
    ) -> None:
        if not policy.routes:
            raise ConfigurationError(
                "the policy has no routes: add a [routes] table mapping "
                "'METHOD /organizations/{organization_id}/…' to operations",
                "routes",
            )
        if not isinstance(require_https, bool):
            raise ConfigurationError("require_https is true or false", "require_https")
        if not isinstance(refund_statuses, Container):
            raise ConfigurationError(
                "refund_statuses is a collection of HTTP statuses, such as range(500, 600)",
                "refund_statuses",
            )
        self.router = Router(policy.routes, policy)
        self._proxies = _Proxies(trusted_proxies)
        self._excluded, self._excluded_prefixes = _exclusions(exclude)
        self.refund_statuses = refund_statuses
        self.require_https = require_https

    # -- before the key store -------------------------------------------------------------

    def begin(
        self,
        method: str,
        path: str,
        scheme: str,
        peer: str | None,
        forwarded_proto: str | None,
        authorization: str | bytes | None,
        idempotency_key: str | None,
    ) -> Response | Pending | None:
        """Excluded (None), refused at once (a Response), or to authenticate (Pending)."""
        if path in self._excluded or (
            self._excluded_prefixes and path.startswith(self._excluded_prefixes)
        ):
            return None
        if (
            scheme != "https"
            and self.require_https
            and not (
                forwarded_proto is not None
                and peer in self._proxies
                and forwarded_https(forwarded_proto)
            )
        ):
            return _fixed(403, HTTPS_REQUIRED_BODY)
        segments = path.split("/")
        route = self.router.match(method, segments)
        if route is not None:
            org = segments[route.org_index]
        else:
            found = self.router.org_of(segments)
            if found is None:
                return _fixed(404, NOT_FOUND_BODY)
            org = found
        return Pending(org, route, authorization, idempotency_key, method, segments)

    # -- after the key store ----------------------------------------------------------------

    def unrouted(self, pending: Pending) -> Response | None:
        """For an authenticated caller: 404/405 when no operation matches, 400 for a bad
        ``Idempotency-Key``; None when the meter may be asked."""
        if pending.operation is None:
            allowed = self.router.allowed(pending.segments)
            if allowed:
                return _fixed(405, METHOD_NOT_ALLOWED_BODY, ("Allow", ", ".join(allowed)))
            return _fixed(404, NOT_FOUND_BODY)
        idem = pending.idempotency_key
        # (a comma too: WSGI servers fold two Idempotency-Key headers into "a, b", so
        # a comma cannot be told from a duplicate there; both shells refuse it alike)
        if idem is not None and not (
            0 < len(idem) <= _MAX_IDEMPOTENCY_KEY and idem.isprintable() and "," not in idem
        ):
            return _fixed(400, INVALID_IDEMPOTENCY_KEY_BODY)
        return None

    def failure(self, exc: MeterkitError, pending: Pending) -> Response:
        """The answer to an error from the key store or the meter; re-raises the others."""
        if isinstance(exc, AuthenticationError):
            body = _encode(exc.body)
            if exc.status == 401:
                # RFC 6750: a 401 names the scheme the client should use.
                return _fixed(401, body, ("WWW-Authenticate", "Bearer"))
            return _fixed(exc.status, body)
        if isinstance(exc, BackendError):
            # Every backend failure (unreachable, refused, out of memory, state meterkit
            # did not write) is the documented 503, never a bare 500.
            if isinstance(exc, BackendUnavailable):
                logger.warning("meterkit: backend unavailable, answering 503: %s", exc)
            else:
                logger.error("meterkit: backend failed, answering 503: %s", exc)
            return _fixed(503, UNAVAILABLE_BODY, ("Retry-After", "1"))
        if (
            isinstance(exc, InvalidRequestError)
            and not isinstance(exc, InvalidIdentifierError)
            and pending.idempotency_key is not None
        ):
            # The meter's one refusal of valid arguments: an idempotency key first used
            # for another operation, key or price.
            return _fixed(422, IDEMPOTENCY_KEY_REUSED_BODY)
        if isinstance(exc, InvalidRequestError):
            return _fixed(400, INVALID_REQUEST_BODY)
        raise exc

    def refusal(self, decision: Decision) -> Response | None:
        """The seed's 429 or 402 for a denied decision; None when it was admitted."""
        if decision.allowed:
            return None
        body = _encode(decision.error)
        headers = [JSON, ("Content-Length", str(len(body)))]
        headers.extend(decision.headers.items())
        return Response(decision.status, headers, body)

    def admitted_headers(self, decision: Decision, refunded: bool) -> dict[str, str]:
        """Headers added to the app's response: rate limits, credits, a replay flag.

        After a refund the credit headers say so: nothing charged, the balance as it
        was before this request.
        """
        headers = decision.headers
        if refunded:
            headers["X-Credits-Charged"] = "0"
            outcome = decision.outcome
            headers["X-Credits-Remaining"] = str(from_micro(outcome.balance + outcome.charged))
        if decision.replayed:
            headers["Idempotent-Replayed"] = "true"
        return headers

    def refunds(self, status: int, decision: Decision) -> bool:
        """Whether an app answer with ``status`` returns this decision's credits.

        A replayed decision is not refunded: its charge belongs to the first attempt,
        which may have succeeded.
        """
        return status in self.refund_statuses and not decision.replayed and not decision.degraded
