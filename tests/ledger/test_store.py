"""Ledger stores (SQLite and PostgreSQL): each event once, rollups that match the
events, history of any period, exports in order."""

from __future__ import annotations

import threading
from datetime import date
from decimal import Decimal
from typing import Any

import pytest

from meterkit.errors import ConfigurationError, InvalidRequestError
from meterkit.ledger import Event, history, period_bounds, store_from_url

DAY = 86_400_000_000
T = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z


def charge(n: int, at: int, *, org: str = "org_1", key: str = "key_1", op: str = "invoices.list",
           micro: int = 10_000, mode: str = "live") -> Event:  # fmt: skip
    return Event(f"c{n}", at, org, mode, "charge", key, op, micro, f"c{n}", "", "s", (n, 0))


def refund(n: int, at: int, **kw: Any) -> Event:
    c = charge(n, at, **kw)
    return c._replace(id=f"rc{n}", kind="refund", position=(10_000 + n, 0))


def test_each_event_is_inserted_once(store: Any) -> None:
    """Writing a batch again (or a batch that overlaps) inserts only the new events."""
    batch = [charge(i, T + i) for i in range(50)]
    assert store.write(batch) == 50
    assert store.write(batch) == 0
    assert store.write([*batch[25:], charge(50, T + 50)]) == 1
    assert store.count() == 51
    assert store.write([]) == 0


def test_rollups_count_only_what_was_inserted(store: Any) -> None:
    """Usage from the rollups equals the events' sums however often events were written."""
    events = [charge(i, T + i * DAY // 3, key=f"key_{i % 3}") for i in range(90)]
    events += [refund(i, T + i * DAY // 3 + 1, key=f"key_{i % 3}") for i in range(0, 90, 9)]
    for start in range(0, len(events), 7):
        store.write(events[start : start + 20])  # overlapping batches
    found = history(store, "org_1", None, "live", date(2026, 1, 1), date(2026, 2, 1))
    assert found.requests == 90
    assert found.refunds == 10
    assert found.charged == Decimal("0.9")
    assert found.refunded == Decimal("0.1")
    assert found.credits == Decimal("0.8")
    assert sum(d.requests for d in found.days) == 90
    assert len(found.days) == 30
    assert {k: v.requests for k, v in found.keys.items()} == {"key_0": 30, "key_1": 30, "key_2": 30}
    assert found.months[0].month == "2026-01"


def test_history_covers_partial_months_and_one_key(store: Any) -> None:
    """A range across months adds days and whole months alike; a key narrows it."""
    # one charge a day, Dec 1 2025 .. Mar 31 2026, on two keys
    start = T - 31 * DAY
    store.write([charge(i, start + i * DAY, key=f"key_{i % 2}") for i in range(121)])
    found = history(store, "org_1", None, "live", date(2025, 12, 15), date(2026, 3, 10))
    assert found.requests == 17 + 31 + 28 + 9
    assert [m.month for m in found.months] == ["2025-12", "2026-01", "2026-02", "2026-03"]
    assert [m.requests for m in found.months] == [17, 31, 28, 9]
    assert found.operations["invoices.list"].requests == found.requests
    assert sum(v.requests for v in found.keys.values()) == found.requests
    one = history(store, "org_1", "key_0", "live", date(2026, 1, 1), date(2026, 2, 1))
    assert one.requests == sum(1 for i in range(31, 62) if i % 2 == 0)
    assert set(one.keys) == {"key_0"}


def test_history_keeps_modes_and_organizations_apart(store: Any) -> None:
    """Test-mode events and other organizations never reach an organization's live history."""
    store.write(
        [
            charge(1, T),
            charge(2, T, mode="test"),
            charge(3, T, org="org_2"),
            Event("t1", T, "org_1", "live", "topup", "", "", 5_000_000, "", "", "s", (9, 0)),
        ]
    )
    found = history(store, "org_1", None, "live", date(2026, 1, 1), date(2026, 1, 2))
    assert (found.requests, found.topped_up) == (1, Decimal(5))
    assert history(store, "org_1", None, "test", date(2026, 1, 1), date(2026, 1, 2)).requests == 1


def test_events_come_back_in_time_order_page_by_page(store: Any) -> None:
    """events() pages through a period oldest first, each event once."""
    store.write([charge(i, T + (i * 7919) % 1000) for i in range(100)])
    listed = list(store.events(since=T, until=T + 1000, batch=9))
    assert len(listed) == 100
    assert [e.time for e in listed] == sorted(e.time for e in listed)
    assert len({e.id for e in listed}) == 100
    assert list(store.events(org="org_2")) == []


def test_concurrent_writers_insert_each_event_once(store_url: str) -> None:
    """Four threads writing the same events (each its own connection) insert each once."""
    ledger = store_from_url(store_url)
    events = [charge(i, T + i) for i in range(400)]
    inserted: list[int] = []
    lock = threading.Lock()

    def write(offset: int) -> None:
        n = 0
        for start in range(offset, 400, 50):
            n += ledger.write(events[start : start + 100])
        with lock:
            inserted.append(n)

    threads = [threading.Thread(target=write, args=(i * 10,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert ledger.count() == 400 - 0
        found = history(ledger, "org_1", None, "live", date(2026, 1, 1), date(2026, 1, 2))
        assert found.requests == 400
        assert sum(inserted) == 400
    finally:
        ledger.close()


@pytest.mark.parametrize(
    ("args", "bounds"),
    [
        (("2026-11",), (date(2026, 11, 1), date(2026, 12, 1))),
        (("2026-12",), (date(2026, 12, 1), date(2027, 1, 1))),
        (("2026-11-05",), (date(2026, 11, 5), date(2026, 11, 6))),
        ((None, "2026-11-01", date(2026, 11, 15)), (date(2026, 11, 1), date(2026, 11, 15))),
    ],
)
def test_periods(args: tuple[Any, ...], bounds: tuple[date, date]) -> None:
    """A month, a day, or a range with its end excluded."""
    assert period_bounds(*args) == bounds


@pytest.mark.parametrize(
    "args",
    [
        ("2026-13",),
        ("2026-02-30",),
        ("November",),
        (202611,),
        (None, "2026-11-01"),
        (None, "2026-11-02", "2026-11-01"),
        ("2026-11", "2026-11-01", "2026-11-02"),
        (None, "2026-11-01T00:00", "2026-11-02"),
    ],
)
def test_bad_periods_are_refused(args: tuple[Any, ...]) -> None:
    """A malformed or empty period raises InvalidRequestError."""
    with pytest.raises(InvalidRequestError):
        period_bounds(*args)


@pytest.mark.parametrize(
    "url", ["sqlite://ledger.db", "sqlite:///", "mysql://x/y", "ledger.db", "sqlite:///:memory:"]
)
def test_bad_store_urls_are_refused(url: str) -> None:
    """A URL that names no usable store raises ConfigurationError, without echoing it."""
    with pytest.raises(ConfigurationError):
        store_from_url(url)


def test_an_unreachable_postgresql_is_backend_unavailable() -> None:
    """A PostgreSQL that does not answer raises BackendUnavailable (and shows no password)."""
    from meterkit.errors import BackendUnavailable
    from tests._servers import free_port

    pytest.importorskip("psycopg")
    with pytest.raises(BackendUnavailable) as caught:
        store_from_url(f"postgresql://u:hunter2@127.0.0.1:{free_port()}/x")
    assert "hunter2" not in str(caught.value)
