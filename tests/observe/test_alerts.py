"""Credit alerts as observers see them: exactly one per threshold however many processes
cross it together, the observers' counts, and the webhook sender against a real HTTP
server."""

from __future__ import annotations

import json
import logging
import multiprocessing
import threading
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from meterkit import (
    Category,
    ConfigurationError,
    CostTable,
    CreditPlan,
    MemoryBackend,
    Meter,
    Operation,
    Policy,
)
from meterkit.observe import Event, LogObserver, WebhookAlerts
from meterkit.observe.webhook import SIGNATURE_HEADER, sign, verify
from meterkit.prometheus import PrometheusObserver
from tests import _servers
from tests.conftest import FakeClock

MID_JANUARY = 1_768_478_400.0  # 2026-01-15T12:00:00Z
SECRET = "whsec_test"


def alert_policy(alerts: tuple[str, ...] = ("80%", "100%")) -> Policy:
    """10 credits a month; a read costs 0.01."""
    costs = CostTable(
        (Category("read", "0.01", "1"),),
        (Operation("items.list", "read", "0.01"),),
    )
    return Policy([], costs, CreditPlan("10", alerts=alerts))


# -- exactly once, however many cross together --------------------------------------------


def _crossing_worker(url: str, prefix: str, barrier: Any, results: Any, checks: int) -> None:
    """One process: wait for the others, check ``checks`` times, report its alerts."""
    from meterkit.backends.redis.backend import RedisBackend
    from meterkit.connect import redis_client

    alerts: list[str] = []

    def collect(event: Event) -> None:
        if event.outcome == "alert":
            alerts.append(event.reason or "")

    client = redis_client(url)
    backend = RedisBackend(client, prefix=prefix, clock=lambda: MID_JANUARY)
    meter = Meter(alert_policy(), backend, on_decision=collect)
    barrier.wait(30)
    for _ in range(checks):
        meter.check("key_1", org="org_a", operation="items.list")
    client.close()
    results.put(alerts)


def test_four_processes_crossing_80_percent_together_report_one_alert() -> None:
    """Four processes checking one organization at once on Redis, across 80% of its
    credits: the atomic step lets exactly one of them see the crossing."""
    if _servers.redis_binary() is None:
        pytest.skip("no redis-server binary on PATH")
    from meterkit.backends.redis.backend import RedisBackend
    from meterkit.connect import redis_client

    context = multiprocessing.get_context("spawn")
    with _servers.standalone() as server:
        client = redis_client(server.url)
        setup = Meter(alert_policy(), RedisBackend(client, prefix="mk", clock=lambda: MID_JANUARY))
        # 7.90 of 10 used: the next eleven reads cross 80%
        setup.check("key_0", org="org_a", operation="items.list", cost="7.9")
        barrier, results = context.Barrier(4), context.Queue()
        workers = [
            context.Process(target=_crossing_worker, args=(server.url, "mk", barrier, results, 10))
            for _ in range(4)
        ]
        for worker in workers:
            worker.start()
        found = [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(30)
        assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]
        used = setup.usage("org_a").credits_used
        client.close()
    assert sorted(a for alerts in found for a in alerts) == ["80%"]
    assert used == Decimal("8.3")  # every check was admitted: 7.90 + 40 x 0.01


def test_four_threads_crossing_80_percent_together_report_one_alert() -> None:
    """The same on the memory backend, with four threads of one process."""
    alerts: list[str] = []
    lock = threading.Lock()

    def collect(event: Event) -> None:
        if event.outcome == "alert":
            with lock:
                alerts.append(event.reason or "")

    meter = Meter(alert_policy(), MemoryBackend(clock=FakeClock(MID_JANUARY)), on_decision=collect)
    meter.check("key_0", org="org_a", operation="items.list", cost="7.9")
    barrier = threading.Barrier(4)

    def run() -> None:
        barrier.wait(30)
        for _ in range(60):
            meter.check("key_1", org="org_a", operation="items.list")

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert alerts == ["80%", "100%"]  # 7.90 + 240 x 0.01 > 10: 100% is reached too


# -- what observers make of them ------------------------------------------------------------


def test_alerts_reach_every_observer(caplog: pytest.LogCaptureFixture) -> None:
    """An alert is an event after its check's, counted by Prometheus by threshold and
    logged at WARNING."""
    events: list[Event] = []
    registry = CollectorRegistry()
    meter = Meter(
        alert_policy(),
        MemoryBackend(clock=FakeClock(MID_JANUARY)),
        on_decision=[events.append, PrometheusObserver(registry), LogObserver()],
    )
    with caplog.at_level(logging.WARNING, logger="meterkit"):
        meter.check("key_1", org="org_a", operation="items.list", cost="8")
    assert [(e.outcome, e.reason) for e in events] == [("allowed", None), ("alert", "80%")]
    alert = events[1]
    assert (alert.org, alert.key, alert.mode, alert.operation) == (
        "org_a",
        "key_1",
        "live",
        "items.list",
    )
    assert alert.decision is events[0].decision
    value = registry.get_sample_value("meterkit_credit_alerts_total", {"threshold": "80%"})
    assert value == 1
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("meterkit alert operation=items.list org=org_a key=key_1")
    assert "reason=80%" in line


def test_alerts_of_a_batch_are_reported() -> None:
    """check_many reports the alerts its requests reach."""
    events: list[Event] = []
    meter = Meter(
        alert_policy(), MemoryBackend(clock=FakeClock(MID_JANUARY)), on_decision=events.append
    )
    meter.check_many(
        [("k", "items.list", "org_a", None, "5"), ("k", "items.list", "org_a", None, "5")]
    )
    assert [e.reason for e in events if e.outcome == "alert"] == ["80%", "100%"]


