"""One behaviour suite for every key store: memory, async memory, Redis, async Redis,
each Redis store on a standalone server and on a 3-master Redis Cluster.

Async stores are driven through :class:`Blocking`, which runs each call on one event
loop, so the same assertions hold word for word everywhere.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterkit.errors import (
    AuthenticationError,
    ConfigurationError,
    InvalidIdentifierError,
    InvalidRequestError,
    UnknownKeyError,
)
from meterkit.keys.memory import AsyncMemoryKeyStore, MemoryKeyStore
from meterkit.keys.model import ApiKey, KeyFormat, PlaintextKey
from meterkit.keys.redis import AsyncRedisKeyStore, RedisKeyStore

KINDS = ["memory", "async-memory", "redis", "async-redis", "redis-cluster", "async-redis-cluster"]


def url_fixture(kind: str) -> str | None:
    """The fixture giving the server a store of ``kind`` runs on (None for memory)."""
    if "cluster" in kind:
        return "redis_cluster_url"
    return "redis_url" if "redis" in kind else None


SEED_BODIES = {
    "invalid_api_key": {
        "error": {
            "type": "authentication_error",
            "code": "invalid_api_key",
            "message": "The provided API key is invalid or expired",
            "status": 401,
        }
    },
    "expired_api_key": {
        "error": {
            "type": "authentication_error",
            "code": "expired_api_key",
            "message": "The provided API key has expired",
            "status": 401,
        }
    },
    "insufficient_permissions": {
        "error": {
            "type": "authentication_error",
            "code": "insufficient_permissions",
            "message": "The API key lacks permission for the requested operation",
            "status": 401,
        }
    },
    "organization_not_found": {
        "error": {
            "type": "authentication_error",
            "code": "organization_not_found",
            "message": "The organization does not exist or is not accessible",
            "status": 401,
        }
    },
}


class Loop:
    """One event loop for a test's async calls (asyncio.Runner is 3.11+)."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()

    def run(self, awaitable: Any) -> Any:
        return self._loop.run_until_complete(awaitable)

    def close(self) -> None:
        self._loop.close()


class Blocking:
    """An async store's methods as blocking calls, all on one event loop."""

    def __init__(self, store: Any, runner: Loop) -> None:
        self._store = store
        self._runner = runner

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._store, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._runner.run(attribute(*args, **kwargs))

        return call


class CountingDict(dict[str, Any]):
    """A dict that counts reads, to show that a refusal consulted no record."""

    reads = 0

    def get(self, key: str, default: Any = None) -> Any:
        self.reads += 1
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.reads += 1
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.reads += 1
        return super().__contains__(key)


@dataclass
class Handle:
    """A store under test and ways to look behind it."""

    kind: str
    store: Any
    lookups: Callable[[], int]
    stored: Callable[[], int]
    namespace: str
    redis: Any = None
    url: str | None = None


def _commandstats(client: Any) -> list[dict[str, Any]]:
    """INFO commandstats of the server, or of every primary of a cluster."""
    from redis.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        return list(client.info("commandstats", target_nodes=RedisCluster.PRIMARIES).values())
    return [client.info("commandstats")]


def _redis_calls(client: Any) -> int:
    return sum(
        v["calls"]
        for stats in _commandstats(client)
        for k, v in stats.items()
        if k not in ("cmdstat_info",)
    )


def evalsha_calls(client: Any) -> int:
    """How many EVALSHA calls the server (every primary of a cluster) has run so far."""
    return sum(
        int(stats.get("cmdstat_evalsha", {}).get("calls", 0)) for stats in _commandstats(client)
    )


@dataclass
class Opened:
    """What :func:`open_store` hands out."""

    handle: Handle
    close: Callable[[], None]


