"""A Redis that may evict keys is refused at connect (issue 17 item 8): an evicted
counter admits too much, and evicted credits are lost. Each test starts a server of
its own, configured as the case needs."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
import redis

from meterkit import AsyncMeter, ConfigurationError, Meter, Policy
from meterkit.backends.redis.eviction import eviction_error
from meterkit.connect import async_backend_from_url, backend_from_url
from tests import _servers

pytestmark = pytest.mark.skipif(
    _servers.redis_binary() is None and not _servers.require_redis(),
    reason="no redis-server binary on PATH",
)

EVICTING = ["allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-ttl"]


@pytest.mark.parametrize("policy", EVICTING)
def test_a_server_that_may_evict_is_refused_with_a_clear_error(policy: str) -> None:
    with _servers.standalone("--maxmemory", "100mb", "--maxmemory-policy", policy) as server:
        with pytest.raises(ConfigurationError) as raised:
            backend_from_url(server.url)
        assert policy in str(raised.value)
        assert "noeviction" in str(raised.value)
        assert raised.value.location == "allow_eviction"
        # Refused before anything was written.
        assert redis.Redis.from_url(server.url).dbsize() == 0


def test_noeviction_or_no_memory_limit_is_accepted() -> None:
    with _servers.standalone("--maxmemory", "100mb", "--maxmemory-policy", "noeviction") as a:
        meter = Meter(Policy.crane_ledger(), backend_from_url(a.url))
        assert meter.check("key_1", org="org_1", operation="invoices.list").allowed
        meter.close()
    # maxmemory 0 (the default): no limit, so the policy never applies
    with _servers.standalone("--maxmemory-policy", "allkeys-lru") as b:
        meter = Meter(Policy.crane_ledger(), backend_from_url(b.url))
        assert meter.check("key_1", org="org_1", operation="invoices.list").allowed
        meter.close()


def test_allow_eviction_opts_out() -> None:
    with _servers.standalone("--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru") as s:
        meter = Meter(Policy.crane_ledger(), backend_from_url(s.url, allow_eviction=True))
        assert meter.check("key_1", org="org_1", operation="invoices.list").allowed
        meter.close()
        with pytest.raises(ConfigurationError):
            backend_from_url(s.url, allow_eviction="yes")


def test_a_server_down_at_construction_is_checked_before_the_first_check() -> None:
    port = _servers.free_port()
    meter = Meter(Policy.crane_ledger(), backend_from_url(f"redis://127.0.0.1:{port}/0"))
    with tempfile.TemporaryDirectory() as tmp:
        server = _servers.RedisServer(
            Path(tmp), port, "--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru"
        )
        server.start()
        try:
            for _ in range(2):  # (refused every time, not once)
                with pytest.raises(ConfigurationError):
                    meter.check("key_1", org="org_1", operation="invoices.list")
            with pytest.raises(ConfigurationError):
                meter.usage("org_1")
            assert redis.Redis.from_url(server.url).dbsize() == 0
        finally:
            meter.close()
            server.stop()


def test_the_async_backend_refuses_before_its_first_command() -> None:
    with _servers.standalone("--maxmemory", "100mb", "--maxmemory-policy", "volatile-lru") as s:

        async def scenario() -> None:
            async with AsyncMeter(Policy.crane_ledger(), async_backend_from_url(s.url)) as meter:
                with pytest.raises(ConfigurationError):
                    await meter.check("key_1", org="org_1", operation="invoices.list")
                with pytest.raises(ConfigurationError):
                    await meter.check_many([("key_1", "invoices.list", "org_1")])
            allowed = async_backend_from_url(s.url, allow_eviction=True)
            async with AsyncMeter(Policy.crane_ledger(), allowed) as meter:
                decision = await meter.check("key_1", org="org_1", operation="invoices.list")
                assert decision.allowed

        asyncio.run(scenario())
        assert redis.Redis.from_url(s.url).dbsize() > 0  # (only the allowed one wrote)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_every_cluster_primary_is_checked(asynchronous: bool) -> None:
    if _servers.redis_binary() is None:
        pytest.fail("no redis-server")
    with _servers.cluster(3) as nodes:
        # One primary of three may evict: that is enough to refuse.
        redis.Redis(port=nodes[2].port).config_set("maxmemory", "100mb")
        redis.Redis(port=nodes[2].port).config_set("maxmemory-policy", "allkeys-lfu")
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes)
        if not asynchronous:
            with pytest.raises(ConfigurationError, match="allkeys-lfu"):
                backend_from_url(url)
            return

        async def scenario() -> None:
            async with AsyncMeter(Policy.crane_ledger(), async_backend_from_url(url)) as meter:
                with pytest.raises(ConfigurationError, match="allkeys-lfu"):
                    await meter.check("key_1", org="org_1", operation="invoices.list")

        asyncio.run(scenario())


def test_the_rule_reads_parsed_info() -> None:
    assert eviction_error([{"maxmemory": 0, "maxmemory_policy": "allkeys-lru"}]) is None
    assert eviction_error([{"maxmemory": 10, "maxmemory_policy": "noeviction"}]) is None
    assert eviction_error([{}]) is None  # (a server that reports neither: no limit)
    error = eviction_error(
        [{"maxmemory": 0}, {"maxmemory": "5", "maxmemory_policy": "volatile-lfu"}]
    )
    assert error is not None
    assert "volatile-lfu" in str(error)


def test_the_redis_key_stores_refuse_an_evicting_server_too() -> None:
    from meterkit.connect import async_keystore_from_url, keystore_from_url

    with _servers.standalone("--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru") as s:
        store = keystore_from_url(s.url)
        with pytest.raises(ConfigurationError, match="allkeys-lru"):
            store.create(org="org_1", name="ci")
        store.close()
        assert redis.Redis.from_url(s.url).dbsize() == 0
        allowed = keystore_from_url(s.url, allow_eviction=True)
        plaintext, record = allowed.create(org="org_1", name="ci")
        assert allowed.authenticate(f"Bearer {plaintext}", org="org_1").id == record.id
        allowed.close()

        async def scenario() -> None:
            store = async_keystore_from_url(s.url)
            try:
                with pytest.raises(ConfigurationError, match="allkeys-lru"):
                    await store.list("org_1")
            finally:
                await store.aclose()

        asyncio.run(scenario())
