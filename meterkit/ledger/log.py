"""The memory backend's ledger: an in-process log that a drain moves to SQL.

Opt-in (``MemoryBackend(ledger=True)``, or a capacity): without it a memory check
appends nothing. With it, every admitted charge appends one tuple, under the
backend's lock, to this log's deque; refunds, top-ups, allowance and plan changes
append theirs. A drain in the same process (:class:`~meterkit.ledger.drain.Drain`)
reads the oldest events, commits them to a store, and only then removes them: an
event leaves the log only once a store holds it.

The log is bounded: when it holds ``capacity`` events that nothing has drained, a
check that would charge raises :class:`~meterkit.errors.LedgerFullError` before it
consumes anything (and so does a refund, a top-up or an allowance change). An event
is never dropped to make room.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import Any

from meterkit.errors import ConfigurationError, LedgerFullError
from meterkit.ledger.events import Event, memory_event

__all__ = ["DEFAULT_CAPACITY", "MemoryLog", "ledger_full"]

#: Events a memory log holds before checks are refused (about 100 MB of tuples).
DEFAULT_CAPACITY = 1_000_000


def ledger_full(capacity: int) -> LedgerFullError:
    """The error of a check refused because the ledger holds ``capacity`` undrained
    events."""
    return LedgerFullError(
        f"the memory ledger holds {capacity:,} events that no drain has moved to a store: "
        "nothing was charged (run a Drain on this backend, or raise its capacity)"
    )


class MemoryLog:
    """The events of one :class:`~meterkit.MemoryBackend`, oldest first, until drained.

    ``id`` is random per log: it qualifies the memory backend's charge ids (a counter
    of its process) in event ids. Appending is the backend's business (under its
    lock); :meth:`peek` and :meth:`confirm` are the drain's, one drain at a time.
    """

    __slots__ = ("_draining", "capacity", "entries", "id")

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigurationError("a ledger's capacity is a positive number of events", "ledger")
        self.capacity = capacity
        self.id = os.urandom(6).hex()
        #: (the backend appends on the right, the drain removes on the left: a deque
        #: does both without a lock of its own)
        self.entries: deque[tuple[Any, ...]] = deque()
        self._draining = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryLog(id={self.id!r}, pending={len(self.entries)}, capacity={self.capacity})"

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def source(self) -> str:
        """The name events of this log carry as their source."""
        return "memory:" + self.id

    def peek(self, limit: int) -> list[Event]:
        """The oldest ``limit`` events, left in the log (see :meth:`confirm`)."""
        log_id = self.id
        entries = self.entries
        # By index, not by iterating: checks append on the right meanwhile, which an
        # iterator refuses ("deque mutated during iteration") but which moves no
        # index on the left, where only this drain removes.
        return [memory_event(log_id, entries[i]) for i in range(min(limit, len(entries)))]

    def confirm(self, count: int) -> None:
        """Remove the oldest ``count`` events: a store holds them now."""
        popleft = self.entries.popleft
        for _ in range(count):
            popleft()

    def snapshot(self) -> list[Event]:
        """Every event not yet drained (for reconciliation, under the backend's lock)."""
        log_id = self.id
        return [memory_event(log_id, item) for item in list(self.entries)]
