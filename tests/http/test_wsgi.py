"""The WSGI middleware end to end: the Flask example under waitress on loopback, over HTTP."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from decimal import Decimal
from typing import Any

import httpx
import pytest

import meterkit
from examples.flask_app import ORG, RatesFeed, create_app
from meterkit.errors import AuthenticationError, ConfigurationError
from meterkit.keys.memory import MemoryKeyStore
from meterkit.wsgi import MeterMiddleware
from tests.conftest import FakeClock
from tests.http._serve import serve_wsgi as serve

HTTPS = {"X-Forwarded-Proto": "https"}


def burst_policy(limit: int) -> meterkit.Policy:
    """The seed's prices and routes with one short tier: ``limit`` per minute per key."""
    seed = meterkit.Policy.crane_ledger()
    tier = meterkit.Tier("key-burst", "key", f"{limit}/minute", "sliding_log")
    return meterkit.Policy([tier], seed.costs, seed.credits, routes=seed.routes, name="burst")


class Demo:
    """The running Flask example: an HTTP client, its demo keys, its meter and key store."""

    def __init__(
        self,
        url: str,
        app: Any,
        meter: meterkit.Meter,
        store: MemoryKeyStore,
        clock: FakeClock,
        rates: Any,
    ) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, headers=HTTPS, timeout=10)
        self.keys: dict[str, str] = app.config["DEMO_KEYS"]
        self.meter = meter
        self.store = store
        self.clock = clock
        self.rates = rates

    def call(
        self,
        method: str,
        path: str,
        key: str | None = "live",
        **kwargs: Any,
    ) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = f"Bearer {self.keys.get(key, key)}"
        if not path.startswith("/organizations/") and not path.startswith("/health"):
            path = f"/organizations/{ORG}{path}"
        return self.http.request(method, path, headers=headers, **kwargs)

    def used(self) -> Decimal:
        return self.meter.usage(ORG).credits_used


@pytest.fixture
def start(clock: FakeClock) -> Iterator[Callable[..., Demo]]:
    """Start the Flask example (Meter and key store in memory, fake clock) under waitress."""
    with ExitStack() as stack:

        def start(
            policy: meterkit.Policy | None = None,
            adjustments: dict[str, Any] | None = None,
            **options: Any,
        ) -> Demo:
            meter = meterkit.Meter(
                policy or meterkit.Policy.crane_ledger(), meterkit.MemoryBackend(clock=clock)
            )
            store = MemoryKeyStore(clock=clock)
            rates = RatesFeed()
            app = create_app(meter=meter, keystore=store, rates=rates, **options)
            url = stack.enter_context(serve(app, **(adjustments or {})))
            demo = Demo(url, app, meter, store, clock, rates)
            stack.callback(demo.http.close)
            return demo

        yield start


@pytest.fixture
def demo(start: Callable[..., Demo]) -> Demo:
    return start()


def test_plain_http_is_refused_with_403(demo: Demo) -> None:
    """A request without HTTPS gets the seed-shaped 403 https_required body, uncharged."""
    response = httpx.get(
        f"{demo.url}/organizations/{ORG}/invoices",
        headers={"Authorization": f"Bearer {demo.keys['live']}"},
    )
    assert response.status_code == 403
    assert response.json() == {
        "error": {
            "type": "invalid_request_error",
            "code": "https_required",
            "message": "All API requests must be made over HTTPS.",
            "status": 403,
        }
    }
    assert demo.meter.usage(ORG).requests == 0


def test_trusted_proxies_option_reads_remote_addr(start: Callable[..., Demo]) -> None:
    """With the server passing proxy headers through, trusted_proxies decides by REMOTE_ADDR
    whether X-Forwarded-Proto is believed."""
    passthrough = {
        "trusted_proxy": None,
        "trusted_proxy_headers": None,
        "clear_untrusted_proxy_headers": False,
    }
    trusting = start(adjustments=passthrough, trusted_proxies=["127.0.0.1"])
    assert trusting.call("GET", "/invoices").status_code == 200
    distrusting = start(adjustments=passthrough)
    assert distrusting.call("GET", "/invoices").status_code == 403


def test_excluded_health_check_is_not_metered(demo: Demo) -> None:
    """/health answers over plain HTTP without a key."""
    response = httpx.get(f"{demo.url}/health")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    assert "ratelimit" not in response.headers


