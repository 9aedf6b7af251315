"""The ASGI middleware end to end: the example app under uvicorn on loopback, over HTTP.

Each test starts its own server with in-memory state on a fake clock; the test keeps
a synchronous view of the same state (``Demo.meter``, ``Demo.store``) to read usage
and make keys. The last part tests the shared gate without a server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route as StarletteRoute

import meterkit
from examples.crane_ledger import ORG, create_app, metered_routes
from meterkit.asgi import MeterMiddleware
from meterkit.connect import async_keystore_from_url, keystore_from_url
from meterkit.errors import AuthenticationError, ConfigurationError
from meterkit.keys.memory import AsyncMemoryKeyStore, MemoryKeyStore
from tests._servers import free_port
from tests.conftest import FakeClock
from tests.http._serve import serve_asgi as serve

HTTPS = {"X-Forwarded-Proto": "https"}
CONVERSION = {"amount": 1, "from": "USD", "to": "GBP"}
HTTPS_REQUIRED = {
    "error": {
        "type": "invalid_request_error",
        "code": "https_required",
        "message": "All API requests must be made over HTTPS.",
        "status": 403,
    }
}


def burst_policy(limit: int) -> meterkit.Policy:
    """The seed's prices and routes with one short tier: ``limit`` per minute per key."""
    seed = meterkit.Policy.crane_ledger()
    tier = meterkit.Tier("key-burst", "key", f"{limit}/minute", "sliding_log")
    return meterkit.Policy([tier], seed.costs, seed.credits, routes=seed.routes, name="burst")


class Demo:
    """The running example: an HTTP client, its demo keys, and a view of its state."""

    def __init__(
        self,
        url: str,
        app: Any,
        backend: meterkit.MemoryBackend,
        store: MemoryKeyStore,
        policy: meterkit.Policy,
        clock: FakeClock,
    ) -> None:
        self.url = url
        self.app = app
        self.http = httpx.Client(base_url=url, headers=HTTPS, timeout=10)
        self.keys: dict[str, str] = app.state.demo_keys
        self.meter = meterkit.Meter(policy, backend)
        self.store = store
        self.policy = policy
        self.clock = clock

    def call(
        self, method: str, path: str, key: str | None = "live", **kwargs: Any
    ) -> httpx.Response:
        """``method`` on ``/organizations/org_demo`` + ``path`` with a demo key (or a
        plaintext, or none)."""
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = f"Bearer {self.keys.get(key, key)}"
        if not path.startswith("/organizations/") and not path.startswith("/health"):
            path = f"/organizations/{ORG}{path}"
        return self.http.request(method, path, headers=headers, **kwargs)

    def used(self, mode: Literal["live", "test"] = "live") -> Decimal:
        return self.meter.usage(ORG, mode=mode).credits_used

    def price(self, operation: str) -> Decimal:
        """The table price of ``operation``, in credits."""
        return meterkit.from_micro(self.policy.plan_for(operation).price)


@pytest.fixture
def start(clock: FakeClock) -> Iterator[Callable[..., Demo]]:
    """Start the example app (async meter and key store, memory, fake clock)."""
    with ExitStack() as stack:

        def start(
            policy: meterkit.Policy | None = None, proxy_headers: bool = True, **options: Any
        ) -> Demo:
            policy = policy or meterkit.Policy.crane_ledger()
            backend = meterkit.MemoryBackend(clock=clock)
            keystore = AsyncMemoryKeyStore(clock=clock)
            app = create_app(
                meter=meterkit.AsyncMeter(policy, backend), keystore=keystore, **options
            )
            url = stack.enter_context(serve(app, proxy_headers=proxy_headers))
            demo = Demo(url, app, backend, keystore.sync, policy, clock)
            stack.callback(demo.http.close)
            return demo

        yield start


@pytest.fixture
def demo(start: Callable[..., Demo]) -> Demo:
    return start()


def auth_body(code: str) -> dict[str, Any]:
    return AuthenticationError(code).body


# -- HTTPS ---------------------------------------------------------------------------------


def test_plain_http_is_refused_with_403(demo: Demo) -> None:
    """A request that did not come over HTTPS gets the 403 https_required body, uncharged."""
    response = httpx.get(
        f"{demo.url}/organizations/{ORG}/invoices",
        headers={"Authorization": f"Bearer {demo.keys['live']}"},
    )
    assert response.status_code == 403
    assert response.json() == HTTPS_REQUIRED
    assert response.headers["content-type"] == "application/json"
    assert demo.meter.usage(ORG).requests == 0


