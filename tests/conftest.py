"""Shared fixtures: fake clocks and real Redis servers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tests import _servers

# CI runs one fixed, derandomized profile so that no run can flake; locally the
# default profile explores more. Select with HYPOTHESIS_PROFILE=ci.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=60,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# The scheduled (non-CI) run of the property suites: HYPOTHESIS_PROFILE=thorough
# (see README, "Run the tests"); random, at least 500 examples per property.
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=500,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


class FakeClock:
    """A clock that only moves when told to: UNIX seconds as a float."""

    def __init__(self, start: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _no_redis(what: str) -> None:
    message = f"{what}: no redis-server binary on PATH"
    if _servers.require_redis():
        pytest.fail(message + " and METERKIT_REQUIRE_REDIS=1")
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real standalone Redis: METERKIT_REDIS_URL, or one started for this session."""
    url = os.environ.get("METERKIT_REDIS_URL")
    if url:
        yield url
        return
    if _servers.redis_binary() is None:
        _no_redis("redis tests")
    with _servers.standalone() as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A real 3-master Redis Cluster: METERKIT_REDIS_CLUSTER_URL, or one started here."""
    url = os.environ.get("METERKIT_REDIS_CLUSTER_URL")
    if url:
        yield url
        return
    if _servers.redis_binary() is None:
        _no_redis("redis cluster tests")
    with _servers.cluster() as nodes:
        yield f"redis+cluster://127.0.0.1:{nodes[0].port}"


@pytest.fixture(scope="module")
def own_server() -> Iterator[_servers.RedisServer]:
    """A standalone Redis of the test module's own, whose statistics (INFO commandstats)
    no other module disturbs."""
    if _servers.redis_binary() is None:
        _no_redis("this module's own redis-server")
    with _servers.standalone() as server:
        yield server


# -- the behaviour suite's meters ------------------------------------------------------
#
# ``make_meter(policy)`` gives a meter with the synchronous API (check, refund, usage,
# set_allowance, top_up) on the backend named by the fixture's parameter, driven by the
# test's fake ``clock``. Backends register themselves in METER_FACTORIES; every test
# that takes ``make_meter`` runs once per backend.

MeterFactory = Callable[[Any, "FakeClock"], Any]
METER_FACTORIES: dict[str, Callable[[pytest.FixtureRequest], MeterFactory]] = {}


def _memory_factory(request: pytest.FixtureRequest) -> MeterFactory:
    import meterkit

    return lambda policy, clock: meterkit.Meter(policy, meterkit.MemoryBackend(clock=clock))


METER_FACTORIES["memory"] = _memory_factory


# -- the Redis backends in the behaviour suite ------------------------------------------
#
# Every meter gets a fresh random key prefix on the session's servers, so tests never
# see each other's state; its keys are deleted when the test ends. Synchronous clients
# are shared by the session; the asyncio backend runs on an event loop of its own,
# behind a small synchronous facade.


def new_prefix() -> str:
    """A key prefix no other test uses."""
    import secrets

    return "mkt" + secrets.token_hex(6)


def delete_prefix(client: Any, prefix: str) -> None:
    """Delete every key under ``prefix`` (on every primary of a cluster)."""
    keys = list(client.scan_iter(match=prefix + ":*", count=1000))
    for key in keys:
        client.delete(key)


@pytest.fixture(scope="session")
def redis_clients() -> Iterator[dict[str, Any]]:
    """Synchronous redis-py clients shared by the session, by URL, closed at its end."""
    clients: dict[str, Any] = {}
    yield clients
    for client in clients.values():
        client.close()


def shared_client(request: pytest.FixtureRequest, url: str) -> Any:
    """The session's synchronous client for ``url`` (a ``redis+cluster://`` URL too)."""
    clients = request.getfixturevalue("redis_clients")
    client = clients.get(url)
    if client is None:
        from meterkit.connect import redis_client

        client = clients[url] = redis_client(url)
    return client


def _redis_factory(url_fixture: str) -> Callable[[pytest.FixtureRequest], MeterFactory]:
    def factory(request: pytest.FixtureRequest) -> MeterFactory:
        import meterkit
        from meterkit.backends.redis.backend import RedisBackend

        client = shared_client(request, request.getfixturevalue(url_fixture))

        def make(policy: Any, clock: FakeClock) -> Any:
            prefix = new_prefix()
            request.addfinalizer(lambda: delete_prefix(client, prefix))
            backend = RedisBackend(client, prefix=prefix, clock=clock)
            return meterkit.Meter(policy, backend)

        return make

    return factory


class SyncFacade:
    """An AsyncMeter with the synchronous API: each call runs on the facade's own loop."""

    def __init__(self, meter: Any, loop: Any) -> None:
        self._meter = meter
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        import inspect

        attr = getattr(self._meter, name)
        if inspect.iscoroutinefunction(attr):
            return lambda *args, **kwargs: self._loop.run_until_complete(attr(*args, **kwargs))
        return attr

    def __repr__(self) -> str:
        return f"SyncFacade({self._meter!r})"


def _async_redis_factory(request: pytest.FixtureRequest) -> MeterFactory:
    import asyncio

    import meterkit
    from meterkit.connect import async_backend_from_url

    url = request.getfixturevalue("redis_url")
    client = shared_client(request, url)

    def make(policy: Any, clock: FakeClock) -> Any:
        prefix = new_prefix()
        loop = asyncio.new_event_loop()
        backend = async_backend_from_url(url, prefix=prefix, clock=clock)

        def finish() -> None:
            loop.run_until_complete(backend.aclose())
            loop.close()
            delete_prefix(client, prefix)

        request.addfinalizer(finish)
        return SyncFacade(meterkit.AsyncMeter(policy, backend), loop)

    return make


METER_FACTORIES["redis"] = _redis_factory("redis_url")
METER_FACTORIES["redis-cluster"] = _redis_factory("redis_cluster_url")
METER_FACTORIES["redis-async"] = _async_redis_factory


@pytest.fixture(params=sorted(METER_FACTORIES))
def make_meter(request: pytest.FixtureRequest, clock: FakeClock) -> Callable[[Any], Any]:
    """A function ``policy -> meter`` on each backend in turn, clocked by ``clock``."""
    factory = METER_FACTORIES[request.param](request)
    return lambda policy: factory(policy, clock)
