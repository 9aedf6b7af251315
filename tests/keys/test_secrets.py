"""Nothing shaped like an API key's plaintext is echoed in an error, or accepted as an
id that would reach a backend's key names (issue 17, item 9)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from meterkit import MemoryKeyStore, MeterkitError, Policy

STORE_CALLS: list[tuple[str, Callable[[Any, str], object]]] = [
    ("revoke", lambda store, secret: store.revoke(secret)),
    ("get", lambda store, secret: store.get(secret)),
    ("rotate", lambda store, secret: store.rotate(secret, grace=0)),
    ("create-org", lambda store, secret: store.create(org=secret)),
    ("create-name", lambda store, secret: store.create(org="org_1", name=secret)),
    ("create-permission", lambda store, secret: store.create(org="org_1", permissions=[secret])),
    ("list", lambda store, secret: store.list(secret)),
]

METER_CALLS: list[tuple[str, Callable[[Any, str], object]]] = [
    ("key", lambda m, s: m.check(s, org="org_1", operation="invoices.list")),
    ("org", lambda m, s: m.check("key_1", org=s, operation="invoices.list")),
    ("operation", lambda m, s: m.check("key_1", org="org_1", operation=s)),
    (
        "idempotency_key",
        lambda m, s: m.check("key_1", org="org_1", operation="invoices.list", idempotency_key=s),
    ),
    ("peek-key", lambda m, s: m.peek(s, org="org_1", operation="invoices.list")),
    ("usage-org", lambda m, s: m.usage(s)),
    ("usage-key", lambda m, s: m.usage("org_1", key=s)),
    (
        "batch-key",
        lambda m, s: m.check_many([{"key": s, "operation": "invoices.list", "org": "o"}]),
    ),
]


@pytest.fixture
def secret() -> str:
    store = MemoryKeyStore()
    plaintext, _ = store.create(org="org_1", permissions=["invoices:read"])
    return str(plaintext)


@pytest.mark.parametrize(("name", "call"), STORE_CALLS, ids=[n for n, _ in STORE_CALLS])
def test_key_stores_refuse_a_plaintext_without_echoing_it(
    secret: str, name: str, call: Callable[[Any, str], object]
) -> None:
    """A plaintext passed where an id, org, name or permission goes is a typed error
    whose message does not contain it."""
    store = MemoryKeyStore()
    with pytest.raises(MeterkitError) as info:
        call(store, secret)
    assert secret not in str(info.value)
    assert secret[8:] not in str(info.value)


@pytest.mark.parametrize(("name", "call"), METER_CALLS, ids=[n for n, _ in METER_CALLS])
def test_the_meter_refuses_a_plaintext_as_any_id_on_every_backend(
    make_meter: Callable[[Policy], Any], secret: str, name: str, call: Callable[[Any, str], object]
) -> None:
    """meter.check(key=plaintext) and its siblings refuse the plaintext (it would become
    part of a Redis key name) without echoing it, and consume nothing."""
    meter = make_meter(Policy.crane_ledger())
    with pytest.raises(MeterkitError) as info:
        call(meter, secret)
    assert secret not in str(info.value)
    assert secret[8:] not in str(info.value)
    assert meter.usage("org_1").requests == 0