def test_forwarded_proto_from_an_untrusted_peer_is_ignored(start: Callable[..., Demo]) -> None:
    """Without proxy handling in the server or trusted_proxies, X-Forwarded-Proto counts for
    nothing."""
    demo = start(proxy_headers=False)
    response = demo.call("GET", "/invoices")
    assert response.status_code == 403
    assert response.json() == HTTPS_REQUIRED


def test_trusted_proxies_option_honours_forwarded_proto(start: Callable[..., Demo]) -> None:
    """With trusted_proxies naming the peer, its X-Forwarded-Proto: https is believed, and a
    chain with any plain-HTTP hop is not."""
    demo = start(proxy_headers=False, trusted_proxies=["127.0.0.0/8"])
    assert demo.call("GET", "/invoices").status_code == 200
    chain = demo.call("GET", "/invoices", headers={"X-Forwarded-Proto": "https, http"})
    assert chain.status_code == 403


def test_trusted_proxies_that_miss_the_peer_change_nothing(start: Callable[..., Demo]) -> None:
    """A trusted network that does not hold the peer's address leaves the request plain HTTP."""
    demo = start(proxy_headers=False, trusted_proxies=["10.0.0.0/8", "192.168.1.1"])
    assert demo.call("GET", "/invoices").status_code == 403


def test_excluded_health_check_is_not_metered(demo: Demo) -> None:
    """/health answers over plain HTTP without a key, with no rate-limit headers."""
    response = httpx.get(f"{demo.url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert "ratelimit" not in response.headers
    assert demo.meter.usage(ORG).requests == 0


# -- the four 401s -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer", "Basic dXNlcjpwYXNz", "Bearer cl_live_notakey", "Bearer " + "x" * 300],
)
def test_missing_or_malformed_key_is_invalid_api_key(demo: Demo, authorization: str | None) -> None:
    """No key, another scheme, or a malformed key: 401 invalid_api_key and WWW-Authenticate."""
    headers = {} if authorization is None else {"Authorization": authorization}
    response = demo.call("GET", "/invoices", key=None, headers=headers)
    assert response.status_code == 401
    assert response.json() == auth_body("invalid_api_key")
    assert response.headers["www-authenticate"] == "Bearer"
    assert demo.meter.usage(ORG).requests == 0


def test_well_formed_unknown_and_revoked_keys_are_invalid(demo: Demo) -> None:
    """A key of another store and a revoked key of this one both get invalid_api_key."""
    stranger, _ = MemoryKeyStore().create(org=ORG, permissions=["*"])
    assert demo.call("GET", "/invoices", key=stranger).json() == auth_body("invalid_api_key")
    plaintext, key = demo.store.create(org=ORG, permissions=["*"])
    assert demo.call("GET", "/invoices", key=plaintext).status_code == 200
    demo.store.revoke(key.id)
    response = demo.call("GET", "/invoices", key=plaintext)
    assert (response.status_code, response.json()) == (401, auth_body("invalid_api_key"))


def test_expired_key_is_refused(demo: Demo) -> None:
    """A key past its expiry gets 401 expired_api_key, and is not charged."""
    plaintext, _ = demo.store.create(org=ORG, permissions=["*"], expires_at=demo.clock.now + 60)
    assert demo.call("GET", "/invoices", key=plaintext).status_code == 200
    demo.clock.advance(60)
    response = demo.call("GET", "/invoices", key=plaintext)
    assert response.status_code == 401
    assert response.json() == auth_body("expired_api_key")
    assert demo.meter.usage(ORG).requests == 1


def test_missing_permission_is_refused(demo: Demo) -> None:
    """The read-only key may list invoices but not create one: 401 insufficient_permissions."""
    assert demo.call("GET", "/invoices", key="read_only").status_code == 200
    response = demo.call("POST", "/invoices", key="read_only", json={"customer": "A", "amount": 1})
    assert response.status_code == 401
    assert response.json() == auth_body("insufficient_permissions")
    assert demo.used() == Decimal("0.01")


def test_other_organization_is_not_found(demo: Demo) -> None:
    """A key of org_demo used on another organization's path: 401 organization_not_found."""
    response = demo.call("GET", "/organizations/org_other/invoices")
    assert response.status_code == 401
    assert response.json() == auth_body("organization_not_found")


# -- admitted requests ---------------------------------------------------------------------


