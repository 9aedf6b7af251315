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


@pytest.fixture(params=sorted(METER_FACTORIES))
def make_meter(request: pytest.FixtureRequest, clock: FakeClock) -> Callable[[Any], Any]:
    """A function ``policy -> meter`` on each backend in turn, clocked by ``clock``."""
    factory = METER_FACTORIES[request.param](request)
    return lambda policy: factory(policy, clock)
