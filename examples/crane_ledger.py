"""A small Crane Ledger-like API (FastAPI) behind meterkit's ASGI middleware.

Run it (keys are written to demo-keys.json on start-up)::

    METERKIT_DEMO_KEYS_FILE=demo-keys.json uvicorn examples.crane_ledger:app

Every route under ``/organizations/{organization_id}/`` is authenticated, rate-limited
and charged by the middleware before the handler runs; the handlers below contain no
metering code at all. ``/metrics`` serves the meter's Prometheus metrics (decisions,
refusals by tier, backend latency, …), and each refusal and backend failure is a log
line on the ``meterkit`` logger. The operations and their prices come from the policy's
``[routes]`` table (``meterkit/policies/crane_ledger.toml``).

In front of it, :mod:`meterkit.admin` serves the seed's key management and usage
(``/organizations/{organization_id}/api_keys``, ``/organizations/{organization_id}/usage``,
for keys holding ``api_keys:manage``, or ``usage:read`` for usage) and the dashboard
(``/dashboard``, signed in with such a key); its OpenAPI schema is at
``/admin/openapi.json``. They are not metered: an organization out of credits can still
see its usage and rotate a leaked key.

Environment:

- ``METERKIT_BACKEND_URL``: ``redis://…`` to keep limits, credits and keys in Redis
  (default: in this process's memory);
- ``METERKIT_DEMO_KEYS_FILE``: where to write the demo keys' plaintext, as JSON
  ``{"live": …, "test": …, "read_only": …}``;
- ``METERKIT_SESSION_SECRET``: 32 or more characters that sign the dashboard's session
  cookies (default: random, so sessions end when the server restarts).

Plain HTTP is refused: run behind a TLS-terminating proxy that sets
``X-Forwarded-Proto: https`` (uvicorn believes it from 127.0.0.1 by default), or give
uvicorn a certificate (``--ssl-keyfile``/``--ssl-certfile``).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

import meterkit
from meterkit.admin import Admin, AdminMiddleware
from meterkit.asgi import MeterMiddleware
from meterkit.http import openapi
from meterkit.observe import LogObserver
from meterkit.prometheus import PrometheusObserver

ORG = "org_demo"
READ_ONLY = ["invoices:read", "currency:read", "reports:read", "usage:read"]
Report = Literal["balance_sheet", "profit_and_loss", "summary"]
Currency = Literal["USD", "EUR", "GBP", "JPY"]
# Paths that are not metered: the health check, the metrics and FastAPI's documentation.
UNMETERED = ["/health", "/metrics", "/docs*", "/redoc", "/openapi.json"]


def error(status: int, code: str, message: str, type_: str = "invalid_request_error") -> Any:
    """An error response in the same shape as meterkit's."""
    return JSONResponse(
        {"error": {"type": type_, "code": code, "message": message, "status": status}},
        status_code=status,
    )


class ErrorDetail(BaseModel):
    type: str
    code: str
    message: str
    status: int


class ErrorBody(BaseModel):
    """The shape of every error this API answers, meterkit's and the app's alike."""

    error: ErrorDetail


