"""meterkit.django end to end: an API of our own through django.test.Client, and under
waitress over HTTP."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import django
import httpx
import pytest
from django.conf import settings

from meterkit.errors import ConfigurationError
from tests.http._django_items import RUNS
from tests.http._items import OTHER, PROJECT, SERVED, UNSERVED, Stack, problem
from tests.http._serve import serve_wsgi

if not settings.configured:
    settings.configure(
        DEBUG=False,
        ALLOWED_HOSTS=["*"],
        SECRET_KEY="meterkit-tests-" + "k" * 40,
        ROOT_URLCONF="tests.http._django_items",
        MIDDLEWARE=[],
        INSTALLED_APPS=[],
        USE_TZ=True,
    )
    django.setup()

from django.core.handlers.wsgi import WSGIHandler
from django.test import Client, override_settings

MIDDLEWARE = ["meterkit.django.MeterMiddleware"]


def configured(stack: Stack, **options: Any) -> Any:
    """The settings of the items API metered by ``stack``."""
    meterkit_settings = {
        "meter": stack.meter,
        "keystore": stack.keystore,
        "render": problem,
        "trusted_proxies": ["127.0.0.1"],
        **options,
    }
    return override_settings(
        ROOT_URLCONF="tests.http._django_items", MIDDLEWARE=MIDDLEWARE, METERKIT=meterkit_settings
    )


@pytest.fixture
def stack() -> Iterator[Stack]:
    stack = Stack()
    with configured(stack):
        yield stack


@pytest.fixture
def client() -> Client:
    return Client()


def get(client: Client, path: str, key: str | None = None, **extra: Any) -> Any:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return client.get(path, secure=True, headers=headers, **extra)


def test_a_view_meters_its_own_operation_for_the_project_in_its_path(
    client: Client, stack: Stack
) -> None:
    """Through django.test.Client, the decorated view is metered for the project in its
    URL, reads request.meterkit, and its response carries the headers."""
    response = get(client, f"/v1/projects/{PROJECT}/items", stack.reader)
    assert response.status_code == 200
    assert response.json() == {"project": PROJECT, "org": PROJECT, "charged": "0.01"}
    assert response["X-Credits-Charged"] == "0.01"
    assert response["RateLimit"] == '"key-minute";r=4;t=3'


def test_no_key_and_another_projects_key_are_refused(client: Client, stack: Stack) -> None:
    """The test client goes through the middleware: no key is 401 (the renderer's body),
    as is a key of another project; nothing is charged."""
    anonymous = get(client, f"/v1/projects/{PROJECT}/items")
    assert anonymous.status_code == 401
    assert anonymous["Content-Type"] == "application/problem+json"
    assert anonymous.json()["type"] == "https://errors.acme.test/invalid_api_key"
    stranger = get(client, f"/v1/projects/{PROJECT}/items", stack.stranger)
    assert stranger.json()["type"] == "https://errors.acme.test/organization_not_found"
    plain = client.get("/v1/items", headers={"authorization": f"Bearer {stack.reader}"})
    assert plain.status_code == 403
    assert stack.used(PROJECT) == stack.used(OTHER) == 0


def test_the_org_comes_from_the_key(client: Client, stack: Stack) -> None:
    """/v1/items names no organization: each key is metered in its own."""
    assert get(client, "/v1/items", stack.reader).json()["org"] == PROJECT
    assert get(client, "/v1/items", stack.stranger).json()["org"] == OTHER


def test_a_size_priced_view(client: Client, stack: Stack) -> None:
    """The export is priced by its body: 0.01 plus 0.01 per started kilobyte."""
    response = client.post(
        "/v1/items/export",
        data=b"x" * 10_001,
        content_type="application/octet-stream",
        secure=True,
        headers={"authorization": f"Bearer {stack.reader}"},
    )
    assert response.json() == {"bytes": 10_001, "charged": "0.12"}


def test_an_anonymous_view_is_limited_per_client_address(client: Client, stack: Stack) -> None:
    """/v1/login needs no key: 3 a minute per client address (X-Forwarded-For from the
    trusted proxy), then 429."""
    forwarded = {"HTTP_X_FORWARDED_FOR": "203.0.113.7"}
    codes = [client.post("/v1/login", secure=True, **forwarded).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    elsewhere = client.post("/v1/login", secure=True, HTTP_X_FORWARDED_FOR="198.51.100.2")
    assert elsewhere.json() == {"caller": "ip:198.51.100.2"}


def test_django_refusals_and_failures_are_not_charged(client: Client, stack: Stack) -> None:
    """Http404 from a view and a view that raises (Django's 500) are refunded; Django's
    own 404 for an unknown path reaches no metered view."""
    gone = get(client, "/v1/items/it_404", stack.writer)
    assert (gone.status_code, gone["X-Credits-Charged"]) == (404, "0")
    client.raise_request_exception = False
    failed = get(client, "/v1/report", stack.writer)
    assert (failed.status_code, failed["X-Credits-Charged"]) == (500, "0")
    assert get(client, "/v1/nowhere", stack.writer).status_code == 404
    assert stack.used() == 0
    assert stack.view.usage(PROJECT).requests == 2


def test_a_retried_post_gets_the_first_response(client: Client, stack: Stack) -> None:
    """The same POST with the same Idempotency-Key: the first response again, marked as
    a replay, without its cookie; the view ran once; another body gets 422."""
    RUNS.clear()
    headers = {"authorization": f"Bearer {stack.writer}", "idempotency-key": "dj-1"}

    def post(name: str) -> Any:
        body = json.dumps({"name": name})
        return client.post(
            "/v1/items/new", body, content_type="application/json", secure=True, headers=headers
        )

    first, again = post("anvil"), post("anvil")
    assert (first.status_code, first.json()) == (201, {"id": "it_1", "name": "anvil"})
    assert "session" in first.cookies
    assert (again.status_code, again.content) == (201, first.content)
    assert again["Idempotent-Replayed"] == "true"
    assert "session" not in again.cookies
    assert again["X-Credits-Charged"] == first["X-Credits-Charged"] == "0.05"
    assert post("hammer").status_code == 422
    assert RUNS["create"] == 1
    assert stack.view.usage(PROJECT).requests == 1


def test_a_streamed_response_is_kept_under_a_real_server(stack: Stack) -> None:
    """A StreamingHttpResponse under waitress reaches the client whole and is replayed
    whole; the view ran once."""
    RUNS.clear()
    headers = {
        "X-Forwarded-Proto": "https",
        "Authorization": f"Bearer {stack.writer}",
        "Idempotency-Key": "dj-stream",
    }
    with serve_wsgi(WSGIHandler()) as url, httpx.Client(base_url=url, timeout=10) as http:
        first = http.post("/v1/items/stream", headers=headers)
        again = http.post("/v1/items/stream", headers=headers)
    assert first.content == (b"1:" + b"x" * 1000) * 5
    assert (again.status_code, again.content) == (200, first.content)
    assert again.headers["idempotent-replayed"] == "true"
    assert RUNS["stream"] == 1


def test_a_route_table_meters_by_path_before_django_resolves() -> None:
    """With a route table, every request is matched by path: an unknown path under the
    API is 401 to an anonymous caller, whatever Django would say."""
    stack = Stack()
    with configured(stack, routes=SERVED):
        table = Client()
        assert get(table, "/v1/items", stack.reader).status_code == 200
        assert get(table, "/v1/unknown").status_code == 401
        assert get(table, "/health").status_code == 404


def test_route_drift_stops_django_from_starting() -> None:
    """A route table that meters a path the URLconf does not serve is refused when Django
    loads its middlewares (a server's start), as is a missing METERKIT setting. (A
    URLconf routes paths, not methods: any method of a served path reaches its view.)"""
    stack = Stack()
    orders = {**UNSERVED, "GET /v1/orders/{order_id}": "items.get"}
    with (
        configured(stack, routes=orders),
        pytest.raises(ConfigurationError, match=re.escape("GET /v1/orders/{order_id}")),
    ):
        WSGIHandler()
    with configured(stack, routes=UNSERVED):
        WSGIHandler()
    with (
        override_settings(MIDDLEWARE=MIDDLEWARE, METERKIT={"keystore": stack.keystore}),
        pytest.raises(ConfigurationError, match="METERKIT"),
    ):
        WSGIHandler()


def test_a_decorated_view_without_the_middleware_fails_closed(stack: Stack) -> None:
    """A metered view reached without MeterMiddleware raises instead of serving free."""
    with override_settings(MIDDLEWARE=[]), pytest.raises(ConfigurationError, match="MIDDLEWARE"):
        get(Client(), "/v1/items", stack.reader)


def test_under_a_real_server(stack: Stack) -> None:
    """The same API under waitress, over HTTP: metered, refused, refunded."""
    headers = {"X-Forwarded-Proto": "https", "Authorization": f"Bearer {stack.reader}"}
    with serve_wsgi(WSGIHandler()) as url, httpx.Client(base_url=url, timeout=10) as http:
        ok = http.get(f"/v1/projects/{PROJECT}/items", headers=headers)
        assert (ok.status_code, ok.headers["x-credits-charged"]) == (200, "0.01")
        gone = http.get("/v1/items/it_1", headers=headers)
        assert (gone.status_code, gone.headers["x-credits-charged"]) == (404, "0")
        refused = http.get("/v1/items", headers={"X-Forwarded-Proto": "https"})
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/problem+json"
    assert str(stack.used()) == ok.json()["charged"] == "0.01"
