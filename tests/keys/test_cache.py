"""CachedKeyStore and AsyncCachedKeyStore: authenticate from memory for a short while."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
import redis

from meterkit import (
    ApiKey,
    AsyncCachedKeyStore,
    AsyncMemoryKeyStore,
    AuthenticationError,
    CachedKeyStore,
    ConfigurationError,
    MemoryKeyStore,
    RedisKeyStore,
)
from tests.behaviour.test_keys import evalsha_calls
from tests.conftest import FakeClock


def bearer(plaintext: str) -> str:
    return f"Bearer {plaintext}"


def code(call: Any) -> str:
    with pytest.raises(AuthenticationError) as caught:
        call()
    return caught.value.code


class Counting(MemoryKeyStore):
    """A memory store that counts the calls of authenticate that reach it."""

    calls = 0

    def authenticate(
        self, authorization: Any, *, org: str | None, permission: str | None = None
    ) -> ApiKey:
        self.calls += 1
        return super().authenticate(authorization, org=org, permission=permission)


@pytest.fixture
def store(clock: FakeClock) -> Counting:
    return Counting(clock=clock)


def test_an_admitted_key_is_answered_from_memory_until_the_ttl_passes(
    store: Counting, clock: FakeClock
) -> None:
    """Within ttl the same header is admitted without the store; then the store again."""
    cached = CachedKeyStore(store, ttl=5)
    plain, key = store.create(org="org_1", permissions=["invoices:read"])
    for _ in range(10):
        assert cached.authenticate(bearer(plain), org="org_1", permission="invoices:read").id == (
            key.id
        )
        clock.now += 0.4
    assert store.calls == 1
    clock.now += 1.1  # 5.1 s after the first call
    assert cached.authenticate(bearer(plain), org="org_1").id == key.id
    assert store.calls == 2
    assert store.get(key.id).last_used_at == clock.now  # type: ignore[union-attr]


def test_a_cached_key_is_still_held_to_org_permission_and_expiry(
    store: Counting, clock: FakeClock
) -> None:
    """A remembered record is admitted by the store's rules: another organization or a
    permission it lacks gets the store's own refusal, and so does a key past its expiry."""
    cached = CachedKeyStore(store, ttl=60)
    plain, key = store.create(org="org_1", permissions=["invoices:read"], expires_at=clock.now + 10)
    assert cached.authenticate(bearer(plain), org="org_1").id == key.id
    assert code(lambda: cached.authenticate(bearer(plain), org="org_2")) == (
        "organization_not_found"
    )
    assert code(
        lambda: cached.authenticate(bearer(plain), org="org_1", permission="invoices:write")
    ) == ("insufficient_permissions")
    clock.now += 10
    assert code(lambda: cached.authenticate(bearer(plain), org="org_1")) == "expired_api_key"


def test_refusals_are_never_remembered(store: Counting) -> None:
    """A made-up or malformed header reaches the store every time: nothing is kept."""
    cached = CachedKeyStore(store, ttl=60)
    made_up = bearer(store.key_format.generate("live"))
    for header in (made_up, made_up, "Bearer nonsense", "Bearer ünïcode", None, b"\xff"):
        assert code(lambda h=header: cached.authenticate(h, org="org_1")) == "invalid_api_key"
    assert store.calls == 6
    assert len(cached._cache) == 0


def test_revoke_and_rotate_through_the_cache_take_effect_at_once(store: Counting) -> None:
    """revoke and rotate made through the cache forget the key; made elsewhere, they
    take effect here once the ttl has passed."""
    cached = CachedKeyStore(store, ttl=60)
    plain, key = store.create(org="org_1")
    cached.authenticate(bearer(plain), org="org_1")
    cached.revoke(key.id)
    assert code(lambda: cached.authenticate(bearer(plain), org="org_1")) == "invalid_api_key"

    plain, key = store.create(org="org_1")
    cached.authenticate(bearer(plain), org="org_1")
    new_plain, _ = cached.rotate(key.id, grace=0)
    assert code(lambda: cached.authenticate(bearer(plain), org="org_1")) == "expired_api_key"
    assert cached.authenticate(bearer(new_plain), org="org_1").org == "org_1"


def test_set_expiry_through_the_cache_takes_effect_at_once(
    store: Counting, clock: FakeClock
) -> None:
    """An expiry set through the cache forgets the key, so the next call sees it."""
    cached = CachedKeyStore(store, ttl=60)
    plain, key = store.create(org="org_1")
    cached.authenticate(bearer(plain), org="org_1")
    assert cached.set_expiry(key.id, clock.now + 1).expires_at == clock.now + 1
    clock.now += 1
    assert code(lambda: cached.authenticate(bearer(plain), org="org_1")) == "expired_api_key"


def test_a_revocation_elsewhere_shows_after_the_ttl(store: Counting, clock: FakeClock) -> None:
    """A key revoked through another handle keeps working here for at most ttl."""
    cached = CachedKeyStore(store, ttl=5)
    plain, key = store.create(org="org_1")
    cached.authenticate(bearer(plain), org="org_1")
    store.revoke(key.id)  # not through the cache
    clock.now += 4.9
    assert cached.authenticate(bearer(plain), org="org_1").id == key.id
    clock.now += 0.1
    assert code(lambda: cached.authenticate(bearer(plain), org="org_1")) == "invalid_api_key"


