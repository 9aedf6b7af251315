"""The example API (examples/crane_ledger.py) with the admin app in front of it: key
management and usage under /organizations/{organization_id}/, the dashboard, and the
metered API behind, each as it was."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from typing import Any

import httpx
import pytest

import meterkit
from examples.crane_ledger import ORG, create_app
from tests.admin.conftest import _TlsProxy
from tests.conftest import FakeClock
from tests.http._serve import serve_asgi


@pytest.fixture(scope="module")
def example() -> Iterator[tuple[httpx.Client, dict[str, str], meterkit.Meter]]:
    """The example on uvicorn (memory), a client behind a TLS proxy, the demo keys."""
    clock = FakeClock(1_768_867_200.0)
    policy = meterkit.Policy.crane_ledger()
    backend = meterkit.MemoryBackend(clock=clock)
    keystore = meterkit.AsyncMemoryKeyStore(clock=clock)
    app = create_app(meter=meterkit.AsyncMeter(policy, backend), keystore=keystore)
    with serve_asgi(app) as url:
        client = httpx.Client(base_url=url.replace("http:", "https:"), transport=_TlsProxy())
        with closing(client):
            yield client, app.state.demo_keys, meterkit.Meter(policy, backend)


def bearer(keys: dict[str, str], name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {keys[name]}"}


def test_keys_made_through_the_admin_api_work_on_the_metered_api(example: Any) -> None:
    """A key created at /organizations/org_demo/api_keys reaches the metered invoices
    route (and is charged there); the read-only demo key may read usage, not keys."""
    client, keys, meter = example
    listed = client.get(f"/organizations/{ORG}/api_keys", headers=bearer(keys, "live"))
    assert listed.status_code == 200
    assert {k["name"] for k in listed.json()["data"]} >= {"demo live", "demo read_only"}
    made = client.post(
        f"/organizations/{ORG}/api_keys",
        headers=bearer(keys, "live"),
        json={"name": "integration", "permissions": ["invoices:read"]},
    )
    assert made.status_code == 201
    new = {"Authorization": f"Bearer {made.json()['secret']}"}
    invoices = client.get(f"/organizations/{ORG}/invoices", headers=new)
    assert invoices.status_code == 200
    assert invoices.headers["x-credits-charged"] == "0.01"
    refused = client.get(f"/organizations/{ORG}/api_keys", headers=bearer(keys, "read_only"))
    assert refused.json()["error"]["code"] == "insufficient_permissions"
    before = meter.usage(ORG).credits_used
    usage = client.get(f"/organizations/{ORG}/usage", headers=bearer(keys, "read_only"))
    assert usage.status_code == 200
    assert usage.json()["keys"][made.json()["id"]] == {"requests": 1, "credits": "0.01"}
    assert meter.usage(ORG).credits_used == before  # the admin API is not metered


def test_the_dashboard_and_both_schemas_are_served(example: Any) -> None:
    """/dashboard offers the sign-in form; /admin/openapi.json documents the admin API
    and /openapi.json the metered one; /health passes through."""
    client, _, _ = example
    assert "Sign in" in client.get("/dashboard").text
    admin = client.get("/admin/openapi.json").json()
    assert "/organizations/{organization_id}/api_keys" in admin["paths"]
    metered = client.get("/openapi.json").json()
    assert "/organizations/{organization_id}/invoices" in metered["paths"]
    assert client.get("/health").json() == {"status": "ok"}
