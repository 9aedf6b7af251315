"""Faults: Redis killed, restarted, paused, flushed of its scripts, restarted from its
append-only file. Each test starts servers of its own (never the session's).

Waits here are for real I/O (a server going away and coming back) and bounded; no
limit is tested by sleeping.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis

from meterkit import (
    AsyncMeter,
    BackendUnavailable,
    Category,
    CostTable,
    CreditPlan,
    Meter,
    Operation,
    Policy,
    Tier,
)
from meterkit.connect import async_backend_from_url, backend_from_url
from tests import _servers

pytestmark = pytest.mark.skipif(
    _servers.redis_binary() is None and not _servers.require_redis(),
    reason="no redis-server binary on PATH",
)


def _policy() -> Policy:
    return Policy(
        [
            Tier("key-hour", "key", "1000/hour"),
            Tier("key-burst", "key", "100/minute", "sliding_log"),
        ],
        CostTable(
            (Category("write", "0.03", "0.15"),), (Operation("items.create", "write", "0.07"),)
        ),
        CreditPlan("50"),
    )


@pytest.fixture
def server() -> Iterator[_servers.RedisServer]:
    """A standalone server of this test's own."""
    with _servers.standalone() as s:
        yield s


def _wait(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_a_killed_and_restarted_server_gives_typed_errors_then_recovers(
    server: _servers.RedisServer,
) -> None:
    """Checks running while Redis is killed and restarted raise only BackendUnavailable,
    each within the timeout, and succeed again once it is back (scripts reloaded)."""
    meter = Meter(_policy(), backend_from_url(server.url, timeout=0.5))
    results: list[str] = []
    slowest = [0.0]
    stop = threading.Event()

    def run() -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            try:
                meter.check(f"k{len(results) % 50}", org="o", operation="items.create")
                results.append("ok")
            except BackendUnavailable:
                results.append("down")
            except Exception as exc:  # a leaked driver error fails the test below
                results.append(repr(exc))
            slowest[0] = max(slowest[0], time.monotonic() - started)
            time.sleep(0.002)

    worker = threading.Thread(target=run)
    worker.start()
    _wait(lambda: results.count("ok") >= 20)
    server.kill()
    _wait(lambda: results.count("down") >= 5)
    server.start()
    seen = len(results)
    _wait(lambda: results[seen:].count("ok") >= 20)
    stop.set()
    worker.join()
    meter.close()
    assert set(results) == {"ok", "down"}
    first_down = results.index("down")
    last_down = len(results) - 1 - results[::-1].index("down")
    assert "ok" not in results[first_down : last_down + 1]  # down only while it was down
    assert slowest[0] < 0.5 + 0.5


def test_fail_open_admits_degraded_decisions_while_down_and_recovers(
    server: _servers.RedisServer,
) -> None:
    """With fail_open, a dead Redis yields admitted, degraded, counted decisions; then not."""
    meter = Meter(_policy(), backend_from_url(server.url, timeout=0.5), fail_open=True)
    assert not meter.check("k", org="o", operation="items.create").degraded
    server.kill()
    down = [meter.check("k", org="o", operation="items.create") for _ in range(3)]
    batch = meter.check_many([("k", "items.create", "o")] * 2)
    assert all(d.allowed and d.degraded for d in down + batch)
    assert meter.degraded == 5
    assert meter.refund(down[0]) is False
    server.start()
    d = meter.check("k", org="o", operation="items.create")
    assert d.allowed
    assert not d.degraded
    assert meter.usage("o").requests == 1  # the restarted server kept nothing (no persistence)
    meter.close()


def test_a_script_flush_is_answered_by_one_eval_then_evalsha_again(
    server: _servers.RedisServer,
) -> None:
    """After SCRIPT FLUSH the next check fails over to EVAL once; later checks use EVALSHA."""
    admin = redis.Redis(port=server.port)
    meter = Meter(_policy(), backend_from_url(server.url))
    meter.check("k", org="o", operation="items.create")
    admin.script_flush()
    admin.config_resetstat()
    for _ in range(5):
        assert meter.check("k", org="o", operation="items.create").allowed
    stats = admin.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 5
    assert stats["cmdstat_evalsha"]["failed_calls"] == 1
    assert stats["cmdstat_eval"]["calls"] == 1
    assert meter.usage("o").requests == 6
    meter.close()
    admin.close()


def test_a_batch_after_a_script_flush_resends_with_the_scripts_text(
    server: _servers.RedisServer,
) -> None:
    """check_many after SCRIPT FLUSH: the refused calls go again as EVAL (the text
    travels with the call, so no other flush can come in between), never as SCRIPT
    LOAD followed by EVALSHA."""
    admin = redis.Redis(port=server.port)
    meter = Meter(_policy(), backend_from_url(server.url))
    requests: list[Any] = [(f"k{i}", "items.create", f"o{i % 3}") for i in range(120)]
    meter.check_many(requests)
    admin.script_flush()
    admin.config_resetstat()
    assert all(d.allowed for d in meter.check_many(requests))
    stats = admin.info("commandstats")
    assert stats["cmdstat_eval"]["calls"] == stats["cmdstat_evalsha"]["failed_calls"] > 0
    assert "cmdstat_script|load" not in stats
    assert sum(meter.usage(f"o{i}").requests for i in range(3)) == 240
    meter.close()
    admin.close()


@pytest.mark.parametrize("asynchronous", [False, True])
def test_batches_never_fail_while_another_client_flushes_scripts(
    server: _servers.RedisServer, asynchronous: bool
) -> None:
    """Issue 17 item 11: SCRIPT FLUSH in a loop (bounded) while batches run; every
    request is decided, none surfaces NOSCRIPT."""
    stop = threading.Event()
    flushes = [0]

    def flush() -> None:
        admin = redis.Redis(port=server.port)
        while not stop.is_set() and flushes[0] < 2000:
            admin.script_flush()
            flushes[0] += 1
        admin.close()

    requests: list[Any] = [(f"k{i}", "items.create", f"o{i % 4}") for i in range(60)]
    flusher = threading.Thread(target=flush)
    flusher.start()
    try:
        if asynchronous:

            async def scenario() -> tuple[int, int]:
                backend = async_backend_from_url(server.url)
                async with AsyncMeter(_policy(), backend) as meter:
                    admitted = 0
                    for _ in range(150):
                        decisions = await meter.check_many(requests)
                        admitted += sum(d.allowed for d in decisions)
                    usages = [await meter.usage(f"o{i}") for i in range(4)]
                    return admitted, sum(u.requests for u in usages)

            admitted, total = asyncio.run(scenario())
        else:
            meter = Meter(_policy(), backend_from_url(server.url))
            admitted = 0
            for _ in range(150):
                admitted += sum(d.allowed for d in meter.check_many(requests))
            total = sum(meter.usage(f"o{i}").requests for i in range(4))
            meter.close()
    finally:
        stop.set()
        flusher.join()
    assert flushes[0] > 10
    assert admitted == total > 0


def _pause(port: int, ms: int) -> None:
    admin = redis.Redis(port=port)
    admin.execute_command("CLIENT", "PAUSE", ms, "ALL")
    admin.close()


def test_a_paused_server_times_out_within_the_timeout_then_recovers(
    server: _servers.RedisServer,
) -> None:
    """CLIENT PAUSE longer than the timeout: BackendUnavailable after about the timeout."""
    meter = Meter(_policy(), backend_from_url(server.url, timeout=0.3))
    meter.check("k", org="o", operation="items.create")
    _pause(server.port, 1500)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="Timeout"):
        meter.check("k", org="o", operation="items.create")
    assert 0.25 < time.monotonic() - started < 0.3 + 0.4
    _wait(lambda: time.monotonic() - started > 1.6, timeout=5)
    assert meter.check("k", org="o", operation="items.create").allowed
    meter.close()


