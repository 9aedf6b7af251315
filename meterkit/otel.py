"""OpenTelemetry spans and metrics (``from meterkit.otel import OTelObserver``); it lives
in :mod:`meterkit.observe.otel`, beside the other observers. Needs the ``otel`` extra
(``opentelemetry-api``)."""

from __future__ import annotations

from meterkit.observe.otel import OTelObserver

__all__ = ["OTelObserver"]
