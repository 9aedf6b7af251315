"""Idempotency-Key end to end: the first response replayed, not the handler run again.

Every test runs an API of our own (``tests/http/_idem.py``) under a real server with a
real client, four ways: FastAPI under uvicorn and Flask under waitress, each on the
memory backend and on Redis. The handlers count their runs, so that a replay can be
told from a second run. Time is a fake clock (the lock time passes when the test says
so); a test that needs a run to be under way holds it on a ``threading.Event``.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

import meterkit
from meterkit.backends.redis.backend import RedisBackend
from tests._servers import free_port
from tests.conftest import FakeClock, delete_prefix, new_prefix, shared_client
from tests.http._idem import Runs, fastapi_app, flask_app
from tests.http._items import ORG_PATTERN, OTHER, POLICY_TOML, PREFIX, PROJECT
from tests.http._serve import serve_asgi, serve_wsgi

HTTPS = {"X-Forwarded-Proto": "https"}
ROOT = Path(__file__).resolve().parents[2]


class Api:
    """One running API: its client, its handlers' runs, keys of two projects, a view of
    the meter's state, and the fake clock they all share."""

    def __init__(
        self,
        stack: ExitStack,
        framework: str,
        backend: str,
        request: pytest.FixtureRequest,
        **options: Any,
    ) -> None:
        self.framework = framework
        self.clock = FakeClock()
        self.policy = meterkit.Policy.from_toml(POLICY_TOML)
        asynchronous = framework == "fastapi"
        if backend == "memory":
            shared = meterkit.MemoryBackend(clock=self.clock)
            served: Any = shared
            view: Any = shared
        else:
            url = request.getfixturevalue("redis_url")
            client = shared_client(request, url)
            prefix = new_prefix()
            stack.callback(delete_prefix, client, prefix)
            make = meterkit.async_backend_from_url if asynchronous else meterkit.backend_from_url
            served = make(url, prefix=prefix, clock=self.clock)
            view = RedisBackend(client, prefix=prefix, clock=self.clock)
            if not asynchronous:
                stack.callback(served.close)
        self.view = meterkit.Meter(self.policy, view)
        meter = (meterkit.AsyncMeter if asynchronous else meterkit.Meter)(self.policy, served)
        store_type = meterkit.AsyncMemoryKeyStore if asynchronous else meterkit.MemoryKeyStore
        keystore: Any = store_type(clock=self.clock, token_prefix=PREFIX, org_pattern=ORG_PATTERN)
        store = getattr(keystore, "sync", keystore)
        self.writer, self.key = store.create(org=PROJECT, permissions=["items:*"])
        self.other, _ = store.create(org=OTHER, permissions=["items:*"])
        self.runs = Runs()
        options.setdefault("trusted_proxies", ["127.0.0.1"])
        if asynchronous:
            app = fastapi_app(meter, keystore, self.runs, **options)
            self.url = stack.enter_context(serve_asgi(app))
        else:
            app = flask_app(meter, keystore, self.runs, **options)
            self.url = stack.enter_context(serve_wsgi(app))
        self.http = stack.enter_context(httpx.Client(base_url=self.url, headers=HTTPS, timeout=20))

    def post(
        self,
        path: str,
        body: dict[str, Any],
        idem: str | None = "req-1",
        plaintext: str | None = None,
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {plaintext or self.writer}"}
        if idem is not None:
            headers["Idempotency-Key"] = idem
        return self.http.post(path, json=body, headers=headers)

    def used(self, org: str = PROJECT) -> meterkit.Usage:
        return self.view.usage(org)


COMBINATIONS = [(f, b) for f in ("fastapi", "flask") for b in ("memory", "redis")]


@pytest.fixture(params=COMBINATIONS, ids=["-".join(c) for c in COMBINATIONS])
def start(request: pytest.FixtureRequest) -> Iterator[Callable[..., Api]]:
    """Start the API (with gate options) under its framework's server, on its backend."""
    framework, backend = request.param
    with ExitStack() as stack:
        yield lambda **options: Api(stack, framework, backend, request, **options)


@pytest.fixture
def api(start: Callable[..., Api]) -> Api:
    return start()


def same_answer(first: httpx.Response, again: httpx.Response) -> None:
    """``again`` is ``first`` replayed: status, body byte for byte, and headers (but the
    server's own, its framing of a streamed body, the cookie, and the replay's mark)."""
    assert (again.status_code, again.content) == (first.status_code, first.content)
    mine = ["date", "server", "connection", "transfer-encoding", "set-cookie"]
    mine.append("idempotent-replayed")
    if "content-length" not in first.headers:  # (streamed: the replay's length is known)
        mine.append("content-length")
    kept = [(k, v) for k, v in first.headers.multi_items() if k not in mine]
    replayed = [(k, v) for k, v in again.headers.multi_items() if k not in mine]
    assert sorted(replayed) == sorted(kept)
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"


# -- the first response, replayed ----------------------------------------------------------


def test_a_retried_post_gets_the_first_response_and_the_handler_runs_once(api: Api) -> None:
    """The same POST with the same key: the same body and item id, marked as a replay,
    the handler run once, charged once; no cookie is replayed."""
    first = api.post("/v1/items", {"name": "anvil"})
    assert first.status_code == 201
    assert first.json() == {"id": "it_1", "name": "anvil"}
    assert first.headers["x-run"] == "1"
    assert "session=s1" in first.headers["set-cookie"]
    assert first.headers["x-credits-charged"] == "0.05"
    for _ in range(3):
        again = api.post("/v1/items", {"name": "anvil"})
        same_answer(first, again)
        assert "set-cookie" not in again.headers
    assert api.runs.counts["create"] == 1
    usage = api.used()
    assert (usage.requests, usage.credits_used) == (1, meterkit.from_micro(50_000))
    other = api.post("/v1/items", {"name": "anvil"}, idem="req-2")
    assert other.json()["id"] == "it_2"
    assert "idempotent-replayed" not in other.headers


def test_a_changed_body_under_a_used_key_is_422(api: Api) -> None:
    """A retry whose body (or path) differs from the first request's gets 422
    idempotency_key_reused; nothing runs and nothing more is charged."""
    assert api.post("/v1/items", {"name": "anvil"}).status_code == 201
    changed = api.post("/v1/items", {"name": "hammer"})
    assert changed.status_code == 422
    assert changed.json()["error"]["code"] == "idempotency_key_reused"
    assert "idempotent-replayed" not in changed.headers
    elsewhere = api.post("/v1/items/fail", {"name": "anvil"})  # same operation, other path
    assert elsewhere.status_code == 422
    assert api.runs.counts == {"create": 1}
    assert api.used().requests == 1


def test_a_concurrent_duplicate_gets_409_then_the_kept_response(api: Api) -> None:
    """While the first request runs, its duplicate gets 409 idempotency_key_in_use with a
    Retry-After and does not run; once the first has answered, the duplicate gets its
    response."""
    api.runs.hold = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(api.post, "/v1/items", {"name": "anvil"})
        assert api.runs.entered.wait(10)
        busy = api.post("/v1/items", {"name": "anvil"})
        assert busy.status_code == 409
        assert busy.json()["error"]["code"] == "idempotency_key_in_use"
        assert busy.headers["retry-after"] == "1"
        assert "idempotent-replayed" not in busy.headers
        api.runs.hold.set()
        answered = first.result(20)
    assert answered.status_code == 201
    same_answer(answered, api.post("/v1/items", {"name": "anvil"}))
    assert api.runs.counts["create"] == 1
    assert api.used().requests == 1


def test_a_first_request_that_never_ends_frees_its_key_after_the_lock_time(api: Api) -> None:
    """A first request stuck in its handler holds its key for the lock time (60 s) only:
    then a retry runs the handler (without a new charge), and its response is the one
    kept; the stuck request, ending late, does not replace it."""
    api.runs.hold = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(api.post, "/v1/items", {"name": "anvil"})
        assert api.runs.entered.wait(10)
        api.clock.advance(59)
        assert api.post("/v1/items", {"name": "anvil"}).status_code == 409
        api.clock.advance(1)
        taken = api.post("/v1/items", {"name": "anvil"})
        assert taken.status_code == 201
        assert taken.json()["id"] == "it_2"
        assert "idempotent-replayed" not in taken.headers
        api.runs.hold.set()
        late = stuck.result(20)
    assert late.json()["id"] == "it_1"
    same_answer(taken, api.post("/v1/items", {"name": "anvil"}))
    assert api.runs.counts["create"] == 2
    assert api.used().requests == 1


def test_a_5xx_is_not_replayed_and_the_retry_runs(api: Api) -> None:
    """A 500 is refunded and not kept: the retry runs the handler again, is charged, and
    its answer (201) is the one replayed from then on."""
    failed = api.post("/v1/items/fail", {"name": "anvil"})
    assert failed.status_code == 500
    assert failed.headers["x-credits-charged"] == "0"
    api.runs.failing = False
    retried = api.post("/v1/items/fail", {"name": "anvil"})
    assert retried.status_code == 201
    assert "idempotent-replayed" not in retried.headers
    same_answer(retried, api.post("/v1/items/fail", {"name": "anvil"}))
    assert api.runs.counts["fail"] == 2
    assert api.used().credits_used == meterkit.from_micro(50_000)


def test_a_streamed_response_is_kept_whole(api: Api) -> None:
    """A body streamed in pieces reaches the client unchanged and is replayed whole."""
    first = api.post("/v1/items/export", {"size": 3 * 4096 + 10}, idem="exp-1")
    assert first.status_code == 200
    assert first.content == b"x" * (3 * 4096 + 10)
    same_answer(first, api.post("/v1/items/export", {"size": 3 * 4096 + 10}, idem="exp-1"))
    assert api.runs.counts["export"] == 1


def test_a_response_over_the_size_limit_is_not_kept(start: Callable[..., Api]) -> None:
    """A response larger than idempotency_max_body reaches the client whole but is not
    kept: its retry gets 409 idempotency_response_too_large and the handler does not run
    again; one within the limit is kept."""
    api = start(idempotency_max_body=10_000)
    big = api.post("/v1/items/export", {"size": 10_001}, idem="exp-big")
    assert (big.status_code, len(big.content)) == (200, 10_001)
    retry = api.post("/v1/items/export", {"size": 10_001}, idem="exp-big")
    assert retry.status_code == 409
    assert retry.json()["error"]["code"] == "idempotency_response_too_large"
    assert "retry-after" not in retry.headers
    small = api.post("/v1/items/export", {"size": 10_000}, idem="exp-small")
    same_answer(small, api.post("/v1/items/export", {"size": 10_000}, idem="exp-small"))
    assert api.runs.counts["export"] == 2


def test_two_organizations_with_the_same_key_string_never_share(api: Api) -> None:
    """Another project's key sending the same Idempotency-Key and body gets its own run
    and its own response, and each project's retry gets its own."""
    mine = api.post("/v1/items", {"name": "anvil"})
    theirs = api.post("/v1/items", {"name": "anvil"}, plaintext=api.other)
    assert (mine.json()["id"], theirs.json()["id"]) == ("it_1", "it_2")
    assert "idempotent-replayed" not in theirs.headers
    same_answer(mine, api.post("/v1/items", {"name": "anvil"}))
    same_answer(theirs, api.post("/v1/items", {"name": "anvil"}, plaintext=api.other))
    assert api.used(PROJECT).requests == api.used(OTHER).requests == 1


def test_get_ignores_the_header_unless_configured(start: Callable[..., Api]) -> None:
    """A GET with an Idempotency-Key runs and is charged each time; with GET among
    idempotency_methods it is replayed like a POST."""
    api = start()
    auth = {"Authorization": f"Bearer {api.writer}", "Idempotency-Key": "g-1"}
    first, second = (api.http.get("/v1/items", headers=auth) for _ in range(2))
    assert "idempotent-replayed" not in second.headers
    assert api.used().requests == 2
    assert (first.status_code, second.status_code) == (200, 200)


def test_statuses_kept_are_configurable(start: Callable[..., Api]) -> None:
    """With idempotency_statuses=range(200, 201) a 201 is not kept: the retry runs again
    (and is not charged again)."""
    api = start(idempotency_statuses=range(200, 201))
    assert api.post("/v1/items", {"name": "anvil"}).json()["id"] == "it_1"
    again = api.post("/v1/items", {"name": "anvil"})
    assert again.json()["id"] == "it_2"
    assert "idempotent-replayed" not in again.headers
    assert api.used().requests == 1


def test_a_refusal_is_not_kept(api: Api) -> None:
    """A request refused by the gate (a key without the permission) keeps nothing: the
    same key with an allowed caller runs as a first request."""
    store_key = api.post("/v1/items", {"name": "anvil"}, plaintext="acme_live_bogus")
    assert store_key.status_code == 401
    assert api.post("/v1/items", {"name": "anvil"}).json()["id"] == "it_1"
    assert api.runs.counts["create"] == 1


# -- Redis: one round trip before the app, one after -----------------------------------------


@pytest.mark.parametrize("framework", ["fastapi", "flask"])
def test_a_first_request_costs_one_evalsha_before_the_handler(
    framework: str, own_server: Any, request: pytest.FixtureRequest
) -> None:
    """On Redis a first request with an Idempotency-Key makes one EVALSHA before its
    handler runs (the check) and one after (keeping the response); its retry makes two
    (the check, which replays, and the claim) and no handler runs (INFO commandstats)."""
    client = shared_client(request, own_server.url)
    policy = meterkit.Policy.from_toml(POLICY_TOML)
    clock = FakeClock()
    prefix = new_prefix()
    request.addfinalizer(lambda: delete_prefix(client, prefix))
    keystore = meterkit.MemoryKeyStore(clock=clock, token_prefix=PREFIX, org_pattern=ORG_PATTERN)
    writer, _ = keystore.create(org=PROJECT, permissions=["items:*"])

    def evalshas() -> int:
        return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    runs = Runs()
    seen: list[int] = []
    count = runs.run

    def run(name: str) -> int:  # the handler's first line: what Redis has seen so far
        seen.append(evalshas())
        return count(name)

    runs.run = run  # type: ignore[method-assign]
    server: Any
    if framework == "fastapi":
        backend: Any = meterkit.async_backend_from_url(own_server.url, prefix=prefix, clock=clock)
        app: Any = fastapi_app(meterkit.AsyncMeter(policy, backend), keystore, runs)
        server = serve_asgi(app)
    else:
        backend = meterkit.backend_from_url(own_server.url, prefix=prefix, clock=clock)
        request.addfinalizer(backend.close)
        app = flask_app(meterkit.Meter(policy, backend), keystore, runs)
        server = serve_wsgi(app)
    headers = {**HTTPS, "Authorization": f"Bearer {writer}", "Idempotency-Key": "one-trip"}
    with server as url, httpx.Client(base_url=url, headers=headers, timeout=10) as http:
        http.get("/health")
        before = evalshas()
        first = http.post("/v1/items", json={"name": "a"})
        after_first = evalshas()
        again = http.post("/v1/items", json={"name": "a"})
        after_retry = evalshas()
    assert first.status_code == again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert seen == [before + 1]  # the handler ran once, after exactly one EVALSHA
    assert after_first == before + 2
    assert after_retry == after_first + 2


# -- a process killed mid-request ------------------------------------------------------------


@pytest.mark.parametrize("framework", ["fastapi", "flask"])
def test_a_process_killed_mid_request_leaves_a_mark_that_expires(
    framework: str, redis_url: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A server process killed (SIGKILL) while its handler runs leaves the key marked: a
    retry at another server gets 409 until the lock time has passed since the first
    request, then runs the handler (charged once in all), and its response is kept."""
    client = shared_client(request, redis_url)
    prefix, namespace = new_prefix(), new_prefix()
    request.addfinalizer(lambda: delete_prefix(client, prefix))
    request.addfinalizer(lambda: delete_prefix(client, namespace))
    clock = FakeClock()
    clock_file = tmp_path / "clock"
    clock_file.write_text(repr(clock.now))
    store = meterkit.keystore_from_url(
        redis_url, namespace=namespace, token_prefix=PREFIX, org_pattern=ORG_PATTERN
    )
    writer, _ = store.create(org=PROJECT, permissions=["items:*"])
    port = free_port()
    env = {
        **os.environ,
        "FRAMEWORK": framework,
        "PORT": str(port),
        "REDIS_URL": redis_url,
        "PREFIX": prefix,
        "NAMESPACE": namespace,
        "CLOCK_FILE": str(clock_file),
        "PYTHONPATH": str(ROOT),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.http._idem"], env=env, cwd=ROOT, stdout=subprocess.PIPE
    )

    def stop() -> None:
        if server.poll() is None:
            server.kill()
            server.wait(10)
        assert server.stdout is not None
        server.stdout.close()

    request.addfinalizer(stop)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:  # until it answers
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    headers = {"Authorization": f"Bearer {writer}", "Idempotency-Key": "killed-1"}
    body = {"name": "anvil"}
    with ThreadPoolExecutor(1) as pool:
        doomed = pool.submit(httpx.post, f"{base}/v1/items", json=body, headers=headers, timeout=20)
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], 20)
        assert ready
        assert server.stdout.readline().strip() == b"entered"
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        with pytest.raises(httpx.TransportError):
            doomed.result(20)
    # Another server on the same Redis, on the same clock.
    policy = meterkit.Policy.from_toml(POLICY_TOML)
    backend = RedisBackend(client, prefix=prefix, clock=clock)
    runs = Runs()
    app = flask_app(meterkit.Meter(policy, backend), store, runs, require_https=False)
    with serve_wsgi(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        clock.advance(59)
        busy = http.post("/v1/items", json=body, headers=headers)
        assert busy.status_code == 409
        assert busy.json()["error"]["code"] == "idempotency_key_in_use"
        clock.advance(1)
        taken = http.post("/v1/items", json=body, headers=headers)
        assert taken.status_code == 201
        assert "idempotent-replayed" not in taken.headers
        same_answer(taken, http.post("/v1/items", json=body, headers=headers))
    assert runs.counts["create"] == 1
    assert meterkit.Meter(policy, backend).usage(PROJECT).requests == 1
