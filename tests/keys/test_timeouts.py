"""Key stores built from a URL share the backends' connection settings: a stuck Redis
is BackendUnavailable within the timeout, not a hung authenticate (issue 17, item 4)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

import meterkit
from meterkit import BackendUnavailable
from tests import _servers


@contextmanager
def stopped(server: _servers.RedisServer) -> Iterator[None]:
    """The server alive but silent (SIGSTOP), resumed afterwards."""
    assert server.process is not None
    pid = server.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _timed(call: Callable[[], object]) -> float:
    start = time.monotonic()
    with pytest.raises(BackendUnavailable):
        call()
    return time.monotonic() - start


def test_a_stopped_redis_fails_authenticate_within_the_timeout(
    own_server: _servers.RedisServer,
) -> None:
    """With redis-server SIGSTOPped, authenticate through keystore_from_url(timeout=0.5)
    raises BackendUnavailable in about that long."""
    store = meterkit.keystore_from_url(own_server.url, timeout=0.5)
    try:
        plaintext, _ = store.create(org="org_1")
        with stopped(own_server):
            took = _timed(lambda: store.authenticate(f"Bearer {plaintext}", org="org_1"))
        assert took < 5
    finally:
        store.close()


def test_a_stopped_redis_fails_async_authenticate_within_the_timeout(
    own_server: _servers.RedisServer,
) -> None:
    """The asyncio store from async_keystore_from_url has the same timeout."""

    async def scenario() -> float:
        store = meterkit.async_keystore_from_url(own_server.url, timeout=0.5)
        try:
            plaintext, _ = await store.create(org="org_1")
            with stopped(own_server):
                start = time.monotonic()
                with pytest.raises(BackendUnavailable):
                    await store.authenticate(f"Bearer {plaintext}", org="org_1")
                return time.monotonic() - start
        finally:
            await store.aclose()

    assert asyncio.run(scenario()) < 5
