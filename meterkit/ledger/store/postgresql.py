"""The PostgreSQL ledger store, for a fleet: psycopg 3 (``pip install meterkit[postgres]``).

``PostgresStore("postgresql://user@host:5432/db")`` (or ``store_from_url`` of it).
A batch of events is one statement: the events go in as arrays (``unnest``), are
inserted unless their id is there already (``ON CONFLICT DO NOTHING``), and the
rows really inserted (``RETURNING``) feed the rollups in the same statement, so a
batch costs one round trip and an event delivered twice counts once, even when two
drains insert it at the same moment. Rows are taken in key order, so concurrent
drains never deadlock; a deadlock or serialization failure all the same is retried.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from meterkit.errors import BackendUnavailable, ConfigurationError
from meterkit.ledger.events import Event
from meterkit.ledger.store._sql import COLUMNS, SCHEMA, SqlStore, rollup_sql, rows_of

__all__ = ["PostgresStore"]

_TYPES = {
    "at": "bigint",
    "day": "int",
    "month": "int",
    "micro": "bigint",
    "pos_ms": "bigint",
    "pos_seq": "bigint",
}
_ARRAYS = ", ".join(f"%s::{_TYPES.get(c, 'text')}[]" for c in COLUMNS)
_WRITE = f"""WITH incoming AS (
    SELECT DISTINCT ON (id) * FROM unnest({_ARRAYS}) AS t({", ".join(COLUMNS)}) ORDER BY id
), new AS (
    INSERT INTO meterkit_events SELECT * FROM incoming ORDER BY id
    ON CONFLICT (id) DO NOTHING RETURNING *
), daily AS (
    {rollup_sql("daily", "day", "new")}
    RETURNING 1
), monthly AS (
    {rollup_sql("monthly", "month", "new")}
    RETURNING 1
)
SELECT COUNT(*) FROM new"""
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
                    conn.execute(statement.format(rowid=""))
        except self._psycopg.Error as exc:
            raise BackendUnavailable(f"the PostgreSQL ledger refused its schema: {exc}") from exc

    def _connect(self) -> Any:
        try:
            return self._psycopg.connect(
                self._dsn, autocommit=True, connect_timeout=max(1, round(self._timeout))
            )
        except self._psycopg.Error as exc:
            raise BackendUnavailable(f"cannot reach the PostgreSQL ledger: {exc}") from exc

    def write(self, events: Sequence[Event]) -> int:
        """Insert ``events`` in one transaction, each at most once, with the rollups;
        return how many were new."""
        if not events:
            return 0
        columns = [list(c) for c in zip(*rows_of(events), strict=True)]
        errors = self._psycopg.errors
        conn = self._conn()
        for attempt in range(_RETRIES):
            try:
                with conn.transaction():
                    row = conn.execute(_WRITE, columns).fetchone()
                return int(row[0])
            except (errors.DeadlockDetected, errors.SerializationFailure):
                if attempt == _RETRIES - 1:
                    raise BackendUnavailable("the PostgreSQL ledger kept deadlocking") from None
            except self._psycopg.Error as exc:
                raise BackendUnavailable(f"the PostgreSQL ledger refused a batch: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover
