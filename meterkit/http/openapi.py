"""What meterkit's middleware does to an API, written into the API's OpenAPI schema.

A FastAPI app documents its own handlers; the middleware in front of them answers
some requests itself (401, 402, 403, 429, …) and adds headers to every answer. This
module adds that to the schema, so that clients, generated SDKs and schema-driven
testers (schemathesis) see the API as it really behaves::

    from meterkit.http import openapi

    app.add_middleware(MeterMiddleware, meter=meter, keystore=keystore, exclude=["/health"])
    openapi.document(app, meter.policy, keystore=keystore, exclude=["/health"])

Nothing here is written twice: every refusal is the one the gate itself
(:class:`meterkit.http.gate.Gate`, built with the middleware's options) renders for a
sample request, with its exact body and header names, and the headers of the app's
answers are the ones the gate adds to a sample admitted decision. For every operation of the
schema, the gate also says what happens to it:

- **excluded** (``/health``, ``/docs*``): left as it is;
- **metered** (the policy's route table names its operation): the bearer security
  requirement; the optional ``Idempotency-Key`` header; the middleware's refusals
  (400 malformed Idempotency-Key, 401 and 403 as the key store answers them, 402,
  403 plain HTTP, 422 Idempotency-Key reused, 429, 503 backend unavailable); and the
  rate-limit and credit headers on every answer of the app;
- **not routed** (served by the app, neither excluded nor in the route table): the
  middleware answers it itself with 404 or 405 (after authenticating the caller when
  the path names an organization), and the schema says so.

Where the app documents a status that the middleware also answers (FastAPI's 422),
the response accepts either body (``anyOf``), and a header is required only where
every answer with that status carries it.

:func:`extend` does the same to any schema dict; both are idempotent.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec

from meterkit.core.decision import Decision
from meterkit.core.outcome import REASON_CREDITS, REASON_NONE, REASON_RATE, Outcome
from meterkit.core.plan import Plan
from meterkit.core.policy import enforces
from meterkit.errors import (
    AuthenticationError,
    BackendError,
    InvalidIdentifierError,
    InvalidRequestError,
)
from meterkit.http.gate import Gate, Pending, Response
from meterkit.http.gate import logger as _log
from meterkit.keys.model import CODES, KeyFormat

if TYPE_CHECKING:
    from meterkit.core.policy import Policy

__all__ = ["MARK", "SECURITY_SCHEME", "document", "extend"]

#: The name of the bearer security scheme in ``components.securitySchemes``.
SECURITY_SCHEME: Final = "meterkitBearer"
#: Marks what meterkit added: the schema, its operations, the responses it joined.
MARK: Final = "x-meterkit"
_METHODS: Final = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_SAMPLE_US: Final = 60_000_000  # a sample denial's wait: one minute

_decode = msgspec.json.decode

# What each header the gate sends means, and the shape of its value.
_INTEGER: Final = {"type": "string", "pattern": "^[0-9]+$"}
_CREDITS: Final = {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?$"}
_HEADERS: Final[dict[str, tuple[str, dict[str, Any]]]] = {
    "ratelimit": (
        'Each tier\'s requests left and seconds until it resets (IETF draft), e.g. `"key-hour";'
        'r=999;t=3600, "key-burst";r=99;t=60`.',
        {"type": "string"},
    ),
    "ratelimit-policy": (
        'Each tier\'s quota and window in seconds (IETF draft), e.g. `"key-hour";q=1000;w=3600`.',
        {"type": "string"},
    ),
    "x-ratelimit-limit": ("The quota of the tightest tier.", _INTEGER),
    "x-ratelimit-remaining": ("Requests left in the tightest tier.", _INTEGER),
    "x-ratelimit-reset": ("Seconds until the tightest tier resets.", _INTEGER),
    "x-credits-charged": (
        "Credits this request cost: 0 when the app's answer was refunded.",
        _CREDITS,
    ),
    "x-credits-remaining": ("The organization's credits left this period.", _CREDITS),
    "retry-after": ("Seconds to wait before a retry.", _INTEGER),
    "www-authenticate": ("The authentication scheme to use: `Bearer`.", {"type": "string"}),
    "allow": ("The methods routed on this path.", {"type": "string"}),
    "idempotent-replayed": (
        "`true` when this Idempotency-Key was seen before: the first answer's charge stands "
        "and nothing more was charged.",
        {"type": "string", "enum": ["true"]},
    ),
}
#: Headers of the body itself, which the schema's content already describes.
_BODY_HEADERS: Final = frozenset({"content-type", "content-length"})

_IDEMPOTENCY_KEY: Final[dict[str, Any]] = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": (
        "Makes a retry safe: the same request sent again with the same key is charged "
        "once. 1 to 256 printable characters, no commas; a key is for one operation."
    ),
    # Printable ASCII without the comma (servers fold repeated headers with commas).
    "schema": {"type": "string", "minLength": 1, "maxLength": 256, "pattern": "^[ -+\\--~]+$"},
}

_SUMMARIES: Final = {
    "https_required": "The request was plain HTTP.",
    "invalid_api_key": "The bearer key is missing, malformed, unknown or revoked.",
    "expired_api_key": "The bearer key has expired.",
    "insufficient_permissions": "The key lacks this operation's permission.",
    "organization_not_found": "The key does not belong to this organization.",
    "invalid_idempotency_key": "The Idempotency-Key header is malformed or sent twice.",
    "idempotency_key_reused": "This Idempotency-Key was first used for another request.",
    "invalid_request": "The meter refused the request's identifiers.",
    "rate_limit_exceeded": "A rate tier is exhausted; nothing was charged.",
    "insufficient_credits": "The organization's credits for this period are spent.",
    "service_unavailable": "meterkit's backend is unreachable; nothing was charged.",
    "not_found": "The policy routes no operation here: the app never runs.",
    "method_not_allowed": "The policy routes other methods here: the app never runs.",
}

Headers = dict[str, tuple[str, dict[str, Any], bool]]


class _Refusal:
    """One answer the middleware gives in the app's place, as the gate renders it."""

    __slots__ = ("body", "code", "headers", "schema", "status")

    def __init__(self, response: Response) -> None:
        self.status = response.status
        self.body: dict[str, Any] = _decode(response.body)
        self.code: str = self.body["error"]["code"]
        self.headers = _documented(name for name, _ in response.headers)
        for name, value in response.headers:
            if name.lower() == "allow":
                _, schema, required = self.headers[name]
                self.headers[name] = (f"The methods routed here: `{value}`.", schema, required)
        self.schema = _exact(self.body)
        if "retry_after" in self.body["error"]:
            # The one part of a body that varies: how long to wait.
            self.schema["properties"]["error"]["properties"]["retry_after"] = {
                "type": "integer",
                "minimum": 0,
            }

    @property
    def summary(self) -> str:
        return _SUMMARIES.get(self.code) or str(self.body["error"]["message"])


