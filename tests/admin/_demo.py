"""A demonstration organization for the dashboard: keys of every kind and a month of
traffic, made through the real key store and meter on a fake clock (the browser test
and the docs' screenshots use it)."""

from __future__ import annotations

import random
from typing import Any

from tests.conftest import FakeClock

DAY = 86_400.0
#: (name, mode, permissions, share of the traffic, operations it calls)
KEYS = [
    (
        "production api",
        "live",
        ["invoices:*", "payments:write"],
        0.55,
        ["invoices.list", "invoices.get", "invoices.create", "payments.create"],
    ),
    ("reporting job", "live", ["reports:read"], 0.2, ["reports.generate", "reports.summary"]),
    ("pdf worker", "live", ["invoices:read"], 0.15, ["invoices.pdf"]),
    ("fx service", "live", ["currency:read"], 0.1, ["currency.convert"]),
    ("staging", "test", ["*"], 0.0, []),
]


def populate(org: str, keys: Any, meter: Any, clock: FakeClock, days: int) -> str:
    """Create the demonstration keys of ``org`` and ``days`` days of traffic up to the
    clock's day (the clock ends where it started); return an admin key's plaintext."""
    rng = random.Random(15)
    end = clock.now
    clock.now = end - (days - 1) * DAY  # (a backend's clock never goes back)
    meter.set_allowance(org, "200")  # a small plan, so that the burn-down has a story
    admin_plain, _ = keys.create(org=org, permissions=["*"], name="dashboard admin")
    made = []
    for name, mode, permissions, share, operations in KEYS:
        _, record = keys.create(org=org, mode=mode, permissions=permissions, name=name)
        made.append((record, share, operations))
    _, old = keys.create(org=org, permissions=["invoices:read"], name="old laptop")
    keys.revoke(old.id)
    for day in range(days):
        weekday = day % 7 < 5
        for record, share, operations in made:
            calls = int(
                share * (40 if weekday else 12) * (1 + 0.5 * day / days) * rng.uniform(0.7, 1.3)
            )
            for i in range(calls):
                clock.now = end - (days - 1 - day) * DAY + (i + 1) * 60
                meter.check(record.id, org=org, operation=rng.choice(operations))
    clock.now = end
    return str(admin_plain)
