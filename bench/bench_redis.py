"""The Redis backend's speed and memory, against what a user would pick instead.

    python -m pytest bench/bench_redis.py --benchmark-only -q -s -p no:cacheprovider
    METERKIT_BENCH_QUICK=1 python -m pytest bench/bench_redis.py --benchmark-only -q \
        -p no:cacheprovider

Every side talks to the same redis-server, which the benchmark starts itself on a
free port (no persistence), through redis-py with hiredis, on one connection.

What one check is (the seed's three tiers, per check):

* meterkit: ``meter.check(key, org=..., operation="invoices.list")`` with the seed
  policy (key 1000/hour and org 10000/hour fixed windows, key 100/minute sliding log,
  the 0.01-credit debit and the per-key usage record) on ``RedisBackend`` with the
  server's clock: one ``EVALSHA``, returning a ``Decision``.
* limits: ``RedisStorage`` and ``FixedWindowRateLimiter`` over the same three rates,
  written the way its users write several limits: ``test`` all, then ``hit`` all
  (six round trips, and not atomic across tiers).
* throttled-py: three ``Throttled`` GCRA limiters (same rates) on one ``RedisStore``,
  each ``.limit()``-ed in turn (three round trips).
* the floor: ``client.evalsha`` of a script that only increments one key, through
  redis-py's usual path: one round trip and almost no server work. ``floor
  (meterkit I/O)`` is the same script through meterkit's own connection handling.

Traffic: 20,000 keys in 2,000 organizations, each key visited once before timing
(so timed checks update state instead of creating it), then cycled in one shuffled
order: no key nears its 100/minute burst, and denials are counted and reported.

Ratios come from interleaved rounds (``bench/_interleave.py``): each side runs a
short round in turn, and a ratio is the median of the per-round ratios. They are
printed, stored in ``benchmark.extra_info``, and never asserted.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._interleave import interleave
from meterkit import AsyncMeter, Meter, Policy
from meterkit.connect import async_backend_from_url, backend_from_url, redis_client
from tests import _servers

QUICK = os.environ.get("METERKIT_BENCH_QUICK") == "1"
ROUNDS = 7 if QUICK else 21
ROUND_SECONDS = 0.05 if QUICK else 0.15
KEYS = 20_000
ORGS = 2_000
Figures = Callable[[str], None]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """A redis-server of the benchmark's own, on a free port, without persistence."""
    if _servers.redis_binary() is None:
        pytest.skip("no redis-server binary on PATH")
    with _servers.standalone() as server:
        yield server.url


def _traffic(seed: int = 7) -> Iterator[tuple[str, str]]:
    pairs = [(f"key_{i:05d}", f"org_{i % ORGS:04d}") for i in range(KEYS)]
    random.Random(seed).shuffle(pairs)
    return itertools.cycle(pairs)


def _warm(fn: Callable[[], object]) -> None:
    for _ in range(KEYS):
        fn()


def _meterkit(url: str) -> tuple[Callable[[], bool], Meter]:
    meter = Meter(Policy.crane_ledger(), backend_from_url(url, prefix="bench"))
    traffic = _traffic()
    check = meter.check

    def one() -> bool:
        key, org = next(traffic)
        return check(key, org=org, operation="invoices.list").allowed

    return one, meter


def _limits(url: str) -> Callable[[], bool]:
    from limits import parse
    from limits.storage import RedisStorage
    from limits.strategies import FixedWindowRateLimiter

    limiter = FixedWindowRateLimiter(RedisStorage(url))
    key_hour, org_hour, key_burst = parse("1000/hour"), parse("10000/hour"), parse("100/minute")
    traffic = _traffic()

    def one() -> bool:
        key, org = next(traffic)
        tiers = ((key_hour, key), (org_hour, org), (key_burst, key))
        if all(limiter.test(item, ident) for item, ident in tiers):
            for item, ident in tiers:
                limiter.hit(item, ident)
            return True
        return False

    return one


def _throttled(url: str) -> Callable[[], bool]:
    from throttled import RedisStore, Throttled, per_hour, per_min

    store = RedisStore(server=url)
    key_hour = Throttled(using="gcra", quota=per_hour(1000), store=store, key_prefix="kh")
    org_hour = Throttled(using="gcra", quota=per_hour(10000), store=store, key_prefix="oh")
    key_burst = Throttled(using="gcra", quota=per_min(100), store=store, key_prefix="kb")
    traffic = _traffic()

    def one() -> bool:
        key, org = next(traffic)
        a = key_hour.limit(key)
        b = org_hour.limit(org)
        c = key_burst.limit(key)
        return not (a.limited or b.limited or c.limited)

    return one


def _floor(url: str) -> tuple[Callable[[], object], Callable[[], object]]:
    client = redis_client(url)
    script = client.register_script("return redis.call('INCR', KEYS[1])")
    script(keys=["floor"])  # loaded once, as any user of a script would
    sha = script.sha

    def plain() -> object:
        return client.evalsha(sha, 1, "floor")

    backend = backend_from_url(url)
    io = backend._io

    def ours() -> object:
        return io.call(["EVALSHA", sha, 1, "floor"])

    return plain, ours


