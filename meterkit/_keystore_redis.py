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
:class:`~meterkit._keys.KeyRules`, as for the memory store. Changes that depend on what
was read (``rotate``) are guarded in their script by the values read, and retried if
another client changed them in between.

Keys and organization indexes of one store are on different slots, so this store needs a
standalone Redis (or one primary); Redis Cluster is not supported for keys.
The ``redis`` package is imported only when a Redis store is made.
"""

from __future__ import annotations

import builtins
import math
import re
from collections.abc import Callable, Generator, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar, cast

import msgspec

from meterkit._errors import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    StateError,
    UnknownKeyError,
)
from meterkit._keys import (
    ApiKey,
    Clock,
    DurationLike,
    KeyFormat,
    KeyRules,
    Mode,
    PlaintextKey,
    TimeLike,
    check_key_id,
    check_org,
    sort_keys,
)

if TYPE_CHECKING:
    from types import ModuleType

    from redis import Redis
    from redis.asyncio import Redis as AsyncRedis

__all__ = ["AsyncRedisKeyStore", "RedisKeyStore"]

T = TypeVar("T")
_Shell = TypeVar("_Shell", bound="_RedisStoreShell")

FIELDS: Final = ("rec", "hash", "expires", "revoked", "used")
_ATTEMPTS: Final = 16
_NAMESPACE_RE: Final = re.compile(r"[!-~]{1,64}")
_KEY_ID_RE: Final = re.compile(r"key_[0-9A-Za-z]{12}")

_AUTHENTICATE: Final = """
-- KEYS[1] the key's record; ARGV[1] hash of the presented plaintext; ARGV[2] now.
local v = redis.call('HMGET', KEYS[1], 'rec', 'hash', 'expires', 'revoked', 'used')
if v[1] and v[2] == ARGV[1] then
  local used = tonumber(v[5])
  if not used or tonumber(ARGV[2]) > used then
    redis.call('HSET', KEYS[1], 'used', ARGV[2])
    v[5] = ARGV[2]
  end
end
return v
"""

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

SCRIPTS: Final = {
    "authenticate": _AUTHENTICATE,
    "create": _CREATE,
    "revoke": _REVOKE,
    "rotate": _ROTATE,
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

    def __init__(self, rules: KeyRules, namespace: str) -> None:
        if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
            raise ConfigurationError("must be 1 to 64 printable ASCII characters, no spaces",
                                     "namespace")
        self.rules = rules
        self.namespace = namespace

    def record_key(self, key_id: str) -> str:
        """The Redis key of one API key's record."""
        return f"{self.namespace}:key:{key_id}"

    def org_key(self, org: str) -> str:
        """The Redis key of an organization's set of key ids."""
        return f"{self.namespace}:org:{org}:keys"

    @staticmethod
    def encode(record: ApiKey) -> str:
        """The ``rec`` field of a new record."""
        stored = _Stored(record.id, record.org, record.mode, record.permissions, record.name,
                         record.created_at, record.last_four)
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

    def create(self, *, org: object, mode: object, permissions: object, expires_at: object,
               name: object) -> Program[tuple[PlaintextKey, ApiKey]]:
        """See :meth:`~meterkit._keys.KeyStore.create`."""
        for _ in range(_ATTEMPTS):
            plaintext, record = self.rules.new_key(
                org=org, mode=mode, permissions=permissions, expires_at=expires_at, name=name,
                now=self.rules.clock(),
            )
            if (yield self._create_script(record)) == 1:
                return plaintext, record
        raise StateError("no free key id after many random tries")

    def get(self, key_id: str) -> Program[ApiKey | None]:
        """See :meth:`~meterkit._keys.KeyStore.get`."""
        check_key_id(key_id)
        values = yield _Command(("HMGET", self.record_key(key_id), *FIELDS))
        return self.decode(key_id, values)

    def list(self, org: str) -> Program[builtins.list[ApiKey]]:
        """See :meth:`~meterkit._keys.KeyStore.list`."""
        where = self.org_key(check_org(org))
        members = yield _Command(("SMEMBERS", where))
        ids = sorted(_text(member, where) or "" for member in members)
        if any(not _KEY_ID_RE.fullmatch(key_id) for key_id in ids):
            raise StateError(f"{where} holds something that is not a key id")
        if not ids:
            return []
        replies = yield _Pipeline(
            tuple(_Command(("HMGET", self.record_key(key_id), *FIELDS)) for key_id in ids)
        )
        records = (self.decode(key_id, values) for key_id, values in zip(ids, replies, strict=True))
        return sort_keys(record for record in records if record is not None)

    def revoke(self, key_id: str) -> Program[ApiKey]:
        """See :meth:`~meterkit._keys.KeyStore.revoke`."""
        check_key_id(key_id)
        now = _number(self.rules.clock())
        values = yield _Script("revoke", (self.record_key(key_id),), (now,))
        record = self.decode(key_id, values)
        if record is None:
            raise UnknownKeyError(f"no API key {key_id}")
        return record

    def rotate(self, key_id: str, *, grace: object) -> Program[tuple[PlaintextKey, ApiKey]]:
        """See :meth:`~meterkit._keys.KeyStore.rotate`."""
        check_key_id(key_id)
        old_key = self.record_key(key_id)
        for _ in range(_ATTEMPTS):
            values = yield _Command(("HMGET", old_key, *FIELDS))
            old, plaintext, new = self.rules.rotation(
                self.decode(key_id, values), key_id, grace, self.rules.clock()
            )
            create = self._create_script(new)
            seen = (_text(values[2], old_key) or "", _text(values[3], old_key) or "")
            done = yield _Script(
                "rotate",
                (old_key, *create.keys),
                (*create.args, *seen, _number(old.expires_at)),
            )
            if done == 1:
                return plaintext, new
        raise StateError(f"{key_id} kept changing while being rotated")

    def authenticate(self, authorization: object, *, org: str | None,
                     permission: str | None) -> Program[ApiKey]:
        """See :meth:`~meterkit._keys.KeyStore.authenticate`."""
        rules = self.rules
        wildcard = rules.requested(permission)
        key_id, digest = rules.read_header(authorization)
        now = rules.clock()
        values = yield _Script("authenticate", (self.record_key(key_id),), (digest, _number(now)))
        record = rules.verified(self.decode(key_id, values), digest)
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


