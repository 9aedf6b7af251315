"""What only the Redis key stores do: layout, round trips, secrets at rest, driver errors.

Every test that takes ``handle`` or ``server`` runs on a standalone Redis and on the
session's 3-master Redis Cluster; tests/keys/test_cluster.py covers what only the
cluster does (the order of its separate writes).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import redis
import redis.asyncio.connection
import redis.connection

from meterkit.connect import async_keystore_from_url, keystore_from_url, redis_client
from meterkit.errors import (
    AuthenticationError,
    BackendUnavailable,
    ConfigurationError,
    InvalidRequestError,
    StateError,
)
from meterkit.keys.redis import AsyncRedisKeyStore, RedisKeyStore, _Script
from tests import _servers
from tests.behaviour.test_keys import (
    Handle,
    Opened,
    bearer,
    evalsha_calls,
    open_store,
    refusal,
    url_fixture,
)

KINDS = ["redis", "async-redis", "redis-cluster", "async-redis-cluster"]


@pytest.fixture(params=KINDS)
def handle(request: pytest.FixtureRequest, clock: Any) -> Iterator[Handle]:
    """A fresh Redis store, blocking and async, standalone and on a cluster, in a
    namespace of its own."""
    fixture = url_fixture(request.param)
    assert fixture is not None
    opened = open_store(request.param, clock, request.getfixturevalue(fixture))
    try:
        yield opened.handle
    finally:
        opened.close()


@pytest.fixture(params=["standalone", "cluster"])
def server(request: pytest.FixtureRequest) -> str:
    """The URL of the session's standalone Redis, then of its cluster."""
    url: str = request.getfixturevalue(
        "redis_cluster_url" if request.param == "cluster" else "redis_url"
    )
    return url


def client_for(url: str) -> Any:
    """A new synchronous client for ``url`` (a cluster client for a cluster URL)."""
    return redis_client(url) if "+cluster://" in url else redis.Redis.from_url(url)


def forget(client: Any, namespace: str) -> None:
    """Delete every key under ``namespace`` (one by one: on a cluster they are on many slots)."""
    for name in list(client.scan_iter(match=f"{namespace}:*")):
        client.delete(name)


def _dump(client: redis.Redis) -> list[bytes]:
    """Every key name and every value in the database, as bytes."""
    found: list[bytes] = []
    for name in client.scan_iter(match="*"):
        found.append(name)
        kind = client.type(name)
        if kind == b"hash":
            for field, value in client.hgetall(name).items():
                found += [field, value]
        elif kind == b"set":
            found += list(client.smembers(name))
        elif kind == b"string":
            found.append(client.get(name) or b"")
        elif kind == b"list":
            found += client.lrange(name, 0, -1)
        elif kind == b"zset":
            found += [member for member, _ in client.zrange(name, 0, -1, withscores=True)]
    return found


def test_redis_holds_no_plaintext_and_no_secret(handle: Handle, clock: Any) -> None:
    """After creating, using, rotating and revoking keys, nothing in Redis contains a secret."""
    store = handle.store
    plaintexts = []
    for mode in ("live", "test"):
        plaintext, key = store.create(org="org_1", mode=mode, permissions=["*"], name="ci")
        plaintexts.append(plaintext)
        store.authenticate(bearer(plaintext), org="org_1")
        rotated, _ = store.rotate(key.id, grace=60)
        plaintexts.append(rotated)
    store.revoke(store.list("org_1")[0].id)
    everything = b"\n".join(_dump(handle.redis))
    assert handle.namespace.encode() in everything
    for plaintext in plaintexts:
        secret = plaintext[len("cl_live_") + 12 : -6]
        assert plaintext.encode() not in everything
        for start in range(0, len(secret) - 8):
            assert secret[start : start + 8].encode() not in everything


