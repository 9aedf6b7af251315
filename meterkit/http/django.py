"""Django: a ``MIDDLEWARE`` class, and a decorator for views that name their operation.

In ``settings.py``::

    MIDDLEWARE = [
        # ... security and session middlewares first ...
        "meterkit.django.MeterMiddleware",
    ]
    METERKIT = {
        "meter": "myproject.metering.meter",        # a meterkit.Meter, or its dotted path
        "keystore": "myproject.metering.keystore",  # a key store, or its dotted path
        # any option of meterkit.http.gate.Gate: "org", "caller", "cost", "render", ...
    }

and on a view::

    from meterkit.django import metered

    @metered("items.export")
    def export(request):
        return JsonResponse({"charged": str(request.meterkit.decision.charged)})

Which requests are metered: with a route table (the policy's ``[routes]``, or
``METERKIT["routes"]``), every request, matched by path as by the WSGI middleware (an
unknown path is refused, a decorated view outside the table never reached); without
one, the decorated views (and the paths an ``operation`` callable names). A refused
request gets the refusal instead of the view; an admitted one finds its
:class:`~meterkit.http.gate.Admission` in ``request.meterkit``, and its response gets
the rate-limit and credit headers (refunded when the view answers a status of
``refund_statuses``, such as the 404 of ``Http404``, or fails).

Because it is a ``MIDDLEWARE`` class, ``django.test.Client`` goes through it too. At
start-up (when Django loads its middlewares) the route table is compared with the
URLconf, and decorated views' operations with the policy: a metered route Django does
not serve, or an unknown operation, is a :class:`~meterkit.errors.ConfigurationError`.
The meter and key store are synchronous; under ASGI Django runs this middleware in
its thread pool.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.urls import Resolver404, get_resolver, resolve

from meterkit.errors import ConfigurationError
from meterkit.http.gate import Admission, Gate, Response, Target, require_blocking
from meterkit.http.targets import DEFAULT
from meterkit.http.wsgi import EnvironView

__all__ = ["MeterMiddleware", "metered"]

_View = TypeVar("_View", bound=Callable[..., Any])
_MARK = "meterkit_operation"


def metered(
    operation: str, *, org: Any = DEFAULT, caller: Any = DEFAULT, cost: Any = DEFAULT
) -> Callable[[_View], _View]:
    """Mark a view as metering ``operation`` (with its own ``org``, ``caller`` or
    ``cost``, if given); :class:`MeterMiddleware` meters it before the view runs. A
    request that reaches the view unmetered (the middleware missing) is refused with
    a :class:`~meterkit.errors.ConfigurationError`, never served for free."""

    def decorate(view: _View) -> _View:
        @functools.wraps(view)
        def metered_view(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            if getattr(request, "meterkit", None) is None:
                raise ConfigurationError(
                    f"the view of {operation!r} was reached unmetered: add "
                    "'meterkit.django.MeterMiddleware' to settings.MIDDLEWARE"
                )
            return view(request, *args, **kwargs)

        setattr(metered_view, _MARK, (operation, org, caller, cost))
        return metered_view  # type: ignore[return-value]

    return decorate


def _load(value: Any, name: str) -> Any:
    """An object from ``METERKIT``: itself, or the object a dotted path names."""
    if not isinstance(value, str):
        return value
    module, _, attribute = value.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError):
        raise ConfigurationError(f"cannot import {value!r}", f"METERKIT[{name!r}]") from None


def _views(patterns: Any) -> Iterator[Any]:
    """Every view callable of a URLconf, includes followed."""
    for entry in patterns:
        inner = getattr(entry, "url_patterns", None)
        if inner is not None:
            yield from _views(inner)
        else:
            yield getattr(entry, "callback", None)


def _serves(method: str, path: str) -> bool:
    # (a URLconf routes paths, not methods: any method reaches the view)
    try:
        resolve(path)
    except Resolver404:
        return False
    return True


class MeterMiddleware:
    """Meter requests to a Django project: configured by ``settings.METERKIT``."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        config = getattr(settings, "METERKIT", None)
        if not isinstance(config, Mapping) or "meter" not in config:
            raise ConfigurationError(
                "settings.METERKIT is a dict with at least 'meter' (and 'keystore' for keys)",
                "METERKIT",
            )
        options = dict(config)
        meter = _load(options.pop("meter"), "meter")
        keystore = _load(options.pop("keystore", None), "keystore")
        require_blocking(meter, keystore, "Django's MeterMiddleware")
        self.gate = Gate(meter, keystore, **options)
        # Checked now, at start-up: the table against the URLconf, the views' operations.
        if self.gate.router is not None:
            self.gate.refuse_drift(_serves, "Django")
        self._table = self.gate.router is not None or options.get("operation") is not None
        self._targets: dict[Any, Target] = {}
        for view in _views(get_resolver().url_patterns):
            if getattr(view, _MARK, None) is not None:
                self._target(view)

    def __repr__(self) -> str:
        return f"MeterMiddleware({self.gate!r})"

    def _target(self, view: Any) -> Target:
        found = self._targets.get(view)
        if found is None:
            operation, org, caller, cost = getattr(view, _MARK)
            found = self._targets[view] = self.gate.target(
                operation, org=org, caller=caller, cost=cost
            )
        return found

    def _decide(self, request: HttpRequest, target: Target | None, params: Any = None) -> Any:
        view = EnvironView(
            request.META,
            request,
            params,
            scheme=request.scheme,
            path=request.path_info,
            read=lambda: request.body,
        )
        found = self.gate.admit_blocking(view, target)
        if isinstance(found, Response):
            answer = HttpResponse(found.body, status=found.status)
            for name, value in found.headers:
                answer[name] = value
            return answer
        if isinstance(found, Admission):
            request.meterkit = found
        return None

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if self._table:
            refused = self._decide(request, None)
            if refused is not None:
                return refused
        response = self.get_response(request)
        admission: Admission | None = getattr(request, "meterkit", None)
        if admission is not None:
            status = response.status_code
            added = self.gate.answered_pairs(admission, status, False)
            if added is None:
                extra = self.gate.answered(admission, status)
                if extra is None:
                    extra = self.gate.finish_blocking(admission, status)
                added = list(extra.items())
            for name, value in added:
                response[name] = value
            if admission.keeping is not None:
                self._keep(admission, response)
        return response

    def _keep(self, admission: Admission, response: HttpResponse) -> None:
        """Keep the response for the retries of its Idempotency-Key: now, or as it
        streams (before its last piece goes out, for the client's next retry)."""
        keeping = admission.keeping
        assert keeping is not None
        keeping.start(response.status_code, response.items(), {})  # (the gate's are in it)
        if response.streaming:
            streaming: Any = response
            streaming.streaming_content = self.gate.kept_chunks(
                admission, streaming.streaming_content
            )
        else:
            keeping.add(response.content, last=True)
            self.gate.keep_blocking(admission)

    def process_view(
        self,
        request: HttpRequest,
        view_func: Callable[..., Any],
        view_args: tuple[Any, ...],
        view_kwargs: dict[str, Any],
    ) -> HttpResponse | None:
        """Meter a decorated view's request, with the URL's parameters, before it runs."""
        if getattr(view_func, _MARK, None) is None or getattr(request, "meterkit", None):
            return None
        params = {k: str(v) for k, v in view_kwargs.items()}
        return self._decide(request, self._target(view_func), params)
