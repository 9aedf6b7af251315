"""The HTTP side of metering, written once: the gate every shell calls.

:mod:`meterkit.http.asgi`, :mod:`meterkit.http.wsgi`, :mod:`meterkit.http.fastapi`,
:mod:`meterkit.http.flask` and :mod:`meterkit.http.django` are thin shells around
:class:`Gate`. A shell reads its server's request into a :class:`RequestView` and
calls the gate, which answers with one of:

- ``None``: the request is not metered (an excluded path, or an operation callable
  that names none); run the app untouched;
- a :class:`Response`: refuse in the app's place (plain HTTP, no such route, a bad key,
  a rate limit, no credits), with its status, headers and body;
- an :class:`Admission`: the authenticated key and the meter's decision; run the app,
  then hand its status to :meth:`Gate.finish`, which refunds what
  ``refund_statuses`` says and returns the headers to add to the app's response.

Every option is decided here, once, when the gate is made: where the organization
comes from (``org``), who is calling (``caller``), which operation (the route table,
a framework route naming it, or a callable), what it costs (``cost``), how refusals
look (``render``) and which headers go out (``headers``). The gate does no I/O of its
own: it calls the key store and the meter it was given. Its two entry points are
written once, as coroutines (:meth:`Gate.admit`, :meth:`Gate.finish`); blocking shells
call their synchronous twins (:meth:`Gate.admit_blocking`, :meth:`Gate.finish_blocking`),
made from the same source by :func:`meterkit._twins.blocking`.

Per request, in this order: excluded paths pass; HTTPS is required; the operation is
found (a trie compiled once from the route table, or given by the framework route);
the organization is read; the caller is identified (the bearer key, authenticated for
that organization with the operation's permission, or a key function); unknown routes
of an authenticated caller get 404 (405 when only the method is wrong); the meter
admits and charges, or refuses.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import logging
import os
import re
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from http import HTTPStatus
from inspect import iscoroutinefunction
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec

from meterkit._twins import RENAMES, blocking
from meterkit.core.credits import credits_text, to_micro
from meterkit.core.idempotency import BUSY, DONE, REUSED, RUN
from meterkit.core.routes import ORG_PARAM, check_routes, parse_route, route_params
from meterkit.errors import (
    AuthenticationError,
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    IdempotencyConflictError,
    InvalidAmountError,
    InvalidRequestError,
    MeterkitError,
    StateError,
)
from meterkit.keys.memory import AsyncMemoryKeyStore
from meterkit.observe.events import (
    ERROR,
    REPORTED_BY_METER,
    Event,
    error_kind,
    refusal_event,
    safe_id,
)

if TYPE_CHECKING:
    from meterkit.core.decision import Decision
    from meterkit.core.policy import Policy

__all__ = [
    "HEADER_GROUPS",
    "IDEMPOTENCY_METHODS",
    "KEPT",
    "MAX_IDEMPOTENCY_KEY",
    "REFUNDED",
    "REFUSALS",
    "Admission",
    "Gate",
    "Keeping",
    "RequestView",
    "Response",
    "Route",
    "Router",
    "Target",
]

logger = logging.getLogger("meterkit")

#: The longest Idempotency-Key accepted (Stripe's limit); a longer one is a 400.
MAX_IDEMPOTENCY_KEY: Final = 255
_encode = msgspec.json.Encoder().encode
JSON: Final = ("Content-Type", "application/json")

#: A renderer of refusals: ``(status, code, message, retry_after, decision)`` to
#: ``(status, headers, body)``; see :class:`Gate`.
Renderer = Callable[
    [int, str, str, "int | None", "Decision | None"],
    tuple[int, "Iterable[tuple[str, str]] | Mapping[str, str]", "bytes | str | Mapping[str, Any]"],
]


def error_body(type_: str, code: str, message: str, status: int) -> bytes:
    """A JSON error body in the seed's shape."""
    return _encode({"error": {"type": type_, "code": code, "message": message, "status": status}})


# The gate's own refusals: (status, type, code, message).
_HTTPS_REQUIRED = (
    403,
    "invalid_request_error",
    "https_required",
    "All API requests must be made over HTTPS.",
)
_NOT_FOUND = (404, "invalid_request_error", "not_found", "No API endpoint matches this path.")
_METHOD_NOT_ALLOWED = (
    405,
    "invalid_request_error",
    "method_not_allowed",
    "This API endpoint does not accept this HTTP method.",
)
_INVALID_IDEMPOTENCY_KEY = (
    400,
    "invalid_request_error",
    "invalid_idempotency_key",
    "The Idempotency-Key header must be 1 to 255 printable characters without commas, sent once.",
)
_IDEMPOTENCY_KEY_REUSED = (
    422,
    "invalid_request_error",
    "idempotency_key_reused",
    "This Idempotency-Key was already used for a different request.",
)
_IDEMPOTENCY_KEY_IN_USE = (
    409,
    "invalid_request_error",
    "idempotency_key_in_use",
    "A request with this Idempotency-Key is still being processed. Retry it shortly.",
)
_IDEMPOTENCY_RESPONSE_TOO_LARGE = (
    409,
    "invalid_request_error",
    "idempotency_response_too_large",
    "The request with this Idempotency-Key was processed, but its response was too large "
    "to keep for a retry. Read the result through the API.",
)
_INVALID_REQUEST = (
    400,
    "invalid_request_error",
    "invalid_request",
    "The request could not be processed.",
)
_ORGANIZATION_REQUIRED = (
    400,
    "invalid_request_error",
    "organization_required",
    "This request does not say which organization it is for.",
)
_CALLER_REQUIRED = (
    400,
    "invalid_request_error",
    "caller_required",
    "This request does not say who is calling.",
)
_UNAVAILABLE = (
    503,
    "api_error",
    "service_unavailable",
    "The API is temporarily unavailable. Try again shortly.",
)

#: Every refusal of the gate's own, as ``(status, type, code, message)``: the table
#: its fixed answers are rendered from (and documentation tools, such as the OpenAPI
#: writer, read). 401s come from the key store, 402 and 429 from the meter.
REFUSALS: Final = (
    _HTTPS_REQUIRED,
    _NOT_FOUND,
    _METHOD_NOT_ALLOWED,
    _INVALID_IDEMPOTENCY_KEY,
    _IDEMPOTENCY_KEY_REUSED,
    _IDEMPOTENCY_KEY_IN_USE,
    _IDEMPOTENCY_RESPONSE_TOO_LARGE,
    _INVALID_REQUEST,
    _ORGANIZATION_REQUIRED,
    _CALLER_REQUIRED,
    _UNAVAILABLE,
)

