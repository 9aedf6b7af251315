"""A short-lived, in-process cache of authenticated keys in front of any key store.

On Redis, ``authenticate`` is a round trip per request, and the meter's check another.
:class:`CachedKeyStore` (and :class:`AsyncCachedKeyStore` for asynchronous stores)
remembers, for ``ttl`` seconds, the record each presented key resolved to; within
that time the same key is admitted or refused locally, by the store's own rules
(expiry, organization, permission) against the remembered record, in a few
microseconds and no round trip.

What that costs, and why it is a choice you make: a key revoked (or rotated out) in
another process keeps working here for up to ``ttl``; ``last_used_at`` moves once
per ``ttl`` per process instead of on every request. ``revoke`` and ``rotate`` made
through the cache forget that key at once. Only admissions are remembered: a refused
header always reaches the store (so made-up keys cannot fill the cache), and so does
a key admitted for one organization or permission when asked for another.

Entries are keyed by the BLAKE2s digest of the presented header, never by the header: the
cache holds no plaintext. At most ``max_entries`` are kept; the oldest go first.
"""

from __future__ import annotations

import builtins
import math
import threading
from typing import TYPE_CHECKING, Generic, TypeVar

from meterkit._twins import blocking
from meterkit.errors import ConfigurationError, MeterkitError
from meterkit.keys.model import (
    ApiKey,
    AsyncKeyStore,
    DurationLike,
    KeyStore,
    PlaintextKey,
    TimeLike,
)
from meterkit.keys.rules import KeyRules, RuledStore, header_digest

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from meterkit.keys.model import NewKey

__all__ = ["AsyncCachedKeyStore", "CachedKeyStore"]

S = TypeVar("S")


class _Cache:
    """The part both shells share: entries by header digest, and their key ids."""

    __slots__ = ("_by_id", "_entries", "_lock", "generation", "max_entries", "rules", "ttl")

    def __init__(self, rules: KeyRules, ttl: object, max_entries: object) -> None:
        if (
            isinstance(ttl, bool)
            or not isinstance(ttl, (int, float))
            or not math.isfinite(ttl)
            or not 0 < ttl <= 3600
        ):
            raise ConfigurationError("is a number of seconds in (0, 3600]", "ttl")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigurationError("is a positive integer", "max_entries")
        self.rules = rules
        self.ttl = float(ttl)
        self.max_entries = max_entries
        # digest -> (record, time fetched); insertion order is age order
        self._entries: dict[bytes, tuple[ApiKey, float]] = {}
        self._by_id: dict[str, set[bytes]] = {}
        self._lock = threading.Lock()
        #: Moves on every forget: a record fetched before one is not kept after it
        #: (it may be the record of a key being revoked right then).
        self.generation = 0

    @staticmethod
    def digest(authorization: object) -> bytes | None:
        if isinstance(authorization, str):
            try:
                authorization = authorization.encode("latin-1")
            except UnicodeEncodeError:
                return None  # no key of ours: the store refuses it
        if not isinstance(authorization, bytes):
            return None
        return header_digest(authorization)

    def lookup(
        self, digest: bytes | None, org: str | None, permission: str | None
    ) -> ApiKey | None:
        """The remembered record, admitted by the store's rules now; None when there is
        none fresh, or when it would be refused (the store then decides, and says why)."""
        if digest is None:
            return None
        entry = self._entries.get(digest)
        if entry is None:
            return None
        record, fetched = entry
        rules = self.rules
        now = rules.clock()
        if not fetched <= now < fetched + self.ttl:
            return None
        try:
            return rules.admit(record, now, org, permission, rules.requested(permission))
        except MeterkitError:  # refused here: the store refuses it too, with its own answer
            return None

    def keep(self, digest: bytes | None, record: ApiKey, generation: int) -> None:
        if digest is None:
            return
        now = self.rules.clock()
        with self._lock:
            if generation != self.generation:
                return
            entries = self._entries
            entries.pop(digest, None)  # (a refreshed entry moves to the young end)
            entries[digest] = (record, now)
            self._by_id.setdefault(record.id, set()).add(digest)
            while len(entries) > self.max_entries:
                old = next(iter(entries))
                gone, _ = entries.pop(old)
                digests = self._by_id.get(gone.id)
                if digests is not None:
                    digests.discard(old)
                    if not digests:
                        del self._by_id[gone.id]

    def forget(self, key_id: str) -> None:
        with self._lock:
            self.generation += 1
            for digest in self._by_id.pop(key_id, ()):
                self._entries.pop(digest, None)

    def __len__(self) -> int:
        return len(self._entries)


