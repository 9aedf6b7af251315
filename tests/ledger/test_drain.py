"""The drain on real Redis: each event exactly once in the store, whatever fails when;
pending entries taken back or claimed; streams trimmed only to what was confirmed."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from meterkit.backends.redis.scripts import script
from meterkit.connect import redis_client
from meterkit.errors import BackendUnavailable, StateError
from meterkit.ledger import Drain, Event, store_from_url
from meterkit.ledger.streams import stream_for
from tests.conftest import delete_prefix, new_prefix

T = 1_767_225_600_000_000


def add_charges(client: Any, prefix: str, n: int, *, orgs: int = 1, cluster: bool = False,
                start: int = 0) -> None:  # fmt: skip
    """Append ``n`` charge entries as check.lua writes them, spread over ``orgs``."""
    pipe = client.pipeline(transaction=False)
    for i in range(start, start + n):
        base = f"{prefix}:{{org_{i % orgs}}}:"
        body = f"charge{i}\n{base}cr\n{T + i}\n10000\nq|invoices.list|key_{i % 5}"
        pipe.xadd(stream_for(prefix, base, cluster), {"c": body})
    pipe.execute()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[tuple[Any, str, str]]:
    """(a client, a fresh key prefix, the URL) on the session's standalone Redis."""
    client = redis.Redis.from_url(redis_url)
    prefix = new_prefix()
    yield client, prefix, redis_url
    delete_prefix(client, prefix)
    client.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/ledger.db"


