"""Django's ``MIDDLEWARE`` class and view decorator (``"meterkit.django.MeterMiddleware"``,
``from meterkit.django import metered``); they live in :mod:`meterkit.http.django`, beside
the gate they shell."""

from __future__ import annotations

from meterkit.http.django import MeterMiddleware, metered

__all__ = ["MeterMiddleware", "metered"]
