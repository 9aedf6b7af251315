"""FastAPI (and Starlette): each route names its operation with a dependency.

::

    from fastapi import Depends, FastAPI

    from meterkit import Decision
    from meterkit.fastapi import Metered

    app = FastAPI()
    metered = Metered(app, meter=meter, keystore=keystore)

    @app.post("/v1/items/export")
    async def export(decision: Decision = Depends(metered("items.export"))):
        return {"charged": str(decision.charged)}

The dependency's value is the meter's :class:`~meterkit.Decision`; a refused request
never reaches the route (the refusal is answered in its place). ``Metered(app, …)``
installs what the dependencies need on ``app``: a small ASGI layer that adds the
rate-limit and credit headers to the route's response and refunds what the app
refused (a 422 for a body FastAPI could not validate, an ``HTTPException(404)``, a
5xx, an exception), and the handler that answers refusals. Only routes with the
dependency are metered; FastAPI's own 404 and 405 never reach one, so they cost
nothing. Options are those of :class:`~meterkit.http.gate.Gate` (``org``, ``caller``,
``cost``, ``render``, ``headers``, …), given for every route here or per route to
``metered(...)``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response as StarletteResponse

from meterkit.errors import ConfigurationError
from meterkit.http.asgi import GATE_KEY, Responder, ScopeView, admitted, raw_headers
from meterkit.http.gate import Gate, Response
from meterkit.http.targets import DEFAULT

if TYPE_CHECKING:
    from meterkit.core.decision import Decision

__all__ = ["Metered", "Refusal"]


class Refusal(Exception):
    """A metered route answered in the handler's place (a refusal, or an Idempotency-Key's
    kept response): sent as :attr:`response` by the handler that :class:`Metered`
    installs."""

    def __init__(self, response: Response) -> None:
        super().__init__(f"meterkit refused the request: {response.status}")
        self.response = response


async def _answer(request: Request, exc: Exception) -> StarletteResponse:
    refused = exc.response if isinstance(exc, Refusal) else None
    if refused is None:  # pragma: no cover - registered for Refusal only
        raise exc
    answer = StarletteResponse(content=refused.body, status_code=refused.status)
    answer.raw_headers = raw_headers(refused.headers)
    return answer


class Metered:
    """Metering for the routes of one FastAPI (or Starlette) app.

    ``metered = Metered(app, meter=…, keystore=…, **options)`` and, on a route,
    ``Depends(metered("operation"))``, optionally with that route's own ``org``,
    ``caller`` or ``cost``.
    """

    def __init__(self, app: Any, *, meter: Any, keystore: Any = None, **options: Any) -> None:
        if "routes" in options or "operation" in options:
            raise ConfigurationError(
                "routes name their operations with Depends(metered(...)); for a route "
                "table use meterkit.asgi.MeterMiddleware",
                "routes",
            )
        self.gate = Gate(meter, keystore, routes={}, **options)
        app.add_middleware(Responder, gate=self.gate)
        app.add_exception_handler(Refusal, _answer)

    def __repr__(self) -> str:
        return f"Metered({self.gate!r})"

    def __call__(
        self, operation: str, *, org: Any = DEFAULT, caller: Any = DEFAULT, cost: Any = DEFAULT
    ) -> Callable[[Request], Awaitable[Decision]]:
        """A dependency that meters ``operation`` and is the meter's decision."""
        target = self.gate.target(operation, org=org, caller=caller, cost=cost)
        gate = self.gate

        async def metered(request: Request) -> Decision:
            scope = request.scope
            if scope.get(GATE_KEY) is not gate:
                raise ConfigurationError(
                    f"the route of {operation!r} is metered by a Metered made for another app"
                )
            if "meterkit" in scope:
                raise ConfigurationError("a request is metered once: one metered(...) per route")
            view = ScopeView(scope, request, request.path_params, read=request.body)
            found = await gate.admit(view, target)
            if isinstance(found, Response):
                raise Refusal(found)
            assert found is not None  # (a named operation is always decided)
            admitted(scope, found)
            decision: Decision = found.decision
            return decision

        metered.__qualname__ = metered.__name__ = f"metered_{operation.replace('.', '_')}"
        return metered
