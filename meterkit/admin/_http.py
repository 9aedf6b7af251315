"""What the admin app needs of HTTP, on plain ASGI: its route table, one request read
(bounded), replies and refusals in the seed's shape."""

from __future__ import annotations

import inspect
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from http.cookies import CookieError, SimpleCookie
from typing import Any, Final

import msgspec

from meterkit.http.refusals import error_body

__all__ = ["Refusal", "Reply", "Request", "Route", "Router", "settle"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: The largest request body read: ample for any form or JSON body of this API.
MAX_BODY: Final = 16 * 1024
MAX_QUERY: Final = 2048
_encode = msgspec.json.Encoder().encode

#: Headers on every answer: nothing here may be cached (a page may hold a new key's
#: plaintext) or framed, nothing is sniffed, and no URL (the reveal's share is in one)
#: is sent to another site as a referrer.
SECURITY_HEADERS: Final = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("X-Frame-Options", "DENY"),
)


async def settle(value: Any) -> Any:
    """A store's or meter's answer: awaited when the call was asynchronous (synchronous
    stores and meters are called inline, as the ASGI middleware calls them)."""
    return await value if inspect.isawaitable(value) else value


class Refusal(Exception):
    """An answer in the seed's error shape, raised from anywhere in a handler."""

    def __init__(
        self,
        status: int,
        type_: str,
        code: str,
        message: str,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(f"{status} {code}")
        self.status = status
        self.type = type_
        self.code = code
        self.message = message
        self.headers = list(headers)

    def body(self) -> bytes:
        return error_body(self.type, self.code, self.message, self.status)


def invalid(message: str) -> Refusal:
    """400: the request's parameters or body are not what the API takes."""
    # Messages name fields and limits, never echo what was sent: a 10 KB field stays out.
    return Refusal(400, "invalid_request_error", "invalid_request", message[:300])


def not_found(what: str = "api_key") -> Refusal:
    if what == "api_key":
        return Refusal(
            404, "invalid_request_error", "api_key_not_found", "No API key with this id."
        )
    return Refusal(404, "invalid_request_error", "not_found", "No API endpoint matches this path.")


class Reply:
    """An answer: status, headers, body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @classmethod
    def json(cls, status: int, value: Any) -> Reply:
        return cls(status, [("Content-Type", "application/json")], _encode(value))

    @classmethod
    def refusal(cls, refusal: Refusal) -> Reply:
        headers = [("Content-Type", "application/json"), *refusal.headers]
        return cls(refusal.status, headers, refusal.body())

    async def send(self, send: Send, head_only: bool = False) -> None:
        headers = [*SECURITY_HEADERS, *self.headers, ("Content-Length", str(len(self.body)))]
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            }
        )
        await send({"type": "http.response.body", "body": b"" if head_only else self.body})


class Route:
    """``METHOD /path/{param}`` and the name of the handler that answers it."""

    __slots__ = ("handler", "method", "params", "segments", "template")

    def __init__(self, method: str, template: str, handler: str) -> None:
        self.method = method
        self.template = template
        self.handler = handler
        self.segments = tuple(template.split("/"))
        self.params = {s[1:-1]: i for i, s in enumerate(self.segments) if s.startswith("{")}


class Router:
    """Routes by segment count, then literal segments (a dozen routes: no trie needed)."""

    __slots__ = ("_by_length", "routes")

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = list(routes)
        self._by_length: dict[int, list[Route]] = {}
        for route in self.routes:
            self._by_length.setdefault(len(route.segments), []).append(route)

    def match(self, path: str) -> tuple[list[Route], dict[str, str]]:
        """The routes (one per method) of ``path``, and its parameters; none if no route."""
        segments = path.split("/")
        found: list[Route] = []
        params: dict[str, str] = {}
        for route in self._by_length.get(len(segments), ()):
            for want, got in zip(route.segments, segments, strict=True):
                if want != got and not (want.startswith("{") and got):
                    break
            else:
                found.append(route)
                if not params:
                    params = {name: segments[i] for name, i in route.params.items()}
        return found, params


def _each_once(raw: bytes, whole: str, field: str) -> dict[str, str]:
    """The fields of URL-encoded ``raw`` (a query string or a form), each given once
    (at most 20); a 400 naming ``whole`` or the ``field`` otherwise."""
    try:
        pairs = urllib.parse.parse_qsl(
            raw.decode("utf-8"), keep_blank_values=True, max_num_fields=20
        )
    except (UnicodeDecodeError, ValueError):
        raise invalid(f"{whole} is not valid UTF-8 form encoding.") from None
    fields: dict[str, str] = {}
    for name, value in pairs:
        if name in fields:
            raise invalid(f"{field} {name[:40]!r} is given twice.")
        fields[name] = value
    return fields


class Request:
    """One request as the handlers read it."""

    __slots__ = (
        "_receive",
        "headers",
        "method",
        "params",
        "path",
        "peer",
        "query",
        "root",
        "scheme",
    )

    def __init__(self, scope: Scope, receive: Receive, path: str, params: dict[str, str]) -> None:
        self._receive = receive
        self.method: str = scope["method"]
        self.path = path
        self.params = params
        self.root: str = scope.get("root_path", "") or ""
        self.scheme: str = scope.get("scheme", "http")
        client = scope.get("client")
        self.peer: str | None = client[0] if client else None
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            # Repeated headers are one comma-joined value, as HTTP allows, except the
            # credential: two Authorization headers are no credential at all.
            if name in headers:
                value = "" if name == "authorization" else f"{headers[name]}, {value}"
            headers[name] = value
        self.headers = headers
        raw_query: bytes = scope.get("query_string", b"")
        if len(raw_query) > MAX_QUERY:
            raise invalid(f"The query string is longer than {MAX_QUERY} bytes.")
        self.query = _each_once(raw_query, "The query string", "The query parameter")

    def cookie(self, name: str) -> str | None:
        raw = self.headers.get("cookie")
        if not raw:
            return None
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(raw)
        except CookieError:
            return None
        morsel = jar.get(name)
        return morsel.value if morsel is not None else None

    async def body(self) -> bytes:
        """The body, at most :data:`MAX_BODY` bytes (413 beyond)."""
        declared = self.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
            raise _too_large()
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise Refusal(400, "invalid_request_error", "invalid_request", "Disconnected.")
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                raise _too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def media_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    async def json(self, kind: type[Any]) -> Any:
        """The JSON body decoded as ``kind`` (an empty body is ``{}``); 400/415 else."""
        body = await self.body()
        if not body.strip():
            body = b"{}"
        elif self.media_type() != "application/json":
            raise Refusal(
                415,
                "invalid_request_error",
                "unsupported_media_type",
                "Send the body as JSON, with Content-Type: application/json.",
            )
        try:
            return msgspec.json.decode(body, type=kind)
        except msgspec.ValidationError as exc:
            raise invalid(f"Invalid body: {exc}.") from None
        except msgspec.DecodeError:
            raise invalid("The body is not valid JSON.") from None

    async def form(self) -> dict[str, str]:
        """An ``application/x-www-form-urlencoded`` body (each field once); 400 else."""
        if self.media_type() != "application/x-www-form-urlencoded":
            raise invalid("Send the form as application/x-www-form-urlencoded.")
        return _each_once(await self.body(), "The form", "The form field")


def _too_large() -> Refusal:
    return Refusal(
        413,
        "invalid_request_error",
        "request_too_large",
        f"The request body is larger than {MAX_BODY} bytes.",
    )
