"""OTelObserver: spans and metrics after the scripted sequence, through the SDK's
in-memory exporters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from meterkit import MemoryBackend, Meter
from meterkit.observe.events import Event
from meterkit.otel import OTelObserver
from tests.conftest import FakeClock
from tests.observe._script import EXPECTED, run_script, script_policy
from tests.observe.conftest import Scripted

# The OTel metric of each metric of EXPECTED, and its attributes in EXPECTED's order.
METRICS = {
    "decisions": (
        "meterkit.decisions",
        ("meterkit.operation", "meterkit.outcome", "meterkit.reason"),
    ),
    "tier_refusals": ("meterkit.tier.refusals", ("meterkit.operation", "meterkit.tier")),
    "degraded": ("meterkit.degraded", ("meterkit.operation",)),
    "shadow_denials": ("meterkit.shadow_denials", ("meterkit.operation", "meterkit.tier")),
    "backend_errors": ("meterkit.backend.errors", ("error.type",)),
    "refunds": ("meterkit.refunds", ("meterkit.operation",)),
    "replays": ("meterkit.replays", ("meterkit.operation",)),
    "latency_count": ("meterkit.backend.duration", ("meterkit.operation",)),
}


class Telemetry:
    """An SDK tracer and meter provider whose spans and metrics stay in memory."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def observer(self, **options: Any) -> OTelObserver:
        return OTelObserver(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider, **options
        )

    def points(self) -> dict[str, list[Any]]:
        """Every data point of meterkit's metrics, by metric name."""
        found: dict[str, list[Any]] = {}
        data = self.reader.get_metrics_data()
        if data is None:  # nothing was recorded
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                if scope.scope.name != "meterkit":
                    continue
                for metric in scope.metrics:
                    found[metric.name] = list(metric.data.data_points)
        return found

    def close(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    found = Telemetry()
    yield found
    found.close()


def by_metric(telemetry: Telemetry) -> dict[str, dict[tuple[str, ...], float]]:
    points = telemetry.points()
    result: dict[str, dict[tuple[str, ...], float]] = {}
    for metric, (name, order) in METRICS.items():
        series = {}
        for point in points.get(name, []):
            value = point.count if metric == "latency_count" else point.value
            series[tuple(str(point.attributes[a]) for a in order)] = value
        result[metric] = series
    return result


def test_every_metric_after_the_scripted_sequence(
    scripted: Scripted, clock: FakeClock, telemetry: Telemetry
) -> None:
    """The OTel metrics hold what the Prometheus ones do, on memory and on Redis."""
    meter, outage = scripted(telemetry.observer())
    run_script(meter, clock, outage)
    assert by_metric(telemetry) == EXPECTED


def test_a_span_per_backend_call(
    scripted: Scripted, clock: FakeClock, telemetry: Telemetry
) -> None:
    """Each check and refund is a span named for it, with the event's attributes; a
    failure sets the span's status to ERROR."""
    meter, outage = scripted(telemetry.observer())
    run_script(meter, clock, outage)
    spans = telemetry.spans.get_finished_spans()
    summary = [
        (
            span.name,
            span.attributes["meterkit.outcome"],
            span.attributes.get("meterkit.reason") or span.attributes.get("error.type"),
            span.attributes.get("meterkit.tier"),
        )
        for span in spans
    ]
    assert summary == [
        ("meterkit.check", "allowed", None, None),
        ("meterkit.check", "allowed", None, None),
        ("meterkit.check", "denied", "rate_limited", "key-burst"),
        ("meterkit.check", "denied", "insufficient_credits", "credits"),
        ("meterkit.check", "allowed", None, None),
        ("meterkit.check", "allowed", None, None),
        ("meterkit.check", "refused", "idempotency_key_reused", None),
        ("meterkit.refund", "refunded", None, None),
        ("meterkit.check", "error", "backend_unavailable", None),
        ("meterkit.check", "allowed", "backend_unavailable", None),
    ]
    first = dict(spans[0].attributes)
    assert first == {
        "meterkit.outcome": "allowed",
        "meterkit.operation": "items.list",
        "meterkit.org": "org_a",
        "meterkit.key": "key_1",
        "meterkit.mode": "live",
        "meterkit.status": 200,
        "meterkit.degraded": False,
        "meterkit.replayed": False,
    }
    assert spans[1].attributes["meterkit.shadow"] == ("trial",)
    assert spans[5].attributes["meterkit.replayed"] is True
    assert spans[3].attributes["meterkit.status"] == 402
    assert spans[8].status.status_code is StatusCode.ERROR
    assert spans[9].attributes["meterkit.degraded"] is True
    for span in spans:
        assert span.end_time is not None
        assert span.start_time is not None
        assert 0 <= span.end_time - span.start_time < 10**9


def test_checks_are_children_of_the_current_span(clock: FakeClock, telemetry: Telemetry) -> None:
    """A check's span hangs under the span current when it was made (the HTTP server's);
    a refusal made without the backend is an event on that span."""
    meter = Meter(script_policy(), MemoryBackend(clock=clock), on_decision=telemetry.observer())
    tracer = telemetry.tracer_provider.get_tracer("tests")
    with tracer.start_as_current_span("GET /items") as parent:
        meter.check("k", org="org_a", operation="items.list")
        meter.on_decision(Event("refused", None, "org_a", None, None, "not_found", None, 404, None))
    spans = {span.name: span for span in telemetry.spans.get_finished_spans()}
    check = spans["meterkit.check"]
    assert check.parent is not None
    assert check.parent.span_id == parent.get_span_context().span_id
    (event,) = spans["GET /items"].events
    assert event.name == "meterkit.refusal"
    assert dict(event.attributes or {}) == {
        "meterkit.outcome": "refused",
        "meterkit.org": "org_a",
        "meterkit.reason": "not_found",
        "meterkit.status": 404,
        "meterkit.degraded": False,
        "meterkit.replayed": False,
    }


def test_spans_or_metrics_can_be_left_out(clock: FakeClock, telemetry: Telemetry) -> None:
    """spans=False makes no span; metrics=False records no metric."""
    meter = Meter(
        script_policy(), MemoryBackend(clock=clock), on_decision=telemetry.observer(spans=False)
    )
    meter.check("k", org="org_a", operation="items.list")
    assert telemetry.spans.get_finished_spans() == ()
    assert "meterkit.decisions" in telemetry.points()
    other = Telemetry()
    try:
        meter = Meter(
            script_policy(), MemoryBackend(clock=clock), on_decision=other.observer(metrics=False)
        )
        meter.check("k", org="org_a", operation="items.list")
        assert len(other.spans.get_finished_spans()) == 1
        assert other.points() == {}
    finally:
        other.close()


def test_org_and_key_attributes_on_metrics_when_asked(
    clock: FakeClock, telemetry: Telemetry
) -> None:
    """Metric points name the organization and key only with org_attribute/key_attribute."""
    meter = Meter(
        script_policy(),
        MemoryBackend(clock=clock),
        on_decision=telemetry.observer(org_attribute=True, key_attribute=True),
    )
    meter.check("key_1", org="org_a", operation="items.list")
    (point,) = telemetry.points()["meterkit.decisions"]
    assert point.attributes["meterkit.org"] == "org_a"
    assert point.attributes["meterkit.key"] == "key_1"


def test_credit_alert_is_a_span_event_and_a_count(telemetry: Telemetry) -> None:
    """An alert adds to meterkit.credit_alerts by threshold, and is an event on the
    current span."""
    observer = telemetry.observer()
    tracer = telemetry.tracer_provider.get_tracer("tests")
    with tracer.start_as_current_span("request"):
        observer(Event("alert", "items.list", "org_a", "key_1", "live", "80%", None, 200, None))
    (point,) = telemetry.points()["meterkit.credit_alerts"]
    assert (point.value, dict(point.attributes)) == (1, {"meterkit.threshold": "80%"})
    (span,) = telemetry.spans.get_finished_spans()
    (event,) = span.events
    assert event.name == "meterkit.credit_alert"
    assert event.attributes is not None
    assert event.attributes["meterkit.threshold"] == "80%"
