"""What decides a presented key, for every store alike: hashing (with the pepper and
the peppers being retired), expiry, revocation, organization and permissions, and
the HTTP status of each refusal (:class:`KeyRules`)."""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from collections.abc import Iterable, Mapping
from hashlib import blake2s
from hmac import compare_digest

import msgspec

from meterkit.errors import (
    AuthenticationError,
    ConfigurationError,
    InvalidRequestError,
    UnknownKeyError,
)
from meterkit.keys.model import (
    CHECK_CHARS,
    CODES,
    EXPIRED,
    INSUFFICIENT,
    INVALID,
    KEY_ID_PREFIX,
    MAX_HEADER_CHARS,
    ORG_NOT_FOUND,
    ApiKey,
    Clock,
    KeyFormat,
    Mode,
    PlaintextKey,
    _check_mode,
    _check_name,
    _check_permissions,
    _required_wildcard,
    check_org,
    checksum,
    org_rule,
    to_duration,
    to_timestamp,
)

__all__ = ["KeyRules", "RuledStore"]

#: How many well-formed ``Authorization`` headers :meth:`KeyRules.read_header`
#: remembers (about 250 bytes each): the keys in use at once on a busy server.
HEADERS_REMEMBERED = 8192


def header_digest(header: bytes) -> bytes:
    """What the stores' memories of headers key a header by: its BLAKE2s digest (32
    bytes), never the header itself, so that no plaintext key outlives its request.
    A cryptographic hash like SHA-256, at about half the instructions a request in
    CPython: hashlib's SHA-256 sets up an OpenSSL context on every call."""
    return blake2s(header).digest()


class _Hasher:
    """HMAC-SHA256 under a pepper (RFC 2104, pads precomputed), or SHA-256 without one.

    Precomputing the inner and outer pad states halves the cost of :func:`hmac.digest`,
    which re-derives them on every call; the result is the same HMAC.
    """

    __slots__ = ("_inner", "_outer", "key")

    def __init__(self, pepper: bytes | str | None, what: str = "pepper") -> None:
        #: The HMAC key (the pepper as HMAC uses it), or None: equal keys hash alike.
        self.key: bytes | None = None
        if pepper is None:
            self._inner = None
            self._outer = None
            return
        if isinstance(pepper, str):
            pepper = pepper.encode("utf-8")
        if not isinstance(pepper, bytes) or len(pepper) < 16:
            raise ConfigurationError("must be at least 16 bytes (or None)", what)
        if len(pepper) > 64:
            pepper = hashlib.sha256(pepper).digest()
        self.key = pepper
        block = pepper.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def __call__(self, token: str) -> str:
        """The hex hash of ``token``."""
        data = token.encode("ascii")
        if self._inner is None or self._outer is None:
            return hashlib.sha256(data).hexdigest()
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


def _previous_hashers(
    current: _Hasher, peppers: Iterable[bytes | str | None]
) -> tuple[_Hasher, ...]:
    """The hashers of ``previous_peppers``: distinct, and none the current pepper."""
    if isinstance(peppers, (str, bytes)) or not isinstance(peppers, Iterable):
        raise ConfigurationError(
            "is a list of peppers (None for plain SHA-256), not one pepper", "previous_peppers"
        )
    hashers: list[_Hasher] = []
    for pepper in peppers:
        hasher = _Hasher(pepper, "previous_peppers")
        if hasher.key == current.key or any(hasher.key == h.key for h in hashers):
            raise ConfigurationError(
                "names the current pepper, or one pepper twice", "previous_peppers"
            )
        hashers.append(hasher)
    return tuple(hashers)


def _status_codes(overrides: Mapping[str, int] | None) -> dict[str, int]:
    statuses = dict.fromkeys(CODES, 401)
    for code, status in (overrides or {}).items():
        if code not in statuses:
            raise ConfigurationError(
                f"unknown code {code!r}; known: {', '.join(CODES)}", "status_codes"
            )
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise ConfigurationError(
                f"must be an HTTP error status (400-599), not {status!r}", f"status_codes.{code}"
            )
        statuses[code] = status
    return statuses


