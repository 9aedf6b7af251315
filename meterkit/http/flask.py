"""Flask: each view names its operation with a decorator.

::

    from flask import Flask, g

    from meterkit.flask import Metered

    app = Flask(__name__)
    metered = Metered(app, meter=meter, keystore=keystore)

    @app.post("/v1/items/export")
    @metered("items.export")
    def export():
        return {"charged": str(g.meterkit.decision.charged)}

The decorator goes below the route's. A refused request never reaches the view (the
refusal is answered in its place); an admitted one finds its
:class:`~meterkit.http.gate.Admission` in ``flask.g.meterkit`` and
``request.environ["meterkit"]``. ``Metered(app, …)`` (or ``metered.init_app(app)``,
for app factories) wraps ``app.wsgi_app`` with the small layer that adds the rate-limit
and credit headers to the view's response and refunds what the app refused (an
``abort(404)``, a 5xx, an exception). Only decorated views are metered; Flask's own 404
and 405 never reach one, so they cost nothing. Options are those of
:class:`~meterkit.http.gate.Gate`, given for every view here or per view to
``metered(...)``. The meter and key store are synchronous (``meterkit.Meter``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import flask

from meterkit.errors import ConfigurationError
from meterkit.http.gate import Admission, Gate, Response, Target, require_blocking
from meterkit.http.targets import DEFAULT
from meterkit.http.wsgi import GATE_KEY, EnvironView, Responder

__all__ = ["Metered"]

_View = TypeVar("_View", bound=Callable[..., Any])


class Metered:
    """Metering for the views of one Flask app (or of several, through ``init_app``)."""

    def __init__(
        self, app: flask.Flask | None = None, *, meter: Any, keystore: Any = None, **options: Any
    ) -> None:
        require_blocking(meter, keystore, "Flask")
        if "routes" in options or "operation" in options:
            raise ConfigurationError(
                "views name their operations with @metered(...); for a route table use "
                "meterkit.wsgi.MeterMiddleware",
                "routes",
            )
        self.gate = Gate(meter, keystore, routes={}, **options)
        if app is not None:
            self.init_app(app)

    def __repr__(self) -> str:
        return f"Metered({self.gate!r})"

    def init_app(self, app: flask.Flask) -> None:
        """Install the response layer on ``app`` (once per app)."""
        if app.extensions.get("meterkit") is self:
            return
        app.wsgi_app = Responder(app.wsgi_app, gate=self.gate)  # type: ignore[method-assign]
        app.extensions["meterkit"] = self

    def __call__(
        self, operation: str, *, org: Any = DEFAULT, caller: Any = DEFAULT, cost: Any = DEFAULT
    ) -> Callable[[_View], _View]:
        """A decorator that meters ``operation`` on a view."""
        target = self.gate.target(operation, org=org, caller=caller, cost=cost)

        def decorate(view: _View) -> _View:
            if inspect.iscoroutinefunction(view):

                @functools.wraps(view)
                async def metered_async(*args: Any, **kwargs: Any) -> Any:
                    refused = self._admit(target)
                    return refused if refused is not None else await view(*args, **kwargs)

                return metered_async  # type: ignore[return-value]

            @functools.wraps(view)
            def metered(*args: Any, **kwargs: Any) -> Any:
                refused = self._admit(target)
                return refused if refused is not None else view(*args, **kwargs)

            return metered  # type: ignore[return-value]

        return decorate

    def _admit(self, target: Target) -> flask.Response | None:
        request = flask.request
        environ = request.environ
        if environ.get(GATE_KEY) is not self.gate:
            raise ConfigurationError(
                f"the view of {target.operation!r} is metered by a Metered not installed on "
                "this app: call Metered(app, ...) or metered.init_app(app)"
            )
        if "meterkit" in environ:
            raise ConfigurationError("a request is metered once: one @metered(...) per view")
        params = {k: str(v) for k, v in (request.view_args or {}).items()}
        view = EnvironView(environ, request, params, read=request.get_data)
        found = self.gate.admit_blocking(view, target)
        if isinstance(found, Response):
            return flask.Response(found.body, status=found.status, headers=found.headers)
        assert isinstance(found, Admission)
        environ["meterkit"] = found
        flask.g.meterkit = found
        return None
