"""Concurrency: 4 processes × 8 threads hammer one key; the burst admits exactly 100.

Every check is one atomic script, so no interleaving of 32 clients can admit a 101st
request or lose a micro-credit. The seed's burst tier (sliding log, 100/minute) runs on
the server's TIME; the other algorithms run on a frozen client clock, so that no window
boundary can fall inside the run and the expected count is exact.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from decimal import Decimal
from typing import Any

from meterkit import Category, CostTable, CreditPlan, Meter, Operation, Policy, Tier
from meterkit.connect import backend_from_url
from tests.conftest import delete_prefix, new_prefix, shared_client

PROCESSES = 4
THREADS = 8
PER_THREAD = 5  # 160 attempts per key: 60 more than the burst allows
FROZEN = 1_767_225_600.0 + 1234.5
TIERS = {
    "sliding_log": Tier("burst", "key", "100/minute", "sliding_log"),
    "fixed_window": Tier("burst", "key", "100/day", "fixed_window"),
    "sliding_window": Tier("burst", "key", "100/day", "sliding_window"),
    "gcra": Tier("burst", "key", "100/day", "gcra"),
}


def _policy(algorithm: str) -> Policy:
    return Policy(
        [Tier("key-hour", "key", "1000/hour"), TIERS[algorithm]],
        CostTable(
            (Category("write", "0.03", "0.15"),), (Operation("items.create", "write", "0.07"),)
        ),
        CreditPlan("1000"),
    )


def _worker(url: str, prefix: str, start: Any, results: Any) -> None:
    """One process: THREADS threads, each checking every algorithm's key in turn."""
    meters = {}
    for algorithm in TIERS:
        clock = None if algorithm == "sliding_log" else (lambda: FROZEN)
        backend = backend_from_url(url, prefix=prefix, clock=clock, max_connections=THREADS)
        meters[algorithm] = Meter(_policy(algorithm), backend)
    counts: dict[str, int] = dict.fromkeys(TIERS, 0)
    lock = threading.Lock()

    def run() -> None:
        start.wait()
        for _ in range(PER_THREAD):
            for algorithm, meter in meters.items():
                decision = meter.check("key_1", org=f"org_{algorithm}", operation="items.create")
                if decision.allowed:
                    with lock:
                        counts[algorithm] += 1

    threads = [threading.Thread(target=run) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for meter in meters.values():
        meter.close()
    results.put(counts)


def test_32_concurrent_clients_admit_exactly_the_burst_and_debit_exactly(
    request: Any, redis_url: str
) -> None:
    """4 processes × 8 threads on one key: exactly 100 admitted, exactly 100 × 0.07 debited."""
    client = shared_client(request, redis_url)
    prefix = new_prefix()
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(PROCESSES * THREADS)
    results = context.Queue()
    processes = [
        context.Process(target=_worker, args=(redis_url, prefix, start, results))
        for _ in range(PROCESSES)
    ]
    began = time.monotonic()
    try:
        for p in processes:
            p.start()
        counts = [results.get(timeout=120) for _ in processes]
        for p in processes:
            p.join(timeout=30)
            assert p.exitcode == 0
        assert time.monotonic() - began < 55  # the sliding log's minute held the whole run
        for algorithm in TIERS:
            assert sum(c[algorithm] for c in counts) == 100, algorithm
            clock = None if algorithm == "sliding_log" else (lambda: FROZEN)
            backend = backend_from_url(redis_url, prefix=prefix, clock=clock)
            meter = Meter(_policy(algorithm), backend)
            usage = meter.usage(f"org_{algorithm}")
            assert usage.requests == 100
            assert usage.credits_used == Decimal("7.00")
            assert usage.keys["key_1"].requests == 100
            meter.close()
    finally:
        for p in processes:
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
        results.join_thread()
        delete_prefix(client, prefix)
