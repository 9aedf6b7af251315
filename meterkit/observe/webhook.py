"""Credit alerts to a webhook: :class:`WebhookAlerts`, and :func:`verify` for the
receiving end.

Each alert is one JSON ``POST``, signed with HMAC-SHA256 in the
``Meterkit-Signature`` header (``t=<UNIX seconds>,v1=<hex digest of "<t>.<body>">``,
the scheme payment providers use), sent from a thread of its own (a request never
waits for it) and retried with exponential backoff while the receiver is unreachable,
times out, or answers 408, 429 or 5xx. Every attempt of one alert carries the same
``id`` (and ``Meterkit-Event-Id``), derived from the organization, mode, month and
threshold, so that a receiver can drop a repeat.

The body::

    {"type": "meterkit.credit_alert", "id": "…", "org": "org_1", "mode": "live",
     "threshold": "80%", "credits_left": "1999.99", "period_start": "2026-01-01T00:00:00Z",
     "period_end": "2026-02-01T00:00:00Z", "at": "2026-01-20T08:15:02.123456Z",
     "operation": "invoices.list", "key": "key_1"}

``key`` and ``operation`` are those of the request that reached the threshold.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from meterkit.core.plan import month_bounds
from meterkit.errors import ConfigurationError
from meterkit.observe.background import Background
from meterkit.observe.events import ALERT, Event

__all__ = ["SIGNATURE_HEADER", "WebhookAlerts", "sign", "verify"]

logger = logging.getLogger("meterkit")

SIGNATURE_HEADER = "Meterkit-Signature"
#: Statuses worth another attempt: the receiver was busy or failing, not refusing.
_RETRIED = frozenset({408, 425, 429, *range(500, 600)})
_US = 1_000_000


def sign(secret: str | bytes, body: bytes, timestamp: int) -> str:
    """The ``Meterkit-Signature`` value of ``body`` sent at ``timestamp`` (UNIX seconds)."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    digest = hmac.new(key, b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(
    secret: str | bytes,
    body: bytes,
    header: str,
    *,
    tolerance: float = 300.0,
    now: float | None = None,
) -> bool:
    """Whether ``header`` (a ``Meterkit-Signature``) signs ``body`` with ``secret``, at
    most ``tolerance`` seconds from ``now`` (default: the current time): what a
    receiver checks before it trusts an alert."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp)
    return hmac.compare_digest(expected, f"t={timestamp},v1={fields.get('v1', '')}")


def _iso(us: int) -> str:
    moment = datetime.fromtimestamp(us / _US, tz=timezone.utc)
    return moment.isoformat().replace("+00:00", "Z")


def alert_body(event: Event) -> dict[str, Any]:
    """The JSON body of the webhook for an alert ``event``."""
    decision = event.decision
    if decision is None:
        raise ValueError("a credit alert event carries its decision")
    now = decision.outcome.now
    start, end = month_bounds(now)
    identity = "\x1f".join((event.org or "", event.mode or "", str(start), event.reason or ""))
    return {
        "type": "meterkit.credit_alert",
        "id": hashlib.sha256(identity.encode("utf-8")).hexdigest()[:32],
        "org": event.org,
        "mode": event.mode,
        "threshold": event.reason,
        "credits_left": str(decision.balance),
        "period_start": _iso(start),
        "period_end": _iso(end),
        "at": _iso(now),
        "operation": event.operation,
        "key": event.key,
    }


class WebhookAlerts:
    """An observer that POSTs each credit alert to ``url``, signed with ``secret``.

    Alerts are queued (at most ``capacity``; more are dropped and counted in
    :attr:`dropped`) and sent by a thread of their own. An attempt that cannot connect,
    takes more than ``timeout`` seconds, or is answered 408, 429 or 5xx is tried again
    after ``backoff`` seconds, doubling each time up to ``max_backoff``, at most
    ``retries`` times; then the alert is logged (ERROR, on the ``meterkit`` logger) and
    given up. Any other answer but 2xx is logged and not retried. ``headers`` are sent
    with every request (an ``Authorization`` a receiver asks for, say).
    """

    def __init__(
        self,
        url: str,
        *,
        secret: str | bytes,
        retries: int = 5,
        timeout: float = 5.0,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        capacity: int = 1000,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigurationError("is an http:// or https:// URL", "url")
        if not isinstance(secret, (str, bytes)) or not secret:
            raise ConfigurationError("is the shared secret the receiver verifies", "secret")
        for name, value, low in (
            ("retries", retries, 0),
            ("timeout", timeout, 0),
            ("backoff", backoff, 0),
            ("max_backoff", max_backoff, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
                raise ConfigurationError(f"is a number of at least {low}", name)
        if timeout == 0:
            raise ConfigurationError("is a number of seconds above 0", "timeout")
        self.url = url
        self._secret = secret
        self.retries = int(retries)
        self.timeout = float(timeout)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.headers = dict(headers or {})
        self._stopping = threading.Event()
        self._queue = Background(self._send, capacity=capacity, accept=_is_alert)
        #: Alerts delivered, and given up after every attempt.
        self.sent = 0
        self.failed = 0

    def __repr__(self) -> str:
        return f"WebhookAlerts({urlsplit(self.url).netloc!r})"

    def __call__(self, event: Event) -> None:
        self._queue(event)

    @property
    def dropped(self) -> int:
        """Alerts dropped because the queue was full."""
        return self._queue.dropped

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every alert queued so far was delivered or given up."""
        return self._queue.flush(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Try what is queued once more each, without waiting between attempts (for at
        most ``timeout`` seconds), then stop the thread."""
        self._stopping.set()
        self._queue.close(timeout)

    def _send(self, event: Event) -> None:
        body = json.dumps(alert_body(event), separators=(",", ":")).encode("utf-8")
        identity = json.loads(body)["id"]
        delay = self.backoff
        for attempt in range(self.retries + 1):
            if attempt and self._stopping.wait(min(delay, self.max_backoff)):
                break  # closing: no more waiting
            delay *= 2
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "meterkit-webhook",
                "Meterkit-Event-Id": identity,
                SIGNATURE_HEADER: sign(self._secret, body, int(time.time())),
                **self.headers,
            }
            request = urllib.request.Request(self.url, body, headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    answer.read()
                self.sent += 1
                return
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code not in _RETRIED:
                    logger.error(
                        "meterkit: webhook %s refused credit alert %s (%s %s of %s): HTTP %d",
                        self,
                        identity,
                        event.reason,
                        event.mode,
                        event.org,
                        exc.code,
                    )
                    self.failed += 1
                    return
                why = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError) as exc:
                why = str(getattr(exc, "reason", exc))
            logger.warning(
                "meterkit: webhook %s: attempt %d of credit alert %s failed: %s",
                self,
                attempt + 1,
                identity,
                why,
            )
        self.failed += 1
        logger.error(
            "meterkit: webhook %s: gave up credit alert %s (%s %s of %s) after %d attempts",
            self,
            identity,
            event.reason,
            event.mode,
            event.org,
            attempt + 1,
        )


def _is_alert(event: Event) -> bool:
    return event.outcome == ALERT