def open_store(
    kind: str, clock: Any, redis_url: str | None, namespace: str | None = None, **options: Any
) -> Opened:
    """Open a fresh store of ``kind`` (Redis stores get a namespace of their own).

    ``redis_url`` is the server of :func:`url_fixture` for ``kind``: a ``redis+cluster://``
    URL for the cluster kinds, whose stores and inspector are cluster clients.
    """
    namespace = namespace or f"mktest-{uuid.uuid4().hex[:12]}"
    if kind in ("memory", "async-memory"):
        if kind == "memory":
            memory = MemoryKeyStore(clock=clock, **options)
            store: Any = memory
            close: Callable[[], None] = memory.close
        else:
            runner = Loop()
            async_memory = AsyncMemoryKeyStore(clock=clock, **options)
            memory = async_memory.sync
            store = Blocking(async_memory, runner)

            def close() -> None:
                runner.run(async_memory.aclose())
                runner.close()

        records = CountingDict(memory._records)
        memory._records = records
        handle = Handle(
            kind,
            store,
            lambda: records.reads,
            lambda: len(records) + len(memory._by_org),
            namespace,
        )
        return Opened(handle, close)

    import redis

    from meterkit.connect import redis_client

    assert redis_url is not None
    cluster = "cluster" in kind
    inspector = redis_client(redis_url) if cluster else redis.Redis.from_url(redis_url)

    def forget() -> None:
        """Delete the namespace's keys, in case the server is shared (METERKIT_REDIS_URL)."""
        names = list(inspector.scan_iter(match=f"{namespace}:*"))
        if names:
            inspector.delete(*names)
        inspector.close()

    if kind in ("redis", "redis-cluster"):
        sync_store = RedisKeyStore.from_url(redis_url, namespace=namespace, clock=clock, **options)
        store = sync_store

        def close() -> None:
            sync_store.close()
            forget()
    else:
        runner = Loop()
        async_store = AsyncRedisKeyStore.from_url(
            redis_url, namespace=namespace, clock=clock, **options
        )
        store = Blocking(async_store, runner)

        def close() -> None:
            runner.run(async_store.aclose())
            runner.close()
            forget()

    def stored() -> int:
        return len(list(inspector.scan_iter(match=f"{namespace}:*")))

    handle = Handle(
        kind, store, lambda: _redis_calls(inspector), stored, namespace, inspector, redis_url
    )
    return Opened(handle, close)


@pytest.fixture(params=KINDS)
def handle(request: pytest.FixtureRequest, clock: Any) -> Iterator[Handle]:
    """A fresh store of each kind, on the fake clock."""
    fixture = url_fixture(request.param)
    url = request.getfixturevalue(fixture) if fixture else None
    opened = open_store(request.param, clock, url)
    try:
        yield opened.handle
    finally:
        opened.close()


@pytest.fixture
def store(handle: Handle) -> Any:
    """The store of :func:`handle`."""
    return handle.store


def bearer(plaintext: str) -> str:
    """An Authorization header for ``plaintext``."""
    return f"Bearer {plaintext}"


def refusal(call: Callable[[], object]) -> AuthenticationError:
    """The AuthenticationError ``call`` raises."""
    with pytest.raises(AuthenticationError) as caught:
        call()
    return caught.value


# --- create, get, list ---------------------------------------------------------------------


def test_create_returns_the_plaintext_once_and_a_record_without_it(store: Any, clock: Any) -> None:
    """create returns a well-formed plaintext and a record holding only public facts."""
    plaintext, key = store.create(org="org_1", permissions=["invoices:read"], name="ci")
    assert isinstance(plaintext, PlaintextKey)
    assert plaintext.startswith("cl_live_")
    assert KeyFormat("cl").is_well_formed(plaintext)
    assert isinstance(key, ApiKey)
    assert key.id.startswith("key_")
    assert key.id[4:] in plaintext
    assert (key.org, key.mode, key.permissions, key.name) == (
        "org_1",
        "live",
        ("invoices:read",),
        "ci",
    )
    assert key.created_at == clock()
    assert key.expires_at is None
    assert key.revoked_at is None
    assert key.last_used_at is None
    assert key.last_four == plaintext[-4:]
    assert plaintext not in repr(key)
    assert plaintext[-36:-4] not in repr(key) + str(key)
    assert store.get(key.id) == key


