"""What meterkit's middleware does to an API, written into the API's OpenAPI schema.

A FastAPI app documents its own handlers; the middleware in front of them answers
some requests itself (401, 402, 403, 429, …) and adds headers to every answer. This
module adds that to the schema, so that clients, generated SDKs and schema-driven
testers (schemathesis) see the API as it really behaves::

    from meterkit.http import openapi

    app.add_middleware(MeterMiddleware, meter=meter, keystore=keystore, exclude=["/health"])
    openapi.document(app, meter, keystore=keystore, exclude=["/health"])

Nothing here is written twice: a :class:`~meterkit.http.gate.Gate` with the
middleware's options decides sample requests to each operation of the schema, through
its one flow (:meth:`~meterkit.http.gate.Gate.admit_blocking`), with a stand-in meter
and key store that admit or refuse as asked (nothing is charged, no store is read).
Each refusal is documented as the gate renders it (its status, body and headers,
through a ``render`` hook and the ``headers`` groups when given), and the headers of
the app's answers are the ones the gate adds to a sample admission. Per operation:

- **excluded** (``/health``, ``/docs*``) or not metered: left as it is;
- **metered** (the route table, or the ``operation`` callable, names its operation):
  the bearer security requirement when the caller is a key; the optional
  ``Idempotency-Key`` header, on the methods that honour it; every refusal (400
  malformed Idempotency-Key, 401 and 403 as the key store answers them, 402, 403 plain
  HTTP, 409 Idempotency-Key in use or its response too large to keep, 422
  Idempotency-Key reused, 429, 503 backend unavailable, 400 when the request names no
  organization or caller); and the rate-limit and credit headers on every answer of
  the app (and ``Idempotent-Replayed`` on a replay);
- **not routed** (served by the app, neither excluded nor in the route table): the
  middleware answers it itself with 404 or 405 (after authenticating the caller when
  the path is under the API's), and the schema says so.

Where the app documents a status that the middleware also answers (FastAPI's 422),
the response accepts either body (``anyOf``), and a header is required only where
every answer with that status carries it.

:func:`extend` does the same to any schema dict; both are idempotent.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol

import msgspec

from meterkit.core.decision import Decision
from meterkit.core.idempotency import BUSY, DONE, RUN, Claim
from meterkit.core.outcome import REASON_CREDITS, REASON_NONE, REASON_RATE, Outcome
from meterkit.core.plan import Plan
from meterkit.core.policy import Policy, enforces
from meterkit.errors import (
    AuthenticationError,
    BackendError,
    IdempotencyConflictError,
    InvalidIdentifierError,
)
from meterkit.http.gate import MAX_IDEMPOTENCY_KEY, Admission, Gate, RequestView, Response
from meterkit.http.gate import logger as _log
from meterkit.keys.model import CODES, KeyFormat

__all__ = ["MARK", "SECURITY_SCHEME", "document", "extend"]

#: The name of the bearer security scheme in ``components.securitySchemes``.
SECURITY_SCHEME: Final = "meterkitBearer"
#: Marks what meterkit added: the schema, its operations, the responses it joined.
MARK: Final = "x-meterkit"
_METHODS: Final = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_SAMPLE_US: Final = 60_000_000  # a sample denial's wait: one minute
_PARAM: Final = re.compile(r"\{([^{}/]+)\}")

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
        "`true` on a replay: the first answer to this Idempotency-Key, sent again as it was; "
        "the request did not run again and nothing more was charged.",
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
        "Makes a retry safe: the same request sent again with the same key gets the first "
        "answer back (`Idempotent-Replayed: true`), without running or being charged again, "
        f"for 24 hours. 1 to {MAX_IDEMPOTENCY_KEY} printable characters, no commas; a key "
        "is for one request (method, path, operation and body)."
    ),
    # Printable ASCII without the comma (servers fold repeated headers with commas).
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_IDEMPOTENCY_KEY,
        "pattern": "^[ -+\\--~]+$",
    },
}

_SUMMARIES: Final = {
    "https_required": "The request was plain HTTP.",
    "invalid_api_key": "The bearer key is missing, malformed, unknown or revoked.",
    "expired_api_key": "The bearer key has expired.",
    "insufficient_permissions": "The key lacks this operation's permission.",
    "organization_not_found": "The key does not belong to this organization.",
    "invalid_idempotency_key": "The Idempotency-Key header is malformed or sent twice.",
    "idempotency_key_reused": "This Idempotency-Key was first used for another request.",
    "idempotency_key_in_use": "A request with this Idempotency-Key is still running.",
    "idempotency_response_too_large": (
        "The request with this Idempotency-Key ran; its answer was too large to keep."
    ),
    "invalid_request": "The meter refused the request's identifiers or cost.",
    "rate_limit_exceeded": "A rate tier is exhausted; nothing was charged.",
    "insufficient_credits": "The organization's credits for this period are spent.",
    "service_unavailable": "meterkit's backend is unreachable; nothing was charged.",
    "not_found": "The policy routes no operation here: the app never runs.",
    "method_not_allowed": "The policy routes other methods here: the app never runs.",
    "organization_required": "The request names no organization.",
    "caller_required": "The request names no caller.",
}

Headers = dict[str, tuple[str, dict[str, Any], bool]]


class _Refusal:
    """One answer the middleware gives in the app's place, as the gate rendered it."""

    __slots__ = ("body", "code", "headers", "media", "schema", "status")

    def __init__(self, response: Response, code: str, exact: bool) -> None:
        self.status = response.status
        self.code = code
        self.headers = _documented(name for name, _ in response.headers)
        for name, value in response.headers:
            if name.lower() == "allow":
                _, schema, required = self.headers[name]
                self.headers[name] = (f"The methods routed here: `{value}`.", schema, required)
        self.media = next(
            (v.split(";")[0].strip() for n, v in response.headers if n.lower() == "content-type"),
            "application/json",
        )
        try:
            self.body: Any = _decode(response.body)
        except msgspec.DecodeError:
            self.body = response.body.decode("utf-8", "replace")
        if not exact:
            # A render hook's bodies: their shape, whatever values a refusal puts in.
            self.schema = _shape(self.body)
        else:
            self.schema = _exact(self.body)
            error = self.body.get("error") if isinstance(self.body, dict) else None
            if isinstance(error, dict) and "retry_after" in error:
                # The one part of the seed's bodies that varies: how long to wait.
                self.schema["properties"]["error"]["properties"]["retry_after"] = {
                    "type": "integer",
                    "minimum": 0,
                }

    @property
    def summary(self) -> str:
        return _SUMMARIES.get(self.code, self.code)


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


