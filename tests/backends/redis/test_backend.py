"""The Redis backend's own promises: key layout, TTLs, one command per check, typed
errors, server time, URLs, and the asyncio backend.

What a meter promises on every backend is in the behaviour suite (``make_meter``);
that Redis computes exactly what memory computes is in ``test_conformance.py``.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis
from redis.cluster import key_slot

from meterkit import (
    AsyncMeter,
    BackendError,
    BackendUnavailable,
    Category,
    ConfigurationError,
    CostTable,
    CreditPlan,
    CustomerPlan,
    MemoryBackend,
    MemoryKeyStore,
    Meter,
    Operation,
    Policy,
    StateError,
    Tier,
)
from meterkit.backends.redis.backend import AsyncRedisBackend, RedisBackend
from meterkit.connect import async_backend_from_url, backend_from_url, redis_client
from tests import _servers
from tests.conftest import FakeClock, delete_prefix, new_prefix, shared_client

MINUTE_MS = 60_000


def _policy(allowance: str = "100") -> Policy:
    """One tier of each algorithm, key- and org-scoped, and two priced operations."""
    return Policy(
        [
            Tier("fw", "key", "5/minute"),
            Tier("sw", "org", "5/minute", "sliding_window"),
            Tier("gc", "key", "5/minute", "gcra", burst=2),
            Tier("sl", "key", "5/minute", "sliding_log"),
        ],
        CostTable(
            (Category("read", "0.01", "0.01"), Category("write", "0.03", "0.15")),
            (Operation("items.list", "read", "0.01"), Operation("items.create", "write", "0.05")),
        ),
        CreditPlan(allowance),
    )


@pytest.fixture
def client(request: pytest.FixtureRequest, redis_url: str) -> redis.Redis:
    """The session's shared synchronous client."""
    return shared_client(request, redis_url)  # type: ignore[no-any-return]


@pytest.fixture
def prefix(client: redis.Redis) -> Iterator[str]:
    """A fresh key prefix, whose keys are deleted after the test."""
    value = new_prefix()
    yield value
    delete_prefix(client, value)


def _keys(client: Any, prefix: str) -> list[str]:
    return sorted(k.decode() for k in client.scan_iter(match=prefix + ":*", count=1000))


# -- key layout -------------------------------------------------------------------------


def test_every_key_of_a_check_carries_the_prefix_and_the_orgs_hash_tag(
    client: redis.Redis, prefix: str
) -> None:
    """All keys one check touches start with prefix:{org}: and hash to the org's slot."""
    meter = Meter(_policy(), RedisBackend(client, prefix=prefix))
    meter.set_allowance("org_1", "50")
    for mode in ("live", "test"):
        meter.check("key:1", org="org_1", operation="items.list", idempotency_key="i:1", mode=mode)
    keys = _keys(client, prefix)
    assert keys == sorted(
        [
            f"{prefix}:{{org_1}}:{ns}{rest}"
            for ns in ("", "test:")
            for rest in (
                "fw:fw.5.60:key:1",
                "sw:sw.5.60",
                "gc:gc.5.60.2:key:1",
                "sl:sl.5.60:key:1",
                "cr",
                "id:i:1",
            )
        ]
        + [f"{prefix}:{{org_1}}:al"]
    )
    assert {key_slot(k.encode()) for k in keys} == {key_slot(b"org_1")}


def test_braces_and_percents_in_org_ids_keep_one_slot_per_org_and_never_collide(
    client: redis.Redis, prefix: str
) -> None:
    """Org ids with '{', '}' or '%' are escaped in the tag: one slot each, no collisions."""
    meter = Meter(_policy(), RedisBackend(client, prefix=prefix))
    orgs = ["o{x}", "o%7Bx%7D", "}", "{", "a}b{c"]
    for org in orgs:
        meter.check("k", org=org, operation="items.list")
    by_tag: dict[str, set[str]] = {}
    for key in _keys(client, prefix):
        tag = key[len(prefix) + 2 : key.index("}")]
        by_tag.setdefault(tag, set()).add(key)
        assert "{" not in tag
    assert len(by_tag) == len(orgs)
    for keys in by_tag.values():
        assert len({key_slot(k.encode()) for k in keys}) == 1
    assert [meter.usage(org).requests for org in orgs] == [1] * len(orgs)


def test_no_part_of_a_secret_ever_reaches_a_key_name(client: redis.Redis, prefix: str) -> None:
    """Checks with an authenticated key store only its public id: the secret is nowhere."""
    store = MemoryKeyStore()
    plaintext, _ = store.create(org="org_1", permissions=["items:read"])
    api_key = store.authenticate(f"Bearer {plaintext}", org="org_1")
    meter = Meter(_policy(), RedisBackend(client, prefix=prefix))
    meter.check(api_key, operation="items.list", idempotency_key="req-1")
    secret = str(plaintext)[len("cl_live_") + 12 :]
    names = " ".join(_keys(client, prefix))
    assert api_key.id in names
    for i in range(len(secret) - 7):
        assert secret[i : i + 8] not in names


