"""ASGI middleware: authenticate, rate-limit and charge every API request.

Works with Starlette, FastAPI and any ASGI 3 application::

    from meterkit.http.asgi import MeterMiddleware

    app.add_middleware(MeterMiddleware, meter=meter, keystore=keystore, exclude=["/health"])

    # or, around any ASGI app:
    app = MeterMiddleware(app, meter=meter, keystore=keystore)

``meter`` is a :class:`~meterkit.Meter` or :class:`~meterkit.AsyncMeter`, ``keystore`` a
synchronous or asynchronous key store; asynchronous ones are awaited, synchronous ones
called inline (right for the in-memory ones; give network stores in their async form so
the event loop never blocks). Every option, and what is decided in which order, is
:class:`meterkit.http.gate.Gate`'s; this module only reads ASGI requests and writes
ASGI responses.

Only ``http`` requests are metered; ``lifespan`` and ``websocket`` pass through. At
start-up (the ``lifespan`` startup, or else the first request) the route table is
compared with a Starlette or FastAPI app's own routes: a metered route the app does not
serve fails the start-up with a clear message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from meterkit.errors import ConfigurationError
from meterkit.http.gate import (
    Admission,
    Gate,
    Keeping,
    Layer,
    RequestView,
    Response,
    middleware_gate,
)
from meterkit.http.request import DUPLICATE

__all__ = ["Admission", "MeterMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Where a framework adapter finds the gate of the shell it runs under.
GATE_KEY = "meterkit.gate"

# Header names the gate produces, lowered and encoded once.
_NAMES: dict[str, bytes] = {}


def _name(name: str) -> bytes:
    encoded = name.lower().encode("latin-1")
    if len(_NAMES) < 256:
        _NAMES[name] = encoded
    return encoded


def raw_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Headers as ASGI sends them: lower-cased latin-1 bytes."""
    names = _NAMES
    return [(names.get(k) or _name(k), v.encode("latin-1")) for k, v in headers]


class ScopeView(RequestView):
    """A :class:`RequestView` of an ASGI scope; other headers are read when asked.

    The body is read when the gate asks (an Idempotency-Key's fingerprint): with
    ``read`` (a framework's cached reader, such as Starlette's ``request.body``), or
    from ``receive``, whose messages the app then gets from :attr:`receive`.
    """

    __slots__ = ("_read", "_receive", "_scope", "_taken")

    def __init__(
        self,
        scope: Scope,
        native: Any = None,
        params: Any = None,
        *,
        receive: Receive | None = None,
        read: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        # One pass over the headers for the three the gate always reads.
        authorization: bytes | None = None
        idempotency_key: str | None = None
        forwarded_proto: str | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                # Two Authorization headers are no valid credential at all.
                authorization = value if authorization is None else b""
            elif name == b"idempotency-key":
                idempotency_key = value.decode("latin-1") if idempotency_key is None else DUPLICATE
            elif name == b"x-forwarded-proto":
                proto = value.decode("latin-1")
                forwarded_proto = proto if forwarded_proto is None else f"{forwarded_proto},{proto}"
        path: str = scope["path"]
        root = scope.get("root_path")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        client = scope.get("client")
        self._scope = scope
        self._receive = receive
        self._read = read
        self._taken: list[Message] = []
        self._fill(
            scope["method"],
            path,
            scope.get("scheme", "http"),
            client[0] if client else None,
            authorization,
            idempotency_key,
            forwarded_proto,
            params,
            scope if native is None else native,
        )

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode("latin-1")
        found = [v.decode("latin-1") for k, v in self._scope["headers"] if k == wanted]
        return ", ".join(found) if found else None

    @property
    def headers(self) -> dict[str, str]:  # type: ignore[override]
        found: dict[str, str] = {}
        for k, v in self._scope["headers"]:
            name, value = k.decode("latin-1"), v.decode("latin-1")
            found[name] = f"{found[name]}, {value}" if name in found else value
        return found

    async def read_body(self) -> bytes:
        if self._read is not None:
            return await self._read()
        receive = self._receive
        chunks = []
        while receive is not None:
            message = await receive()
            self._taken.append(message)
            if message["type"] != "http.request":
                break  # (the client left: the app will hear it too)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    @property
    def receive(self) -> Receive:
        """What the app receives from: the messages read for the body first, if any."""
        receive = self._receive
        assert receive is not None
        taken = self._taken
        if not taken:
            return receive

        async def replay() -> Message:
            return taken.pop(0) if taken else await receive()

        return replay


async def respond(send: Send, response: Response) -> None:
    """Send the gate's refusal."""
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": raw_headers(response.headers),
        }
    )
    await send({"type": "http.response.body", "body": response.body})


