"""OpenTelemetry spans and metrics of a meter and its HTTP gate: :class:`OTelObserver`.

Pass one as ``on_decision``. It uses the OpenTelemetry API only (the ``otel`` extra,
``opentelemetry-api``): spans and metrics go wherever the application's SDK sends
them, and nowhere when none is installed.

**Spans.** Each call to the backend (a check, a refund, one that failed) is a span,
``meterkit.check`` or ``meterkit.refund``, a child of the span current when it was
made (the HTTP server's, under an instrumented framework), timed by the backend's
answer. A refusal made without the backend (the HTTP gate's 401, 404, …) and a credit
alert are span events (``meterkit.refusal``, ``meterkit.credit_alert``) on the current
span, as they take no time of their own. Attributes, in the semantic conventions'
style:

``meterkit.operation``, ``meterkit.outcome``, ``meterkit.reason``, ``meterkit.tier``,
``meterkit.org``, ``meterkit.key`` (the key's id), ``meterkit.mode``,
``meterkit.status`` (the HTTP status it answers to), ``meterkit.degraded``,
``meterkit.replayed``, ``meterkit.shadow`` (the shadow tiers that said no),
``meterkit.threshold`` (an alert's) and ``error.type`` (a failure's kind); an
attribute without a value is left out. A backend failure sets the span's status to
ERROR.

**Metrics**, the same as :mod:`meterkit.observe.prometheus`'s, through the OTel
metrics API: counters ``meterkit.decisions``, ``meterkit.tier.refusals``,
``meterkit.degraded``, ``meterkit.shadow_denials``, ``meterkit.backend.errors``,
``meterkit.refunds``, ``meterkit.replays``, ``meterkit.credit_alerts`` and the
histogram ``meterkit.backend.duration`` (seconds). Their attributes are the span's
``meterkit.operation``, ``meterkit.outcome``, ``meterkit.reason``, ``meterkit.tier``,
``meterkit.threshold`` and ``error.type``, as each applies; ``meterkit.org`` and
``meterkit.key`` only with ``org_attribute=True`` / ``key_attribute=True``
(a time series per organization or key).
"""

from __future__ import annotations

import time
from typing import Any

from meterkit.observe.events import (
    ALERT,
    DECIDED,
    DENIED,
    ERROR,
    LATENCY_BUCKETS,
    REFUNDED,
    Event,
)

try:
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "meterkit.otel needs opentelemetry-api: pip install 'meterkit[otel]'"
    ) from exc

__all__ = ["OTelObserver"]

_SCOPE = "meterkit"


def _version() -> str:
    from meterkit import __version__

    return __version__