def test_test_mode_keys_carry_their_mode(store: Any) -> None:
    """A test-mode key has the cl_test_ prefix and mode 'test' on its record."""
    plaintext, key = store.create(org="org_1", mode="test")
    assert plaintext.startswith("cl_test_")
    assert key.mode == "test"
    assert store.authenticate(bearer(plaintext), org="org_1").mode == "test"


def test_get_of_an_unknown_id_is_none_and_a_malformed_id_is_refused(store: Any) -> None:
    """get answers None for a well-formed unknown id and refuses a malformed one."""
    assert store.get("key_000000000000") is None
    with pytest.raises(InvalidIdentifierError):
        store.get("cl_live_nope")


def test_list_returns_every_key_of_the_organization_oldest_first(store: Any, clock: Any) -> None:
    """list returns all keys of one organization, revoked ones included, oldest first."""
    _, first = store.create(org="org_a")
    clock.advance(1)
    _, second = store.create(org="org_a", mode="test")
    clock.advance(1)
    store.create(org="org_b")
    store.revoke(first.id)
    listed = store.list("org_a")
    assert [k.id for k in listed] == [first.id, second.id]
    assert listed[0].revoked_at == clock()
    assert store.list("org_nobody") == []
    with pytest.raises(InvalidIdentifierError):
        store.list("acme")


BAD_CREATE = [
    {"org": ""},
    {"org": "acme"},
    {"org": "org_"},
    {"org": "org_a b"},
    {"org": "org_é"},
    {"org": None},
    {"org": 123},
    {"org": "org_1", "mode": "prod"},
    {"org": "org_1", "mode": "LIVE"},
    {"org": "org_1", "mode": None},
    {"org": "org_1", "permissions": "invoices:read"},
    {"org": "org_1", "permissions": ["invoices"]},
    {"org": "org_1", "permissions": ["Invoices:read"]},
    {"org": "org_1", "permissions": ["invoices:read:all"]},
    {"org": "org_1", "permissions": ["*:read"]},
    {"org": "org_1", "permissions": ["invoices:**"]},
    {"org": "org_1", "permissions": [""]},
    {"org": "org_1", "permissions": [7]},
    {"org": "org_1", "permissions": None},
    {"org": "org_1", "expires_at": 1_767_225_600.0 - 1},
    {"org": "org_1", "expires_at": 1_767_225_600.0},
    {"org": "org_1", "expires_at": datetime(2030, 1, 1)},
    {"org": "org_1", "expires_at": datetime(2020, 1, 1, tzinfo=timezone.utc)},
    {"org": "org_1", "expires_at": float("nan")},
    {"org": "org_1", "expires_at": float("inf")},
    {"org": "org_1", "expires_at": True},
    {"org": "org_1", "expires_at": "2030-01-01"},
    {"org": "org_1", "name": "x" * 201},
    {"org": "org_1", "name": "line\nbreak"},
    {"org": "org_1", "name": 5},
]


@pytest.mark.parametrize("arguments", BAD_CREATE, ids=repr)
def test_bad_create_arguments_raise_a_typed_error_and_create_nothing(
    handle: Handle, arguments: dict[str, Any]
) -> None:
    """Every bad argument to create raises InvalidRequestError and stores nothing."""
    with pytest.raises(InvalidRequestError):
        handle.store.create(**arguments)
    assert handle.stored() == 0


def test_expiry_is_accepted_as_aware_datetime_or_unix_seconds(store: Any, clock: Any) -> None:
    """expires_at given as an aware datetime or as UNIX seconds means the same instant."""
    at = datetime.fromtimestamp(clock() + 3600, tz=timezone.utc)
    _, by_datetime = store.create(org="org_1", expires_at=at)
    _, by_seconds = store.create(org="org_1", expires_at=int(clock()) + 3600)
    assert by_datetime.expires_at == by_seconds.expires_at == clock() + 3600


# --- authenticate ----------------------------------------------------------------------------