def test_success_carries_rate_limit_and_credit_headers(demo: Demo) -> None:
    """An admitted request gets the app's answer plus RateLimit, RateLimit-Policy, legacy
    X-RateLimit-* and the credits charged and left."""
    response = demo.call("GET", "/invoices")
    assert response.status_code == 200
    assert response.json() == {"data": [], "count": 0}
    headers = response.headers
    assert headers["ratelimit-policy"] == (
        '"key-hour";q=1000;w=3600, "org-hour";q=10000;w=3600, "key-burst";q=100;w=60'
    )
    assert headers["ratelimit"] == (
        '"key-hour";r=999;t=3600, "org-hour";r=9999;t=3600, "key-burst";r=99;t=60'
    )
    assert (headers["x-ratelimit-limit"], headers["x-ratelimit-remaining"]) == ("100", "99")
    assert headers["x-credits-charged"] == "0.01"
    assert headers["x-credits-remaining"] == "9999.99"
    assert "retry-after" not in headers


def test_each_operation_draws_its_price(demo: Demo) -> None:
    """Every route is charged its operation's price from the cost table, and /usage (the
    admin app's, not metered) adds them up per operation and per key."""
    created = demo.call("POST", "/invoices", json={"customer": "Acme", "amount": "120.00"})
    assert created.status_code == 201
    invoice = created.json()["id"]
    calls = [
        ("GET", "/invoices", None, "invoices.list"),
        ("GET", f"/invoices/{invoice}", None, "invoices.get"),
        ("POST", f"/invoices/{invoice}/pdf", None, "invoices.pdf"),
        (
            "POST",
            "/currency/convert",
            {"amount": "10", "from": "USD", "to": "EUR"},
            "currency.convert",
        ),
        ("GET", "/reports/balance_sheet", None, "reports.generate"),
    ]
    price = demo.price
    expected = {"invoices.create": price("invoices.create")}
    for method, path, body, operation in calls:
        response = demo.call(method, path, json=body)
        assert response.status_code == 200, (path, response.text)
        assert Decimal(response.headers["x-credits-charged"]) == price(operation)
        expected[operation] = price(operation)
    assert demo.call("POST", f"/invoices/{invoice}/pdf").content.startswith(b"%PDF-1.4")
    expected["invoices.pdf"] = 2 * price("invoices.pdf")

    usage = demo.call("GET", "/usage").json()
    total = sum(expected.values(), Decimal(0))
    assert {op: Decimal(v["credits"]) for op, v in usage["operations"].items()} == expected
    assert Decimal(usage["credits_used"]) == total == Decimal("0.80")
    assert Decimal(usage["credits_left"]) == Decimal("10000") - total
    [key_usage] = usage["keys"].values()
    assert key_usage == {"requests": 7, "credits": "0.8"}


def test_every_route_of_the_policy_is_served_by_the_example_app(demo: Demo) -> None:
    """The shipped route table and the example app agree (issue 12): a metered route the
    app does not serve would answer the framework's 405 and still be charged. The
    policy's /usage is the admin app's, in front of the metering (issue 15)."""
    served = {
        (method, route.path)
        for route in demo.app.routes
        for method in getattr(route, "methods", ()) or ()
    }
    admin = {(r.method, r.template) for r in demo.app.state.admin.router.routes}
    for spec in demo.policy.routes:
        method, path = spec.split(" ", 1)
        assert (method, path) in served | admin, spec
        assert ((method, path) in admin) == (spec not in metered_routes(demo.policy)), spec


def test_update_delete_and_pay_are_charged_their_prices(demo: Demo) -> None:
    """PUT and DELETE of an invoice and POST /payments, which the seed's API has, are
    served and charged their operations' prices."""
    created = demo.call("POST", "/invoices", json={"customer": "Acme", "amount": "50.00"})
    invoice = created.json()["id"]
    before = demo.used()
    updated = demo.call("PUT", f"/invoices/{invoice}", json={"customer": "Acme Ltd"})
    assert updated.status_code == 200, updated.text
    assert updated.json()["customer"] == "Acme Ltd"
    assert Decimal(updated.headers["x-credits-charged"]) == demo.price("invoices.update")
    paid = demo.call("POST", "/payments", json={"invoice_id": invoice, "amount": "50.00"})
    assert paid.status_code == 201, paid.text
    assert paid.json()["invoice"]["status"] == "paid"
    assert Decimal(paid.headers["x-credits-charged"]) == demo.price("payments.create")
    deleted = demo.call("DELETE", f"/invoices/{invoice}")
    assert deleted.status_code == 200
    gone = demo.call("GET", f"/invoices/{invoice}")
    assert gone.status_code == 404
    assert gone.headers["x-credits-charged"] == "0"  # (a 404 is refunded by default)
    expected = sum(
        (demo.price(op) for op in ("invoices.update", "payments.create", "invoices.delete")),
        Decimal(0),
    )
    assert demo.used() - before == expected


