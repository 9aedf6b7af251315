"""What the ASGI and WSGI middlewares add to a request, in process (target: <= 25 us).

    python -m pytest bench/bench_middleware.py --benchmark-only -q -s -p no:cacheprovider
    METERKIT_BENCH_QUICK=1 python -m pytest bench/bench_middleware.py --benchmark-only -q \
        -p no:cacheprovider

One request is one call of the application with a fresh scope (ASGI) or environ
(WSGI), answered by a bare app that sends a small JSON body. The bare app alone is
the baseline; the same app behind ``MeterMiddleware`` is the candidate. What the
middleware adds is everything meterkit does per request: read the headers, check
HTTPS, match the route (the seed's route table), authenticate the bearer key (memory
key store: checksum, HMAC, lookup, scope, permission, last-used), check and charge
the seed's three tiers and the credits (memory backend), and add the rate-limit and
credit headers to the app's response.

No server and no event loop run: the ASGI app is driven by ``coroutine.send(None)``,
which finishes in one step because nothing in it waits (memory stores, a ``send``
that only records). That isolates meterkit's own cost from a server's, which is the
same with or without it.

Traffic: 1,000 keys in 100 organizations, visited round-robin. The meter's backend
gets a simulated clock advancing 5 ms per check, so each key is seen 720 times an
hour and each organization 7,200 times: well inside every tier, so every request is
admitted and charged (a denial would be cheaper; the benchmark asserts none occur).

The overhead is the median of per-round differences between interleaved rounds of
the two (``bench/_interleave.py``); it is printed and recorded, never asserted.
"""

from __future__ import annotations

import io
import itertools
import os
import statistics
from collections.abc import Callable, Iterable
from typing import Any

import pytest

import meterkit
from bench._interleave import interleave
from meterkit.asgi import MeterMiddleware as AsgiMiddleware
from meterkit.keys.memory import AsyncMemoryKeyStore, MemoryKeyStore
from meterkit.wsgi import MeterMiddleware as WsgiMiddleware

QUICK = os.environ.get("METERKIT_BENCH_QUICK", "") not in ("", "0")
KEYS = 1000
KEYS_PER_ORG = 10
T0 = 1_768_478_400.0  # 2026-01-15T12:00:00Z: mid-month, no credit period turns
STEP_S = 0.005
TARGET_US = 25.0
BODY = b'{"data":[],"count":0}'


def sim_clock() -> Callable[[], float]:
    return itertools.count(T0, STEP_S).__next__


def make_keys(store: MemoryKeyStore) -> list[tuple[str, bytes]]:
    """KEYS keys with every permission, in KEYS // KEYS_PER_ORG orgs: (org, header) each."""
    keys = []
    for number in range(KEYS):
        org = f"org_{number // KEYS_PER_ORG:03d}"
        plaintext, _ = store.create(org=org, permissions=["*"])
        keys.append((org, b"Bearer " + plaintext.encode()))
    return keys


# -- ASGI ----------------------------------------------------------------------------------


async def bare_asgi(scope: Any, receive: Any, send: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"21")],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


class AsgiDriver:
    """Calls an ASGI app once per request, round-robin over the keys, and counts statuses."""

    def __init__(self, app: Any, keys: list[tuple[str, bytes]]) -> None:
        self.app = app
        self.statuses: dict[int, int] = {}
        self.headers: list[tuple[bytes, bytes]] = []
        scopes = []
        for org, header in keys:
            scopes.append(
                {
                    "type": "http",
                    "asgi": {"version": "3.0"},
                    "http_version": "1.1",
                    "method": "GET",
                    "scheme": "https",
                    "path": f"/organizations/{org}/invoices",
                    "raw_path": f"/organizations/{org}/invoices".encode(),
                    "root_path": "",
                    "query_string": b"",
                    "headers": [
                        (b"host", b"api.example.test"),
                        (b"user-agent", b"bench"),
                        (b"accept", b"*/*"),
                        (b"authorization", header),
                    ],
                    "client": ("203.0.113.7", 50000),
                    "server": ("10.0.0.1", 443),
                }
            )
        self._scopes = itertools.cycle(scopes)

    async def receive(self) -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status = message["status"]
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self.headers = message["headers"]

    def __call__(self) -> None:
        coroutine = self.app(dict(next(self._scopes)), self.receive, self.send)
        try:
            coroutine.send(None)
        except StopIteration:
            return
        raise RuntimeError("the app waited for something: not an in-process call")


def asgi_pair(asynchronous: bool) -> tuple[AsgiDriver, AsgiDriver]:
    policy = meterkit.Policy.crane_ledger()
    backend = meterkit.MemoryBackend(clock=sim_clock())
    if asynchronous:
        keystore: Any = AsyncMemoryKeyStore()
        keys = make_keys(keystore.sync)
        meter: Any = meterkit.AsyncMeter(policy, backend)
    else:
        keystore = MemoryKeyStore()
        keys = make_keys(keystore)
        meter = meterkit.Meter(policy, backend)
    wrapped = AsgiMiddleware(bare_asgi, meter=meter, keystore=keystore)
    return AsgiDriver(bare_asgi, keys), AsgiDriver(wrapped, keys)


