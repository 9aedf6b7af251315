"""The admin API's JSON bodies, as msgspec structs: what requests may hold (decoded
and checked in one step, unknown fields refused) and what responses hold. The
OpenAPI schema is generated from these same structs, so the two cannot drift."""

from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from meterkit.keys.model import ApiKey

__all__ = [
    "ApiKeyBody",
    "CreateKeyRequest",
    "ErrorBody",
    "HistoryBody",
    "KeyListBody",
    "NewKeyBody",
    "RotateKeyRequest",
    "RotatedKeyBody",
    "UpdateKeyRequest",
    "UsageBody",
    "key_body",
]

MAX_GRACE: Final = 30 * 86_400
DEFAULT_GRACE: Final = 86_400
MAX_PERMISSIONS: Final = 64

Mode = Literal["live", "test"]
Status = Literal["active", "expired", "revoked"]
Credits = Annotated[
    str, Meta(pattern=r"^-?[0-9]+(\.[0-9]+)?$", description="Credits, as a decimal string.")
]
Moment = Annotated[datetime, Meta(tz=True, description="ISO 8601 with a UTC offset.")]
Name = Annotated[str, Meta(min_length=1, max_length=200)]
Permission = Annotated[
    str,
    Meta(
        max_length=129,
        pattern=r"^(\*|[a-z][a-z0-9_.-]{0,63}:(\*|[a-z][a-z0-9_.-]{0,63}))$",
        examples=["invoices:read", "invoices:*", "*"],
    ),
]


class ErrorDetail(msgspec.Struct, kw_only=True):
    type: str
    code: str
    message: str
    status: int


class ErrorBody(msgspec.Struct):
    """Every error, in the seed's shape."""

    error: ErrorDetail


class ApiKeyBody(msgspec.Struct, kw_only=True):
    """An API key as the API shows it: public facts, never its secret or its hash."""

    id: Annotated[str, Meta(pattern=r"^key_[0-9A-Za-z]{12}$")]
    organization_id: str
    name: str | None
    mode: Mode
    permissions: list[str]
    status: Status
    last_four: Annotated[str, Meta(description="The plaintext's last four characters.")]
    created_at: Moment
    expires_at: Moment | None
    revoked_at: Moment | None
    last_used_at: Moment | None


class NewKeyBody(ApiKeyBody, kw_only=True):
    """A key just made, with its plaintext: shown in this answer and never again."""

    secret: Annotated[str, Meta(description="The key's plaintext (cl_live_… / cl_test_…).")]


class RotatedKeyBody(NewKeyBody, kw_only=True):
    """The replacement key (with its plaintext, once) and the key it replaces, which
    keeps working until its ``expires_at`` (the end of the grace period)."""

    previous: ApiKeyBody


class KeyListBody(msgspec.Struct, kw_only=True):
    """One page of an organization's keys, oldest first."""

    data: list[ApiKeyBody]
    has_more: bool
    next_after: Annotated[
        str | None, Meta(description="Give as `after` for the next page; null on the last.")
    ]


class CreateKeyRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A new key. ``mode`` defaults to the calling key's; a key may only grant
    permissions it holds itself."""

    name: Name | None = None
    mode: Mode | None = None
    permissions: Annotated[list[Permission], Meta(max_length=MAX_PERMISSIONS)] = []
    expires_at: Moment | None = None


class RotateKeyRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How long the replaced key keeps working, in seconds (at most 30 days)."""

    grace_period: Annotated[int, Meta(ge=0, le=MAX_GRACE)] = DEFAULT_GRACE


class RevokeKeyRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Nothing to give: revoking takes no options (an empty body does too)."""


class UpdateKeyRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The key's new expiry; null for never."""

    expires_at: Moment | None


class Tally(msgspec.Struct, kw_only=True):
    requests: int
    credits: Credits


class UsageBody(msgspec.Struct, kw_only=True):
    """This period's usage, from the meter's counters, in real time. ``requests`` and
    ``credits_used`` are the organization's (or the one key's, with ``key``);
    ``allowance`` and ``credits_left`` are always the organization's."""

    org: str
    key: str | None
    mode: Mode
    plan: str
    period_start: Moment
    period_end: Moment
    allowance: Credits
    credits_used: Credits
    credits_left: Credits
    requests: int
    operations: dict[str, Tally]
    keys: dict[str, Tally]


class DayTally(msgspec.Struct, kw_only=True):
    day: date
    requests: int
    credits: Credits


class MonthTally(msgspec.Struct, kw_only=True):
    month: Annotated[str, Meta(pattern=r"^[0-9]{4}-[0-9]{2}$")]
    requests: int
    credits: Credits


class HistoryBody(msgspec.Struct, kw_only=True):
    """Usage over [since, until) from the ledger: per operation, key, day and month.
    ``credits`` is what was charged less what was refunded; a period that has not
    ended covers what the ledger's drain has moved so far."""

    org: str
    key: str | None
    mode: Mode
    since: date
    until: Annotated[date, Meta(description="The first day not included.")]
    requests: int
    credits: Credits
    charged: Credits
    refunded: Credits
    refunds: int
    topped_up: Credits
    operations: dict[str, Tally]
    keys: dict[str, Tally]
    days: list[DayTally]
    months: list[MonthTally]


def _moment(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, tz=timezone.utc)


def key_body(record: ApiKey, now: float) -> dict[str, Any]:
    """The JSON of ``record`` (:class:`ApiKeyBody`'s fields) at ``now``."""
    return {
        "id": record.id,
        "organization_id": record.org,
        "name": record.name,
        "mode": record.mode,
        "permissions": list(record.permissions),
        "status": record.status(now),
        "last_four": record.last_four,
        "created_at": _moment(record.created_at),
        "expires_at": _moment(record.expires_at),
        "revoked_at": _moment(record.revoked_at),
        "last_used_at": _moment(record.last_used_at),
    }