def _shape(value: Any) -> dict[str, Any]:
    """A JSON Schema of ``value``'s shape: its keys and the types of its values."""
    if isinstance(value, Mapping):
        return {
            "type": "object",
            "required": sorted(value),
            "properties": {k: _shape(v) for k, v in value.items()},
        }
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "integer"}
    if isinstance(value, float):
        return {"type": "number"}
    if isinstance(value, list):
        return {"type": "array"}
    if value is None:
        return {}
    return {"type": "string"}


class _SampleKey:
    """What the stand-in key store admits: a key of the organization it is asked for."""

    def __init__(self, org: str | None) -> None:
        self.id = "key_sample"
        self.org = org or "org_sample"
        self.mode = "live"
        self.permissions = ("*",)


class _StandInKeys:
    """A key store that admits every key, or refuses with the error it is given; it
    records whether the gate asked it (so the caller is a bearer key)."""

    def __init__(self, keystore: Any) -> None:
        self.refusal: AuthenticationError | None = None
        self.asked = False
        rules = getattr(keystore, "rules", None) if keystore is not None else None
        statuses = getattr(rules, "statuses", None)
        if keystore is not None and not isinstance(statuses, Mapping):
            raise TypeError(f"keystore is a meterkit key store, not {keystore!r}")
        #: The status of each authentication refusal: the key store's, or 401.
        self.statuses: Mapping[str, int] = statuses or dict.fromkeys(CODES, 401)
        key_format: KeyFormat = rules.format if rules is not None else KeyFormat()
        self.key_format = f"{key_format.prefix}_live_… or {key_format.prefix}_test_…"

    def authenticate(
        self, authorization: object, *, org: str | None, permission: str | None = None
    ) -> _SampleKey:
        self.asked = True
        if self.refusal is not None:
            raise self.refusal
        return _SampleKey(org)


