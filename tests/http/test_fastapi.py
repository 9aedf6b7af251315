"""meterkit.fastapi end to end: an API of our own under uvicorn, driven over HTTP."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel

import meterkit
from meterkit import Decision
from meterkit.asgi import MeterMiddleware
from meterkit.errors import ConfigurationError
from meterkit.fastapi import Metered
from tests.http._items import OTHER, PROJECT, UNSERVED, Stack, export_cost, problem
from tests.http._serve import StartupFailed, serve_asgi

HTTPS = {"X-Forwarded-Proto": "https"}


class ItemIn(BaseModel):
    name: str
    quantity: int


def create_app(stack: Stack, **options: Any) -> FastAPI:
    """The items API, each route naming its operation."""
    app = FastAPI()
    metered = Metered(app, meter=stack.meter, keystore=stack.keystore, render=problem, **options)

    # Each route's dependency, made once (a route declares it as a default).
    in_project = metered("items.list", org="path:project_id")
    by_key = metered("items.list")
    one_item = metered("items.get")
    create_item = metered("items.create")
    by_size = metered("items.export", cost=export_cost)
    by_address = metered("auth.login", caller="ip")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/projects/{project_id}/items")
    async def project_items(project_id: str, decision: Decision = Depends(in_project)) -> Any:
        return {"project": project_id, "org": decision.org, "charged": str(decision.charged)}

    @app.get("/v1/items")
    async def items(request: Request, decision: Decision = Depends(by_key)) -> Any:
        return {"org": decision.org, "key": request.state.meterkit.key.id}

    @app.get("/v1/items/{item_id}")
    async def item(item_id: str, _: Decision = Depends(one_item)) -> Any:
        raise HTTPException(404, f"no item {item_id}")

    @app.post("/v1/items", status_code=201)
    async def create(item: ItemIn, _: Decision = Depends(create_item)) -> Any:
        return {"name": item.name}

    @app.post("/v1/items/export")
    async def export(request: Request, decision: Decision = Depends(by_size)) -> Any:
        return {"bytes": len(await request.body()), "charged": str(decision.charged)}

    @app.post("/v1/login")
    async def login(decision: Decision = Depends(by_address)) -> Any:
        return {"caller": decision.key}

    return app


@pytest.fixture
def stack() -> Stack:
    return Stack(asynchronous=True)


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with (
        serve_asgi(create_app(stack)) as url,
        httpx.Client(base_url=url, headers=HTTPS, timeout=10) as client,
    ):
        yield client


def test_a_route_meters_its_own_operation_for_the_project_in_its_path(
    http: httpx.Client, stack: Stack
) -> None:
    """GET /v1/projects/{project_id}/items meters items.list for that project; the
    dependency's value is the decision, and the response carries its headers."""
    response = http.get(f"/v1/projects/{PROJECT}/items", headers=stack.auth(stack.reader))
    assert response.status_code == 200
    assert response.json() == {"project": PROJECT, "org": PROJECT, "charged": "0.01"}
    assert response.headers["x-credits-charged"] == "0.01"
    assert response.headers["ratelimit-policy"] == '"key-minute";q=20;w=60;meterkit-burst=5'
    assert response.headers["ratelimit"] == '"key-minute";r=4;t=3'
    assert stack.used() == meterkit.from_micro(10_000)


def test_another_projects_key_is_refused_with_the_apps_body(
    http: httpx.Client, stack: Stack
) -> None:
    """A key of another project gets the renderer's problem+json 401, charged nothing."""
    response = http.get(f"/v1/projects/{PROJECT}/items", headers=stack.auth(stack.stranger))
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {
        "type": "https://errors.acme.test/organization_not_found",
        "title": "The organization does not exist or is not accessible",
        "status": 401,
    }
    missing = http.get("/v1/items")
    assert missing.json()["type"].endswith("/invalid_api_key")
    assert stack.used(PROJECT) == stack.used(OTHER) == 0


def test_the_org_comes_from_the_key(http: httpx.Client, stack: Stack) -> None:
    """GET /v1/items names no organization: each key is metered in its own."""
    mine = http.get("/v1/items", headers=stack.auth(stack.reader)).json()
    theirs = http.get("/v1/items", headers=stack.auth(stack.stranger)).json()
    assert (mine["org"], theirs["org"]) == (PROJECT, OTHER)
    assert stack.used(PROJECT) == stack.used(OTHER) == meterkit.from_micro(10_000)


