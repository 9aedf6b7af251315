"""A small Flask (WSGI) API metered by meterkit: invoices, currency conversion, usage.

Run it under waitress, believing ``X-Forwarded-Proto`` from a local TLS proxy::

    METERKIT_DEMO_KEYS_FILE=demo-keys.json waitress-serve --listen 127.0.0.1:8080 \\
        --trusted-proxy 127.0.0.1 --trusted-proxy-headers x-forwarded-proto \\
        examples.flask_app:app

The middleware wraps ``app.wsgi_app`` once the routes are defined (it checks then that
the app serves every route the policy meters); the views hold no metering code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request

import meterkit
from meterkit.wsgi import MeterMiddleware

ORG = "org_demo"
READ_ONLY = ["invoices:read", "currency:read", "reports:read", "usage:read"]
REPORTS = ("balance-sheet", "profit-and-loss")


def error(status: int, code: str, message: str, type_: str = "invalid_request_error") -> Any:
    """An error response in the same shape as meterkit's."""
    body = {"error": {"type": type_, "code": code, "message": message, "status": status}}
    return jsonify(body), status


class RatesFeed:
    """Exchange rates from an upstream provider that can go down (answers 503 then)."""

    def __init__(self) -> None:
        self.available = True
        self.per_usd = {"USD": Decimal("1"), "EUR": Decimal("0.92"), "GBP": Decimal("0.79")}


