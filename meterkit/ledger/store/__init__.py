"""Ledger stores: where drained events are kept, and history is read from.

``store_from_url("sqlite:///path/to/ledger.db")`` (SQLite, in the standard library;
four slashes for an absolute path: ``sqlite:////var/lib/ledger.db``) or
``store_from_url("postgresql://user@host:5432/db")`` (psycopg 3, ``pip install
meterkit[postgres]``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from meterkit.errors import ConfigurationError
from meterkit.ledger.events import Event
from meterkit.ledger.store.sqlite import SqliteStore

__all__ = ["LedgerStore", "SqliteStore", "store_from_url"]


class LedgerStore(Protocol):
    """What a drain writes to and history reads from (see ``_sql.SqlStore``)."""

    url: str

    def write(self, events: Sequence[Event]) -> int: ...

    def count(self) -> int: ...

    def events(
        self,
        *,
        org: str | None = None,
        mode: str | None = None,
        since: int | None = None,
        until: int | None = None,
        batch: int = 5000,
    ) -> Iterator[Event]: ...

    def usage_by(
        self, by: str, org: str, mode: str, since_day: int, until_day: int, key: str | None = None
    ) -> list[tuple[Any, int, int, int, int, int]]: ...

    def topped_up(self, org: str, mode: str, since: int, until: int) -> tuple[int, int]: ...

    def orgs(self, since: int, until: int) -> list[tuple[str, str]]: ...

    def sums(
        self,
        org: str,
        mode: str,
        since: int,
        until: int,
        upto: tuple[str, tuple[int, int]] | None = None,
    ) -> tuple[dict[tuple[str, str], list[int]], int, set[str]]: ...

    def close(self) -> None: ...


def store_from_url(url: str) -> LedgerStore:
    """The ledger store ``url`` names: ``sqlite:///relative.db``,
    ``sqlite:////absolute.db`` or ``postgresql://…`` (``postgres://`` too)."""
    if not isinstance(url, str):
        raise ConfigurationError(f"a ledger URL is a str, not {type(url).__name__}", "url")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        path = url.split("://", 1)[1]
        if not path.startswith("/") or path == "/":
            raise ConfigurationError(
                "a SQLite ledger URL is sqlite:///relative/path.db or sqlite:////absolute/path.db",
                "url",
            )
        return SqliteStore(path[1:])
    if scheme in ("postgresql", "postgres"):
        from meterkit.ledger.store.postgresql import PostgresStore

        return PostgresStore(url)
    # Never echo the URL: it may hold a password.
    raise ConfigurationError(
        f"unsupported ledger URL scheme {scheme!r}; use sqlite:///path.db or postgresql://…",
        "url",
    )
