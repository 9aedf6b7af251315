"""The SQLite ledger store: embedded, in the standard library, nothing to install.

``SqliteStore("path/to/ledger.db")`` (or ``store_from_url("sqlite:///path.db")``).
The database runs in WAL mode with ``synchronous=FULL``: a commit the drain waited
for is on disk before the drain acknowledges the events in Redis, so a crash of the
machine, not only of the drain, loses nothing acknowledged. Several drains (threads
or processes) may write to one file: each batch takes the write lock
(``BEGIN IMMEDIATE``) and the others wait for it (``busy_timeout``). Within it, the
store knows which events are new (nothing else inserts), and adds those to the
rollups.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meterkit.errors import BackendUnavailable, ConfigurationError
from meterkit.ledger.events import Event
from meterkit.ledger.store._sql import (
    COLUMNS,
    SCHEMA,
    Row,
    SqlStore,
    daily_sums,
    monthly_sums,
    org_daily_sums,
    rows_of,
    upsert_sql,
)

__all__ = ["SqliteStore"]

_BUSY_MS = 60_000
_INCOMING = (
    "CREATE TEMP TABLE IF NOT EXISTS meterkit_incoming ("
    + ", ".join(f"{c}{' PRIMARY KEY' if c == 'id' else ''}" for c in COLUMNS)
    + ")"
)
_PLACES = ", ".join("?" * len(COLUMNS))
_INSERT = f"INSERT INTO main.meterkit_events VALUES ({_PLACES})"
_INCOMING_INSERT = f"INSERT OR IGNORE INTO temp.meterkit_incoming VALUES ({_PLACES})"
_VALUES = "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
_DAILY = upsert_sql("daily", "day", _VALUES)
_MONTHLY = upsert_sql("monthly", "month", _VALUES)
_ORG_DAILY = upsert_sql("org_daily", "day", _VALUES)


class SqliteStore(SqlStore):
    """A ledger in one SQLite file (made, with its tables, if it does not exist)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        if not isinstance(path, (str, Path)) or str(path) in ("", ":memory:"):
            raise ConfigurationError(
                "a SQLite ledger is a file path (an in-memory database would be one per "
                "connection)",
                "path",
            )
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        conn = self._conn()
        with conn:
            conn.execute("PRAGMA journal_mode=WAL")
            for statement in SCHEMA:
                conn.execute(statement.format(options=" WITHOUT ROWID"))

    def _connect(self) -> Any:
        try:
            conn = sqlite3.connect(
                str(self.path),
                timeout=_BUSY_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise BackendUnavailable(
                f"cannot open the SQLite ledger {str(self.path)!r}: {exc}"
            ) from exc
        conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(_INCOMING)
        return conn

    def write(self, events: Sequence[Event]) -> int:
        """Insert ``events`` in one transaction, each at most once, with the rollups;
        return how many were new."""
        if not events:
            return 0
        rows = rows_of(events)
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                new = self._insert(conn, rows)
                daily = daily_sums(new)
                conn.executemany(_DAILY, [(*r[:3], *r[4:]) for r in daily])
                conn.executemany(_MONTHLY, monthly_sums(daily))
                conn.executemany(_ORG_DAILY, [(*r[:3], *r[4:]) for r in org_daily_sums(daily)])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"the SQLite ledger refused a batch: {exc}") from exc
        return len(new)

    @staticmethod
    def _insert(conn: Any, rows: list[Row]) -> list[Row]:
        """Insert the rows whose id the store does not hold; return them."""
        # Nearly always, none is there: insert them all at once. A drain killed
        # after a commit, or two drains that held the same entries, bring an id
        # again: then the batch goes through a temporary table, which sorts out
        # the ids already there (nothing else writes: this transaction holds the
        # write lock).
        conn.execute("SAVEPOINT plain")
        try:
            conn.executemany(_INSERT, rows)
        except sqlite3.IntegrityError:
            conn.execute("ROLLBACK TO plain")
        else:
            conn.execute("RELEASE plain")
            return rows
        conn.execute("RELEASE plain")
        conn.execute("DELETE FROM temp.meterkit_incoming")
        conn.executemany(_INCOMING_INSERT, rows)
        conn.execute(
            "DELETE FROM temp.meterkit_incoming WHERE id IN "
            "(SELECT e.id FROM main.meterkit_events e "
            "JOIN temp.meterkit_incoming i ON e.id = i.id)"
        )
        new: list[Row] = conn.execute(
            "SELECT * FROM temp.meterkit_incoming ORDER BY pos_ms, pos_seq"
        ).fetchall()
        conn.executemany(_INSERT, new)
        return new