def test_authenticate_admits_a_valid_key_and_records_its_use(store: Any, clock: Any) -> None:
    """A valid key is admitted for its organization and its last use is recorded."""
    plaintext, key = store.create(org="org_1", permissions=["invoices:read"])
    clock.advance(5)
    admitted = store.authenticate(bearer(plaintext), org="org_1", permission="invoices:read")
    assert admitted.id == key.id
    assert admitted.org == "org_1"
    assert admitted.mode == "live"
    assert admitted.last_used_at == clock()
    assert store.get(key.id).last_used_at == clock()
    clock.advance(7)
    store.authenticate(bearer(plaintext), org="org_1")
    assert store.get(key.id).last_used_at == clock()


def test_last_use_never_moves_backwards(store: Any, clock: Any) -> None:
    """A use stamped earlier than the recorded one (a slower clock) does not rewind it."""
    plaintext, key = store.create(org="org_1")
    clock.advance(10)
    store.authenticate(bearer(plaintext), org="org_1")
    clock.advance(-5)
    store.authenticate(bearer(plaintext), org="org_1")
    assert store.get(key.id).last_used_at == clock() + 5


def test_authenticate_without_an_org_skips_the_organization_check(store: Any) -> None:
    """org=None admits a valid key without scoping it to an organization."""
    plaintext, key = store.create(org="org_1")
    assert store.authenticate(bearer(plaintext), org=None).id == key.id


@pytest.mark.parametrize(
    ("granted", "requested", "admitted"),
    [
        (["invoices:read"], "invoices:read", True),
        (["invoices:read"], "invoices:write", False),
        (["invoices:*"], "invoices:write", True),
        (["invoices:*"], "invoices:*", True),
        (["invoices:read"], "invoices:*", False),
        (["invoices:*"], "payments:read", False),
        (["*"], "payments:read", True),
        (["*"], "*", True),
        (["invoices:*"], "*", False),
        ([], "invoices:read", False),
        ([], None, True),
        (["reports.pdf:create"], "reports.pdf:create", True),
    ],
)
def test_permissions_match_exactly_or_through_wildcards(
    store: Any, granted: list[str], requested: str | None, admitted: bool
) -> None:
    """A permission is granted by itself, by 'resource:*' or by '*', and by nothing else."""
    plaintext, _ = store.create(org="org_1", permissions=granted)

    def call() -> ApiKey:
        return store.authenticate(bearer(plaintext), org="org_1", permission=requested)

    if admitted:
        assert call().org == "org_1"
    else:
        assert refusal(call).code == "insufficient_permissions"


def test_a_malformed_requested_permission_is_a_programming_error(store: Any) -> None:
    """Asking for a permission that is not 'resource:action' raises InvalidRequestError."""
    plaintext, _ = store.create(org="org_1", permissions=["*"])
    with pytest.raises(InvalidRequestError):
        store.authenticate(bearer(plaintext), org="org_1", permission="Invoices read")


def test_the_four_refusals_have_exactly_the_seed_bodies(store: Any, clock: Any) -> None:
    """Each refusal carries the seed-shaped body, status 401, and never the plaintext."""
    plaintext, _ = store.create(org="org_1", permissions=["invoices:read"], expires_at=clock() + 60)
    header = bearer(plaintext)
    cases = {
        "invalid_api_key": lambda: store.authenticate(header[:-1], org="org_1"),
        "organization_not_found": lambda: store.authenticate(header, org="org_2"),
        "insufficient_permissions": lambda: store.authenticate(
            header, org="org_1", permission="invoices:write"
        ),
    }
    errors = {code: refusal(call) for code, call in cases.items()}
    clock.advance(60)
    errors["expired_api_key"] = refusal(lambda: store.authenticate(header, org="org_1"))
    for code, error in errors.items():
        assert error.code == code
        assert error.status == 401
        assert error.body == SEED_BODIES[code]
        for text in (repr(error), str(error), repr(error.body), repr(error.args)):
            assert plaintext not in text
            assert plaintext[-36:-4] not in text


