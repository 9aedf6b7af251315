"""API keys in Redis: a synchronous and an asynchronous store sharing every line but the I/O.

Layout (``mk`` is the configurable ``namespace``); no name or value holds a plaintext::

    mk:key:<key id>          hash   rec      JSON of the record's fixed facts (msgspec)
                                    hash     hex HMAC-SHA256 (or SHA-256) of the plaintext
                                    expires  UNIX seconds, absent for "never"
                                    revoked  UNIX seconds, absent while not revoked
                                    used     UNIX seconds of the last presentation
    mk:org:<org>:keys        set    ids of the organization's keys

Each operation is written once, as a generator that yields the Redis calls it needs
(:class:`_Command`, :class:`_Script`, :class:`_Pipeline`) and receives their replies;
:class:`RedisKeyStore` and :class:`AsyncRedisKeyStore` only run those calls, blocking
or awaited. ``authenticate`` is one ``EVALSHA`` on one key: it reads the record and, if
the presented hash is the stored one, records the use in the same step. The scripts hold
no policy: expiry, revocation, organization and permissions are decided in Python by
:class:`~meterkit.keys.rules.KeyRules`, as for the memory store. Changes that depend on what
was read (``rotate``) are guarded in their script by the values read, and retried if
another client changed them in between.

The same names serve a standalone Redis and a Redis Cluster (a ``RedisCluster`` client);
they carry no hash tag, so a record and its organization's index are on different slots.
On a standalone Redis ``create`` and ``rotate`` write the new record, the old one
(``rotate``) and the index in one script, atomically. On a cluster every script touches
one key, so those writes are separate steps, in this order:

1. the new id goes into the organization's index (``SADD``);
2. ``rotate`` only: the old record gets its new expiry, guarded as on standalone;
3. the new record is written (refused if its name is taken), and only then is the key
   returned.

A key exists once its record does, so a failure between steps can leave an id in an
index without a record, but never a record (a usable key) missing from its index. A
step that knows it failed (a guard that saw a change, a name already taken) takes its
own index entry back at once. ``list`` (on both) skips an id without a record and
repairs the index: it writes a tombstone under the record's name (a hash with only
``gone``, expiring after a day) so that a ``create`` stalled between its steps can no
longer write that record, then removes the id. ``rotate`` interrupted after step 2 has
shortened the old key without a new one, as a standalone ``rotate`` whose reply was lost
has; rotating again gives the replacement and never extends the old key.

The ``redis`` package is imported only when a Redis store is made.
"""

from __future__ import annotations

import builtins
import math
import re
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar, cast

import msgspec

from meterkit._twins import blocking
from meterkit.backends.redis.errors import translate
from meterkit.errors import (
    ConfigurationError,
    StateError,
    UnknownKeyError,
)
from meterkit.keys.model import (
    USE_RESOLUTION,
    ApiKey,
    DurationLike,
    Mode,
    PlaintextKey,
    TimeLike,
    check_key_id,
    sort_keys,
)
from meterkit.keys.rules import KeyRules, RuledStore

if TYPE_CHECKING:
    from types import ModuleType

    from redis import Redis, RedisCluster
    from redis.asyncio import Redis as AsyncRedis
    from redis.asyncio import RedisCluster as AsyncRedisCluster
    from typing_extensions import Unpack

    from meterkit.keys.model import KeyOptions, NewKey

__all__ = ["AsyncRedisKeyStore", "RedisKeyStore"]

T = TypeVar("T")
_Shell = TypeVar("_Shell", bound="_RedisStoreShell")

FIELDS: Final = ("rec", "hash", "expires", "revoked", "used")
_ATTEMPTS: Final = 16
_NAMESPACE_RE: Final = re.compile(r"[!-~]{1,64}")
_KEY_ID_RE: Final = re.compile(r"key_[0-9A-Za-z]{12}")
# How long list's tombstone keeps the name of a record that was never written: far
# longer than a create or rotate takes between two of its steps.
TOMBSTONE_MS: Final = 86_400_000