class Failing:
    """A store that fails a batch once: before committing it, or after."""

    def __init__(self, store: Any, *, after_commit: bool) -> None:
        self.store = store
        self.after_commit = after_commit
        self.armed = True
        self.url = store.url

    def write(self, events: Sequence[Event]) -> int:
        if self.armed and not self.after_commit:
            self.armed = False
            raise BackendUnavailable("the store went away before committing")
        n = self.store.write(events)
        if self.armed:
            self.armed = False
            raise BackendUnavailable("the drain died after the commit")
        return int(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_a_drain_moves_every_event_once_and_trims(
    redis_prefix: tuple[Any, str, str], store_url: str
) -> None:
    """Everything in the stream reaches the store once; the stream is then empty."""
    client, prefix, url = redis_prefix
    add_charges(client, prefix, 2_345, orgs=7)
    with Drain(url, store_url, prefix=prefix, batch=500) as drain:
        assert drain.run_once() == 2_345
        assert drain.store.count() == 2_345
        assert client.xlen(f"{prefix}:ledger") == 0
        add_charges(client, prefix, 10, orgs=7, start=2_345)
        assert drain.run_once() == 10
        assert drain.run_once() == 0
        assert drain.stats.inserted == drain.stats.moved == 2_355


@pytest.mark.parametrize("after_commit", [False, True])
def test_a_batch_that_failed_is_taken_back_by_the_same_consumer(
    redis_prefix: tuple[Any, str, str], sqlite_url: str, after_commit: bool
) -> None:
    """A batch whose commit (or acknowledgement) failed stays pending; the same consumer
    reads it again and the store ends with each event once."""
    client, prefix, url = redis_prefix
    add_charges(client, prefix, 300)
    store = store_from_url(sqlite_url)
    failing = Failing(store, after_commit=after_commit)
    drain = Drain(url, failing, prefix=prefix, consumer="one", batch=100)
    with pytest.raises(BackendUnavailable):
        drain.run_once()
    # (the failed batch, and the next one, read while it was being written)
    pending = client.xpending(f"{prefix}:ledger", "meterkit")["pending"]
    assert pending in (100, 200)
    assert store.count() == (100 if after_commit else 0)
    drain.close()
    again = Drain(url, store, prefix=prefix, consumer="one", batch=100)
    assert again.run_once() == 300
    assert store.count() == 300
    assert again.stats.inserted == (200 if after_commit else 300)
    assert client.xlen(f"{prefix}:ledger") == 0
    again.close()
    store.close()


def test_another_drain_claims_what_a_dead_one_held(
    redis_prefix: tuple[Any, str, str], sqlite_url: str
) -> None:
    """Entries a vanished consumer held are claimed by another after claim_idle."""
    client, prefix, url = redis_prefix
    add_charges(client, prefix, 250)
    store = store_from_url(sqlite_url)
    dead = Drain(url, Failing(store, after_commit=True), prefix=prefix, consumer="dead", batch=100)
    with pytest.raises(BackendUnavailable):
        dead.run_once()
    dead.close()
    held = client.xpending(f"{prefix}:ledger", "meterkit")["pending"]
    other = Drain(url, store, prefix=prefix, consumer="other", claim_idle=0)
    assert other.run_once() == 250
    assert other.stats.claimed == held >= 100
    assert store.count() == 250
    assert client.xpending(f"{prefix}:ledger", "meterkit")["pending"] == 0
    other.close()
    store.close()


def test_several_drains_at_once_move_each_event_once(
    redis_prefix: tuple[Any, str, str], store_url: str
) -> None:
    """Four drains (threads, one group) share the stream; the store holds each event once."""
    client, prefix, url = redis_prefix
    add_charges(client, prefix, 4_000, orgs=13)
    store = store_from_url(store_url)
    drains = [Drain(url, store, prefix=prefix, consumer=f"d{i}", batch=150) for i in range(4)]
    threads = [threading.Thread(target=d.run, kwargs={"until_empty": True}) for d in drains]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    moved = sum(d.stats.moved for d in drains)
    for d in drains:
        d.close()
    assert store.count() == 4_000
    assert moved == 4_000
    assert client.xlen(f"{prefix}:ledger") == 0
    store.close()


def test_the_stream_keeps_what_some_group_has_not_confirmed(
    redis_prefix: tuple[Any, str, str], tmp_path: Path
) -> None:
    """With a second group (a second store) behind, nothing it has not confirmed is trimmed."""
    client, prefix, url = redis_prefix
    stream = f"{prefix}:ledger"
    add_charges(client, prefix, 100)
    with Drain(url, f"sqlite:///{tmp_path}/a.db", prefix=prefix, group="a") as a:
        a.run_once()
    assert client.xlen(stream) == 0  # the only group confirmed everything
    client.xgroup_create(stream, "b", id="$")  # a second store from now on
    add_charges(client, prefix, 100, start=100)
    with Drain(url, f"sqlite:///{tmp_path}/a.db", prefix=prefix, group="a") as a:
        assert a.run_once() == 100
    assert client.xlen(stream) == 100  # b has confirmed none of them
    with Drain(url, f"sqlite:///{tmp_path}/b.db", prefix=prefix, group="b", batch=30) as b:
        assert b.run_once() == 100
    assert client.xlen(stream) == 0


def test_trim_forgets_only_consumers_with_nothing_pending(
    redis_prefix: tuple[Any, str, str],
) -> None:
    """A consumer that holds pending entries is never forgotten (that would drop them)."""
    client, prefix, _ = redis_prefix
    stream = f"{prefix}:ledger"
    add_charges(client, prefix, 10)
    client.xgroup_create(stream, "g", id="0")
    client.xreadgroup("g", "holder", {stream: ">"}, count=4)
    client.xreadgroup("g", "idle", {stream: ">"}, count=6)
    client.xack(stream, "g", *[e[0] for e in client.xrange(stream)[4:]])
    trim = client.register_script(script("ledger_trim").text)
    assert trim(keys=[stream], args=[-1]) == 10  # entry 1 is pending: everything stays
    names = {c["name"] for c in client.xinfo_consumers(stream, "g")}
    assert names == {b"holder"}
    client.xack(stream, "g", *[e[0] for e in client.xrange(stream)[:4]])
    assert trim(keys=[stream], args=[-1]) == 0


def test_without_a_group_nothing_is_trimmed(redis_prefix: tuple[Any, str, str]) -> None:
    """Events no drain has ever read stay, however many."""
    client, prefix, _ = redis_prefix
    add_charges(client, prefix, 50)
    trim = client.register_script(script("ledger_trim").text)
    assert trim(keys=[f"{prefix}:ledger"], args=[0]) == 50


def test_an_entry_meterkit_did_not_write_stops_the_drain(
    redis_prefix: tuple[Any, str, str], sqlite_url: str
) -> None:
    """A foreign entry raises StateError and nothing of its batch is acknowledged."""
    client, prefix, url = redis_prefix
    add_charges(client, prefix, 3)
    client.xadd(f"{prefix}:ledger", {"hello": "world"})
    with Drain(url, sqlite_url, prefix=prefix) as drain:
        with pytest.raises(StateError):
            drain.run_once()
        assert drain.store.count() == 0
    assert client.xlen(f"{prefix}:ledger") == 4


def test_a_cluster_drain_finds_every_slot_stream(redis_cluster_url: str, sqlite_url: str) -> None:
    """On Cluster, the streams of many slots are found and drained, and new ones later."""
    client = redis_client(redis_cluster_url)
    prefix = new_prefix()
    try:
        add_charges(client, prefix, 600, orgs=40, cluster=True)
        with Drain(redis_cluster_url, sqlite_url, prefix=prefix, rescan=0) as drain:
            assert drain.run_once() == 600
            add_charges(client, prefix, 60, orgs=60, start=600, cluster=True)
            assert drain.run_once() == 60
            assert drain.store.count() == 660
        with store_from_url(sqlite_url) as store:
            orgs = {e.org for e in store.events()}
        assert len(orgs) == 60
        streams = {stream_for(prefix, f"{prefix}:{{org_{i}}}:", True) for i in range(60)}
        assert sum(client.xlen(s) for s in streams) == 0
    finally:
        delete_prefix(client, prefix)
        client.close()


def test_a_drain_source_must_be_redis_or_a_ledger(sqlite_url: str) -> None:
    """A memory backend without a ledger, or anything else, is refused at once."""
    from meterkit import MemoryBackend
    from meterkit.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="ledger=True"):
        Drain(MemoryBackend(), sqlite_url)
    with pytest.raises(ConfigurationError, match="source"):
        Drain(42, sqlite_url)
    with pytest.raises(ConfigurationError, match="batch"):
        Drain("redis://127.0.0.1:1/0", sqlite_url, batch=0)


def test_a_refused_drain_or_meter_leaves_no_store_open(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store opened from a URL for a Drain that is then refused is closed again; a
    Meter refuses before it opens its ledger URL at all."""
    import meterkit.ledger.store as stores
    from meterkit import MemoryBackend, Meter, Policy
    from meterkit.errors import ConfigurationError

    opened: list[Any] = []
    closed: list[Any] = []
    real = stores.store_from_url

    def recording(url: str) -> Any:
        store = real(url)
        opened.append(store)
        really_close = store.close

        def close() -> None:
            closed.append(store)
            really_close()

        store.close = close  # type: ignore[method-assign]
        return store

    monkeypatch.setattr(stores, "store_from_url", recording)
    with pytest.raises(ConfigurationError, match="source"):
        Drain(42, sqlite_url)
    assert len(opened) == 1
    assert closed == opened
    with pytest.raises(ConfigurationError, match="callable of an Event"):
        Meter(Policy.crane_ledger(), MemoryBackend(), ledger=sqlite_url, on_decision=42)
    assert len(opened) == 1  # never opened
