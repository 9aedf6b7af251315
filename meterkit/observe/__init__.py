"""Observability: what happens to each request, for logs, metrics and traces.

A meter made with ``on_decision=`` hands every decision, refusal, degraded admission,
refund, backend error and credit alert to its observers as an :class:`Event`
(:mod:`meterkit.observe.events`); HTTP gates over it add their own refusals. The
observers that come with meterkit: :class:`LogObserver` (structured log lines),
:class:`Background` (a slow observer on a thread of its own), :class:`WebhookAlerts`
(credit alerts to a signed webhook),
:class:`~meterkit.prometheus.PrometheusObserver` and
:class:`~meterkit.otel.OTelObserver` (each in its optional extra).
"""

from __future__ import annotations

from meterkit.observe.background import Background
from meterkit.observe.events import OUTCOMES, Event, Observer
from meterkit.observe.logs import LogObserver
from meterkit.observe.webhook import WebhookAlerts

__all__ = ["OUTCOMES", "Background", "Event", "LogObserver", "Observer", "WebhookAlerts"]