def test_a_body_the_framework_cannot_read_is_not_charged(demo: Demo) -> None:
    """FastAPI's 422 for a body that fails validation is refunded (issue 12: no charge
    for what the app refuses); the request still counts against the rate limits."""
    before = demo.used()
    response = demo.call("POST", "/invoices", json={"customer": "", "amount": "-1"})
    assert response.status_code == 422
    assert response.headers["x-credits-charged"] == "0"
    assert demo.used() == before
    assert demo.meter.usage(ORG).requests == 1  # (counted, as every refunded request)


def test_usage_is_reported_per_key(demo: Demo) -> None:
    """/usage shows each key's requests and credits this period and the credits left."""
    demo.call("POST", "/invoices", json={"customer": "A", "amount": "5"})
    demo.call("GET", "/invoices", key="read_only")
    usage = demo.call("GET", "/usage", key="read_only").json()
    live = demo.store.authenticate(f"Bearer {demo.keys['live']}", org=ORG).id
    read_only = demo.store.authenticate(f"Bearer {demo.keys['read_only']}", org=ORG).id
    assert usage["keys"] == {
        live: {"requests": 1, "credits": "0.05"},
        read_only: {"requests": 1, "credits": "0.01"},
    }
    assert (usage["requests"], usage["credits_left"]) == (2, "9999.94")


def test_test_mode_keys_are_metered_apart(demo: Demo) -> None:
    """A cl_test_ key is charged in test mode: live usage and live data are untouched."""
    assert demo.keys["test"].startswith("cl_test_")
    created = demo.call("POST", "/invoices", key="test", json={"customer": "T", "amount": 1})
    assert created.status_code == 201
    assert demo.used("test") == Decimal("0.05")
    assert demo.used("live") == 0
    assert demo.call("GET", "/invoices").json()["count"] == 0


# -- denials -------------------------------------------------------------------------------


def test_burst_limit_answers_429_with_a_retry_after_that_works(
    start: Callable[..., Demo],
) -> None:
    """After the burst, 429 with the seed's body and a Retry-After; waiting exactly that
    long (on the fake clock) is admitted, a second less is not."""
    demo = start(policy=burst_policy(5))
    for _ in range(5):
        assert demo.call("GET", "/invoices").status_code == 200
    denied = demo.call("GET", "/invoices")
    assert denied.status_code == 429
    assert denied.json() == {
        "error": {
            "type": "rate_limit_error",
            "code": "rate_limit_exceeded",
            "message": "API rate limit exceeded. Try again later.",
            "retry_after": 60,
            "status": 429,
        }
    }
    assert denied.headers["retry-after"] == "60"
    assert denied.headers["ratelimit"] == '"key-burst";r=0;t=60'
    assert denied.headers["ratelimit-policy"] == '"key-burst";q=5;w=60'
    assert demo.used() == Decimal("0.05")
    demo.clock.advance(59)
    assert demo.call("GET", "/invoices").status_code == 429
    demo.clock.advance(1)
    assert demo.call("GET", "/invoices").status_code == 200


def test_concurrent_requests_admit_exactly_the_burst(start: Callable[..., Demo]) -> None:
    """Thirty requests at once against a burst of ten: exactly ten are admitted and charged."""
    demo = start(policy=burst_policy(10))
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: demo.call("GET", "/invoices").status_code, range(30)))
    assert sorted(statuses) == [200] * 10 + [429] * 20
    assert demo.used() == Decimal("0.10")


def test_insufficient_credits_answers_402(demo: Demo) -> None:
    """An organization short of credits gets 402 insufficient_credits, without a weeks-long
    Retry-After; cheaper calls still pass."""
    demo.meter.set_allowance(ORG, "0.04")
    response = demo.call("POST", "/invoices", json={"customer": "A", "amount": 1})
    assert response.status_code == 402
    assert response.json()["error"]["code"] == "insufficient_credits"
    assert response.json()["error"]["status"] == 402
    assert "retry-after" not in response.headers
    assert "ratelimit" in response.headers
    assert demo.call("GET", "/invoices").status_code == 200
    assert demo.used() == Decimal("0.01")


