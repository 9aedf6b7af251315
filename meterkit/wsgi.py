"""The WSGI middleware (``from meterkit.wsgi import MeterMiddleware``); it lives in
:mod:`meterkit.http.wsgi`, beside the gate it shells."""

from __future__ import annotations

from meterkit.http.wsgi import Admission, MeterMiddleware

__all__ = ["Admission", "MeterMiddleware"]
