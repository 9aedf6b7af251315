"""Prometheus metrics (``from meterkit.prometheus import PrometheusObserver``); it lives
in :mod:`meterkit.observe.prometheus`, beside the other observers. Needs the
``prometheus`` extra (``prometheus_client``)."""

from __future__ import annotations

from meterkit.observe.prometheus import LATENCY_BUCKETS, PrometheusObserver

__all__ = ["LATENCY_BUCKETS", "PrometheusObserver"]