# -- WSGI ----------------------------------------------------------------------------------


def bare_wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "21")])
    return [BODY]


def environ_of(method: str, org: str, header: bytes) -> dict[str, Any]:
    """The environ of a request to ``/organizations/<org>/invoices`` with ``header``."""
    return {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": f"/organizations/{org}/invoices",
        "QUERY_STRING": "",
        "SERVER_NAME": "api.example.test",
        "SERVER_PORT": "443",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "203.0.113.7",
        "HTTP_HOST": "api.example.test",
        "HTTP_USER_AGENT": "bench",
        "HTTP_ACCEPT": "*/*",
        "HTTP_AUTHORIZATION": header.decode("latin-1"),
        "wsgi.url_scheme": "https",
    }


class WsgiDriver:
    """Calls a WSGI app once per request, round-robin over the keys, and counts statuses."""

    def __init__(self, app: Any, keys: list[tuple[str, bytes]]) -> None:
        self.app = app
        self.statuses: dict[str, int] = {}
        self._environs = itertools.cycle([environ_of("GET", org, header) for org, header in keys])

    def start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: Any = None,
    ) -> Callable[[bytes], None]:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        return self.write

    def write(self, data: bytes) -> None:
        raise RuntimeError("not used")

    def __call__(self) -> None:
        for _ in self.app(dict(next(self._environs)), self.start_response):
            pass


def wsgi_pair() -> tuple[WsgiDriver, WsgiDriver]:
    policy = meterkit.Policy.crane_ledger()
    keystore = MemoryKeyStore()
    keys = make_keys(keystore)
    meter = meterkit.Meter(policy, meterkit.MemoryBackend(clock=sim_clock()))
    wrapped = WsgiMiddleware(bare_wsgi, meter=meter, keystore=keystore)
    return WsgiDriver(bare_wsgi, keys), WsgiDriver(wrapped, keys)


# -- the benchmarks --------------------------------------------------------------------------


def overhead(bare: Callable[[], None], metered: Callable[[], None]) -> tuple[float, str]:
    """The metered call's extra µs per request (median of per-round differences) and a
    report of it."""
    # Many short rounds: on a busy machine more of them fall between bursts of noise.
    rounds = 7 if QUICK else 41
    result = interleave({"bare": bare, "metered": metered}, rounds=rounds, round_seconds=0.02)
    diffs = sorted(
        m - b for m, b in zip(result.us_per_op["metered"], result.us_per_op["bare"], strict=True)
    )
    median = statistics.median(diffs)
    report = (
        f"  overhead {median:.2f} µs/request, median of {len(diffs)} interleaved rounds "
        f"(target <= {TARGET_US:.0f}; quietest round {diffs[0]:.2f}, quartiles "
        f"{diffs[len(diffs) // 4]:.2f}-{diffs[3 * len(diffs) // 4]:.2f}); "
        f"{result.median_us('metered'):.2f} µs metered vs {result.median_us('bare'):.2f} µs bare"
    )
    return median, report


@pytest.mark.parametrize("shape", ["asgi-sync-stores", "asgi-async-stores", "wsgi"])
def test_middleware_overhead(benchmark: Any, figures: Callable[[str], None], shape: str) -> None:
    """Bench the metered request and report its overhead over the bare app."""
    if shape == "wsgi":
        bare, metered = wsgi_pair()
        admitted: Any = "200 OK"
    else:
        bare, metered = asgi_pair(asynchronous=shape == "asgi-async-stores")  # type: ignore[assignment]
        admitted = 200
    median, report = overhead(bare, metered)
    figures(f"MIDDLEWARE {shape}:\n{report}")
    benchmark.extra_info["overhead_us"] = round(median, 3)
    benchmark(metered)
    # Every request was admitted and charged: a denial would flatter the figure.
    assert set(metered.statuses) == {admitted}, metered.statuses


# -- Idempotency-Key ---------------------------------------------------------------------------

POST_BODY = b'{"customer":"Acme Ltd","amount":"1200.00"}'