def test_the_layout_is_one_hash_per_key_and_one_set_per_organization(handle: Handle) -> None:
    """A key lives in <ns>:key:<id> (a hash) and is listed in <ns>:org:<org>:keys (a set)."""
    _, key = handle.store.create(org="org_1", expires_at=1_800_000_000)
    client = handle.redis
    record = client.hgetall(f"{handle.namespace}:key:{key.id}")
    assert set(record) == {b"rec", b"hash", b"expires"}
    assert record[b"hash"].decode() == key.secret_hash
    assert float(record[b"expires"]) == 1_800_000_000
    assert client.smembers(f"{handle.namespace}:org:org_1:keys") == {key.id.encode()}
    assert sorted(client.scan_iter(match=f"{handle.namespace}:*")) == sorted(
        [f"{handle.namespace}:key:{key.id}".encode(), f"{handle.namespace}:org:org_1:keys".encode()]
    )


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The first bytes of every request any redis-py connection sends from now on."""
    sent: list[bytes] = []

    def first_bytes(command: Any) -> bytes:
        return bytes(command[0] if isinstance(command, list) else command)[:40]

    sync_send = redis.connection.AbstractConnection.send_packed_command
    async_send = redis.asyncio.connection.AbstractConnection.send_packed_command

    def counted(self: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(first_bytes(command))
        return sync_send(self, command, *args, **kwargs)

    async def async_counted(self: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(first_bytes(command))
        return await async_send(self, command, *args, **kwargs)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    monkeypatch.setattr(
        redis.asyncio.connection.AbstractConnection, "send_packed_command", async_counted
    )
    return sent


def test_authenticate_is_one_round_trip(handle: Handle, round_trips: list[bytes]) -> None:
    """authenticate sends Redis one request, an EVALSHA, and the server runs one script."""
    plaintext, _ = handle.store.create(org="org_1", permissions=["invoices:read"])
    handle.store.authenticate(bearer(plaintext), org="org_1")  # scripts are loaded by now
    scripts = evalsha_calls(handle.redis)
    round_trips.clear()
    handle.store.authenticate(bearer(plaintext), org="org_1", permission="invoices:read")
    assert len(round_trips) == 1
    assert b"EVALSHA" in round_trips[0]
    assert evalsha_calls(handle.redis) - scripts == 1


def test_scripts_flushed_from_redis_are_reloaded(handle: Handle) -> None:
    """After SCRIPT FLUSH, the stores load their scripts again and work on."""
    plaintext, key = handle.store.create(org="org_1")
    handle.redis.script_flush()
    assert handle.store.authenticate(bearer(plaintext), org="org_1").id == key.id
    handle.redis.script_flush()
    assert handle.store.revoke(key.id).revoked_at is not None


def test_a_wrong_type_record_is_a_state_error(handle: Handle) -> None:
    """A key record that is not a hash raises StateError, not an authentication answer."""
    plaintext, key = handle.store.create(org="org_1")
    handle.redis.delete(f"{handle.namespace}:key:{key.id}")
    handle.redis.set(f"{handle.namespace}:key:{key.id}", b"oops")
    with pytest.raises(StateError):
        handle.store.authenticate(bearer(plaintext), org="org_1")
    with pytest.raises(StateError):
        handle.store.get(key.id)
    with pytest.raises(StateError):
        handle.store.revoke(key.id)


def test_a_wrong_type_organization_index_is_a_state_error_and_nothing_is_written(
    handle: Handle,
) -> None:
    """create refuses to write when the organization's index is not a set."""
    handle.redis.set(f"{handle.namespace}:org:org_1:keys", b"oops")
    with pytest.raises(StateError):
        handle.store.create(org="org_1")
    with pytest.raises(StateError):
        handle.store.list("org_1")
    assert handle.stored() == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rec", b"{not json"),
        ("rec", msgspec.json.encode({"id": "key_x"})),
        ("expires", b"soon"),
        ("used", b"nan"),
        ("hash", b"\xff\xfe"),
    ],
)
def test_a_corrupt_record_is_a_state_error(handle: Handle, field: str, value: bytes) -> None:
    """A record field meterkit could not have written raises StateError."""
    _plaintext, key = handle.store.create(org="org_1")
    handle.redis.hset(f"{handle.namespace}:key:{key.id}", field, value)
    with pytest.raises(StateError):
        handle.store.get(key.id)


def test_a_record_filed_under_another_id_is_a_state_error(handle: Handle) -> None:
    """A record whose content names another key is refused rather than trusted."""
    _, first = handle.store.create(org="org_1")
    _, second = handle.store.create(org="org_1")
    ns = handle.namespace
    handle.redis.hset(
        f"{ns}:key:{second.id}", "rec", handle.redis.hget(f"{ns}:key:{first.id}", "rec")
    )
    with pytest.raises(StateError):
        handle.store.get(second.id)