HTTPS_REQUIRED_BODY: Final = error_body(*_HTTPS_REQUIRED[1:], 403)
NOT_FOUND_BODY: Final = error_body(*_NOT_FOUND[1:], 404)
METHOD_NOT_ALLOWED_BODY: Final = error_body(*_METHOD_NOT_ALLOWED[1:], 405)


class Response:
    """An answer the gate gives in the app's place: status, headers, body."""

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


class RequestView:
    """What the gate reads of one request, and what the user's callables receive.

    ``method``, ``path`` (below the app's root), ``scheme``, ``peer`` (the connection's
    address), ``params`` (the path parameters: of the matched route, or the framework's
    own), ``native`` (the framework's request: an ASGI scope or Starlette ``Request``, a
    WSGI environ, a ``flask.Request``, a Django ``HttpRequest``) and :meth:`header`.
    Shells fill one per request from what they read anyway; the rest is read only when
    a callable or an option asks. The body is read (:meth:`read_body`) only for a
    request whose Idempotency-Key is honoured, for its fingerprint.
    """

    __slots__ = (
        "_body",
        "_params",
        "_route",
        "_segments",
        "authorization",
        "forwarded_proto",
        "headers",
        "idempotency_key",
        "method",
        "native",
        "path",
        "peer",
        "scheme",
    )

    def __init__(
        self,
        method: str,
        path: str,
        *,
        scheme: str = "https",
        peer: str | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        native: Any = None,
        body: bytes = b"",
    ) -> None:
        #: Lower-cased header names to values (shells read theirs in place instead).
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self._body = body
        get = self.headers.get
        self._fill(
            method,
            path,
            scheme,
            peer,
            get("authorization"),
            get("idempotency-key"),
            get("x-forwarded-proto"),
            params,
            native,
        )

    def _fill(
        self,
        method: str,
        path: str,
        scheme: str,
        peer: str | None,
        authorization: str | bytes | None,
        idempotency_key: str | None,
        forwarded_proto: str | None,
        params: Mapping[str, str] | None,
        native: Any,
    ) -> None:
        """Set what every view holds (shells read these their own way)."""
        self.method = method
        self.path = path
        self.scheme = scheme
        self.peer = peer
        self.authorization = authorization
        self.idempotency_key = idempotency_key
        self.forwarded_proto = forwarded_proto
        self._params = params
        self._segments: list[str] | None = None
        self._route: Route | None = None
        self.native = native

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.method} {self.path})"

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case), or None."""
        return self.headers.get(name.lower())

    async def read_body(self) -> bytes:
        """The whole request body, read so that the app can still read it (ASGI shells)."""
        return self._body

    def read_body_blocking(self) -> bytes:
        """:meth:`read_body` for the blocking shells (what the gate's twins call)."""
        return self._body

    @property
    def params(self) -> Mapping[str, str]:
        """The path parameters (``{"project_id": "proj_1"}``)."""
        params = self._params
        if params is None:
            route, segments = self._route, self._segments
            if route is None or segments is None:
                params = {}
            else:
                params = {name: segments[i] for name, i in route.params.items()}
            self._params = params
        return params


# -- where the organization and the caller come from ------------------------------------

# A source is (kind, argument): how a value is read from a request.
_KEY = 0  # org: the authenticated key's own; caller: the bearer key
_SEGMENT = 1  # a path segment of a table route (argument: its index)
_PARAM = 2  # a path parameter by name (the framework's, or a table route's)
_HEADER = 3  # a header by (lower-cased) name
_CALL = 4  # a callable of the RequestView
_IP = 5  # caller: the client's address, behind trusted proxies
_AUTO = 6  # org: {organization_id} of a table route when it has one, else the key

Source = tuple[int, Any]
_DEFAULT: Any = object()


def _source(spec: object, what: str, allowed: tuple[str, ...]) -> Source:
    """A ``"key"``/``"ip"``/``"path:<param>"``/``"header:<name>"`` spec or a callable, parsed."""
    if callable(spec):
        return (_CALL, spec)
    if isinstance(spec, str):
        kind, _, name = spec.partition(":")
        if kind in allowed:
            if kind == "key" and not name:
                return (_KEY, None)
            if kind == "ip" and not name:
                return (_IP, None)
            if kind == "path" and name.isidentifier():
                return (_PARAM, name)
            if kind == "header" and re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
                return (_HEADER, name.lower())
    shapes = ", ".join(
        {"key": "'key'", "ip": "'ip'", "path": "'path:<param>'", "header": "'header:<name>'"}[k]
        for k in allowed
    )
    raise ConfigurationError(f"is one of {shapes} or a callable of the request, not {spec!r}", what)


def _org_source(spec: object, what: str = "org") -> Source:
    if spec is None:
        return (_AUTO, None)
    return _source(spec, what, ("key", "path", "header"))


def _caller_source(spec: object, what: str = "caller") -> Source:
    return _source(spec, what, ("key", "ip", "header"))


def _cost_of(spec: object, what: str = "cost") -> Any:
    """None (the table price), a callable of the request, or a fixed amount (checked now)."""
    if spec is None or callable(spec):
        return spec
    try:
        to_micro(spec, what)
    except InvalidAmountError as exc:
        raise ConfigurationError(str(exc), what) from None
    return spec


_T = TypeVar("_T")


def _per_operation(
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
        self.by_key = caller[0] == _KEY
        self.cost = cost

    def __repr__(self) -> str:
        return f"Target({self.operation!r})"


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
                org = (_SEGMENT, params[ORG_PARAM]) if ORG_PARAM in params else (_KEY, None)
                found = Target(operation, operations[operation].permission, org, (_KEY, None), None)
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


# -- proxies and exclusions ------------------------------------------------------------


class _Proxies:
    """Addresses whose ``X-Forwarded-*`` headers are believed: IPs, networks, or ``*``."""

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


class Admission:
    """What the gate learnt about an admitted request, for the app to read.

    The ASGI shells put it in ``scope["meterkit"]`` (and ``request.state.meterkit`` in
    Starlette and FastAPI), the WSGI ones in ``environ["meterkit"]``, Django's in
    ``request.meterkit``.
    """

    __slots__ = ("decision", "keeping", "key", "refunded")

    def __init__(self, key: Any, decision: Decision, keeping: Keeping | None = None) -> None:
        #: The authenticated :class:`~meterkit.ApiKey` (id, org, mode, permissions, …);
        #: None when a key function named the caller (``decision.key`` is its identity).
        self.key = key
        #: The meter's :class:`~meterkit.Decision`: operation, credits charged and left, …
        self.decision = decision
        #: Its credits were returned (the app answered a status of ``refund_statuses``).
        self.refunded = False
        #: The response to keep for the retries of its Idempotency-Key (None: none).
        self.keeping = keeping

    def __repr__(self) -> str:
        return f"Admission(key={self.decision.key!r}, operation={self.decision.operation!r})"


class Keeping:
    """The response of an admitted request with an Idempotency-Key, as it goes out: the
    shells hand it the status and headers (:meth:`start`) and the body (:meth:`add`),
    and :meth:`Gate.keep` stores it for the key's retries (or frees the key for the
    next one) once the response ended or failed."""

    __slots__ = (
        "_gate",
        "chunks",
        "complete",
        "fingerprint",
        "headers",
        "settled",
        "size",
        "status",
        "storing",
        "token",
    )

    def __init__(self, gate: Gate, fingerprint: str, token: str) -> None:
        self._gate = gate
        #: What the request was: method, path, operation, body digest.
        self.fingerprint = fingerprint
        #: Who holds the key's mark ("" for the first attempt, whose mark is its charge).
        self.token = token
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        #: The status is one to keep (and the response is still within the size limit).
        self.storing = False
        #: The whole body went out.
        self.complete = False
        #: :meth:`Gate.keep` has run.
        self.settled = False

    def __repr__(self) -> str:
        return f"Keeping(status={self.status}, size={self.size}, complete={self.complete})"

    def start(
        self,
        status: int,
        headers: Iterable[tuple[str | bytes, str | bytes]],
        extra: Mapping[str, str],
    ) -> None:
        """The response's status and headers as sent: the app's, and the gate's ``extra``."""
        gate = self._gate
        self.status = status
        self.storing = status in gate.idempotency_statuses and status not in gate.refund_statuses
        if self.storing:
            self.headers = kept_headers(headers)
            self.headers.extend(extra.items())

    def add(self, chunk: bytes, last: bool = False) -> None:
        """A piece of the body as sent; ``last``: the body ends with it."""
        if self.storing and not self.complete:
            self.size += len(chunk)
            if self.size <= self._gate.idempotency_max_body:
                self.chunks.append(chunk)
            else:
                self.chunks = []  # too large to keep: only its size is remembered
        if last:
            self.complete = True

    def payload(self) -> bytes | None:
        """What to keep: the encoded response; ``b""`` for one too large to keep; None
        for nothing (a status not kept, or a response that did not end)."""
        if not (self.storing and self.complete):
            return None
        if self.size > self._gate.idempotency_max_body:
            return b""
        return _encode_response((self.status, self.headers, b"".join(self.chunks)))


#: Headers never kept with a response: those of one connection (RFC 9110 section 7.6.1)
#: and cookies, which are one client's.
_NOT_KEPT: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "set-cookie",
    }
)