# -- the webhook -------------------------------------------------------------------------------


class Receiver:
    """A local HTTP server that answers each POST with the next status of ``answers``
    (200 once they run out), and keeps what it received."""

    def __init__(self, answers: list[int]) -> None:
        self.answers = list(answers)
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                status = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/meterkit"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def meter_to() -> Iterator[Any]:
    """``meter_to(hook)``: a meter on the alert policy that reports to ``hook``; each
    hook is closed at the end."""
    hooks: list[WebhookAlerts] = []

    def make(hook: WebhookAlerts) -> Meter:
        hooks.append(hook)
        return Meter(alert_policy(), MemoryBackend(clock=FakeClock(MID_JANUARY)), on_decision=hook)

    yield make
    for hook in hooks:
        hook.close(10)


def test_the_webhook_delivers_a_signed_alert_after_failures(meter_to: Any) -> None:
    """Answered 503 then 500, the sender tries again and delivers on the third attempt:
    every attempt carries the same id and a signature the receiver verifies."""
    with Receiver([503, 500]) as receiver:
        hook = WebhookAlerts(receiver.url, secret=SECRET, backoff=0)
        meter = meter_to(hook)
        decision = meter.check("key_1", org="org_a", operation="items.list", cost="8.5")
        assert decision.alerts == ("80%",)
        assert hook.flush(30)
    assert (hook.sent, hook.failed, len(receiver.received)) == (1, 0, 3)
    bodies = {body for _, body in receiver.received}
    assert len(bodies) == 1
    (body,) = bodies
    data = json.loads(body)
    assert data == {
        "type": "meterkit.credit_alert",
        "id": data["id"],
        "org": "org_a",
        "mode": "live",
        "threshold": "80%",
        "credits_left": "1.5",
        "period_start": "2026-01-01T00:00:00Z",
        "period_end": "2026-02-01T00:00:00Z",
        "at": "2026-01-15T12:00:00Z",
        "operation": "items.list",
        "key": "key_1",
    }
    for headers, sent in receiver.received:
        assert headers["Meterkit-Event-Id"] == data["id"]
        assert verify(SECRET, sent, headers[SIGNATURE_HEADER])
        assert not verify("another secret", sent, headers[SIGNATURE_HEADER])
        assert not verify(SECRET, sent + b" ", headers[SIGNATURE_HEADER])


def test_the_webhook_sends_only_alerts_and_each_once(meter_to: Any) -> None:
    """Checks that reach no threshold send nothing; two thresholds are two POSTs with
    different ids."""
    with Receiver([]) as receiver:
        hook = WebhookAlerts(receiver.url, secret=SECRET, backoff=0)
        meter = meter_to(hook)
        for _ in range(3):
            meter.check("key_1", org="org_a", operation="items.list")
        meter.check("key_1", org="org_a", operation="items.list", cost="9.97")
        assert hook.flush(30)
    thresholds = [json.loads(body)["threshold"] for _, body in receiver.received]
    assert thresholds == ["80%", "100%"]
    assert len({json.loads(body)["id"] for _, body in receiver.received}) == 2


def test_a_refusing_receiver_is_not_retried(
    meter_to: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A 4xx other than 408 and 429 is final: one attempt, logged as an error."""
    with Receiver([401]) as receiver, caplog.at_level(logging.WARNING, logger="meterkit"):
        hook = WebhookAlerts(receiver.url, secret=SECRET, backoff=0)
        meter_to(hook).check("key_1", org="org_a", operation="items.list", cost="8")
        assert hook.flush(30)
    assert (len(receiver.received), hook.sent, hook.failed) == (1, 0, 1)
    assert any(
        "refused credit alert" in r.getMessage() and "401" in r.getMessage() for r in caplog.records
    )


def test_an_unreachable_receiver_is_given_up_after_the_retries(
    meter_to: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing listening: each attempt fails, and after ``retries`` more the alert is
    given up and logged; the check itself was answered at once."""
    port = _servers.free_port()
    hook = WebhookAlerts(f"http://127.0.0.1:{port}/", secret=SECRET, retries=2, backoff=0)
    with caplog.at_level(logging.WARNING, logger="meterkit"):
        decision = meter_to(hook).check("key_1", org="org_a", operation="items.list", cost="8")
        assert decision.allowed
        assert hook.flush(30)
    assert (hook.sent, hook.failed) == (0, 1)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("failed:" in m for m in messages) == 3
    assert any("gave up" in m and "after 3 attempts" in m for m in messages)


def test_signatures_expire() -> None:
    """A signature older (or newer) than the tolerance does not verify."""
    body = b'{"a":1}'
    header = sign(SECRET, body, 1_000_000)
    assert verify(SECRET, body, header, now=1_000_100)
    assert not verify(SECRET, body, header, now=1_000_301)
    assert not verify(SECRET, body, "t=x,v1=00")
    assert not verify(SECRET, body, "nonsense")


@pytest.mark.parametrize(
    ("options", "where"),
    [
        ({"url": "ftp://example.test/"}, "url"),
        ({"url": "not a url"}, "url"),
        ({"secret": ""}, "secret"),
        ({"retries": -1}, "retries"),
        ({"timeout": 0}, "timeout"),
        ({"backoff": "1"}, "backoff"),
    ],
)
def test_bad_webhook_options_are_refused(options: dict[str, Any], where: str) -> None:
    """A bad URL, an empty secret or a negative number is refused when made."""
    arguments: dict[str, Any] = {"url": "https://example.test/hook", "secret": SECRET, **options}
    url = arguments.pop("url")
    with pytest.raises(ConfigurationError) as caught:
        WebhookAlerts(url, **arguments)
    assert caught.value.location == where
