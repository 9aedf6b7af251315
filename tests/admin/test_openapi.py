"""The admin API's OpenAPI schema: valid OpenAPI 3.1, every route with its parameters,
bodies and every answer it can give, following the key store's statuses."""

from __future__ import annotations

from typing import Any

from openapi_spec_validator import validate

import meterkit
from meterkit.admin import Admin
from meterkit.admin._app import API_ROUTES
from meterkit.http.openapi import SECURITY_SCHEME
from tests.admin.conftest import Stack


def make(**store_options: Any) -> Admin:
    policy = meterkit.Policy.crane_ledger()
    return Admin(
        meterkit.AsyncMeter(policy, meterkit.MemoryBackend()),
        meterkit.AsyncMemoryKeyStore(**store_options),
    )


def refs(value: Any) -> list[str]:
    if isinstance(value, dict):
        found = [value["$ref"]] if "$ref" in value else []
        return found + [r for v in value.values() for r in refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in refs(v)]
    return []


def test_the_schema_is_valid_openapi_3_1_and_every_reference_resolves() -> None:
    """openapi-spec-validator accepts the document, and every $ref names a component."""
    document = make().openapi()
    validate(document)
    names = set(document["components"]["schemas"])
    assert {r.rsplit("/", 1)[1] for r in refs(document)} <= names


def test_every_api_route_is_documented_with_its_answers() -> None:
    """Each route has its operation, bearer security, path parameters, request body
    where it takes one, its success and every refusal in the seed's error shape."""
    document = make().openapi()
    documented = {
        (path, method.upper()) for path, item in document["paths"].items() for method in item
    }
    assert documented == {(r.template, r.method) for r in API_ROUTES}
    for route in API_ROUTES:
        operation = document["paths"][route.template][route.method.lower()]
        assert operation["security"] == [{SECURITY_SCHEME: []}]
        path_params = {p["name"] for p in operation["parameters"] if p["in"] == "path"}
        assert path_params == set(route.params)
        statuses = set(operation["responses"])
        assert {"400", "401", "403", "503"} <= statuses, route.template
        assert any(s.startswith("2") for s in statuses)
        if route.method in ("POST", "PATCH"):
            assert "requestBody" in operation
            assert {"413", "415"} <= statuses
        for status, answer in operation["responses"].items():
            schema = answer["content"]["application/json"]["schema"]["$ref"]
            if status.startswith(("4", "5")):
                assert schema.endswith("/ErrorBody")
    create = document["paths"]["/organizations/{organization_id}/api_keys"]["post"]
    assert create["responses"]["201"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/NewKeyBody"
    )
    key_schema = document["components"]["schemas"]["ApiKeyBody"]
    assert "secret" not in key_schema["properties"]
    assert "secret" in document["components"]["schemas"]["NewKeyBody"]["properties"]


def test_authentication_statuses_follow_the_key_store() -> None:
    """A store that answers insufficient_permissions with 403 is documented so."""
    document = make(status_codes={"insufficient_permissions": 403}).openapi()
    answers = document["paths"]["/organizations/{organization_id}/usage"]["get"]["responses"]
    assert "insufficient_permissions" in answers["403"]["description"]
    assert "insufficient_permissions" not in answers["401"]["description"]


def test_the_served_schema_is_the_documented_one(stack: Stack) -> None:
    """GET /openapi.json serves the same document, to anyone (it holds no secret)."""
    with stack.client() as client:
        served = client.get("/openapi.json")
    assert served.status_code == 200
    assert served.json() == stack.admin.openapi()