def test_every_key_expires_once_its_state_cannot_matter(client: redis.Redis, prefix: str) -> None:
    """With server time, TTLs end with the window, TAT, log, month or idempotency day."""
    meter = Meter(_policy(), RedisBackend(client, prefix=prefix))
    d = meter.check("k", org="o", operation="items.list", idempotency_key="i")
    meter.set_allowance("o", "10")
    base = f"{prefix}:{{o}}:"
    ttl = {key[len(base) :]: client.pttl(key) for key in _keys(client, prefix)}
    month_left_ms = (d.outcome[7] - d.outcome[2]) // 1000
    assert 0 < ttl["fw:fw.5.60:k"] <= MINUTE_MS  # until the minute ends
    assert MINUTE_MS < ttl["sw:sw.5.60"] <= 2 * MINUTE_MS  # it is the next window's "previous"
    assert 0 < ttl["gc:gc.5.60.2:k"] <= 12_000 + 1  # the TAT: one emission interval ahead
    assert MINUTE_MS - 5_000 < ttl["sl:sl.5.60:k"] <= MINUTE_MS  # the last entry plus W
    assert month_left_ms - 5_000 < ttl["cr"] <= month_left_ms + 1  # the calendar month
    assert 86_400_000 - 5_000 < ttl["id:i"] <= 86_400_000  # 24 h
    assert ttl["al"] == -1  # configuration: kept until changed


def test_a_client_clock_pads_every_ttl_by_the_clock_skew(client: redis.Redis, prefix: str) -> None:
    """With clock=, a lagging app server still finds state: TTLs grow by clock_skew."""
    clock = FakeClock(1_767_225_600.0 + 30)  # 30 s into a minute
    meter = Meter(_policy(), RedisBackend(client, prefix=prefix, clock=clock, clock_skew=7))
    meter.check("k", org="o", operation="items.list")
    ttl = client.pttl(f"{prefix}:{{o}}:fw:fw.5.60:k")
    assert 30_000 + 7_000 - 2_000 < ttl <= 30_000 + 7_000


def test_prefix_clock_and_client_are_validated() -> None:
    """A prefix with braces or spaces, a non-callable clock or a wrong client is refused."""
    pool = redis.ConnectionPool()
    for bad in ("", "a{b", "a}b", "a b", "x" * 65, 7):
        with pytest.raises(ConfigurationError, match="prefix"):
            RedisBackend(pool, prefix=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="clock"):
        RedisBackend(pool, clock=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="clock_skew"):
        RedisBackend(pool, clock=time.time, clock_skew=-1)
    with pytest.raises(ConfigurationError, match="AsyncRedisBackend"):
        RedisBackend("redis://localhost")
    with pytest.raises(ConfigurationError, match="asyncio"):
        AsyncRedisBackend(pool)
    pool.disconnect()


# -- time --------------------------------------------------------------------------------


def test_the_servers_time_is_the_default_clock(client: redis.Redis, prefix: str) -> None:
    """Without clock=, a check's time is the Redis server's TIME, whatever the app's clock."""
    meter = Meter(_policy(), RedisBackend(client, prefix=prefix))
    before = client.time()
    now_us = meter.check("k", org="o", operation="items.list").outcome[2]
    after = client.time()
    assert before[0] * 1_000_000 + before[1] <= now_us <= after[0] * 1_000_000 + after[1]


# -- typed errors ------------------------------------------------------------------------


def _state(client: Any, prefix: str) -> dict[str, Any]:
    out = {}
    for key in _keys(client, prefix):
        kind = client.type(key).decode()
        out[key] = {
            "string": client.get,
            "hash": client.hgetall,
            "list": lambda k: client.lrange(k, 0, -1),
        }[kind](key)
    return out


@pytest.mark.parametrize(
    ("suffix", "kind"),
    [
        ("fw:fw.5.60:k", "hash"),
        ("sw:sw.5.60", "list"),
        ("gc:gc.5.60.2:k", "hash"),
        ("sl:sl.5.60:k", "list"),
        ("cr", "string"),
        ("al", "list"),
        ("id:i", "hash"),
    ],
)
def test_a_key_of_the_wrong_type_gives_a_state_error_and_changes_nothing(
    client: redis.Redis, prefix: str, suffix: str, kind: str
) -> None:
    """Any key of the wrong type under our prefix raises StateError; nothing is consumed."""
    clock = FakeClock()
    meter = Meter(_policy(), RedisBackend(client, prefix=prefix, clock=clock))
    meter.check("k", org="o", operation="items.list")
    # The override is read when an org's month starts (the account keeps a copy): "o2".
    org = "o2" if suffix == "al" else "o"
    key = f"{prefix}:{{{org}}}:{suffix}"
    client.delete(key)
    {
        "hash": lambda: client.hset(key, "x", "1"),
        "list": lambda: client.rpush(key, "1"),
        "string": lambda: client.set(key, "1"),
    }[kind]()
    before = _state(client, prefix)
    with pytest.raises(StateError, match="did not write"):
        meter.check("k", org=org, operation="items.list", idempotency_key="i")
    if suffix in ("cr", "al"):  # what usage reads
        with pytest.raises(StateError, match="did not write"):
            meter.usage(org)
    assert _state(client, prefix) == before