def test_one_check_against_limits_throttled_and_the_floor(
    benchmark: Any, url: str, figures: Figures
) -> None:
    """meterkit's one-EVALSHA check against limits, throttled-py and a bare EVALSHA."""
    meterkit_one, meter = _meterkit(url)
    candidates: dict[str, Callable[[], object]] = {
        "meterkit": meterkit_one,
        "limits": _limits(url),
        "throttled-py": _throttled(url),
    }
    floor, floor_ours = _floor(url)
    candidates["floor (redis-py)"] = floor
    candidates["floor (meterkit I/O)"] = floor_ours
    denied: dict[str, int] = {}
    for name, fn in candidates.items():
        if name.startswith("floor"):
            continue
        _warm(fn)
        denied[name] = sum(1 for _ in range(2000) if not fn())

    def run() -> Any:
        return interleave(candidates, rounds=ROUNDS, round_seconds=ROUND_SECONDS)

    result = benchmark.pedantic(run, rounds=1, iterations=1)
    figures("REDIS one check, µs (interleaved medians):\n" + result.table())
    figures(result.ratio_line("limits", "meterkit", "meterkit/limits"))
    figures(result.ratio_line("throttled-py", "meterkit", "meterkit/throttled-py"))
    for floor_name in ("floor (redis-py)", "floor (meterkit I/O)"):
        ratio = result.ratio("meterkit", floor_name)
        spread = sorted(result.ratios("meterkit", floor_name))
        figures(
            f"FLOOR meterkit / {floor_name}: {ratio:.2f}x the floor "
            f"(median of {result.rounds} rounds; range {spread[0]:.2f}-{spread[-1]:.2f})"
        )
    figures(f"DENIED of 2000 checks after warm-up: {denied}")
    benchmark.extra_info.update(
        {
            "us": {name: result.median_us(name) for name in candidates},
            "meterkit_vs_limits": result.ratio("limits", "meterkit"),
            "meterkit_vs_throttled": result.ratio("throttled-py", "meterkit"),
            "meterkit_over_floor": result.ratio("meterkit", "floor (redis-py)"),
            "meterkit_over_own_io_floor": result.ratio("meterkit", "floor (meterkit I/O)"),
        }
    )
    meter.close()


def _throughput(fn: Callable[[], int], seconds: float) -> float:
    """Checks per second of ``fn`` (which returns how many checks it made)."""
    done = 0
    start = time.perf_counter()
    while True:
        done += fn()
        took = time.perf_counter() - start
        if took >= seconds:
            return done / took


def _alternate(single: Callable[[], int], other: Callable[[], int]) -> list[tuple[float, float]]:
    """Throughputs (checks/s) of ``single`` and ``other`` in alternating rounds."""
    rounds = []
    for i in range(ROUNDS):
        order = [single, other] if i % 2 == 0 else [other, single]
        got = {f: _throughput(f, ROUND_SECONDS) for f in order}
        rounds.append((got[single], got[other]))
    return rounds


def _throughput_ratio(figures: Figures, label: str, rounds: list[tuple[float, float]]) -> float:
    """Print ``other``'s throughput over ``single``'s (the median of the rounds); return it."""
    ratios = sorted(o / s for s, o in rounds)
    ratio = statistics.median(ratios)
    figures(
        f"RATIO {label} throughput: {ratio:.2f}x "
        f"(median of {len(rounds)} rounds; range {ratios[0]:.2f}-{ratios[-1]:.2f}; "
        f"{statistics.median(s for s, _ in rounds):,.0f} vs "
        f"{statistics.median(o for _, o in rounds):,.0f} checks/s)"
    )
    return ratio


def _busy(url: str, fn: Callable[[], int], checks: int) -> str:
    """Per check: wall time, this process's CPU time and Redis's (its main thread,
    from ``INFO cpu``). When the client and Redis take turns, the wall time is about
    the sum of the two; when they overlap, about the larger."""
    client = redis_client(url)

    def server_cpu() -> float:
        info = client.info("cpu")
        return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])

    done = 0
    redis_before, cpu_before, start = server_cpu(), time.process_time(), time.perf_counter()
    while done < checks:
        done += fn()
    wall = time.perf_counter() - start
    cpu, redis_cpu = time.process_time() - cpu_before, server_cpu() - redis_before
    client.close()
    return (
        f"{wall / done * 1e6:.1f} µs a check; client CPU {cpu / done * 1e6:.1f} µs, "
        f"Redis CPU {redis_cpu / done * 1e6:.1f} µs (Redis busy {redis_cpu / wall:.0%})"
    )


