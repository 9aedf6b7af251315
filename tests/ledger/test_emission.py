"""Money events are written in the same step as the decision, on every backend:
one per admitted charge, refund, top-up, allowance or plan change; none for a denial,
a peek or a replay; the same events in memory and on Redis."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from meterkit import AsyncMeter, MemoryBackend, Meter, Policy
from meterkit.backends.redis.backend import AsyncRedisBackend, RedisBackend
from meterkit.errors import LedgerFullError
from meterkit.ledger import Drain, Event, reconcile, store_from_url
from tests import _servers
from tests.conftest import FakeClock, SyncFacade, delete_prefix, new_prefix, shared_client

POLICY = Policy.crane_ledger()
BACKENDS = ["memory", "redis", "redis-cluster", "redis-async"]


class Ledgered:
    """A meter with a ledger on one backend, the backend, and a store to drain into."""

    def __init__(self, meter: Any, backend: Any, store_url: str) -> None:
        self.meter = meter
        self.backend = backend
        self.store_url = store_url

    def drain(self) -> list[Event]:
        """Move every event into the store; the store's events, oldest first."""
        source = self.backend
        if isinstance(source, AsyncRedisBackend):  # a drain is blocking: its own client
            source = self.sync_backend
        with Drain(source, self.store_url, prefix=getattr(source, "prefix", "mk")) as drain:
            drain.run_once()
            return list(drain.store.events())


@pytest.fixture(params=BACKENDS)
def ledgered(
    request: pytest.FixtureRequest, clock: FakeClock, tmp_path: Path
) -> Iterator[Ledgered]:
    """A meter with a ledger on each backend in turn, clocked by ``clock``."""
    kind = request.param
    store_url = f"sqlite:///{tmp_path}/ledger.db"
    if kind == "memory":
        backend = MemoryBackend(clock=clock, ledger=True)
        with Meter(POLICY, backend, ledger=store_url) as meter:  # closes the store it opened
            yield Ledgered(meter, backend, store_url)
        return
    url = request.getfixturevalue("redis_cluster_url" if kind == "redis-cluster" else "redis_url")
    client = shared_client(request, url)
    prefix = new_prefix()
    try:
        if kind == "redis-async":
            from meterkit.connect import async_backend_from_url

            loop = asyncio.new_event_loop()
            backend = async_backend_from_url(url, prefix=prefix, clock=clock, ledger=True)
            async_meter = AsyncMeter(POLICY, backend, ledger=store_url)
            found = Ledgered(SyncFacade(async_meter, loop), backend, store_url)
            found.sync_backend = RedisBackend(client, prefix=prefix, clock=clock, ledger=True)  # type: ignore[attr-defined]
            yield found
            loop.run_until_complete(async_meter.aclose())  # the backend and the store
            loop.close()
        else:
            backend = RedisBackend(client, prefix=prefix, clock=clock, ledger=True)
            meter = Meter(POLICY, backend, ledger=store_url)
            yield Ledgered(meter, backend, store_url)
            meter.close()  # the store it opened (the shared client stays open)
    finally:
        delete_prefix(client, prefix)


def test_each_admitted_charge_is_one_event_carrying_its_charge_id(ledgered: Ledgered) -> None:
    """A charge's event has its decision's charge id, time, key, operation and amount."""
    meter = ledgered.meter
    first = meter.check("key_1", org="org_1", operation="invoices.list")
    second = meter.check("key_2", org="org_1", operation="invoices.create", mode="test")
    events = ledgered.drain()
    assert [(e.kind, e.key, e.operation, e.micro, e.mode) for e in events] == [
        ("charge", "key_1", "invoices.list", 10_000, "live"),
        ("charge", "key_2", "invoices.create", 50_000, "test"),
    ]
    for event, decision in zip(events, (first, second), strict=True):
        assert event.time == decision.outcome.now
        assert event.charge.endswith(decision.charge_id)
        assert event.org == "org_1"
    assert len({e.id for e in events}) == 2


def test_denials_peeks_and_replays_write_nothing(ledgered: Ledgered, clock: FakeClock) -> None:
    """Only what was charged is an event: a denied check, a peek and a replay are none."""
    meter = ledgered.meter
    meter.set_allowance("org_1", "0.02")  # (an allowance change: one event)
    meter.peek("key_1", org="org_1", operation="invoices.list")
    admitted = meter.check("key_1", org="org_1", operation="invoices.list", idempotency_key="a")
    again = meter.check("key_1", org="org_1", operation="invoices.list", idempotency_key="a")
    assert again.outcome.replayed
    meter.check("key_1", org="org_1", operation="invoices.list")
    broke = meter.check("key_1", org="org_1", operation="invoices.list")
    assert not broke.allowed
    for _ in range(100):  # past the burst of 100/minute: rate-limited, no event
        meter.check("key_2", org="org_9", operation="invoices.list")
    limited = meter.check("key_2", org="org_9", operation="invoices.list")
    assert limited.reason == "rate_limited"
    events = ledgered.drain()
    kinds = [e.kind for e in events]
    assert kinds.count("allowance") == 1
    assert kinds.count("charge") == 2 + 100
    assert admitted.charge_id in {e.charge.rsplit(":", 1)[-1] for e in events}