def _documented(names: Iterable[str], required: bool = True) -> Headers:
    """OpenAPI descriptions of the headers ``names``, as the gate spells them."""
    found: Headers = {}
    for name in names:
        if name.lower() in _BODY_HEADERS:
            continue
        text, schema = _HEADERS.get(name.lower(), ("Set by meterkit.", {"type": "string"}))
        found[name] = (text, schema, required)
    return found


def _exact(value: Any) -> dict[str, Any]:
    """A JSON Schema accepting exactly ``value`` (``enum`` of one: OpenAPI 3.0 and 3.1)."""
    if isinstance(value, Mapping):
        return {
            "type": "object",
            "required": sorted(value),
            "additionalProperties": False,
            "properties": {k: _exact(v) for k, v in value.items()},
        }
    return {"enum": [value]}


def _decision(policy: Policy, operation: str, reason: int) -> Decision:
    """A sample decision of ``operation``: admitted, or denied for ``reason``."""
    plan = policy.plan_for(operation)
    denied = reason != REASON_NONE
    outcome = Outcome(
        allowed=not denied,
        reason=reason,
        now=0,
        retry_after=_SAMPLE_US if denied else 0,
        tiers=tuple((0, _SAMPLE_US, int(denied)) for _ in plan.tiers),
        charged=0 if denied else plan.price,
        balance=policy.credits.allowance_micro,
        period_end=_SAMPLE_US,
        charge_id="" if denied else "sample",
        replayed=False,
    )
    return Decision(Plan(policy, plan, "key", "org", "live", plan.price, None), outcome)


