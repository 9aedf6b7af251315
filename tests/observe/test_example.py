"""The example API serves its meter's metrics at /metrics, unmetered."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from examples.crane_ledger import ORG, create_app
from tests.http._serve import serve_asgi

HTTPS = {"X-Forwarded-Proto": "https"}


def test_the_example_serves_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """After an admission and a refusal, /metrics (plain HTTP scrapes are not refused)
    counts both, and the scrape itself is not metered."""
    monkeypatch.delenv("METERKIT_BACKEND_URL", raising=False)
    app = create_app()
    with serve_asgi(app) as url, httpx.Client(base_url=url, headers=HTTPS) as http:
        live = {"Authorization": f"Bearer {app.state.demo_keys['live']}"}
        read_only = {"Authorization": f"Bearer {app.state.demo_keys['read_only']}"}
        assert http.get(f"/organizations/{ORG}/invoices", headers=live).status_code == 200
        refused = http.post(
            f"/organizations/{ORG}/invoices",
            headers=read_only,
            json={"customer": "Acme", "amount": "1.00"},
        )
        assert refused.status_code == 401
        first = http.get("/metrics")
        second = httpx.get(f"{url}/metrics")  # a scraper speaks plain HTTP
    assert first.status_code == second.status_code == 200
    assert first.headers["content-type"].startswith("text/plain")
    assert "x-credits-charged" not in first.headers
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(second.text)
        for s in family.samples
    }
    decided = "meterkit_decisions_total"
    assert (
        samples[(decided, (("operation", "invoices.list"), ("outcome", "allowed"), ("reason", "")))]
        == 1
    )
    assert (
        samples[
            (
                decided,
                (
                    ("operation", "invoices.create"),
                    ("outcome", "refused"),
                    ("reason", "insufficient_permissions"),
                ),
            )
        ]
        == 1
    )
    latency = samples[("meterkit_backend_latency_seconds_count", (("operation", "invoices.list"),))]
    assert latency == 1