class KeyRules:
    """What every key store shares: format, hashing, clock, statuses, and every decision.

    Stores only fetch and keep records; what is valid, what is admitted and what a
    rotation does is decided here, once, for the memory and Redis stores alike.
    """

    __slots__ = ("_read", "clock", "format", "hash", "org_rule", "previous", "statuses")

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        token_prefix: str = "cl",
        pepper: bytes | str | None = None,
        previous_peppers: Iterable[bytes | str | None] = (),
        status_codes: Mapping[str, int] | None = None,
        org_pattern: str | re.Pattern[str] | None = None,
    ) -> None:
        if clock is not None and not callable(clock):
            raise ConfigurationError("must be a callable returning UNIX seconds", "clock")
        self.clock: Clock = clock if clock is not None else time.time
        self.format = KeyFormat(token_prefix)
        self.hash = _Hasher(pepper)
        #: Hashers of peppers being retired: a key hashed under one still authenticates,
        #: and its stored hash is replaced by the current pepper's on the way.
        self.previous = _previous_hashers(self.hash, previous_peppers)
        self.statuses = _status_codes(status_codes)
        #: What an organization id of this store looks like (``org_pattern``; the seed's
        #: ``org_…`` by default).
        self.org_rule = org_rule(org_pattern)
        # read_header's answers by the header_digest of the header: a header is parsed,
        # checksummed and hashed under every pepper once, not on every request.
        self._read: dict[bytes, tuple[str, tuple[str, ...]]] = {}

    def check_org(self, org: object) -> str:
        """``org`` if it is an organization id under this store's rule, else an error."""
        return check_org(org, self.org_rule)

    def error(self, code: str) -> AuthenticationError:
        """A fresh refusal with ``code`` and its configured status."""
        return AuthenticationError(code, status=self.statuses[code])

    def read_header(self, header: object) -> tuple[str, tuple[str, ...]]:
        """``(key id, hashes)`` from an ``Authorization`` header, checked without any
        lookup: the token's hash under the pepper, then under each previous pepper.

        The answer is a function of the header alone, so the last
        :data:`HEADERS_REMEMBERED` well-formed headers' answers are kept, by the
        :func:`header_digest` of the header (not the header: no plaintext key outlives
        its request here).
        Only ASCII headers are kept, the only kind that can be well formed; the stored
        record is still looked up and compared on every request, so a revoked or
        rotated key is refused at once."""
        if (
            isinstance(header, (bytes, str))
            and len(header) <= MAX_HEADER_CHARS  # (a longer one is refused unhashed)
            and header.isascii()
        ):
            seen = blake2s(header if isinstance(header, bytes) else header.encode("ascii")).digest()
            read = self._read
            known = read.get(seen)
            if known is not None:
                return known
            known = self._parse(header)
            if len(read) >= HEADERS_REMEMBERED:
                # The oldest goes (threads may race here: losing one entry is harmless).
                with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                    del read[next(iter(read))]
            read[seen] = known
            return known
        return self._parse(header)

    def _parse(self, header: object) -> tuple[str, tuple[str, ...]]:
        if isinstance(header, bytes):
            if len(header) > MAX_HEADER_CHARS:
                raise self.error(INVALID)
            header = header.decode("latin-1")
        if not isinstance(header, str) or len(header) > MAX_HEADER_CHARS:
            raise self.error(INVALID)
        match = self.format._header.fullmatch(header)
        if match is None:
            raise self.error(INVALID)
        token = match.group(1)
        # The checksum is public (anyone can compute it), so a plain comparison is fine.
        if checksum(token[:-CHECK_CHARS]) != token[-CHECK_CHARS:]:
            raise self.error(INVALID)
        digests = (self.hash(token), *(hasher(token) for hasher in self.previous))
        return KEY_ID_PREFIX + match.group(3), digests

    def verified(self, record: ApiKey | None, digests: tuple[str, ...]) -> ApiKey:
        """``record`` if it exists and its hash is one of ``digests`` (the current
        pepper's first, then the previous peppers'; compared in constant time). A record
        hashed under a previous pepper comes back with the current pepper's hash, which
        the store then keeps in place of the old one."""
        if record is None:
            raise self.error(INVALID)
        stored = record.secret_hash
        if compare_digest(stored, digests[0]):
            return record
        for digest in digests[1:]:
            if compare_digest(stored, digest):
                return msgspec.structs.replace(record, secret_hash=digests[0])
        raise self.error(INVALID)

    def admit(
        self, record: ApiKey, now: float, org: str | None, permission: str | None, wildcard: str
    ) -> ApiKey:
        """``record`` if a verified key may act for ``org`` with ``permission`` at ``now``."""
        if record.revoked_at is not None:
            raise self.error(INVALID)
        if record.expires_at is not None and now >= record.expires_at:
            raise self.error(EXPIRED)
        if org is not None and org != record.org:
            raise self.error(ORG_NOT_FOUND)
        if permission is not None:
            held = record.permissions
            if permission not in held and wildcard not in held and "*" not in held:
                raise self.error(INSUFFICIENT)
        return record

    @staticmethod
    def requested(permission: str | None) -> str:
        """The wildcard covering a requested permission ('' for none); validates it."""
        return "" if permission is None else _required_wildcard(permission)

    def new_key(
        self,
        *,
        org: object,
        now: float,
        mode: object = "live",
        permissions: object = (),
        expires_at: object = None,
        name: object = None,
    ) -> tuple[PlaintextKey, ApiKey]:
        """Validate ``create``'s arguments and make a key (nothing is stored here)."""
        org = check_org(org, self.org_rule)
        checked_mode = _check_mode(mode)
        granted = _check_permissions(permissions)
        expiry = None if expires_at is None else to_timestamp(expires_at, "expires_at")
        if expiry is not None and expiry <= now:
            raise InvalidRequestError("expires_at must be in the future")
        return self._issue(org, checked_mode, granted, expiry, _check_name(name), now)

    def _issue(
        self,
        org: str,
        mode: Mode,
        permissions: tuple[str, ...],
        expires_at: float | None,
        name: str | None,
        now: float,
    ) -> tuple[PlaintextKey, ApiKey]:
        token = self.format.generate(mode)
        record = ApiKey(
            id=self.format.key_id(token),
            org=org,
            mode=mode,
            permissions=permissions,
            name=name,
            created_at=now,
            expires_at=expires_at,
            secret_hash=self.hash(token),
            last_four=token[-4:],
        )
        return PlaintextKey(token), record

    def rotation(
        self,
        old: ApiKey | None,
        key_id: str,
        grace: object,
        now: float,
    ) -> tuple[ApiKey, PlaintextKey, ApiKey]:
        """``(old key as rotated, new plaintext, new key)`` for ``rotate``.

        The new key copies the old one's organization, mode, permissions, name and
        expiry; the old one keeps working until ``now + grace`` (or its own expiry, if
        sooner), then answers ``expired_api_key``. Revoked or expired keys are not rotated.
        """
        seconds = to_duration(grace, "grace")
        if old is None:
            raise UnknownKeyError(f"no API key {key_id}")
        state = old.status(now)
        if state != "active":
            raise InvalidRequestError(f"{key_id} is {state}; create a new key instead")
        plaintext, new = self._issue(
            old.org, old.mode, old.permissions, old.expires_at, old.name, now
        )
        deadline = now + seconds
        if old.expires_at is None or deadline < old.expires_at:
            old = msgspec.structs.replace(old, expires_at=deadline)
        return old, plaintext, new

    def expiry_change(
        self, old: ApiKey | None, key_id: str, expires_at: object, now: float
    ) -> ApiKey:
        """``old`` with a new expiry for ``set_expiry`` (``None``: never).

        Only an active key's expiry changes, to a time in the future: a revoked or
        expired key stays as it is (a key that stopped working is not revived; create
        or rotate one instead).
        """
        expiry = None if expires_at is None else to_timestamp(expires_at, "expires_at")
        if expiry is not None and expiry <= now:
            raise InvalidRequestError("expires_at must be in the future")
        if old is None:
            raise UnknownKeyError(f"no API key {key_id}")
        state = old.status(now)
        if state != "active":
            raise InvalidRequestError(f"{key_id} is {state}; create a new key instead")
        return msgspec.structs.replace(old, expires_at=expiry)


class RuledStore:
    """What every key store shows of its :class:`KeyRules` (kept in ``_rules``)."""

    _rules: KeyRules

    @property
    def rules(self) -> KeyRules:
        """What this store decides keys by (format, hashing, clock, statuses)."""
        return self._rules

    @property
    def key_format(self) -> KeyFormat:
        """The format of this store's keys."""
        return self._rules.format