class _Extension:
    """One extension of a schema: what the gate answers for each of its operations."""

    def __init__(self, schema: dict[str, Any], policy: Policy, keystore: Any, gate: Gate) -> None:
        self.schema = schema
        self.policy = policy
        self.gate = gate
        self.key_format = _key_format(keystore)
        self.statuses = _statuses(keystore)
        components = schema.setdefault("components", {})
        self.component_schemas: dict[str, Any] = components.setdefault("schemas", {})

    def apply(self) -> None:
        pattern = self.key_format
        self.schema["components"].setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": pattern,
            "description": (
                f"An API key in the `Authorization` header: `Bearer {pattern}`. Keys belong "
                "to one organization and carry permissions."
            ),
        }
        for path, item in self.schema.get("paths", {}).items():
            for method in _METHODS:
                operation = item.get(method)
                if isinstance(operation, dict):
                    self.operation(path, method.upper(), operation)
        self.schema[MARK] = {"policy": self.policy.name}

    # -- one operation ----------------------------------------------------------------------

    def operation(self, path: str, method: str, operation: dict[str, Any]) -> None:
        begin = self.gate.begin
        step = begin(method, path, "https", None, None, None, None)
        if step is None:
            return  # excluded: the middleware never sees it
        if isinstance(step, Response):
            # No route, and no organization in the path: refused before authentication.
            self.add(operation, _Refusal(step))
            return
        if step.operation is not None:
            # The app's own answers first, before any refusal joins them.
            self.admitted(operation, step.operation)
        operation.setdefault("security", [])
        if {SECURITY_SCHEME: []} not in operation["security"]:
            operation["security"].append({SECURITY_SCHEME: []})
        plain = begin(method, path, "http", None, None, None, None)
        if isinstance(plain, Response):
            self.add(operation, _Refusal(plain))
        for code in CODES:
            error = AuthenticationError(code, status=self.statuses.get(code, 401))
            self.add(operation, _Refusal(self.gate.failure(error, step)))
        if step.operation is None:
            refused = self.gate.unrouted(step)
            if refused is not None:
                self.add(operation, _Refusal(refused))
            return
        self.metered(operation, step)

    def admitted(self, operation: dict[str, Any], name: str) -> None:
        """The headers the middleware adds to every answer of the app."""
        decision = _decision(self.policy, name, REASON_NONE)
        headers = _documented(self.gate.admitted_headers(decision, refunded=False))
        headers.update(_documented(["Idempotent-Replayed"], required=False))
        for response in operation.get("responses", {}).values():
            if isinstance(response, dict) and "$ref" not in response:
                self.headers(response, headers)

    def metered(self, operation: dict[str, Any], step: Pending) -> None:
        assert step.operation is not None
        gate, policy = self.gate, self.policy
        parameters = operation.setdefault("parameters", [])
        if not any(
            isinstance(p, dict)
            and p.get("in") == "header"
            and str(p.get("name", "")).lower() == "idempotency-key"
            for p in parameters
        ):
            parameters.append(copy.deepcopy(_IDEMPOTENCY_KEY))
        malformed = _with(step, idempotency_key="a,b")
        refusals = [gate.unrouted(malformed)]
        refusals.append(gate.failure(InvalidIdentifierError("a sample"), step))
        reused = _with(step, idempotency_key="a")
        refusals.append(gate.failure(InvalidRequestError("a sample"), reused))
        refusals.append(_unavailable(gate, step))
        plan = policy.plan_for(step.operation)
        if any(enforces(tier, policy.shadow) for tier in plan.tiers):
            refusals.append(gate.refusal(_decision(policy, step.operation, REASON_RATE)))
        if not policy.shadow:
            refusals.append(gate.refusal(_decision(policy, step.operation, REASON_CREDITS)))
        for response in refusals:
            if response is not None:
                self.add(operation, _Refusal(response))
        tiers = [tier.name for tier in plan.tiers]
        note = (
            f"Metered by meterkit as `{plan.name}`: {plan.price_text} credits; rate tiers: "
            f"{', '.join(tiers) or 'none'}."
        )
        description = operation.get("description", "")
        if note not in description:
            operation["description"] = f"{description}\n\n{note}".strip()
        operation[MARK] = {"operation": plan.name, "price": plan.price_text, "tiers": tiers}

    # -- responses ---------------------------------------------------------------------------

    def component(self, refusal: _Refusal) -> str:
        """A schema component for the refusal's body; its ``$ref``."""
        name = f"MeterkitError.{refusal.code}"
        if self.component_schemas.get(name, refusal.schema) != refusal.schema:
            # The same code with another status (a key store's choice): its own component.
            name = f"{name}.{refusal.status}"
        self.component_schemas[name] = refusal.schema
        return f"#/components/schemas/{name}"

    def add(self, operation: dict[str, Any], refusal: _Refusal) -> None:
        """Add ``refusal`` to the operation's responses, beside what is there."""
        responses = operation.setdefault("responses", {})
        key = str(refusal.status)
        response = responses.get(key)
        if isinstance(response, dict) and "$ref" in response:
            return  # a shared response object: not this operation's to change
        line = f"\n- `{refusal.code}`: {refusal.summary}"
        ref = {"$ref": self.component(refusal)}
        if response is None:
            response = responses[key] = {
                "description": f"Refused by meterkit:{line}",
                "content": {"application/json": {"schema": ref, "examples": {}}},
                MARK: [refusal.code],
            }
            self.headers(response, refusal.headers)
        else:
            joined = response.setdefault(MARK, [])
            if refusal.code in joined:
                return
            description = response.get("description", "")
            if not joined:
                description += "\n\nOr refused by meterkit:"
            response["description"] = (description + line).strip()
            media = response.setdefault("content", {}).setdefault("application/json", {})
            present = media.get("schema")
            if present is None:
                media["schema"] = ref
            elif joined and "anyOf" in present:
                present["anyOf"].append(ref)
            else:
                media["schema"] = {"anyOf": [present, ref]}
            media.setdefault("examples", {})
            joined.append(refusal.code)
            # A header is required only where every answer with this status carries it.
            for name, header in response.get("headers", {}).items():
                if name not in refusal.headers and isinstance(header, dict):
                    header["required"] = False
            self.headers(response, {n: (t, s, False) for n, (t, s, _) in refusal.headers.items()})
        response["content"]["application/json"]["examples"][refusal.code] = {
            "summary": refusal.summary,
            "value": refusal.body,
        }

    @staticmethod
    def headers(response: dict[str, Any], headers: Headers) -> None:
        """Document ``headers`` on ``response``, leaving those it has alone."""
        documented = response.setdefault("headers", {})
        lowered = {name.lower() for name in documented}
        for name, (text, schema, required) in headers.items():
            if name.lower() not in lowered:
                documented[name] = {"description": text, "required": required, "schema": schema}
        if not documented:
            del response["headers"]