def test_a_paused_server_times_out_the_async_backend_too(server: _servers.RedisServer) -> None:
    """The asyncio backend raises BackendUnavailable within its timeout under CLIENT PAUSE."""

    async def scenario() -> float:
        backend = async_backend_from_url(server.url, timeout=0.3)
        async with AsyncMeter(_policy(), backend) as meter:
            await meter.check("k", org="o", operation="items.create")
            _pause(server.port, 1500)
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await meter.check("k", org="o", operation="items.create")
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, 1.6 - (time.monotonic() - started)))
            assert (await meter.check("k", org="o", operation="items.create")).allowed
            return elapsed

    elapsed = asyncio.run(scenario())
    assert 0.25 < elapsed < 0.3 + 0.4


@pytest.mark.parametrize("appendonly", [True, False])
def test_credit_usage_survives_a_hard_restart_with_appendonly(appendonly: bool) -> None:
    """With appendonly yes + appendfsync always, a SIGKILL and restart keep every balance;
    without persistence the same restart forgets them (so the test can tell)."""
    extra = ("--appendonly", "yes", "--appendfsync", "always") if appendonly else ()
    with _servers.standalone(*extra) as server:
        meter = Meter(_policy(), backend_from_url(server.url))
        meter.set_allowance("o", "20")
        meter.top_up("o", "1.5")
        decisions = [meter.check(f"k{i % 3}", org="o", operation="items.create") for i in range(10)]
        assert meter.refund(decisions[4]) is True
        before = meter.usage("o")
        assert before.credits_used == Decimal("0.63")
        server.kill()
        server.start()
        after = meter.usage("o")
        if not appendonly:
            assert after.requests == 0
            assert after.allowance == Decimal("50")
            meter.close()
            return
        assert after == before
        assert meter.refund(decisions[4]) is False  # the refund itself was kept
        d = meter.check("k0", org="o", operation="items.create")
        assert d.balance == Decimal("21.5") - Decimal("0.70")
        meter.close()