# -- refunds and idempotency -----------------------------------------------------------------


def test_server_error_is_refunded(demo: Demo) -> None:
    """When the app answers 5xx the credits come back, and the headers say nothing was charged."""
    demo.app.state.rates.available = False
    response = demo.call("POST", "/currency/convert", json=CONVERSION)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "rates_unavailable"
    assert response.headers["x-credits-charged"] == "0"
    assert response.headers["x-credits-remaining"] == "10000"
    assert demo.used() == 0


def test_refunds_can_be_turned_off(start: Callable[..., Demo]) -> None:
    """With refund_statuses=() a 5xx answer stays charged."""
    demo = start(refund_statuses=())
    demo.app.state.rates.available = False
    response = demo.call("POST", "/currency/convert", json=CONVERSION)
    assert response.status_code == 503
    assert response.headers["x-credits-charged"] == "0.08"
    assert demo.used() == Decimal("0.08")


def test_idempotent_retry_is_charged_once(demo: Demo) -> None:
    """A POST retried with the same Idempotency-Key gets the same invoice, is flagged as a
    replay, and is charged once."""
    retry = {"Idempotency-Key": "create-acme-1"}
    body = {"customer": "Acme", "amount": "99.50"}
    first = demo.call("POST", "/invoices", json=body, headers=retry)
    second = demo.call("POST", "/invoices", json=body, headers=retry)
    assert (first.status_code, second.status_code) == (201, 201)
    assert first.json() == second.json()
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert demo.used() == Decimal("0.05")
    assert demo.call("GET", "/invoices").json()["count"] == 1


def test_the_middleware_reads_a_keyed_body_and_the_app_still_gets_it(demo: Demo) -> None:
    """A keyed request's body, sent in chunks, is read by the middleware for its
    fingerprint and still reaches the app whole; the key with another body gets 422."""
    key = {"Idempotency-Key": "body-1", "Content-Type": "application/json"}

    def chunks(text: bytes) -> Iterator[bytes]:
        yield from (text[i : i + 7] for i in range(0, len(text), 7))

    body = json.dumps({"customer": "Acme Chunked Ltd", "amount": "12.50"}).encode()
    first = demo.call("POST", "/invoices", content=chunks(body), headers=key)
    assert first.status_code == 201
    assert first.json()["customer"] == "Acme Chunked Ltd"
    replayed = demo.call("POST", "/invoices", content=body, headers=key)
    assert replayed.content == first.content
    assert replayed.headers["idempotent-replayed"] == "true"
    other = demo.call("POST", "/invoices", json={"customer": "Other", "amount": "1"}, headers=key)
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert demo.call("GET", "/invoices").json()["count"] == 1


def test_idempotency_key_reused_for_another_operation_is_422(demo: Demo) -> None:
    """An Idempotency-Key first used to create an invoice cannot be reused to convert a
    currency; a GET ignores the header (and is charged as any GET)."""
    key = {"Idempotency-Key": "k-1"}
    created = demo.call("POST", "/invoices", json={"customer": "A", "amount": 1}, headers=key)
    assert created.status_code == 201
    response = demo.call("POST", "/currency/convert", json=CONVERSION, headers=key)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "idempotency_key_reused"
    listed = demo.call("GET", "/invoices", headers=key)
    assert (listed.status_code, listed.json()["count"]) == (200, 1)
    assert "idempotent-replayed" not in listed.headers
    assert demo.used() == Decimal("0.06")


def test_malformed_idempotency_key_is_400(demo: Demo) -> None:
    """An Idempotency-Key longer than 255 characters is refused before anything is
    charged; a GET ignores the header, malformed or not."""
    long_key = {"Idempotency-Key": "k" * 256}
    response = demo.call("POST", "/invoices", json={"customer": "A", "amount": 1}, headers=long_key)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_idempotency_key"
    assert demo.used() == 0
    assert demo.call("GET", "/invoices", headers=long_key).status_code == 200