@pytest.mark.parametrize(
    ("suffix", "value"),
    [
        ("fw:fw.5.60:k", "seven"),
        ("fw:fw.5.60:k", struct.pack("<qq", 0, -1)),
        ("sw:sw.5.60", struct.pack("<qq", 0, 1)),
        ("sw:sw.5.60", struct.pack("<qqq", 0, 1, 2**60)),
        ("gc:gc.5.60.2:k", "soon"),
        ("al", "lots"),
        ("id:i", "not a record"),
        ("cr", {"h": "plenty"}),
        ("cr", {"h": struct.pack("<qqqq", 0, -5, 0, -1)}),
        ("cr", {"h": struct.pack("<qqqq", 0, 0, 0, -2)}),
        ("cr", {"q|items.list|k": "x"}),
        ("cr", {"q|items.list|k": struct.pack("<qq", -1, 0)}),
    ],
)
def test_a_malformed_value_gives_a_state_error_and_changes_nothing(
    client: redis.Redis, prefix: str, suffix: str, value: str | bytes | dict[str, str]
) -> None:
    """A value meterkit cannot read raises StateError before anything is written."""
    clock = FakeClock()
    meter = Meter(_policy(), RedisBackend(client, prefix=prefix, clock=clock))
    meter.check("k", org="o", operation="items.list")
    org = "o2" if suffix == "al" else "o"  # see the test above
    key = f"{prefix}:{{{org}}}:{suffix}"
    if isinstance(value, dict):
        client.hset(key, mapping=value)
    else:
        client.set(key, value)
    before = _state(client, prefix)
    with pytest.raises(StateError):
        meter.check("k", org=org, operation="items.list", idempotency_key="i")
    assert _state(client, prefix) == before


def test_malformed_accounts_and_logs_give_state_errors_everywhere(
    client: redis.Redis, prefix: str
) -> None:
    """A garbled account or log entry raises StateError from check, usage, refund, top-up."""
    clock = FakeClock()
    meter = Meter(_policy(), RedisBackend(client, prefix=prefix, clock=clock))
    d = meter.check("k", org="o", operation="items.list")
    account = f"{prefix}:{{o}}:cr"
    client.hset(account, "h", "many")
    for call in (
        lambda: meter.check("k", org="o", operation="items.list"),
        lambda: meter.usage("o"),
        lambda: meter.refund(d),
    ):
        with pytest.raises(StateError):
            call()
    client.hset(account, "h", struct.pack("<qqqq", 0, 0, -1, -1))  # negative top-ups
    for call in (lambda: meter.top_up("o", "1"), lambda: meter.set_allowance("o", "5")):
        with pytest.raises(StateError):
            call()
    client.delete(account)
    log = f"{prefix}:{{o}}:sl:sl.5.60:k"
    for garbled in ("yesterday", "yesterda", b"\x00" * 7 + b"\x80"):  # no 8-byte µs entries
        client.set(log, garbled)
        with pytest.raises(StateError):
            meter.check("k", org="o", operation="items.list")


def test_driver_errors_never_leak_from_any_call() -> None:
    """Against a port nobody listens on, every call raises BackendUnavailable, fast."""
    port = _servers.free_port()
    backend = backend_from_url(f"redis://127.0.0.1:{port}/0", timeout=0.5)
    meter = Meter(_policy(), backend)
    decision = Meter(_policy(), MemoryBackend()).check("k", org="o", operation="items.list")
    calls = [
        lambda: meter.check("k", org="o", operation="items.list"),
        lambda: meter.check_many([("k", "items.list", "o")]),
        lambda: meter.usage("o"),
        lambda: meter.set_allowance("o", "1"),
        lambda: meter.top_up("o", "1"),
        lambda: backend.refund(decision.request, decision.outcome),
        lambda: meter.peek("k", org="o", operation="items.list"),
        lambda: meter.reset_limits("o", "k"),
        lambda: Meter(_policy(), backend, fail_open=True).peek(
            "k", org="o", operation="items.list"
        ),  # a peek has no answer to make up
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="unavailable") as info:
            call()
        assert time.monotonic() - started < 1.0
        assert isinstance(info.value.__cause__, redis.RedisError)
    meter.close()