def kept_headers(headers: Iterable[tuple[str | bytes, str | bytes]]) -> list[tuple[str, str]]:
    """The headers of a response that are kept for its replay (as text)."""
    kept: list[tuple[str, str]] = []
    named: set[str] = set()  # the headers Connection names
    for name, value in headers:
        if isinstance(name, bytes):
            name = name.decode("latin-1")
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        lower = name.lower()
        if lower in _NOT_KEPT:
            if lower == "connection":
                named.update(part.strip().lower() for part in value.split(","))
            continue
        kept.append((name, value))
    if named:
        kept = [(name, value) for name, value in kept if name.lower() not in named]
    return kept


_encode_response = msgspec.msgpack.Encoder().encode
_decode_response = msgspec.msgpack.Decoder(tuple[int, list[tuple[str, str]], bytes]).decode


def fingerprint(method: str, path: str, operation: str, body: bytes) -> str:
    """What a request with an Idempotency-Key was: its method, path, operation and body."""
    head = f"{method}\x00{path}\x00{operation}\x00".encode("utf-8", "surrogatepass")
    return hashlib.sha256(head + body).hexdigest()[:32]


# Invalid marker for a header sent more than once where once is the rule.
DUPLICATE: Final = "\x00"


#: The statuses refunded by default: what the app refused to serve (404 not found, 405
#: method not allowed, 422 unreadable body: a framework's own answers) and its failures.
REFUNDED: frozenset[int] = frozenset({404, 405, 422, *range(500, 600)})

#: The methods whose Idempotency-Key is honoured by default; GET, HEAD and OPTIONS
#: (safe methods, whose retries need no key) ignore it.
IDEMPOTENCY_METHODS: frozenset[str] = frozenset({"POST", "PUT", "PATCH", "DELETE"})

#: The app statuses whose responses are kept for an Idempotency-Key's retries by
#: default: every answer but a failure (5xx) and a refusal a retry may find otherwise
#: (401, 402, 403, 429). A refunded status (``refund_statuses``) is never kept.
KEPT: frozenset[int] = frozenset(range(200, 500)) - {401, 402, 403, 429}

# What the blocking twins of the gate's coroutines call in their place.
_TWINS: Final = {
    **RENAMES,
    "_unrouted": "_unrouted_blocking",
    "_give_back": "_give_back_blocking",
    "admit": "admit_blocking",
    "finish": "finish_blocking",
    "keep": "keep_blocking",
    "read_body": "read_body_blocking",
}

#: The header groups an admitted or refused response can carry (``headers=``).
HEADER_GROUPS: Final = ("ietf", "x-ratelimit", "x-credits")

# Placeholder values of a path parameter, to ask a framework whether it serves a route.
_SAMPLES: Final = ("1", "x", "00000000-0000-4000-8000-000000000000")


class Layer:
    """What a framework adapter puts in front of its app (ASGI or WSGI): it marks each
    request with its gate, and gives the responses of the requests a framework route
    admitted their headers (and refunds)."""

    def __init__(self, app: Any, *, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.gate!r})"


def middleware_gate(meter: Any, keystore: Any, options: dict[str, Any], adapter: str) -> Gate:
    """The gate of a middleware that routes requests itself: it needs a route table (or
    an ``operation`` callable); ``adapter`` names the per-route alternative."""
    gate = Gate(meter, keystore, **options)
    if gate.router is None and options.get("operation") is None:
        raise ConfigurationError(
            "the middleware has no routes: add a [routes] table to the policy mapping "
            "'METHOD /path' to operations (or pass routes= or operation=); to name "
            f"operations on the framework's routes, use {adapter}",
            "routes",
        )
    return gate


