"""Whether a Redis server may evict meterkit's keys, from its ``INFO memory``.

An evicted key breaks a promise silently: a rate counter gone admits too much, this
month's credits gone give the month's allowance again, an allowance override gone
(it has no TTL) puts an organization back on the policy's allowance, an idempotency
record gone charges a retry twice. A server evicts only once it reaches
``maxmemory``, so it is safe when ``maxmemory`` is 0 (no limit) or its
``maxmemory-policy`` is ``noeviction`` (writes fail with ``OOM`` instead, which
meterkit reports as ``BackendUnavailable``). ``allkeys-*`` may evict any key and
``volatile-*`` any key with a TTL, which is nearly every key meterkit writes: both
are refused unless the user allows eviction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from meterkit.errors import ConfigurationError

__all__ = ["eviction_error"]

SAFE_POLICY = "noeviction"


def eviction_error(infos: Iterable[Mapping[str, Any]]) -> ConfigurationError | None:
    """The error for the first server (``INFO memory``, parsed: one per primary)
    that may evict keys, or None when none may."""
    for info in infos:
        policy = str(info.get("maxmemory_policy", SAFE_POLICY))
        try:
            limit = int(info.get("maxmemory", 0))
        except (TypeError, ValueError):
            limit = 1  # unreadable: assume a limit
        if limit and policy != SAFE_POLICY:
            return ConfigurationError(
                f"redis may evict meterkit's keys (maxmemory-policy {policy}, maxmemory "
                f"{limit} bytes): an evicted counter admits too much and evicted credits "
                "are lost. Set maxmemory-policy noeviction (or maxmemory 0) on this "
                "server, or pass allow_eviction=True to accept that",
                "allow_eviction",
            )
    return None