def test_a_different_pepper_refuses_keys_hashed_with_another(handle: Handle, clock: Any) -> None:
    """Two stores on the same data but different peppers do not accept each other's keys."""
    opened = open_store(
        handle.kind,
        clock,
        handle.url,
        namespace=handle.namespace,
        pepper=b"a-pepper-of-sixteen-bytes+",
    )
    try:
        peppered = opened.handle.store
        plaintext, key = peppered.create(org="org_1")
        assert peppered.authenticate(bearer(plaintext), org="org_1").id == key.id
        assert refusal(lambda: handle.store.authenticate(bearer(plaintext), org="org_1")).code == (
            "invalid_api_key"
        )
        assert handle.store.get(key.id) == peppered.get(key.id)
    finally:
        opened.close()


OLD_PEPPER = b"the-pepper-being-retired"
NEW_PEPPER = b"the-pepper-taking-over!!"


@pytest.mark.parametrize("old", [OLD_PEPPER, None], ids=["pepper", "no-pepper"])
def test_a_previous_pepper_admits_its_keys_and_moves_them_to_the_current_one(
    handle: Handle, clock: Any, old: bytes | None
) -> None:
    """A store with previous_peppers admits a key hashed under one of them, in one
    EVALSHA, and stores its hash under the current pepper: from then on a store with only
    the current pepper admits it and one with only the old pepper no longer does."""

    def store(**peppers: Any) -> Opened:
        return open_store(handle.kind, clock, handle.url, namespace=handle.namespace, **peppers)

    before, rotating, after = (
        store(pepper=old),
        store(pepper=NEW_PEPPER, previous_peppers=[old]),
        store(pepper=NEW_PEPPER),
    )
    try:
        plaintext, key = before.handle.store.create(org="org_1")
        record = f"{handle.namespace}:key:{key.id}"

        def code(opened: Opened, plain: str) -> str:
            return refusal(
                lambda: opened.handle.store.authenticate(bearer(plain), org="org_1")
            ).code

        assert code(after, plaintext) == "invalid_api_key"
        calls = evalsha_calls(handle.redis)
        assert rotating.handle.store.authenticate(bearer(plaintext), org="org_1").id == key.id
        assert evalsha_calls(handle.redis) == calls + 1
        expected = hmac.new(NEW_PEPPER, plaintext.encode(), hashlib.sha256).hexdigest()
        assert handle.redis.hget(record, "hash") == expected.encode()
        assert handle.store.get(key.id).secret_hash == expected
        assert after.handle.store.authenticate(bearer(plaintext), org="org_1").id == key.id
        assert code(before, plaintext) == "invalid_api_key"
        # a key under neither pepper is refused, and its record is left as it was
        stranger = open_store(
            handle.kind,
            clock,
            handle.url,
            namespace=handle.namespace,
            pepper=b"a-third-pepper-nobody-has",
        )
        try:
            other, other_key = stranger.handle.store.create(org="org_1")
        finally:
            stranger.close()
        kept = handle.redis.hget(f"{handle.namespace}:key:{other_key.id}", "hash")
        assert code(rotating, other) == "invalid_api_key"
        assert handle.redis.hget(f"{handle.namespace}:key:{other_key.id}", "hash") == kept
    finally:
        for opened in (before, rotating, after):
            opened.close()


def test_an_unreachable_redis_is_backend_unavailable(clock: Any) -> None:
    """Connection failures surface as BackendUnavailable, chained to redis-py's error."""
    url = f"redis://127.0.0.1:{_servers.free_port()}/0?socket_connect_timeout=1"
    store = keystore_from_url(url, clock=clock)
    try:
        with pytest.raises(BackendUnavailable) as caught:
            store.create(org="org_1")
        assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)
        with pytest.raises(BackendUnavailable):
            store.authenticate("Bearer " + store.key_format.generate("live"), org="org_1")
    finally:
        store.close()