def _with(step: Pending, *, idempotency_key: str) -> Pending:
    """``step`` as if it had come with this Idempotency-Key."""
    pending = copy.copy(step)
    pending.idempotency_key = idempotency_key
    return pending


def _unavailable(gate: Gate, step: Pending) -> Response:
    """The gate's 503 for a backend failure; the gate logs every one, but not this sample."""
    sample = BackendError("a sample outage, for the OpenAPI schema")

    def not_the_sample(record: logging.LogRecord) -> bool:
        return not any(arg is sample for arg in record.args or ())

    _log.addFilter(not_the_sample)
    try:
        return gate.failure(sample, step)
    finally:
        _log.removeFilter(not_the_sample)


def _statuses(keystore: Any) -> Mapping[str, int]:
    """The HTTP status of each authentication refusal: the key store's, or 401."""
    if keystore is None:
        return dict.fromkeys(CODES, 401)
    statuses = getattr(getattr(keystore, "rules", None), "statuses", None)
    if not isinstance(statuses, Mapping):
        raise TypeError(f"keystore is a meterkit key store, not {keystore!r}")
    return statuses


def _key_format(keystore: Any) -> str:
    key_format: KeyFormat = keystore.rules.format if keystore is not None else KeyFormat()
    return f"{key_format.prefix}_live_… or {key_format.prefix}_test_…"


def extend(
    schema: dict[str, Any],
    policy: Policy,
    *,
    keystore: Any = None,
    **options: Any,
) -> dict[str, Any]:
    """Add meterkit's security scheme, refusals and headers to an OpenAPI ``schema``.

    ``policy`` and ``options`` (``exclude``, ``require_https``, …) are what the
    middleware was given; ``keystore`` (optional) gives each authentication refusal's
    status and the key prefix. The schema is changed in place and returned; a schema
    extended already is returned as it is.
    """
    if not isinstance(schema, dict):
        raise TypeError(f"an OpenAPI schema is a dict, not {type(schema).__name__}")
    if MARK not in schema:
        _Extension(schema, policy, keystore, Gate(policy, **options)).apply()
    return schema


class _SchemaApp(Protocol):
    openapi_schema: dict[str, Any] | None

    def openapi(self) -> dict[str, Any]: ...


def document(app: Any, policy: Policy, *, keystore: Any = None, **options: Any) -> None:
    """Make a FastAPI ``app``'s OpenAPI schema describe meterkit's middleware.

    Give the middleware's own ``policy`` and options (``exclude``, ``require_https``,
    …) and, for its statuses and key prefix, its ``keystore``. As FastAPI documents
    it, ``app.openapi`` becomes a function that builds the schema once (with FastAPI's
    own ``app.openapi``), extends it (:func:`extend`) and keeps it in
    ``app.openapi_schema``. Calling this again replaces the previous options.
    """
    target: _SchemaApp = app
    original: Callable[[], dict[str, Any]] = getattr(
        target.openapi, "__meterkit_original__", target.openapi
    )
    Gate(policy, **options)  # bad options fail now, not on the first /openapi.json
    _statuses(keystore)

    def openapi() -> dict[str, Any]:
        built = target.openapi_schema
        if built is not None and MARK in built:
            return built
        schema = extend(original(), policy, keystore=keystore, **options)
        target.openapi_schema = schema
        return schema

    openapi.__meterkit_original__ = original  # type: ignore[attr-defined]
    target.openapi_schema = None
    target.openapi = openapi  # type: ignore[method-assign]