def test_other_organizations_get_one_answer_whether_they_exist_or_not(store: Any) -> None:
    """A key asked for an existing foreign org or a made-up one gets the same body."""
    plaintext, _ = store.create(org="org_1")
    store.create(org="org_2")
    existing = refusal(lambda: store.authenticate(bearer(plaintext), org="org_2"))
    missing = refusal(lambda: store.authenticate(bearer(plaintext), org="org_nope"))
    malformed = refusal(lambda: store.authenticate(bearer(plaintext), org="not an org"))
    assert existing.body == missing.body == malformed.body == SEED_BODIES["organization_not_found"]


def test_status_codes_are_configurable(handle: Handle, clock: Any) -> None:
    """status_codes changes the HTTP status of a refusal in .status and in the body."""
    opened = open_store(
        handle.kind,
        clock,
        handle.url,
        status_codes={"insufficient_permissions": 403, "organization_not_found": 404},
    )
    try:
        store = opened.handle.store
        plaintext, _ = store.create(org="org_1")
        denied = refusal(
            lambda: store.authenticate(bearer(plaintext), org="org_1", permission="invoices:read")
        )
        assert denied.status == 403
        assert denied.body["error"]["status"] == 403
        assert refusal(lambda: store.authenticate(bearer(plaintext), org="org_9")).status == 404
        assert refusal(lambda: store.authenticate("Bearer x", org="org_1")).status == 401
    finally:
        opened.close()


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "cl_live_",
        12,
        b"Bearer \xff",
        "Bearer cl_live_" + "A" * 50,
        "Bearer cl_prod_" + "A" * 50,
    ],
    ids=repr,
)
def test_missing_or_malformed_headers_are_invalid_api_key(store: Any, header: object) -> None:
    """A missing, empty, non-Bearer or malformed header is refused as invalid_api_key."""
    store.create(org="org_1")
    assert refusal(lambda: store.authenticate(header, org="org_1")).code == "invalid_api_key"


def test_the_scheme_is_case_insensitive_and_bytes_headers_are_accepted(store: Any) -> None:
    """'bearer', 'BEARER' and a bytes header are read like 'Bearer' (RFC 7235)."""
    plaintext, key = store.create(org="org_1")
    for header in (f"bearer {plaintext}", f"BEARER  {plaintext} ", bearer(plaintext).encode()):
        assert store.authenticate(header, org="org_1").id == key.id


def test_a_bare_key_without_the_bearer_scheme_is_refused(store: Any) -> None:
    """The key must come with the Bearer scheme, as the seed says."""
    plaintext, _ = store.create(org="org_1")
    error = refusal(lambda: store.authenticate(str(plaintext), org="org_1"))
    assert error.code == "invalid_api_key"


def test_a_10_kb_header_is_refused_without_a_lookup(handle: Handle) -> None:
    """A 10 KB header is refused as invalid_api_key before anything is looked up."""
    plaintext, _ = handle.store.create(org="org_1")
    before = handle.lookups()
    for header in (
        bearer(plaintext) + " " * 10_240,
        "Bearer " + "A" * 10_240,
        ("Bearer " + "A" * 10_240).encode(),
    ):
        error = refusal(lambda h=header: handle.store.authenticate(h, org="org_1"))
        assert error.code == "invalid_api_key"
    assert handle.lookups() == before


@given(data=st.data())
def test_any_one_character_change_or_truncation_is_refused_without_a_lookup(
    handle: Handle, data: st.DataObject
) -> None:
    """Changing one character of a real key, or cutting it, is refused before any lookup."""
    mode = data.draw(st.sampled_from(["live", "test"]))
    plaintext, _ = handle.store.create(org="org_1", mode=mode)
    if data.draw(st.booleans()):
        position = data.draw(st.integers(0, len(plaintext) - 1))
        other = data.draw(st.characters(codec="utf-8").filter(lambda c: c != plaintext[position]))
        token = plaintext[:position] + other + plaintext[position + 1 :]
    else:
        token = plaintext[: data.draw(st.integers(0, len(plaintext) - 1))]
    before = handle.lookups()
    error = refusal(lambda: handle.store.authenticate(bearer(token), org="org_1"))
    assert error.code == "invalid_api_key"
    assert handle.lookups() == before