def test_a_refused_permission_is_a_backend_error_not_an_outage(
    own_server: _servers.RedisServer,
) -> None:
    """A user without EVALSHA permission gets BackendError (fail-open does not hide it)."""
    admin = redis.Redis(port=own_server.port)
    admin.acl_setuser(
        "limited",
        enabled=True,
        passwords=["+pw"],
        keys=["*"],
        commands=["+@all", "-evalsha", "-eval"],
    )
    meter = Meter(
        _policy(),
        backend_from_url(f"redis://limited:pw@127.0.0.1:{own_server.port}/0"),
        fail_open=True,
    )
    with pytest.raises(BackendError) as info:
        meter.check("k", org="o", operation="items.list")
    assert not isinstance(info.value, BackendUnavailable)
    assert "pw" not in str(info.value)
    meter.close()
    admin.acl_deluser("limited")
    admin.close()


# -- one command per check -----------------------------------------------------------------


def _monitor_until(sock: socket.socket, marker: bytes) -> list[bytes]:
    data = b""
    while marker not in data:
        chunk = sock.recv(1 << 16)
        assert chunk, "the monitor connection closed"
        data += chunk
    return data.split(b"\r\n")


def test_a_check_is_one_evalsha_and_nothing_else(own_server: _servers.RedisServer) -> None:
    """INFO commandstats and MONITOR show N EVALSHA for N checks, and no other command."""
    client = redis.Redis(port=own_server.port)
    meter = Meter(Policy.crane_ledger(), RedisBackend(client, prefix=new_prefix()))
    meter.check("warm", org="o", operation="invoices.list")  # registers the script
    n = 50
    client.config_resetstat()
    monitor = socket.create_connection(("127.0.0.1", own_server.port))
    monitor.sendall(b"MONITOR\r\n")
    assert monitor.recv(5) == b"+OK\r\n"
    for i in range(n):  # admitted, denied and replayed checks alike
        meter.check(
            f"key_{i % 7 % 3}",
            org="org_1",
            operation="invoices.create",
            idempotency_key=f"i{i % 7}" if i % 2 else None,
        )
    client.echo("meterkit-end")
    lines = [x for x in _monitor_until(monitor, b"meterkit-end") if x.startswith(b"+")]
    monitor.close()
    from_clients = [x for x in lines if b" lua] " not in x and b"meterkit-end" not in x]
    assert len(from_clients) == n
    assert all(b'] "EVALSHA" ' in x for x in from_clients)
    stats = client.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == n
    assert stats["cmdstat_evalsha"]["failed_calls"] == 0
    assert not {"cmdstat_eval", "cmdstat_script|load", "cmdstat_script|exists"} & set(stats)
    client.close()


# -- check_many --------------------------------------------------------------------------


def test_check_many_decides_like_checks_one_by_one(client: redis.Redis) -> None:
    """A batch gives the decisions that the same checks made one at a time would give."""
    requests = [
        (f"k{i % 4}", ("items.list", "items.create")[i % 2], f"o{i % 3}") for i in range(40)
    ]
    outcomes = []
    for batched in (False, True):
        prefix = new_prefix()
        meter = Meter(_policy("0.5"), RedisBackend(client, prefix=prefix, clock=FakeClock()))
        if batched:
            decisions = meter.check_many(requests)
        else:
            decisions = [meter.check(k, operation=op, org=org) for k, op, org in requests]
        outcomes.append([(*d.outcome[:8], d.outcome[9]) for d in decisions])
        delete_prefix(client, prefix)
    assert outcomes[0] == outcomes[1]
    assert sum(o[0] for o in outcomes[0]) < len(requests)  # some denied


def test_check_many_on_cluster_groups_by_node_and_agrees_with_memory(
    request: pytest.FixtureRequest, redis_cluster_url: str
) -> None:
    """On Cluster, a batch over orgs on every node decides exactly as memory does."""
    cluster = shared_client(request, redis_cluster_url)
    clock = FakeClock()
    prefix = new_prefix()
    orgs = [f"org_{i}" for i in range(12)]
    assert len({cluster.get_node_from_key(f"x:{{{o}}}").name for o in orgs}) == 3
    requests = [  # some idempotency keys are reused for other requests: conflicts
        {
            "key": f"k{i % 5}:{orgs[i % 12]}",
            "org": orgs[i % 12],
            "operation": "items.create",
            "idempotency_key": f"i{i % 9}",
        }
        for i in range(120)
    ]
    memory = Meter(_policy("0.3"), MemoryBackend(clock=clock))
    batch = Meter(_policy("0.3"), RedisBackend(cluster, prefix=prefix, clock=clock))
    try:
        got = batch.check_many(requests, return_exceptions=True)
        want = memory.check_many(requests, return_exceptions=True)
        for a, b in zip(want, got, strict=False):
            if isinstance(a, Exception):
                assert (type(a), str(a)) == (type(b), str(b))
            else:
                assert (*a.outcome[:8], a.outcome[9]) == (*b.outcome[:8], b.outcome[9])
        assert any(isinstance(a, Exception) for a in want)
    finally:
        delete_prefix(cluster, prefix)


