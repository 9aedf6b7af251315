"""What the gate answers in the app's place: the seed-shaped JSON error bodies, the
table of every refusal it can send (the OpenAPI helper documents them from it), and
:class:`Response`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final

import msgspec

if TYPE_CHECKING:
    from meterkit.core.decision import Decision

#: The longest Idempotency-Key accepted (Stripe's limit); a longer one is a 400.
MAX_IDEMPOTENCY_KEY: Final = 255
encode_json = msgspec.json.Encoder().encode
JSON: Final = ("Content-Type", "application/json")

#: A renderer of refusals: ``(status, code, message, retry_after, decision)`` to
#: ``(status, headers, body)``; see :class:`Gate`.
Renderer = Callable[
    [int, str, str, "int | None", "Decision | None"],
    tuple[int, "Iterable[tuple[str, str]] | Mapping[str, str]", "bytes | str | Mapping[str, Any]"],
]


def error_body(type_: str, code: str, message: str, status: int) -> bytes:
    """A JSON error body in the seed's shape."""
    return encode_json(
        {"error": {"type": type_, "code": code, "message": message, "status": status}}
    )


# The gate's own refusals: (status, type, code, message).
HTTPS_REQUIRED = (
    403,
    "invalid_request_error",
    "https_required",
    "All API requests must be made over HTTPS.",
)
NOT_FOUND = (404, "invalid_request_error", "not_found", "No API endpoint matches this path.")
METHOD_NOT_ALLOWED = (
    405,
    "invalid_request_error",
    "method_not_allowed",
    "This API endpoint does not accept this HTTP method.",
)
INVALID_IDEMPOTENCY_KEY = (
    400,
    "invalid_request_error",
    "invalid_idempotency_key",
    "The Idempotency-Key header must be 1 to 255 printable characters without commas, sent once.",
)
IDEMPOTENCY_KEY_REUSED = (
    422,
    "invalid_request_error",
    "idempotency_key_reused",
    "This Idempotency-Key was already used for a different request.",
)
IDEMPOTENCY_KEY_IN_USE = (
    409,
    "invalid_request_error",
    "idempotency_key_in_use",
    "A request with this Idempotency-Key is still being processed. Retry it shortly.",
)
IDEMPOTENCY_RESPONSE_TOO_LARGE = (
    409,
    "invalid_request_error",
    "idempotency_response_too_large",
    "The request with this Idempotency-Key was processed, but its response was too large "
    "to keep for a retry. Read the result through the API.",
)
INVALID_REQUEST = (
    400,
    "invalid_request_error",
    "invalid_request",
    "The request could not be processed.",
)
ORGANIZATION_REQUIRED = (
    400,
    "invalid_request_error",
    "organization_required",
    "This request does not say which organization it is for.",
)
CALLER_REQUIRED = (
    400,
    "invalid_request_error",
    "caller_required",
    "This request does not say who is calling.",
)
UNAVAILABLE = (
    503,
    "api_error",
    "service_unavailable",
    "The API is temporarily unavailable. Try again shortly.",
)

#: Every refusal of the gate's own, as ``(status, type, code, message)``: the table
#: its fixed answers are rendered from (and documentation tools, such as the OpenAPI
#: writer, read). 401s come from the key store, 402 and 429 from the meter.
REFUSALS: Final = (
    HTTPS_REQUIRED,
    NOT_FOUND,
    METHOD_NOT_ALLOWED,
    INVALID_IDEMPOTENCY_KEY,
    IDEMPOTENCY_KEY_REUSED,
    IDEMPOTENCY_KEY_IN_USE,
    IDEMPOTENCY_RESPONSE_TOO_LARGE,
    INVALID_REQUEST,
    ORGANIZATION_REQUIRED,
    CALLER_REQUIRED,
    UNAVAILABLE,
)

HTTPS_REQUIRED_BODY: Final = error_body(*HTTPS_REQUIRED[1:], 403)
NOT_FOUND_BODY: Final = error_body(*NOT_FOUND[1:], 404)
METHOD_NOT_ALLOWED_BODY: Final = error_body(*METHOD_NOT_ALLOWED[1:], 405)


class Response:
    """An answer the gate gives in the app's place: status, headers, body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"Response(status={self.status}, body={self.body!r})"

    @property
    def status_line(self) -> str:
        """``"403 Forbidden"``: the status as WSGI spells it."""
        return status_line(self.status)


_STATUS_LINES = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}


def status_line(status: int) -> str:
    """The WSGI status line of ``status`` (``"429 Too Many Requests"``)."""
    line = _STATUS_LINES.get(status)
    return line if line is not None else f"{status} Unknown"
