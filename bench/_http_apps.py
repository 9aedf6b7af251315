"""The servers of ``bench/bench_http.py``: one small API, bare and behind each limiter.

Every app serves ``GET /organizations/{organization_id}/invoices`` with the same
small JSON body, and differs only in what stands in front of the handler:

- ``fastapi_bare`` / ``flask_bare``: nothing;
- ``fastapi_slowapi`` / ``flask_limiter``: the peer, holding the seed's three limits
  (1000/hour and 100/minute per API key, 10000/hour per organization) as its docs
  show: decorators on the route, in-memory storage, key functions reading the
  ``Authorization`` header and the path's organization;
- ``fastapi_meterkit`` / ``flask_meterkit``: meterkit's ASGI or WSGI middleware with
  the seed's policy (key authentication, the three tiers, the credit debit, the
  headers), in memory, or on Redis when ``METERKIT_BENCH_REDIS`` is a URL;
  ``fastapi_meterkit_prometheus`` the same, reporting to a Prometheus observer;
  ``METERKIT_BENCH_HEADERS`` (groups, comma-separated) sets the meterkit sides'
  ``headers=`` (every group by default).

Each factory makes ``KEYS`` API keys in ``KEYS // KEYS_PER_ORG`` organizations and
writes them, one ``org token`` pair a line, to the file ``METERKIT_BENCH_KEYS`` names,
for wrk to send (the peers' keys are well formed too; they do not check them).
"""

# (No `from __future__ import annotations`: FastAPI reads the handler's annotations.)
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

import meterkit

__all__ = [
    "KEYS",
    "KEYS_PER_ORG",
    "fastapi_bare",
    "fastapi_meterkit",
    "fastapi_meterkit_prometheus",
    "fastapi_slowapi",
    "flask_bare",
    "flask_limiter",
    "flask_meterkit",
]

#: Enough keys that none reaches 100/minute or 1000/hour in a run: wrk cycles through
#: them all (see bench_http.py). ``METERKIT_BENCH_HTTP_KEYS`` sets another count.
KEYS = int(os.environ.get("METERKIT_BENCH_HTTP_KEYS", "4000"))
KEYS_PER_ORG = 10
ROUTE = "/organizations/{organization_id}/invoices"
#: meterkit's route table: the app's one route (the seed's table names routes this app
#: does not serve, which the middleware refuses at start-up).
ROUTES = {f"GET {ROUTE}": "invoices.list"}
BODY: dict[str, Any] = {"data": [], "count": 0}


def _write_keys(store: Any) -> None:
    """Make the keys in ``store`` (any meterkit key store) and write them for wrk."""
    lines = []
    for number in range(KEYS):
        org = f"org_{number // KEYS_PER_ORG:04d}"
        plaintext, _ = store.create(org=org, permissions=["invoices:read"])
        lines.append(f"{org} {plaintext}\n")
    path = Path(os.environ["METERKIT_BENCH_KEYS"])
    partial = path.with_suffix(".part")
    partial.write_text("".join(lines), encoding="utf-8")
    partial.rename(path)  # the driver waits for the whole file


def _api_key(authorization: str | None) -> str:
    # What a slowapi or Flask-Limiter user writes: the bearer token as the limit's key.
    return (authorization or "").removeprefix("Bearer ")


# -- FastAPI under uvicorn ---------------------------------------------------------------------


def _fastapi(decorate: Any = None) -> Any:
    app = FastAPI()

    async def list_invoices(organization_id: str, request: Request) -> dict[str, Any]:
        return BODY

    handler = list_invoices if decorate is None else decorate(list_invoices)
    app.get(ROUTE)(handler)
    return app


def fastapi_bare() -> Any:
    _write_keys(meterkit.MemoryKeyStore())
    return _fastapi()


