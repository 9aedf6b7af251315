"""meterkit.flask end to end: an API of our own under waitress, driven over HTTP."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from flask import Flask, abort, g, request

import meterkit
from meterkit.errors import ConfigurationError
from meterkit.flask import Metered
from meterkit.wsgi import MeterMiddleware
from tests.http._items import OTHER, PROJECT, SERVED, UNSERVED, Stack, export_cost, problem
from tests.http._serve import serve_wsgi

HTTPS = {"X-Forwarded-Proto": "https"}


def create_app(stack: Stack, **options: Any) -> Flask:
    """The items API, each view naming its operation."""
    app = Flask(__name__)
    metered = Metered(app, meter=stack.meter, keystore=stack.keystore, render=problem, **options)

    @app.get("/health")
    def health() -> Any:
        return {"status": "ok"}

    @app.get("/v1/projects/<project_id>/items")
    @metered("items.list", org="path:project_id")
    def project_items(project_id: str) -> Any:
        decision = g.meterkit.decision
        return {"project": project_id, "org": decision.org, "charged": str(decision.charged)}

    @app.get("/v1/items")
    @metered("items.list")
    def items() -> Any:
        return {"org": g.meterkit.decision.org, "key": request.environ["meterkit"].key.id}

    @app.get("/v1/items/<item_id>")
    @metered("items.get")
    def item(item_id: str) -> Any:
        abort(404)

    @app.post("/v1/items")
    @metered("items.create")
    def create() -> Any:
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("quantity"), int):
            return {"error": "quantity is a number"}, 422
        return {"name": body.get("name")}, 201

    @app.post("/v1/items/export")
    @metered("items.export", cost=export_cost)
    def export() -> Any:
        return {"bytes": len(request.get_data()), "charged": str(g.meterkit.decision.charged)}

    @app.post("/v1/login")
    @metered("auth.login", caller="ip")
    def login() -> Any:
        return {"caller": g.meterkit.decision.key}

    return app


@pytest.fixture
def stack() -> Stack:
    return Stack()


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    # waitress believes X-Forwarded-For and -Proto from 127.0.0.1, as behind a local proxy
    trusted = {"trusted_proxy_headers": "x-forwarded-proto x-forwarded-for"}
    with (
        serve_wsgi(create_app(stack), **trusted) as url,
        httpx.Client(base_url=url, headers=HTTPS, timeout=10) as client,
    ):
        yield client


def test_a_view_meters_its_own_operation_for_the_project_in_its_path(
    http: httpx.Client, stack: Stack
) -> None:
    """GET /v1/projects/<project_id>/items meters items.list for that project; the view
    reads the decision in flask.g; the response carries its headers."""
    response = http.get(f"/v1/projects/{PROJECT}/items", headers=stack.auth(stack.reader))
    assert response.status_code == 200
    assert response.json() == {"project": PROJECT, "org": PROJECT, "charged": "0.01"}
    assert response.headers["x-credits-charged"] == "0.01"
    assert response.headers["ratelimit"] == '"key-minute";r=4;t=3'


def test_another_projects_key_is_refused_with_the_apps_body(
    http: httpx.Client, stack: Stack
) -> None:
    """A key of another project gets the renderer's problem+json 401, charged nothing."""
    response = http.get(f"/v1/projects/{PROJECT}/items", headers=stack.auth(stack.stranger))
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "https://errors.acme.test/organization_not_found"
    assert stack.used(PROJECT) == stack.used(OTHER) == 0


def test_the_org_comes_from_the_key(http: httpx.Client, stack: Stack) -> None:
    """GET /v1/items names no organization: each key is metered in its own."""
    mine = http.get("/v1/items", headers=stack.auth(stack.reader)).json()
    theirs = http.get("/v1/items", headers=stack.auth(stack.stranger)).json()
    assert (mine["org"], theirs["org"]) == (PROJECT, OTHER)


def test_a_size_priced_view(http: httpx.Client, stack: Stack) -> None:
    """The export is priced by its body: 0.01 plus 0.01 per started kilobyte."""
    response = http.post("/v1/items/export", headers=stack.auth(stack.reader), content=b"x" * 2_500)
    assert response.json() == {"bytes": 2_500, "charged": "0.04"}
    assert stack.used() == meterkit.from_micro(40_000)


def test_an_anonymous_view_is_limited_per_client_address(http: httpx.Client) -> None:
    """POST /v1/login needs no key: each client address gets 3 a minute, then 429."""
    first = {"X-Forwarded-For": "203.0.113.7"}
    answers = [http.post("/v1/login", headers=first) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[0].json() == {"caller": "ip:203.0.113.7"}
    assert answers[3].json()["retry_after"] == int(answers[3].headers["retry-after"])
    assert http.post("/v1/login", headers={"X-Forwarded-For": "198.51.100.2"}).status_code == 200


def test_framework_refusals_are_not_charged(http: httpx.Client, stack: Stack) -> None:
    """abort(404) and a 422 from the view are refunded; Flask's own 404 and 405 never
    reach a metered view."""
    writer = stack.auth(stack.writer)
    gone = http.get("/v1/items/it_404", headers=writer)
    assert (gone.status_code, gone.headers["x-credits-charged"]) == (404, "0")
    bad = http.post("/v1/items", headers=writer, json={"name": "a", "quantity": "many"})
    assert (bad.status_code, bad.headers["x-credits-charged"]) == (422, "0")
    assert http.get("/v1/nowhere", headers=writer).status_code == 404
    assert http.delete("/v1/items", headers=writer).status_code == 405
    assert stack.used() == 0
    made = http.post("/v1/items", headers=writer, json={"name": "a", "quantity": 2})
    assert (made.status_code, made.headers["x-credits-charged"]) == (201, "0.05")


def test_route_drift_stops_the_app_from_starting(stack: Stack) -> None:
    """A route table that meters a route the Flask app does not serve is refused when
    the middleware wraps the app."""
    app = Flask(__name__)
    app.add_url_rule("/v1/items", "items", lambda: {})
    app.add_url_rule("/v1/projects/<project_id>/items", "project", lambda project_id: {})
    with pytest.raises(ConfigurationError, match=re.escape("DELETE /v1/items/{item_id}")):
        MeterMiddleware(app.wsgi_app, meter=stack.meter, keystore=stack.keystore, routes=UNSERVED)
    MeterMiddleware(app.wsgi_app, meter=stack.meter, keystore=stack.keystore, routes=SERVED)


def test_a_view_reached_without_the_layer_is_refused(stack: Stack) -> None:
    """A decorated view in an app Metered was not installed on fails closed (500)."""
    metered = Metered(meter=stack.meter, keystore=stack.keystore)
    app = Flask(__name__)
    app.add_url_rule("/v1/items", "items", metered("items.list")(lambda: {}))
    response = app.test_client().get("/v1/items", base_url="https://localhost")
    assert response.status_code == 500
    metered.init_app(app)
    response = app.test_client().get("/v1/items", base_url="https://localhost")
    assert response.status_code == 401
