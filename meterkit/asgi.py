"""The ASGI middleware (``from meterkit.asgi import MeterMiddleware``); it lives in
:mod:`meterkit.http.asgi`, beside the gate it shells."""

from __future__ import annotations

from meterkit.http.asgi import Admission, MeterMiddleware

__all__ = ["Admission", "MeterMiddleware"]