def fastapi_slowapi() -> Any:
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded

    def api_key(request: Request) -> str:
        return _api_key(request.headers.get("authorization"))

    def organization(request: Request) -> str:
        return str(request.path_params["organization_id"])

    limiter = Limiter(key_func=api_key, storage_uri="memory://")

    def decorate(handler: Any) -> Any:
        per_key = limiter.limit("1000/hour;100/minute")
        per_org = limiter.limit("10000/hour", key_func=organization)
        return per_org(per_key(handler))

    _write_keys(meterkit.MemoryKeyStore())
    app = _fastapi(decorate)
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
    return app


def fastapi_meterkit(observers: Any = None) -> Any:
    from meterkit.asgi import MeterMiddleware

    policy = meterkit.Policy.crane_ledger()
    url = os.environ.get("METERKIT_BENCH_REDIS")
    if url:
        maker = meterkit.keystore_from_url(url)
        try:
            _write_keys(maker)
        finally:
            maker.close()
        backend: Any = meterkit.async_backend_from_url(url)
        keystore: Any = meterkit.async_keystore_from_url(url)
    else:
        backend = meterkit.MemoryBackend()
        keystore = meterkit.AsyncMemoryKeyStore()
        _write_keys(keystore.sync)
    meter = meterkit.AsyncMeter(policy, backend, on_decision=observers)
    app = _fastapi()
    app.add_middleware(
        MeterMiddleware,
        meter=meter,
        keystore=keystore,
        routes=ROUTES,
        exclude=["/metrics"],
        **_header_groups(),
    )
    return app


def _header_groups() -> dict[str, Any]:
    """``headers=`` from ``METERKIT_BENCH_HEADERS`` (groups, comma-separated), if set."""
    groups = os.environ.get("METERKIT_BENCH_HEADERS")
    return {} if groups is None else {"headers": [g for g in groups.split(",") if g]}


def fastapi_meterkit_prometheus() -> Any:
    """``fastapi_meterkit`` reporting to a PrometheusObserver (default labels), whose
    registry the app serves at /metrics (unmetered), as a user would."""
    from prometheus_client import CollectorRegistry, make_asgi_app

    from meterkit.prometheus import PrometheusObserver

    registry = CollectorRegistry()
    app = fastapi_meterkit(PrometheusObserver(registry))
    app.mount("/metrics", make_asgi_app(registry))
    return app


# -- Flask under gunicorn ----------------------------------------------------------------------


def _flask(decorate: Any = None) -> Any:
    from flask import Flask

    app = Flask(__name__)

    def list_invoices(organization_id: str) -> dict[str, Any]:
        return BODY

    handler = list_invoices if decorate is None else decorate(list_invoices)
    app.get(ROUTE.replace("{organization_id}", "<organization_id>"))(handler)
    return app


def flask_bare() -> Any:
    _write_keys(meterkit.MemoryKeyStore())
    return _flask()


def flask_limiter() -> Any:
    from flask import request
    from flask_limiter import Limiter

    def api_key() -> str:
        return _api_key(request.headers.get("Authorization"))

    def organization() -> str:
        return str((request.view_args or {})["organization_id"])

    limiter = Limiter(api_key, storage_uri="memory://")

    def decorate(handler: Any) -> Any:
        per_key = limiter.limit("1000/hour;100/minute")
        per_org = limiter.limit("10000/hour", key_func=organization)
        return per_org(per_key(handler))

    _write_keys(meterkit.MemoryKeyStore())
    app = _flask(decorate)
    limiter.init_app(app)
    return app


def flask_meterkit() -> Any:
    from meterkit.wsgi import MeterMiddleware

    meter = meterkit.Meter(meterkit.Policy.crane_ledger(), meterkit.MemoryBackend())
    keystore = meterkit.MemoryKeyStore()
    _write_keys(keystore)
    app = _flask()
    app.wsgi_app = MeterMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, meter=meter, keystore=keystore, routes=ROUTES, **_header_groups()
    )
    return app
