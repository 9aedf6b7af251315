"""A small API of our own for the framework adapters' tests: not Crane Ledger's.

Projects (``proj_…``) are its organizations; keys look like ``acme_live_…``. Routes:

- ``GET /v1/projects/{project_id}/items``: the project from the path, checked against
  the key (``items.list``);
- ``GET /v1/items``: the organization from the key (``items.list``);
- ``GET /v1/items/{item_id}``: the app answers 404 for unknown items (``items.get``);
- ``POST /v1/items``: a body the framework validates (``items.create``);
- ``POST /v1/items/export``: priced by the size of its body (``items.export``);
- ``POST /v1/login``: anonymous, limited per client address (``auth.login``);
- ``GET /health``: not metered.

Refusals are rendered as RFC 9457 problem details, not the seed's bodies.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import meterkit
from meterkit.http.gate import RequestView
from tests.conftest import FakeClock

PROJECT = "proj_alpha"
OTHER = "proj_beta"
PREFIX = "acme"
ORG_PATTERN = r"proj_[a-z0-9]+"

POLICY_TOML = """
name = "items"

[credits]
allowance = "10"

[[tiers]]
name = "key-minute"
scope = "key"
rate = "20/minute"
algorithm = "gcra"
burst = 5
operations = ["items.list", "items.get", "items.create", "items.export"]

[[tiers]]
name = "login-ip"
scope = "key"
rate = "3/minute"
operations = ["auth.login"]

[categories.read]
min = "0.01"
max = "0.01"

[categories.write]
min = "0.05"
max = "0.05"

[categories.export]
min = "0.01"
max = "1"

[categories.free]
min = "0"
max = "0"

[operations."items.list"]
category = "read"
price = "0.01"
permission = "items:read"

[operations."items.get"]
category = "read"
price = "0.01"
permission = "items:read"

[operations."items.create"]
category = "write"
price = "0.05"
permission = "items:write"

[operations."items.export"]
category = "export"
price = "0.01"
permission = "items:read"

[operations."auth.login"]
category = "free"
price = "0"
"""

#: The served routes as a route table (for the drift tests), plus one that is not served.
SERVED = {
    "GET /v1/projects/{project_id}/items": "items.list",
    "GET /v1/items": "items.list",
}
UNSERVED = {**SERVED, "DELETE /v1/items/{item_id}": "items.get"}


def export_cost(request: RequestView) -> Decimal:
    """0.01 credit, and 0.01 more per started kilobyte of the body."""
    size = int(request.header("content-length") or 0)
    return Decimal("0.01") * (1 + -(-size // 1000))


def problem(
    status: int, code: str, message: str, retry_after: int | None, decision: Any
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Refusals as RFC 9457 problem details."""
    body: dict[str, Any] = {
        "type": f"https://errors.acme.test/{code}",
        "title": message,
        "status": status,
    }
    if retry_after is not None:
        body["retry_after"] = retry_after
    return status, {"Content-Type": "application/problem+json"}, body


class Stack:
    """A meter and key store on a fake clock, and keys for the tests."""

    def __init__(self, *, asynchronous: bool = False) -> None:
        self.clock = FakeClock()
        self.policy = meterkit.Policy.from_toml(POLICY_TOML)
        backend = meterkit.MemoryBackend(clock=self.clock)
        self.meter: Any = (meterkit.AsyncMeter if asynchronous else meterkit.Meter)(
            self.policy, backend
        )
        #: A blocking view of the same state, for the test's own reads.
        self.view = meterkit.Meter(self.policy, backend)
        store_type = meterkit.AsyncMemoryKeyStore if asynchronous else meterkit.MemoryKeyStore
        self.keystore: Any = store_type(
            clock=self.clock, token_prefix=PREFIX, org_pattern=ORG_PATTERN
        )
        store = getattr(self.keystore, "sync", self.keystore)
        self.reader, _ = store.create(org=PROJECT, permissions=["items:read"])
        self.writer, _ = store.create(org=PROJECT, permissions=["items:*"])
        self.stranger, _ = store.create(org=OTHER, permissions=["items:*"])

    def used(self, org: str = PROJECT) -> Decimal:
        return self.view.usage(org).credits_used

    @staticmethod
    def auth(plaintext: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {plaintext}"}
