"""The OpenAPI schema tells the truth about the middleware (``meterkit.http.openapi``).

Every answer the middleware really sends (each refusal, made to happen on a real
server) and every answer of the example app conforms to the example's schema, as
schemathesis checks it; schemathesis then fuzzes the example through ASGI with a
valid key: no 5xx, no undocumented status, no body or header off its schema.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

import meterkit
from examples.crane_ledger import ORG, UNMETERED, create_app
from meterkit.asgi import MeterMiddleware
from meterkit.errors import AuthenticationError, BackendUnavailable
from meterkit.http import gate, openapi, refusals
from meterkit.keys.memory import AsyncMemoryKeyStore
from tests.conftest import FakeClock
from tests.http._serve import serve_asgi as serve
from tests.http.test_asgi import HTTPS, burst_policy

METERED = "/organizations/{organization_id}/invoices"
#: 2026-01-15T12:00:00Z: mid-month, so no credit period turns while a test runs.
MID_MONTH = 1_768_478_400.0


def body_of(raw: bytes) -> Any:
    return json.loads(raw)


def seed_body(status: int, type_: str, code: str, message: str) -> dict[str, Any]:
    return {"error": {"type": type_, "code": code, "message": message, "status": status}}


class Example:
    """The example app on a real server, its schema as schemathesis reads it, and keys."""

    def __init__(self, url: str, app: FastAPI, store: Any, clock: FakeClock) -> None:
        self.url = url
        self.app = app
        self.store = store
        self.clock = clock
        self.schema = schemathesis.openapi.from_dict(app.openapi())
        self.http = httpx.Client(base_url=url, timeout=10)
        self.key, _ = store.create(org=ORG, permissions=["*"])

    def send(
        self,
        method: str,
        template: str,
        key: str | None = None,
        *,
        https: bool = True,
        invoice_id: str = "",
        **kwargs: Any,
    ) -> httpx.Response:
        """One request to an operation of the schema; its response is checked against
        the operation's documented responses (status, body, headers)."""
        headers = dict(kwargs.pop("headers", {}))
        if https:
            headers.update(HTTPS)
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        path = template.replace("{organization_id}", ORG).replace("{invoice_id}", invoice_id)
        response = self.http.request(method, path, headers=headers, **kwargs)
        self.schema[template][method].validate_response(response)
        return response


@pytest.fixture
def start(clock: FakeClock) -> Iterator[Callable[..., Example]]:
    """Start the example app (memory, fake clock) under uvicorn."""
    clock.now = MID_MONTH
    with ExitStack() as stack:

        def start(
            policy: meterkit.Policy | None = None, store: Any = None, **options: Any
        ) -> Example:
            policy = policy or meterkit.Policy.crane_ledger()
            meter = meterkit.AsyncMeter(policy, meterkit.MemoryBackend(clock=clock))
            keystore = store or AsyncMemoryKeyStore(clock=clock)
            app = create_app(meter=meter, keystore=keystore, **options)
            url = stack.enter_context(serve(app))
            example = Example(url, app, keystore.sync, clock)
            stack.callback(example.http.close)
            return example

        yield start


def codes(response: dict[str, Any]) -> set[str]:
    """The error codes a documented response's examples show."""
    return set(response["content"]["application/json"]["examples"])


# -- what the schema says ---------------------------------------------------------------------