def test_a_batch_is_one_evalsha_per_fifty_requests(own_server: _servers.RedisServer) -> None:
    """INFO commandstats: check_many sends one EVALSHA of the batch script per 50
    requests (each request's tiers, credits and record inside it), and nothing else."""
    from meterkit.backends.redis.codec import BATCH as _BATCH

    client = redis.Redis(port=own_server.port)
    meter = Meter(Policy.crane_ledger(), RedisBackend(client, prefix=new_prefix()))
    meter.check_many([("warm", "invoices.list", "o")] * 3)  # registers the batch script
    meter.check("warm", org="o", operation="invoices.list")  # and the one-request script
    for n, calls in ((2, 1), (_BATCH, 1), (2 * _BATCH + 1, 3)):
        client.config_resetstat()
        requests = [
            {
                "key": f"key_{i % 7}",
                "org": f"org_{i % 3}",
                "operation": "invoices.create",
                "idempotency_key": f"i{i % 5}" if i % 2 else None,
            }
            for i in range(n)
        ]
        decisions = meter.check_many(requests, return_exceptions=True)
        assert len(decisions) == n
        stats = client.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == calls, n
        assert stats["cmdstat_evalsha"]["failed_calls"] == 0
        from_lua = {
            "cmdstat_time",
            "cmdstat_get",
            "cmdstat_set",
            "cmdstat_setrange",
            "cmdstat_hmget",
            "cmdstat_hget",  # (an organization's plan record, before its month's account)
            "cmdstat_hset",
            "cmdstat_pexpire",
            "cmdstat_del",
        }
        assert set(stats) - from_lua == {"cmdstat_evalsha", "cmdstat_config|resetstat"}
        assert stats["cmdstat_time"]["calls"] == calls  # the server's clock: once a batch
    client.close()


def test_one_requests_bad_state_fails_it_alone_inside_a_batch(
    client: redis.Redis, prefix: str
) -> None:
    """A key of the wrong type fails its own request with StateError; the batch's other
    requests, before and after it in the same script, are decided and applied."""
    clock = FakeClock()
    meter = Meter(_policy(), RedisBackend(client, prefix=prefix, clock=clock))
    client.hset(f"{prefix}:{{o2}}:gc:gc.5.60.2:k", "x", "1")  # a hash where a TAT belongs
    requests = [("k", "items.list", "o1"), ("k", "items.list", "o2"), ("k", "items.list", "o3")]
    before = client.hgetall(f"{prefix}:{{o2}}:gc:gc.5.60.2:k")
    results = meter.check_many(requests, return_exceptions=True)
    assert isinstance(results[1], StateError)
    assert results[0].allowed
    assert results[2].allowed
    assert meter.usage("o1").requests == meter.usage("o3").requests == 1
    assert not client.exists(f"{prefix}:{{o2}}:cr")  # nothing of o2's request was written
    assert client.hgetall(f"{prefix}:{{o2}}:gc:gc.5.60.2:k") == before
    with pytest.raises(StateError, match="did not write"):
        meter.check_many(requests)


def test_a_batch_on_cluster_is_one_evalsha_per_slot(
    request: pytest.FixtureRequest, redis_cluster_url: str
) -> None:
    """On Cluster, a batch runs one script call per hash slot (an organization's keys
    share one): requests of one org go together, a lone request is a plain check."""
    cluster = shared_client(request, redis_cluster_url)
    prefix = new_prefix()
    orgs = [f"org_{i}" for i in range(6)]
    assert len({key_slot(f"x:{{{o}}}".encode()) for o in orgs}) == 6
    meter = Meter(_policy(), RedisBackend(cluster, prefix=prefix, clock=FakeClock()))
    requests = [(f"k{i}", "items.list", orgs[i % 5]) for i in range(20)]
    requests.append(("k0", "items.list", orgs[5]))
    try:
        meter.check_many(requests)  # registers the scripts on every node
        nodes = [cluster.get_redis_connection(n) for n in cluster.get_primaries()]
        for node in nodes:
            node.config_resetstat()
        decisions = meter.check_many(requests)
        calls = sum(n.info("commandstats")["cmdstat_evalsha"]["calls"] for n in nodes)
        assert calls == 6
        assert len(decisions) == 21
        assert meter.usage(orgs[0]).requests == 5  # 4 requests twice; "sw" admits 5 a minute
    finally:
        delete_prefix(cluster, prefix)


