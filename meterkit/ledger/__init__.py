"""The usage ledger: every money event, kept durably, for history, invoices and audit.

The backend's counters serve the hot path and end with their month; the ledger
keeps every admitted charge, refund, top-up, allowance change and plan change as an
:class:`Event`, written in the same atomic step as the decision (a Redis Stream
entry from the same script; a tuple in a memory backend's log), then moved exactly
once into SQL by a :class:`Drain` (SQLite or PostgreSQL). From there:
:func:`history` (``meter.usage(org, period="2026-11")``) for any past period, and
:func:`reconcile` to prove the ledger's sums equal the counters'. See
docs/ledger.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meterkit.ledger.drain import Drain, DrainStats
    from meterkit.ledger.events import Event, Kind
    from meterkit.ledger.history import DayUsage, MonthUsage, UsageHistory, history, period_bounds
    from meterkit.ledger.log import MemoryLog
    from meterkit.ledger.reconcile import (
        Difference,
        Reconciliation,
        cloudevent,
        reconcile,
        write_cloudevents,
        write_csv,
    )
    from meterkit.ledger.store import LedgerStore, SqliteStore, store_from_url
    from meterkit.ledger.store.postgresql import PostgresStore

# Names load their module when first used: the backends import the event format
# (meterkit.ledger.events) at start-up, and need no SQL driver for it.
_WHERE = {
    "DayUsage": "history",
    "Difference": "reconcile",
    "Drain": "drain",
    "DrainStats": "drain",
    "Event": "events",
    "Kind": "events",
    "LedgerStore": "store",
    "MemoryLog": "log",
    "MonthUsage": "history",
    "PostgresStore": "store.postgresql",
    "Reconciliation": "reconcile",
    "SqliteStore": "store",
    "UsageHistory": "history",
    "cloudevent": "reconcile",
    "history": "history",
    "period_bounds": "history",
    "reconcile": "reconcile",
    "store_from_url": "store",
    "write_cloudevents": "reconcile",
    "write_csv": "reconcile",
}

__all__ = [
    "DayUsage",
    "Difference",
    "Drain",
    "DrainStats",
    "Event",
    "Kind",
    "LedgerStore",
    "MemoryLog",
    "MonthUsage",
    "PostgresStore",
    "Reconciliation",
    "SqliteStore",
    "UsageHistory",
    "cloudevent",
    "history",
    "period_bounds",
    "reconcile",
    "store_from_url",
    "write_cloudevents",
    "write_csv",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'meterkit.ledger' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"meterkit.ledger.{module}"), name)
    globals()[name] = value
    return value
