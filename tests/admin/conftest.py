"""The admin app under test: a real uvicorn server per backend (memory, Redis), with
a blocking key store and meter on the same state for setting up and checking.

Each test works in organizations of its own (:func:`new_org`), so one server serves a
whole module. The fake clock is the module's; tests only ever move it forward.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest

import meterkit
from meterkit.admin import Admin
from meterkit.admin._bodies import ErrorBody
from meterkit.admin._openapi import RESPONSES
from tests.conftest import FakeClock
from tests.http._serve import serve_asgi

KINDS = ["memory", "redis"]
SECRET = b"an admin test's session secret, 32+ bytes long"


def new_org() -> str:
    """An organization id no other test uses."""
    return "org_" + secrets.token_hex(6)


class _TlsProxy(httpx.BaseTransport):
    """A TLS-terminating proxy in the test process: the client speaks https:// (so its
    cookie jar keeps Secure cookies), the hop to the loopback server is plain HTTP with
    X-Forwarded-Proto: https, which the server believes from 127.0.0.1."""

    def __init__(self) -> None:
        self._hop = httpx.HTTPTransport(verify=False)  # plain HTTP: no CA bundle to load

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.url = request.url.copy_with(scheme="http")
        request.headers["X-Forwarded-Proto"] = "https"
        return self._hop.handle_request(request)

    def close(self) -> None:
        self._hop.close()


@dataclass
class Stack:
    """A served admin app and a blocking view of its stores."""

    kind: str
    url: str
    admin: Admin
    keys: Any  # a blocking key store on the app's state
    meter: meterkit.Meter  # a blocking meter on the app's backend
    clock: FakeClock
    seen: list[tuple[str, str, int]] = field(default_factory=list)

    def key(self, org: str, permissions: Any = ("*",), **options: Any) -> tuple[str, Any]:
        """A new key of ``org`` (plaintext, record), made directly in the store."""
        plaintext, record = self.keys.create(org=org, permissions=list(permissions), **options)
        return str(plaintext), record

    def client(self, plaintext: str | None = None, **headers: str) -> httpx.Client:
        """A client that comes through a TLS-terminating proxy (:class:`_TlsProxy`),
        with ``plaintext`` as its bearer key."""
        sent = dict(headers)
        if plaintext is not None:
            sent["Authorization"] = f"Bearer {plaintext}"
        return httpx.Client(
            base_url=self.url.replace("http://", "https://"),
            transport=_TlsProxy(),
            headers=sent,
            event_hooks={"response": [self._check]},
            follow_redirects=False,
        )

    def _check(self, response: httpx.Response) -> None:
        """Every API answer has the body and status its OpenAPI schema documents."""
        routes, _ = self.admin.router.match(response.request.url.path)
        route = next((r for r in routes if r.method == response.request.method), None)
        if route is None or route.handler not in RESPONSES:
            return
        response.read()
        status, kind = RESPONSES[route.handler]
        if response.status_code != status:
            kind = ErrorBody
        value = msgspec.json.decode(response.content, type=kind)
        assert set(response.json()) == set(kind.__struct_fields__), response.text
        assert value is not None
        self.seen.append((route.template, route.method, response.status_code))

    def state(self, org: str) -> tuple[Any, Any]:
        """What a refused request must leave as it was: the organization's keys (all but
        when each was last presented: the caller's own use is recorded), and its usage
        this period."""
        keys = [msgspec.structs.replace(k, last_used_at=None) for k in self.keys.list(org)]
        return keys, self.meter.usage(org).to_dict()


def _memory(clock: FakeClock) -> tuple[Any, Any, Any, Any]:
    policy = meterkit.Policy.crane_ledger()
    store = meterkit.AsyncMemoryKeyStore(clock=clock)
    backend = meterkit.MemoryBackend(clock=clock)
    return meterkit.AsyncMeter(policy, backend), store, meterkit.Meter(policy, backend), store.sync


def _redis(clock: FakeClock, url: str) -> tuple[Any, Any, Any, Any]:
    policy = meterkit.Policy.crane_ledger()
    namespace = "mka" + secrets.token_hex(4)
    prefix = "mkb" + secrets.token_hex(4)
    return (
        meterkit.AsyncMeter(
            policy, meterkit.async_backend_from_url(url, clock=clock, prefix=prefix)
        ),
        meterkit.AsyncRedisKeyStore.from_url(url, namespace=namespace, clock=clock),
        meterkit.Meter(policy, meterkit.backend_from_url(url, clock=clock, prefix=prefix)),
        meterkit.RedisKeyStore.from_url(url, namespace=namespace, clock=clock),
    )


@pytest.fixture(scope="module", params=KINDS)
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The admin app on uvicorn, on the in-memory stores or on Redis."""
    clock = FakeClock(1_767_225_600.0 + 9.5 * 86_400)  # 2026-01-10 12:00 UTC
    if request.param == "redis":
        app_meter, app_keys, meter, keys = _redis(clock, request.getfixturevalue("redis_url"))
    else:
        app_meter, app_keys, meter, keys = _memory(clock)
    admin = Admin(app_meter, app_keys, session_secret=SECRET, trusted_proxies=["127.0.0.1"])

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await admin(scope, receive, send)
            return
        # The app's own stores close on the server's event loop, at its shutdown.
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await app_keys.aclose()
        await app_meter.aclose()
        await send({"type": "lifespan.shutdown.complete"})

    with serve_asgi(app) as url:
        yield Stack(request.param, url, admin, keys, meter, clock)
    keys.close()
    meter.close()