def test_check_many_survives_a_script_flush_mid_batch(own_server: _servers.RedisServer) -> None:
    """After SCRIPT FLUSH, a batch's NOSCRIPT answers are sent again with the script."""
    client = redis.Redis(port=own_server.port)
    clock = FakeClock()
    meter = Meter(_policy(), RedisBackend(client, prefix=new_prefix(), clock=clock))
    reference = Meter(_policy(), MemoryBackend(clock=clock))
    requests = [(f"k{i % 3}", "items.list", "o") for i in range(9)]
    for m in (meter, reference):
        m.check("k0", org="o", operation="items.list")
    client.script_flush()
    decisions = meter.check_many(requests)
    assert [d.outcome[:8] for d in decisions] == [
        d.outcome[:8] for d in reference.check_many(requests)
    ]
    assert not all(d.allowed for d in decisions)
    client.close()


# -- the asyncio backend ---------------------------------------------------------------------


async def test_async_meter_on_the_async_backend_checks_refunds_and_reports(
    redis_url: str,
) -> None:
    """AsyncMeter over AsyncRedisBackend: check, replay, refund, top-up, usage, batch."""
    clock = FakeClock()
    backend = async_backend_from_url(redis_url, prefix=new_prefix(), clock=clock)
    assert isinstance(backend, AsyncRedisBackend)
    async with AsyncMeter(_policy("1"), backend) as meter:
        first = await meter.check("k", org="o", operation="items.create", idempotency_key="a")
        again = await meter.check("k", org="o", operation="items.create", idempotency_key="a")
        assert again.replayed
        assert again.charge_id == first.charge_id
        assert await meter.refund(first) is True
        await meter.top_up("o", "0.5")
        batch = await meter.check_many([("k", "items.list", "o")] * 3)
        assert [d.allowed for d in batch] == [True, False, False]  # gcra: burst 2, 1 left
        usage = await meter.usage("o")
        assert usage.credits_used == Decimal("0.01")
        assert usage.credits_left == Decimal("1.49")


async def test_async_meter_with_the_memory_backend_has_check_many(clock: FakeClock) -> None:
    """AsyncMeter works with MemoryBackend, check_many included."""
    meter = AsyncMeter(_policy(), MemoryBackend(clock=clock))
    decisions = await meter.check_many([{"key": "k", "org": "o", "operation": "items.list"}] * 3)
    assert [d.allowed for d in decisions] == [True, True, False]


async def test_async_cluster_backend_checks_and_batches(redis_cluster_url: str) -> None:
    """The asyncio backend runs on Cluster too, single checks and batches."""
    clock = FakeClock()
    backend = async_backend_from_url(redis_cluster_url, prefix=new_prefix(), clock=clock)
    async with AsyncMeter(_policy(), backend) as meter:
        d = await meter.check("k", org="org_1", operation="items.list")
        assert d.allowed
        batch = await meter.check_many([("k", "items.list", f"org_{i}") for i in range(9)] * 2)
        assert [b.allowed for b in batch] == [True] * 9 + [True, False] + [True] * 7
        assert (await meter.usage("org_1")).requests == 2


async def test_async_cluster_backend_answers_more_concurrent_checks_than_a_batch(
    redis_cluster_url: str,
) -> None:
    """2 * _BATCH + 1 checks of as many organizations started together on Cluster
    (sent as three batches, each split by slot) are each answered and counted once."""
    from meterkit.backends.redis.codec import BATCH as _BATCH

    backend = async_backend_from_url(redis_cluster_url, prefix=new_prefix(), clock=FakeClock())
    async with AsyncMeter(_policy(), backend) as meter:
        n = 2 * _BATCH + 1
        got = await asyncio.gather(
            *(meter.check("k", org=f"org_{i}", operation="items.list") for i in range(n))
        )
        assert all(d.allowed for d in got)
        assert [(await meter.usage(f"org_{i}")).requests for i in range(n)] == [1] * n


# -- URLs ----------------------------------------------------------------------------------------


def test_backend_from_url_builds_each_kind(
    request: pytest.FixtureRequest, redis_url: str, redis_cluster_url: str
) -> None:
    """memory://, redis://host:port/db and redis+cluster:// build working backends."""
    clock = FakeClock()
    memory = backend_from_url("memory://", clock=clock)
    assert isinstance(memory, MemoryBackend)
    for url in (redis_url.replace("/0", "/3"), redis_cluster_url):
        prefix = new_prefix()
        backend = backend_from_url(url, prefix=prefix, clock=clock, timeout=0.5)
        assert isinstance(backend, RedisBackend)
        assert Meter(_policy(), backend).check("k", org="o", operation="items.list").allowed
        backend.close()
        shared = shared_client(request, url)
        if url.endswith("/3"):
            assert shared.connection_pool.connection_kwargs["db"] == 3
        assert _keys(shared, prefix)
        delete_prefix(shared, prefix)