class _StandInMeter:
    """A meter that answers what it is told: admitted, denied, or an error; and, as its
    own backend, what a retry's Idempotency-Key finds (``claim``)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.answer: int | BaseException = REASON_NONE
        self.replayed = False
        self.claim: Claim = (RUN, None)
        self.backend = self

    def claim_response(self, *request: Any) -> Claim:
        return self.claim

    def keep_response(self, *request: Any) -> None:
        return None

    def check(
        self,
        key: Any,
        *,
        operation: str,
        org: str | None = None,
        idempotency_key: str | None = None,
        cost: object = None,
        mode: str = "live",
    ) -> Decision:
        if isinstance(self.answer, BaseException):
            raise self.answer
        return _decision(self.policy, operation, self.answer, self.replayed)

    def refund(self, decision: Decision) -> bool:
        return False


def _decision(policy: Policy, operation: str, reason: int, replayed: bool = False) -> Decision:
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
        replayed=replayed,
    )
    return Decision(
        Plan(policy, plan, "key_sample", "org_sample", "live", plan.price, None), outcome
    )


class _AnyHeader(dict[str, str]):
    """A request's headers where every header the gate may read has a value (an
    organization or a caller named by a header), but those it treats itself."""

    def get(self, name: str, default: Any = None) -> Any:
        if name in self or name in ("idempotency-key", "x-forwarded-proto", "x-forwarded-for"):
            return super().get(name, default)
        return "sample"


def _policy_of(meter: Any) -> Policy:
    if isinstance(meter, Policy):
        return meter
    policy = getattr(meter, "policy", None)
    if not isinstance(policy, Policy):
        raise TypeError(f"meter is a meterkit.Meter, AsyncMeter or Policy, not {meter!r}")
    return policy


class _Extension:
    """One extension of a schema: what the gate answers for each of its operations."""

    def __init__(
        self, schema: dict[str, Any], meter: Any, keystore: Any, options: dict[str, Any]
    ) -> None:
        self.schema = schema
        self.policy = _policy_of(meter)
        self.meter = _StandInMeter(self.policy)
        self.keys = _StandInKeys(keystore)
        self.gate = Gate(self.meter, self.keys, **options)
        self.exact = options.get("render") is None
        components = schema.setdefault("components", {})
        self.component_schemas: dict[str, Any] = components.setdefault("schemas", {})
        self.secured = False

    def apply(self) -> None:
        for path, item in self.schema.get("paths", {}).items():
            for method in _METHODS:
                operation = item.get(method)
                if isinstance(operation, dict):
                    self.operation(path, method.upper(), operation)
        if self.secured:
            pattern = self.keys.key_format
            self.schema["components"].setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": pattern,
                "description": (
                    f"An API key in the `Authorization` header: `Bearer {pattern}`. Keys "
                    "belong to one organization and carry permissions."
                ),
            }
        self.schema[MARK] = {"policy": self.policy.name}

    # -- one operation ----------------------------------------------------------------------

    def ask(
        self,
        method: str,
        path: str,
        *,
        scheme: str = "https",
        idempotency_key: str | None = None,
        answer: int | BaseException = REASON_NONE,
        refusal: AuthenticationError | None = None,
        replayed: bool = False,
        claim: Claim = (RUN, None),
        bare: bool = False,
    ) -> Response | Admission | None:
        """The gate's decision of a sample request, the stand-ins answering as told."""
        self.meter.answer, self.meter.replayed, self.meter.claim = answer, replayed, claim
        self.keys.refusal, self.keys.asked = refusal, False
        headers = {"authorization": "Bearer sample"}
        if idempotency_key is not None:
            headers["idempotency-key"] = idempotency_key
        params = {name: "{" + name + "}" for name in _PARAM.findall(path)}
        request = RequestView(
            method,
            path,
            scheme=scheme,
            peer=None if bare else "192.0.2.1",
            headers=headers,
            params=params,
        )
        if not bare:
            request.headers = _AnyHeader(request.headers)
        return self.gate.admit_blocking(request)

    def operation(self, path: str, method: str, operation: dict[str, Any]) -> None:
        try:
            first = self.ask(method, path)
        except Exception as exc:
            # A callable of the user's (org=, caller=, cost=, operation=) that cannot read
            # a sample request: this operation stays as the app documents it.
            _log.warning("meterkit: OpenAPI: %s %s left undocumented: %r", method, path, exc)
            return
        by_key = self.keys.asked
        if first is None:
            return  # excluded, or not metered
        refused: list[tuple[Response | Admission | None, str]] = []
        if isinstance(first, Admission):
            self.admitted(operation, first)
        else:
            refused.append((first, _code(first)))
        if by_key:
            self.secured = True
            if {SECURITY_SCHEME: []} not in operation.setdefault("security", []):
                operation["security"].append({SECURITY_SCHEME: []})
            for code in CODES:
                error = AuthenticationError(code, status=self.keys.statuses.get(code, 401))
                refused.append((self.ask(method, path, refusal=error), code))
        refused.append((self.ask(method, path, scheme="http"), "https_required"))
        refused.append((self.ask(method, path, bare=True), ""))
        if isinstance(first, Admission):
            refused.extend(self.metered(method, path, operation, first))
        for response, code in refused:
            if isinstance(response, Response):
                self.add(operation, _Refusal(response, code or _code(response), self.exact))

    def admitted(self, operation: dict[str, Any], admission: Admission) -> None:
        """The headers the middleware adds to every answer of the app."""
        headers = _documented(self.gate.answered(admission, 200) or {})
        headers.update(_documented(["Idempotent-Replayed"], required=False))
        for response in operation.get("responses", {}).values():
            if isinstance(response, dict) and "$ref" not in response:
                self.headers(response, headers)

    def metered(
        self, method: str, path: str, operation: dict[str, Any], admission: Admission
    ) -> list[tuple[Response | Admission | None, str]]:
        """The refusals of a metered operation past authentication."""
        name = admission.decision.operation
        plan = self.policy.plan_for(name)
        ask = self.ask
        found: list[tuple[Response | Admission | None, str]] = [
            (ask(method, path, answer=InvalidIdentifierError("a sample")), "invalid_request"),
            (self.unavailable(method, path), "service_unavailable"),
        ]
        if method in self.gate.idempotency_methods:
            parameters = operation.setdefault("parameters", [])
            if not any(
                isinstance(p, dict)
                and p.get("in") == "header"
                and str(p.get("name", "")).lower() == "idempotency-key"
                for p in parameters
            ):
                parameters.append(copy.deepcopy(_IDEMPOTENCY_KEY))
            found += [
                (ask(method, path, idempotency_key="a,b"), "invalid_idempotency_key"),
                (
                    ask(
                        method,
                        path,
                        idempotency_key="a",
                        answer=IdempotencyConflictError("a sample"),
                    ),
                    "idempotency_key_reused",
                ),
                (
                    ask(method, path, idempotency_key="a", replayed=True, claim=(BUSY, 1)),
                    "idempotency_key_in_use",
                ),
                (
                    ask(method, path, idempotency_key="a", replayed=True, claim=(DONE, b"")),
                    "idempotency_response_too_large",
                ),
            ]
        if any(enforces(tier, self.policy.shadow) for tier in plan.tiers):
            found.append((ask(method, path, answer=REASON_RATE), "rate_limit_exceeded"))
        if not self.policy.shadow:
            found.append((ask(method, path, answer=REASON_CREDITS), "insufficient_credits"))
        tiers = [tier.name for tier in plan.tiers]
        note = (
            f"Metered by meterkit as `{plan.name}`: {plan.price_text} credits; rate tiers: "
            f"{', '.join(tiers) or 'none'}."
        )
        description = operation.get("description", "")
        if note not in description:
            operation["description"] = f"{description}\n\n{note}".strip()
        operation[MARK] = {"operation": plan.name, "price": plan.price_text, "tiers": tiers}
        return found

    def unavailable(self, method: str, path: str) -> Response | Admission | None:
        """The gate's 503 for a backend failure; it logs every one, but not this sample."""
        sample = BackendError("a sample outage, for the OpenAPI schema")

        def not_the_sample(record: logging.LogRecord) -> bool:
            return not any(arg is sample for arg in record.args or ())

        _log.addFilter(not_the_sample)
        try:
            return self.ask(method, path, answer=sample)
        finally:
            _log.removeFilter(not_the_sample)

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
                "content": {refusal.media: {"schema": ref, "examples": {}}},
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
            media = response.setdefault("content", {}).setdefault(refusal.media, {})
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
        response["content"][refusal.media]["examples"][refusal.code] = {
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


def _code(response: Response) -> str:
    """The error code of a refusal in the seed's shape ("refusal" otherwise)."""
    try:
        body = _decode(response.body)
    except msgspec.DecodeError:
        return "refusal"
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else "refusal"


def extend(
    schema: dict[str, Any],
    meter: Any,
    *,
    keystore: Any = None,
    **options: Any,
) -> dict[str, Any]:
    """Add meterkit's security scheme, refusals and headers to an OpenAPI ``schema``.

    ``meter`` (or its policy), ``keystore`` and ``options`` (``exclude``,
    ``require_https``, ``org``, ``render``, ``headers``, …) are what the middleware was
    given; the key store only lends its statuses and key prefix, and is not read. The
    schema is changed in place and returned; a schema extended already is returned as
    it is.
    """
    if not isinstance(schema, dict):
        raise TypeError(f"an OpenAPI schema is a dict, not {type(schema).__name__}")
    if MARK not in schema:
        _Extension(schema, meter, keystore, options).apply()
    return schema


class _SchemaApp(Protocol):
    openapi_schema: dict[str, Any] | None

    def openapi(self) -> dict[str, Any]: ...


def document(app: Any, meter: Any, *, keystore: Any = None, **options: Any) -> None:
    """Make a FastAPI ``app``'s OpenAPI schema describe meterkit's middleware.

    Give what the middleware was given: its ``meter`` (or the policy), ``keystore`` and
    options. As FastAPI documents it, ``app.openapi`` becomes a function that builds
    the schema once (with FastAPI's own ``app.openapi``), extends it (:func:`extend`)
    and keeps it in ``app.openapi_schema``. Calling this again replaces the options.
    """
    target: _SchemaApp = app
    original: Callable[[], dict[str, Any]] = getattr(
        target.openapi, "__meterkit_original__", target.openapi
    )
    # Bad options fail now, not on the first request for /openapi.json.
    Gate(_StandInMeter(_policy_of(meter)), _StandInKeys(keystore), **options)

    def openapi() -> dict[str, Any]:
        built = target.openapi_schema
        if built is not None and MARK in built:
            return built
        schema = extend(original(), meter, keystore=keystore, **options)
        target.openapi_schema = schema
        return schema

    openapi.__meterkit_original__ = original  # type: ignore[attr-defined]
    target.openapi_schema = None
    target.openapi = openapi  # type: ignore[method-assign]
