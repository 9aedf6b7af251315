"""The admin API's OpenAPI 3.1 schema, built from its route table and the body structs
the handlers decode and the tests check answers against (so the three agree)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import msgspec

from meterkit.admin import _bodies as bodies
from meterkit.admin._http import MAX_BODY
from meterkit.http.openapi import MARK, SECURITY_SCHEME
from meterkit.keys.model import CODES

if TYPE_CHECKING:
    from meterkit.admin._app import Admin

__all__ = ["RESPONSES", "document"]

#: Each handler's success: status and body struct.
RESPONSES: Final[dict[str, tuple[int, type[Any]]]] = {
    "list_keys": (200, bodies.KeyListBody),
    "create_key": (201, bodies.NewKeyBody),
    "get_key": (200, bodies.ApiKeyBody),
    "update_key": (200, bodies.ApiKeyBody),
    "rotate_key": (201, bodies.RotatedKeyBody),
    "revoke_key": (200, bodies.ApiKeyBody),
    "usage": (200, bodies.UsageBody),
    "usage_history": (200, bodies.HistoryBody),
}
_REQUESTS: Final[dict[str, tuple[type[Any], bool]]] = {
    "create_key": (bodies.CreateKeyRequest, False),
    "update_key": (bodies.UpdateKeyRequest, True),
    "rotate_key": (bodies.RotateKeyRequest, False),
    "revoke_key": (bodies.RevokeKeyRequest, False),
}
_SUMMARIES: Final = {
    "list_keys": "List the organization's API keys",
    "create_key": "Create an API key (its secret is in this answer only)",
    "get_key": "Show one API key",
    "update_key": "Set an API key's expiry",
    "rotate_key": "Rotate an API key: a new key now, the old one kept for a grace period",
    "revoke_key": "Revoke an API key at once",
    "usage": "This period's usage, per key and per operation (real time)",
    "usage_history": "Usage over past days or months, per key, operation, day and month",
}
_STRING: Final = {"type": "string"}
_QUERIES: Final[dict[str, list[dict[str, Any]]]] = {
    "list_keys": [
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
            "description": "Keys per page, oldest first.",
        },
        {
            "name": "after",
            "in": "query",
            "schema": {"type": "string", "pattern": "^key_[0-9A-Za-z]{12}$"},
            "description": "The `next_after` of the previous page.",
        },
    ],
    "usage": [],
    "usage_history": [
        {
            "name": "period",
            "in": "query",
            "schema": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}(-[0-9]{2})?$"},
            "description": "A month (`2026-11`) or a day (`2026-11-05`); or give since and until.",
        },
        {
            "name": "since",
            "in": "query",
            "schema": {"type": "string", "format": "date"},
            "description": "The first day (UTC).",
        },
        {
            "name": "until",
            "in": "query",
            "schema": {"type": "string", "format": "date"},
            "description": "The first day not included; at most 366 days after since.",
        },
    ],
}
_USAGE_SCOPE: Final = [
    {
        "name": "key",
        "in": "query",
        "schema": {"type": "string", "pattern": "^key_[0-9A-Za-z]{12}$"},
        "description": "One key of the organization (default: all of them).",
    },
    {
        "name": "mode",
        "in": "query",
        "schema": {"type": "string", "enum": ["live", "test"]},
        "description": "Live or test usage (default: the calling key's mode; a test key "
        "sees test usage only).",
    },
]


def _error(description: str, codes: list[str]) -> dict[str, Any]:
    listed = ", ".join(f"`{c}`" for c in codes)
    return {
        "description": f"{description} ({listed}).",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }


def _errors(admin: Admin, handler: str, params: list[str]) -> dict[str, Any]:
    """Every error answer of one route, by status."""
    auth: dict[int, list[str]] = {}
    for code in CODES:
        auth.setdefault(admin.rules.statuses[code], []).append(code)
    found: dict[int, tuple[str, list[str]]] = {}

    def add(status: int, description: str, *codes: str) -> None:
        text, known = found.get(status, (description, []))
        found[status] = (text if status not in found else f"{text}; {description}", known)
        known.extend(c for c in codes if c not in known)

    for status, codes in sorted(auth.items()):
        add(status, "The bearer key was refused", *codes)
    add(403, "The request was plain HTTP", "https_required")
    add(400, "A query parameter or the body is not what this route takes", "invalid_request")
    if handler in _REQUESTS:
        add(413, f"The body is larger than {MAX_BODY} bytes", "request_too_large")
        add(415, "The body is not JSON", "unsupported_media_type")
    if "key_id" in params or handler in ("usage", "usage_history"):
        add(404, "No key of this organization has this id", "api_key_not_found")
    if handler in ("update_key", "rotate_key"):
        add(409, "The key is revoked or expired", "api_key_not_active")
    if handler == "usage_history":
        add(501, "This server keeps no history (its meter has no ledger)", "history_unavailable")
    add(503, "A store is unreachable; nothing changed", "service_unavailable")
    return {str(status): _error(text, codes) for status, (text, codes) in sorted(found.items())}


def document(admin: Admin) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``admin``'s API routes."""
    structs = sorted(
        {kind for _, kind in RESPONSES.values()}
        | {kind for kind, _ in _REQUESTS.values()}
        | {bodies.ErrorBody},
        key=lambda t: t.__name__,
    )
    _, components = msgspec.json.schema_components(
        structs, ref_template="#/components/schemas/{name}"
    )
    paths: dict[str, dict[str, Any]] = {}
    for route in admin.router.routes:
        if route.handler not in RESPONSES:
            continue
        params = list(route.params)
        parameters: list[dict[str, Any]] = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": (
                    {"type": "string", "pattern": "^key_[0-9A-Za-z]{12}$"}
                    if name == "key_id"
                    else {"type": "string", "pattern": admin.rules.org_rule.pattern}
                ),
            }
            for name in params
        ]
        parameters += _QUERIES.get(route.handler, [])
        if route.handler in ("usage", "usage_history"):
            parameters += _USAGE_SCOPE
        status, kind = RESPONSES[route.handler]
        operation: dict[str, Any] = {
            "operationId": route.handler,
            "summary": _SUMMARIES[route.handler],
            "tags": ["usage" if route.handler.startswith("usage") else "api_keys"],
            "security": [{SECURITY_SCHEME: []}],
            MARK: {"admin": True},
            "parameters": parameters,
            "responses": {
                str(status): {
                    "description": (kind.__doc__ or "").split("\n\n")[0].strip(),
                    "content": {
                        "application/json": {
                            "schema": {"$ref": f"#/components/schemas/{kind.__name__}"}
                        }
                    },
                },
                **_errors(admin, route.handler, params),
            },
        }
        if route.handler in _REQUESTS:
            request_kind, required = _REQUESTS[route.handler]
            operation["requestBody"] = {
                "required": required,
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{request_kind.__name__}"}
                    }
                },
            }
        paths.setdefault(route.template, {})[route.method.lower()] = operation
    permission = admin.admin_permission
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "API keys and usage (meterkit)",
            "version": "1",
            "description": (
                "Create, list, rotate, revoke and expire an organization's API keys, and "
                "read its usage. Key routes need a key holding "
                f"`{permission}`; usage routes `{admin.usage_permission}` or `{permission}`. "
                'Errors have the shape `{"error": {"type", "code", "message", '
                '"status"}}`.'
            ),
        },
        "paths": paths,
        "components": {
            "schemas": components,
            # The scheme meterkit.http.openapi names for metered routes: one scheme for
            # both when an app's schema holds its API and this one.
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": (
                        f"An API key of the organization: `Bearer {admin.rules.format.prefix}"
                        "_live_…`."
                    ),
                }
            },
        },
    }