class UnreadableBody(BaseModel):
    """FastAPI's own answer (400) to a JSON body that is not UTF-8 text."""

    detail: str


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The app's own error answers, for a route's OpenAPI ``responses``."""
    described: dict[int, tuple[type[BaseModel], str]] = {
        400: (UnreadableBody, "FastAPI: the body is not UTF-8 text."),
        404: (ErrorBody, "No such invoice."),
        503: (ErrorBody, "The exchange-rate provider is down (the request is refunded)."),
    }
    return {s: {"model": described[s][0], "description": described[s][1]} for s in statuses}


# An amount of money: positive, at most 12 digits before the point and 2 after, as a
# JSON number or a string. The schema says exactly that, so that a client (or
# schemathesis) that follows it is never refused: pydantic's own schema for a Decimal
# admits any string, "" included.
Amount = Annotated[
    Decimal,
    Field(gt=0, max_digits=14, decimal_places=2),
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "maximum": 999_999_999_999,
                    "multipleOf": 0.01,
                },
                {
                    "type": "string",
                    "pattern": "^([1-9][0-9]{0,11}(\\.[0-9]{1,2})?|0\\.([1-9][0-9]?|0[1-9]))$",
                },
            ],
            "title": "Amount",
            "examples": ["50.00"],
        }
    ),
]
Customer = Annotated[str, Field(min_length=1, max_length=200)]


class RatesUnavailable(Exception):
    """The exchange-rate provider did not answer."""


class RatesFeed:
    """Exchange rates from an upstream provider (fixed figures here). It can go down:
    then conversions answer 503, and the middleware refunds their credits."""

    def __init__(self) -> None:
        self.available = True
        self.per_usd: dict[str, Decimal] = {
            "USD": Decimal("1"),
            "EUR": Decimal("0.92"),
            "GBP": Decimal("0.79"),
            "JPY": Decimal("151.20"),
        }
        assert set(self.per_usd) == set(get_args(Currency))

    def convert(self, amount: Decimal, source: str, target: str) -> Decimal:
        if not self.available:
            raise RatesUnavailable
        return (amount / self.per_usd[source] * self.per_usd[target]).quantize(Decimal("0.01"))


class InvoiceIn(BaseModel):
    customer: Customer
    amount: Amount
    currency: Currency = "USD"


def _changes_only(schema: dict[str, Any]) -> None:
    # A field left out is not changed, and null is no value of any field; at least one.
    for field in schema["properties"].values():
        options = [o for o in field.pop("anyOf", []) if o.get("type") != "null"]
        if options:
            field.update(options[0])
        field.pop("default", None)
    schema["minProperties"] = 1


class InvoiceChange(BaseModel):
    """A PUT: the fields to change (at least one; unknown fields are refused)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_changes_only)

    customer: Customer | None = None
    amount: Amount | None = None
    status: Literal["open", "paid", "void"] | None = None

    @model_validator(mode="after")
    def _something_changes(self) -> InvoiceChange:
        if not self.model_dump(exclude_none=True):
            raise ValueError("give customer, amount or status")
        return self


class PaymentIn(BaseModel):
    invoice_id: str
    amount: Amount


class ConversionIn(BaseModel):
    amount: Amount
    source: Currency = Field(alias="from")
    target: Currency = Field(alias="to")


class Ledger:
    """The invoices of each (organization, mode): test keys never see live data."""

    def __init__(self) -> None:
        self.invoices: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self._numbers = itertools.count(1)

    def book(self, org: str, mode: str) -> dict[str, dict[str, Any]]:
        return self.invoices.setdefault((org, mode), {})

    def create(self, org: str, mode: str, invoice: InvoiceIn) -> dict[str, Any]:
        # (A retry with the same Idempotency-Key never gets here: meterkit replays the
        # first answer.)
        number = next(self._numbers)
        record = {
            "id": f"inv_{number:06d}",
            "number": f"INV-{number:04d}",
            "customer": invoice.customer,
            "amount": str(invoice.amount),
            "currency": invoice.currency,
            "status": "open",
        }
        self.book(org, mode)[record["id"]] = record
        return record


def pdf_of(invoice: dict[str, Any]) -> bytes:
    """A one-page PDF naming the invoice (a real, if minimal, PDF file)."""
    text = f"{invoice['number']}  {invoice['customer']}  {invoice['amount']} {invoice['currency']}"
    text = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    stream = f"BT /F1 14 Tf 72 720 Td ({text}) Tj ET".encode("latin-1", "replace")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        b"/Resources << /Font << /F1 5 0 R >> >> /Contents 4 0 R >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def _stores_from_env(
    policy: meterkit.Policy, clock: Callable[[], float] | None, observers: list[Any]
) -> tuple[Any, Any]:
    """An AsyncMeter reporting to ``observers``, and an async key store: in memory, or in
    Redis at METERKIT_BACKEND_URL."""
    url = os.environ.get("METERKIT_BACKEND_URL")
    if not url:
        backend: Any = meterkit.MemoryBackend(clock=clock)
        keystore = meterkit.async_keystore_from_url("memory://", clock=clock)
    else:
        backend = meterkit.async_backend_from_url(url, clock=clock)
        keystore = meterkit.async_keystore_from_url(url, clock=clock)
    return meterkit.AsyncMeter(policy, backend, on_decision=observers), keystore