class OTelObserver:
    """Report every event of a meter (and of HTTP gates over it) as OpenTelemetry spans
    and metrics (see the module's docstring for their names and attributes).

    ``tracer_provider`` and ``meter_provider`` default to the global ones;
    ``spans=False`` or ``metrics=False`` leaves either out.
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: otel_metrics.MeterProvider | None = None,
        spans: bool = True,
        metrics: bool = True,
        org_attribute: bool = False,
        key_attribute: bool = False,
    ) -> None:
        version = _version()
        self._tracer = trace.get_tracer(_SCOPE, version, tracer_provider) if spans else None
        self._metrics = metrics
        self._org = org_attribute
        self._key = key_attribute
        meter = otel_metrics.get_meter(_SCOPE, version, meter_provider)
        self._decisions = meter.create_counter(
            "meterkit.decisions", "{request}", "Requests decided by meterkit."
        )
        self._tier_refusals = meter.create_counter(
            "meterkit.tier.refusals",
            "{request}",
            "Requests denied, by the tier that denied them ('credits' for a 402).",
        )
        self._duration = meter.create_histogram(
            "meterkit.backend.duration",
            "s",
            "Seconds the backend took to answer a check (or a refund).",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        self._degraded = meter.create_counter(
            "meterkit.degraded",
            "{request}",
            "Requests admitted without the backend, which was unavailable (fail-open).",
        )
        self._shadow = meter.create_counter(
            "meterkit.shadow_denials",
            "{request}",
            "Requests that a shadow tier (or shadow credits) would have denied.",
        )
        self._errors = meter.create_counter(
            "meterkit.backend.errors", "{error}", "Backend failures, by kind."
        )
        self._refunds = meter.create_counter(
            "meterkit.refunds", "{request}", "Admitted requests whose credits were given back."
        )
        self._replays = meter.create_counter(
            "meterkit.replays",
            "{request}",
            "Idempotent retries answered with the first decision.",
        )
        self._alerts = meter.create_counter(
            "meterkit.credit_alerts",
            "{alert}",
            "Organizations whose credit usage crossed an alert threshold.",
        )

    def __repr__(self) -> str:
        return f"OTelObserver(spans={self._tracer is not None}, metrics={self._metrics})"

    def __call__(self, event: Event) -> None:
        if self._tracer is not None:
            self._trace(event)
        if self._metrics:
            self._count(event)

    def _trace(self, event: Event) -> None:
        attributes = span_attributes(event)
        outcome = event.outcome
        latency = event.latency
        if latency is None:
            current = trace.get_current_span()
            if current.is_recording():
                name = "meterkit.credit_alert" if outcome == ALERT else "meterkit.refusal"
                current.add_event(name, attributes)
            return
        assert self._tracer is not None
        end = time.time_ns()
        span = self._tracer.start_span(
            "meterkit.refund" if outcome == REFUNDED else "meterkit.check",
            start_time=end - round(latency * 1e9),
            attributes=attributes,
        )
        if outcome == ERROR:
            span.set_status(Status(StatusCode.ERROR, event.reason))
        span.end(end_time=end)

    def _count(self, event: Event) -> None:
        outcome = event.outcome
        op = {"meterkit.operation": event.operation or ""}
        who: dict[str, str] = {}
        if self._org and event.org is not None:
            who["meterkit.org"] = event.org
        if self._key and event.key is not None:
            who["meterkit.key"] = event.key
        if outcome in DECIDED:
            self._decisions.add(
                1,
                {**op, "meterkit.outcome": outcome, "meterkit.reason": event.reason or "", **who},
            )
            if outcome == DENIED:
                self._tier_refusals.add(1, {**op, "meterkit.tier": event.tier or "", **who})
            elif outcome == ERROR:
                self._errors.add(1, {"error.type": event.reason or ""})
        elif outcome == REFUNDED:
            self._refunds.add(1, op)
        elif outcome == ALERT:
            self._alerts.add(1, {"meterkit.threshold": event.reason or "", **who})
        if event.latency is not None:
            self._duration.record(event.latency, op)
        if event.degraded:
            self._degraded.add(1, op)
            self._errors.add(1, {"error.type": event.reason or ""})
        for tier in event.shadow:
            self._shadow.add(1, {**op, "meterkit.tier": tier})
        if event.replayed and outcome != REFUNDED:
            self._replays.add(1, op)


def span_attributes(event: Event) -> dict[str, Any]:
    """The span (or span event) attributes of ``event``: every field that has a value."""
    attributes: dict[str, Any] = {"meterkit.outcome": event.outcome}
    for name, value in (
        ("meterkit.operation", event.operation),
        ("meterkit.org", event.org),
        ("meterkit.key", event.key),
        ("meterkit.mode", event.mode),
        ("meterkit.tier", event.tier),
    ):
        if value is not None:
            attributes[name] = value
    if event.reason is not None:
        kind = {ERROR: "error.type", ALERT: "meterkit.threshold"}.get(event.outcome)
        attributes["meterkit.reason" if kind is None else kind] = event.reason
        if event.degraded:
            attributes["error.type"] = event.reason
    attributes["meterkit.status"] = event.status
    attributes["meterkit.degraded"] = event.degraded
    attributes["meterkit.replayed"] = event.replayed
    if event.shadow:
        attributes["meterkit.shadow"] = list(event.shadow)
    return attributes
