"""API keys: their plaintext format, the ``ApiKey`` record, the checks of their fields
and what a key store offers (``KeyStore``, ``AsyncKeyStore``). The rules that decide
a presented key live in :mod:`meterkit.keys.rules`; the stores in
:mod:`~meterkit.keys.memory` and :mod:`~meterkit.keys.redis`.

The plaintext of a key is ``<prefix>_<mode>_<id><secret><checksum>``, e.g.
``cl_live_`` + 12 characters of public id + 32 characters of secret + 6 of checksum,
all in base62 (``0-9A-Za-z``):

- the **id** (12 chars, ~71 random bits) is the key's public name: the record's ``id``
  is ``key_<id>``. It is embedded so that a store finds the record with one lookup by
  id (one Redis call on one key), without an index from hashes to ids;
- the **secret** (32 chars, ~190 bits from :mod:`secrets`) is what makes the key hard to
  guess; only a hash of the whole plaintext is kept (HMAC-SHA256 with the server's
  pepper, or SHA-256 when there is none: keys are random, so a slow password hash would
  only cost time);
- the **checksum** is the CRC32 of everything before it, in 6 base62 characters. CRC32
  catches every change of one character and every truncation, so mistyped, cut or
  invented keys are refused before any store is consulted, and secret scanners can
  tell a real key from random text. The last four characters, shown in ``repr`` and
  dashboards, are checksum characters, so they reveal nothing beyond ~24 bits of a CRC.

Authentication refuses with :class:`~meterkit.errors.AuthenticationError`, in this order:
a missing, over-long or malformed header, a bad checksum, an unknown id, a wrong secret
or a revoked key give ``invalid_api_key``; a key past its expiry ``expired_api_key``; an
organization other than the key's ``organization_not_found``; a permission the key lacks
``insufficient_permissions``. An organization "exists" for a store when at least one
key (live, expired or revoked) was created for it; since a key is only ever admitted for
its own organization, asking for any other one, existing or not, gets the same answer,
and organizations cannot be probed.
"""

from __future__ import annotations

import builtins
import math
import re
import secrets
import zlib
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypedDict

import msgspec

from meterkit.errors import (
    ConfigurationError,
    InvalidIdentifierError,
    InvalidRequestError,
    looks_like_secret,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "ApiKey",
    "AsyncKeyStore",
    "KeyFormat",
    "KeyOptions",
    "KeyStore",
    "NewKey",
    "PlaintextKey",
]

Mode = Literal["live", "test"]
Clock = Callable[[], float]
TimeLike = datetime | float | int
DurationLike = timedelta | float | int

INVALID: Final = "invalid_api_key"
EXPIRED: Final = "expired_api_key"
INSUFFICIENT: Final = "insufficient_permissions"
ORG_NOT_FOUND: Final = "organization_not_found"
CODES: Final = (INVALID, EXPIRED, INSUFFICIENT, ORG_NOT_FOUND)

ALPHABET: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ID_CHARS: Final = 12
SECRET_CHARS: Final = 32
CHECK_CHARS: Final = 6
KEY_ID_PREFIX: Final = "key_"
# A key with the longest allowed prefix and generous blanks around it is well under this;
# anything longer is refused before a regular expression ever looks at it.
MAX_HEADER_CHARS: Final = 256

