"""The ledger drain's speed into SQLite and PostgreSQL, and history queries' latency.

    python -m pytest bench/bench_ledger.py --benchmark-only -q -s -p no:cacheprovider
    METERKIT_BENCH_QUICK=1 python -m pytest bench/bench_ledger.py --benchmark-only -q -s \
        -p no:cacheprovider

**Drain.** A Redis stream (a ``redis-server`` of the benchmark's own) is filled with
charge entries exactly as ``check.lua`` writes them (100 organizations, 1,000 keys,
3 operations), untimed; then a drain moves them all into the store, timed: read
(``XREADGROUP``, 1,000 at a time), one transaction per batch (the events, each
unless its id is there, and the daily and monthly rollups of those inserted), then
``XACK`` and the trim. The target is 20,000 events/s on this machine, for each store.

The peer in the same run is the floor a hand-written drain pays: the same reads and
acknowledgements, and a plain ``INSERT ... ON CONFLICT DO NOTHING`` of each batch
(``executemany``) into one table, with no rollups, no trim and no claim of a dead
drain's entries. The two run in alternating rounds on streams of their own; the
ratio is the median of the per-round ratios (``bench/_interleave.py`` explains why).

**History.** One organization with 1,000 keys (200 in quick mode) used every day for
90 days on 3 operations (270,000 rollup rows); the median time of ``history`` for a
month, for the 90 days, and for one key's month.

Figures are printed, never asserted.
"""

from __future__ import annotations

import os
import secrets
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from meterkit.ledger import Drain, Event, history, store_from_url
from tests import _servers