def test_check_many_in_batches_of_100_against_single_checks(
    benchmark: Any, url: str, figures: Figures
) -> None:
    """Throughput of check_many (batches of 100, one round trip each) over check."""
    meter = Meter(Policy.crane_ledger(), backend_from_url(url, prefix="bench-many"))
    traffic = _traffic(11)
    requests = itertools.cycle(
        [
            [(key, "invoices.list", org) for key, org in itertools.islice(traffic, 100)]
            for _ in range(KEYS // 100)
        ]
    )
    singles = _traffic(11)

    def single() -> int:
        for _ in range(50):
            key, org = next(singles)
            meter.check(key, org=org, operation="invoices.list")
        return 50

    def batch() -> int:
        meter.check_many(next(requests))
        return 100

    for _ in range(KEYS // 100):
        batch()

    rounds = benchmark.pedantic(_alternate, args=(single, batch), rounds=1, iterations=1)
    ratio = _throughput_ratio(figures, "check_many(100)/check", rounds)
    figures(f"BUSY check_many(100): {_busy(url, batch, 10_000 if QUICK else 40_000)}")
    benchmark.extra_info["check_many_over_check"] = ratio
    meter.close()


def test_async_backend_with_200_tasks_against_one_sync_client(
    benchmark: Any, url: str, figures: Figures
) -> None:
    """Throughput of AsyncRedisBackend under 200 concurrent tasks over one sync client."""
    sync_meter = Meter(Policy.crane_ledger(), backend_from_url(url, prefix="bench-sync"))
    singles = _traffic(13)

    def single() -> int:
        for _ in range(50):
            key, org = next(singles)
            sync_meter.check(key, org=org, operation="invoices.list")
        return 50

    loop = asyncio.new_event_loop()
    backend = async_backend_from_url(url, prefix="bench-async")
    async_meter = AsyncMeter(Policy.crane_ledger(), backend)
    concurrent = _traffic(13)

    async def task(n: int) -> None:
        for _ in range(n):
            key, org = next(concurrent)
            await async_meter.check(key, org=org, operation="invoices.list")

    async def tasks() -> None:
        await asyncio.gather(*(task(5) for _ in range(200)))

    def burst() -> int:
        loop.run_until_complete(tasks())
        return 1000

    for _ in range(KEYS // 1000):
        burst()

    rounds = benchmark.pedantic(_alternate, args=(single, burst), rounds=1, iterations=1)
    ratio = _throughput_ratio(figures, "async 200 tasks/one sync client", rounds)
    figures(f"BUSY async, 200 tasks: {_busy(url, burst, 10_000 if QUICK else 40_000)}")
    figures(f"BUSY one sync client: {_busy(url, single, 2_000 if QUICK else 10_000)}")
    benchmark.extra_info["async_over_sync"] = ratio
    loop.run_until_complete(async_meter.aclose())
    loop.close()
    sync_meter.close()


def test_redis_memory_per_active_key_and_organization(
    benchmark: Any, url: str, figures: Figures
) -> None:
    """Bytes of Redis memory per active API key and per organization, seed policy."""
    client = redis_client(url)
    orgs, per_org = (200, 10) if QUICK else (1_000, 10)
    meter = Meter(Policy.crane_ledger(), backend_from_url(url, prefix="mem"))

    def fill(checks_per_key: int) -> dict[str, float]:
        client.flushall()
        client.config_resetstat()
        before = client.info("memory")["used_memory"]
        for _ in range(checks_per_key):
            meter.check_many(
                [
                    (f"key_{o}_{k}", "invoices.list", f"org_{o}")
                    for o in range(orgs)
                    for k in range(per_org)
                ]
            )
        used = client.info("memory")["used_memory"] - before
        sizes: dict[str, list[int]] = {}
        for key in itertools.islice(client.scan_iter(match="mem:*", count=1000), 6000):
            parts = key.decode().split("}:", 1)[1].split(":")
            kind = parts[1].split(".")[0] if len(parts) > 1 else parts[0]
            sizes.setdefault(kind, []).append(client.memory_usage(key, samples=0) or 0)
        out = {kind: statistics.mean(v) for kind, v in sizes.items()}
        out["used_memory per key"] = used / (orgs * per_org)
        return out

    def run() -> tuple[dict[str, float], dict[str, float]]:
        return fill(1), fill(100)

    once, full = benchmark.pedantic(run, rounds=1, iterations=1)
    for label, m in (("1 check per key", once), ("100 checks per key", full)):
        figures(
            f"MEMORY redis, {label} ({orgs} orgs x {per_org} keys): "
            f"{m['used_memory per key']:.0f} B of used_memory per active key, all in; "
            f"per key: key-hour window {m['key-hour']:.0f} B + burst log {m['key-burst']:.0f} B; "
            f"per org: account {m['cr']:.0f} B (with its {per_org} keys' usage) + "
            f"org-hour window {m['org-hour']:.0f} B"
        )
    benchmark.extra_info["memory"] = {"1 check": once, "100 checks": full}
    meter.close()
    client.close()