def metered_routes(policy: meterkit.Policy) -> dict[str, str]:
    """The policy's route table less ``/usage``, which the admin app serves."""
    return {route: op for route, op in policy.routes.items() if not route.endswith("/usage")}


def create_app(
    *,
    meter: meterkit.AsyncMeter | None = None,
    keystore: Any = None,
    clock: Callable[[], float] | None = None,
    policy: meterkit.Policy | None = None,
    rates: RatesFeed | None = None,
    registry: CollectorRegistry | None = None,
    **middleware_options: Any,
) -> FastAPI:
    """The example API. Give ``meter`` (an AsyncMeter) and ``keystore`` (an async key
    store), or let them be made from the environment; ``clock`` drives the ones made
    here, which report to a Prometheus observer on ``registry`` (by default the app's
    own), served at ``/metrics``, and to the ``meterkit`` logger. ``middleware_options``
    go to :class:`meterkit.asgi.MeterMiddleware`."""
    if (meter is None) != (keystore is None):
        raise TypeError("give both meter and keystore, or neither")
    owned = meter is None
    registry = CollectorRegistry() if registry is None else registry
    if meter is None:
        observers = [PrometheusObserver(registry), LogObserver()]
        meter, keystore = _stores_from_env(
            policy or meterkit.Policy.crane_ledger(), clock, observers
        )
    ledger = Ledger()
    feed = rates or RatesFeed()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        demo = {"live": ("live", ["*"]), "test": ("test", ["*"]), "read_only": ("live", READ_ONLY)}
        app.state.demo_keys = {}
        for name, (key_mode, permissions) in demo.items():
            plaintext, _ = await keystore.create(
                org=ORG, mode=key_mode, permissions=permissions, name=f"demo {name}"
            )
            app.state.demo_keys[name] = str(plaintext)
        keys_file = os.environ.get("METERKIT_DEMO_KEYS_FILE")
        if keys_file:
            path = Path(keys_file)
            path.write_text(json.dumps(app.state.demo_keys, indent=2) + "\n", encoding="utf-8")
            path.chmod(0o600)
        yield
        if owned:
            await meter.aclose()
            await keystore.aclose()

    app = FastAPI(title="Crane Ledger (meterkit example)", lifespan=lifespan)
    app.state.meter = meter
    app.state.keystore = keystore
    app.state.registry = registry
    app.state.rates = feed
    app.state.ledger = ledger
    options = {"exclude": UNMETERED, "routes": metered_routes(meter.policy), **middleware_options}
    app.add_middleware(MeterMiddleware, meter=meter, keystore=keystore, **options)
    # /openapi.json shows what the middleware does: the bearer scheme, its refusals
    # (401, 402, 403, 429, …) with their bodies, and its headers on every answer.
    openapi.document(app, meter, keystore=keystore, **options)
    # The seed's key management, usage and dashboard, added last so that they come
    # first: their routes never reach the metering middleware.
    admin = Admin(
        meter,
        keystore,
        session_secret=os.environ.get("METERKIT_SESSION_SECRET"),
        openapi_path="/admin/openapi.json",
        trusted_proxies=options.get("trusted_proxies", ()),
        require_https=options.get("require_https", True),
    )
    app.add_middleware(AdminMiddleware, admin=admin)
    app.state.admin = admin

    def mode(request: Request) -> Literal["live", "test"]:
        # The authenticated key, as the middleware admitted it.
        key: meterkit.ApiKey = request.state.meterkit.key
        return key.mode

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/organizations/{organization_id}/invoices")
    async def list_invoices(organization_id: str, request: Request) -> dict[str, Any]:
        invoices = list(ledger.book(organization_id, mode(request)).values())
        return {"data": invoices, "count": len(invoices)}

    @app.post("/organizations/{organization_id}/invoices", status_code=201, responses=errors(400))
    async def create_invoice(organization_id: str, invoice: InvoiceIn, request: Request) -> Any:
        return ledger.create(organization_id, mode(request), invoice)

    @app.get("/organizations/{organization_id}/invoices/{invoice_id}", responses=errors(404))
    async def get_invoice(organization_id: str, invoice_id: str, request: Request) -> Any:
        invoice = ledger.book(organization_id, mode(request)).get(invoice_id)
        if invoice is None:
            return error(404, "invoice_not_found", f"No invoice {invoice_id}.")
        return invoice

    @app.put("/organizations/{organization_id}/invoices/{invoice_id}", responses=errors(400, 404))
    async def update_invoice(
        organization_id: str, invoice_id: str, change: InvoiceChange, request: Request
    ) -> Any:
        invoice = ledger.book(organization_id, mode(request)).get(invoice_id)
        if invoice is None:
            return error(404, "invoice_not_found", f"No invoice {invoice_id}.")
        fields = change.model_dump(exclude_none=True)
        invoice.update({k: str(v) if isinstance(v, Decimal) else v for k, v in fields.items()})
        return invoice

    @app.delete("/organizations/{organization_id}/invoices/{invoice_id}", responses=errors(404))
    async def delete_invoice(organization_id: str, invoice_id: str, request: Request) -> Any:
        invoice = ledger.book(organization_id, mode(request)).pop(invoice_id, None)
        if invoice is None:
            return error(404, "invoice_not_found", f"No invoice {invoice_id}.")
        return {"id": invoice_id, "deleted": True}

    @app.post(
        "/organizations/{organization_id}/payments", status_code=201, responses=errors(400, 404)
    )
    async def create_payment(organization_id: str, payment: PaymentIn, request: Request) -> Any:
        invoice = ledger.book(organization_id, mode(request)).get(payment.invoice_id)
        if invoice is None:
            return error(404, "invoice_not_found", f"No invoice {payment.invoice_id}.")
        paid = Decimal(invoice.get("paid", "0")) + payment.amount
        invoice["paid"] = str(paid)
        if paid >= Decimal(invoice["amount"]):
            invoice["status"] = "paid"
        return {"invoice_id": payment.invoice_id, "amount": str(payment.amount), "invoice": invoice}

    @app.post(
        "/organizations/{organization_id}/invoices/{invoice_id}/pdf",
        response_class=Response,
        responses={
            200: {"content": {"application/pdf": {}}, "description": "The invoice as a PDF."},
            **errors(404),
        },
    )
    async def invoice_pdf(organization_id: str, invoice_id: str, request: Request) -> Any:
        invoice = ledger.book(organization_id, mode(request)).get(invoice_id)
        if invoice is None:
            return error(404, "invoice_not_found", f"No invoice {invoice_id}.")
        return Response(pdf_of(invoice), media_type="application/pdf")

    @app.post("/organizations/{organization_id}/currency/convert", responses=errors(400, 503))
    async def convert(organization_id: str, conversion: ConversionIn) -> Any:
        try:
            result = feed.convert(conversion.amount, conversion.source, conversion.target)
        except RatesUnavailable:
            return error(
                503,
                "rates_unavailable",
                "Exchange rates are unavailable right now.",
                type_="api_error",
            )
        return {
            "from": conversion.source,
            "to": conversion.target,
            "amount": str(conversion.amount),
            "result": str(result),
        }

    @app.get("/organizations/{organization_id}/reports/{name}")
    async def report(organization_id: str, name: Report, request: Request) -> Any:
        invoices = ledger.book(organization_id, mode(request)).values()
        receivable = sum(
            (Decimal(i["amount"]) for i in invoices if i["currency"] == "USD"), Decimal(0)
        )
        return {
            "report": name,
            "currency": "USD",
            "invoices": len(invoices),
            "accounts_receivable": str(receivable),
        }

    return app


app = create_app()