_AUTHENTICATE: Final = """
-- KEYS[1] the key's record; ARGV[1] hash of the presented plaintext; ARGV[2] now;
-- ARGV[3...] its hashes under previous peppers: a record holding one of those gets
-- ARGV[1] in its place (the key moves to the current pepper as it is used).
local v = redis.call('HMGET', KEYS[1], 'rec', 'hash', 'expires', 'revoked', 'used')
if v[1] and v[2] ~= ARGV[1] then
  for i = 3, #ARGV do
    if v[2] == ARGV[i] then
      redis.call('HSET', KEYS[1], 'hash', ARGV[1])
      v[2] = ARGV[1]
      break
    end
  end
end
if v[1] and v[2] == ARGV[1] then
  local used = tonumber(v[5])
  if not used or tonumber(ARGV[2]) >= used + $RESOLUTION then  -- (the use, to the second)
    redis.call('HSET', KEYS[1], 'used', ARGV[2])
    v[5] = ARGV[2]
  end
end
return v
""".replace("$RESOLUTION", repr(USE_RESOLUTION))

_CREATE: Final = """
-- KEYS[1] the new record, KEYS[2] the organization's index.
-- ARGV: id, rec, hash, expires ('' for none). Returns 0 if the id is taken.
local t = redis.call('TYPE', KEYS[2]).ok
if t ~= 'none' and t ~= 'set' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[2] .. ' is not a set')
end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'rec', ARGV[2], 'hash', ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'expires', ARGV[4]) end
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

_REVOKE: Final = """
-- KEYS[1] the record; ARGV[1] now. Revoking twice keeps the first time.
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSETNX', KEYS[1], 'revoked', ARGV[1])
end
return redis.call('HMGET', KEYS[1], 'rec', 'hash', 'expires', 'revoked', 'used')
"""

_ROTATE: Final = """
-- KEYS[1] the old record, KEYS[2] the new record, KEYS[3] the organization's index.
-- ARGV[1..4] the new key: id, rec, hash, expires ('' for none);
-- ARGV[5], ARGV[6] the old record's expires and revoked as read ('' for none);
-- ARGV[7] the old record's new expires. Returns 0 if anything changed since the read.
local t = redis.call('TYPE', KEYS[3]).ok
if t ~= 'none' and t ~= 'set' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[3] .. ' is not a set')
end
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local now = redis.call('HMGET', KEYS[1], 'expires', 'revoked')
if (now[1] or '') ~= ARGV[5] or (now[2] or '') ~= ARGV[6] then return 0 end
redis.call('HSET', KEYS[1], 'expires', ARGV[7])
redis.call('HSET', KEYS[2], 'rec', ARGV[2], 'hash', ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], 'expires', ARGV[4]) end
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""

# On a cluster, create and rotate run the single-key scripts below instead of _CREATE and
# _ROTATE (see the module's docstring for their order).

_RECORD: Final = """
-- KEYS[1] the new record. ARGV: rec, hash, expires ('' for none).
-- Returns 0 if the name is taken (by a record, or by a tombstone list left).
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'rec', ARGV[1], 'hash', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'expires', ARGV[3]) end
return 1
"""

_SHORTEN: Final = """
-- KEYS[1] the record being rotated. ARGV[1], ARGV[2] its expires and revoked as read
-- ('' for none); ARGV[3] its new expires. Returns 0 if anything changed since the read.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local now = redis.call('HMGET', KEYS[1], 'expires', 'revoked')
if (now[1] or '') ~= ARGV[1] or (now[2] or '') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'expires', ARGV[3])
return 1
"""

_BURY: Final = """
-- KEYS[1] the record of an id an index holds without one; ARGV[1] milliseconds.
-- If it still does not exist, a tombstone takes its name for ARGV[1] ms, so that a
-- create stalled between its steps cannot write it after list dropped the id.
-- Returns the record as authenticate does (a record written meanwhile is kept).
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'gone', '1')
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return redis.call('HMGET', KEYS[1], 'rec', 'hash', 'expires', 'revoked', 'used')
"""

_SET_EXPIRY: Final = """
-- KEYS[1] the record. ARGV[1], ARGV[2] its expires and revoked as read ('' for none);
-- ARGV[3] its new expires ('' for never). Returns 0 if anything changed since the read.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local now = redis.call('HMGET', KEYS[1], 'expires', 'revoked')
if (now[1] or '') ~= ARGV[1] or (now[2] or '') ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], 'expires')
else
  redis.call('HSET', KEYS[1], 'expires', ARGV[3])
end
return 1
"""

SCRIPTS: Final = {
    "authenticate": _AUTHENTICATE,
    "create": _CREATE,
    "revoke": _REVOKE,
    "rotate": _ROTATE,
    "record": _RECORD,
    "shorten": _SHORTEN,
    "bury": _BURY,
    "set_expiry": _SET_EXPIRY,
}


