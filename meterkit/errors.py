"""meterkit's exceptions: one root, small families under it.

::

    MeterkitError
    ├── ConfigurationError (ValueError)     a policy, rate, price or file is wrong
    ├── InvalidRequestError (ValueError)    one call's arguments are wrong; nothing changed
    │   ├── UnknownOperationError           the operation is not in the cost table
    │   ├── UnknownPlanError                the plan is not one of the policy's plans
    │   ├── InvalidIdentifierError          an empty, over-long or control-character id
    │   ├── InvalidAmountError              NaN, infinite, negative or over-precise credits
    │   ├── IdempotencyConflictError        an idempotency key first used for another request
    │   └── UnknownKeyError                 no API key has this (well-formed) id
    ├── BackendError                        the store could not do what was asked
    │   ├── BackendUnavailable              unreachable, timed out, paused
    │   ├── StateError                      the store holds something meterkit did not write
    │   └── LedgerFullError                 the memory ledger is full: nothing drains it
    └── AuthenticationError                 a request's API key was refused (seed-shaped body)

Every error raised for bad input is raised *before* any state is touched.
Messages never contain secrets: identifiers are public ids, never API key plaintext.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = [
    "AuthenticationError",
    "BackendError",
    "BackendUnavailable",
    "ConfigurationError",
    "IdempotencyConflictError",
    "InvalidAmountError",
    "InvalidIdentifierError",
    "InvalidRequestError",
    "LedgerFullError",
    "MeterkitError",
    "StateError",
    "UnknownKeyError",
    "UnknownOperationError",
    "UnknownPlanError",
    "looks_like_secret",
    "redact",
]

# The shape of an API key's plaintext, for any key prefix: ``<prefix>_live_…`` or
# ``<prefix>_test_…`` followed by its id and secret. Anything of that shape is kept out
# of messages, reprs and Redis key names.
_SECRET_SHAPE = re.compile(r"[a-z][a-z0-9]{0,15}_(?:live|test)_[0-9A-Za-z]{8,}")


def looks_like_secret(value: object) -> bool:
    """Whether ``value`` holds something shaped like an API key's plaintext."""
    return isinstance(value, str) and _SECRET_SHAPE.search(value) is not None


def redact(value: object) -> str:
    """``repr(value)`` for an error message, with anything shaped like an API key's
    plaintext replaced (so a secret never reaches a message or a log)."""
    text = repr(value)
    return _withheld(text) if isinstance(value, str) else text


def _deprecated(old: str, new: str) -> None:
    """Warn that ``old`` is deprecated in favour of ``new`` (at the caller's caller)."""
    import warnings

    warnings.warn(f"{old} is deprecated: use {new}", DeprecationWarning, stacklevel=3)


def _withheld(text: str) -> str:
    return _SECRET_SHAPE.sub("<secret key withheld>", text)


class MeterkitError(Exception):
    """The root of every error meterkit raises on purpose.

    Its message never holds anything shaped like an API key's plaintext: whatever a
    message was made of, such a value is withheld here, once for every error.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(_withheld(a) if isinstance(a, str) else a for a in args))


class ConfigurationError(MeterkitError, ValueError):
    """A policy (or a part of one) is invalid.

    ``location`` names the place, as in ``tiers[2].rate``; it is empty when the
    mistake is not tied to one field.
    """

    def __init__(self, message: str, location: str = "") -> None:
        self.location = _withheld(location)
        self.detail = _withheld(message)
        super().__init__(f"{location}: {message}" if location else message)

    def at(self, prefix: str) -> ConfigurationError:
        """The same error, located under ``prefix`` (``tiers[2]`` + ``rate``)."""
        if not prefix:
            return self
        where = f"{prefix}.{self.location}" if self.location else prefix
        where = where.replace(".[", "[")
        return type(self)(self.detail, where)


class InvalidRequestError(MeterkitError, ValueError):
    """The arguments of one call are invalid; no state was changed."""


class UnknownOperationError(InvalidRequestError):
    """The operation is not priced in the policy's cost table."""


class UnknownPlanError(InvalidRequestError):
    """The plan is not one of the policy's plans (nor ``"default"``)."""


class InvalidIdentifierError(InvalidRequestError):
    """An id (key, organization, idempotency key) is empty, too long or not printable."""


class InvalidAmountError(InvalidRequestError):
    """A credit amount is NaN, infinite, negative or finer than one micro-credit."""


class IdempotencyConflictError(InvalidRequestError):
    """An idempotency key was first used for another request (another key, operation or
    cost): the backend refused to replay its decision, and nothing changed."""


class UnknownKeyError(InvalidRequestError):
    """No API key has this id (the id is well formed; it was never created here)."""


class BackendError(MeterkitError):
    """The backend could not apply an operation."""


class BackendUnavailable(BackendError):
    """The backend could not be reached in time (down, slow, paused, failing over)."""


class StateError(BackendError):
    """The backend holds data under meterkit's prefix that meterkit did not write."""


class LedgerFullError(BackendError):
    """The memory backend's ledger holds as many undrained events as it may: the check
    was refused and nothing was charged (an event is never dropped to make room)."""


class AuthenticationError(MeterkitError):
    """A request's API key was refused.

    ``code`` is one of ``invalid_api_key``, ``expired_api_key``,
    ``insufficient_permissions``, ``organization_not_found``; ``body`` is the
    seed-shaped JSON error body, ``status`` its HTTP status (401 by default).
    """

    MESSAGES: ClassVar[Mapping[str, str]] = {
        "invalid_api_key": "The provided API key is invalid or expired",
        "expired_api_key": "The provided API key has expired",
        "insufficient_permissions": "The API key lacks permission for the requested operation",
        "organization_not_found": "The organization does not exist or is not accessible",
    }

    def __init__(self, code: str, message: str | None = None, status: int = 401) -> None:
        self.code = code
        self.status = status
        self.message = _withheld(message if message is not None else self.MESSAGES.get(code, code))
        super().__init__(f"{code}: {self.message}")

    @property
    def body(self) -> dict[str, Any]:
        """The JSON error body, exactly in the seed's shape."""
        return {
            "error": {
                "type": "authentication_error",
                "code": self.code,
                "message": self.message,
                "status": self.status,
            }
        }