def test_refunded_request_is_charged_again_on_retry(demo: Demo) -> None:
    """A 5xx under an Idempotency-Key is refunded, so its retry is a new, charged request."""
    demo.app.state.rates.available = False
    retry = {"Idempotency-Key": "convert-1"}
    body = {"amount": 1, "from": "USD", "to": "GBP"}
    assert demo.call("POST", "/currency/convert", json=body, headers=retry).status_code == 503
    demo.app.state.rates.available = True
    again = demo.call("POST", "/currency/convert", json=body, headers=retry)
    assert again.status_code == 200
    assert "idempotent-replayed" not in again.headers
    assert demo.used() == Decimal("0.08")


# -- routes --------------------------------------------------------------------------------


def test_unknown_route_is_401_then_404(demo: Demo) -> None:
    """A path with no operation: 401 without a key, 404 not_found with one, never charged."""
    assert demo.call("GET", "/ledgers", key=None).status_code == 401
    response = demo.call("GET", "/ledgers")
    assert response.status_code == 404
    assert response.json()["error"] == {
        "type": "invalid_request_error",
        "code": "not_found",
        "message": "No API endpoint matches this path.",
        "status": 404,
    }
    assert httpx.get(f"{demo.url}/elsewhere", headers=HTTPS).status_code == 404
    assert demo.used() == 0


def test_wrong_method_is_405_with_allow(demo: Demo) -> None:
    """DELETE on the invoices collection: 405 naming the routed methods."""
    response = demo.call("DELETE", "/invoices")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD, POST"
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_demo_keys_are_written_to_the_keys_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start: Callable[..., Demo]
) -> None:
    """With METERKIT_DEMO_KEYS_FILE set, start-up writes the live, test and read-only keys."""
    path = tmp_path / "keys.json"
    monkeypatch.setenv("METERKIT_DEMO_KEYS_FILE", str(path))
    demo = start()
    keys = json.loads(path.read_text())
    assert keys == demo.keys
    assert set(keys) == {"live", "test", "read_only"}
    assert keys["live"].startswith("cl_live_")
    assert keys["read_only"].startswith("cl_live_")
    assert keys["test"].startswith("cl_test_")
    assert demo.call("GET", "/invoices", key=keys["read_only"]).status_code == 200


