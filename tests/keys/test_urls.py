"""Key store URLs: the same spellings as backend_from_url."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from pathlib import Path

import pytest

import meterkit
from tests import _servers
from tests.keys.test_redis import forget


def test_keystore_from_url_accepts_redis_unix_sockets() -> None:
    """``redis+unix://PATH`` reaches a real server over its Unix socket."""
    if _servers.redis_binary() is None:
        if _servers.require_redis():
            pytest.fail("no redis-server binary and METERKIT_REQUIRE_REDIS=1")
        pytest.skip("no redis-server binary on PATH")
    with tempfile.TemporaryDirectory(prefix="mk-sock-") as tmp:
        sock = Path(tmp) / "redis.sock"
        with _servers.standalone("--unixsocket", str(sock), "--unixsocketperm", "700"):
            store = meterkit.keystore_from_url(f"redis+unix://{sock}")
            plaintext, key = store.create(org="org_sock", permissions=["invoices:read"])
            found = store.authenticate(f"Bearer {plaintext}", org="org_sock")
            assert found.id == key.id


def test_keystore_from_url_runs_on_a_redis_cluster(redis_cluster_url: str) -> None:
    """``redis+cluster://`` makes a store on a cluster client, and every operation works."""
    namespace = f"mktest-url-{uuid.uuid4().hex[:8]}"
    store = meterkit.keystore_from_url(redis_cluster_url, namespace=namespace)
    try:
        assert repr(store) == f"RedisKeyStore(namespace='{namespace}', cluster=True)"
        plaintext, key = store.create(org="org_url", permissions=["invoices:read"])
        found = store.authenticate(f"Bearer {plaintext}", org="org_url", permission="invoices:read")
        assert found.id == key.id
        rotated, new = store.rotate(key.id, grace=60)
        assert store.authenticate(f"Bearer {rotated}", org="org_url").id == new.id
        assert {k.id for k in store.list("org_url")} == {key.id, new.id}
        assert store.revoke(key.id).revoked_at is not None
    finally:
        forget(store._client, namespace)
        store.close()


def test_async_keystore_from_url_runs_on_a_redis_cluster(redis_cluster_url: str) -> None:
    """The async factory makes an asyncio store on a cluster client for the same URL."""
    namespace = f"mktest-url-{uuid.uuid4().hex[:8]}"
    store = meterkit.async_keystore_from_url(redis_cluster_url, namespace=namespace)

    async def scenario() -> None:
        try:
            plaintext, key = await store.create(org="org_url")
            assert (await store.authenticate(f"Bearer {plaintext}", org="org_url")).id == key.id
            assert [k.id for k in await store.list("org_url")] == [key.id]
        finally:
            await store.aclose()

    assert repr(store) == f"AsyncRedisKeyStore(namespace='{namespace}', cluster=True)"
    asyncio.run(scenario())
    inspector = meterkit.keystore_from_url(redis_cluster_url, namespace=namespace)
    forget(inspector._client, namespace)
    inspector.close()


def test_an_unreachable_cluster_url_is_backend_unavailable() -> None:
    """Nobody answering a cluster URL is BackendUnavailable: at once from the blocking
    factory (its client connects when made), at the first call of the async store."""
    url = f"redis+cluster://127.0.0.1:{_servers.free_port()}"
    with pytest.raises(meterkit.BackendUnavailable):
        meterkit.keystore_from_url(url)
    store = meterkit.async_keystore_from_url(url)

    async def scenario() -> None:
        try:
            with pytest.raises(meterkit.BackendUnavailable):
                await store.get("key_000000000000")
            with pytest.raises(meterkit.BackendUnavailable):
                await store.create(org="org_1")
        finally:
            await store.aclose()

    asyncio.run(scenario())