def _rules_of(store: object) -> KeyRules:
    rules = getattr(store, "rules", None)
    if not isinstance(rules, KeyRules):
        raise ConfigurationError(
            "is a meterkit key store (memory or Redis, sync or async), which has .rules",
            "store",
        )
    return rules


class _CachedStore(RuledStore, Generic[S]):
    """What the two caches share: the wrapped store and its cache."""

    def __init__(self, store: S, *, ttl: float = 5.0, max_entries: int = 100_000) -> None:
        self.store: S = store
        self._rules = _rules_of(store)
        self._cache = _Cache(self._rules, ttl, max_entries)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.store!r}, ttl={self._cache.ttl})"


class AsyncCachedKeyStore(_CachedStore[AsyncKeyStore]):
    """``store`` (an asynchronous key store) with ``authenticate`` answered from memory
    for ``ttl`` seconds after the store admitted a key (see the module's notes).
    :class:`CachedKeyStore` is its twin for synchronous stores."""

    async def authenticate(
        self, authorization: str | bytes | None, *, org: str | None, permission: str | None = None
    ) -> ApiKey:
        """See :meth:`~meterkit.KeyStore.authenticate`; from memory while fresh."""
        digest = self._cache.digest(authorization)
        record = self._cache.lookup(digest, org, permission)
        if record is None:
            generation = self._cache.generation
            record = await self.store.authenticate(authorization, org=org, permission=permission)
            self._cache.keep(digest, record, generation)
        return record

    async def create(self, *, org: str, **key: Unpack[NewKey]) -> tuple[PlaintextKey, ApiKey]:
        """See :meth:`~meterkit.KeyStore.create`."""
        return await self.store.create(org=org, **key)

    async def get(self, key_id: str) -> ApiKey | None:
        """See :meth:`~meterkit.KeyStore.get` (always the store's record)."""
        return await self.store.get(key_id)

    async def list(self, org: str) -> builtins.list[ApiKey]:
        """See :meth:`~meterkit.KeyStore.list`."""
        return await self.store.list(org)

    async def revoke(self, key_id: str) -> ApiKey:
        """See :meth:`~meterkit.KeyStore.revoke`; this cache forgets the key at once."""
        try:
            return await self.store.revoke(key_id)
        finally:
            self._cache.forget(key_id)

    async def rotate(self, key_id: str, *, grace: DurationLike) -> tuple[PlaintextKey, ApiKey]:
        """See :meth:`~meterkit.KeyStore.rotate`; this cache forgets the old key at once."""
        try:
            return await self.store.rotate(key_id, grace=grace)
        finally:
            self._cache.forget(key_id)

    async def set_expiry(self, key_id: str, expires_at: TimeLike | None) -> ApiKey:
        """See :meth:`~meterkit.KeyStore.set_expiry`; this cache forgets the key at once."""
        try:
            return await self.store.set_expiry(key_id, expires_at)
        finally:
            self._cache.forget(key_id)

    async def aclose(self) -> None:
        """Close the wrapped store."""
        await self.store.aclose()


class CachedKeyStore(_CachedStore[KeyStore]):
    """``store`` (a synchronous key store) with ``authenticate`` answered from memory
    for ``ttl`` seconds after the store admitted a key (see the module's notes)."""

    authenticate = blocking(AsyncCachedKeyStore.authenticate)
    create = blocking(AsyncCachedKeyStore.create)
    get = blocking(AsyncCachedKeyStore.get)
    list = blocking(AsyncCachedKeyStore.list)
    revoke = blocking(AsyncCachedKeyStore.revoke)
    rotate = blocking(AsyncCachedKeyStore.rotate)
    set_expiry = blocking(AsyncCachedKeyStore.set_expiry)
    close = blocking(AsyncCachedKeyStore.aclose)