async def run_metered(gate: Gate, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Run the app; the response of a request that was admitted (``scope["meterkit"]``,
    set before it runs or by a framework route while it runs) gets its headers, and
    its refund when the status asks for one."""
    started = False
    keeping: Keeping | None = None

    async def send_metered(message: Message) -> None:
        nonlocal started, keeping
        if message["type"] == "http.response.start" and not started:
            started = True
            admission = scope.get("meterkit")
            if admission is not None:
                status = message["status"]
                sent = message.get("headers", ())
                keeping = admission.keeping
                # (the usual response: its headers as bytes at once)
                added = gate.answered_pairs(admission, status, True) if keeping is None else None
                if added is None:
                    extra = gate.answered(admission, status)
                    if extra is None:
                        extra = await gate.finish(admission, status)
                    added = raw_headers(extra.items())
                    if keeping is not None:
                        keeping.start(status, sent, extra)
                # A new message: the app may send the same dict again (a constant).
                message = {**message, "headers": [*sent, *added]}
        elif keeping is not None and message["type"] == "http.response.body":
            # Kept as it streams; stored before its last piece, for the client's next retry.
            last = not message.get("more_body", False)
            keeping.add(message.get("body", b""), last)
            if last:
                await gate.keep(scope["meterkit"])
        await send(message)

    try:
        await app(scope, receive, send_metered)
    except Exception:
        # The server answers 500 for an app that raised before responding.
        admission = scope.get("meterkit")
        if not started and admission is not None:
            await gate.finish(admission, 500)
        raise
    finally:
        # A response that failed or was cut short frees its Idempotency-Key (once).
        admission = scope.get("meterkit")
        if admission is not None and admission.keeping is not None:
            await gate.keep(admission)


def admitted(scope: Scope, admission: Admission) -> None:
    """Hand the admission to the app: ``scope["meterkit"]`` and Starlette's state."""
    scope["meterkit"] = admission
    state = scope.get("state")
    if state is None:
        scope["state"] = {"meterkit": admission}
    else:
        state["meterkit"] = admission


def starlette_serves(app: Any) -> Callable[[str, str], bool] | None:
    """Whether a Starlette (or FastAPI) app serves ``method path``, asked of its own
    routes (mounts included); None for an app that is not one."""
    routes = _routes_of(app)
    if routes is None:
        return None

    def serves(method: str, path: str) -> bool:
        scope = {"type": "http", "method": method, "path": path, "root_path": ""}
        return _serves(routes, scope)

    return serves


def _routes_of(app: Any) -> list[Any] | None:
    # add_middleware builds its stack lazily: below meterkit sit other middlewares and
    # the router, each holding the next as ``app``.
    for _ in range(32):
        routes = getattr(app, "routes", None)
        if isinstance(routes, list):
            return routes
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


def _serves(routes: list[Any], scope: dict[str, Any]) -> bool:
    for route in routes:
        matches = getattr(route, "matches", None)
        if matches is None:
            continue
        match, child = matches(scope)
        if match.name != "FULL":
            continue
        inner = getattr(route, "routes", None)
        if isinstance(inner, list) and inner and not getattr(route, "methods", None):
            # A mount: its own routes decide.
            if _serves(inner, {**scope, **child}):
                return True
            continue
        return True
    return False


class MeterMiddleware:
    """Meter every HTTP request to ``app``: HTTPS, API key, permission, limits, credits.

    Options are those of :class:`meterkit.http.gate.Gate`: ``routes``, ``operation``,
    ``org``, ``caller``, ``cost``, ``trusted_proxies``, ``exclude``, ``refund_statuses``,
    ``require_https``, ``render``, ``headers``, ``credits_retry_after``.

    The admitted request's :class:`Admission` (key and decision) is in
    ``scope["meterkit"]`` and, for Starlette and FastAPI, ``request.state.meterkit``.
    """

    def __init__(self, app: ASGIApp, *, meter: Any, keystore: Any = None, **options: Any) -> None:
        self.app = app
        self.meter = meter
        self.keystore = keystore
        self.gate = middleware_gate(meter, keystore, options, "meterkit.fastapi")
        # The route table against the framework's routes: at the first lifespan or
        # request, when the app's routes are all defined.
        self._drift: str | None = None
        self._compared = False

    def __repr__(self) -> str:
        return f"MeterMiddleware(app={self.app!r}, meter={self.meter!r})"

    def _compare(self, scope: Scope) -> None:
        self._compared = True
        serves = starlette_serves(self.app) or starlette_serves(scope.get("app"))
        if serves is not None:
            try:
                self.gate.refuse_drift(serves, "Starlette")
            except ConfigurationError as exc:
                self._drift = str(exc)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan" and not self._compared:
                self._compare(scope)
                if self._drift is not None:
                    await receive()  # lifespan.startup
                    await send({"type": "lifespan.startup.failed", "message": self._drift})
                    return
            await self.app(scope, receive, send)
            return
        if not self._compared:
            self._compare(scope)
        if self._drift is not None:
            raise ConfigurationError(self._drift)
        gate = self.gate
        view = ScopeView(scope, receive=receive)
        found = await gate.admit(view)
        if found is None:
            await self.app(scope, view.receive, send)
        elif found.__class__ is Response:
            await respond(send, found)
        else:
            admitted(scope, found)  # type: ignore[arg-type]
            await run_metered(gate, self.app, scope, view.receive, send)


class Responder(Layer):
    """The ASGI :class:`~meterkit.http.gate.Layer` (:mod:`meterkit.http.fastapi`)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[GATE_KEY] = self.gate
        await run_metered(self.gate, self.app, scope, receive, send)