def test_a_unix_socket_url_works(tmp_path: Any) -> None:
    """redis+unix:///path?db=N reaches a server listening on a unix socket."""
    if _servers.redis_binary() is None:
        pytest.skip("no redis-server binary on PATH")
    path = tmp_path / "r.sock"
    with _servers.standalone("--unixsocket", str(path), "--unixsocketperm", "700"):
        backend = backend_from_url(f"redis+unix://{path}?db=2", clock=FakeClock())
        assert Meter(_policy(), backend).check("k", org="o", operation="items.list").allowed
        backend.close()


def test_url_clients_time_out_fast_and_never_retry() -> None:
    """Clients from URLs get a ≤1 s timeout, no retries, TLS for rediss://."""
    client = redis_client("rediss://user:secret@example.invalid:6380/1")
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 1.0
    assert kwargs["retry"].get_retries() == 0
    assert client.connection_pool.connection_class is redis.SSLConnection
    client.close()
    client = redis_client("redis://localhost/0?socket_timeout=0.25", timeout=0.5)
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 0.25
    client.close()


async def test_a_rediss_cluster_url_gives_an_async_cluster_client_over_tls() -> None:
    """rediss+cluster:// builds a cluster client whose connections use TLS (it used to
    fail: redis-py's cluster client refuses the connection class a URL parse gives)."""
    import redis.asyncio.connection

    client = redis_client("rediss+cluster://user:secret@example.invalid:7000", asyncio=True)
    assert client.connection_kwargs["connection_class"] is redis.asyncio.connection.SSLConnection
    assert client.connection_kwargs["socket_timeout"] == 1.0
    await client.aclose()


def test_bad_urls_and_options_are_refused_without_echoing_secrets() -> None:
    """Unknown schemes, options and timeouts raise ConfigurationError; no password shown."""
    with pytest.raises(ConfigurationError) as info:
        backend_from_url("mongodb://user:hunter2@host/db")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigurationError, match="clock"):
        backend_from_url("memory://", prefix="x")
    for timeout in (0, -1, 61, True, "1"):
        with pytest.raises(ConfigurationError, match="timeout"):
            backend_from_url("redis://localhost", timeout=timeout)
    with pytest.raises(ConfigurationError):
        backend_from_url(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="host:port"):
        backend_from_url("redis+cluster://a:b")
    assert isinstance(async_backend_from_url("memory://"), MemoryBackend)


async def test_an_async_batch_after_a_script_flush_sends_the_script_once(
    own_server: _servers.RedisServer,
) -> None:
    """After SCRIPT FLUSH, an async batch goes again as one EVAL of the batch script
    (its text travels with the call: no SCRIPT LOAD that another flush could undo)."""
    admin = redis.Redis(port=own_server.port)
    backend = async_backend_from_url(own_server.url, prefix=new_prefix(), clock=FakeClock())
    async with AsyncMeter(_policy(), backend) as meter:
        await meter.check("k", org="o", operation="items.list")
        admin.script_flush()
        admin.config_resetstat()
        batch = await meter.check_many([(f"k{i}", "items.list", "o") for i in range(20)])
        assert sum(d.allowed for d in batch) == 4  # the org's sliding window: 5 a minute
        stats = admin.info("commandstats")
        assert stats["cmdstat_eval"]["calls"] == 1
        assert "cmdstat_script|load" not in stats
    admin.close()


def test_a_cluster_url_whose_nodes_are_all_down_raises_backend_unavailable() -> None:
    """Building a cluster backend while no node answers raises BackendUnavailable."""
    port = _servers.free_port()
    with pytest.raises(BackendUnavailable):
        backend_from_url(f"redis+cluster://127.0.0.1:{port}", timeout=0.3)


def test_clients_that_decode_responses_work_too(redis_url: str, redis_cluster_url: str) -> None:
    """A client made with decode_responses=True (sync, Cluster, asyncio) gives the
    same decisions: a check's reply is binary, and meterkit reads it undecoded."""
    import asyncio

    from redis import asyncio as aredis
    from redis.cluster import RedisCluster

    from meterkit import AsyncMeter

    def trace(meter: Any) -> list[Any]:
        first = meter.check("k", org="o", operation="items.list", idempotency_key="i")
        again = meter.check("k", org="o", operation="items.list", idempotency_key="i")
        many = meter.check_many([("k", "items.list", "o")] * 3)
        return [d.outcome[:8] for d in (first, again, *many)] + [meter.usage("o").requests]

    expected = trace(Meter(_policy(), MemoryBackend(clock=FakeClock())))
    assert [a[0] for a in expected[:5]] == [True, True, True, False, False]
    cluster_url = redis_cluster_url.replace("redis+cluster", "redis")
    for client in (
        redis.Redis.from_url(redis_url, decode_responses=True),
        RedisCluster.from_url(cluster_url, decode_responses=True),
    ):
        prefix = new_prefix()
        backend = RedisBackend(client, prefix=prefix, clock=FakeClock())
        backend._owned = True  # (as backend_from_url hands its client over)
        try:
            assert trace(Meter(_policy(), backend)) == expected
        finally:
            delete_prefix(client, prefix)
            backend.close()

    async def crowd() -> list[bool]:
        client = aredis.Redis.from_url(redis_url, decode_responses=True)
        backend = AsyncRedisBackend(client, prefix=new_prefix(), clock=FakeClock())
        backend._owned = True
        meter = AsyncMeter(_policy(), backend)
        try:
            checks = [meter.check("k", org="o", operation="items.list") for _ in range(3)]
            return [d.allowed for d in await asyncio.gather(*checks)]
        finally:
            await meter.aclose()

    assert asyncio.run(crowd()) == [True, True, False]