class PostDriver:
    """POSTs an invoice (``invoices.create``) once per call, round-robin over the keys:
    without an Idempotency-Key, with a new one each time (a first request: the body is
    read for its fingerprint and the response kept), or with one already answered (a
    retry: the response replayed). Every call builds its scope or environ alike."""

    def __init__(self, app: Any, keys: list[tuple[str, bytes]], kind: str, wsgi: bool) -> None:
        self.app = app
        self.keys = itertools.cycle(enumerate(keys))
        self.kind = kind
        self.wsgi = wsgi
        self.numbers = itertools.count()
        self.statuses: dict[object, int] = {}
        self.replayed = 0

    def key_header(self, number: int) -> bytes | None:
        if self.kind == "no key":
            return None
        if self.kind == "first":
            return b"first-%d" % next(self.numbers)
        # A retry repeats its API key's first request (an idempotency key is one key's).
        return b"answered-%d" % number

    def __call__(self) -> None:
        number, (org, header) = next(self.keys)
        idem = self.key_header(number)
        if self.wsgi:
            self.call_wsgi(org, header, idem)
        else:
            self.call_asgi(org, header, idem)

    def call_asgi(self, org: str, header: bytes, idem: bytes | None) -> None:
        headers = [
            (b"host", b"api.example.test"),
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(POST_BODY)),
            (b"authorization", header),
        ]
        if idem is not None:
            headers.append((b"idempotency-key", idem))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "https",
            "path": f"/organizations/{org}/invoices",
            "root_path": "",
            "query_string": b"",
            "headers": headers,
            "client": ("203.0.113.7", 50000),
        }
        coroutine = self.app(scope, self.receive, self.send)
        try:
            coroutine.send(None)
        except StopIteration:
            return
        raise RuntimeError("the app waited for something: not an in-process call")

    async def receive(self) -> dict[str, Any]:
        return {"type": "http.request", "body": POST_BODY, "more_body": False}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status = message["status"]
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if (b"idempotent-replayed", b"true") in message["headers"]:
                self.replayed += 1

    def call_wsgi(self, org: str, header: bytes, idem: bytes | None) -> None:
        environ = environ_of("POST", org, header)
        environ["CONTENT_TYPE"] = "application/json"
        environ["CONTENT_LENGTH"] = str(len(POST_BODY))
        environ["wsgi.input"] = io.BytesIO(POST_BODY)
        if idem is not None:
            environ["HTTP_IDEMPOTENCY_KEY"] = idem.decode("latin-1")
        for _ in self.app(environ, self.start_response):
            pass

    def start_response(self, status: str, headers: list[tuple[str, str]], exc: Any = None) -> Any:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if ("Idempotent-Replayed", "true") in headers:
            self.replayed += 1
        return None


async def created_asgi(scope: Any, receive: Any, send: Any) -> None:
    """Reads the body (as an app that creates something does) and answers 201."""
    while (await receive()).get("more_body", False):
        pass
    await send(
        {
            "type": "http.response.start",
            "status": 201,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"21")],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


def created_wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    environ["wsgi.input"].read()
    start_response("201 Created", [("Content-Type", "application/json"), ("Content-Length", "21")])
    return [BODY]


@pytest.mark.parametrize("shape", ["asgi", "wsgi"])
def test_idempotency_key_cost(benchmark: Any, figures: Callable[[str], None], shape: str) -> None:
    """What an Idempotency-Key costs a metered POST (memory stores): a first request
    (the body's fingerprint, the response recorded and kept) and a retry (the response
    replayed, the app not run) against the same POST without a key."""
    policy = meterkit.Policy.crane_ledger()
    keystore = MemoryKeyStore()
    keys = make_keys(keystore)
    meter = meterkit.Meter(policy, meterkit.MemoryBackend(clock=sim_clock()))
    wsgi = shape == "wsgi"
    if wsgi:
        app: Any = WsgiMiddleware(created_wsgi, meter=meter, keystore=keystore)
    else:
        app = AsgiMiddleware(created_asgi, meter=meter, keystore=keystore)
    drivers = {kind: PostDriver(app, keys, kind, wsgi) for kind in ("no key", "first", "retry")}
    answer = PostDriver(app, keys, "retry", wsgi)
    for _ in range(len(keys)):  # every retry's first request, answered and kept
        answer()
    result = interleave(drivers, rounds=7 if QUICK else 41, round_seconds=0.02)
    plain = result.us_per_op["no key"]
    lines = [f"IDEMPOTENCY-KEY {shape} (a metered POST, memory stores):"]
    for kind in ("first", "retry"):
        diffs = sorted(k - p for k, p in zip(result.us_per_op[kind], plain, strict=True))
        lines.append(
            f"  {kind}: {statistics.median(diffs):+.2f} µs/request over no key "
            f"(median of {len(diffs)} interleaved rounds; quartiles {diffs[len(diffs) // 4]:.2f}"
            f" to {diffs[3 * len(diffs) // 4]:.2f}); {result.median_us(kind):.2f} µs vs "
            f"{result.median_us('no key'):.2f} µs"
        )
    figures("\n".join(lines))
    benchmark(drivers["first"])
    created: Any = "201 Created" if wsgi else 201
    # Every request was admitted (and every retry replayed): a refusal would flatter it.
    assert all(set(d.statuses) == {created} for d in drivers.values()), drivers
    assert drivers["retry"].replayed == sum(drivers["retry"].statuses.values())
    assert drivers["first"].replayed == drivers["no key"].replayed == 0


def test_bare_asgi_app(benchmark: Any) -> None:
    """The baseline: the bare ASGI app, driven the same way."""
    bare, _ = asgi_pair(asynchronous=False)
    benchmark(bare)


def test_refused_request(benchmark: Any) -> None:
    """A request with a malformed key, refused 401 before any store is asked."""
    _, metered = asgi_pair(asynchronous=False)
    broken = AsgiDriver(metered.app, [("org_000", b"Bearer cl_live_" + b"A" * 50)])
    benchmark(broken)
    assert set(broken.statuses) == {401}
