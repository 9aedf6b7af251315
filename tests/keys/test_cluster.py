"""What only Redis Cluster changes for the key stores: separate writes, and their order.

On a cluster a key's record and its organization's index are on different slots, so
``create`` and ``rotate`` write them one after the other: the new id into the index,
then (``rotate``) the old record's new expiry, then the new record. These tests stop
those programs between two writes, as a crash or a stalled client would, or run other
operations in between, on real servers, and check that the store tolerates what is left
and repairs it. The behaviour suite (tests/behaviour/test_keys.py) runs every ordinary
test on the cluster as well.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from meterkit.keys.redis import TOMBSTONE_MS, RedisKeyStore, _Pipeline, _Script
from tests.behaviour.test_keys import bearer
from tests.keys.test_redis import forget

ORG = "org_1"


class Driven:
    """One store operation run a Redis step at a time, so that a test can stop it between
    two writes (a crash) or run other operations between them (a stalled client)."""

    def __init__(self, store: RedisKeyStore, program: Any) -> None:
        self._store = store
        self._program = program
        self.step: Any = next(program)
        self.taken: list[Any] = []
        self.result: Any = None

    def take(self, count: int = 1) -> None:
        """Run the pending step (``count`` steps) and move on."""
        for _ in range(count):
            reply = self._store._call(self.step)
            self.taken.append(self.step)
            try:
                self.step = self._program.send(reply)
            except StopIteration as done:
                self.step = None
                self.result = done.value

    def finish(self) -> Any:
        """Run the remaining steps; the operation's result."""
        while self.step is not None:
            self.take()
        return self.result

    def abandon(self) -> None:
        """Stop here, as a process that died would."""
        self._program.close()


def describe(step: Any, namespace: str) -> tuple[str, str]:
    """(command or script, which key) of one step, for comparing orders."""
    if isinstance(step, _Pipeline):
        return ("pipeline", "records")
    keys = step.keys if isinstance(step, _Script) else step.args[1:2]
    name = step.name if isinstance(step, _Script) else step.args[0]
    assert len(keys) == 1, f"{name} touches {len(keys)} keys"
    key = keys[0]
    assert key.startswith(namespace + ":")
    return (name, "index" if key.endswith(":keys") else key.rsplit(":", 1)[1])


def open_store(url: str, clock: Any) -> Iterator[RedisKeyStore]:
    namespace = f"mktest-{uuid.uuid4().hex[:12]}"
    store = RedisKeyStore.from_url(url, namespace=namespace, clock=clock)
    try:
        yield store
    finally:
        forget(store._client, namespace)
        store.close()


@pytest.fixture
def store(redis_cluster_url: str, clock: Any) -> Iterator[RedisKeyStore]:
    """A blocking store on the session's cluster (both stores run the same steps)."""
    yield from open_store(redis_cluster_url, clock)


@pytest.fixture(params=["standalone", "cluster"])
def either(request: pytest.FixtureRequest, clock: Any) -> Iterator[RedisKeyStore]:
    """A blocking store on the standalone server, then on the cluster."""
    fixture = "redis_cluster_url" if request.param == "cluster" else "redis_url"
    yield from open_store(request.getfixturevalue(fixture), clock)


def index(store: RedisKeyStore, org: str = ORG) -> set[str]:
    members = store._client.smembers(store._commands.org_key(org))
    return {member.decode() for member in members}


def names(store: RedisKeyStore) -> set[str]:
    found = store._client.scan_iter(match=f"{store._commands.namespace}:*")
    return {name.decode() for name in found}


def assert_tombstone(store: RedisKeyStore, key_id: str) -> None:
    """The record's name holds list's tombstone: no record, and it expires."""
    name = store._commands.record_key(key_id)
    assert store._client.hgetall(name) == {b"gone": b"1"}
    assert 0 < store._client.pttl(name) <= TOMBSTONE_MS
    assert store.get(key_id) is None