def create_app(
    *,
    meter: meterkit.Meter | None = None,
    keystore: Any = None,
    clock: Callable[[], float] | None = None,
    rates: RatesFeed | None = None,
    **middleware_options: Any,
) -> Flask:
    """The example API; ``meter`` and ``keystore`` default to in-memory ones on ``clock``."""
    if meter is None:
        meter = meterkit.Meter(meterkit.Policy.crane_ledger(), meterkit.MemoryBackend(clock=clock))
    if keystore is None:
        keystore = meterkit.keystore_from_url("memory://", clock=clock)
    feed = rates or RatesFeed()
    invoices: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}

    app = Flask(__name__)
    keys = {
        "live": keystore.create(org=ORG, mode="live", permissions=["*"]),
        "test": keystore.create(org=ORG, mode="test", permissions=["*"]),
        "read_only": keystore.create(org=ORG, mode="live", permissions=READ_ONLY),
    }
    app.config["DEMO_KEYS"] = {name: str(plaintext) for name, (plaintext, _) in keys.items()}
    if os.environ.get("METERKIT_DEMO_KEYS_FILE"):
        path = Path(os.environ["METERKIT_DEMO_KEYS_FILE"])
        path.write_text(json.dumps(app.config["DEMO_KEYS"], indent=2) + "\n", encoding="utf-8")
        path.chmod(0o600)

    def book(org: str) -> dict[str, dict[str, Any]]:
        mode = request.environ["meterkit"].key.mode  # what the middleware admitted
        return invoices.setdefault((org, mode), {})

    def not_found(invoice_id: str) -> Any:
        return error(404, "invoice_not_found", f"No invoice {invoice_id}.")

    @app.get("/health")
    def health() -> Any:
        return {"status": "ok"}

    @app.get("/organizations/<organization_id>/invoices")
    def list_invoices(organization_id: str) -> Any:
        data = list(book(organization_id).values())
        return {"data": data, "count": len(data)}

    @app.post("/organizations/<organization_id>/invoices")
    def create_invoice(organization_id: str) -> Any:
        body = request.get_json(silent=True) or {}
        try:
            amount = Decimal(str(body["amount"]))
            customer = str(body["customer"])
        except (KeyError, InvalidOperation):
            return error(400, "invalid_invoice", "An invoice needs a customer and an amount.")
        # (A retry with the same Idempotency-Key never gets here: meterkit replays the
        # first answer.)
        data = book(organization_id)
        invoice = {
            "id": f"inv_{len(data) + 1:06d}",
            "customer": customer,
            "amount": str(amount),
            "status": "open",
        }
        data[invoice["id"]] = invoice
        return invoice, 201

    @app.get("/organizations/<organization_id>/invoices/<invoice_id>")
    def get_invoice(organization_id: str, invoice_id: str) -> Any:
        invoice = book(organization_id).get(invoice_id)
        return invoice if invoice is not None else not_found(invoice_id)

    @app.put("/organizations/<organization_id>/invoices/<invoice_id>")
    def update_invoice(organization_id: str, invoice_id: str) -> Any:
        invoice = book(organization_id).get(invoice_id)
        if invoice is None:
            return not_found(invoice_id)
        body = request.get_json(silent=True) or {}
        fields = {k: str(v) for k, v in body.items() if k in ("customer", "amount", "status")}
        if not fields:
            return error(400, "nothing_to_change", "Give customer, amount or status.")
        invoice.update(fields)
        return invoice

    @app.delete("/organizations/<organization_id>/invoices/<invoice_id>")
    def delete_invoice(organization_id: str, invoice_id: str) -> Any:
        if book(organization_id).pop(invoice_id, None) is None:
            return not_found(invoice_id)
        return {"id": invoice_id, "deleted": True}

    @app.post("/organizations/<organization_id>/invoices/<invoice_id>/pdf")
    def invoice_pdf(organization_id: str, invoice_id: str) -> Any:
        invoice = book(organization_id).get(invoice_id)
        if invoice is None:
            return not_found(invoice_id)
        # (a stand-in for a renderer: the example's point is the 0.25 it is charged)
        text = f"{invoice['id']} {invoice['customer']} {invoice['amount']}"
        return Response(f"%PDF-1.4\n% {text}\n".encode(), mimetype="application/pdf")

    @app.post("/organizations/<organization_id>/payments")
    def create_payment(organization_id: str) -> Any:
        body = request.get_json(silent=True) or {}
        invoice = book(organization_id).get(str(body.get("invoice_id")))
        if invoice is None:
            return not_found(str(body.get("invoice_id")))
        try:
            amount = Decimal(str(body["amount"]))
        except (KeyError, InvalidOperation):
            return error(400, "invalid_payment", "A payment needs an amount.")
        paid = Decimal(invoice.get("paid", "0")) + amount
        invoice["paid"] = str(paid)
        if paid >= Decimal(invoice["amount"]):
            invoice["status"] = "paid"
        return {"invoice_id": invoice["id"], "amount": str(amount), "invoice": invoice}, 201

    @app.get("/organizations/<organization_id>/reports/<name>")
    def report(organization_id: str, name: str) -> Any:
        if name not in REPORTS:
            return error(404, "report_not_found", f"No report {name!r}; try {', '.join(REPORTS)}.")
        data = book(organization_id).values()
        receivable = sum((Decimal(i["amount"]) for i in data), Decimal(0))
        return {"report": name, "invoices": len(data), "accounts_receivable": str(receivable)}

    @app.post("/organizations/<organization_id>/currency/convert")
    def convert(organization_id: str) -> Any:
        body = request.get_json(silent=True) or {}
        source, target = body.get("from"), body.get("to")
        if source not in feed.per_usd or target not in feed.per_usd:
            return error(400, "unsupported_currency", "Unknown currency.")
        if not feed.available:
            return error(
                503,
                "rates_unavailable",
                "Exchange rates are unavailable right now.",
                type_="api_error",
            )
        amount = Decimal(str(body.get("amount", "0")))
        result = (amount / feed.per_usd[source] * feed.per_usd[target]).quantize(Decimal("0.01"))
        return {"from": source, "to": target, "result": str(result)}

    @app.get("/organizations/<organization_id>/usage")
    def usage(organization_id: str) -> Any:
        mode = request.environ["meterkit"].key.mode
        return meter.usage(organization_id, mode=mode).to_dict()

    # Wrapped once every route is defined: the middleware compares the policy's routes
    # with the app's now, and refuses to start on one the app does not serve.
    app.wsgi_app = MeterMiddleware(  # type: ignore[method-assign]
        app.wsgi_app,
        meter=meter,
        keystore=keystore,
        exclude=middleware_options.pop("exclude", ["/health"]),
        **middleware_options,
    )
    return app


app = create_app()