def test_an_invented_key_with_a_valid_checksum_is_invalid(store: Any) -> None:
    """A well-formed key that no store issued is refused as invalid_api_key."""
    store.create(org="org_1")
    invented = KeyFormat("cl").generate("live")
    assert refusal(lambda: store.authenticate(bearer(invented), org="org_1")).code == (
        "invalid_api_key"
    )


def test_a_known_id_with_a_wrong_secret_is_invalid_and_records_no_use(store: Any) -> None:
    """Guessing the secret of a known public id is refused and leaves last use untouched."""
    _plaintext, key = store.create(org="org_1")
    forged = KeyFormat("cl").compose("live", key.id[4:], "B" * 32)
    assert refusal(lambda: store.authenticate(bearer(forged), org="org_1")).code == (
        "invalid_api_key"
    )
    assert store.get(key.id).last_used_at is None


def test_a_live_key_relabelled_as_test_is_refused(store: Any) -> None:
    """Turning cl_live_ into cl_test_ (checksum fixed up) does not make a valid test key."""
    plaintext, key = store.create(org="org_1")
    fmt = KeyFormat("cl")
    relabelled = fmt.compose("test", key.id[4:], plaintext[len("cl_live_") + 12 : -6])
    assert fmt.is_well_formed(relabelled)
    assert refusal(lambda: store.authenticate(bearer(relabelled), org="org_1")).code == (
        "invalid_api_key"
    )


def test_the_token_prefix_is_configurable(handle: Handle, clock: Any) -> None:
    """A store with token_prefix='acme' issues acme_live_ keys and refuses cl_ keys."""
    plaintext, _ = handle.store.create(org="org_1")
    opened = open_store(handle.kind, clock, handle.url, token_prefix="acme")
    try:
        acme = opened.handle.store
        own, key = acme.create(org="org_1")
        assert own.startswith("acme_live_")
        assert acme.authenticate(bearer(own), org="org_1").id == key.id
        assert refusal(lambda: acme.authenticate(bearer(plaintext), org="org_1")).code == (
            "invalid_api_key"
        )
    finally:
        opened.close()


# --- expiry, revocation, rotation --------------------------------------------------------------


@given(lifetime=st.integers(1, 10**7), probe=st.integers(-(10**7), 10**7))
def test_a_key_works_until_its_expiry_and_is_expired_from_then_on(
    store: Any, clock: Any, lifetime: int, probe: int
) -> None:
    """A key is admitted strictly before expires_at and answers expired_api_key from it on."""
    start = clock()
    plaintext, _ = store.create(org="org_1", expires_at=start + lifetime)
    at = max(start, start + lifetime + probe)
    clock.now = at
    try:
        if at < start + lifetime:
            assert store.authenticate(bearer(plaintext), org="org_1").org == "org_1"
        else:
            error = refusal(lambda: store.authenticate(bearer(plaintext), org="org_1"))
            assert error.body == SEED_BODIES["expired_api_key"]
    finally:
        clock.now = start


def test_revocation_takes_effect_at_once_and_is_idempotent(store: Any, clock: Any) -> None:
    """A revoked key is refused as invalid_api_key at once; revoking again keeps the time."""
    plaintext, key = store.create(org="org_1")
    assert store.authenticate(bearer(plaintext), org="org_1").id == key.id
    revoked = store.revoke(key.id)
    assert revoked.revoked_at == clock()
    assert refusal(lambda: store.authenticate(bearer(plaintext), org="org_1")).code == (
        "invalid_api_key"
    )
    clock.advance(10)
    assert store.revoke(key.id).revoked_at == revoked.revoked_at
    assert store.get(key.id).status(clock()) == "revoked"


def test_revoking_an_unknown_or_malformed_id_raises(store: Any) -> None:
    """revoke of an unknown id raises UnknownKeyError, of a malformed id InvalidIdentifierError."""
    with pytest.raises(UnknownKeyError):
        store.revoke("key_000000000000")
    with pytest.raises(InvalidIdentifierError):
        store.revoke("org_1")


