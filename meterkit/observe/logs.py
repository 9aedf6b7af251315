"""Structured log lines: one per refusal and per backend failure, through :mod:`logging`.

:class:`LogObserver` writes each event it is set to log as one ``logfmt`` line,
``meterkit denied operation=invoices.list org=org_1 key=key_1 mode=live
reason=rate_limited tier=key-burst status=429 latency_ms=0.012``, and puts the same
fields on the record as ``record.meterkit`` (a dict), for a JSON formatter.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from meterkit.errors import ConfigurationError, _withheld
from meterkit.observe.events import (
    ALERT,
    ALLOWED,
    DENIED,
    ERROR,
    OUTCOMES,
    REFUNDED,
    REFUSED,
    Event,
)

__all__ = ["DEGRADED", "LEVELS", "LogObserver"]

#: The key of :data:`LEVELS` for admissions made without the backend (fail-open).
DEGRADED = "degraded"

#: The default level of each kind of event; None: not logged. Refusals (``denied``,
#: ``refused``) are routine for an API, so INFO; a backend that fails is a WARNING, as
#: is each admission it forced to make unchecked, and a credit alert.
LEVELS: Mapping[str, int | None] = {
    ALLOWED: None,
    DENIED: logging.INFO,
    REFUSED: logging.INFO,
    ERROR: logging.WARNING,
    DEGRADED: logging.WARNING,
    REFUNDED: None,
    ALERT: logging.WARNING,
}

# The fields of a line, in order, after the outcome.
_FIELDS = ("operation", "org", "key", "mode", "reason", "tier", "status")


def _quoted(value: str) -> str:
    """A logfmt value: bare when it can be, else in double quotes."""
    if value and not any(c in value for c in ' "=\\') and value.isprintable():
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in escaped) + '"'


class LogObserver:
    """Log each refusal and backend failure (and whatever else ``levels`` says) as one
    line on ``logger`` (a :class:`logging.Logger` or its name; default ``"meterkit"``).

    ``levels`` maps outcomes (see :data:`~meterkit.observe.events.OUTCOMES`) and
    ``"degraded"`` to a logging level, or None to leave them out; it updates
    :data:`LEVELS`: ``LogObserver(levels={"allowed": logging.DEBUG})`` logs every
    admission too. Anything shaped like a key's plaintext is withheld from the line,
    whatever reached it.
    """

    def __init__(
        self,
        logger: logging.Logger | str = "meterkit",
        *,
        levels: Mapping[str, int | None] | None = None,
    ) -> None:
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        chosen = dict(LEVELS)
        for name, level in (levels or {}).items():
            if name not in chosen:
                raise ConfigurationError(
                    f"is one of {', '.join(repr(o) for o in (*OUTCOMES, DEGRADED))}",
                    f"levels[{name!r}]",
                )
            if level is not None and (type(level) is not int or level < 0):
                raise ConfigurationError("is a logging level (an int) or None", f"levels[{name!r}]")
            chosen[name] = level
        self.levels = chosen
        self._degraded = chosen[DEGRADED]

    def __repr__(self) -> str:
        return f"LogObserver({self.logger.name!r})"

    def __call__(self, event: Event) -> None:
        level = self._degraded if event.degraded else self.levels[event.outcome]
        if level is None or not self.logger.isEnabledFor(level):
            return
        self.logger.log(level, "%s", _Line(event), extra={"meterkit": event.to_dict()})


class _Line:
    """An event's log line, written only if a handler formats it."""

    __slots__ = ("event",)

    def __init__(self, event: Event) -> None:
        self.event = event

    def __str__(self) -> str:
        event = self.event
        parts = ["meterkit", "degraded" if event.degraded else event.outcome]
        for name in _FIELDS:
            value: Any = getattr(event, name)
            if value is not None:
                parts.append(f"{name}={_quoted(str(value))}")
        if event.latency is not None:
            parts.append(f"latency_ms={event.latency * 1000:.3f}")
        if event.shadow:
            parts.append(f"shadow={_quoted(','.join(event.shadow))}")
        if event.replayed:
            parts.append("replayed=true")
        return _withheld(" ".join(parts))
