"""Usage history on the ledger (issue 14): the API's usage/history and the overview's
90-day charts and tables, on memory and on Redis, with events drained into SQLite."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import pytest

import meterkit
from meterkit.admin import Admin
from meterkit.ledger import Drain, SqliteStore
from tests.admin.conftest import KINDS, SECRET, Stack, new_org
from tests.admin.test_dashboard import page, sign_in
from tests.conftest import FakeClock
from tests.http._serve import serve_asgi

DAY = 86_400.0


class Ledgered(Stack):
    """A served admin app whose meter has a ledger, and the drain that fills it."""

    drain: Any = None

    def drained(self) -> None:
        self.drain.run_once()


@pytest.fixture(params=KINDS)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Ledgered]:
    """A fresh app per test: a backend never goes back in time, and each test's
    traffic starts days before its clock."""
    clock = FakeClock(1_767_225_600.0 + 9.5 * DAY)  # 2026-01-10 12:00 UTC
    policy = meterkit.Policy.crane_ledger()
    store = SqliteStore(str(tmp_path_factory.mktemp("ledger") / "ledger.db"))
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        prefix, namespace = "mkh" + secrets.token_hex(4), "mkh" + secrets.token_hex(4)
        backend: Any = meterkit.backend_from_url(url, clock=clock, prefix=prefix, ledger=True)
        app_backend: Any = meterkit.async_backend_from_url(
            url, clock=clock, prefix=prefix, ledger=True
        )
        keys: Any = meterkit.RedisKeyStore.from_url(url, namespace=namespace, clock=clock)
        app_keys: Any = meterkit.AsyncRedisKeyStore.from_url(url, namespace=namespace, clock=clock)
        drain = Drain(backend, store, prefix=prefix)
    else:
        backend = app_backend = meterkit.MemoryBackend(clock=clock, ledger=True)
        app_keys = meterkit.AsyncMemoryKeyStore(clock=clock)
        keys = app_keys.sync
        drain = Drain(backend, store)
    app_meter = meterkit.AsyncMeter(policy, app_backend, ledger=store)
    admin = Admin(app_meter, app_keys, session_secret=SECRET, trusted_proxies=["127.0.0.1"])

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await admin(scope, receive, send)
            return
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await app_keys.aclose()
        if app_backend is not backend:
            await app_backend.aclose()
        await send({"type": "lifespan.shutdown.complete"})

    with serve_asgi(app) as url_served:
        served = Ledgered(
            request.param, url_served, admin, keys, meterkit.Meter(policy, backend), clock
        )
        served.drain = drain
        yield served
    drain.close()
    keys.close()
    store.close()


def traffic(stack: Ledgered, org: str, plan: list[tuple[int, str, int]]) -> None:
    """``(d, key, n)``: ``n`` invoices.list calls of ``key`` ``d`` days before the
    clock's day, oldest first (a backend's clock never goes back); then drained."""
    now = stack.clock.now
    for days_ago, key_id, calls in sorted(plan, key=lambda p: -p[0]):
        for i in range(calls):
            stack.clock.now = now - days_ago * DAY + i
            assert stack.meter.check(key_id, org=org, operation="invoices.list").allowed
    stack.clock.now = now
    stack.drained()


def test_history_reads_days_operations_and_keys_from_the_ledger(stack: Ledgered) -> None:
    """usage/history answers what the ledger holds over [since, until): per day, per
    operation, per key; a period or one key narrows it."""
    org = new_org()
    root, _ = stack.key(org, ["usage:read"])
    _, worker = stack.key(org, ["invoices:*"])
    _, other = stack.key(org, ["invoices:*"])
    traffic(stack, org, [(0, worker.id, 3), (2, worker.id, 2), (1, other.id, 1)])
    with stack.client(root) as client:
        url = f"/organizations/{org}/usage/history"
        span = client.get(url, params={"since": "2026-01-01", "until": "2026-01-11"}).json()
        month = client.get(url, params={"period": "2026-01"}).json()
        one = client.get(url, params={"period": "2026-01", "key": worker.id}).json()
    assert [(d["day"], d["requests"]) for d in span["days"]] == [
        ("2026-01-08", 2),
        ("2026-01-09", 1),
        ("2026-01-10", 3),
    ]
    assert span["requests"] == 6
    assert span["credits"] == "0.06"
    assert span["operations"] == {"invoices.list": {"requests": 6, "credits": "0.06"}}
    assert set(span["keys"]) == {worker.id, other.id}
    assert month["months"] == [{"month": "2026-01", "requests": 6, "credits": "0.06"}]
    assert one["requests"] == 5
    assert list(one["keys"]) == [worker.id]


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"since": "2026-01-01"},
        {"since": "2026-01-10", "until": "2026-01-01"},
        {"since": "2025-01-01", "until": "2026-01-03"},
        {"since": "yesterday", "until": "2026-01-03"},
        {"period": "2026-13"},
        {"period": "2026-01", "since": "2026-01-01", "until": "2026-01-02"},
        {"period": "x" * 1500},
    ],
)
def test_history_refuses_malformed_spans(stack: Ledgered, query: dict[str, str]) -> None:
    """No span, half of one, a reversed or over-long one, a malformed date or period,
    or a period with dates: 400 in the seed's shape."""
    org = new_org()
    root, _ = stack.key(org, ["usage:read"])
    with stack.client(root) as client:
        answer = client.get(f"/organizations/{org}/usage/history", params=query)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "invalid_request"


def test_the_overview_draws_ninety_days_from_the_ledger(stack: Ledgered) -> None:
    """With a ledger, the overview draws a bar per day with usage for requests and for
    credits over the last 90 days, a burn-down point per day of the month so far, and
    the 90-day tables per operation and key."""
    org = new_org()
    root, _ = stack.key(org)
    _, worker = stack.key(org, ["invoices:*"], name="worker")
    traffic(stack, org, [(d, worker.id, n) for d, n in ((0, 2), (3, 1), (40, 4), (89, 1), (95, 7))])
    client, _ = sign_in(stack, root)
    with closing(client):
        text = page(client, f"/dashboard/organizations/{org}").text
    requests = re.search(r'<svg class="chart chart-requests".*?</svg>', text, re.S)
    credits = re.search(r'<svg class="chart chart-credits".*?</svg>', text, re.S)
    assert requests is not None
    assert credits is not None
    assert requests.group(0).count('class="bar"') == 4  # day 95 is outside the 90
    assert credits.group(0).count('class="bar"') == 4
    assert "history-unavailable" not in text
    burn = re.search(r'<svg class="chart chart-burndown".*?</svg>', text, re.S)
    assert burn is not None
    assert burn.group(0).count('class="point"') == 10  # Jan 1 .. Jan 10
    assert 'class="history-per-key"' in text
    assert re.search(r"history-per-operation.*?invoices\.list.*?>8<", text, re.S)
