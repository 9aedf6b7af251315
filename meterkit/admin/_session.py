"""The dashboard's signed cookies: the session, the CSRF tokens, and the one-time reveal.

**Session.** Signing in with a key gives a cookie holding the key's public id, its
organization, when the session began and a random nonce, signed with HMAC-SHA256
under the app's secret. It never holds the key's plaintext. Every request checks the
signature and age, then asks the key store whether that key is still active, still
of that organization and still holds the admin permission: revoking, rotating out or
expiring the key ends its sessions at once.

**CSRF.** Every form carries a token, an HMAC of the session under the secret (the
sign-in form's, of a random nonce held in a short-lived cookie of its own), checked
in constant time; and a request whose ``Origin`` (or ``Sec-Fetch-Site``) says it came
from another site is refused before that. The cookies are ``SameSite=Strict`` too.

**Reveal.** A new key's plaintext is shown once, on the page a create or rotate
redirects to, without the server keeping it: the plaintext is split into two random
shares (a one-time pad and the plaintext XOR that pad), one in a cookie limited to
the keys page that the next page load deletes, the other in the redirect's URL. Each
share alone is uniformly random; a reload has the URL's share but no longer the
cookie's, so it shows nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from typing import Final, NamedTuple

import msgspec

from meterkit.errors import ConfigurationError

__all__ = ["Session", "Signer"]

_MAC_BYTES: Final = 16  # 128-bit tags: ample for cookies checked on every request
_MAX_COOKIE: Final = 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes | None:
    if len(text) > _MAX_COOKIE:
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


class Session(NamedTuple):
    """A signed-in browser: the key it signed in with (its id, never its secret)."""

    key_id: str
    org: str
    started: float
    nonce: str


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(tuple[str, str, float, str]).decode


class Signer:
    """Signs and checks the dashboard's cookies and tokens under one secret."""

    __slots__ = ("_key", "max_age")

    def __init__(self, secret: bytes | str | None, max_age: float) -> None:
        if secret is None:
            secret = secrets.token_bytes(32)
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        if not isinstance(secret, bytes) or len(secret) < 32:
            raise ConfigurationError(
                "must be at least 32 random bytes (or None for a random one per process)",
                "session_secret",
            )
        if isinstance(max_age, bool) or not isinstance(max_age, int | float) or max_age <= 0:
            raise ConfigurationError("is a positive number of seconds", "session_max_age")
        # One key per purpose, so that no token of one kind passes for another.
        self._key = {
            purpose: hmac.digest(secret, purpose, hashlib.sha256)
            for purpose in (b"session", b"csrf", b"sign-in", b"reveal")
        }
        self.max_age = float(max_age)

    def _mac(self, purpose: bytes, *parts: bytes) -> bytes:
        message = b"\0".join(parts)
        return hmac.digest(self._key[purpose], message, hashlib.sha256)[:_MAC_BYTES]

    # -- the session ----------------------------------------------------------------------

    def session_cookie(self, key_id: str, org: str, now: float) -> tuple[str, Session]:
        """A new session's cookie value, and the session."""
        session = Session(key_id, org, now, secrets.token_urlsafe(12))
        payload = _encode(tuple(session))
        return f"{_b64(payload)}.{_b64(self._mac(b'session', payload))}", session

    def session(self, cookie: str | None, now: float) -> Session | None:
        """The session a cookie holds, if its signature is ours and it has not aged out."""
        if not cookie or cookie.count(".") != 1:
            return None
        body, tag = cookie.split(".")
        payload, mac = _unb64(body), _unb64(tag)
        if payload is None or mac is None:
            return None
        if not hmac.compare_digest(mac, self._mac(b"session", payload)):
            return None
        try:
            session = Session(*_decode(payload))
        except (msgspec.DecodeError, TypeError):
            return None
        if not session.started <= now < session.started + self.max_age:
            return None
        return session

    # -- CSRF -----------------------------------------------------------------------------

    def csrf_token(self, session: Session) -> str:
        """The token every form of this session carries."""
        return _b64(self._mac(b"csrf", session.nonce.encode(), session.key_id.encode()))

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(
            token.encode("ascii", "replace"), self.csrf_token(session).encode()
        )

    def sign_in_token(self, nonce: str) -> str:
        """The sign-in form's token, for the nonce in its cookie."""
        return _b64(self._mac(b"sign-in", nonce.encode("ascii", "replace")))

    def sign_in_ok(self, nonce: str | None, token: str | None) -> bool:
        if not nonce or token is None or len(nonce) > 64:
            return False
        return hmac.compare_digest(
            token.encode("ascii", "replace"), self.sign_in_token(nonce).encode()
        )

    # -- revealing a new key once ---------------------------------------------------------

    def reveal_shares(self, plaintext: str, session: Session) -> tuple[str, str]:
        """``(cookie value, URL value)``: the two shares of ``plaintext``."""
        secret = plaintext.encode("ascii")
        pad = secrets.token_bytes(len(secret))
        masked = bytes(a ^ b for a, b in zip(secret, pad, strict=True))
        mac = self._mac(b"reveal", session.nonce.encode(), masked, pad)
        return f"{_b64(masked)}.{_b64(mac)}", _b64(pad)

    def revealed(self, cookie: str | None, url_share: str | None, session: Session) -> str | None:
        """The plaintext the two shares make, if both are there and were made together
        for this session; else None."""
        if not cookie or not url_share or cookie.count(".") != 1:
            return None
        body, tag = cookie.split(".")
        masked, mac, pad = _unb64(body), _unb64(tag), _unb64(url_share)
        if masked is None or mac is None or pad is None or len(masked) != len(pad):
            return None
        if not hmac.compare_digest(mac, self._mac(b"reveal", session.nonce.encode(), masked, pad)):
            return None
        try:
            return bytes(a ^ b for a, b in zip(masked, pad, strict=True)).decode("ascii")
        except UnicodeDecodeError:  # pragma: no cover - only our own shares pass the MAC
            return None
