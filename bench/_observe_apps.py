"""The servers of ``bench/bench_observe.py``'s request under uvicorn: one FastAPI route
behind meterkit's ASGI middleware (the seed's policy, in memory), without observers and
with a :class:`~meterkit.prometheus.PrometheusObserver` (default labels), whose
``/metrics`` is served and left out of metering, as a user would.

Each factory makes ``KEYS`` API keys in ``KEYS // KEYS_PER_ORG`` organizations and
writes them, one ``org token`` pair a line, to the file ``METERKIT_BENCH_KEYS`` names,
for wrk to send.
"""

# (No `from __future__ import annotations`: FastAPI reads the handler's annotations.)
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

import meterkit

__all__ = ["KEYS", "KEYS_PER_ORG", "meterkit_plain", "meterkit_prometheus"]

#: Enough keys that none reaches 100/minute or 1000/hour in a run (wrk cycles through all).
KEYS = int(os.environ.get("METERKIT_BENCH_HTTP_KEYS", "4000"))
KEYS_PER_ORG = 10
ROUTE = "/organizations/{organization_id}/invoices"
ROUTES = {f"GET {ROUTE}": "invoices.list"}
BODY: dict[str, Any] = {"data": [], "count": 0}


def _app(observers: Any, metrics: Any = None) -> Any:
    from meterkit.asgi import MeterMiddleware

    store = meterkit.MemoryKeyStore()
    lines = []
    for number in range(KEYS):
        org = f"org_{number // KEYS_PER_ORG:04d}"
        plaintext, _ = store.create(org=org, permissions=["invoices:read"])
        lines.append(f"{org} {plaintext}\n")
    app = FastAPI()

    async def list_invoices(organization_id: str, request: Request) -> dict[str, Any]:
        return BODY

    app.get(ROUTE)(list_invoices)
    if metrics is not None:
        app.mount("/metrics", metrics)
    meter = meterkit.Meter(
        meterkit.Policy.crane_ledger(), meterkit.MemoryBackend(), on_decision=observers
    )
    wrapped = MeterMiddleware(app, meter=meter, keystore=store, routes=ROUTES, exclude=["/metrics"])
    path = Path(os.environ["METERKIT_BENCH_KEYS"])
    partial = path.with_suffix(".part")
    partial.write_text("".join(lines), encoding="utf-8")
    partial.rename(path)  # the driver waits for the whole file
    return wrapped


def meterkit_plain() -> Any:
    """The route behind meterkit, without observers."""
    return _app(None)


def meterkit_prometheus() -> Any:
    """The same, reporting to a PrometheusObserver (default labels) served at /metrics."""
    from prometheus_client import CollectorRegistry, make_asgi_app

    from meterkit.prometheus import PrometheusObserver

    registry = CollectorRegistry()
    return _app(PrometheusObserver(registry), make_asgi_app(registry))