_PAIRS: Final = tuple(a + b for a in ALPHABET for b in ALPHABET)  # 62**2 two-char digits
_PREFIX_RE: Final = re.compile(r"[a-z][a-z0-9]{0,15}")
_KEY_ID_RE: Final = re.compile(rf"key_[0-9A-Za-z]{{{ID_CHARS}}}")
_ORG_RE: Final = re.compile(r"org_[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_SEGMENT: Final = r"[a-z][a-z0-9_.-]{0,63}"
_PERMISSION_RE: Final = re.compile(rf"\*|{_SEGMENT}:(?:\*|{_SEGMENT})")
_MAX_NAME: Final = 200
_MAX_ORG: Final = 256  # the meter's bound on any id
_CACHE_LIMIT: Final = 4096
#: Seconds: a key's ``last_used_at`` moves when at least this long has passed since the
#: use it holds (a store writes once a second per busy key, not on every request).
USE_RESOLUTION: Final = 1.0


class NewKey(TypedDict, total=False):
    """What ``create`` takes besides ``org``: ``mode`` (``"live"`` or ``"test"``;
    ``"live"``), ``permissions`` (``["invoices:read", "reports:*"]``; none),
    ``expires_at`` (a timezone-aware datetime or UNIX seconds; never) and ``name``
    (a label for people, up to 200 printable characters)."""

    mode: Mode
    permissions: Iterable[str]
    expires_at: TimeLike | None
    name: str | None


class KeyOptions(TypedDict, total=False):
    """What every key store takes, besides where it keeps keys (the :class:`KeyRules`
    options): ``clock`` (UNIX seconds; :func:`time.time`), ``token_prefix`` (``"cl"``
    for ``cl_live_…``), ``pepper`` (the server's secret keyed into every hash; None:
    plain SHA-256), ``previous_peppers`` (peppers being retired: their keys still work
    and move to ``pepper`` when presented), ``status_codes`` (the HTTP status of
    each refusal code, 401 by default, e.g. ``{"insufficient_permissions": 403}``) and
    ``org_pattern`` (the regular expression a whole organization id must match; by
    default the seed's ``org_…``)."""

    clock: Clock | None
    token_prefix: str
    pepper: bytes | str | None
    previous_peppers: Iterable[bytes | str | None]
    status_codes: Mapping[str, int] | None
    org_pattern: str | re.Pattern[str] | None


def _base62(number: int, width: int) -> str:
    """``number`` in base62, left-padded to ``width`` characters (the caller bounds it)."""
    digits = []
    for _ in range(width):
        number, rest = divmod(number, 62)
        digits.append(ALPHABET[rest])
    return "".join(reversed(digits))


def checksum(text: str) -> str:
    """The 6-character checksum of ``text``: its CRC32 in base62 (62**6 > 2**32)."""
    # Two-character digits make this three divisions instead of six: it is on the hot path.
    rest, low = divmod(zlib.crc32(text.encode("ascii")), 3844)
    high, middle = divmod(rest, 3844)
    return _PAIRS[high] + _PAIRS[middle] + _PAIRS[low]


class KeyFormat:
    """The shape of one deployment's API keys: ``<prefix>_live_…`` and ``<prefix>_test_…``.

    ``pattern`` is a regular expression for secret scanners (it finds candidates in
    text; :meth:`is_well_formed` then confirms one by its checksum).
    """

    __slots__ = ("_header", "_token", "length", "pattern", "prefix")

    def __init__(self, prefix: str = "cl") -> None:
        if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
            raise ConfigurationError(
                "must be 1 to 16 lowercase letters or digits, starting with a letter",
                "token_prefix",
            )
        self.prefix = prefix
        body = ID_CHARS + SECRET_CHARS + CHECK_CHARS
        self.length = len(prefix) + len("_live_") + body
        self.pattern = rf"\b{prefix}_(?:live|test)_[0-9A-Za-z]{{{body}}}\b"
        token = rf"{prefix}_(live|test)_([0-9A-Za-z]{{{ID_CHARS}}})[0-9A-Za-z]{{{body - ID_CHARS}}}"
        self._token = re.compile(token)
        self._header = re.compile(rf"[ \t]*(?i:bearer)[ \t]+({token})[ \t]*")

    def __repr__(self) -> str:
        return f"KeyFormat(prefix={self.prefix!r})"

    def compose(self, mode: Mode, id_part: str, secret_part: str) -> str:
        """The plaintext of a key from its parts (the checksum is computed here)."""
        head = f"{self.prefix}_{mode}_{id_part}{secret_part}"
        return head + checksum(head)

    def generate(self, mode: Mode) -> str:
        """A new random plaintext key (id and secret from :mod:`secrets`)."""
        id_part = _base62(secrets.randbelow(62**ID_CHARS), ID_CHARS)
        secret_part = _base62(secrets.randbelow(62**SECRET_CHARS), SECRET_CHARS)
        return self.compose(mode, id_part, secret_part)

    def is_well_formed(self, token: object) -> bool:
        """Whether ``token`` has this format and a correct checksum (no store is asked)."""
        if not isinstance(token, str) or len(token) != self.length:
            return False
        if self._token.fullmatch(token) is None:
            return False
        return checksum(token[:-CHECK_CHARS]) == token[-CHECK_CHARS:]

    def key_id(self, token: str) -> str:
        """The public id (``key_…``) embedded in a well-formed ``token``."""
        start = len(self.prefix) + len("_live_")
        return KEY_ID_PREFIX + token[start : start + ID_CHARS]


class PlaintextKey(str):
    """A key's plaintext, returned once by ``create``/``rotate``.

    It is a ``str`` (use it as one, or ``str(plaintext)``), whose ``repr`` shows only the
    prefix and the last four characters, so it does not end up whole in logs or
    tracebacks by accident.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        head = self[: self.find("_", self.find("_") + 1) + 1]
        return f"PlaintextKey('{head}…{self[-4:]}')"


def _wildcard_of(permission: str) -> str:
    """The grant that covers every action on ``permission``'s resource (``invoices:*``)."""
    return "*" if permission == "*" else permission.partition(":")[0] + ":*"


_WILDCARDS: dict[str, str] = {}


def _required_wildcard(permission: object) -> str:
    """Validate a requested permission (cached: the set in use is small) -> its wildcard."""
    cached = _WILDCARDS.get(permission) if isinstance(permission, str) else None
    if cached is not None:
        return cached
    if not isinstance(permission, str) or not _PERMISSION_RE.fullmatch(permission):
        raise InvalidRequestError(
            f"permission must look like 'invoices:read', 'invoices:*' or '*', not {permission!r}"
        )
    wildcard = _wildcard_of(permission)
    if len(_WILDCARDS) < _CACHE_LIMIT:
        _WILDCARDS[permission] = wildcard
    return wildcard


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    """One API key as a store knows it: public facts and a hash, never the secret.

    Times are UNIX seconds (floats). ``last_used_at`` is when the key's secret was last
    presented to ``authenticate``, admitted or not: a revoked or expired key that is
    still being presented shows up here. ``last_four`` is the end of the plaintext, for
    people to recognise a key by. ``Meter.check(key=api_key)`` reads ``id``, ``org`` and
    ``mode``, and ``plan``: the key's customer plan, when a store keeps one (meterkit's
    own stores do not yet; ``Meter.set_plan(org, plan, key=...)`` keeps it in the
    backend instead), which wins over the plan the backend keeps for the key.
    """

    id: str
    org: str
    mode: Mode
    permissions: tuple[str, ...] = ()
    name: str | None = None
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    last_used_at: float | None = None
    secret_hash: str
    last_four: str
    plan: str | None = None

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in self.__rich_repr__())
        return f"ApiKey({fields})"

    def __str__(self) -> str:
        return f"{self.id} (…{self.last_four})"

    def __rich_repr__(self) -> builtins.list[tuple[str, Any]]:
        """The fields ``repr`` shows: all but the secret's hash."""
        return [
            (name, getattr(self, name)) for name in self.__struct_fields__ if name != "secret_hash"
        ]

    def grants(self, permission: str) -> bool:
        """Whether this key holds ``permission``, itself or through a wildcard."""
        wildcard = _required_wildcard(permission)
        held = self.permissions
        return permission in held or wildcard in held or "*" in held

    def status(self, now: float) -> Literal["active", "expired", "revoked"]:
        """What ``authenticate`` would make of this key at ``now`` (UNIX seconds)."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"


def _seconds(value: object, what: str) -> float:
    """A time or duration given as a finite number of seconds (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{what} must be a datetime/timedelta or seconds, not {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds):
        raise InvalidRequestError(f"{what} must be finite, not {value!r}")
    return seconds


def to_timestamp(value: object, what: str) -> float:
    """UNIX seconds from a timezone-aware datetime or a number; naive datetimes are refused."""
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidRequestError(f"{what} must be timezone-aware, not a naive datetime")
        return value.timestamp()
    return _seconds(value, what)


def to_duration(value: object, what: str) -> float:
    """Seconds (>= 0) from a timedelta or a number."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else _seconds(value, what)
    if seconds < 0:
        raise InvalidRequestError(f"{what} must not be negative, not {value!r}")
    return seconds


def check_key_id(key_id: object) -> str:
    """A well-formed public key id (``key_`` + 12 base62 characters), or an error."""
    if not isinstance(key_id, str) or not _KEY_ID_RE.fullmatch(key_id):
        raise InvalidIdentifierError(f"not an API key id: {key_id!r}")
    return key_id


def org_rule(pattern: str | re.Pattern[str] | None) -> re.Pattern[str]:
    """The organization-id rule of a key store: the seed's (``org_`` + up to 64 of
    ``A-Za-z0-9_-``) for None, else ``pattern``, which a whole id must match."""
    if pattern is None:
        return _ORG_RE
    try:
        compiled = re.compile(pattern)
    except (re.error, TypeError):
        raise ConfigurationError(
            f"is a regular expression for organization ids, not {pattern!r}", "org_pattern"
        ) from None
    if compiled.fullmatch("") is not None:
        raise ConfigurationError("must not match an empty organization id", "org_pattern")
    return compiled


def check_org(org: object, rule: re.Pattern[str] = _ORG_RE) -> str:
    """A well-formed organization id under ``rule`` (by default the seed's ``org_…``),
    printable and at most 256 characters, or an error."""
    if (
        not isinstance(org, str)
        or len(org) > _MAX_ORG
        or not org.isprintable()
        or not rule.fullmatch(org)
    ):
        shape = (
            "look like 'org_123' (letters, digits, '_', '-')"
            if rule is _ORG_RE
            else f"match {rule.pattern!r}"
        )
        raise InvalidIdentifierError(f"organization ids {shape}, not {org!r}")
    if looks_like_secret(org):
        raise InvalidIdentifierError("an organization id must not hold an API key's plaintext")
    return org


def _check_permissions(permissions: object) -> tuple[str, ...]:
    if isinstance(permissions, str | bytes) or not isinstance(permissions, Iterable):
        raise InvalidRequestError(
            f"permissions must be a list of strings such as ['invoices:read'], not {permissions!r}"
        )
    checked = []
    for permission in permissions:
        if not isinstance(permission, str) or not _PERMISSION_RE.fullmatch(permission):
            raise InvalidRequestError(
                "each permission must look like 'invoices:read', 'invoices:*' or '*',"
                f" not {permission!r}"
            )
        checked.append(permission)
    return tuple(sorted(set(checked)))


def _check_name(name: object) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or len(name) > _MAX_NAME or not name.isprintable():
        raise InvalidRequestError(
            f"name must be printable text of at most {_MAX_NAME} characters, not {name!r}"
        )
    if looks_like_secret(name):
        raise InvalidRequestError("a key's name must not hold an API key's plaintext")
    return name


def _check_mode(mode: object) -> Mode:
    if mode == "live" and isinstance(mode, str):
        return "live"
    if mode == "test" and isinstance(mode, str):
        return "test"
    raise InvalidRequestError(f"mode must be 'live' or 'test', not {mode!r}")


def sort_keys(records: Iterable[ApiKey]) -> builtins.list[ApiKey]:
    """Records in the order ``list`` returns them: oldest first, then by id."""
    return sorted(records, key=lambda record: (record.created_at, record.id))


class KeyStore(Protocol):
    """What a synchronous key store offers (memory, Redis)."""

    def create(self, *, org: str, **key: Unpack[NewKey]) -> tuple[PlaintextKey, ApiKey]:
        """Make and keep a new key; its plaintext is returned this once and never again."""
        ...

    def get(self, key_id: str) -> ApiKey | None:
        """The key with this id, or None."""
        ...

    def list(self, org: str) -> builtins.list[ApiKey]:
        """Every key of ``org`` (revoked and expired ones too), oldest first."""
        ...

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key at once (revoking twice keeps the first time)."""
        ...

    def rotate(self, key_id: str, *, grace: DurationLike) -> tuple[PlaintextKey, ApiKey]:
        """A new key like this one; the old one keeps working for ``grace``."""
        ...

    def set_expiry(self, key_id: str, expires_at: TimeLike | None) -> ApiKey:
        """Change an active key's expiry (``None``: never)."""
        ...

    def authenticate(
        self, authorization: str | bytes | None, *, org: str | None, permission: str | None = None
    ) -> ApiKey:
        """The key presented in an ``Authorization: Bearer …`` header, if admitted."""
        ...

    def close(self) -> None:
        """Release connections the store opened itself."""
        ...


class AsyncKeyStore(Protocol):
    """What an asynchronous key store offers: :class:`KeyStore`'s methods, awaited."""

    async def create(self, *, org: str, **key: Unpack[NewKey]) -> tuple[PlaintextKey, ApiKey]:
        """See :meth:`KeyStore.create`."""
        ...

    async def get(self, key_id: str) -> ApiKey | None:
        """See :meth:`KeyStore.get`."""
        ...

    async def list(self, org: str) -> builtins.list[ApiKey]:
        """See :meth:`KeyStore.list`."""
        ...

    async def revoke(self, key_id: str) -> ApiKey:
        """See :meth:`KeyStore.revoke`."""
        ...

    async def rotate(self, key_id: str, *, grace: DurationLike) -> tuple[PlaintextKey, ApiKey]:
        """See :meth:`KeyStore.rotate`."""
        ...

    async def set_expiry(self, key_id: str, expires_at: TimeLike | None) -> ApiKey:
        """See :meth:`KeyStore.set_expiry`."""
        ...

    async def authenticate(
        self, authorization: str | bytes | None, *, org: str | None, permission: str | None = None
    ) -> ApiKey:
        """See :meth:`KeyStore.authenticate`."""
        ...

    async def aclose(self) -> None:
        """See :meth:`KeyStore.close`."""
        ...