def test_a_size_priced_route(http: httpx.Client, stack: Stack) -> None:
    """The export is priced by its body: 0.01 plus 0.01 per started kilobyte."""
    body = b"x" * 52_000
    response = http.post("/v1/items/export", headers=stack.auth(stack.reader), content=body)
    assert response.json() == {"bytes": 52_000, "charged": "0.53"}
    assert response.headers["x-credits-charged"] == "0.53"
    assert stack.used() == meterkit.from_micro(530_000)


def test_an_anonymous_route_is_limited_per_client_address(http: httpx.Client, stack: Stack) -> None:
    """POST /v1/login needs no key: each client address (uvicorn reads X-Forwarded-For
    from its trusted proxy) gets 3 a minute, then 429 with a Retry-After that works."""
    first = {"X-Forwarded-For": "203.0.113.7"}
    answers = [http.post("/v1/login", headers=first) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[0].json() == {"caller": "ip:203.0.113.7"}
    denied = answers[3]
    assert denied.headers["content-type"] == "application/problem+json"
    retry = int(denied.headers["retry-after"])
    assert denied.json()["retry_after"] == retry
    assert denied.headers["ratelimit"] == f'"login-ip";r=0;t={retry}'
    assert "x-credits-charged" in denied.headers
    other = http.post("/v1/login", headers={"X-Forwarded-For": "198.51.100.2"})
    assert other.status_code == 200
    stack.clock.advance(retry)
    assert http.post("/v1/login", headers=first).status_code == 200


def test_framework_refusals_are_not_charged(http: httpx.Client, stack: Stack) -> None:
    """FastAPI's 422 for a body it cannot validate and an HTTPException(404) are refunded;
    FastAPI's own 404 for an unknown path never reaches a metered route."""
    writer = stack.auth(stack.writer)
    bad = http.post("/v1/items", headers=writer, json={"name": "a", "quantity": "many"})
    assert bad.status_code == 422
    assert bad.headers["x-credits-charged"] == "0"
    gone = http.get("/v1/items/it_404", headers=writer)
    assert gone.status_code == 404
    assert gone.headers["x-credits-charged"] == "0"
    assert http.get("/v1/nowhere", headers=writer).status_code == 404
    assert stack.used() == 0
    made = http.post("/v1/items", headers=writer, json={"name": "a", "quantity": 2})
    assert (made.status_code, made.headers["x-credits-charged"]) == (201, "0.05")
    assert stack.view.usage(PROJECT).requests == 3


def test_unmetered_routes_and_plain_http(http: httpx.Client, stack: Stack) -> None:
    """A route without the dependency is not metered; a metered one refuses plain HTTP."""
    assert http.get("/health", headers={"X-Forwarded-Proto": "http"}).status_code == 200
    plain = http.get("/v1/items", headers={"X-Forwarded-Proto": "http", **stack.auth(stack.reader)})
    assert plain.status_code == 403
    assert plain.json()["type"].endswith("/https_required")


def test_route_drift_stops_uvicorn_from_starting(
    stack: Stack, capfd: pytest.CaptureFixture[str]
) -> None:
    """A route table that meters a route the FastAPI app does not serve fails the
    lifespan startup, so uvicorn exits naming the route."""
    app = FastAPI()

    @app.get("/v1/items")
    async def items() -> dict[str, str]:
        return {}

    @app.get("/v1/projects/{project_id}/items")
    async def project_items(project_id: str) -> dict[str, str]:
        return {}

    wrapped = MeterMiddleware(app, meter=stack.meter, keystore=stack.keystore, routes=UNSERVED)
    with pytest.raises(StartupFailed), serve_asgi(wrapped):
        pass  # pragma: no cover
    assert re.search(r"does not serve: DELETE /v1/items/\{item_id\}", capfd.readouterr().err)
    served = {k: v for k, v in UNSERVED.items() if not k.startswith("DELETE")}
    fine = MeterMiddleware(app, meter=stack.meter, keystore=stack.keystore, routes=served)
    with serve_asgi(fine) as url:
        response = httpx.get(f"{url}/v1/items", headers={**HTTPS, **stack.auth(stack.reader)})
    assert response.status_code == 200


def test_a_metered_dependency_needs_its_app() -> None:
    """An operation the policy does not price is refused when the route is declared."""
    stack = Stack(asynchronous=True)
    metered = Metered(FastAPI(), meter=stack.meter, keystore=stack.keystore)
    with pytest.raises(ConfigurationError, match=r"items\.delete"):
        metered("items.delete")