@pytest.mark.parametrize(
    ("code", "request_"),
    [
        ("invalid_api_key", ("GET", "/invoices", None)),
        ("insufficient_permissions", ("POST", "/invoices", "read_only")),
        ("organization_not_found", ("GET", "/organizations/org_other/invoices", "live")),
    ],
)
def test_authentication_errors(demo: Demo, code: str, request_: tuple[str, str, Any]) -> None:
    """No key, a key without the permission, a key of another organization: the seed's 401s."""
    method, path, key = request_
    response = demo.call(method, path, key=key, json={"customer": "A", "amount": 1})
    assert response.status_code == 401
    assert response.json() == AuthenticationError(code).body
    assert response.headers["www-authenticate"] == "Bearer"
    assert demo.used() == 0


def test_expired_key_is_refused(demo: Demo) -> None:
    """A key past its expiry gets 401 expired_api_key."""
    plaintext, _ = demo.store.create(org=ORG, permissions=["*"], expires_at=demo.clock.now + 5)
    assert demo.call("GET", "/invoices", key=plaintext).status_code == 200
    demo.clock.advance(5)
    response = demo.call("GET", "/invoices", key=plaintext)
    assert response.status_code == 401
    assert response.json() == AuthenticationError("expired_api_key").body


def test_success_headers_and_prices(demo: Demo) -> None:
    """Admitted requests carry the rate-limit headers and are charged their operation's price."""
    created = demo.call("POST", "/invoices", json={"customer": "Acme", "amount": "10.00"})
    assert created.status_code == 201
    assert created.headers["x-credits-charged"] == "0.05"
    assert created.headers["ratelimit"].startswith('"key-hour";r=999;t=3600')
    listed = demo.call("GET", "/invoices")
    assert listed.json()["count"] == 1
    assert listed.headers["x-credits-charged"] == "0.01"
    conversion = {"amount": 10, "from": "USD", "to": "EUR"}
    converted = demo.call("POST", "/currency/convert", json=conversion)
    assert (converted.status_code, converted.json()["result"]) == (200, "9.20")
    assert converted.headers["x-credits-charged"] == "0.08"
    usage = demo.call("GET", "/usage").json()
    assert usage["credits_used"] == "0.15"
    assert usage["credits_left"] == "9999.85"


def test_burst_limit_answers_429_with_a_retry_after_that_works(start: Callable[..., Demo]) -> None:
    """After the burst, 429 with Retry-After; waiting exactly that long is admitted."""
    demo = start(policy=burst_policy(3))
    assert [demo.call("GET", "/invoices").status_code for _ in range(4)] == [200, 200, 200, 429]
    denied = demo.call("GET", "/invoices")
    assert denied.json()["error"]["code"] == "rate_limit_exceeded"
    assert denied.json()["error"]["retry_after"] == 60
    assert denied.headers["retry-after"] == "60"
    assert denied.headers["ratelimit-policy"] == '"key-burst";q=3;w=60'
    demo.clock.advance(59.5)
    assert demo.call("GET", "/invoices").status_code == 429
    demo.clock.advance(0.5)
    assert demo.call("GET", "/invoices").status_code == 200


def test_server_error_is_refunded(demo: Demo) -> None:
    """A 503 from the Flask view is refunded; the headers say nothing was charged."""
    demo.rates.available = False
    conversion = {"amount": 1, "from": "USD", "to": "GBP"}
    response = demo.call("POST", "/currency/convert", json=conversion)
    assert response.status_code == 503
    assert response.headers["x-credits-charged"] == "0"
    assert demo.used() == 0


def test_an_app_404_is_not_charged(demo: Demo) -> None:
    """The app's own 404 (no such invoice) is refunded by default, though the key and its
    limits were checked."""
    response = demo.call("GET", "/invoices/inv_000001")
    assert response.status_code == 404
    assert response.headers["x-credits-charged"] == "0"
    assert demo.used() == 0


def test_the_example_serves_every_route_of_its_policy(demo: Demo) -> None:
    """Each route of the seed's table reaches a Flask view (none answers Flask's own 404
    or 405), charged at its price."""
    created = demo.call("POST", "/invoices", json={"customer": "A", "amount": 5}).json()
    invoice = f"/invoices/{created['id']}"
    calls = [
        ("GET", invoice, None, "0.01", 200),
        ("PUT", invoice, {"status": "sent"}, "0.03", 200),
        ("POST", f"{invoice}/pdf", None, "0.25", 200),
        ("POST", "/payments", {"invoice_id": created["id"], "amount": 5}, "0.15", 201),
        ("GET", "/reports/balance-sheet", None, "0.15", 200),
        ("DELETE", invoice, None, "0.03", 200),
    ]
    for method, path, body, price, status in calls:
        response = demo.call(method, path, json=body)
        assert response.status_code == status, (method, path, response.text)
        assert response.headers["x-credits-charged"] == price