def test_metered_operations_list_every_refusal_with_the_gate_s_own_bodies() -> None:
    """Each metered operation documents the bearer scheme, 400/401/402/403/422/429/503,
    with the exact bodies the gate and the key rules send, and the headers; those whose
    method honours Idempotency-Key document the header and its 409s."""
    schema = create_app().openapi()
    scheme = schema["components"]["securitySchemes"][openapi.SECURITY_SCHEME]
    assert scheme == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "cl_live_… or cl_test_…",
        "description": scheme["description"],
    }
    for path, item in schema["paths"].items():
        if path == "/health":
            continue
        for method, operation in item.items():
            where = f"{method.upper()} {path}"
            assert operation["security"] == [{openapi.SECURITY_SCHEME: []}], where
            responses = operation["responses"]
            assert {"400", "401", "402", "403", "422", "429", "503"} <= set(responses), where
            assert codes(responses["401"]) == {
                "invalid_api_key",
                "expired_api_key",
                "insufficient_permissions",
                "organization_not_found",
            }
            assert codes(responses["403"]) == {"https_required"}
            assert responses["429"]["headers"]["Retry-After"]["required"] is True
            assert responses["401"]["headers"]["WWW-Authenticate"]["required"] is True
            success = next(r for status, r in responses.items() if status.startswith("2"))
            assert {"RateLimit", "RateLimit-Policy", "X-Credits-Charged"} <= set(
                success["headers"]
            ), where
            assert success["headers"]["RateLimit"]["required"] is True
            keyed = method.upper() in gate.IDEMPOTENCY_METHODS
            named = {p["name"] for p in operation.get("parameters", [])}
            assert ("Idempotency-Key" in named) == keyed, where
            if keyed:
                assert codes(responses["409"]) == {
                    "idempotency_key_in_use",
                    "idempotency_response_too_large",
                }, where
                assert responses["409"]["headers"]["Retry-After"]["required"] is False
                assert "idempotency_key_reused" in codes(responses["422"]), where
            else:
                assert "409" not in responses, where
    examples = {
        **schema["paths"][METERED]["get"]["responses"],
        **{f"post {k}": v for k, v in schema["paths"][METERED]["post"]["responses"].items()},
    }
    shown = {
        name: example["value"]
        for response in examples.values()
        for name, example in response.get("content", {})
        .get("application/json", {})
        .get("examples", {})
        .items()
    }
    assert shown["https_required"] == body_of(refusals.HTTPS_REQUIRED_BODY)
    assert shown["service_unavailable"] == seed_body(
        503,
        "api_error",
        "service_unavailable",
        "The API is temporarily unavailable. Try again shortly.",
    )
    assert shown["idempotency_key_reused"] == seed_body(
        422,
        "invalid_request_error",
        "idempotency_key_reused",
        "This Idempotency-Key was already used for a different request.",
    )
    assert shown["expired_api_key"] == AuthenticationError("expired_api_key").body
    assert shown["rate_limit_exceeded"]["error"]["code"] == "rate_limit_exceeded"


def test_excluded_routes_are_left_as_fastapi_wrote_them() -> None:
    """/health, excluded from metering, keeps FastAPI's own description: no security,
    no refusal, no meterkit header."""
    app = create_app()
    plain = FastAPI.openapi(app)  # FastAPI's own method: the schema before meterkit
    app.openapi_schema = None
    assert app.openapi()["paths"]["/health"] == plain["paths"]["/health"]


def test_documenting_twice_is_documenting_once() -> None:
    """document() and extend() are idempotent: a second call changes nothing."""
    once = create_app().openapi()
    app = create_app()
    policy = meterkit.Policy.crane_ledger()
    openapi.document(app, policy, exclude=UNMETERED)
    openapi.document(app, policy, exclude=UNMETERED)
    twice = app.openapi()
    assert app.openapi() is twice  # cached, as FastAPI caches its own
    assert twice == once
    again = openapi.extend(copy.deepcopy(twice), policy, exclude=UNMETERED)
    assert again == once


def test_the_served_schema_is_the_documented_one(start: Callable[..., Example]) -> None:
    """GET /openapi.json (excluded from metering) serves the extended schema."""
    example = start()
    served = example.http.get("/openapi.json").json()
    assert served == example.app.openapi()
    assert openapi.SECURITY_SCHEME in served["components"]["securitySchemes"]


def test_authentication_statuses_follow_the_key_store() -> None:
    """A key store that answers insufficient_permissions with 403 has it documented under
    403, beside https_required, and no longer under 401."""
    store = AsyncMemoryKeyStore(status_codes={"insufficient_permissions": 403})
    meter = meterkit.AsyncMeter(meterkit.Policy.crane_ledger(), meterkit.MemoryBackend())
    app = create_app(meter=meter, keystore=store)
    responses = app.openapi()["paths"][METERED]["post"]["responses"]
    assert codes(responses["403"]) == {"https_required", "insufficient_permissions"}
    assert "insufficient_permissions" not in codes(responses["401"])
    assert "WWW-Authenticate" not in responses["403"].get("headers", {})