def test_a_record_fetched_while_a_key_is_forgotten_is_not_kept(
    store: Counting, clock: FakeClock
) -> None:
    """A revoke through the cache during a store call keeps that call's record out of
    the cache (it may be the key being revoked, read just before)."""
    cached = CachedKeyStore(store, ttl=60)
    plain, key = store.create(org="org_1")
    _, other = store.create(org="org_1")
    original = store.authenticate

    def racing(authorization: Any, *, org: str | None, permission: str | None = None) -> ApiKey:
        record = original(authorization, org=org, permission=permission)
        cached.revoke(other.id)  # meanwhile, in another thread
        return record

    store.authenticate = racing  # type: ignore[method-assign]
    assert cached.authenticate(bearer(plain), org="org_1").id == key.id
    store.authenticate = original  # type: ignore[method-assign]
    calls = store.calls
    cached.authenticate(bearer(plain), org="org_1")
    assert store.calls == calls + 1  # it was not kept


def test_the_oldest_entries_go_first_past_max_entries(store: Counting) -> None:
    """At most max_entries headers are remembered; the oldest is dropped first."""
    cached = CachedKeyStore(store, ttl=60, max_entries=2)
    plains = [store.create(org="org_1")[0] for _ in range(3)]
    for plain in plains:
        cached.authenticate(bearer(plain), org="org_1")
    assert len(cached._cache) == 2
    calls = store.calls
    cached.authenticate(bearer(plains[2]), org="org_1")
    cached.authenticate(bearer(plains[1]), org="org_1")
    assert store.calls == calls
    cached.authenticate(bearer(plains[0]), org="org_1")
    assert store.calls == calls + 1


def test_the_cache_holds_no_plaintext(store: Counting) -> None:
    """Entries are keyed by a digest of the header; neither repr nor keys show a secret."""
    cached = CachedKeyStore(store, ttl=60)
    plain, _ = store.create(org="org_1")
    cached.authenticate(bearer(plain), org="org_1")
    entries = cached._cache._entries
    assert all(plain.encode() not in digest and len(digest) == 32 for digest in entries)
    assert plain not in repr(cached)
    assert plain not in repr(list(entries.values()))


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": -1}, "ttl"),
        ({"ttl": math.nan}, "ttl"),
        ({"ttl": True}, "ttl"),
        ({"ttl": "5"}, "ttl"),
        ({"ttl": 3601}, "ttl"),
        ({"max_entries": 0}, "max_entries"),
        ({"max_entries": True}, "max_entries"),
        ({"max_entries": 1.5}, "max_entries"),
    ],
)
def test_bad_options_are_configuration_errors(
    store: Counting, options: dict[str, Any], field: str
) -> None:
    """ttl is (0, 3600] seconds and max_entries a positive integer."""
    with pytest.raises(ConfigurationError) as caught:
        CachedKeyStore(store, **options)
    assert caught.value.location == field


def test_only_meterkit_stores_can_be_wrapped() -> None:
    """Something without the store's rules is refused with ConfigurationError."""
    with pytest.raises(ConfigurationError):
        CachedKeyStore(object())  # type: ignore[arg-type]


def test_the_async_cache_answers_from_memory_too(clock: FakeClock) -> None:
    """AsyncCachedKeyStore over an async store: the same admissions, one store call."""
    inner = AsyncMemoryKeyStore(clock=clock)
    cached = AsyncCachedKeyStore(inner, ttl=5)
    calls = 0
    original = inner.authenticate

    async def counted(
        authorization: Any, *, org: str | None, permission: str | None = None
    ) -> ApiKey:
        nonlocal calls
        calls += 1
        return await original(authorization, org=org, permission=permission)

    inner.authenticate = counted  # type: ignore[method-assign]

    async def run() -> None:
        plain, key = await cached.create(org="org_1")
        for _ in range(5):
            assert (await cached.authenticate(bearer(plain), org="org_1")).id == key.id
        assert calls == 1
        await cached.revoke(key.id)
        with pytest.raises(AuthenticationError):
            await cached.authenticate(bearer(plain), org="org_1")
        assert [k.id for k in await cached.list("org_1")] == [key.id]
        await cached.aclose()

    asyncio.run(run())


def test_on_redis_a_cached_key_costs_no_round_trip(redis_url: str, clock: FakeClock) -> None:
    """Against a real Redis: the first authenticate is a round trip, the next ones within
    ttl none, the first one after it one again."""
    store = RedisKeyStore.from_url(redis_url, namespace="mk-cache-test", clock=clock)
    cached = CachedKeyStore(store, ttl=5)
    client = redis.Redis.from_url(redis_url)
    try:
        plain, key = cached.create(org="org_1")
        assert cached.authenticate(bearer(plain), org="org_1").id == key.id
        before = evalsha_calls(client)
        for _ in range(20):
            assert cached.authenticate(bearer(plain), org="org_1").id == key.id
        assert evalsha_calls(client) == before
        clock.now += 5
        cached.authenticate(bearer(plain), org="org_1")
        assert evalsha_calls(client) == before + 1
    finally:
        cached.close()
        client.close()
