"""The ledger's drain lag: how long the oldest event the store does not hold yet has
waited, on memory and on Redis, and as Prometheus's gauge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from meterkit import MemoryBackend, Meter
from meterkit.connect import redis_client
from meterkit.errors import BackendUnavailable
from meterkit.ledger import Drain, store_from_url
from meterkit.ledger.streams import stream_for
from meterkit.prometheus import PrometheusObserver
from tests.conftest import FakeClock, delete_prefix, new_prefix
from tests.ledger.test_drain import Failing, add_charges
from tests.observe._script import script_policy

NOV_2023_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/ledger.db"


def test_memory_lag_is_the_age_of_the_oldest_undrained_event(
    clock: FakeClock, sqlite_url: str
) -> None:
    """On the backend's clock: 0 with nothing to drain, the oldest event's age before a
    drain, 0 again after it; Prometheus serves it as its gauge."""
    backend = MemoryBackend(clock=clock, ledger=True)
    meter = Meter(script_policy(), backend)
    registry = CollectorRegistry()
    with Drain(backend, sqlite_url) as drain:
        PrometheusObserver(registry, ledger_lag=drain.lag)
        assert drain.lag() == 0.0
        meter.check("key_1", org="org_a", operation="items.list")
        clock.advance(2.5)
        meter.check("key_1", org="org_a", operation="items.list")
        clock.advance(2.5)
        assert drain.lag() == 5.0
        assert registry.get_sample_value("meterkit_ledger_drain_lag_seconds") == 5.0
        assert drain.run_once() == 2
        assert drain.lag() == 0.0
        assert registry.get_sample_value("meterkit_ledger_drain_lag_seconds") == 0.0


@pytest.fixture
def standalone(redis_url: str) -> Any:
    client = redis.Redis.from_url(redis_url)
    prefix = new_prefix()
    yield client, prefix, redis_url
    delete_prefix(client, prefix)
    client.close()


def test_redis_lag_counts_pending_and_unread_entries(
    standalone: tuple[Any, str, str], sqlite_url: str
) -> None:
    """On Redis: an entry no drain has read counts from its id's time; one read and not
    committed (pending) still counts; once acknowledged, the lag is 0."""
    client, prefix, url = standalone
    stream = stream_for(prefix, f"{prefix}:{{org_0}}:", False)
    body = f"old\n{prefix}:{{org_0}}:cr\n{NOV_2023_MS * 1000}\n10000\nq|invoices.list|key_0"
    client.xadd(stream, {"c": body}, id=f"{NOV_2023_MS}-0")
    add_charges(client, prefix, 3)
    server_ms = client.time()[0] * 1000
    store = store_from_url(sqlite_url)
    with Drain(url, store, prefix=prefix) as drain:
        unread = drain.lag()
        assert abs(unread - (server_ms - NOV_2023_MS) / 1000) < 60
    failing = Failing(store, after_commit=False)
    with Drain(url, failing, prefix=prefix, consumer="one") as once:
        with pytest.raises(BackendUnavailable):
            once.run_once()  # read (now pending), not committed
        assert abs(once.lag() - unread) < 60
        assert once.run_once() == 4
        assert once.lag() == 0.0
    add_charges(client, prefix, 2, start=3)
    with Drain(url, store, prefix=prefix, consumer="one") as fresh:
        assert 0 <= fresh.lag() < 60
        fresh.run_once()
        assert fresh.lag() == 0.0
    assert store.count() == 6
    store.close()


def test_a_cluster_drain_reports_its_lag(redis_cluster_url: str, sqlite_url: str) -> None:
    """On Cluster, the lag covers every slot's stream."""
    client = redis_client(redis_cluster_url)
    prefix = new_prefix()
    try:
        add_charges(client, prefix, 50, orgs=10, cluster=True)
        with Drain(redis_cluster_url, sqlite_url, prefix=prefix, rescan=0) as drain:
            assert 0 <= drain.lag() < 60
            assert drain.run_once() == 50
            assert drain.lag() == 0.0
    finally:
        delete_prefix(client, prefix)
        client.close()