def test_a_dead_cluster_node_gives_typed_errors_and_recovers() -> None:
    """Killing the node that holds an org gives BackendUnavailable; restarting it heals."""
    if _servers.redis_binary() is None:
        pytest.fail("no redis-server")
    with _servers.cluster() as nodes:
        url = f"redis+cluster://127.0.0.1:{nodes[0].port},127.0.0.1:{nodes[1].port}"
        meter = Meter(_policy(), backend_from_url(url, timeout=0.5))
        assert meter.check("k", org="org_1", operation="items.create").allowed
        client = redis.RedisCluster(host="127.0.0.1", port=nodes[0].port)
        owner = client.get_node_from_key("x:{org_1}").port
        client.close()
        node = next(n for n in nodes if n.port == owner)
        node.kill()
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            meter.check("k", org="org_1", operation="items.create")
        assert time.monotonic() - started < 5
        node.start()

        def healed() -> bool:
            try:
                return meter.check("k", org="org_1", operation="items.create").allowed
            except BackendUnavailable:
                return False

        _wait(healed, timeout=20)
        meter.close()


def test_the_async_backend_fails_typed_while_down_and_recovers(
    server: _servers.RedisServer,
) -> None:
    """Concurrent async checks fail with BackendUnavailable while Redis is down and
    succeed again after it restarts; cancelled requests never shift anyone's reply."""

    async def scenario() -> None:
        backend = async_backend_from_url(server.url, timeout=0.5)
        async with AsyncMeter(_policy(), backend) as meter:

            async def check(i: int) -> Any:
                # a distinct cost per request: a reply handed to the wrong caller would show
                return await meter.check(
                    f"k{i}", org="o", operation="items.create", cost=f"0.{i + 3:02d}"
                )

            first = await asyncio.gather(*(check(i) for i in range(40)))
            assert [d.charged for d in first] == [Decimal(f"0.{i + 3:02d}") for i in range(40)]
            tasks = [asyncio.ensure_future(check(i)) for i in range(40)]
            await asyncio.sleep(0)
            for task in tasks[::2]:
                task.cancel()
            done = await asyncio.gather(*tasks, return_exceptions=True)
            kept = [(i, d) for i, d in enumerate(done) if i % 2]
            assert all(d.charged == Decimal(f"0.{i + 3:02d}") for i, d in kept)
            server.kill()
            down = await asyncio.gather(*(check(i) for i in range(10)), return_exceptions=True)
            assert all(isinstance(d, BackendUnavailable) for d in down)
            server.start()
            back = await asyncio.gather(*(check(i) for i in range(10)))
            assert all(d.allowed for d in back)

    asyncio.run(scenario())
