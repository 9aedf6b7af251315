"""The PostgreSQL ledger store, for a fleet: psycopg 3 (``pip install meterkit[postgres]``).

``PostgresStore("postgresql://user@host:5432/db")`` (or ``store_from_url`` of it).
A batch of events is one transaction: the events are copied (``COPY``, binary) into
the events table; if an id is there already (a drain killed after its commit, or
two drains holding the same entries), the batch goes again through a temporary
table and ``INSERT ... ON CONFLICT DO NOTHING RETURNING``, which says which rows
were really inserted, even while another drain inserts some of them. Only those
rows feed the rollups (summed in Python, copied, then added in one statement per
rollup), so an event delivered twice counts once. Rows are taken in key order, so
concurrent drains never deadlock; a deadlock or serialization failure all the same
is retried.

The rollup tables leave half of each page free (``fillfactor=50``): an update of a
day's sums then fits in its page and touches no index (a HOT update), which halves
what a batch costs the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from meterkit.errors import BackendUnavailable, ConfigurationError
from meterkit.ledger.events import Event
from meterkit.ledger.store._sql import (
    COLUMNS,
    SCHEMA,
    Row,
    SqlStore,
    daily_sums,
    rows_of,
    upsert_sql,
)

__all__ = ["PostgresStore"]

_TYPES = {
    "at": "int8",
    "day": "int4",
    "month": "int4",
    "micro": "int8",
    "pos_ms": "int8",
    "pos_seq": "int8",
}
_COPY_TYPES = [_TYPES.get(c, "text") for c in COLUMNS]
_INCOMING = (
    "CREATE TEMP TABLE IF NOT EXISTS meterkit_incoming ("
    + ", ".join(f"{c} {t}" for c, t in zip(COLUMNS, _COPY_TYPES, strict=True))
    + ") ON COMMIT DELETE ROWS"
)
_ROLLUP_TYPES = ["text", "text", "int4", "int4", "text", "text", "int8", "int8", "int8", "int8"]
_ROLLUP_IN = (
    "CREATE TEMP TABLE IF NOT EXISTS meterkit_rollup_in (org text, mode text, day int4, "
    "month int4, key_id text, operation text, requests int8, charged int8, refunds int8, "
    "refunded int8) ON COMMIT DELETE ROWS"
)
_COPY_EVENTS = "COPY meterkit_events FROM STDIN (FORMAT BINARY)"
_COPY_INCOMING = "COPY meterkit_incoming FROM STDIN (FORMAT BINARY)"
_COPY_ROLLUP = "COPY meterkit_rollup_in FROM STDIN (FORMAT BINARY)"
_INSERT_NEW = (
    "INSERT INTO meterkit_events SELECT * FROM meterkit_incoming ORDER BY id "
    "ON CONFLICT (id) DO NOTHING RETURNING *"
)
_DAILY = upsert_sql(
    "daily",
    "day",
    "SELECT org, mode, day, key_id, operation, requests, charged, refunds, refunded "
    "FROM meterkit_rollup_in ORDER BY org, mode, day, key_id, operation",
)
_MONTHLY = upsert_sql(
    "monthly",
    "month",
    "SELECT org, mode, month, key_id, operation, SUM(requests), SUM(charged), SUM(refunds), "
    "SUM(refunded) FROM meterkit_rollup_in GROUP BY org, mode, month, key_id, operation "
    "ORDER BY org, mode, month, key_id, operation",
)
_ORG_DAILY = upsert_sql(
    "org_daily",
    "day",
    "SELECT org, mode, day, '', '', SUM(requests), SUM(charged), SUM(refunds), SUM(refunded) "
    "FROM meterkit_rollup_in GROUP BY org, mode, day ORDER BY org, mode, day",
)
# (any number will do: it only keeps two stores from making the tables at once)
_SCHEMA_LOCK = 0x6D6B_6C67
_RETRIES = 5


def _driver() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise ConfigurationError(
            "a PostgreSQL ledger needs psycopg 3: pip install 'meterkit[postgres]'", "url"
        ) from exc
    return psycopg


class PostgresStore(SqlStore):
    """A ledger in a PostgreSQL database (its tables made if they do not exist)."""

    _param = "%s"

    def __init__(self, url: str, *, connect_timeout: float = 10.0) -> None:
        super().__init__()
        if not isinstance(url, str) or not url.startswith(("postgresql://", "postgres://")):
            raise ConfigurationError("a PostgreSQL ledger URL starts with postgresql://", "url")
        self._psycopg = _driver()
        self._dsn = url
        self._timeout = connect_timeout
        # Never keep the password in what is shown.
        self.url = url.split("://", 1)[0] + "://" + url.split("://", 1)[1].rpartition("@")[2]
        conn = self._conn()
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [_SCHEMA_LOCK])
                for statement in SCHEMA:
                    conn.execute(statement.format(options=" WITH (fillfactor = 50)"))
        except self._psycopg.Error as exc:
            raise BackendUnavailable(f"the PostgreSQL ledger refused its schema: {exc}") from exc

    def _connect(self) -> Any:
        try:
            conn = self._psycopg.connect(
                self._dsn, autocommit=True, connect_timeout=max(1, round(self._timeout))
            )
            conn.execute(_INCOMING)
            conn.execute(_ROLLUP_IN)
        except self._psycopg.Error as exc:
            raise BackendUnavailable(f"cannot reach the PostgreSQL ledger: {exc}") from exc
        return conn

    def write(self, events: Sequence[Event]) -> int:
        """Insert ``events`` in one transaction, each at most once, with the rollups;
        return how many were new."""
        if not events:
            return 0
        # (in id order: two drains that hold some of the same events wait for each
        # other's ids in one order, never in a circle)
        rows = sorted(rows_of(events))
        errors = self._psycopg.errors
        conn = self._conn()
        for attempt in range(_RETRIES):
            try:
                with conn.transaction():
                    new = self._insert(conn, rows)
                    daily = daily_sums(new)
                    if daily:
                        self._copy(conn, _COPY_ROLLUP, _ROLLUP_TYPES, daily)
                        conn.execute(_DAILY)
                        conn.execute(_MONTHLY)
                        conn.execute(_ORG_DAILY)
                return len(new)
            except (errors.DeadlockDetected, errors.SerializationFailure):
                if attempt == _RETRIES - 1:
                    raise BackendUnavailable("the PostgreSQL ledger kept deadlocking") from None
            except self._psycopg.Error as exc:
                raise BackendUnavailable(f"the PostgreSQL ledger refused a batch: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _insert(self, conn: Any, rows: list[Row]) -> list[Row]:
        """Insert the rows whose id the store does not hold; return them."""
        # Nearly always, none is there: copy them straight in. A drain killed after
        # a commit, or two drains that held the same entries, bring an id again:
        # then the batch goes through a temporary table and ON CONFLICT, and the
        # rows really inserted come back (even as another drain inserts some).
        try:
            with conn.transaction():  # (a savepoint)
                self._copy(conn, _COPY_EVENTS, _COPY_TYPES, rows)
            return rows
        except self._psycopg.errors.UniqueViolation:
            pass
        self._copy(conn, _COPY_INCOMING, _COPY_TYPES, rows)
        new: list[Row] = conn.execute(_INSERT_NEW).fetchall()
        return new

    @staticmethod
    def _copy(conn: Any, statement: str, types: list[str], rows: Sequence[Sequence[Any]]) -> None:
        with conn.cursor().copy(statement) as copy:
            copy.set_types(types)
            for row in rows:
                copy.write_row(row)