@given(
    grace=st.one_of(
        st.integers(0, 10**6),
        st.floats(0, 10**6),
        st.integers(0, 10**6).map(lambda s: timedelta(seconds=s)),
    ),
    offsets=st.lists(st.floats(0, 2 * 10**6), min_size=1, max_size=5),
)
def test_rotation_keeps_the_old_key_for_the_grace_period_only(
    store: Any, clock: Any, grace: Any, offsets: list[float]
) -> None:
    """After rotate, the new key works and the old one works until now + grace, then expires."""
    start = clock()
    old_plain, old = store.create(org="org_1", permissions=["invoices:*"], name="prod")
    new_plain, new = store.rotate(old.id, grace=grace)
    seconds = grace.total_seconds() if isinstance(grace, timedelta) else float(grace)
    assert (new.org, new.mode, new.permissions, new.name) == (
        old.org,
        old.mode,
        old.permissions,
        old.name,
    )
    assert new.id != old.id
    assert new_plain != old_plain
    assert store.get(old.id).expires_at == start + seconds
    try:
        for offset in sorted(offsets):
            clock.now = start + offset
            assert store.authenticate(bearer(new_plain), org="org_1").id == new.id
            if clock.now < start + seconds:
                assert store.authenticate(bearer(old_plain), org="org_1").id == old.id
            else:
                error = refusal(lambda: store.authenticate(bearer(old_plain), org="org_1"))
                assert error.code == "expired_api_key"
    finally:
        clock.now = start


def test_rotation_never_extends_the_old_key_and_the_new_key_inherits_expiry(
    store: Any, clock: Any
) -> None:
    """An old key due to expire before the grace ends keeps its expiry; the new key gets it too."""
    _, old = store.create(org="org_1", expires_at=clock() + 100)
    _, new = store.rotate(old.id, grace=timedelta(hours=1))
    assert store.get(old.id).expires_at == clock() + 100
    assert new.expires_at == clock() + 100


def test_rotation_with_zero_grace_expires_the_old_key_at_once(store: Any) -> None:
    """grace=0 retires the old key immediately."""
    plaintext, old = store.create(org="org_1")
    store.rotate(old.id, grace=0)
    assert refusal(lambda: store.authenticate(bearer(plaintext), org="org_1")).code == (
        "expired_api_key"
    )


def test_revoked_expired_unknown_keys_and_negative_grace_are_not_rotated(
    store: Any, clock: Any
) -> None:
    """rotate refuses revoked or expired keys, unknown ids and a negative grace."""
    _, revoked = store.create(org="org_1")
    store.revoke(revoked.id)
    _, expiring = store.create(org="org_1", expires_at=clock() + 1)
    _, fine = store.create(org="org_1")
    clock.advance(1)
    with pytest.raises(InvalidRequestError, match="revoked"):
        store.rotate(revoked.id, grace=10)
    with pytest.raises(InvalidRequestError, match="expired"):
        store.rotate(expiring.id, grace=10)
    with pytest.raises(UnknownKeyError):
        store.rotate("key_000000000000", grace=10)
    with pytest.raises(InvalidRequestError):
        store.rotate(fine.id, grace=-1)
    with pytest.raises(InvalidRequestError):
        store.rotate(fine.id, grace="1h")
    assert len(store.list("org_1")) == 3


def test_a_rotated_key_can_still_be_revoked_during_its_grace(store: Any) -> None:
    """Revoking the old key during its grace period ends it at once."""
    plaintext, old = store.create(org="org_1")
    store.rotate(old.id, grace=3600)
    store.revoke(old.id)
    assert refusal(lambda: store.authenticate(bearer(plaintext), org="org_1")).code == (
        "invalid_api_key"
    )


def test_a_revoked_key_presented_again_still_records_the_attempt(store: Any, clock: Any) -> None:
    """last_used_at tracks presentations of the right secret, so a lingering client shows up."""
    plaintext, key = store.create(org="org_1")
    store.revoke(key.id)
    clock.advance(30)
    refusal(lambda: store.authenticate(bearer(plaintext), org="org_1"))
    assert store.get(key.id).last_used_at == clock()