QUICK = os.environ.get("METERKIT_BENCH_QUICK") == "1"
ROUNDS = 3 if QUICK else 7
PER_ROUND = 5_000 if QUICK else 20_000
T = 1_793_491_200_000_000  # 2026-11-01T00:00:00Z
OPS = ("invoices.list", "invoices.create", "reports.get")
ADMIN_URL = os.environ.get("METERKIT_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    if _servers.redis_binary() is None:
        pytest.skip("no redis-server")
    with _servers.standalone() as server:
        yield server.url


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.Error:
        pytest.skip("no PostgreSQL")
    name = "meterkit_bench_" + secrets.token_hex(4)
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _fill(client: Any, stream: str, prefix: str, start: int, n: int) -> None:
    """Append ``n`` charge entries (untimed), as check.lua writes them."""
    for chunk in range(start, start + n, 5_000):
        pipe = client.pipeline(transaction=False)
        for i in range(chunk, min(chunk + 5_000, start + n)):
            body = (
                f"{prefix}.{i}\n{prefix}:{{org_{i % 100}}}:cr\n{T + i * 1_000}\n10000\n"
                f"q|{OPS[i % 3]}|key_{i % 1_000}"
            )
            pipe.xadd(stream, {"c": body})
        pipe.execute()


def _floor(client: Any, stream: str, conn: Any, insert: str) -> int:
    """A hand-written drain: read a batch, insert it, commit, acknowledge."""
    from meterkit.ledger.events import entry_event

    moved = 0
    while True:
        reply = client.xreadgroup("floor", "f", {stream: ">"}, count=1_000)
        if not reply:
            return moved
        entries = reply[0][1]
        rows = []
        for entry_id, fields in entries:
            e = entry_event(stream, entry_id, fields)
            rows.append((e.id, e.time, e.org, e.mode, e.kind, e.key, e.operation, e.micro))
        with conn.transaction() if hasattr(conn, "transaction") else conn:
            conn.cursor().executemany(insert, rows)
        client.xack(stream, "floor", *[entry_id for entry_id, _ in entries])
        moved += len(entries)


_FLOOR_TABLE = (
    "CREATE TABLE IF NOT EXISTS floor_events (id TEXT PRIMARY KEY, at BIGINT, org TEXT, "
    "mode TEXT, kind TEXT, key_id TEXT, operation TEXT, micro BIGINT)"
)


def _floor_connection(kind: str, url: str) -> tuple[Any, str]:
    if kind == "sqlite":
        import sqlite3

        conn = sqlite3.connect(url.split("///", 1)[1] + ".floor")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(_FLOOR_TABLE)
        place = "?"
    else:
        import psycopg

        conn = psycopg.connect(url, autocommit=True)
        conn.execute(_FLOOR_TABLE)
        place = "%s"
    places = ", ".join([place] * 8)
    return conn, f"INSERT INTO floor_events VALUES ({places}) ON CONFLICT DO NOTHING"


def _store_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/bench.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_drain_events_per_second(
    kind: str,
    redis_url: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    benchmark: Any,
    figures: Callable[[str], None],
) -> None:
    """Events per second from a Redis stream into the store, against the floor."""
    import redis

    url = _store_url(kind, tmp_path, request)
    client = redis.Redis.from_url(redis_url)
    prefix = "b" + secrets.token_hex(3)
    stream, floor_stream = f"{prefix}:ledger", f"{prefix}f:ledger"
    client.xgroup_create(floor_stream, "floor", id="0", mkstream=True)
    store = store_from_url(url)
    floor_conn, insert = _floor_connection(kind, url)
    drain = Drain(redis_url, store, prefix=prefix, batch=1_000)
    rates: dict[str, list[float]] = {"meterkit": [], "floor": []}
    offset = 0
    try:
        for round_ in range(ROUNDS):
            order = ["meterkit", "floor"] if round_ % 2 == 0 else ["floor", "meterkit"]
            for side in order:
                if side == "meterkit":
                    _fill(client, stream, prefix, offset, PER_ROUND)
                    start = time.perf_counter()
                    moved = drain.run_once()
                else:
                    _fill(client, floor_stream, prefix + "f", offset, PER_ROUND)
                    start = time.perf_counter()
                    moved = _floor(client, floor_stream, floor_conn, insert)
                took = time.perf_counter() - start
                assert moved == PER_ROUND
                rates[side].append(PER_ROUND / took)
            offset += PER_ROUND
        assert store.count() == offset
        assert client.xlen(stream) == 0
    finally:
        drain.close()
        store.close()
        floor_conn.close()
        client.delete(stream, floor_stream)
        client.close()
    ours = statistics.median(rates["meterkit"])
    floor = statistics.median(rates["floor"])
    ratio = statistics.median(m / f for m, f in zip(rates["meterkit"], rates["floor"], strict=True))
    line = (
        f"DRAIN {kind}: {ours:,.0f} events/s (target 20,000; {ROUNDS} rounds of "
        f"{PER_ROUND:,}, median); floor (insert only, no rollups) {floor:,.0f} events/s; "
        f"meterkit/floor {ratio:.2f}x"
    )
    figures(line)
    benchmark.extra_info["events_per_second"] = ours
    benchmark.extra_info["floor_events_per_second"] = floor
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_history_of_one_organization(
    kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    benchmark: Any,
    figures: Callable[[str], None],
) -> None:
    """History of an organization with many keys over 90 days: month, 90 days, one key."""
    url = _store_url(kind, tmp_path, request)
    if kind == "postgresql":  # a schema of its own in the module's database
        import psycopg

        schema = "h_" + secrets.token_hex(3)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        url = f"{url}?options=-c%20search_path%3D{schema}"
    store = store_from_url(url)
    keys = 200 if QUICK else 1_000
    day_us = 86_400_000_000
    start = T - 60 * day_us  # 2026-09-02 .. 2026-11-30
    batch: list[Event] = []
    n = 0
    for day in range(90):
        for k in range(keys):
            for op in OPS:
                n += 1
                at = start + day * day_us + k
                batch.append(
                    Event(f"h{n}", at, "org_big", "live", "charge", f"key_{k}", op, 10_000,
                          f"h{n}", "", "s", (n, 0))
                )  # fmt: skip
                if len(batch) == 10_000:
                    store.write(batch)
                    batch = []
    store.write(batch)

    def timed(fn: Callable[[], Any]) -> float:
        runs = []
        for _ in range(5 if QUICK else 11):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        return statistics.median(runs) * 1000

    try:
        month = timed(lambda: history(store, "org_big", None, "live", date(2026, 10, 1),
                                      date(2026, 11, 1)))  # fmt: skip
        days90 = timed(lambda: history(store, "org_big", None, "live", date(2026, 9, 2),
                                       date(2026, 12, 1)))  # fmt: skip
        one_key = timed(lambda: history(store, "org_big", "key_7", "live", date(2026, 10, 1),
                                        date(2026, 11, 1)))  # fmt: skip
        found = history(store, "org_big", None, "live", date(2026, 9, 2), date(2026, 12, 1))
        assert found.requests == n
    finally:
        store.close()
    figures(
        f"HISTORY {kind}: 1 org, {keys:,} keys x 3 operations x 90 days ({n:,} rollup rows): "
        f"a month {month:.1f} ms, 90 days {days90:.1f} ms, one key's month {one_key:.1f} ms "
        "(median)"
    )
    benchmark.extra_info["month_ms"] = month
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
