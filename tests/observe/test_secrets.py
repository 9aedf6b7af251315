"""No API-key plaintext reaches an event, a metric label, a span attribute or a log line,
wherever a request puts one."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest

import meterkit
from meterkit.errors import MeterkitError, looks_like_secret
from meterkit.http.gate import Gate, RequestView
from meterkit.keys.memory import MemoryKeyStore
from meterkit.observe import Event, LogObserver
from meterkit.otel import OTelObserver
from meterkit.prometheus import PrometheusObserver
from tests.conftest import FakeClock

CLOCK = FakeClock()
STORE = MemoryKeyStore(clock=CLOCK)
#: Real keys' plaintexts: of the organization the requests name, of another, a test key.
REAL = [
    str(STORE.create(org="org_a", permissions=["*"])[0]),
    str(STORE.create(org="org_b", permissions=["*"])[0]),
    str(STORE.create(org="org_a", permissions=["invoices:read"], mode="test")[0]),
]

# Real plaintexts, and made-up ones of their shape and length (a plaintext is longer
# than a key id: the meter takes a short id of that shape for one, see meter._SHORT_ID).
secrets_ = st.one_of(
    st.sampled_from(REAL),
    st.from_regex(r"[a-z][a-z0-9]{0,6}_(live|test)_[0-9A-Za-z]{20,50}", fullmatch=True),
)

# Where a request (or a caller of the meter) can put a plaintext.
PLACES = (
    "bearer",
    "path_org",
    "header_org",
    "unknown_path",
    "idempotency_key",
    "caller_header",
    "check_key",
    "check_org",
    "check_idempotency_key",
)


class Capture(logging.Handler):
    """Every record of the meterkit logger, as text: message, fields and traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(record.getMessage())
        self.texts.append(repr(getattr(record, "meterkit", None)))
        if record.exc_info:
            self.texts.append(logging.Formatter().formatException(record.exc_info))


class World:
    """A gate over a meter with every observer, each leaving its output in one place."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.registry = CollectorRegistry()
        self.spans = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.provider = provider
        levels = dict.fromkeys(
            ("allowed", "denied", "refused", "error", "degraded", "refunded", "alert"),
            logging.INFO,
        )
        self.meter = meterkit.Meter(
            meterkit.Policy.crane_ledger(),
            meterkit.MemoryBackend(clock=CLOCK),
            on_decision=[
                self.events.append,
                PrometheusObserver(self.registry, org_label=True, key_label=True),
                OTelObserver(tracer_provider=provider, org_attribute=True, key_attribute=True),
                LogObserver(levels=levels),
            ],
        )
        self.gate = Gate(self.meter, STORE)
        self.by_header = Gate(
            self.meter, STORE, org="header:x-org", caller={"*": "header:x-caller"}
        )

    def request(self, place: str, secret: str) -> None:
        good = f"Bearer {REAL[0]}"
        headers = {"authorization": good}
        gate, path = self.gate, "/organizations/org_a/invoices"
        if place == "bearer":
            headers["authorization"] = f"Bearer {secret}"
        elif place == "path_org":
            path = f"/organizations/{secret}/invoices"
        elif place == "header_org":
            gate, headers = self.by_header, {"x-org": secret, "x-caller": "caller_1"}
        elif place == "unknown_path":
            path = f"/organizations/org_a/{secret}/x"
        elif place == "idempotency_key":
            headers["idempotency-key"] = secret
        elif place == "caller_header":
            gate, headers = self.by_header, {"x-org": "org_a", "x-caller": secret}
        else:
            what = place.removeprefix("check_")
            arguments: dict[str, Any] = {"key": "key_1", "org": "org_a", what: secret}
            key = arguments.pop("key")
            with contextlib.suppress(MeterkitError):
                self.meter.check(key, operation="invoices.list", **arguments)
            return
        for method in ("GET", "POST"):
            gate.admit_blocking(RequestView(method, path, headers=headers))

    def output(self) -> str:
        spans = self.spans.get_finished_spans()
        parts = [repr(e) for e in self.events]
        parts += [repr(e.to_dict()) for e in self.events]
        parts.append(generate_latest(self.registry).decode())
        for span in spans:
            parts.append(span.name)
            parts.append(repr(dict(span.attributes or {})))
            parts += [repr(dict(event.attributes or {})) for event in span.events]
        return "\n".join(parts)


@given(st.lists(st.tuples(st.sampled_from(PLACES), secrets_), min_size=1, max_size=6))
def test_no_plaintext_in_any_output(requests: list[tuple[str, str]]) -> None:
    """Plaintext keys fed as bearer tokens, organizations (path and header), unknown
    paths, idempotency keys, callers, and the meter's own arguments appear in no event,
    Prometheus sample, span, span event or log line."""
    world = World()
    capture = Capture()
    logger = logging.getLogger("meterkit")
    logger.addHandler(capture)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        for place, secret in requests:
            world.request(place, secret)
    finally:
        logger.removeHandler(capture)
        logger.setLevel(level)
        world.provider.shutdown()
    text = world.output() + "\n".join(capture.texts)
    if any(not place.startswith("check_") for place, _ in requests):
        assert world.events, "nothing was observed: the test would prove nothing"
    for _, secret in requests:
        assert secret not in text
    assert not looks_like_secret(text)


def test_the_scan_finds_a_plaintext_that_leaks() -> None:
    """The scan above fails on an output that holds a plaintext (it can fail)."""
    world = World()
    world.meter.on_decision[0](  # type: ignore[index]
        Event("refused", None, REAL[0], None, None, "x", None, 400, None)
    )
    assert REAL[0] in world.output()
    assert looks_like_secret(world.output())


@pytest.mark.parametrize("place", PLACES)
def test_every_place_is_observed(place: str) -> None:
    """Each place a plaintext is fed reaches the observers (an event or a log line), so
    the property above tests every one of them."""
    world = World()
    world.request(place, REAL[1])
    if place.startswith("check_"):
        # refused before any backend: the meter raises, and no event is made
        assert world.events == []
    else:
        assert world.events
