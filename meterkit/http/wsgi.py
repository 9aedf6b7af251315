"""WSGI middleware: authenticate, rate-limit and charge every API request.

Works with Flask, Django, Falcon and any WSGI application::

    from meterkit.http.wsgi import MeterMiddleware

    app.wsgi_app = MeterMiddleware(app.wsgi_app, meter=meter, keystore=keystore)  # Flask

``meter`` is a :class:`~meterkit.Meter` and ``keystore`` a synchronous key store (WSGI
servers run each request on a thread; both are thread-safe). What is decided, and in
which order, lives in :class:`meterkit.http.gate.Gate`, shared with :mod:`meterkit.http.asgi`.

HTTPS: ``wsgi.url_scheme`` is believed (a server such as waitress sets it from proxy
headers when told to trust the proxy); ``X-Forwarded-Proto`` is believed only when
``REMOTE_ADDR`` is one of ``trusted_proxies``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Container, Iterable, Iterator
from types import TracebackType
from typing import Any

from meterkit.errors import ConfigurationError, MeterkitError
from meterkit.http.gate import REFUNDED, Admission, Gate, Response, logger

__all__ = ["Admission", "MeterMiddleware"]

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], object]]
Environ = dict[str, Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


def _respond(start_response: StartResponse, response: Response) -> list[bytes]:
    start_response(response.status_line, response.headers)
    return [response.body]


class MeterMiddleware:
    """Meter every request to the WSGI ``app``: HTTPS, API key, permission, limits, credits.

    Options as for :class:`meterkit.http.asgi.MeterMiddleware`: ``trusted_proxies``,
    ``exclude``, ``refund_statuses`` (404, 405, 422 and every 5xx by default), ``require_https``.
    The admitted request's :class:`Admission` is in ``environ["meterkit"]``
    (``flask.request.environ["meterkit"]``).
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        meter: Any,
        keystore: Any,
        trusted_proxies: Iterable[str] = (),
        exclude: Iterable[str] = (),
        refund_statuses: Container[int] = REFUNDED,
        require_https: bool = True,
    ) -> None:
        if inspect.iscoroutinefunction(getattr(meter, "check", None)):
            raise ConfigurationError("WSGI needs a synchronous meterkit.Meter", "meter")
        if inspect.iscoroutinefunction(getattr(keystore, "authenticate", None)):
            raise ConfigurationError("WSGI needs a synchronous key store", "keystore")
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
        self._check = meter.check

    def __repr__(self) -> str:
        return f"MeterMiddleware(app={self.app!r}, meter={self.meter!r})"

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        gate = self.gate
        step = gate.begin(
            environ["REQUEST_METHOD"],
            environ.get("PATH_INFO") or "/",
            environ.get("wsgi.url_scheme", "http"),
            environ.get("REMOTE_ADDR"),
            environ.get("HTTP_X_FORWARDED_PROTO"),
            environ.get("HTTP_AUTHORIZATION"),
            environ.get("HTTP_IDEMPOTENCY_KEY"),
        )
        if step is None:
            return self.app(environ, start_response)
        if isinstance(step, Response):
            return _respond(start_response, step)
        try:
            key = self._authenticate(step.authorization, org=step.org, permission=step.permission)
            refused = gate.unrouted(step)
            if refused is None:
                decision = self._check(
                    key, operation=step.operation, idempotency_key=step.idempotency_key
                )
                refused = gate.refusal(decision)
        except MeterkitError as exc:
            refused = gate.failure(exc, step)
        if refused is not None:
            return _respond(start_response, refused)

        environ["meterkit"] = Admission(key, decision)
        call = _MeteredCall(self, decision, start_response)
        try:
            result = self.app(environ, call.start_response)
        except Exception:
            call.failed()
            raise
        if call.started:
            return result
        # The app starts its response lazily, while its body is iterated.
        return _Guarded(result, call)

    def _give_back(self, decision: Any) -> bool:
        try:
            return bool(self.meter.refund(decision))
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


class _MeteredCall:
    """One admitted request: adds the headers; refunds on a status in refund_statuses."""

    __slots__ = ("_start_response", "decision", "middleware", "refunded", "started")

    def __init__(
        self, middleware: MeterMiddleware, decision: Any, start_response: StartResponse
    ) -> None:
        self.middleware = middleware
        self.decision = decision
        self._start_response = start_response
        self.started = False
        self.refunded = False

    def start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: ExcInfo | None = None,
    ) -> Callable[[bytes], object]:
        # Called again (with exc_info) when the app fails after starting: the new
        # status is the one that counts.
        self.started = True
        self._refund_if(int(status[:3]))
        extra = self.middleware.gate.admitted_headers(self.decision, self.refunded)
        return self._start_response(status, [*headers, *extra.items()], exc_info)

    def failed(self) -> None:
        """The app raised before answering: the server will say 500."""
        if not self.started:
            self._refund_if(500)

    def _refund_if(self, status: int) -> None:
        if not self.refunded and self.middleware.gate.refunds(status, self.decision):
            self.refunded = self.middleware._give_back(self.decision)


class _Guarded:
    """A lazily started response body: a failure before the start is refunded."""

    __slots__ = ("_call", "_iterator", "_result")

    def __init__(self, result: Iterable[bytes], call: _MeteredCall) -> None:
        self._result = result
        self._iterator: Iterator[bytes] | None = None
        self._call = call

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._iterator is None:
            self._iterator = iter(self._result)
        try:
            return next(self._iterator)
        except StopIteration:
            raise
        except Exception:
            self._call.failed()
            raise

    def close(self) -> None:
        close: Callable[[], object] | None = getattr(self._result, "close", None)
        if close is not None:
            close()
