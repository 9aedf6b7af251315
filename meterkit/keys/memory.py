"""API keys in this process's memory: :class:`MemoryKeyStore` and its asyncio twin."""

from __future__ import annotations

import builtins
import threading
from typing import TYPE_CHECKING, Any

import msgspec

from meterkit._twins import awaitable
from meterkit.errors import UnknownKeyError
from meterkit.keys.model import (
    USE_RESOLUTION,
    ApiKey,
    DurationLike,
    PlaintextKey,
    TimeLike,
    check_key_id,
    sort_keys,
)
from meterkit.keys.rules import KeyRules, RuledStore

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from meterkit.keys.model import KeyOptions, NewKey

__all__ = ["AsyncMemoryKeyStore", "MemoryKeyStore"]


class MemoryKeyStore(RuledStore):
    """Keys in this process's memory: for tests, development and single-process servers.

    Reads take no lock (a dict lookup is atomic); changes take one lock, and the record
    of a key is replaced whole (records are immutable), so a concurrent ``revoke`` is
    never undone by an ``authenticate`` recording its use. ``options``: see
    :class:`~meterkit.keys.model.KeyOptions` (clock, token prefix, peppers, statuses).
    """

    def __init__(self, **options: Unpack[KeyOptions]) -> None:
        self._rules = KeyRules(**options)
        self._records: dict[str, ApiKey] = {}
        self._by_org: dict[str, builtins.list[str]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryKeyStore(token_prefix={self._rules.format.prefix!r})"

    def _keep(self, record: ApiKey) -> None:
        self._records[record.id] = record
        self._by_org.setdefault(record.org, []).append(record.id)

    def create(self, *, org: str, **key: Unpack[NewKey]) -> tuple[PlaintextKey, ApiKey]:
        """See :meth:`KeyStore.create`."""
        while True:
            plaintext, record = self._rules.new_key(org=org, now=self._rules.clock(), **key)
            with self._lock:
                if record.id not in self._records:  # 71 random bits: a retry is theoretical
                    self._keep(record)
                    return plaintext, record

    def get(self, key_id: str) -> ApiKey | None:
        """See :meth:`KeyStore.get`."""
        return self._records.get(check_key_id(key_id))

    def list(self, org: str) -> builtins.list[ApiKey]:
        """See :meth:`KeyStore.list`."""
        ids = builtins.list(self._by_org.get(self._rules.check_org(org), ()))
        return sort_keys(self._records[key_id] for key_id in ids)

    def revoke(self, key_id: str) -> ApiKey:
        """See :meth:`KeyStore.revoke`."""
        check_key_id(key_id)
        with self._lock:
            record = self._records.get(key_id)
            if record is None:
                raise UnknownKeyError(f"no API key {key_id}")
            if record.revoked_at is None:
                record = msgspec.structs.replace(record, revoked_at=self._rules.clock())
                self._records[key_id] = record
            return record

    def rotate(self, key_id: str, *, grace: DurationLike) -> tuple[PlaintextKey, ApiKey]:
        """See :meth:`KeyStore.rotate`."""
        check_key_id(key_id)
        while True:
            with self._lock:
                old, plaintext, new = self._rules.rotation(
                    self._records.get(key_id), key_id, grace, self._rules.clock()
                )
                if new.id not in self._records:
                    self._records[key_id] = old
                    self._keep(new)
                    return plaintext, new

    def set_expiry(self, key_id: str, expires_at: TimeLike | None) -> ApiKey:
        """See :meth:`KeyStore.set_expiry`."""
        check_key_id(key_id)
        with self._lock:
            record = self._rules.expiry_change(
                self._records.get(key_id), key_id, expires_at, self._rules.clock()
            )
            self._records[key_id] = record
            return record

    def authenticate(
        self, authorization: str | bytes | None, *, org: str | None, permission: str | None = None
    ) -> ApiKey:
        """See :meth:`KeyStore.authenticate`."""
        rules = self._rules
        wildcard = rules.requested(permission)
        key_id, digests = rules.read_header(authorization)
        found = self._records.get(key_id)
        record = rules.verified(found, digests)
        now = rules.clock()
        last = record.last_used_at
        # The use is recorded to the second (USE_RESOLUTION): a write per request would
        # take the lock and copy the record on every request of a busy key.
        if last is None or now >= last + USE_RESOLUTION or record is not found:
            with self._lock:
                record = self._records[key_id]
                changes: dict[str, Any] = {}
                if found is not None and record.secret_hash == found.secret_hash:
                    # (a previous pepper's hash becomes the current pepper's; a record
                    # changed meanwhile keeps its own)
                    changes["secret_hash"] = digests[0]
                last = record.last_used_at
                if last is None or now >= last + USE_RESOLUTION:
                    changes["last_used_at"] = now
                record = msgspec.structs.replace(record, **changes)
                self._records[key_id] = record
        return rules.admit(record, now, org, permission, wildcard)

    def close(self) -> None:
        """Nothing to release: present for the :class:`KeyStore` protocol."""


class AsyncMemoryKeyStore(RuledStore):
    """:class:`MemoryKeyStore` behind ``async`` methods (nothing in it ever blocks).

    ``sync`` is the underlying store, for code that shares it with synchronous callers.
    """

    def __init__(self, **options: Unpack[KeyOptions]) -> None:
        self.sync = MemoryKeyStore(**options)
        self._rules = self.sync.rules

    def __repr__(self) -> str:
        return f"AsyncMemoryKeyStore(token_prefix={self.sync.key_format.prefix!r})"

    create = awaitable(MemoryKeyStore.create)
    get = awaitable(MemoryKeyStore.get)
    list = awaitable(MemoryKeyStore.list)
    revoke = awaitable(MemoryKeyStore.revoke)
    rotate = awaitable(MemoryKeyStore.rotate)
    set_expiry = awaitable(MemoryKeyStore.set_expiry)
    authenticate = awaitable(MemoryKeyStore.authenticate)
    aclose = awaitable(MemoryKeyStore.close)