def test_route_drift_stops_the_app_from_starting(clock: FakeClock) -> None:
    """A policy that meters a route the Flask app does not serve is refused when the
    middleware wraps the app, naming the route."""
    seed = meterkit.Policy.crane_ledger()
    routes = {**seed.routes, "POST /organizations/{organization_id}/refunds": "payments.create"}
    policy = meterkit.Policy(seed.tiers, seed.costs, seed.credits, routes=routes)
    meter = meterkit.Meter(policy, meterkit.MemoryBackend(clock=clock))
    refunds = re.escape("POST /organizations/{organization_id}/refunds")
    with pytest.raises(ConfigurationError, match=refunds):
        create_app(meter=meter, keystore=MemoryKeyStore(clock=clock))


def test_idempotent_retry_is_charged_once(demo: Demo) -> None:
    """The same Idempotency-Key twice: one invoice, one charge, the retry flagged as a replay."""
    retry = {"Idempotency-Key": "create-1"}
    first = demo.call("POST", "/invoices", json={"customer": "A", "amount": 3}, headers=retry)
    second = demo.call("POST", "/invoices", json={"customer": "A", "amount": 3}, headers=retry)
    assert first.json() == second.json()
    assert second.headers["idempotent-replayed"] == "true"
    assert demo.used() == Decimal("0.05")


def test_the_middleware_reads_a_keyed_body_and_the_app_still_gets_it(demo: Demo) -> None:
    """A keyed request's body, sent in chunks, is read by the middleware (from
    wsgi.input) for its fingerprint and still reaches the app whole; the key with
    another body gets 422."""
    key = {"Idempotency-Key": "body-1", "Content-Type": "application/json"}
    body = json.dumps({"customer": "Acme Chunked Ltd", "amount": "12.50"}).encode()
    first = demo.call(
        "POST", "/invoices", content=iter([body[:9], body[9:20], body[20:]]), headers=key
    )
    assert first.status_code == 201
    assert first.json()["customer"] == "Acme Chunked Ltd"
    replayed = demo.call("POST", "/invoices", content=body, headers=key)
    assert replayed.content == first.content
    assert replayed.headers["idempotent-replayed"] == "true"
    other = demo.call("POST", "/invoices", json={"customer": "Other", "amount": "1"}, headers=key)
    assert other.status_code == 422
    assert demo.call("GET", "/invoices").json()["count"] == 1


def test_a_body_written_with_write_is_kept_too(clock: FakeClock) -> None:
    """An app that sends part of its body through the legacy write() callable is kept
    and replayed whole."""
    policy = meterkit.Policy.crane_ledger()
    keystore = MemoryKeyStore(clock=clock)
    plaintext, _ = keystore.create(org=ORG, permissions=["*"])

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("201 Created", [("Content-Type", "text/plain")])
        write(b"written, ")
        return [b"then returned"]

    metered = MeterMiddleware(
        app,
        meter=meterkit.Meter(policy, meterkit.MemoryBackend(clock=clock)),
        keystore=keystore,
        routes={"POST /organizations/{organization_id}/invoices": "invoices.create"},
    )
    headers = {**HTTPS, "Authorization": f"Bearer {plaintext}", "Idempotency-Key": "w-1"}
    with serve(metered) as url, httpx.Client(base_url=url, headers=headers) as http:
        first = http.post(f"/organizations/{ORG}/invoices")
        again = http.post(f"/organizations/{ORG}/invoices")
    assert first.content == again.content == b"written, then returned"
    assert again.headers["idempotent-replayed"] == "true"