def test_on_a_cluster_every_script_touches_one_key_and_writes_come_in_order(
    store: RedisKeyStore,
) -> None:
    """create indexes the id, then writes the record; rotate indexes the new id, shortens
    the old key, then writes the new record; authenticate stays one script on one key."""
    assert store._commands.cluster
    ns = store._commands.namespace
    create = Driven(
        store,
        store._commands.create(ORG, {"mode": "live"}),
    )
    plaintext, key = create.finish()
    assert [describe(step, ns) for step in create.taken] == [("SADD", "index"), ("record", key.id)]

    rotate = Driven(store, store._commands.rotate(key.id, grace=60))
    _, new = rotate.finish()
    assert [describe(step, ns) for step in rotate.taken] == [
        ("HMGET", key.id),
        ("SADD", "index"),
        ("shorten", key.id),
        ("record", new.id),
    ]

    authenticate = Driven(
        store, store._commands.authenticate(bearer(plaintext), org=ORG, permission=None)
    )
    authenticate.finish()
    assert [describe(step, ns) for step in authenticate.taken] == [("authenticate", key.id)]

    for program in (
        store._commands.revoke(key.id),
        store._commands.get(key.id),
        store._commands.list(ORG),
    ):
        driven = Driven(store, program)
        driven.finish()
        for step in driven.taken:
            describe(step, ns)  # one key each (a pipeline's commands go on their own)


def test_an_indexed_id_without_a_record_is_skipped_and_repaired(
    either: RedisKeyStore,
) -> None:
    """list skips an id whose record does not exist, takes it out of the index and leaves
    a tombstone under the record's name; a second list finds nothing left to repair."""
    store = either
    _, key = store.create(org=ORG)
    dangling = "key_" + "D" * 12
    store._client.sadd(store._commands.org_key(ORG), dangling)
    assert [k.id for k in store.list(ORG)] == [key.id]
    assert index(store) == {key.id}
    assert_tombstone(store, dangling)
    before = names(store)
    assert [k.id for k in store.list(ORG)] == [key.id]
    assert names(store) == before


def test_an_indexed_key_of_another_organization_is_not_listed_nor_dropped(
    either: RedisKeyStore,
) -> None:
    """An index entry whose record belongs to another organization is skipped, not
    taken for a missing record: the other key and the entry stay as they are."""
    store = either
    _, mine = store.create(org=ORG)
    _, theirs = store.create(org="org_2")
    store._client.sadd(store._commands.org_key(ORG), theirs.id)
    assert [k.id for k in store.list(ORG)] == [mine.id]
    assert index(store) == {mine.id, theirs.id}
    assert store.get(theirs.id) == theirs
    assert [k.id for k in store.list("org_2")] == [theirs.id]


def test_a_create_interrupted_after_indexing_leaves_no_usable_key(
    store: RedisKeyStore,
) -> None:
    """A create that dies after its first write left an id in the index and no record:
    nothing can use it, list shows nothing, and list repairs the index."""
    create = Driven(
        store,
        store._commands.create(ORG, {"mode": "live"}),
    )
    create.take()
    create.abandon()
    dangling = create.taken[0].args[2]
    assert index(store) == {dangling}
    assert names(store) == {store._commands.org_key(ORG)}
    assert store.get(dangling) is None
    assert store.list(ORG) == []
    assert index(store) == set()
    assert_tombstone(store, dangling)


def test_a_create_stalled_between_its_writes_cannot_finish_under_an_id_list_dropped(
    store: RedisKeyStore,
) -> None:
    """list drops the id of a create that has indexed it but not yet written its record;
    when that create goes on, the tombstone refuses the record, and the create takes
    another id, indexed as it should be. Without the tombstone the key would exist and
    work, but no list would ever show it."""
    create = Driven(
        store,
        store._commands.create(ORG, {"mode": "live"}),
    )
    create.take()
    first = create.taken[0].args[2]
    assert store.list(ORG) == []
    assert index(store) == set()
    plaintext, key = create.finish()
    assert key.id != first
    assert [k.id for k in store.list(ORG)] == [key.id]
    assert index(store) == {key.id}
    assert store.authenticate(bearer(plaintext), org=ORG).id == key.id
    assert_tombstone(store, first)