def test_a_render_hook_and_header_groups_are_documented_as_they_answer() -> None:
    """With a render hook answering problem+json and only the IETF headers, the schema
    shows problem+json bodies of that shape and no X-RateLimit or X-Credits header."""

    def render(
        status: int, code: str, message: str, retry_after: int | None, decision: Any
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        return status, {"Content-Type": "application/problem+json"}, {"title": code}

    meter = meterkit.AsyncMeter(meterkit.Policy.crane_ledger(), meterkit.MemoryBackend())
    app = create_app(meter=meter, keystore=AsyncMemoryKeyStore(), render=render, headers=["ietf"])
    responses = app.openapi()["paths"][METERED]["get"]["responses"]
    limited = responses["429"]["content"]["application/problem+json"]
    assert limited["examples"]["rate_limit_exceeded"]["value"] == {"title": "rate_limit_exceeded"}
    assert set(responses["200"]["headers"]) == {
        "RateLimit",
        "RateLimit-Policy",
        "Idempotent-Replayed",
    }
    assert "X-RateLimit-Limit" not in responses["429"]["headers"]


def test_routes_outside_the_route_table_document_the_gate_s_404_and_405(
    clock: FakeClock,
) -> None:
    """An app route the policy does not route is answered by the middleware (404 after
    authentication, 405 where another method is routed, 404 at once without an
    organization in the path); the schema says so, and the real answers conform."""
    seed = meterkit.Policy.crane_ledger()
    routes = {f"GET {METERED}": "invoices.list"}
    policy = meterkit.Policy(seed.tiers, seed.costs, seed.credits, routes=routes)
    meter = meterkit.AsyncMeter(policy, meterkit.MemoryBackend(clock=clock))
    store = AsyncMemoryKeyStore(clock=clock)
    app = FastAPI()
    app.add_middleware(MeterMiddleware, meter=meter, keystore=store)

    @app.get(METERED)
    async def invoices(organization_id: str) -> dict[str, str]:
        return {}

    @app.get("/organizations/{organization_id}/archive")
    async def archive(organization_id: str) -> dict[str, str]:
        return {}

    @app.patch("/organizations/{organization_id}/invoices")
    async def patch_invoices(organization_id: str) -> dict[str, str]:
        return {}

    @app.get("/status")
    async def status() -> dict[str, str]:
        return {}

    openapi.document(app, meter, keystore=store)
    paths = app.openapi()["paths"]
    assert codes(paths["/organizations/{organization_id}/archive"]["get"]["responses"]["404"]) == {
        "not_found"
    }
    patch = paths[METERED]["patch"]["responses"]
    assert codes(patch["405"]) == {"method_not_allowed"}
    assert patch["405"]["headers"]["Allow"]["required"] is True
    assert "security" not in paths["/status"]["get"]
    assert set(paths["/status"]["get"]["responses"]) == {"200", "403", "404"}  # (HTTPS first)

    schema = schemathesis.openapi.from_dict(app.openapi())
    plaintext, _ = store.sync.create(org=ORG, permissions=["*"])
    auth = {**HTTPS, "Authorization": f"Bearer {plaintext}"}
    with serve(app) as url, httpx.Client(base_url=url, headers=auth) as http:
        answers = {
            ("GET", "/organizations/{organization_id}/archive"): http.get(
                f"/organizations/{ORG}/archive"
            ),
            ("PATCH", METERED): http.patch(f"/organizations/{ORG}/invoices"),
            ("GET", "/status"): http.get("/status"),
        }
    assert [r.status_code for r in answers.values()] == [404, 405, 404]
    for (method, path), response in answers.items():
        schema[path][method].validate_response(response)


# -- what the middleware really sends conforms ---------------------------------------------


def test_every_refusal_the_middleware_sends_conforms(start: Callable[..., Example]) -> None:
    """Plain HTTP, each authentication refusal, a bad and a reused Idempotency-Key, and
    the example's own answers, sent for real, all conform to the documented responses."""
    example = start()
    store, clock = example.store, example.clock
    path = METERED
    assert example.send("GET", path, https=False).status_code == 403
    assert example.send("GET", path).status_code == 401
    assert example.send("GET", path, "cl_live_" + "x" * 44).status_code == 401
    other, _ = store.create(org="org_other", permissions=["*"])
    assert example.send("GET", path, other).json()["error"]["code"] == "organization_not_found"
    reader, _ = store.create(org=ORG, permissions=["invoices:read"])
    denied = example.send("POST", path, reader, json={"customer": "A", "amount": "1"})
    assert denied.json()["error"]["code"] == "insufficient_permissions"
    expiring, _ = store.create(org=ORG, permissions=["*"], expires_at=clock() + 1)
    clock.advance(2)
    assert example.send("GET", path, expiring).json()["error"]["code"] == "expired_api_key"

    key = example.key
    sample = {"customer": "A", "amount": 5}
    bad = example.send("POST", path, key, json=sample, headers={"Idempotency-Key": "a,b"})
    assert bad.json()["error"]["code"] == "invalid_idempotency_key"
    retry = {"Idempotency-Key": "retry-1"}
    created = example.send("POST", path, key, json=sample, headers=retry)
    assert created.status_code == 201
    replay = example.send("POST", path, key, json=sample, headers=retry)
    assert replay.headers["Idempotent-Replayed"] == "true"
    reused = example.send("POST", path, key, json={**sample, "amount": 6}, headers=retry)
    assert reused.json()["error"]["code"] == "idempotency_key_reused"

    invoice = created.json()["id"]
    one = "/organizations/{organization_id}/invoices/{invoice_id}"
    assert example.send("GET", one, key, invoice_id=invoice).status_code == 200
    assert example.send("GET", one, key, invoice_id="inv_0").status_code == 404
    assert example.send("PUT", one, key, invoice_id=invoice, json={}).status_code == 422
    pdf = example.send("POST", one + "/pdf", key, invoice_id=invoice)
    assert pdf.headers["content-type"] == "application/pdf"
    example.app.state.rates.available = False
    convert = "/organizations/{organization_id}/currency/convert"
    down = example.send("POST", convert, key, json={"amount": 1, "from": "USD", "to": "GBP"})
    assert down.status_code == 503


def test_denials_conform(start: Callable[..., Example]) -> None:
    """429 (a burst of one) and 402 (credits spent) conform, with their headers."""
    example = start(policy=burst_policy(1))
    assert example.send("GET", METERED, example.key).status_code == 200
    limited = example.send("GET", METERED, example.key)
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "60"
    example.clock.advance(60)
    meter = meterkit.Meter(burst_policy(1), example.app.state.meter.backend)
    meter.set_allowance(ORG, "0.001")
    broke = example.send("GET", METERED, example.key)
    assert broke.status_code == 402


class _DownStore(AsyncMemoryKeyStore):
    """A key store whose backend is unreachable."""

    async def authenticate(self, *args: Any, **kwargs: Any) -> Any:
        raise BackendUnavailable("the key store's Redis is down")


def test_backend_outage_conforms(start: Callable[..., Example]) -> None:
    """The 503 of an unreachable backend conforms, Retry-After included."""
    example = start(store=_DownStore())
    down = example.send("GET", METERED, example.key)
    assert down.status_code == 503
    assert down.headers["Retry-After"] == "1"


# -- schemathesis fuzzes the example ----------------------------------------------------------


def example_app() -> tuple[FastAPI, str]:
    """The example app (memory) with one key of every permission, on a clock that moves
    a second per reading: the burst tier never fills, the run is the same every time."""
    clock = itertools.count(MID_MONTH, 1.0).__next__
    policy = meterkit.Policy.crane_ledger()
    keystore = AsyncMemoryKeyStore(clock=clock)
    plaintext, _ = keystore.sync.create(org=ORG, permissions=["*"])
    meter = meterkit.AsyncMeter(policy, meterkit.MemoryBackend(clock=clock))
    return create_app(meter=meter, keystore=keystore), str(plaintext)


FUZZED_APP, FUZZ_KEY = example_app()
# Read from the app itself (no server, no lifespan: the key above is made already);
# schemathesis then calls the app through ASGI. Every request names the key's own
# organization, so that it reaches the handlers.
fuzzed = schemathesis.openapi.from_dict(
    FUZZED_APP.openapi(),
    config=SchemathesisConfig.from_dict({"parameters": {"path.organization_id": ORG}}),
)
fuzzed.app = FUZZED_APP


@fuzzed.parametrize()
@settings(
    max_examples=15,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_schemathesis_finds_nothing_undocumented(case: Any) -> None:
    """Schema-valid requests with a valid key: no 5xx, every status documented, every
    body and header as documented, no schema-valid request refused."""
    idem = case.headers.get("Idempotency-Key") if case.headers else None
    if idem is not None:
        # One request's keys apart from another's: a key reused for another operation,
        # path or body is a (documented) 422, which a schema-valid request must not run
        # into by chance.
        request = [case.operation.label, case.path_parameters, case.body]
        digest = hashlib.sha256(json.dumps(request, default=str).encode()).hexdigest()[:8]
        case.headers["Idempotency-Key"] = f"{digest}:{idem}"[: gate.MAX_IDEMPOTENCY_KEY]
    case.call_and_validate(
        base_url="https://testserver",
        headers={"Authorization": f"Bearer {FUZZ_KEY}"},
    )