def require_blocking(meter: Any, keystore: Any, server: str) -> None:
    """Refuse an asyncio meter or key store for a ``server`` that cannot await."""
    if iscoroutinefunction(getattr(meter, "check", None)):
        raise ConfigurationError(f"{server} needs a synchronous meterkit.Meter", "meter")
    if iscoroutinefunction(getattr(keystore, "authenticate", None)):
        raise ConfigurationError(f"{server} needs a synchronous key store", "keystore")


class Gate:
    """Everything the shells decide, for one meter and one set of options.

    ``meter`` is a :class:`~meterkit.Meter` or :class:`~meterkit.AsyncMeter`; its policy
    prices the operations. ``keystore`` authenticates bearer keys (not needed when
    every caller comes from a key function). Options:

    - ``routes``: the route table (default: the policy's ``[routes]``); ``{}`` for none,
      when the framework's routes name their operations.
    - ``operation``: a callable of the :class:`RequestView` returning an operation's
      name, or None for a request that is not metered; asked for paths the table
      does not route.
    - ``org``: where the organization comes from: ``"key"`` (the authenticated key's
      own), ``"path:<param>"``, ``"header:<name>"``, or a callable of the request.
      Default: a route's ``{organization_id}`` when it has one, else the key's (for a
      caller that is not a key: its own). When the caller is a key, an organization
      read from the request is checked against the key by the key store
      (``organization_not_found``); for other callers it is taken as read.
    - ``caller``: who is calling: ``"key"`` (the bearer key, default), ``"ip"`` (the
      client's address: the connection's, or behind ``trusted_proxies`` the last
      untrusted ``X-Forwarded-For`` hop), ``"header:<name>"`` or a callable returning
      an identity. A caller that is not a key is metered as itself (its own key-scoped
      tiers), in the organization ``org`` names, or its own.
    - ``cost``: a callable of the request returning the price (a size-based price),
      or a fixed amount; default the operation's table price.

      ``org``, ``caller`` and ``cost`` may each be a mapping from operation names to
      such values (``"*"`` for the rest): ``caller={"auth.login": "ip"}``.
    - ``trusted_proxies``: addresses (or networks, or ``"*"``) whose ``X-Forwarded-Proto``
      (and, for ``caller="ip"``, ``X-Forwarded-For``) are believed.
    - ``exclude``: paths that are not metered at all (``"/health"``, or ``"/docs*"``).
    - ``refund_statuses``: app answers whose credits are returned (default
      :data:`REFUNDED`: 404, 405, 422 and every 5xx; ``()`` never refunds).
    - ``require_https=False`` is for local development only.
    - ``render``: ``render(status, code, message, retry_after, decision)`` returns
      ``(status, headers, body)`` for every refusal; ``body`` is bytes, text or a
      JSON-ready mapping; its headers are sent with meterkit's own (``RateLimit``,
      ``Retry-After``, ``WWW-Authenticate``, ``Allow``), and a ``Content-Type`` among
      them replaces ``application/json``. Default: the seed's bodies.
    - ``headers``: the header groups sent, of :data:`HEADER_GROUPS` (``"ietf"``:
      ``RateLimit``, ``RateLimit-Policy``; ``"x-ratelimit"``: ``X-RateLimit-*``;
      ``"x-credits"``: ``X-Credits-*``). Default: all three, less ``x-credits`` when
      the policy prices nothing (billing off).
    - ``credits_retry_after=True`` sends ``Retry-After`` on a 402 too (the seconds
      until the credits reset, often weeks).

    An ``Idempotency-Key`` makes a retry safe (see :mod:`meterkit.core.idempotency`):
    the first response is kept with the charge's record and replayed to the key's
    retries (``Idempotent-Replayed: true``), a different request under the key gets 422
    ``idempotency_key_reused``, a retry while the first runs 409
    ``idempotency_key_in_use``. Options:

    - ``idempotency_methods``: the methods whose key is honoured (default
      :data:`IDEMPOTENCY_METHODS`: POST, PUT, PATCH, DELETE); others ignore the header.
      ``()`` ignores it everywhere (then the meter's backend need not keep responses).
    - ``idempotency_statuses``: the app statuses whose responses are kept (default
      :data:`KEPT`); a status of ``refund_statuses`` never is.
    - ``idempotency_max_body``: the largest body kept, in bytes (default 1 MiB); a
      retry of a larger response gets 409 ``idempotency_response_too_large``.
    - ``idempotency_lock``: seconds a run holds its key before another retry may take it
      over (default 60): the bound on a mark whose process died.
    """

    __slots__ = (
        "_authenticate",
        "_authenticate_awaits",
        "_check",
        "_check_awaits",
        "_claim",
        "_credits",
        "_credits_retry",
        "_default",
        "_excluded",
        "_excluded_prefixes",
        "_fixed",
        "_ietf",
        "_keep",
        "_legacy",
        "_lock_us",
        "_notify",
        "_operation",
        "_org_from_path",
        "_proxies",
        "_refund",
        "_refund_awaits",
        "_render",
        "_store_awaits",
        "_targets",
        "idempotency_max_body",
        "idempotency_methods",
        "idempotency_statuses",
        "keystore",
        "meter",
        "policy",
        "refund_statuses",
        "require_https",
        "router",
    )

    def __init__(
        self,
        meter: Any,
        keystore: Any = None,
        *,
        routes: Mapping[str, str] | None = None,
        operation: Callable[[RequestView], str | None] | None = None,
        org: Any = None,
        caller: Any = "key",
        cost: Any = None,
        trusted_proxies: Iterable[str] = (),
        exclude: Iterable[str] = (),
        refund_statuses: Container[int] = REFUNDED,
        require_https: bool = True,
        render: Renderer | None = None,
        headers: Iterable[str] | None = None,
        credits_retry_after: bool = False,
        idempotency_methods: Iterable[str] = IDEMPOTENCY_METHODS,
        idempotency_statuses: Container[int] = KEPT,
        idempotency_max_body: int = 1 << 20,
        idempotency_lock: float = 60,
    ) -> None:
        policy = getattr(meter, "policy", None)
        if policy is None or not callable(getattr(meter, "check", None)):
            raise ConfigurationError("is a meterkit.Meter or AsyncMeter", "meter")
        self.meter = meter
        self.policy = policy
        self.keystore = keystore
        for name, value in (("require_https", require_https), ("credits", credits_retry_after)):
            if not isinstance(value, bool):
                raise ConfigurationError(f"{name} is true or false", name)
        if not isinstance(refund_statuses, Container):
            raise ConfigurationError(
                "refund_statuses is a collection of HTTP statuses, such as range(500, 600)",
                "refund_statuses",
            )
        if operation is not None and not callable(operation):
            raise ConfigurationError("is a callable of the request, or None", "operation")
        if render is not None and not callable(render):
            raise ConfigurationError(
                "is a callable (status, code, message, retry_after, decision)", "render"
            )
        operations = policy.operations
        org_default, org_chosen = _per_operation(org, operations, "org", _org_source)
        caller_default, caller_chosen = _per_operation(caller, operations, "caller", _caller_source)
        cost_default, cost_chosen = _per_operation(cost, operations, "cost", _cost_of)
        self._default = (
            org_default or (_AUTO, None),
            caller_default or (_KEY, None),
            cost_default,
            org_chosen,
            caller_chosen,
            cost_chosen,
        )
        if keystore is None:
            self._authenticate: Any = None
            self._authenticate_awaits = False
            if operation is not None and self._default[1] == (_KEY, None):
                raise ConfigurationError(
                    "a key store authenticates bearer keys: pass keystore=, or a caller= "
                    "other than 'key'",
                    "keystore",
                )
        else:
            authenticate = getattr(keystore, "authenticate", None)
            if not callable(authenticate):
                raise ConfigurationError("is a meterkit key store", "keystore")
            if type(keystore) is AsyncMemoryKeyStore:
                # An asyncio face over a store that never blocks: its blocking side
                # answers the same without a coroutine per request. (Not a subclass's:
                # it may do otherwise.)
                authenticate = keystore.sync.authenticate
            self._authenticate = authenticate
            self._authenticate_awaits = iscoroutinefunction(authenticate)
        self._targets: dict[str, Target] = {}
        table = policy.routes if routes is None else routes
        if not isinstance(table, Mapping):
            raise ConfigurationError("is a mapping of 'METHOD /path' to operations", "routes")
        self.router = Router(table, policy, self._table_target) if table else None
        self._operation = operation
        self._org_from_path = self._default[0][0] in (_AUTO, _SEGMENT, _PARAM)
        self._check = meter.check
        # The meter's observers hear of the gate's refusals too.
        self._notify = getattr(meter, "_notify", None)
        self._check_awaits = iscoroutinefunction(meter.check)
        self._refund = meter.refund
        self._refund_awaits = iscoroutinefunction(meter.refund)
        self._proxies = _Proxies(trusted_proxies)
        self._excluded, self._excluded_prefixes = _exclusions(exclude)
        self.refund_statuses = refund_statuses
        self.require_https = require_https
        self._render = render
        groups = self._header_groups(headers)
        self._ietf = "ietf" in groups
        self._legacy = "x-ratelimit" in groups
        self._credits = "x-credits" in groups
        self._credits_retry = credits_retry_after
        self._idempotency(
            meter, idempotency_methods, idempotency_statuses, idempotency_max_body, idempotency_lock
        )
        # The fixed refusals, built once (a 409 and a 503 say when to try again).
        waits = {_IDEMPOTENCY_KEY_IN_USE, _UNAVAILABLE}
        self._fixed = {
            spec: self._refusal(*spec)
            for spec in REFUSALS
            if spec not in waits and spec is not _METHOD_NOT_ALLOWED  # (its Allow varies)
        }
        self._fixed[_IDEMPOTENCY_KEY_IN_USE] = self._refusal(
            *_IDEMPOTENCY_KEY_IN_USE, extra=[("Retry-After", "1")], retry_after=1
        )
        self._fixed[_UNAVAILABLE] = self._refusal(*_UNAVAILABLE, extra=[("Retry-After", "1")])

    def __repr__(self) -> str:
        routes = len(self.router.routes) if self.router else 0
        return f"Gate(policy={self.policy.name!r}, routes={routes})"

    # -- configuration -----------------------------------------------------------------

    def _idempotency(
        self, meter: Any, methods: Iterable[str], statuses: Container[int], size: int, lock: float
    ) -> None:
        if isinstance(methods, str) or not isinstance(methods, Iterable):
            raise ConfigurationError(
                "idempotency_methods is a list of HTTP methods, such as ['POST']",
                "idempotency_methods",
            )
        honoured = frozenset(m.upper() if isinstance(m, str) else m for m in methods)
        #: The methods whose Idempotency-Key is honoured.
        self.idempotency_methods: frozenset[str] = honoured
        if any(not isinstance(m, str) or not m.isalpha() for m in honoured):
            raise ConfigurationError(
                "idempotency_methods is a list of HTTP methods", "idempotency_methods"
            )
        if not isinstance(statuses, Container) or isinstance(statuses, str):
            raise ConfigurationError(
                "idempotency_statuses is a collection of HTTP statuses, such as range(200, 300)",
                "idempotency_statuses",
            )
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ConfigurationError(
                "idempotency_max_body is a number of bytes", "idempotency_max_body"
            )
        if isinstance(lock, bool) or not isinstance(lock, (int, float)) or not 0 < lock <= 86_400:
            raise ConfigurationError(
                "idempotency_lock is 0 to 86400 seconds (more than 0)", "idempotency_lock"
            )
        self.idempotency_statuses = statuses
        self.idempotency_max_body = size
        self._lock_us = round(lock * 1_000_000)
        # The responses live where the charges' records do: on the meter's backend.
        backend = getattr(meter, "backend", None)
        self._claim: Any = getattr(backend, "claim_response", None)
        self._keep: Any = getattr(backend, "keep_response", None)
        if self.idempotency_methods and (not callable(self._claim) or not callable(self._keep)):
            raise ConfigurationError(
                f"{type(backend).__name__} cannot keep the responses of idempotency keys "
                "(claim_response, keep_response): pass idempotency_methods=() to ignore "
                "Idempotency-Key",
                "idempotency_methods",
            )
        self._store_awaits = iscoroutinefunction(self._claim)

    @property
    def refusals(self) -> dict[str, Response]:
        """The gate's own fixed refusals, by code, as it sends them (for documentation)."""
        return {spec[2]: response for spec, response in self._fixed.items()}

    def _header_groups(self, headers: Iterable[str] | None) -> frozenset[str]:
        if headers is None:
            billing = any(op.price_micro for op in self.policy.costs.operations)
            return frozenset(HEADER_GROUPS if billing else HEADER_GROUPS[:2])
        if isinstance(headers, str) or not isinstance(headers, Iterable):
            raise ConfigurationError(f"is a list of {', '.join(HEADER_GROUPS)}", "headers")
        groups = frozenset(headers)
        unknown = sorted(str(g) for g in groups - set(HEADER_GROUPS))
        if unknown:
            raise ConfigurationError(
                f"unknown header group {unknown[0]!r}; the groups are {', '.join(HEADER_GROUPS)}",
                "headers",
            )
        return groups

    def _all_targets(self) -> list[Target]:
        return [r.target for r in self.router.routes] if self.router else []

    def _table_target(self, operation: str, params: Mapping[str, int]) -> Target:
        """The target of a route-table entry, whose path parameters are known."""
        target = self.target(operation)
        kind, argument = target.org
        where = f"routes.'{operation}'"
        if kind == _AUTO:
            if not target.by_key:
                # The caller's own: a path's organization, unchecked without a key, would
                # let any caller choose whom to charge.
                org: Source = (_AUTO, None)
            elif ORG_PARAM in params:
                org = (_SEGMENT, params[ORG_PARAM])
            else:
                org = (_KEY, None)
        elif kind == _PARAM:
            if argument not in params:
                raise ConfigurationError(
                    f"org='path:{argument}', but a route of {operation!r} has no {{{argument}}}",
                    where,
                )
            org = (_SEGMENT, params[argument])
        else:
            org = target.org
        return Target(target.operation, target.permission, org, target.caller, target.cost)

    def target(
        self,
        operation: str,
        *,
        org: Any = _DEFAULT,
        caller: Any = _DEFAULT,
        cost: Any = _DEFAULT,
    ) -> Target:
        """The compiled target of ``operation``, with this gate's options unless given
        here (a framework route that names its operation, and its own org, caller or
        cost). Raises :class:`ConfigurationError` for an operation the policy does not
        price or an option it cannot use."""
        if org is _DEFAULT and caller is _DEFAULT and cost is _DEFAULT:
            found = self._targets.get(operation)
            if found is not None:
                return found
        op = self.policy.operations.get(operation) if isinstance(operation, str) else None
        if op is None:
            raise ConfigurationError(
                f"unknown operation {operation!r}: it is not in the policy's cost table",
                "operation",
            )
        org_d, caller_d, cost_d, org_by_op, caller_by_op, cost_by_op = self._default
        org_src = _org_source(org) if org is not _DEFAULT else org_by_op.get(operation) or org_d
        caller_src = (
            _caller_source(caller)
            if caller is not _DEFAULT
            else caller_by_op.get(operation) or caller_d
        )
        price = _cost_of(cost) if cost is not _DEFAULT else cost_by_op.get(operation, cost_d)
        if caller_src[0] == _KEY and self._authenticate is None:
            raise ConfigurationError(
                f"{operation!r} is metered by its bearer key: pass keystore= (or a caller= "
                "other than 'key')",
                "keystore",
            )
        built = Target(operation, op.permission, org_src, caller_src, price)
        if org is _DEFAULT and caller is _DEFAULT and cost is _DEFAULT:
            self._targets[operation] = built
        return built

    # -- the request --------------------------------------------------------------------

    async def admit(
        self, req: RequestView, target: Target | None = None
    ) -> Response | Admission | None:
        """Decide one request: None (not metered), a refusal, or an admission.

        ``target`` is the operation a framework route named (see :meth:`target`); without
        it the route table (then ``operation``) says which, and excluded paths pass.
        """
        if target is None:
            path = req.path
            if path in self._excluded or (
                self._excluded_prefixes and path.startswith(self._excluded_prefixes)
            ):
                return None
        if (
            req.scheme != "https"
            and self.require_https
            and not (
                req.forwarded_proto is not None
                and req.peer in self._proxies
                and forwarded_https(req.forwarded_proto)
            )
        ):
            return self._refused(_HTTPS_REQUIRED, target)
        segments = None
        if target is None:
            segments = req.path.split("/")
            route = self.router.match(req.method, segments) if self.router is not None else None
            if route is not None:
                target = route.target
                req._segments = segments
                req._route = route
            else:
                named = self._operation(req) if self._operation is not None else None
                if named is not None:
                    target = self.target(named)
                elif self.router is None:
                    return None
                else:
                    return await self._unrouted(req, segments)
        # (one coroutine from here on: the rest of the flow is no nested call)
        kind, argument = target.org
        if kind == _SEGMENT:
            org = segments[argument] if segments is not None else None
        elif kind == _KEY:
            org = None
        elif kind == _AUTO:
            org = req.params.get(ORG_PARAM) if target.by_key else None
        elif kind == _PARAM:
            org = req.params.get(argument)
        elif kind == _HEADER:
            org = req.header(argument)
        else:
            org = argument(req)
        if not org and kind not in (_KEY, _AUTO):
            return self._refused(_ORGANIZATION_REQUIRED, target)
        idem = None
        try:
            if target.by_key:
                if self._authenticate_awaits:
                    key = await self._authenticate(
                        req.authorization, org=org, permission=target.permission
                    )
                else:
                    key = self._authenticate(
                        req.authorization, org=org, permission=target.permission
                    )
                caller = key
                org = None  # (the key's, which the store just checked)
            else:
                key = None
                caller = self._caller(target.caller, req)
                if not caller:
                    return self._refused(_CALLER_REQUIRED, target, org)
                if not org:
                    org = caller
            fp = None  # the request's fingerprint, when its Idempotency-Key counts
            if req.idempotency_key is not None and req.method in self.idempotency_methods:
                idem = req.idempotency_key
                # (a comma too: WSGI servers fold two Idempotency-Key headers into "a, b",
                # so a comma cannot be told from a duplicate there; every shell refuses it)
                if not (
                    0 < len(idem) <= MAX_IDEMPOTENCY_KEY and idem.isprintable() and "," not in idem
                ):
                    return self._refused(_INVALID_IDEMPOTENCY_KEY, target, org, key, caller)
                body = await req.read_body()
                fp = fingerprint(req.method, req.path, target.operation, body)
            cost = target.cost
            if cost is not None and callable(cost):
                cost = cost(req)
        except MeterkitError as exc:
            return self._failure(exc, idem, target, org)
        try:
            if self._check_awaits:
                decision = await self._check(
                    caller, operation=target.operation, org=org, idempotency_key=idem, cost=cost
                )
            else:
                decision = self._check(
                    caller, operation=target.operation, org=org, idempotency_key=idem, cost=cost
                )
        except MeterkitError as exc:
            # (the meter reported its own failures: a backend error, a reused key)
            return self._failure(
                exc, idem, target, org, key, caller, isinstance(exc, REPORTED_BY_METER)
            )
        if not decision.allowed:
            return self._denied(decision)
        if fp is None or decision.degraded:
            return Admission(key, decision)
        if not decision.replayed:
            # The first attempt: its mark is the charge's own record (no round trip).
            return Admission(key, decision, Keeping(self, fp, ""))
        try:
            # A retry: the meter replayed the charge; the key's response record says the rest.
            token = os.urandom(8).hex()
            if self._store_awaits:
                verdict, detail = await self._claim(
                    decision.request, decision.outcome, fp, token, self._lock_us
                )
            else:
                verdict, detail = self._claim(
                    decision.request, decision.outcome, fp, token, self._lock_us
                )
            if verdict == RUN:
                return Admission(key, decision, Keeping(self, fp, token))
            return self._retried(verdict, detail, target, key)
        except MeterkitError as exc:
            return self._failure(exc, idem, target, org, key, caller)

    def _caller(self, source: Source, req: RequestView) -> str | None:
        kind, argument = source
        if kind == _IP:
            address = self.client_ip(req)
            return None if address is None else "ip:" + address
        if kind == _HEADER:
            return req.header(argument)
        value = argument(req)
        return value if value is None or isinstance(value, str) else str(value)

    def client_ip(self, req: RequestView) -> str | None:
        """The client's address: the peer's, or, when the peer is a trusted proxy, the
        last ``X-Forwarded-For`` hop that is not one (a client may prepend anything)."""
        peer = req.peer
        if peer is not None and peer in self._proxies:
            forwarded = req.header("x-forwarded-for")
            if forwarded:
                for hop in reversed(forwarded.split(",")):
                    hop = hop.strip()
                    if hop not in self._proxies:
                        peer = hop
                        break
        if peer is None:
            return None
        try:
            return str(ipaddress.ip_address(peer))
        except ValueError:
            return None

    async def _unrouted(self, req: RequestView, segments: list[str]) -> Response:
        """A path the table does not route: 404, or 405 with the methods it does route.

        A path under the API is answered only to an authenticated caller (an anonymous
        one learns nothing of which paths exist: 401); others get 404 at once."""
        router = self.router
        assert router is not None
        org = router.org_of(segments)
        if (org is None and self._org_from_path and router._org_prefixes) or not router.owns(
            segments
        ):
            return self._refused(_NOT_FOUND, None, org)
        if self._default[1] == (_KEY, None) and self._authenticate is not None:
            try:
                if self._authenticate_awaits:
                    await self._authenticate(req.authorization, org=org, permission=None)
                else:
                    self._authenticate(req.authorization, org=org, permission=None)
            except MeterkitError as exc:
                return self._failure(exc, None, None, org)
        allowed = router.allowed(segments)
        if allowed:
            self._report(_METHOD_NOT_ALLOWED, None, org)
            return self._refusal(*_METHOD_NOT_ALLOWED, extra=[("Allow", ", ".join(allowed))])
        return self._refused(_NOT_FOUND, None, org)

    def _retried(self, verdict: int, detail: Any, target: Target, key: Any) -> Response:
        """The answer to a retry that does not run: the kept response, or a refusal
        (reported to the observers: the meter reported the replayed charge only)."""
        if verdict == BUSY:
            return self._refused(_IDEMPOTENCY_KEY_IN_USE, target, None, key)
        if verdict == REUSED:
            return self._refused(_IDEMPOTENCY_KEY_REUSED, target, None, key)
        assert verdict == DONE
        if not detail:
            return self._refused(_IDEMPOTENCY_RESPONSE_TOO_LARGE, target, None, key)
        try:
            status, headers, body = _decode_response(detail)
        except msgspec.DecodeError:
            raise StateError("the backend holds a kept response meterkit did not write") from None
        headers.append(("Idempotent-Replayed", "true"))
        return Response(status, headers, body)

    def answered(self, admission: Admission, status: int) -> dict[str, str] | None:
        """The headers to add to the app's answer with ``status``, when it returns no
        credits; None when it does (then :meth:`finish` refunds and gives them). The
        common case, without a coroutine."""
        if self._refunds(admission, status):
            return None
        return self._headers(admission)

    async def finish(self, admission: Admission, status: int) -> dict[str, str]:
        """The app answered ``status``: refund when ``refund_statuses`` says so (once), and
        the headers to add to its response.

        A replayed decision is not refunded: its charge belongs to the first attempt,
        which may have succeeded. After a refund the credit headers say so: nothing
        charged, the balance as it was before this request.
        """
        if self._refunds(admission, status):
            admission.refunded = await self._give_back(admission.decision)
        return self._headers(admission)

    def _refunds(self, admission: Admission, status: int) -> bool:
        decision = admission.decision
        return (
            status in self.refund_statuses
            and not admission.refunded
            and not decision.replayed
            and not decision.degraded
        )

    def _headers(self, admission: Admission) -> dict[str, str]:
        decision = admission.decision
        headers = decision.http_headers(ietf=self._ietf, legacy=self._legacy, credits=self._credits)
        if admission.refunded and self._credits:
            headers["X-Credits-Charged"] = "0"
            outcome = decision.outcome
            headers["X-Credits-Remaining"] = credits_text(outcome.balance + outcome.charged)
        return headers

    async def _give_back(self, decision: Decision) -> bool:
        try:
            if self._refund_awaits:
                return bool(await self._refund(decision))
            return bool(self._refund(decision))
        except MeterkitError as exc:
            # The app's answer matters more than the refund: log it and carry on.
            logger.warning(
                "meterkit: could not refund charge %s of %s (%s): %s",
                decision.charge_id,
                decision.key,
                decision.operation,
                exc,
            )
            return False

    async def keep(self, admission: Admission) -> None:
        """The response of an admission with an Idempotency-Key ended (or failed, or was
        not sent whole): keep it for the key's retries, or free the key for the next
        one. Once; nothing for an admission without one. The shells call it before the
        response's last piece goes out, so that a client's next retry finds it."""
        keeping = admission.keeping
        if keeping is None or keeping.settled:
            return
        keeping.settled = True
        decision = admission.decision
        payload = keeping.payload()
        try:
            if self._store_awaits:
                await self._keep(
                    decision.request, decision.outcome, keeping.fingerprint, keeping.token, payload
                )
            else:
                self._keep(
                    decision.request, decision.outcome, keeping.fingerprint, keeping.token, payload
                )
        except MeterkitError as exc:
            # The app's answer matters more: the key's mark expires after the lock time.
            logger.warning(
                "meterkit: could not keep the response of %s (%s) for its retries: %s",
                decision.key,
                decision.operation,
                exc,
            )

    def kept_chunks(self, admission: Admission, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """A blocking response body, passed on as it is, and kept (:meth:`keep_blocking`)
        before its last piece goes out; freed if it fails or is closed early."""
        keeping = admission.keeping
        assert keeping is not None
        try:
            held = None
            for chunk in chunks:
                if held is not None:
                    keeping.add(held)
                    yield held
                held = chunk
            keeping.add(held or b"", last=True)
            self.keep_blocking(admission)
            if held:
                yield held
        finally:
            self.keep_blocking(admission)

    # The blocking shells' twins (WSGI, Flask, Django), made from the source above: the
    # same flow without its awaits, for a synchronous meter and key store.
    admit_blocking = blocking(admit, _TWINS)
    finish_blocking = blocking(finish, _TWINS)
    keep_blocking = blocking(keep, _TWINS)
    _unrouted_blocking = blocking(_unrouted, _TWINS)
    _give_back_blocking = blocking(_give_back, _TWINS)

    # -- refusals ---------------------------------------------------------------------

    def _refusal(
        self,
        status: int,
        type_: str,
        code: str,
        message: str,
        *,
        extra: Iterable[tuple[str, str]] = (),
        retry_after: int | None = None,
        decision: Decision | None = None,
        body: bytes | None = None,
    ) -> Response:
        """A refusal, through ``render`` when one was given, else in the seed's shape."""
        headers = list(extra)
        render = self._render
        if render is None:
            if body is None:
                body = error_body(type_, code, message, status)
            return Response(status, [JSON, ("Content-Length", str(len(body))), *headers], body)
        status, given, content = render(status, code, message, retry_after, decision)
        pairs = list(given.items()) if isinstance(given, Mapping) else list(given)
        if isinstance(content, bytes):
            data = content
        elif isinstance(content, str):
            data = content.encode("utf-8")
        else:
            data = _encode(content)
        if not any(name.lower() == "content-type" for name, _ in pairs):
            headers.insert(0, JSON)
        headers.extend(pairs)
        headers.append(("Content-Length", str(len(data))))
        return Response(status, headers, data)

    def _denied(self, decision: Decision) -> Response:
        """The 429 or 402 of a denied decision, with its headers."""
        headers = decision.http_headers(
            ietf=self._ietf,
            legacy=self._legacy,
            credits=self._credits,
            credits_retry_after=self._credits_retry,
        )
        error = decision.error
        assert error is not None
        fields = error["error"]
        retry = headers.get("Retry-After")
        return self._refusal(
            decision.status,
            fields["type"],
            fields["code"],
            fields["message"],
            extra=headers.items(),
            retry_after=None if retry is None else int(retry),
            decision=decision,
            body=_encode(error) if self._render is None else None,
        )

    def _failure(
        self,
        exc: MeterkitError,
        idempotency_key: str | None,
        target: Target | None = None,
        org: object = None,
        key: Any = None,
        caller: object = None,
        reported: bool = False,
    ) -> Response:
        """The answer to an error from the key store or the meter; re-raises the others.
        The observers hear of it unless the meter ``reported`` it already."""
        if isinstance(exc, AuthenticationError):
            # RFC 6750: a 401 names the scheme the client should use.
            extra = [("WWW-Authenticate", "Bearer")] if exc.status == 401 else []
            if self._notify is not None and not reported:
                self._report((exc.status, "", exc.code, ""), target, org, key, caller)
            return self._refusal(
                exc.status, "authentication_error", exc.code, exc.message, extra=extra
            )
        if isinstance(exc, BackendError):
            # Every backend failure (unreachable, refused, out of memory, state meterkit
            # did not write) is the documented 503, never a bare 500.
            if isinstance(exc, BackendUnavailable):
                logger.warning("meterkit: backend unavailable, answering 503: %s", exc)
            else:
                logger.error("meterkit: backend failed, answering 503: %s", exc)
            if self._notify is not None and not reported:
                # (the key store's or the response store's: the meter reports its own)
                self._notify(
                    Event(
                        ERROR,
                        None if target is None else target.operation,
                        safe_id(org),
                        None,
                        None,
                        error_kind(exc),
                        None,
                        503,
                        None,
                    )
                )
            return self._fixed[_UNAVAILABLE]
        if isinstance(exc, IdempotencyConflictError) and idempotency_key is not None:
            # The meter's one refusal of valid arguments: an idempotency key first used
            # for another operation, key or price.
            if not reported:
                self._report(_IDEMPOTENCY_KEY_REUSED, target, org, key, caller)
            return self._fixed[_IDEMPOTENCY_KEY_REUSED]
        if isinstance(exc, InvalidRequestError):
            return self._refused(_INVALID_REQUEST, target, org, key, caller)
        raise exc

    def _refused(
        self,
        spec: tuple[int, str, str, str],
        target: Target | None,
        org: object = None,
        key: Any = None,
        caller: object = None,
    ) -> Response:
        """The fixed refusal ``spec``, reported to the meter's observers."""
        if self._notify is not None:
            self._report(spec, target, org, key, caller)
        return self._fixed[spec]

    def _report(
        self,
        spec: tuple[int, str, str, str],
        target: Target | None,
        org: object = None,
        key: Any = None,
        caller: object = None,
    ) -> None:
        """Tell the observers of the refusal ``spec`` (status, type, code, message) of a
        request for ``target``: by ``org`` as the request named it, by the
        authenticated ``key`` or another ``caller``, as far as they are known."""
        notify = self._notify
        if notify is None:
            return
        mode = None
        if key is not None:
            org, caller, mode = key.org, key.id, getattr(key, "mode", None)
        notify(
            refusal_event(
                spec[2],
                spec[0],
                operation=None if target is None else target.operation,
                org=org,
                key=caller,
                mode=mode,
            )
        )

    # -- the framework's routes -----------------------------------------------------------

    def unserved(self, serves: Callable[[str, str], bool]) -> list[str]:
        """The table's routes that the app does not serve, asked of ``serves(method,
        path)`` with placeholder values in each path parameter."""
        missing = []
        for route in self.router.routes if self.router is not None else ():
            paths = [
                "/".join(
                    sample if seg.startswith("{") else seg for seg in route.template.split("/")
                )
                for sample in _SAMPLES
            ]
            if not any(serves(route.method, path) for path in paths):
                missing.append(f"{route.method} {route.template}")
        return missing

    def refuse_drift(self, serves: Callable[[str, str], bool], framework: str) -> None:
        """Raise :class:`ConfigurationError` when the table meters a route the app does
        not serve: a request there would be charged for the framework's 404 or 405."""
        missing = self.unserved(serves)
        if missing:
            raise ConfigurationError(
                f"the route table meters {len(missing)} route(s) that the {framework} app "
                f"does not serve: {', '.join(missing)}. Serve them or take them out of "
                "[routes]; if the app defines them after meterkit wraps it, wrap it once "
                "its routes are defined",
                "routes",
            )