def test_a_create_whose_id_is_taken_takes_back_only_the_entry_it_added(
    store: RedisKeyStore,
) -> None:
    """A new record refused because its name is taken: the create takes its id out of the
    index again if (and only if) its own SADD put it there, then tries another id."""
    _, other = store.create(org=ORG)

    create = Driven(
        store,
        store._commands.create(ORG, {"mode": "live"}),
    )
    taken = create.step.args[2]  # the id it is about to index
    store._client.hset(store._commands.record_key(taken), "gone", "1")  # the name is taken
    _, key = create.finish()
    assert key.id != taken
    assert index(store) == {other.id, key.id}

    # The same, where the id was already indexed, with a record of this organization:
    # that entry is the other key's, and stays.
    create = Driven(
        store,
        store._commands.create(ORG, {"mode": "live"}),
    )
    taken = create.step.args[2]
    twin = msgspec.structs.replace(other, id=taken)
    store._client.hset(
        store._commands.record_key(taken),
        mapping={"rec": store._commands.encode(twin), "hash": twin.secret_hash},
    )
    store._client.sadd(store._commands.org_key(ORG), taken)
    _, again = create.finish()
    assert again.id != taken
    assert index(store) == {other.id, key.id, taken, again.id}
    assert {k.id for k in store.list(ORG)} == {other.id, key.id, taken, again.id}


def test_a_rotate_interrupted_after_shortening_the_old_key_can_be_run_again(
    store: RedisKeyStore,
    clock: Any,
) -> None:
    """A rotate that dies after the old key's new expiry, before the new record: the old
    key works until then, no new key exists, list repairs the index, and rotating again
    gives the replacement without extending the old key."""
    _, old = store.create(org=ORG)
    clock.advance(10)
    rotate = Driven(store, store._commands.rotate(old.id, grace=60))
    rotate.take(3)  # read, index the new id, shorten the old key
    rotate.abandon()
    dangling = rotate.taken[1].args[2]
    deadline = clock() + 60
    assert store.get(old.id).expires_at == deadline
    assert index(store) == {old.id, dangling}
    assert [k.id for k in store.list(ORG)] == [old.id]
    assert_tombstone(store, dangling)

    clock.advance(5)
    plaintext, new = store.rotate(old.id, grace=3600)
    assert store.get(old.id).expires_at == deadline
    assert [k.id for k in store.list(ORG)] == [old.id, new.id]
    assert store.authenticate(bearer(plaintext), org=ORG).id == new.id


def test_a_rotate_whose_new_id_was_dropped_midway_files_the_new_key_under_another_id(
    store: RedisKeyStore,
    clock: Any,
) -> None:
    """list runs while a rotate has shortened the old key but not written the new record:
    the rotate's record is refused, and the same new key is filed under another id."""
    old_plain, old = store.create(org=ORG, permissions=["invoices:*"], name="web")
    clock.advance(1)  # list's order: oldest first
    rotate = Driven(store, store._commands.rotate(old.id, grace=60))
    rotate.take(3)
    first = rotate.taken[1].args[2]
    assert [k.id for k in store.list(ORG)] == [old.id]
    plaintext, new = rotate.finish()
    assert new.id != first
    assert (new.org, new.permissions, new.name) == (old.org, old.permissions, old.name)
    assert [k.id for k in store.list(ORG)] == [old.id, new.id]
    assert index(store) == {old.id, new.id}
    assert store.get(old.id).expires_at == clock() + 60
    assert store.authenticate(bearer(plaintext), org=ORG).id == new.id
    assert store.authenticate(bearer(old_plain), org=ORG).id == old.id
    assert_tombstone(store, first)


def test_a_rotate_whose_new_name_is_taken_takes_its_entry_back(
    store: RedisKeyStore, clock: Any
) -> None:
    """After shortening the old key, a rotate whose new record is refused (its name is
    taken) takes that id out of the index before filing the new key under another."""
    _, old = store.create(org=ORG)
    clock.advance(1)
    rotate = Driven(store, store._commands.rotate(old.id, grace=60))
    rotate.take(3)
    taken = rotate.taken[1].args[2]
    store._client.hset(store._commands.record_key(taken), "gone", "1")
    _, new = rotate.finish()
    assert new.id != taken
    assert index(store) == {old.id, new.id}
    assert [k.id for k in store.list(ORG)] == [old.id, new.id]