class _Command(NamedTuple):
    """One plain Redis command."""

    args: tuple[str, ...]


class _Script(NamedTuple):
    """One call of a registered Lua script (``EVALSHA``, reloaded on ``NOSCRIPT``)."""

    name: str
    keys: tuple[str, ...]
    args: tuple[str, ...]


class _Pipeline(NamedTuple):
    """Plain commands sent together in one round trip (not a transaction)."""

    commands: tuple[_Command, ...]


_Step = _Command | _Script | _Pipeline
Program = Generator[_Step, Any, T]


class _Stored(msgspec.Struct, frozen=True):
    """The facts of a key that never change, as kept in the ``rec`` field."""

    id: str
    org: str
    mode: Mode
    permissions: tuple[str, ...]
    name: str | None
    created_at: float
    last_four: str


_ENCODER: Final = msgspec.json.Encoder()
_DECODER: Final = msgspec.json.Decoder(_Stored)


def _number(value: float | None) -> str:
    """A time as a script argument: its shortest exact repr, '' for none."""
    return "" if value is None else repr(value)


def _text(value: object, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            pass
    raise StateError(f"{what} is not text meterkit wrote")


def _time(value: object, what: str) -> float | None:
    text = _text(value, what)
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise StateError(f"{what} is not a time meterkit wrote")
    return seconds


class _KeyCommands:
    """The Redis side of every key store operation, without the I/O."""

    def __init__(self, rules: KeyRules, namespace: str, *, cluster: bool = False) -> None:
        if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
            raise ConfigurationError(
                "must be 1 to 64 printable ASCII characters, no spaces", "namespace"
            )
        self.rules = rules
        self.namespace = namespace
        self.cluster = cluster

    def record_key(self, key_id: str) -> str:
        """The Redis key of one API key's record."""
        return f"{self.namespace}:key:{key_id}"

    def org_key(self, org: str) -> str:
        """The Redis key of an organization's set of key ids."""
        return f"{self.namespace}:org:{org}:keys"

    @staticmethod
    def encode(record: ApiKey) -> str:
        """The ``rec`` field of a new record."""
        stored = _Stored(
            record.id,
            record.org,
            record.mode,
            record.permissions,
            record.name,
            record.created_at,
            record.last_four,
        )
        return _ENCODER.encode(stored).decode("utf-8")

    def decode(self, key_id: str, values: object) -> ApiKey | None:
        """The record from an ``HMGET`` of :data:`FIELDS`, None if it does not exist."""
        where = self.record_key(key_id)
        if not isinstance(values, list) or len(values) != len(FIELDS):
            raise StateError(f"{where}: unexpected reply from Redis")
        rec, digest, expires, revoked, used = values
        if rec is None:
            return None
        try:
            stored = _DECODER.decode(rec)
        except msgspec.DecodeError as exc:
            raise StateError(f"{where}: the record is not one meterkit wrote") from exc
        secret_hash = _text(digest, f"{where} hash")
        if stored.id != key_id or secret_hash is None:
            raise StateError(f"{where}: the record is not one meterkit wrote")
        return ApiKey(
            id=stored.id,
            org=stored.org,
            mode=stored.mode,
            permissions=stored.permissions,
            name=stored.name,
            created_at=stored.created_at,
            expires_at=_time(expires, f"{where} expires"),
            revoked_at=_time(revoked, f"{where} revoked"),
            last_used_at=_time(used, f"{where} used"),
            secret_hash=secret_hash,
            last_four=stored.last_four,
        )

    def _create_script(self, record: ApiKey) -> _Script:
        return _Script(
            "create",
            (self.record_key(record.id), self.org_key(record.org)),
            (record.id, self.encode(record), record.secret_hash, _number(record.expires_at)),
        )

    def create(self, org: object, key: NewKey) -> Program[tuple[PlaintextKey, ApiKey]]:
        """See :meth:`~meterkit.keys.model.KeyStore.create`."""

        def issue() -> tuple[PlaintextKey, ApiKey]:
            return self.rules.new_key(org=org, now=self.rules.clock(), **key)

        if self.cluster:
            return (yield from self._file(issue))
        for _ in range(_ATTEMPTS):
            plaintext, record = issue()
            if (yield self._create_script(record)) == 1:
                return plaintext, record
        raise StateError("no free key id after many random tries")

    def _file(
        self, issue: Callable[[], tuple[PlaintextKey, ApiKey]]
    ) -> Program[tuple[PlaintextKey, ApiKey]]:
        """Cluster: a new key's index entry, then its record (retried under a new id)."""
        for _ in range(_ATTEMPTS):
            plaintext, record = issue()
            added = yield _Command(("SADD", self.org_key(record.org), record.id))
            if (yield from self._write(record, added)):
                return plaintext, record
        raise StateError("no free key id after many random tries")

    def _write(self, record: ApiKey, added: object) -> Program[bool]:
        """Cluster: write a new record whose id is indexed; False if its name is taken.

        ``added`` is the reply of the ``SADD`` that indexed it: 1 if this call put the id
        there, and so takes it back when the record cannot be written.
        """
        key = self.record_key(record.id)
        args = (self.encode(record), record.secret_hash, _number(record.expires_at))
        if (yield _Script("record", (key,), args)) == 1:
            return True
        if added == 1:
            yield _Command(("SREM", self.org_key(record.org), record.id))
        return False

    def get(self, key_id: str) -> Program[ApiKey | None]:
        """See :meth:`~meterkit.keys.model.KeyStore.get`."""
        check_key_id(key_id)
        values = yield _Command(("HMGET", self.record_key(key_id), *FIELDS))
        return self.decode(key_id, values)

    def list(self, org: str) -> Program[builtins.list[ApiKey]]:
        """See :meth:`~meterkit.keys.model.KeyStore.list`.

        An indexed id without a record (a create or rotate that failed between its steps
        on a cluster, or a record deleted by hand) is skipped and taken out of the index,
        behind a tombstone (:data:`_BURY`). A record of another organization is skipped.
        """
        org = self.rules.check_org(org)
        where = self.org_key(org)
        members = yield _Command(("SMEMBERS", where))
        ids = sorted(_text(member, where) or "" for member in members)
        if any(not _KEY_ID_RE.fullmatch(key_id) for key_id in ids):
            raise StateError(f"{where} holds something that is not a key id")
        if not ids:
            return []
        replies = yield _Pipeline(
            tuple(_Command(("HMGET", self.record_key(key_id), *FIELDS)) for key_id in ids)
        )
        found: builtins.list[ApiKey] = []
        gone: builtins.list[str] = []
        for key_id, values in zip(ids, replies, strict=True):
            record = self.decode(key_id, values)
            if record is None:
                bury = _Script("bury", (self.record_key(key_id),), (str(TOMBSTONE_MS),))
                record = self.decode(key_id, (yield bury))
            if record is None:
                gone.append(key_id)
            elif record.org == org:
                found.append(record)
        if gone:
            yield _Command(("SREM", where, *gone))
        return sort_keys(found)

    def revoke(self, key_id: str) -> Program[ApiKey]:
        """See :meth:`~meterkit.keys.model.KeyStore.revoke`."""
        check_key_id(key_id)
        now = _number(self.rules.clock())
        values = yield _Script("revoke", (self.record_key(key_id),), (now,))
        record = self.decode(key_id, values)
        if record is None:
            raise UnknownKeyError(f"no API key {key_id}")
        return record

    def rotate(self, key_id: str, *, grace: object) -> Program[tuple[PlaintextKey, ApiKey]]:
        """See :meth:`~meterkit.keys.model.KeyStore.rotate`."""
        check_key_id(key_id)
        old_key = self.record_key(key_id)
        for _ in range(_ATTEMPTS):
            values = yield _Command(("HMGET", old_key, *FIELDS))
            read, now = self.decode(key_id, values), self.rules.clock()
            old, plaintext, new = self.rules.rotation(read, key_id, grace, now)
            seen = (_text(values[2], old_key) or "", _text(values[3], old_key) or "")
            if not self.cluster:
                create = self._create_script(new)
                done = yield _Script(
                    "rotate",
                    (old_key, *create.keys),
                    (*create.args, *seen, _number(old.expires_at)),
                )
                if done == 1:
                    return plaintext, new
                continue
            index = self.org_key(new.org)
            added = yield _Command(("SADD", index, new.id))
            done = yield _Script("shorten", (old_key,), (*seen, _number(old.expires_at)))
            if done != 1:
                if added == 1:
                    yield _Command(("SREM", index, new.id))
                continue
            if (yield from self._write(new, added)):
                return plaintext, new
            break  # the old key is shortened, but the new id is taken (by chance or a tombstone)
        else:
            raise StateError(f"{key_id} kept changing while being rotated")
        return (yield from self._file(lambda: self.rules.rotation(read, key_id, grace, now)[1:]))

    def set_expiry(self, key_id: str, expires_at: object) -> Program[ApiKey]:
        """See :meth:`~meterkit.keys.model.KeyStore.set_expiry`: guarded by the expiry
        and revocation it read, retried if another client changed them in between."""
        check_key_id(key_id)
        where = self.record_key(key_id)
        for _ in range(_ATTEMPTS):
            values = yield _Command(("HMGET", where, *FIELDS))
            read = self.decode(key_id, values)
            changed = self.rules.expiry_change(read, key_id, expires_at, self.rules.clock())
            seen = (_text(values[2], where) or "", _text(values[3], where) or "")
            done = yield _Script("set_expiry", (where,), (*seen, _number(changed.expires_at)))
            if done == 1:
                return changed
        raise StateError(f"{key_id} kept changing while its expiry was being set")

    def authenticate(
        self, authorization: object, *, org: str | None, permission: str | None
    ) -> Program[ApiKey]:
        """See :meth:`~meterkit.keys.model.KeyStore.authenticate`."""
        rules = self.rules
        wildcard = rules.requested(permission)
        key_id, digests = rules.read_header(authorization)
        now = rules.clock()
        values = yield _Script(
            "authenticate", (self.record_key(key_id),), (digests[0], _number(now), *digests[1:])
        )
        record = rules.verified(self.decode(key_id, values), digests[:1])
        return rules.admit(record, now, org, permission, wildcard)


def _redis() -> ModuleType:
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
        raise ConfigurationError(
            "Redis key stores need the redis package: pip install 'meterkit[redis]'", "url"
        ) from exc
    return redis


def _redis_asyncio() -> ModuleType:
    _redis()  # the friendly error when redis is missing altogether
    import redis.asyncio

    return redis.asyncio


class _RedisStoreShell(RuledStore):
    """What the blocking and the asyncio store share: set-up, naming, the key format.

    Everything a store decides lives in :class:`_KeyCommands`; the two shells below
    only run its steps, blocking or awaited.
    """

    _client_module: Callable[[], ModuleType]
    _asyncio: bool

    def __init__(
        self,
        client: Any,
        *,
        namespace: str = "mk",
        owns_client: bool = False,
        allow_eviction: bool = False,
        **options: Unpack[KeyOptions],
    ) -> None:
        self._rules = rules = KeyRules(**options)
        cluster = isinstance(client, self._client_module().RedisCluster)
        self._commands = _KeyCommands(rules, namespace, cluster=cluster)
        self._client = client
        self._owns_client = owns_client
        self._scripts = {name: client.register_script(source) for name, source in SCRIPTS.items()}
        errors = _redis().exceptions
        self._driver_error = (errors.RedisError, errors.RedisClusterException)
        if not isinstance(allow_eviction, bool):
            raise ConfigurationError("allow_eviction is True or False", "allow_eviction")
        # A server that may evict keys is refused before the first command, as the
        # backends refuse it: an evicted key record is a key that stopped working.
        self._unverified = not allow_eviction

    @classmethod
    def from_url(
        cls: type[_Shell],
        url: str,
        *,
        namespace: str = "mk",
        timeout: float = 1.0,
        allow_eviction: bool = False,
        **options: Unpack[KeyOptions],
    ) -> _Shell:
        """A store on a client made from ``url``, closed with the store.

        The client is the one :func:`~meterkit.backend_from_url` makes for ``url``
        (``redis://``, ``rediss://``, ``redis+unix://``, ``redis+cluster://``,
        ``rediss+cluster://``): ``timeout`` seconds (default 1) to connect and to
        answer, and no retries.
        """
        cls._client_module()  # the friendly error when redis-py is missing
        from meterkit.connect import redis_client

        # The very client backend_from_url makes: the same timeout, no retries (a
        # stuck Redis is a 503 within ``timeout``, not a hung authenticate).
        client = redis_client(url, asyncio=cls._asyncio, timeout=timeout)
        return cls(
            client,
            namespace=namespace,
            owns_client=True,
            allow_eviction=allow_eviction,
            **options,
        )

    def __repr__(self) -> str:
        cluster = ", cluster=True" if self._commands.cluster else ""
        return f"{type(self).__name__}(namespace={self._commands.namespace!r}{cluster})"


class AsyncRedisKeyStore(_RedisStoreShell):
    """API keys in Redis, through a ``redis.asyncio.Redis`` or ``RedisCluster`` client.

    The same operations, layout and decisions as :class:`RedisKeyStore`, awaited
    (each method is written here once; :class:`RedisKeyStore`'s is made from it).
    """

    _client: AsyncRedis | AsyncRedisCluster
    _client_module = staticmethod(_redis_asyncio)
    _asyncio = True

    async def _call(self, step: _Step) -> Any:
        if isinstance(step, _Script):
            return await self._scripts[step.name](keys=step.keys, args=step.args)
        if isinstance(step, _Command):
            return await cast(Any, self._client).execute_command(*step.args)
        async with self._client.pipeline(transaction=False) as pipe:
            for command in step.commands:
                cast(Any, pipe).execute_command(*command.args)  # untyped in redis-py
            return await pipe.execute()

    async def _run(self, program: Program[T]) -> T:
        try:
            step = next(program)
            if self._unverified:
                from meterkit.backends.redis.backend import refuse_eviction_async

                await refuse_eviction_async(self._client)
                self._unverified = False
            while True:
                try:
                    reply = await self._call(step)
                except self._driver_error as exc:
                    raise translate(exc) from exc
                step = program.send(reply)
        except StopIteration as done:
            return cast(T, done.value)
        finally:
            program.close()

    async def create(self, *, org: str, **key: Unpack[NewKey]) -> tuple[PlaintextKey, ApiKey]:
        """See :meth:`~meterkit.keys.model.KeyStore.create`."""
        return await self._run(self._commands.create(org, key))

    async def get(self, key_id: str) -> ApiKey | None:
        """See :meth:`~meterkit.keys.model.KeyStore.get`."""
        return await self._run(self._commands.get(key_id))

    async def list(self, org: str) -> builtins.list[ApiKey]:
        """See :meth:`~meterkit.keys.model.KeyStore.list`."""
        return await self._run(self._commands.list(org))

    async def revoke(self, key_id: str) -> ApiKey:
        """See :meth:`~meterkit.keys.model.KeyStore.revoke`."""
        return await self._run(self._commands.revoke(key_id))

    async def rotate(self, key_id: str, *, grace: DurationLike) -> tuple[PlaintextKey, ApiKey]:
        """See :meth:`~meterkit.keys.model.KeyStore.rotate`."""
        return await self._run(self._commands.rotate(key_id, grace=grace))

    async def set_expiry(self, key_id: str, expires_at: TimeLike | None) -> ApiKey:
        """See :meth:`~meterkit.keys.model.KeyStore.set_expiry`."""
        return await self._run(self._commands.set_expiry(key_id, expires_at))

    async def authenticate(
        self, authorization: str | bytes | None, *, org: str | None, permission: str | None = None
    ) -> ApiKey:
        """See :meth:`~meterkit.keys.model.KeyStore.authenticate` (one round trip)."""
        return await self._run(
            self._commands.authenticate(authorization, org=org, permission=permission)
        )

    async def aclose(self) -> None:
        """Close the client if this store made it (:meth:`from_url`)."""
        if self._owns_client:
            await self._client.aclose()


class RedisKeyStore(_RedisStoreShell):
    """API keys in Redis, through a blocking ``redis.Redis`` or ``redis.RedisCluster`` client.

    Give a client (it stays yours to close) or use :meth:`from_url`. The store's
    ``clock`` (default :func:`time.time`) dates creations, revocations, rotations and
    uses, and decides expiry.
    """

    _client: Redis | RedisCluster
    _client_module = staticmethod(_redis)
    _asyncio = False

    _call = blocking(AsyncRedisKeyStore._call)
    _run = blocking(AsyncRedisKeyStore._run)
    create = blocking(AsyncRedisKeyStore.create)
    get = blocking(AsyncRedisKeyStore.get)
    list = blocking(AsyncRedisKeyStore.list)
    revoke = blocking(AsyncRedisKeyStore.revoke)
    rotate = blocking(AsyncRedisKeyStore.rotate)
    set_expiry = blocking(AsyncRedisKeyStore.set_expiry)
    authenticate = blocking(AsyncRedisKeyStore.authenticate)
    close = blocking(AsyncRedisKeyStore.aclose)
