"""Fixtures of the ledger tests: stores on SQLite (a temporary file) and on a
PostgreSQL database made for this test session (and dropped after it)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

#: The server's maintenance database: where the session's database is made.
ADMIN_URL = os.environ.get("METERKIT_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _no_postgres(why: str) -> None:
    message = f"no PostgreSQL to test against ({why})"
    if os.environ.get("METERKIT_REQUIRE_POSTGRES") == "1":
        pytest.fail(message + " and METERKIT_REQUIRE_POSTGRES=1")
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database made on the local PostgreSQL for this test session, dropped after it."""
    try:
        import psycopg
    except ImportError:
        _no_postgres("psycopg is not installed")
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        _no_postgres(str(exc).strip())
    name = "meterkit_test_" + secrets.token_hex(5)
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def postgres_server(postgres_url: str) -> Callable[[], str]:
    """A function that makes an empty schema in the session's database and returns a
    URL whose connections use it (so each test has its own tables, made in
    milliseconds rather than a database per test)."""
    import psycopg

    def fresh() -> str:
        schema = "t_" + secrets.token_hex(5)
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        return f"{postgres_url}?options=-c%20search_path%3D{schema}"

    return fresh


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty ledger store, on each kind of store in turn."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    fresh: Callable[[], str] = request.getfixturevalue("postgres_server")
    return fresh()


@pytest.fixture
def store(store_url: str) -> Iterator[Any]:
    """An empty ledger store, on each kind of store in turn."""
    from meterkit.ledger import store_from_url

    ledger = store_from_url(store_url)
    yield ledger
    ledger.close()