def test_an_unreachable_redis_is_backend_unavailable_for_async_stores_too(clock: Any) -> None:
    """The async store maps connection failures to BackendUnavailable as well."""
    url = f"redis://127.0.0.1:{_servers.free_port()}/0?socket_connect_timeout=1"
    store = async_keystore_from_url(url, clock=clock)

    async def scenario() -> None:
        try:
            with pytest.raises(BackendUnavailable):
                await store.get("key_000000000000")
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_malformed_headers_never_reach_an_unreachable_redis(clock: Any) -> None:
    """Refusals decided by the format need no Redis: they answer even when it is down."""
    url = f"redis://127.0.0.1:{_servers.free_port()}/0?socket_connect_timeout=1"
    store = keystore_from_url(url, clock=clock)
    try:
        truncated = "Bearer " + store.key_format.generate("live")[:-1]
        with pytest.raises(AuthenticationError):
            store.authenticate(truncated, org="org_1")
        with pytest.raises(InvalidRequestError):
            store.create(org="nope")
    finally:
        store.close()


def test_rotation_retries_when_the_old_key_changes_midway(server: str, clock: Any) -> None:
    """A revoke landing between rotate's read and its write is seen, and rotate refuses.

    On a cluster the new id is indexed before the guarded write; the refused rotation
    takes it back, so nothing of it is left behind.
    """
    namespace = f"mktest-race-{uuid.uuid4().hex[:8]}"
    store = RedisKeyStore.from_url(server, namespace=namespace, clock=clock)
    try:
        _, key = store.create(org="org_race")
        old_key = f"{namespace}:key:{key.id}"
        program = store._commands.rotate(key.id, grace=60)
        read = next(program)
        step = program.send(store._call(read))
        while not (isinstance(step, _Script) and old_key in step.keys):
            step = program.send(store._call(step))  # a cluster indexes the new id first
        store.revoke(key.id)
        assert store._call(step) == 0  # the script's guard saw the change and wrote nothing
        step = program.send(0)
        while step != read:
            step = program.send(store._call(step))  # a cluster takes the new id back
        with pytest.raises(InvalidRequestError, match="revoked"):
            program.send(store._call(step))
        assert store._client.smembers(f"{namespace}:org:org_race:keys") == {key.id.encode()}
        assert sorted(store._client.scan_iter(match=f"{namespace}:*")) == sorted(
            [old_key.encode(), f"{namespace}:org:org_race:keys".encode()]
        )
        assert [k.id for k in store.list("org_race")] == [key.id]
    finally:
        forget(store._client, namespace)
        store.close()


def test_url_factories_choose_the_redis_stores(server: str) -> None:
    """keystore_from_url and async_keystore_from_url pick the Redis stores for redis://
    and for redis+cluster://, on a cluster client for the latter."""
    sync_store = keystore_from_url(server, namespace="mk-factory")
    async_store = async_keystore_from_url(server, namespace="mk-factory")
    assert isinstance(sync_store, RedisKeyStore)
    assert isinstance(async_store, AsyncRedisKeyStore)
    on_cluster = ", cluster=True" if "+cluster://" in server else ""
    assert repr(sync_store) == f"RedisKeyStore(namespace='mk-factory'{on_cluster})"
    assert repr(async_store) == f"AsyncRedisKeyStore(namespace='mk-factory'{on_cluster})"
    assert isinstance(sync_store._client, redis.RedisCluster) == bool(on_cluster)
    assert isinstance(async_store._client, redis.asyncio.RedisCluster) == bool(on_cluster)
    sync_store.close()
    asyncio.run(async_store.aclose())


def test_a_client_passed_in_is_left_open(server: str) -> None:
    """A store built on the caller's client (a cluster client too) does not close it."""
    client = client_for(server)
    store = RedisKeyStore(client, namespace="mk-borrowed")
    assert store._commands.cluster == ("+cluster://" in server)
    store.close()
    assert client.ping()
    client.close()


@pytest.mark.parametrize("namespace", ["", "has space", "x" * 65, 5])
def test_a_bad_namespace_is_a_configuration_error(redis_url: str, namespace: Any) -> None:
    """namespace must be 1 to 64 printable ASCII characters without spaces."""
    client = redis.Redis.from_url(redis_url)
    try:
        with pytest.raises(ConfigurationError):
            RedisKeyStore(client, namespace=namespace)
    finally:
        client.close()
