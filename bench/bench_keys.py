"""How long authenticating one API key takes on the memory store (target: <= 5 us median).

Run: ``PYTHONPATH=. python -m pytest bench/bench_keys.py --benchmark-only -q``

There is no peer library that parses, checksums, hashes and scopes API keys, so the
baseline in the same run is the floor any such check pays: one HMAC-SHA256 of the
plaintext (``hmac.digest``) plus one dict lookup. ``test_ratio_to_the_hmac_floor``
interleaves the two in short rounds (``bench._interleave``) and reports the median of the
per-round ratios in the end-of-run figures, then benches the floor itself.

A store remembers what a header parses and hashes to (under the header's BLAKE2s digest), so
a key presented again skips the HMAC and can beat that floor; ``authenticate (new)``
forgets before each call, and is what a header seen for the first time costs.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from typing import Any

import pytest

from bench._interleave import interleave
from meterkit.errors import AuthenticationError
from meterkit.keys.memory import MemoryKeyStore

PEPPER = b"bench-pepper-0123456789abcdef"
QUICK = os.environ.get("METERKIT_BENCH_QUICK") == "1"


@pytest.fixture(scope="module")
def keyed() -> tuple[MemoryKeyStore, str]:
    """A peppered memory store with 1,000 keys, and the header of one of them."""
    store = MemoryKeyStore(pepper=PEPPER)
    header = ""
    for number in range(1000):
        plaintext, _ = store.create(org=f"org_{number % 50}", permissions=["invoices:*"])
        if number == 500:
            header = f"Bearer {plaintext}"
    return store, header


def test_authenticate_admitted(benchmark: Any, keyed: tuple[MemoryKeyStore, str]) -> None:
    """A valid key, its organization and a wildcard permission: the common path."""
    store, header = keyed
    org = store.authenticate(header, org=None).org
    result = benchmark(store.authenticate, header, org=org, permission="invoices:read")
    assert result.org == org


def test_authenticate_refused_by_checksum(
    benchmark: Any, keyed: tuple[MemoryKeyStore, str]
) -> None:
    """A mistyped key: refused by its checksum, before any lookup."""
    store, header = keyed
    typo = header[:-1] + ("A" if header[-1] != "A" else "B")

    def refuse() -> str:
        try:
            store.authenticate(typo, org=None)
        except AuthenticationError as exc:
            return exc.code
        raise AssertionError("a typo was admitted")

    assert benchmark(refuse) == "invalid_api_key"


def test_authenticate_refused_oversized(benchmark: Any, keyed: tuple[MemoryKeyStore, str]) -> None:
    """A 10 KB header: refused by its length alone."""
    store, _ = keyed
    huge = "Bearer " + "A" * 10_240

    def refuse() -> str:
        try:
            store.authenticate(huge, org=None)
        except AuthenticationError as exc:
            return exc.code
        raise AssertionError("a 10 KB header was admitted")

    assert benchmark(refuse) == "invalid_api_key"


def test_ratio_to_the_hmac_floor(
    benchmark: Any, figures: Callable[[str], None], keyed: tuple[MemoryKeyStore, str]
) -> None:
    """authenticate against one hmac.digest + dict lookup, interleaved; the floor is benched."""
    store, header = keyed
    org = store.authenticate(header, org=None).org
    token = header[len("Bearer ") :].encode()
    table = {hmac.digest(PEPPER, token, "sha256"): org}

    def ours() -> None:
        store.authenticate(header, org=org, permission="invoices:read")

    def floor() -> None:
        table.get(hmac.digest(PEPPER, token, "sha256"))

    remembered = store.rules._read

    def first_seen() -> None:
        remembered.clear()  # (as if this header had never been presented)
        store.authenticate(header, org=org, permission="invoices:read")

    result = interleave(
        {"authenticate": ours, "authenticate (new)": first_seen, "hmac+dict": floor},
        rounds=5 if QUICK else 15,
    )
    figures(result.table())
    figures(
        f"RATIO authenticate / (hmac.digest + dict lookup): "
        f"{result.ratio('authenticate', 'hmac+dict'):.2f}x the floor's time; "
        f"authenticate median {result.median_us('authenticate'):.2f} us (target <= 5 us; "
        f"median of {result.rounds} interleaved rounds); a header seen for the first time: "
        f"{result.median_us('authenticate (new)'):.2f} us"
    )
    benchmark(floor)


def test_cached_authenticate_against_the_store(
    benchmark: Any, figures: Callable[[str], None], keyed: tuple[MemoryKeyStore, str]
) -> None:
    """CachedKeyStore's hit (a digest, a dict lookup, the store's admission rules)
    against the memory store's authenticate, interleaved. On Redis a hit also saves
    the round trip, which no in-process figure shows."""
    from meterkit import CachedKeyStore

    store, header = keyed
    cached = CachedKeyStore(store, ttl=3600)
    org = cached.authenticate(header, org=None).org

    def hit() -> None:
        cached.authenticate(header, org=org, permission="invoices:read")

    def uncached() -> None:
        store.authenticate(header, org=org, permission="invoices:read")

    result = interleave({"cached": hit, "store": uncached}, rounds=5 if QUICK else 15)
    figures(result.table())
    figures(
        f"RATIO cached authenticate: {result.median_us('cached'):.2f} us, "
        f"{result.ratio('store', 'cached'):.2f}x faster than the memory store's "
        f"({result.median_us('store'):.2f} us; median of {result.rounds} interleaved rounds)"
    )
    benchmark(hit)
