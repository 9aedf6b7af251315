"""ASGI middleware: authenticate, rate-limit and charge every API request.

Works with Starlette, FastAPI and any ASGI 3 application::

    from meterkit.http.asgi import MeterMiddleware

    app.add_middleware(MeterMiddleware, meter=meter, keystore=keystore, exclude=["/health"])

    # or, around any ASGI app:
    app = MeterMiddleware(app, meter=meter, keystore=keystore)

``meter`` is a :class:`~meterkit.Meter` or :class:`~meterkit.AsyncMeter`, ``keystore`` a
synchronous or asynchronous key store; asynchronous ones are awaited, synchronous ones
called inline (right for the in-memory ones; give network stores in their async form so
the event loop never blocks). What is decided, and in which order, lives in
:class:`meterkit.http.gate.Gate`, shared with :mod:`meterkit.http.wsgi`.

Only ``http`` requests are metered; ``lifespan`` and ``websocket`` pass through.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Container, Iterable, MutableMapping
from typing import Any

from meterkit.errors import MeterkitError
from meterkit.http.gate import DUPLICATE, REFUNDED, Admission, Gate, Response, logger

__all__ = ["Admission", "MeterMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Header names the gate produces, lowered and encoded once.
_NAMES: dict[str, bytes] = {}


def _name(name: str) -> bytes:
    encoded = name.lower().encode("latin-1")
    if len(_NAMES) < 256:
        _NAMES[name] = encoded
    return encoded


def _raw_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    names = _NAMES
    return [(names.get(k) or _name(k), v.encode("latin-1")) for k, v in headers]


async def _respond(send: Send, response: Response) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": _raw_headers(response.headers),
        }
    )
    await send({"type": "http.response.body", "body": response.body})


class MeterMiddleware:
    """Meter every HTTP request to ``app``: HTTPS, API key, permission, limits, credits.

    Options (see :class:`meterkit.http.gate.Gate`): ``trusted_proxies`` (addresses whose
    ``X-Forwarded-Proto`` is believed, for servers that do not apply proxy headers
    themselves; uvicorn's ``--proxy-headers`` already sets the scheme), ``exclude``
    (paths that are not metered, ``"/health"`` or ``"/docs*"``), ``refund_statuses``
    (app statuses whose credits are returned; 404, 405, 422 and every 5xx by default) and
    ``require_https`` (turn off for local development only).

    The admitted request's :class:`Admission` (key and decision) is in
    ``scope["meterkit"]`` and, for Starlette and FastAPI, ``request.state.meterkit``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        meter: Any,
        keystore: Any,
        trusted_proxies: Iterable[str] = (),
        exclude: Iterable[str] = (),
        refund_statuses: Container[int] = REFUNDED,
        require_https: bool = True,
    ) -> None:
        self.app = app
        self.meter = meter
        self.keystore = keystore
        self.gate = Gate(
            meter.policy,
            trusted_proxies=trusted_proxies,
            exclude=exclude,
            refund_statuses=refund_statuses,
            require_https=require_https,
        )
        self._authenticate = keystore.authenticate
        self._authenticate_awaits = inspect.iscoroutinefunction(keystore.authenticate)
        self._check = meter.check
        self._check_awaits = inspect.iscoroutinefunction(meter.check)
        self._refund = meter.refund
        self._refund_awaits = inspect.iscoroutinefunction(meter.refund)

    def __repr__(self) -> str:
        return f"MeterMiddleware(app={self.app!r}, meter={self.meter!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
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
        gate = self.gate
        step = gate.begin(
            scope["method"],
            path,
            scope.get("scheme", "http"),
            client[0] if client else None,
            forwarded_proto,
            authorization,
            idempotency_key,
        )
        if step is None:
            await self.app(scope, receive, send)
            return
        if isinstance(step, Response):
            await _respond(send, step)
            return
        try:
            if self._authenticate_awaits:
                key = await self._authenticate(
                    step.authorization, org=step.org, permission=step.permission
                )
            else:
                key = self._authenticate(
                    step.authorization, org=step.org, permission=step.permission
                )
            refused = gate.unrouted(step)
            if refused is None:
                if self._check_awaits:
                    decision = await self._check(
                        key, operation=step.operation, idempotency_key=step.idempotency_key
                    )
                else:
                    decision = self._check(
                        key, operation=step.operation, idempotency_key=step.idempotency_key
                    )
                refused = gate.refusal(decision)
        except MeterkitError as exc:
            refused = gate.failure(exc, step)
        if refused is not None:
            await _respond(send, refused)
            return

        admission = Admission(key, decision)
        scope["meterkit"] = admission
        state = scope.get("state")
        if state is None:
            scope["state"] = {"meterkit": admission}
        else:
            state["meterkit"] = admission
        started = False

        async def send_metered(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                refunded = gate.refunds(message["status"], decision) and await self._give_back(
                    decision
                )
                headers = list(message.get("headers", ()))
                names = _NAMES
                for name, value in gate.admitted_headers(decision, refunded).items():
                    headers.append((names.get(name) or _name(name), value.encode("latin-1")))
                # A new message: the app may send the same dict again (a constant).
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_metered)
        except Exception:
            # The server answers 500 for an app that raised before responding.
            if not started and gate.refunds(500, decision):
                await self._give_back(decision)
            raise

    async def _give_back(self, decision: Any) -> bool:
        try:
            if self._refund_awaits:
                return bool(await self._refund(decision))
            return bool(self._refund(decision))
        except MeterkitError as exc:
            # The app's answer matters more than the refund: log it and carry on.
            logger.warning(
                "meterkit: could not refund charge %s of %s (%s): %s",
                decision.charge_id,
                decision.key,
                decision.operation,
                exc,
            )
            return False