@pytest.mark.parametrize(
    "headers",
    [
        [("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
        [("Idempotency-Key", "a, b")],
    ],
    ids=["two headers", "a comma"],
)
def test_duplicate_idempotency_keys_are_400_and_charge_nothing(
    demo: Demo, headers: list[tuple[str, str]]
) -> None:
    """Two Idempotency-Key headers (which the WSGI server folds into "a, b") or a key
    with a comma get 400 invalid_idempotency_key, as under ASGI; nothing is charged."""
    auth = [("Authorization", f"Bearer {demo.keys['live']}")]
    response = demo.http.request(
        "POST",
        f"/organizations/{ORG}/invoices",
        json={"customer": "A", "amount": 3},
        headers=httpx.Headers(auth + headers),
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_idempotency_key"
    assert demo.meter.usage(ORG).requests == 0


@pytest.mark.parametrize(
    ("where", "error"),
    [
        ("store", meterkit.BackendError("OOM command not allowed when used memory > 'maxmemory'")),
        ("store", meterkit.StateError("a key under meterkit's namespace has the wrong type")),
        ("meter", meterkit.StateError("redis holds state meterkit did not write")),
        ("meter", meterkit.BackendError("redis answered with an error")),
    ],
    ids=["store-error", "store-state", "meter-state", "meter-error"],
)
def test_every_backend_failure_is_the_documented_503(
    start: Callable[..., Demo],
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    error: meterkit.BackendError,
) -> None:
    """A key store or meter that fails in any way (not only "unavailable") gets the
    seed-shaped 503 with Retry-After, never a bare 500, and nothing is charged."""

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    if where == "store":
        monkeypatch.setattr(MemoryKeyStore, "authenticate", fail)
    else:
        monkeypatch.setattr(meterkit.Meter, "check", fail)
    demo = start()
    response = demo.call("GET", "/invoices")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["status"] == 503
    monkeypatch.undo()
    assert demo.meter.usage(ORG).requests == 0


# -- raw WSGI apps: failures before the response starts -----------------------------------------


def raw_app(
    body: Callable[[dict[str, Any], Any], Iterable[bytes]],
    clock: FakeClock,
) -> tuple[Any, meterkit.Meter, str]:
    meter = meterkit.Meter(meterkit.Policy.crane_ledger(), meterkit.MemoryBackend(clock=clock))
    store = MemoryKeyStore(clock=clock)
    plaintext, _ = store.create(org=ORG, permissions=["*"])
    return MeterMiddleware(body, meter=meter, keystore=store), meter, plaintext


def test_app_exception_is_refunded(clock: FakeClock) -> None:
    """A WSGI app that raises before answering gives a 500, and the charge is refunded."""

    def crashing(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        raise RuntimeError("renderer crashed")

    app, meter, plaintext = raw_app(crashing, clock)
    with serve(app) as url:
        response = httpx.post(
            f"{url}/organizations/{ORG}/invoices/inv_1/pdf",
            headers={**HTTPS, "Authorization": f"Bearer {plaintext}"},
        )
    assert response.status_code == 500
    assert (meter.usage(ORG).requests, meter.usage(ORG).credits_used) == (1, Decimal(0))


def test_lazy_app_failure_is_refunded_and_success_is_not(clock: FakeClock) -> None:
    """A generator app starts its response while iterated: failing before the start is
    refunded, answering normally is charged and gets the headers."""

    def lazy(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        if environ["REQUEST_METHOD"] == "POST":
            raise RuntimeError("failed before starting")
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"fine"

    app, meter, plaintext = raw_app(lazy, clock)
    auth = {**HTTPS, "Authorization": f"Bearer {plaintext}"}
    with serve(app) as url:
        assert (
            httpx.post(f"{url}/organizations/{ORG}/invoices/inv_1/pdf", headers=auth).status_code
            == 500
        )
        ok = httpx.get(f"{url}/organizations/{ORG}/invoices", headers=auth)
    assert (ok.status_code, ok.text, ok.headers["x-credits-charged"]) == (200, "fine", "0.01")
    assert meter.usage(ORG).credits_used == Decimal("0.01")


def test_a_cached_key_store_serves_the_middleware(clock: FakeClock) -> None:
    """With CachedKeyStore in front of the store, a key revoked elsewhere is still
    served for the cache's ttl, then refused with the seed's body; refusals are never
    remembered."""
    meter = meterkit.Meter(meterkit.Policy.crane_ledger(), meterkit.MemoryBackend(clock=clock))
    store = MemoryKeyStore(clock=clock)
    app = create_app(
        meter=meter, keystore=meterkit.CachedKeyStore(store, ttl=10), rates=RatesFeed()
    )
    plaintext, key = store.create(org=ORG, permissions=["*"])
    with serve(app) as url, httpx.Client(base_url=url, headers=HTTPS, timeout=10) as http:

        def get() -> httpx.Response:
            return http.get(
                f"/organizations/{ORG}/invoices", headers={"Authorization": f"Bearer {plaintext}"}
            )

        assert get().status_code == 200
        store.revoke(key.id)  # not through the cache
        assert get().status_code == 200
        clock.advance(10)
        response = get()
        assert response.status_code == 401
        assert response.json() == AuthenticationError("invalid_api_key").body
        assert get().status_code == 401
