"""What a shell reads out of its server's request for the gate: :class:`RequestView`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from meterkit.http.router import Route

    pass


class RequestView:
    """What the gate reads of one request, and what the user's callables receive.

    ``method``, ``path`` (below the app's root), ``scheme``, ``peer`` (the connection's
    address), ``params`` (the path parameters: of the matched route, or the framework's
    own), ``native`` (the framework's request: an ASGI scope or Starlette ``Request``, a
    WSGI environ, a ``flask.Request``, a Django ``HttpRequest``) and :meth:`header`.
    Shells fill one per request from what they read anyway; the rest is read only when
    a callable or an option asks. The body is read (:meth:`read_body`) only for a
    request whose Idempotency-Key is honoured, for its fingerprint.
    """

    __slots__ = (
        "_body",
        "_params",
        "_route",
        "_segments",
        "authorization",
        "forwarded_proto",
        "headers",
        "idempotency_key",
        "method",
        "native",
        "path",
        "peer",
        "scheme",
    )

    def __init__(
        self,
        method: str,
        path: str,
        *,
        scheme: str = "https",
        peer: str | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        native: Any = None,
        body: bytes = b"",
    ) -> None:
        #: Lower-cased header names to values (shells read theirs in place instead).
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self._body = body
        get = self.headers.get
        self._fill(
            method,
            path,
            scheme,
            peer,
            get("authorization"),
            get("idempotency-key"),
            get("x-forwarded-proto"),
            params,
            native,
        )

    def _fill(
        self,
        method: str,
        path: str,
        scheme: str,
        peer: str | None,
        authorization: str | bytes | None,
        idempotency_key: str | None,
        forwarded_proto: str | None,
        params: Mapping[str, str] | None,
        native: Any,
    ) -> None:
        """Set what every view holds (shells read these their own way)."""
        self.method = method
        self.path = path
        self.scheme = scheme
        self.peer = peer
        self.authorization = authorization
        self.idempotency_key = idempotency_key
        self.forwarded_proto = forwarded_proto
        self._params = params
        self._segments: list[str] | None = None
        self._route: Route | None = None
        self.native = native

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.method} {self.path})"

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case), or None."""
        return self.headers.get(name.lower())

    async def read_body(self) -> bytes:
        """The whole request body, read so that the app can still read it (ASGI shells)."""
        return self._body

    def read_body_blocking(self) -> bytes:
        """:meth:`read_body` for the blocking shells (what the gate's twins call)."""
        return self._body

    @property
    def params(self) -> Mapping[str, str]:
        """The path parameters (``{"project_id": "proj_1"}``)."""
        params = self._params
        if params is None:
            route, segments = self._route, self._segments
            if route is None or segments is None:
                params = {}
            else:
                params = {name: segments[i] for name, i in route.params.items()}
            self._params = params
        return params


# Invalid marker for a header sent more than once where once is the rule.
DUPLICATE: Final = "\x00"
