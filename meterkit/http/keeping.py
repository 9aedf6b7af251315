"""The response of a request with an ``Idempotency-Key``, kept as it goes out for its
retries (issue 16): :class:`Keeping`, what is kept of its headers, the request's
fingerprint, and which methods and statuses take part."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final

import msgspec

if TYPE_CHECKING:
    from meterkit.http.gate import Gate

    pass


class Keeping:
    """The response of an admitted request with an Idempotency-Key, as it goes out: the
    shells hand it the status and headers (:meth:`start`) and the body (:meth:`add`),
    and :meth:`Gate.keep` stores it for the key's retries (or frees the key for the
    next one) once the response ended or failed."""

    __slots__ = (
        "_gate",
        "chunks",
        "complete",
        "fingerprint",
        "headers",
        "settled",
        "size",
        "status",
        "storing",
        "token",
    )

    def __init__(self, gate: Gate, fingerprint: str, token: str) -> None:
        self._gate = gate
        #: What the request was: method, path, operation, body digest.
        self.fingerprint = fingerprint
        #: Who holds the key's mark ("" for the first attempt, whose mark is its charge).
        self.token = token
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        #: The status is one to keep (and the response is still within the size limit).
        self.storing = False
        #: The whole body went out.
        self.complete = False
        #: :meth:`Gate.keep` has run.
        self.settled = False

    def __repr__(self) -> str:
        return f"Keeping(status={self.status}, size={self.size}, complete={self.complete})"

    def start(
        self,
        status: int,
        headers: Iterable[tuple[str | bytes, str | bytes]],
        extra: Mapping[str, str],
    ) -> None:
        """The response's status and headers as sent: the app's, and the gate's ``extra``."""
        gate = self._gate
        self.status = status
        self.storing = status in gate.idempotency_statuses and status not in gate.refund_statuses
        if self.storing:
            self.headers = kept_headers(headers)
            self.headers.extend(extra.items())

    def add(self, chunk: bytes, last: bool = False) -> None:
        """A piece of the body as sent; ``last``: the body ends with it."""
        if self.storing and not self.complete:
            self.size += len(chunk)
            if self.size <= self._gate.idempotency_max_body:
                self.chunks.append(chunk)
            else:
                self.chunks = []  # too large to keep: only its size is remembered
        if last:
            self.complete = True

    def payload(self) -> bytes | None:
        """What to keep: the encoded response; ``b""`` for one too large to keep; None
        for nothing (a status not kept, or a response that did not end)."""
        if not (self.storing and self.complete):
            return None
        if self.size > self._gate.idempotency_max_body:
            return b""
        return _encode_response((self.status, self.headers, b"".join(self.chunks)))


#: Headers never kept with a response: those of one connection (RFC 9110 section 7.6.1)
#: and cookies, which are one client's.
_NOT_KEPT: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "set-cookie",
    }
)


def kept_headers(headers: Iterable[tuple[str | bytes, str | bytes]]) -> list[tuple[str, str]]:
    """The headers of a response that are kept for its replay (as text)."""
    kept: list[tuple[str, str]] = []
    named: set[str] = set()  # the headers Connection names
    for name, value in headers:
        if isinstance(name, bytes):
            name = name.decode("latin-1")
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        lower = name.lower()
        if lower in _NOT_KEPT:
            if lower == "connection":
                named.update(part.strip().lower() for part in value.split(","))
            continue
        kept.append((name, value))
    if named:
        kept = [(name, value) for name, value in kept if name.lower() not in named]
    return kept


_encode_response = msgspec.msgpack.Encoder().encode
decode_response = msgspec.msgpack.Decoder(tuple[int, list[tuple[str, str]], bytes]).decode


def fingerprint(method: str, path: str, operation: str, body: bytes) -> str:
    """What a request with an Idempotency-Key was: its method, path, operation and body."""
    head = f"{method}\x00{path}\x00{operation}\x00".encode("utf-8", "surrogatepass")
    return hashlib.sha256(head + body).hexdigest()[:32]


#: The methods whose Idempotency-Key is honoured by default; GET, HEAD and OPTIONS
#: (safe methods, whose retries need no key) ignore it.
IDEMPOTENCY_METHODS: frozenset[str] = frozenset({"POST", "PUT", "PATCH", "DELETE"})

#: The app statuses whose responses are kept for an Idempotency-Key's retries by
#: default: every answer but a failure (5xx) and a refusal a retry may find otherwise
#: (401, 402, 403, 429). A refunded status (``refund_statuses``) is never kept.
KEPT: frozenset[int] = frozenset(range(200, 500)) - {401, 402, 403, 429}