def _translate(exc: Exception) -> BackendError:
    """meterkit's error for a redis-py error (the caller chains the original)."""
    errors = _redis().exceptions
    unavailable = (errors.ConnectionError, errors.TimeoutError, errors.ReadOnlyError,
                   errors.TryAgainError, errors.MasterDownError)
    if isinstance(exc, unavailable):
        return BackendUnavailable(f"Redis is unavailable: {type(exc).__name__}: {exc}")
    if isinstance(exc, errors.ResponseError) and str(exc).startswith("WRONGTYPE"):
        return StateError(f"a key under meterkit's namespace has the wrong type: {exc}")
    return BackendError(f"Redis refused a key store operation: {type(exc).__name__}: {exc}")


class _RedisStoreShell:
    """What the blocking and the asyncio store share: set-up, naming, the key format.

    Everything a store decides lives in :class:`_KeyCommands`; the two shells below
    only run its steps, blocking or awaited.
    """

    _client_module: Callable[[], ModuleType]

    def __init__(
        self,
        client: Any,
        *,
        namespace: str = "mk",
        clock: Clock | None = None,
        token_prefix: str = "cl",
        pepper: bytes | str | None = None,
        status_codes: Mapping[str, int] | None = None,
        owns_client: bool = False,
    ) -> None:
        rules = KeyRules(clock=clock, token_prefix=token_prefix, pepper=pepper,
                         status_codes=status_codes)
        self._commands = _KeyCommands(rules, namespace)
        self._client = client
        self._owns_client = owns_client
        self._scripts = {
            name: client.register_script(source)
            for name, source in SCRIPTS.items()
        }
        self._driver_error: type[Exception] = _redis().exceptions.RedisError

    @classmethod
    def from_url(
        cls: type[_Shell],
        url: str,
        *,
        namespace: str = "mk",
        clock: Clock | None = None,
        token_prefix: str = "cl",
        pepper: bytes | str | None = None,
        status_codes: Mapping[str, int] | None = None,
    ) -> _Shell:
        """A store on a client made from ``url``, closed with the store."""
        client = cls._client_module().Redis.from_url(url)
        return cls(client, namespace=namespace, clock=clock, token_prefix=token_prefix,
                   pepper=pepper, status_codes=status_codes, owns_client=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(namespace={self._commands.namespace!r})"

    @property
    def key_format(self) -> KeyFormat:
        """The format of this store's keys."""
        return self._commands.rules.format


class RedisKeyStore(_RedisStoreShell):
    """API keys in Redis, through a blocking ``redis.Redis`` client.

    Give a client (it stays yours to close) or use :meth:`from_url`. The store's
    ``clock`` (default :func:`time.time`) dates creations, revocations, rotations and
    uses, and decides expiry.
    """

    _client: Redis
    _client_module = staticmethod(_redis)

    def _call(self, step: _Step) -> Any:
        if isinstance(step, _Script):
            return self._scripts[step.name](keys=step.keys, args=step.args)
        if isinstance(step, _Command):
            return cast(Any, self._client).execute_command(*step.args)  # untyped in redis-py
        with self._client.pipeline(transaction=False) as pipe:
            for command in step.commands:
                cast(Any, pipe).execute_command(*command.args)  # untyped in redis-py
            return pipe.execute()

    def _run(self, program: Program[T]) -> T:
        try:
            step = next(program)
            while True:
                try:
                    reply = self._call(step)
                except self._driver_error as exc:
                    raise _translate(exc) from exc
                step = program.send(reply)
        except StopIteration as done:
            return cast(T, done.value)
        finally:
            program.close()

    def create(self, *, org: str, mode: Mode = "live", permissions: Iterable[str] = (),
               expires_at: TimeLike | None = None, name: str | None = None,
               ) -> tuple[PlaintextKey, ApiKey]:
        """See :meth:`~meterkit._keys.KeyStore.create`."""
        return self._run(self._commands.create(org=org, mode=mode, permissions=permissions,
                                               expires_at=expires_at, name=name))

    def get(self, key_id: str) -> ApiKey | None:
        """See :meth:`~meterkit._keys.KeyStore.get`."""
        return self._run(self._commands.get(key_id))

    def list(self, org: str) -> builtins.list[ApiKey]:
        """See :meth:`~meterkit._keys.KeyStore.list`."""
        return self._run(self._commands.list(org))

    def revoke(self, key_id: str) -> ApiKey:
        """See :meth:`~meterkit._keys.KeyStore.revoke`."""
        return self._run(self._commands.revoke(key_id))

    def rotate(self, key_id: str, *, grace: DurationLike) -> tuple[PlaintextKey, ApiKey]:
        """See :meth:`~meterkit._keys.KeyStore.rotate`."""
        return self._run(self._commands.rotate(key_id, grace=grace))

    def authenticate(self, authorization: str | bytes | None, *, org: str | None,
                     permission: str | None = None) -> ApiKey:
        """See :meth:`~meterkit._keys.KeyStore.authenticate` (one round trip)."""
        return self._run(self._commands.authenticate(authorization, org=org,
                                                     permission=permission))

    def close(self) -> None:
        """Close the client if this store made it (:meth:`from_url`)."""
        if self._owns_client:
            self._client.close()


class AsyncRedisKeyStore(_RedisStoreShell):
    """API keys in Redis, through a ``redis.asyncio.Redis`` client.

    The same operations, layout and decisions as :class:`RedisKeyStore`, awaited.
    """

    _client: AsyncRedis
    _client_module = staticmethod(_redis_asyncio)

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
            while True:
                try:
                    reply = await self._call(step)
                except self._driver_error as exc:
                    raise _translate(exc) from exc
                step = program.send(reply)
        except StopIteration as done:
            return cast(T, done.value)
        finally:
            program.close()

    async def create(self, *, org: str, mode: Mode = "live", permissions: Iterable[str] = (),
                     expires_at: TimeLike | None = None, name: str | None = None,
                     ) -> tuple[PlaintextKey, ApiKey]:
        """See :meth:`~meterkit._keys.KeyStore.create`."""
        return await self._run(self._commands.create(
            org=org, mode=mode, permissions=permissions, expires_at=expires_at, name=name))

    async def get(self, key_id: str) -> ApiKey | None:
        """See :meth:`~meterkit._keys.KeyStore.get`."""
        return await self._run(self._commands.get(key_id))

    async def list(self, org: str) -> builtins.list[ApiKey]:
        """See :meth:`~meterkit._keys.KeyStore.list`."""
        return await self._run(self._commands.list(org))

    async def revoke(self, key_id: str) -> ApiKey:
        """See :meth:`~meterkit._keys.KeyStore.revoke`."""
        return await self._run(self._commands.revoke(key_id))

    async def rotate(self, key_id: str, *, grace: DurationLike) -> tuple[PlaintextKey, ApiKey]:
        """See :meth:`~meterkit._keys.KeyStore.rotate`."""
        return await self._run(self._commands.rotate(key_id, grace=grace))

    async def authenticate(self, authorization: str | bytes | None, *, org: str | None,
                           permission: str | None = None) -> ApiKey:
        """See :meth:`~meterkit._keys.KeyStore.authenticate` (one round trip)."""
        return await self._run(self._commands.authenticate(authorization, org=org,
                                                           permission=permission))

    async def aclose(self) -> None:
        """Close the client if this store made it (:meth:`from_url`)."""
        if self._owns_client:
            await self._client.aclose()
