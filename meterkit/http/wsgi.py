"""WSGI middleware: authenticate, rate-limit and charge every API request.

Works with Flask, Falcon and any WSGI application::

    from meterkit.http.wsgi import MeterMiddleware

    app.wsgi_app = MeterMiddleware(app.wsgi_app, meter=meter, keystore=keystore)  # Flask

``meter`` is a :class:`~meterkit.Meter` and ``keystore`` a synchronous key store (WSGI
servers run each request on a thread; both are thread-safe). Every option, and what is
decided in which order, is :class:`meterkit.http.gate.Gate`'s; this module only reads
WSGI environs and calls ``start_response``. Django has its own
:class:`meterkit.django.MeterMiddleware`, for its ``MIDDLEWARE`` setting.

HTTPS: ``wsgi.url_scheme`` is believed (a server such as waitress sets it from proxy
headers when told to trust the proxy); ``X-Forwarded-Proto`` is believed only when
``REMOTE_ADDR`` is one of ``trusted_proxies``.

Around a Flask app, the route table is compared with the app's own routes when the
middleware is made (wrap the app once its routes are defined) and again at the first
request: a metered route the app does not serve is a :class:`ConfigurationError`.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from meterkit.http.gate import (
    Admission,
    Layer,
    RequestView,
    Response,
    middleware_gate,
    require_blocking,
)

if TYPE_CHECKING:
    from meterkit.http.gate import Gate

__all__ = ["Admission", "MeterMiddleware"]

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], object]]
Environ = dict[str, Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

#: Where a framework adapter finds the gate of the shell it runs under.
GATE_KEY = "meterkit.gate"


class EnvironView(RequestView):
    """A :class:`RequestView` of a WSGI environ (Django's ``request.META`` is one too).

    The body is read when the gate asks (an Idempotency-Key's fingerprint): with
    ``read`` (a framework's cached reader: Flask's ``request.get_data``), or from
    ``wsgi.input``, which the app then reads again from the start.
    """

    __slots__ = ("_environ", "_read")

    def __init__(
        self,
        environ: Mapping[str, Any],
        native: Any = None,
        params: Any = None,
        scheme: str | None = None,
        path: str | None = None,
        read: Callable[[], bytes] | None = None,
    ) -> None:
        get = environ.get
        self._environ = environ
        self._read = read
        self._fill(
            environ["REQUEST_METHOD"],
            (get("PATH_INFO") or "/") if path is None else path,
            get("wsgi.url_scheme", "http") if scheme is None else scheme,
            get("REMOTE_ADDR"),
            get("HTTP_AUTHORIZATION"),
            get("HTTP_IDEMPOTENCY_KEY"),
            get("HTTP_X_FORWARDED_PROTO"),
            params,
            environ if native is None else native,
        )

    def header(self, name: str) -> str | None:
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        value = self._environ.get(key)
        return value if value is None or isinstance(value, str) else str(value)

    @property
    def headers(self) -> dict[str, str]:  # type: ignore[override]
        found = {}
        for key, value in self._environ.items():
            if key.startswith("HTTP_"):
                found[key[5:].replace("_", "-").lower()] = value
            elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
                found[key.replace("_", "-").lower()] = value
        return found

    def read_body_blocking(self) -> bytes:
        if self._read is not None:
            return self._read()
        environ: Any = self._environ
        stream = environ.get("wsgi.input")
        if stream is None:
            return b""
        try:
            length = int(environ.get("CONTENT_LENGTH") or -1)
        except ValueError:
            length = -1
        if length >= 0:
            body: bytes = stream.read(length)
        elif environ.get("wsgi.input_terminated"):
            body = stream.read()  # (a chunked body the server ends for us)
        else:
            body = b""
        environ["wsgi.input"] = io.BytesIO(body)
        return body


def respond(start_response: StartResponse, response: Response) -> list[bytes]:
    """Send the gate's refusal."""
    start_response(response.status_line, response.headers)
    return [response.body]


def run_metered(
    gate: Gate, app: WSGIApp, environ: Environ, start_response: StartResponse
) -> Iterable[bytes]:
    """Run the app; the response of a request that was admitted (``environ["meterkit"]``,
    set before it runs or by a framework route while it runs) gets its headers, and
    its refund when the status asks for one."""
    call = _MeteredCall(gate, environ, start_response)
    try:
        result = app(environ, call.start_response)
    except Exception:
        call.failed()
        raise
    admission: Admission | None = environ.get("meterkit")
    if admission is not None and admission.keeping is not None:
        # Kept before it goes out (as it streams, before its last piece), for the
        # client's next retry.
        if call.started and isinstance(result, list):
            admission.keeping.add(b"".join(result), last=True)
            gate.keep_blocking(admission)
            return result
        return _Guarded(result, call, gate.kept_chunks(admission, result))
    if call.started:
        return result
    # The app starts its response lazily, while its body is iterated.
    return _Guarded(result, call)


def flask_serves(app: Any) -> Callable[[str, str], bool] | None:
    """Whether the Flask app behind ``app`` (its ``wsgi_app``) serves ``method path``;
    None when ``app`` is not a Flask app's, or it has no routes of its own yet."""
    owner = getattr(app, "__self__", app)
    url_map = getattr(owner, "url_map", None)
    if url_map is None or not hasattr(url_map, "bind"):
        return None
    if not any(rule.endpoint != "static" for rule in url_map.iter_rules()):
        return None
    adapter = url_map.bind("localhost")

    def serves(method: str, path: str) -> bool:
        try:
            adapter.match(path, method=method)
        except Exception:  # NotFound, MethodNotAllowed, RequestRedirect
            return False
        return True

    return serves


class MeterMiddleware:
    """Meter every request to the WSGI ``app``: HTTPS, API key, permission, limits, credits.

    Options are those of :class:`meterkit.http.gate.Gate`. The admitted request's
    :class:`Admission` is in ``environ["meterkit"]`` (``flask.request.environ["meterkit"]``).
    """

    def __init__(self, app: WSGIApp, *, meter: Any, keystore: Any = None, **options: Any) -> None:
        require_blocking(meter, keystore, "WSGI")
        self.app = app
        self.meter = meter
        self.keystore = keystore
        self.gate = middleware_gate(meter, keystore, options, "meterkit.flask")
        # The route table against a Flask app's routes: now, if it has some, else at
        # the first request.
        serves = flask_serves(app)
        self._compared = serves is not None
        if serves is not None:
            self.gate.refuse_drift(serves, "Flask")

    def __repr__(self) -> str:
        return f"MeterMiddleware(app={self.app!r}, meter={self.meter!r})"

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if not self._compared:
            serves = flask_serves(self.app)
            if serves is not None:
                self.gate.refuse_drift(serves, "Flask")
            self._compared = True
        gate = self.gate
        found = gate.admit_blocking(EnvironView(environ))
        if found is None:
            return self.app(environ, start_response)
        if found.__class__ is Response:
            return respond(start_response, found)
        environ["meterkit"] = found
        return run_metered(gate, self.app, environ, start_response)


class Responder(Layer):
    """The WSGI :class:`~meterkit.http.gate.Layer` (:mod:`meterkit.http.flask`)."""

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        environ[GATE_KEY] = self.gate
        return run_metered(self.gate, self.app, environ, start_response)


class _MeteredCall:
    """One request: adds the headers of its admission; refunds on a status in
    refund_statuses."""

    __slots__ = ("_start_response", "environ", "gate", "started")

    def __init__(self, gate: Gate, environ: Environ, start_response: StartResponse) -> None:
        self.gate = gate
        self.environ = environ
        self._start_response = start_response
        self.started = False

    def start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: ExcInfo | None = None,
    ) -> Callable[[bytes], object]:
        # Called again (with exc_info) when the app fails after starting: the new
        # status is the one that counts.
        self.started = True
        admission: Admission | None = self.environ.get("meterkit")
        if admission is not None:
            code = int(status[:3])
            keeping = admission.keeping
            if keeping is None:
                # (the usual response: its headers as pairs at once)
                added = self.gate.answered_pairs(admission, code, False)
                if added is not None:
                    return self._start_response(status, [*headers, *added], exc_info)
            extra = self.gate.answered(admission, code)
            if extra is None:
                extra = self.gate.finish_blocking(admission, code)
            if keeping is not None:
                keeping.start(code, headers, extra)
                write = self._start_response(status, [*headers, *extra.items()], exc_info)

                def kept_write(data: bytes) -> object:
                    # (the legacy write() of an app: its body comes before the iterable's)
                    keeping.add(data)
                    return write(data)

                return kept_write
            headers = [*headers, *extra.items()]
        return self._start_response(status, headers, exc_info)

    def failed(self) -> None:
        """The app raised (before answering, the server will say 500)."""
        admission: Admission | None = self.environ.get("meterkit")
        if admission is not None:
            if not self.started:
                self.gate.finish_blocking(admission, 500)
            self.ended()

    def ended(self) -> None:
        """The response is over: one cut short frees its Idempotency-Key (once)."""
        admission: Admission | None = self.environ.get("meterkit")
        if admission is not None and admission.keeping is not None:
            self.gate.keep_blocking(admission)


class _Guarded:
    """A response body that is lazily started (a failure before the start is refunded)
    or kept for an Idempotency-Key's retries (``chunks``: the body, as it is kept)."""

    __slots__ = ("_call", "_chunks", "_iterator", "_result")

    def __init__(
        self,
        result: Iterable[bytes],
        call: _MeteredCall,
        chunks: Iterator[bytes] | None = None,
    ) -> None:
        self._result = result
        self._chunks = chunks
        self._iterator: Iterator[bytes] | None = None
        self._call = call

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._iterator is None:
            self._iterator = self._chunks or iter(self._result)
        try:
            return next(self._iterator)
        except StopIteration:
            raise
        except Exception:
            self._call.failed()
            raise

    def close(self) -> None:
        try:
            close: Callable[[], object] | None = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            self._call.ended()
