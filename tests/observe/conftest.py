"""The observer tests' meters: the scripted sequence on memory and on a Redis of its own
(which the outage stops)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from meterkit import MemoryBackend, Meter
from tests import _servers
from tests.conftest import FakeClock, delete_prefix, new_prefix
from tests.observe._script import Outage, memory_outage, script_policy

#: ``scripted(observers)``: a meter on the test's backend reporting to ``observers``,
#: and the outage of that backend.
Scripted = Callable[[Any], tuple[Meter, Outage]]


@pytest.fixture(scope="module")
def stoppable_redis() -> Iterator[_servers.RedisServer]:
    """A redis-server of this module's own, which a test may stop (and start again)."""
    if _servers.redis_binary() is None:
        if _servers.require_redis():
            pytest.fail("no redis-server binary on PATH and METERKIT_REQUIRE_REDIS=1")
        pytest.skip("no redis-server binary on PATH")
    with _servers.standalone() as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
def scripted(request: pytest.FixtureRequest, clock: FakeClock) -> Iterator[Scripted]:
    """Meters for the scripted sequence, on each backend."""
    policy = script_policy()
    if request.param == "memory":
        yield lambda observers: (
            Meter(policy, MemoryBackend(clock=clock), on_decision=observers),
            memory_outage(policy),
        )
        return
    from meterkit.backends.redis.backend import RedisBackend
    from meterkit.connect import redis_client

    server: _servers.RedisServer = request.getfixturevalue("stoppable_redis")
    client = redis_client(server.url)
    prefix = new_prefix()

    backend = RedisBackend(client, prefix=prefix, clock=clock)

    def outage(observers: Any) -> Any:
        @contextmanager
        def down() -> Iterator[tuple[Meter, Meter]]:
            server.stop()
            try:
                yield (
                    Meter(policy, backend, on_decision=observers),
                    Meter(policy, backend, on_decision=observers, fail_open=True),
                )
            finally:
                server.start()

        return down()

    yield lambda observers: (Meter(policy, backend, on_decision=observers), outage)
    if server.process is None:
        server.start()
    delete_prefix(client, prefix)
    client.close()