def test_refunds_top_ups_allowances_and_plans_are_events(ledgered: Ledgered) -> None:
    """A refund names its charge (once), and every other money change is an event."""
    meter = ledgered.meter
    decision = meter.check("key_1", org="org_1", operation="reports.generate")
    assert meter.refund(decision)
    assert not meter.refund(decision)  # refunded once: one event
    meter.top_up("org_1", "12.5")
    meter.set_allowance("org_1", "500")
    meter.set_allowance("org_1", None)
    events = ledgered.drain()
    charge, refund, topup, allowance, back = events
    assert refund.kind == "refund"
    assert (refund.charge, refund.micro) == (charge.charge, charge.micro)
    assert refund.id == "r" + charge.id
    assert (refund.key, refund.operation) == ("key_1", "reports.generate")
    assert (topup.kind, topup.micro) == ("topup", 12_500_000)
    assert (allowance.kind, allowance.micro) == ("allowance", 500_000_000)
    assert (back.kind, back.micro) == ("allowance", -1)


def test_plan_changes_are_events(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Putting an organization or a key on a plan, a deal, and taking them away: events
    whose detail says what changed, the same on memory and Redis."""
    from tests.behaviour.test_plans import _policy  # the plans suite's policy

    planned = _policy()
    details = []
    for kind in ("memory", "redis"):
        clock = FakeClock()
        store_url = f"sqlite:///{tmp_path}/{kind}.db"
        if kind == "memory":
            backend: Any = MemoryBackend(clock=clock, ledger=True)
        else:
            client = shared_client(request, request.getfixturevalue("redis_url"))
            prefix = new_prefix()
            request.addfinalizer(lambda c=client, p=prefix: delete_prefix(c, p))
            backend = RedisBackend(client, prefix=prefix, clock=clock, ledger=True)
        meter = Meter(planned, backend)
        plan = "pro"
        meter.set_plan("org_1", plan)
        meter.set_plan("org_1", plan, key="key_1")
        meter.set_limits("org_1", {"org-hour": "50/hour", "key-min": "off"})
        meter.set_limits("org_1", None)
        meter.set_plan("org_1", None, key="key_1")
        meter.set_plan("org_1", None)
        with Drain(backend, store_url, prefix=getattr(backend, "prefix", "mk")) as drain:
            drain.run_once()
            events = list(drain.store.events())
        assert {e.kind for e in events} == {"plan"}
        details.append([(e.key, e.detail) for e in events])
    assert details[0] == details[1]
    assert details[0][0] == ("", f"plan {plan}")
    assert details[0][1] == ("key_1", f"key {plan}")
    assert details[0][2][1] == "deal key-min 3 60000000 0 0\norg-hour 0 3600000000 50 0"
    assert details[0][3:] == [("", "deal"), ("key_1", "key"), ("", "plan")]


def test_a_batch_writes_one_event_per_admitted_request(ledgered: Ledgered) -> None:
    """check_many: each admitted request of the batch is one event, in order."""
    requests = [(f"key_{i % 3}", "invoices.list", f"org_{i % 4}") for i in range(120)]
    decisions = ledgered.meter.check_many(requests)
    events = ledgered.drain()
    assert sorted(e.charge.rsplit(":", 1)[-1] for e in events) == sorted(
        d.charge_id for d in decisions if d.allowed
    )
    assert len(events) == sum(d.allowed for d in decisions) == 120


def test_the_ledger_reconciles_with_the_counters(ledgered: Ledgered) -> None:
    """After checks, refunds, top-ups and a drain, the ledger's sums equal the counters';
    a tampered store is named, difference by difference."""
    meter = ledgered.meter
    decisions = [
        meter.check(f"key_{i % 4}", org=f"org_{i % 3}", operation=op)
        for i, op in enumerate(["invoices.list", "invoices.create", "reports.generate"] * 10)
    ]
    for d in decisions[::4]:
        meter.refund(d)
    meter.top_up("org_1", "3")
    # Some events drained, some not: both count (undrained ones from the stream or log).
    ledgered.drain()
    meter.check("key_9", org="org_0", operation="invoices.list", mode="test")
    meter.top_up("org_2", "1")
    store = store_from_url(ledgered.store_url)
    backend = ledgered.sync_backend if hasattr(ledgered, "sync_backend") else ledgered.backend
    try:
        result = reconcile(backend, store)
        assert result.ok, [str(d) for d in result.differences]
        assert result.orgs == 4
        assert result.undrained == 2
        # Lose one charge from the store: named, with both sides' figures.
        lost = next(e for e in store.events() if e.kind == "charge" and e.org == "org_1")
        conn = store._conn()
        conn.execute(f"DELETE FROM meterkit_events WHERE id = '{lost.id}'")
        result = reconcile(backend, store)
        assert not result.ok
        named = {(d.org, d.key, d.operation, d.what) for d in result.differences}
        assert named == {
            ("org_1", lost.key, lost.operation, "requests"),
            ("org_1", lost.key, lost.operation, "credits"),
        }
        credits = next(d for d in result.differences if d.what == "credits")
        assert credits.counters - credits.ledger == lost.micro
    finally:
        store.close()


def test_past_months_come_from_the_ledger_after_the_counters_end(
    ledgered: Ledgered, clock: FakeClock
) -> None:
    """January's usage per key and operation is there in March, from the ledger, when
    the counters have moved on (and, on Redis, January's account has expired)."""
    meter = ledgered.meter
    for i in range(30):
        meter.check(
            f"key_{i % 3}", org="org_1", operation=("invoices.list", "reports.generate")[i % 2]
        )
        clock.advance(3600 * 20)  # 30 checks over 25 days of January
    refunded = meter.check("key_0", org="org_1", operation="invoices.list")
    assert meter.refund(refunded)
    ledgered.drain()
    clock.now = 1_772_323_200.0  # 2026-03-01
    backend = getattr(ledgered, "sync_backend", ledgered.backend)
    if isinstance(backend, RedisBackend):
        client = backend._io.pool if hasattr(backend._io, "pool") else None
        account = backend._codec.base("org_1", "live") + "cr"
        raw = redis.Redis(connection_pool=client) if client else backend._io.client
        # The account expires with its month (its TTL runs on Redis's own clock):
        # let it be gone, as it is in March.
        assert 0 < raw.pttl(account) <= (31 * 86_400 + 60) * 1000 + 60_000
        raw.delete(account)
    assert meter.usage("org_1").requests == 0  # March's counters
    january = meter.usage("org_1", period="2026-01")
    assert january.requests == 31
    assert january.refunds == 1
    report = Decimal(POLICY.plan_for("reports.generate").price) / 1_000_000
    assert january.credits == Decimal("0.01") * 15 + report * 15
    assert set(january.keys) == {"key_0", "key_1", "key_2"}
    assert january.operations["reports.generate"].requests == 15
    assert len(january.days) == 26
    assert (
        meter.usage("org_1", key="key_0", since=date(2026, 1, 1), until="2026-04-01")
        .months[0]
        .month
        == "2026-01"
    )


def test_a_full_memory_ledger_refuses_checks_and_changes_nothing(clock: FakeClock) -> None:
    """With its log full and nothing draining it, a check that would charge raises
    LedgerFullError and consumes nothing; a denial still answers; draining frees room."""
    backend = MemoryBackend(clock=clock, ledger=3)
    meter = Meter(POLICY, backend)
    for _ in range(3):
        meter.check("key_1", org="org_1", operation="invoices.list")
    before = meter.usage("org_1")
    peeked = meter.peek("key_1", org="org_1", operation="invoices.list")
    with pytest.raises(LedgerFullError):
        meter.check("key_1", org="org_1", operation="invoices.list")
    with pytest.raises(LedgerFullError):
        meter.top_up("org_1", "1")
    assert meter.usage("org_1") == before
    assert meter.peek("key_1", org="org_1", operation="invoices.list").outcome == peeked.outcome
    assert len(backend.ledger) == 3  # type: ignore[arg-type]
    from meterkit.ledger.store.sqlite import SqliteStore

    with SqliteStore(Path(f"/tmp/{new_prefix()}.db")) as store, Drain(backend, store) as drain:
        assert drain.run_once() == 3
    assert meter.check("key_1", org="org_1", operation="invoices.list").allowed


def test_memory_checks_and_a_drain_thread_lose_nothing(tmp_path: Path) -> None:
    """Eight threads checking while a drain thread moves the log: every charge is in
    the store once, and the ledger reconciles."""
    backend = MemoryBackend(ledger=2_000)
    meter = Meter(POLICY, backend)
    store = store_from_url(f"sqlite:///{tmp_path}/l.db")
    drain = Drain(backend, store, batch=250).start(idle=0.005)
    charged: list[str] = []
    lock = threading.Lock()

    deadline = time.monotonic() + 60  # (a drain that stopped must fail the test, not hang it)

    def work(n: int) -> None:
        mine = []
        for i in range(1_500):
            while True:
                try:
                    d = meter.check(
                        f"key_{n}_{i % 50}", org=f"org_{n % 3}", operation="invoices.list"
                    )
                    break
                except LedgerFullError:  # (the drain is behind: try again)
                    if time.monotonic() > deadline:
                        return
                    threading.Event().wait(0.001)
            if d.allowed:
                mine.append(d.charge_id)
        with lock:
            charged.extend(mine)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    drain.stop()
    Drain(backend, store).run_once()
    try:
        assert store.count() == len(charged) == 12_000
        assert reconcile(backend, store).ok
    finally:
        drain.close()
        store.close()


def test_a_drain_thread_outlives_a_store_that_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A store error that is not an outage (a bug, a full disk) is logged with its
    traceback and tried again: the drain thread keeps going and moves every event."""
    backend = MemoryBackend(ledger=100)
    meter = Meter(POLICY, backend)
    store = store_from_url(f"sqlite:///{tmp_path}/l.db")
    real_write = store.write
    failures = [RuntimeError("disk full")]

    def flaky_write(events: Any) -> int:
        if failures:
            raise failures.pop()
        return real_write(events)

    store.write = flaky_write  # type: ignore[method-assign]
    for i in range(5):
        meter.check(f"key_{i}", org="org_1", operation="invoices.list")
    drain = Drain(backend, store).start(idle=0.001)
    try:
        deadline = time.monotonic() + 30
        while store.count() < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.count() == 5
        assert drain.stats.failures == 1
        assert "ledger drain failed" in caplog.text
    finally:
        drain.close()
        store.close()


def test_a_ledgered_check_is_still_one_evalsha(own_server: _servers.RedisServer) -> None:
    """With the ledger, INFO commandstats shows N EVALSHA for N checks from the client,
    and the N events appended by the scripts themselves."""
    client = redis.Redis(port=own_server.port)
    prefix = new_prefix()
    meter = Meter(POLICY, RedisBackend(client, prefix=prefix, ledger=True))
    meter.check("warm", org="o", operation="invoices.list")
    client.config_resetstat()
    n = 40
    for i in range(n):
        meter.check(f"key_{i % 3}", org="org_1", operation="invoices.create")
    stats = client.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == n
    assert stats["cmdstat_xadd"]["calls"] == n
    assert client.xlen(f"{prefix}:ledger") == n + 1
    delete_prefix(client, prefix)
    client.close()
    _ = socket


def test_memory_and_redis_write_the_same_events(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """One trace (checks, replays, denials, refunds, top-ups) on the fake clock gives
    the same events, field for field but the ids, in memory and on Redis."""
    trace: list[Callable[[Any], Any]] = []
    for i in range(60):
        key, org = f"key_{i % 4}", f"org_{i % 3}"
        op = ("invoices.list", "invoices.create", "reports.generate")[i % 3]
        idem = f"i{i % 7}" if i % 5 == 0 else None
        trace.append(
            lambda m, k=key, o=org, p=op, x=idem: m.check(k, org=o, operation=p, idempotency_key=x)
        )
    trace.append(lambda m: m.set_allowance("org_2", "0.2"))
    trace += [lambda m: m.check("key_x", org="org_2", operation="reports.generate")] * 4
    trace.append(lambda m: m.top_up("org_0", "2"))
    normalised = []
    for kind in ("memory", "redis"):
        clock = FakeClock()
        if kind == "memory":
            backend: Any = MemoryBackend(clock=clock, ledger=True)
        else:
            client = shared_client(request, request.getfixturevalue("redis_url"))
            prefix = new_prefix()
            request.addfinalizer(lambda c=client, p=prefix: delete_prefix(c, p))
            backend = RedisBackend(client, prefix=prefix, clock=clock, ledger=True)
        meter = Meter(POLICY, backend)
        decisions = []
        for step in trace:
            decisions.append(step(meter))
            clock.advance(0.25)
        for d in decisions[:20:3]:
            if d is not None and d.allowed:
                meter.refund(d)
        store_url = f"sqlite:///{tmp_path}/{kind}.db"
        with Drain(backend, store_url, prefix=getattr(backend, "prefix", "mk")) as drain:
            drain.run_once()
            events = list(drain.store.events())
        normalised.append(
            [(e.time, e.org, e.mode, e.kind, e.key, e.operation, e.micro, e.detail) for e in events]
        )
    assert normalised[0] == normalised[1]
    assert {e[3] for e in normalised[0]} == {"charge", "refund", "allowance", "topup"}