def test_closing_a_backend_closes_every_node_connection_of_its_cluster_client(
    redis_cluster_url: str,
) -> None:
    """A backend that owns a client made by RedisCluster.from_url leaves no socket open
    after close() (redis-py's own close() leaves such a client's node pools open)."""
    import gc
    import warnings

    from redis.cluster import RedisCluster

    client = RedisCluster.from_url(redis_cluster_url.replace("redis+cluster", "redis"))
    backend = RedisBackend(client, prefix=new_prefix(), clock=FakeClock())
    backend._owned = True  # (as backend_from_url hands its client over)
    meter = Meter(_policy(), backend)
    meter.check_many([("k", "items.list", f"o{i}") for i in range(20)])
    nodes = [node for node in client.get_nodes() if node.redis_connection is not None]
    assert nodes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meter.close()
        del meter, backend, client
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    for node in nodes:
        pool = node.redis_connection.connection_pool
        assert all(conn._sock is None for conn in pool._available_connections)


def test_a_peek_writes_nothing_to_redis(client: redis.Redis, prefix: str) -> None:
    """A peek is one EVALSHA that leaves every key as it was (values and TTLs): for an
    organization never seen, for one denied, and at a month's turn, where a check that
    is denied would end last month's account."""
    clock = FakeClock()
    meter = Meter(_policy(), RedisBackend(client, prefix=prefix, clock=clock))

    def snapshot() -> dict[str, Any]:
        state = _state(client, prefix)
        return {key: (value, client.pttl(key) > 0) for key, value in state.items()}

    meter.peek("k", org="new", operation="items.list")
    assert _keys(client, prefix) == []
    for _ in range(3):  # the GCRA tier's burst of 2 is spent: denied
        meter.check("k", org="o", operation="items.list")
    before = snapshot()
    client.config_resetstat()
    denied = meter.peek("k", org="o", operation="items.list")
    assert not denied.allowed
    assert client.info("commandstats")["cmdstat_evalsha"]["calls"] == 1
    assert snapshot() == before
    clock.now = 1_769_903_999.5  # half a second before February: spend the burst again
    for _ in range(3):
        meter.check("k", org="o", operation="items.list")
    clock.now += 1  # February, the tiers still denying, January's account still there
    before = snapshot()
    assert not meter.peek("k", org="o", operation="items.list").allowed
    assert snapshot() == before


def test_a_check_under_plans_is_still_one_evalsha(own_server: _servers.RedisServer) -> None:
    """INFO commandstats: with organizations on plans, keys on plans of their own and a
    negotiated deal, every check is one EVALSHA and nothing else reaches the server
    (the script reads the plans itself)."""
    base = _policy()
    policy = Policy(
        base.tiers,
        base.costs,
        base.credits,
        plans=[CustomerPlan("pro", {"fw": "9/minute", "sw": "off"}, allowance="500")],
    )
    client = redis.Redis(port=own_server.port)
    meter = Meter(policy, RedisBackend(client, prefix=new_prefix()))
    meter.check("warm", org="o0", operation="items.list")  # registers the script
    meter.set_plan("o1", "pro")
    meter.set_plan("o2", "pro", key="k2")
    meter.set_limits("o3", {"gc": "7/minute"})
    meter.set_plan("o3", "pro")
    requests = [(f"k{i % 3}", f"o{i % 4}") for i in range(40)]
    client.config_resetstat()
    decisions = [meter.check(key, org=org, operation="items.list") for key, org in requests]
    stats = client.info("commandstats")
    assert {d.plan for d in decisions} == {"default", "pro"}
    assert stats["cmdstat_evalsha"]["calls"] == len(requests)
    from_lua = {f"cmdstat_{name}" for name in ("get", "set", "setrange", "hmget", "hget")}
    from_lua |= {"cmdstat_hset", "cmdstat_pexpire", "cmdstat_del", "cmdstat_time"}
    assert set(stats) - from_lua == {"cmdstat_evalsha", "cmdstat_config|resetstat"}
    client.close()
