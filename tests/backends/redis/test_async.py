"""AsyncRedisBackend coalesces: checks that tasks start in the same turn of the event
loop go to Redis together, as batch script calls, each still atomic on its own and
each answered to its own caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from meterkit import (
    AsyncMeter,
    InvalidRequestError,
    MemoryBackend,
    Meter,
    StateError,
)
from meterkit.backends.redis.backend import AsyncRedisBackend
from meterkit.backends.redis.codec import BATCH as _BATCH
from meterkit.connect import async_backend_from_url
from tests import _servers
from tests.backends.redis.test_backend import _policy
from tests.conftest import FakeClock, new_prefix


@pytest.fixture
async def meters(own_server: Any) -> AsyncIterator[tuple[AsyncMeter, Meter, redis.Redis]]:
    """An AsyncMeter on Redis, a Meter on memory on the same fake clock, and a client."""
    clock = FakeClock()
    backend = async_backend_from_url(own_server.url, prefix=new_prefix(), clock=clock)
    assert isinstance(backend, AsyncRedisBackend)
    client = redis.Redis(port=own_server.port)
    async with AsyncMeter(_policy("1"), backend) as meter:
        yield meter, Meter(_policy("1"), MemoryBackend(clock=clock)), client
    client.close()


def _comparable(decision: Any) -> tuple[Any, ...]:
    out = decision.outcome
    return (*out[:8], bool(out[8]), out[9])


REQUESTS = [
    (f"k{i % 7}", ("items.list", "items.create")[i % 3 == 0], f"o{i % 4}") for i in range(120)
]


async def test_concurrent_checks_go_as_batches_and_decide_as_one_by_one(
    meters: tuple[AsyncMeter, Meter, redis.Redis],
) -> None:
    """120 tasks started together: ceil(120 / 50) EVALSHA, and every task gets the
    decision that the same checks made one by one, in task order, get."""
    meter, reference, client = meters
    await meter.check("warm", org="o", operation="items.list")  # registers the scripts
    await asyncio.gather(*(meter.check("warm", org="o", operation="items.list") for _ in "ab"))
    client.config_resetstat()
    got = await asyncio.gather(
        *(meter.check(key, org=org, operation=op) for key, op, org in REQUESTS)
    )
    calls = client.info("commandstats")["cmdstat_evalsha"]["calls"]
    assert calls == -(-len(REQUESTS) // _BATCH)
    reference.check("warm", org="o", operation="items.list")
    reference.check("warm", org="o", operation="items.list")
    reference.check("warm", org="o", operation="items.list")
    want = [reference.check(key, org=org, operation=op) for key, op, org in REQUESTS]
    assert [_comparable(d) for d in got] == [_comparable(d) for d in want]
    assert not all(d.allowed for d in got)  # the tiers said no to some


async def test_a_full_batch_goes_at_once_without_waiting_for_the_end_of_the_turn(
    meters: tuple[AsyncMeter, Meter, redis.Redis],
) -> None:
    """_BATCH + 1 tasks started together: once they have all run, the first _BATCH
    checks are already on their way as one call and only the last one waits for the
    end of the turn; all of them are answered, in two EVALSHA."""
    meter, _, client = meters
    backend: Any = meter.backend
    await asyncio.gather(*(meter.check("warm", org="o", operation="items.list") for _ in "ab"))
    client.config_resetstat()
    tasks = [
        asyncio.ensure_future(meter.check(f"k{i}", org=f"o{i}", operation="items.list"))
        for i in range(_BATCH + 1)
    ]
    await asyncio.sleep(0)  # every task has queued its check; the turn is not over
    assert len(backend._queue) == 1
    assert len(backend._sending) == 1
    assert all(d.allowed for d in await asyncio.gather(*tasks))
    assert client.info("commandstats")["cmdstat_evalsha"]["calls"] == 2


async def test_a_lone_check_is_sent_alone(meters: tuple[AsyncMeter, Meter, redis.Redis]) -> None:
    """A check with no company in its turn of the loop is one plain check: one EVALSHA."""
    meter, _, client = meters
    await meter.check("warm", org="o", operation="items.list")
    client.config_resetstat()
    for i in range(3):
        assert (await meter.check(f"k{i}", org="o", operation="items.list")).allowed
    assert client.info("commandstats")["cmdstat_evalsha"]["calls"] == 3


async def test_errors_in_a_coalesced_batch_reach_only_their_own_callers(
    meters: tuple[AsyncMeter, Meter, redis.Redis],
) -> None:
    """An idempotency conflict and a key of the wrong type fail their own tasks; the
    other tasks of the same batch script call are decided and applied."""
    meter, _, client = meters
    backend: Any = meter.backend
    await meter.check("k1", org="o1", operation="items.list", idempotency_key="x")
    client.hset(f"{backend.prefix}:{{o3}}:gc:gc.5.60.2:k", "x", "1")
    calls = [
        meter.check("k1", org="o1", operation="items.list"),
        meter.check("k2", org="o1", operation="items.create", idempotency_key="x"),  # conflict
        meter.check("k", org="o3", operation="items.list"),  # a hash where a TAT belongs
        meter.check("k1", org="o2", operation="items.list"),
    ]
    client.config_resetstat()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert client.info("commandstats")["cmdstat_evalsha"]["calls"] == 1
    assert isinstance(results[1], InvalidRequestError)
    assert isinstance(results[2], StateError)
    assert results[0].allowed
    assert results[3].allowed
    assert (await meter.usage("o1")).requests == 2
    assert (await meter.usage("o3")).requests == 0


async def test_a_cancelled_caller_leaves_the_rest_of_its_batch_alone(
    meters: tuple[AsyncMeter, Meter, redis.Redis],
) -> None:
    """Cancelling one task whose check is queued with others: they still get answers,
    and the cancelled check, not sent yet, never happens."""
    meter, _, _ = meters
    tasks = [
        asyncio.ensure_future(meter.check(f"k{i}", org="o", operation="items.list"))
        for i in range(5)
    ]
    await asyncio.sleep(0)  # every task has queued its check
    tasks[2].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[2], asyncio.CancelledError)
    assert all(d.allowed for i, d in enumerate(done) if i != 2)
    assert (await meter.usage("o")).requests == 4


async def test_a_batch_whose_connection_fails_fails_every_caller_typed(own_server: Any) -> None:
    """Checks coalesced into one call on a server that is gone all raise
    BackendUnavailable, caused by the driver's error."""
    from meterkit import BackendUnavailable

    port = _servers.free_port()
    backend = async_backend_from_url(f"redis://127.0.0.1:{port}/0", timeout=0.5)
    async with AsyncMeter(_policy(), backend) as meter:
        results = await asyncio.gather(
            *(meter.check(f"k{i}", org="o", operation="items.list") for i in range(3)),
            return_exceptions=True,
        )
    assert all(isinstance(r, BackendUnavailable) for r in results)
    assert all(isinstance(r.__cause__, redis.RedisError) for r in results)


async def test_close_on_asyncio_objects_is_a_deprecated_alias_of_aclose(redis_url: str) -> None:
    """asyncio objects close with ``aclose()`` (as httpx's do); the old ``close()``
    still works, with a DeprecationWarning."""
    import meterkit
    from meterkit.connect import async_backend_from_url

    backend = async_backend_from_url(redis_url)
    meter = meterkit.AsyncMeter(meterkit.Policy.crane_ledger(), backend)
    with pytest.warns(DeprecationWarning, match=r"use AsyncMeter\.aclose\(\)"):
        await meter.close()
    other = async_backend_from_url(redis_url)
    with pytest.warns(DeprecationWarning, match=r"use AsyncRedisBackend\.aclose\(\)"):
        await other.close()
    async with meterkit.AsyncMeter(
        meterkit.Policy.crane_ledger(), async_backend_from_url(redis_url)
    ):
        pass  # (leaving the block closes with aclose(), without a warning)
