"""What the SQLite and PostgreSQL stores share: the schema, the rows, the queries.

Three tables (``meterkit_`` names, in the database the URL names):

``meterkit_events``
    one row per event, its ``id`` the primary key: inserting an event twice inserts
    it once. ``day`` (UTC days since 1970) and ``month`` (``yyyymm``) are the
    event's time, precomputed for the rollups; ``source``, ``pos_ms`` and
    ``pos_seq`` are where the drain read it (see :class:`~meterkit.ledger.Event`).
    Indexed by (org, mode, at) for exports, top-ups and reconciliation.
``meterkit_usage_daily`` and ``meterkit_usage_monthly``
    per organization, mode, day (or month), key and operation: requests (charges),
    µ-credits charged, refunds and µ-credits refunded; ``meterkit_usage_org_daily``
    the same per organization and day (key and operation ''), for daily series.
    Updated in the transaction that inserts the events, from the events that
    transaction really inserted (an event delivered twice counts once), so that
    history never scans the events. A refund counts on the day it was made (in the
    month of its charge: a month's charges are refundable only within that month).

A batch of events is one transaction: the events, then the rollups. A drain
acknowledges a batch only after that transaction commits.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import date, timedelta
from typing import Any

from meterkit.ledger.events import CHARGE, REFUND, TOPUP, Event

__all__ = ["DAY_US", "Row", "SqlStore", "day_of", "month_of", "rows_of"]

DAY_US = 86_400_000_000
_EPOCH = date(1970, 1, 1)
#: One event as the events table holds it, in column order.
Row = tuple[str, int, int, int, str, str, str, str, str, int, str, str, str, int, int]
COLUMNS = (
    "id",
    "at",
    "day",
    "month",
    "org",
    "mode",
    "kind",
    "key_id",
    "operation",
    "micro",
    "charge",
    "detail",
    "source",
    "pos_ms",
    "pos_seq",
)

# The three rollups (per key and day, per organization and day, per key and month)
# have one shape; ``{options}`` is the dialect's, filled in when the schema is made.
_ROLLUP = """CREATE TABLE IF NOT EXISTS meterkit_usage_{table} (
        org TEXT NOT NULL,
        mode TEXT NOT NULL,
        {period} INTEGER NOT NULL,
        key_id TEXT NOT NULL,
        operation TEXT NOT NULL,
        requests BIGINT NOT NULL,
        charged BIGINT NOT NULL,
        refunds BIGINT NOT NULL,
        refunded BIGINT NOT NULL,
        PRIMARY KEY (org, mode, {period}, key_id, operation)
    ){{options}}"""

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS meterkit_events (
        id TEXT PRIMARY KEY,
        at BIGINT NOT NULL,
        day INTEGER NOT NULL,
        month INTEGER NOT NULL,
        org TEXT NOT NULL,
        mode TEXT NOT NULL,
        kind TEXT NOT NULL,
        key_id TEXT NOT NULL,
        operation TEXT NOT NULL,
        micro BIGINT NOT NULL,
        charge TEXT NOT NULL,
        detail TEXT NOT NULL,
        source TEXT NOT NULL,
        pos_ms BIGINT NOT NULL,
        pos_seq BIGINT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS meterkit_events_org ON meterkit_events (org, mode, at)",
    _ROLLUP.format(table="daily", period="day"),
    """CREATE INDEX IF NOT EXISTS meterkit_usage_daily_key
        ON meterkit_usage_daily (org, mode, key_id, day)""",
    _ROLLUP.format(table="org_daily", period="day"),
    _ROLLUP.format(table="monthly", period="month"),
)

# A rollup row's sums are added to what the row holds (or make the row).
_UPSERT = """INSERT INTO meterkit_usage_{table} AS u
    (org, mode, {period}, key_id, operation, requests, charged, refunds, refunded)
    {source}
    ON CONFLICT (org, mode, {period}, key_id, operation) DO UPDATE SET
        requests = u.requests + excluded.requests,
        charged = u.charged + excluded.charged,
        refunds = u.refunds + excluded.refunds,
        refunded = u.refunded + excluded.refunded"""


def upsert_sql(table: str, period: str, source: str) -> str:
    """The statement that adds ``source``'s rows (a ``VALUES`` or a ``SELECT``) to the
    ``table`` rollup, whose period column is ``period``."""
    return _UPSERT.format(table=table, period=period, source=source)


#: One rollup row: (org, mode, day, month, key, operation, requests, charged,
#: refunds, refunded) for a day; without the day for a month.
RollupRow = tuple[Any, ...]


def daily_sums(rows: Iterable[Row]) -> list[RollupRow]:
    """The daily rollup rows of the events ``rows`` (those a batch really inserted),
    in key order: concurrent drains then lock rollup rows in one order (PostgreSQL)
    and never deadlock each other."""
    sums: dict[tuple[str, str, int, int, str, str], list[int]] = {}
    for row in rows:
        kind = row[6]
        if kind == CHARGE:
            at = 0
        elif kind == REFUND:
            at = 2
        else:
            continue
        key = (row[4], row[5], row[2], row[3], row[7], row[8])
        acc = sums.get(key)
        if acc is None:
            acc = sums[key] = [0, 0, 0, 0]
        acc[at] += 1
        acc[at + 1] += row[9]
    return [(*key, *acc) for key, acc in sorted(sums.items())]


def org_daily_sums(daily: Iterable[RollupRow]) -> list[RollupRow]:
    """The organization-wide daily rollup rows (key and operation '') of some daily
    rollup rows, in key order: a day of an organization with many keys is one row."""
    sums: dict[tuple[str, str, int, int, str, str], list[int]] = {}
    for org, mode, day, month, _, _, a, b, c, d in daily:
        acc = sums.setdefault((org, mode, day, month, "", ""), [0, 0, 0, 0])
        acc[0] += a
        acc[1] += b
        acc[2] += c
        acc[3] += d
    return [(*key, *acc) for key, acc in sorted(sums.items())]


def monthly_sums(
    daily: Iterable[RollupRow],
) -> list[RollupRow]:
    """The monthly rollup rows of some daily rollup rows, in key order."""
    sums: dict[tuple[str, str, int, str, str], list[int]] = {}
    for org, mode, _, month, key, op, a, b, c, d in daily:
        acc = sums.setdefault((org, mode, month, key, op), [0, 0, 0, 0])
        acc[0] += a
        acc[1] += b
        acc[2] += c
        acc[3] += d
    return [(*key, *acc) for key, acc in sorted(sums.items())]


def day_of(at_us: int) -> int:
    """The UTC day (days since 1970-01-01) of a time in µs."""
    return at_us // DAY_US


def month_of(day: int) -> int:
    """The month (``yyyymm``) of a UTC day number."""
    d = _EPOCH + timedelta(days=day)
    return d.year * 100 + d.month


def rows_of(events: Iterable[Event]) -> list[Row]:
    """Events as rows of the events table."""
    months: dict[int, int] = {}
    rows: list[Row] = []
    for e in events:
        day = e.time // DAY_US
        month = months.get(day)
        if month is None:
            month = months[day] = month_of(day)
        rows.append(
            (
                e.id,
                e.time,
                day,
                month,
                e.org,
                e.mode,
                e.kind,
                e.key,
                e.operation,
                e.micro,
                e.charge,
                e.detail,
                e.source,
                e.position[0],
                e.position[1],
            )
        )
    return rows


def _event(row: Sequence[Any]) -> Event:
    (id_, at, org, mode, kind, key, operation, micro, charge, detail, source, ms, seq) = row
    return Event(id_, at, org, mode, kind, key, operation, micro, charge, detail, source, (ms, seq))


#: [requests, µ-credits charged, refunds, µ-credits refunded]
Sums = list[int]


class SqlStore:
    """The queries of a ledger store over a DB-API connection (one per thread)."""

    #: how the dialect writes a query parameter
    _param = "?"
    url: str

    def __init__(self) -> None:
        self._local = threading.local()
        self._connections: list[Any] = []
        self._guard = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- connections -------------------------------------------------------------

    def _connect(self) -> Any:  # pragma: no cover - per dialect
        raise NotImplementedError

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                from meterkit.errors import BackendError

                raise BackendError("this ledger store is closed")
            conn = self._local.conn = self._connect()
            with self._guard:
                self._connections.append(conn)
        return conn

    def close(self) -> None:
        """Close every connection this store opened (in any thread)."""
        with self._guard:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            with contextlib.suppress(Exception):  # (another thread's, perhaps broken)
                conn.close()

    def __enter__(self) -> SqlStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _q(self, sql: str) -> str:
        return sql if self._param == "?" else sql.replace("?", self._param)

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        conn = self._conn()
        try:
            cur = conn.execute(self._q(sql), params)
            rows = cur.fetchall()
        finally:
            self._end_read(conn)
        return list(rows)

    def _end_read(self, conn: Any) -> None:
        """End a read's transaction (PostgreSQL opens one per statement)."""

    # -- writing --------------------------------------------------------------------

    def write(self, events: Sequence[Event]) -> int:  # pragma: no cover - per dialect
        """Insert ``events`` in one transaction, each at most once, with the rollups;
        return how many were new."""
        raise NotImplementedError

    # -- reading ---------------------------------------------------------------------

    def count(self) -> int:
        """How many events the store holds."""
        return int(self._read("SELECT COUNT(*) FROM meterkit_events")[0][0])

    def events(
        self,
        *,
        org: str | None = None,
        mode: str | None = None,
        since: int | None = None,
        until: int | None = None,
        batch: int = 5000,
    ) -> Iterator[Event]:
        """The events of [since, until) µs (of ``org`` and ``mode`` if given), oldest
        first (by time, then by their place in their stream), read ``batch`` at a time."""
        where, params = self._where(org, mode, since, until)
        cursor: tuple[int, int, int, str] | None = None
        while True:
            page = where
            args = list(params)
            if cursor is not None:
                page = (page + " AND " if page else "") + "(at, pos_ms, pos_seq, id) > (?, ?, ?, ?)"
                args += list(cursor)
            rows = self._read(
                "SELECT id, at, org, mode, kind, key_id, operation, micro, charge, detail, "
                "source, pos_ms, pos_seq FROM meterkit_events"
                + (f" WHERE {page}" if page else "")
                + f" ORDER BY at, pos_ms, pos_seq, id LIMIT {int(batch)}",
                args,
            )
            for row in rows:
                yield _event(row)
            if len(rows) < batch:
                return
            last = rows[-1]
            cursor = (last[1], last[11], last[12], last[0])

    @staticmethod
    def _where(
        org: str | None, mode: str | None, since: int | None, until: int | None
    ) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (("org", org), ("mode", mode)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            clauses.append("at >= ?")
            params.append(since)
        if until is not None:
            clauses.append("at < ?")
            params.append(until)
        return " AND ".join(clauses), params

    def usage_by(
        self,
        by: str,
        org: str,
        mode: str,
        since_day: int,
        until_day: int,
        key: str | None = None,
    ) -> list[tuple[Any, int, int, int, int, int]]:
        """Sums over [since_day, until_day) for one organization (or one of its
        keys), grouped ``by`` ``"day"``, ``"key"``, ``"operation"`` or ``"key,operation"``:
        rows of (group, requests, charged, refunds, refunded) (the group a tuple for
        two columns). Whole months are read from the monthly rollup."""
        columns = {"day": "day", "key": "key_id", "operation": "operation"}
        if by == "key,operation":
            group = "key_id, operation"
        elif by in columns:
            group = columns[by]
        else:
            raise ValueError(by)
        sums = "SUM(requests), SUM(charged), SUM(refunds), SUM(refunded)"
        key_clause = " AND key_id = ?" if key is not None else ""
        key_param = [key] if key is not None else []
        parts: list[tuple[str, list[Any]]] = []
        spans = [("day", since_day, until_day)] if by == "day" else _spans(since_day, until_day)
        for table, lo, hi in spans:
            period = "day" if table == "day" else "month"
            rollup = "daily" if table == "day" else "monthly"
            if by == "day" and key is None:
                rollup = "org_daily"  # (one row a day, whatever the keys)
            parts.append(
                (
                    f"SELECT {group}, {sums} FROM meterkit_usage_{rollup}"
                    f" WHERE org = ? AND mode = ? AND {period} >= ? AND {period} < ?{key_clause}"
                    f" GROUP BY {group}",
                    [org, mode, lo, hi, *key_param],
                )
            )
        merged: dict[Any, list[int]] = {}
        width = 2 if by == "key,operation" else 1
        for sql, params in parts:
            for row in self._read(sql, params):
                name = tuple(row[:width]) if width == 2 else row[0]
                acc = merged.setdefault(name, [0, 0, 0, 0])
                for i in range(4):
                    acc[i] += int(row[width + i] or 0)
        return [
            (name, acc[0], acc[1], acc[2], acc[3], acc[1] - acc[3])
            for name, acc in sorted(merged.items())
        ]

    def topped_up(self, org: str, mode: str, since: int, until: int) -> tuple[int, int]:
        """(count, µ-credits) of the top-ups of [since, until) µs."""
        (n, micro) = self._read(
            "SELECT COUNT(*), SUM(micro) FROM meterkit_events "
            "WHERE org = ? AND mode = ? AND at >= ? AND at < ? AND kind = ?",
            [org, mode, since, until, TOPUP],
        )[0]
        return int(n), int(micro or 0)

    def orgs(self, since: int, until: int) -> list[tuple[str, str]]:
        """The (organization, mode) pairs with events in [since, until) µs."""
        rows = self._read(
            "SELECT DISTINCT org, mode FROM meterkit_usage_monthly WHERE month >= ? AND month < ?",
            [month_of(day_of(since)), month_of(day_of(until - 1)) + 1],
        )
        rows += self._read(
            "SELECT DISTINCT org, mode FROM meterkit_events WHERE kind = ? AND at >= ? AND at < ?",
            [TOPUP, since, until],
        )
        return sorted({(r[0], r[1]) for r in rows})

    def sums(
        self,
        org: str,
        mode: str,
        since: int,
        until: int,
        upto: tuple[str, tuple[int, int]] | None = None,
    ) -> tuple[dict[tuple[str, str], Sums], int, set[str]]:
        """The ledger's sums of one organization over [since, until) µs, from the
        events themselves: per (key, operation) [requests, charged, refunds,
        refunded], the µ-credits topped up, and the ids counted. With ``upto``
        (source, position), events of that source past that position are left out
        (they happened after a snapshot of the counters)."""
        sql = (
            "SELECT id, kind, key_id, operation, micro FROM meterkit_events "
            "WHERE org = ? AND mode = ? AND at >= ? AND at < ? AND kind IN (?, ?, ?)"
        )
        params: list[Any] = [org, mode, since, until, CHARGE, REFUND, TOPUP]
        if upto is not None:
            source, (ms, seq) = upto
            sql += " AND NOT (source = ? AND (pos_ms > ? OR (pos_ms = ? AND pos_seq > ?)))"
            params += [source, ms, ms, seq]
        pairs: dict[tuple[str, str], Sums] = {}
        topup = 0
        ids: set[str] = set()
        for id_, kind, key, operation, micro in self._read(sql, params):
            ids.add(id_)
            add_event(pairs, kind, key, operation, int(micro))
            if kind == TOPUP:
                topup += int(micro)
        return pairs, topup, ids


def add_event(pairs: dict[tuple[str, str], Sums], kind: str, key: str, op: str, micro: int) -> None:
    """Count one charge or refund in per-(key, operation) sums."""
    if kind == CHARGE:
        acc = pairs.setdefault((key, op), [0, 0, 0, 0])
        acc[0] += 1
        acc[1] += micro
    elif kind == REFUND:
        acc = pairs.setdefault((key, op), [0, 0, 0, 0])
        acc[2] += 1
        acc[3] += micro


def _spans(since_day: int, until_day: int) -> list[tuple[str, int, int]]:
    """[since_day, until_day) as daily spans around whole months (as yyyymm bounds)."""
    spans: list[tuple[str, int, int]] = []
    first = _EPOCH + timedelta(days=since_day)
    last = _EPOCH + timedelta(days=until_day)
    # the first whole month starts on or after since_day
    m0 = first if first.day == 1 else _next_month(first)
    m1 = last.replace(day=1)
    if m0 >= m1:
        return [("day", since_day, until_day)]
    d0 = (m0 - _EPOCH).days
    d1 = (m1 - _EPOCH).days
    if since_day < d0:
        spans.append(("day", since_day, d0))
    spans.append(("month", m0.year * 100 + m0.month, m1.year * 100 + m1.month))
    if d1 < until_day:
        spans.append(("day", d1, until_day))
    return spans


def _next_month(d: date) -> date:
    return date(d.year + 1, 1, 1) if d.month == 12 else date(d.year, d.month + 1, 1)


Connector = Callable[[], Any]
