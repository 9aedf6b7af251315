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

import ipaddress
import logging
import os
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from inspect import iscoroutinefunction
from typing import TYPE_CHECKING, Any, Final

import msgspec

from meterkit._twins import RENAMES, blocking
from meterkit.core.credits import credits_text
from meterkit.core.idempotency import BUSY, DONE, REUSED, RUN
from meterkit.core.routes import ORG_PARAM
from meterkit.errors import (
    AuthenticationError,
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    IdempotencyConflictError,
    InvalidRequestError,
    MeterkitError,
    StateError,
)
from meterkit.http.keeping import (
    IDEMPOTENCY_METHODS,
    KEPT,
    Keeping,
    decode_response,
    fingerprint,
)
from meterkit.http.proxies import Proxies, exclusions, forwarded_https
from meterkit.http.refusals import (
    CALLER_REQUIRED,
    HTTPS_REQUIRED,
    IDEMPOTENCY_KEY_IN_USE,
    IDEMPOTENCY_KEY_REUSED,
    IDEMPOTENCY_RESPONSE_TOO_LARGE,
    INVALID_IDEMPOTENCY_KEY,
    INVALID_REQUEST,
    JSON,
    MAX_IDEMPOTENCY_KEY,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    ORGANIZATION_REQUIRED,
    REFUSALS,
    UNAVAILABLE,
    Renderer,
    Response,
    encode_json,
    error_body,
)
from meterkit.http.request import RequestView
from meterkit.http.router import Route, Router
from meterkit.http.targets import (
    AUTO,
    DEFAULT,
    HEADER,
    IP,
    KEY,
    PARAM,
    SEGMENT,
    Source,
    Target,
    caller_source,
    cost_of,
    org_source,
    per_operation,
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


#: The statuses refunded by default: what the app refused to serve (404 not found, 405
#: method not allowed, 422 unreadable body: a framework's own answers) and its failures.
REFUNDED: frozenset[int] = frozenset({404, 405, 422, *range(500, 600)})

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
        org_default, org_chosen = per_operation(org, operations, "org", org_source)
        caller_default, caller_chosen = per_operation(caller, operations, "caller", caller_source)
        cost_default, cost_chosen = per_operation(cost, operations, "cost", cost_of)
        self._default = (
            org_default or (AUTO, None),
            caller_default or (KEY, None),
            cost_default,
            org_chosen,
            caller_chosen,
            cost_chosen,
        )
        if keystore is None:
            self._authenticate: Any = None
            self._authenticate_awaits = False
            if operation is not None and self._default[1] == (KEY, None):
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
        self._org_from_path = self._default[0][0] in (AUTO, SEGMENT, PARAM)
        self._check = meter.check
        # The meter's observers hear of the gate's refusals too.
        self._notify = getattr(meter, "_notify", None)
        self._check_awaits = iscoroutinefunction(meter.check)
        self._refund = meter.refund
        self._refund_awaits = iscoroutinefunction(meter.refund)
        self._proxies = Proxies(trusted_proxies)
        self._excluded, self._excluded_prefixes = exclusions(exclude)
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
        waits = {IDEMPOTENCY_KEY_IN_USE, UNAVAILABLE}
        self._fixed = {
            spec: self._refusal(*spec)
            for spec in REFUSALS
            if spec not in waits and spec is not METHOD_NOT_ALLOWED  # (its Allow varies)
        }
        self._fixed[IDEMPOTENCY_KEY_IN_USE] = self._refusal(
            *IDEMPOTENCY_KEY_IN_USE, extra=[("Retry-After", "1")], retry_after=1
        )
        self._fixed[UNAVAILABLE] = self._refusal(*UNAVAILABLE, extra=[("Retry-After", "1")])

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
        if kind == AUTO:
            if not target.by_key:
                # The caller's own: a path's organization, unchecked without a key, would
                # let any caller choose whom to charge.
                org: Source = (AUTO, None)
            elif ORG_PARAM in params:
                org = (SEGMENT, params[ORG_PARAM])
            else:
                org = (KEY, None)
        elif kind == PARAM:
            if argument not in params:
                raise ConfigurationError(
                    f"org='path:{argument}', but a route of {operation!r} has no {{{argument}}}",
                    where,
                )
            org = (SEGMENT, params[argument])
        else:
            org = target.org
        return Target(target.operation, target.permission, org, target.caller, target.cost)

    def target(
        self,
        operation: str,
        *,
        org: Any = DEFAULT,
        caller: Any = DEFAULT,
        cost: Any = DEFAULT,
    ) -> Target:
        """The compiled target of ``operation``, with this gate's options unless given
        here (a framework route that names its operation, and its own org, caller or
        cost). Raises :class:`ConfigurationError` for an operation the policy does not
        price or an option it cannot use."""
        if org is DEFAULT and caller is DEFAULT and cost is DEFAULT:
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
        org_src = org_source(org) if org is not DEFAULT else org_by_op.get(operation) or org_d
        caller_src = (
            caller_source(caller)
            if caller is not DEFAULT
            else caller_by_op.get(operation) or caller_d
        )
        price = cost_of(cost) if cost is not DEFAULT else cost_by_op.get(operation, cost_d)
        if caller_src[0] == KEY and self._authenticate is None:
            raise ConfigurationError(
                f"{operation!r} is metered by its bearer key: pass keystore= (or a caller= "
                "other than 'key')",
                "keystore",
            )
        built = Target(operation, op.permission, org_src, caller_src, price)
        if org is DEFAULT and caller is DEFAULT and cost is DEFAULT:
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
            return self._refused(HTTPS_REQUIRED, target)
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
        if kind == SEGMENT:
            org = segments[argument] if segments is not None else None
        elif kind == KEY:
            org = None
        elif kind == AUTO:
            org = req.params.get(ORG_PARAM) if target.by_key else None
        elif kind == PARAM:
            org = req.params.get(argument)
        elif kind == HEADER:
            org = req.header(argument)
        else:
            org = argument(req)
        if not org and kind not in (KEY, AUTO):
            return self._refused(ORGANIZATION_REQUIRED, target)
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
                    return self._refused(CALLER_REQUIRED, target, org)
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
                    return self._refused(INVALID_IDEMPOTENCY_KEY, target, org, key, caller)
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
        if kind == IP:
            address = self.client_ip(req)
            return None if address is None else "ip:" + address
        if kind == HEADER:
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
            return self._refused(NOT_FOUND, None, org)
        if self._default[1] == (KEY, None) and self._authenticate is not None:
            try:
                if self._authenticate_awaits:
                    await self._authenticate(req.authorization, org=org, permission=None)
                else:
                    self._authenticate(req.authorization, org=org, permission=None)
            except MeterkitError as exc:
                return self._failure(exc, None, None, org)
        allowed = router.allowed(segments)
        if allowed:
            self._report(METHOD_NOT_ALLOWED, None, org)
            return self._refusal(*METHOD_NOT_ALLOWED, extra=[("Allow", ", ".join(allowed))])
        return self._refused(NOT_FOUND, None, org)

    def _retried(self, verdict: int, detail: Any, target: Target, key: Any) -> Response:
        """The answer to a retry that does not run: the kept response, or a refusal
        (reported to the observers: the meter reported the replayed charge only)."""
        if verdict == BUSY:
            return self._refused(IDEMPOTENCY_KEY_IN_USE, target, None, key)
        if verdict == REUSED:
            return self._refused(IDEMPOTENCY_KEY_REUSED, target, None, key)
        assert verdict == DONE
        if not detail:
            return self._refused(IDEMPOTENCY_RESPONSE_TOO_LARGE, target, None, key)
        try:
            status, headers, body = decode_response(detail)
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

    def answered_pairs(self, admission: Admission, status: int, raw: bool) -> list[Any] | None:
        """:meth:`answered` as a list of pairs, without a dict between: text as WSGI
        takes headers, or with ``raw`` lower-case bytes as ASGI does. The usual
        response's; None when :meth:`answered` or :meth:`finish` must decide (a refund,
        due or made)."""
        if admission.refunded or self._refunds(admission, status):
            return None
        # (Decision.http_headers and raw_http_headers without their dict or keywords)
        return admission.decision._headers(raw, self._ietf, self._legacy, self._credits, False)

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
            data = encode_json(content)
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
            body=encode_json(error) if self._render is None else None,
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
            return self._fixed[UNAVAILABLE]
        if isinstance(exc, IdempotencyConflictError) and idempotency_key is not None:
            # The meter's one refusal of valid arguments: an idempotency key first used
            # for another operation, key or price.
            if not reported:
                self._report(IDEMPOTENCY_KEY_REUSED, target, org, key, caller)
            return self._fixed[IDEMPOTENCY_KEY_REUSED]
        if isinstance(exc, InvalidRequestError):
            return self._refused(INVALID_REQUEST, target, org, key, caller)
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