def test_example_runs_on_redis_when_asked(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With METERKIT_BACKEND_URL set, the example keeps limits, credits and keys in a real
    Redis: requests are admitted, charged and reported per key."""
    monkeypatch.setenv("METERKIT_BACKEND_URL", redis_url)
    app = create_app()
    with serve(app) as url, httpx.Client(base_url=url, headers=HTTPS) as http:
        live = {"Authorization": f"Bearer {app.state.demo_keys['live']}"}
        created = http.post(
            f"/organizations/{ORG}/invoices",
            headers=live,
            json={"customer": "Acme", "amount": "12.00"},
        )
        assert created.status_code == 201
        assert created.headers["x-credits-charged"] == "0.05"
        usage = http.get(f"/organizations/{ORG}/usage", headers=live).json()
        read_only = {"Authorization": f"Bearer {app.state.demo_keys['read_only']}"}
        refused = http.post(
            f"/organizations/{ORG}/invoices",
            headers=read_only,
            json={"customer": "Acme", "amount": "12.00"},
        )
    key_id = meterkit.MemoryKeyStore().key_format.key_id(app.state.demo_keys["live"])
    assert usage["keys"][key_id] == {"requests": 1, "credits": "0.05"}
    assert refused.json() == auth_body("insufficient_permissions")


# -- other shapes: synchronous stores, a raw app, Redis ------------------------------------


def small_app(meter: Any, keystore: Any, **options: Any) -> Any:
    """A two-route Starlette app behind the middleware; one route fails."""

    async def invoices(request: Request) -> JSONResponse:
        admission = request.scope["meterkit"]
        return JSONResponse({"key": admission.key.id, "operation": admission.decision.operation})

    async def fail(request: Request) -> JSONResponse:
        raise RuntimeError("the PDF renderer crashed")

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        if hasattr(keystore, "aclose"):
            await keystore.aclose()  # in the server's event loop, where it connected

    app = Starlette(
        lifespan=lifespan,
        routes=[
            StarletteRoute("/organizations/{organization_id}/invoices", invoices),
            StarletteRoute(
                "/organizations/{organization_id}/invoices/{invoice_id}/pdf", fail, methods=["POST"]
            ),
        ],
    )
    options.setdefault("routes", SMALL_ROUTES)
    return MeterMiddleware(app, meter=meter, keystore=keystore, **options)


#: The routes the small app serves (the seed's table would be drift: refused at start-up).
SMALL_ROUTES = {
    "GET /organizations/{organization_id}/invoices": "invoices.list",
    "POST /organizations/{organization_id}/invoices/{invoice_id}/pdf": "invoices.pdf",
}


def test_synchronous_meter_and_key_store(clock: FakeClock) -> None:
    """A Meter and a MemoryKeyStore (called inline) work as the async ones; the app sees the
    admission in scope["meterkit"]."""
    meter = meterkit.Meter(burst_policy(2), meterkit.MemoryBackend(clock=clock))
    store = MemoryKeyStore(clock=clock)
    plaintext, key = store.create(org=ORG, permissions=["invoices:read"])
    with serve(small_app(meter, store)) as url, httpx.Client(base_url=url, headers=HTTPS) as http:
        auth = {"Authorization": f"Bearer {plaintext}"}
        first = http.get(f"/organizations/{ORG}/invoices", headers=auth)
        assert first.json() == {"key": key.id, "operation": "invoices.list"}
        assert http.get(f"/organizations/{ORG}/invoices", headers=auth).status_code == 200
        assert http.get(f"/organizations/{ORG}/invoices", headers=auth).status_code == 429
        assert http.get(f"/organizations/{ORG}/invoices").status_code == 401


def test_app_exception_is_refunded(clock: FakeClock) -> None:
    """An app that raises instead of answering gives a 500, and the charge is refunded."""
    meter = meterkit.Meter(meterkit.Policy.crane_ledger(), meterkit.MemoryBackend(clock=clock))
    store = MemoryKeyStore(clock=clock)
    plaintext, _ = store.create(org=ORG, permissions=["*"])
    with serve(small_app(meter, store)) as url:
        response = httpx.post(
            f"{url}/organizations/{ORG}/invoices/inv_1/pdf",
            headers={**HTTPS, "Authorization": f"Bearer {plaintext}"},
        )
    assert response.status_code == 500
    usage = meter.usage(ORG)
    assert (usage.requests, usage.credits_used) == (1, Decimal(0))


def test_key_store_outage_answers_503(clock: FakeClock) -> None:
    """When the key store's Redis cannot be reached, the answer is 503 with Retry-After."""
    keystore = async_keystore_from_url(f"redis://127.0.0.1:{free_port()}/0")
    plaintext, _ = MemoryKeyStore().create(org=ORG)  # well formed: the store is asked
    meter = meterkit.AsyncMeter(meterkit.Policy.crane_ledger(), meterkit.MemoryBackend())
    with serve(small_app(meter, keystore)) as url:
        response = httpx.get(
            f"{url}/organizations/{ORG}/invoices",
            headers={**HTTPS, "Authorization": f"Bearer {plaintext}"},
        )
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "service_unavailable"
    assert response.headers["retry-after"] == "1"


def test_redis_key_store(redis_url: str, clock: FakeClock) -> None:
    """Keys kept in a real Redis authenticate through the async store, awaited per request."""
    namespace = f"mk-asgi-{time.monotonic_ns()}"
    maker = keystore_from_url(redis_url, namespace=namespace)
    plaintext, _ = maker.create(org=ORG, permissions=["invoices:read"])
    keystore = async_keystore_from_url(redis_url, namespace=namespace)
    meter = meterkit.AsyncMeter(meterkit.Policy.crane_ledger(), meterkit.MemoryBackend())
    auth = {"Authorization": f"Bearer {plaintext}"}
    with serve(small_app(meter, keystore)) as url, httpx.Client(headers=HTTPS) as http:
        ok = http.get(f"{url}/organizations/{ORG}/invoices", headers=auth)
        assert ok.status_code == 200
        stranger, _ = MemoryKeyStore().create(org=ORG, permissions=["*"])  # not in Redis
        refused = http.get(
            f"{url}/organizations/{ORG}/invoices", headers={"Authorization": f"Bearer {stranger}"}
        )
        assert refused.json() == auth_body("invalid_api_key")
    maker.close()


# -- the shell, without a server ---------------------------------------------------------


def test_wsgi_and_asgi_shells_refuse_the_wrong_kind_of_store() -> None:
    """The WSGI middleware cannot await: an AsyncMeter or async key store is refused."""
    from meterkit.wsgi import MeterMiddleware as WSGIMiddleware

    policy = meterkit.Policy.crane_ledger()
    with pytest.raises(ConfigurationError, match="synchronous"):
        WSGIMiddleware(
            lambda e, s: [],
            meter=meterkit.AsyncMeter(policy, meterkit.MemoryBackend()),
            keystore=MemoryKeyStore(),
        )
    with pytest.raises(ConfigurationError, match="synchronous"):
        WSGIMiddleware(
            lambda e, s: [],
            meter=meterkit.Meter(policy, meterkit.MemoryBackend()),
            keystore=AsyncMemoryKeyStore(),
        )


async def test_lifespan_and_websocket_scopes_pass_through() -> None:
    """Only http requests are metered: other scope types reach the app untouched."""
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    middleware = MeterMiddleware(
        app,
        meter=meterkit.Meter(meterkit.Policy.crane_ledger(), meterkit.MemoryBackend()),
        keystore=MemoryKeyStore(),
    )

    async def nothing() -> Any:
        await asyncio.sleep(0)

    await middleware({"type": "lifespan"}, nothing, nothing)  # type: ignore[arg-type]
    await middleware(
        {"type": "websocket", "path": "/organizations/org_a/invoices"}, nothing, nothing
    )  # type: ignore[arg-type]
    assert seen == ["lifespan", "websocket"]


async def test_constant_response_messages_are_not_altered() -> None:
    """An app that sends the same start message dict every time gets the headers added
    once per response: the middleware never edits the app's message."""
    start = {"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(start)
        await send({"type": "http.response.body", "body": b"{}"})

    store = MemoryKeyStore()
    plaintext, _ = store.create(org=ORG, permissions=["*"])
    meter = meterkit.Meter(meterkit.Policy.crane_ledger(), meterkit.MemoryBackend())
    transport = httpx.ASGITransport(app=MeterMiddleware(app, meter=meter, keystore=store))
    async with httpx.AsyncClient(transport=transport, base_url="https://api.test") as client:
        for _ in range(2):
            response = await client.get(
                f"/organizations/{ORG}/invoices", headers={"Authorization": f"Bearer {plaintext}"}
            )
            assert response.headers.get_list("x-credits-charged") == ["0.01"]
    assert start["headers"] == [(b"x-app", b"1")]


async def test_mounted_app_routes_below_its_root_path() -> None:
    """Under a root_path (an app mounted at /api), routes match the path below it."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    store = MemoryKeyStore()
    plaintext, _ = store.create(org=ORG, permissions=["*"])
    meter = meterkit.Meter(meterkit.Policy.crane_ledger(), meterkit.MemoryBackend())
    middleware = MeterMiddleware(app, meter=meter, keystore=store)
    transport = httpx.ASGITransport(app=middleware, root_path="/api")
    async with httpx.AsyncClient(transport=transport, base_url="https://api.test") as client:
        response = await client.post(
            f"/api/organizations/{ORG}/currency/convert",
            headers={"Authorization": f"Bearer {plaintext}"},
        )
    assert response.status_code == 200
    assert response.headers["x-credits-charged"] == "0.08"


def test_both_shells_export_the_same_names() -> None:
    """meterkit.asgi and meterkit.wsgi export MeterMiddleware and one shared Admission."""
    import meterkit.asgi
    import meterkit.wsgi

    assert meterkit.asgi.__all__ == meterkit.wsgi.__all__ == ["Admission", "MeterMiddleware"]
    assert meterkit.asgi.Admission is meterkit.wsgi.Admission


def test_an_async_cached_key_store_serves_the_middleware(clock: FakeClock) -> None:
    """With AsyncCachedKeyStore in front of the store, a key revoked elsewhere is served
    for the cache's ttl, then refused with the seed's body."""
    policy = meterkit.Policy.crane_ledger()
    keystore = AsyncMemoryKeyStore(clock=clock)
    app = create_app(
        meter=meterkit.AsyncMeter(policy, meterkit.MemoryBackend(clock=clock)),
        keystore=meterkit.AsyncCachedKeyStore(keystore, ttl=10),
    )
    plaintext, key = keystore.sync.create(org=ORG, permissions=["*"])
    with serve(app) as url, httpx.Client(base_url=url, headers=HTTPS, timeout=10) as http:

        def get() -> httpx.Response:
            return http.get(
                f"/organizations/{ORG}/invoices", headers={"Authorization": f"Bearer {plaintext}"}
            )

        assert get().status_code == 200
        keystore.sync.revoke(key.id)  # not through the cache
        assert get().status_code == 200
        clock.advance(10)
        response = get()
        assert response.status_code == 401
        assert response.json() == auth_body("invalid_api_key")