@pytest.mark.parametrize("kind", KINDS)
def test_a_store_takes_its_own_organization_id_rule(
    kind: str, request: pytest.FixtureRequest, clock: Any
) -> None:
    """org_pattern replaces the seed's org_… rule for create, list and authenticate; ids
    that break it (or the meter's: printable, at most 256) are refused, and a bad
    pattern is a ConfigurationError."""
    fixture = url_fixture(kind)
    url = request.getfixturevalue(fixture) if fixture else None
    opened = open_store(kind, clock, url, org_pattern=r"proj_[a-z0-9]{3,40}", token_prefix="acme")
    try:
        store = opened.handle.store
        plaintext, key = store.create(org="proj_alpha", permissions=["*"])
        assert plaintext.startswith("acme_live_")
        assert store.authenticate(bearer(plaintext), org="proj_alpha").id == key.id
        assert [k.id for k in store.list("proj_alpha")] == [key.id]
        for bad in ("org_1", "proj_A", "proj_" + "a" * 300, "proj_ab\x00"):
            with pytest.raises(InvalidIdentifierError):
                store.create(org=bad)
        with pytest.raises(InvalidIdentifierError):
            store.list("org_1")
        assert opened.handle.stored() > 0
    finally:
        opened.close()
    with pytest.raises(ConfigurationError, match="org_pattern"):
        MemoryKeyStore(org_pattern="(")


def test_set_expiry_changes_when_an_active_key_stops_working(store: Any, clock: Any) -> None:
    """set_expiry moves an active key's expiry (or removes it), and authenticate follows."""
    plaintext, key = store.create(org="org_1")
    changed = store.set_expiry(key.id, clock() + 60)
    assert changed.expires_at == clock() + 60
    assert store.get(key.id) == changed
    assert store.set_expiry(key.id, None).expires_at is None
    when = datetime.fromtimestamp(clock() + 30, tz=timezone.utc)
    assert store.set_expiry(key.id, when).expires_at == clock() + 30
    clock.advance(30)
    assert refusal(lambda: store.authenticate(bearer(plaintext), org="org_1")).code == (
        "expired_api_key"
    )


def test_set_expiry_extends_a_rotated_keys_grace(store: Any, clock: Any) -> None:
    """A key in its rotation grace is active: its expiry can be moved, as any other's."""
    plaintext, old = store.create(org="org_1")
    store.rotate(old.id, grace=10)
    store.set_expiry(old.id, clock() + 3600)
    clock.advance(60)
    assert store.authenticate(bearer(plaintext), org="org_1").id == old.id


def test_set_expiry_refuses_stopped_keys_past_times_and_unknown_ids(store: Any, clock: Any) -> None:
    """Revoked or expired keys, unknown ids and past or malformed times change nothing."""
    _, revoked = store.create(org="org_1")
    store.revoke(revoked.id)
    _, expiring = store.create(org="org_1", expires_at=clock() + 1)
    _, fine = store.create(org="org_1", expires_at=clock() + 500)
    clock.advance(1)
    before = store.list("org_1")
    with pytest.raises(InvalidRequestError, match="revoked"):
        store.set_expiry(revoked.id, clock() + 100)
    with pytest.raises(InvalidRequestError, match="expired"):
        store.set_expiry(expiring.id, None)
    with pytest.raises(UnknownKeyError):
        store.set_expiry("key_000000000000", clock() + 100)
    with pytest.raises(InvalidIdentifierError):
        store.set_expiry("not a key id", clock() + 100)
    with pytest.raises(InvalidRequestError, match="future"):
        store.set_expiry(fine.id, clock())
    with pytest.raises(InvalidRequestError, match="timezone"):
        store.set_expiry(fine.id, datetime(2030, 1, 1))  # naive on purpose
    with pytest.raises(InvalidRequestError):
        store.set_expiry(fine.id, "tomorrow")
    assert store.list("org_1") == before
