"""meterkit: authenticate API keys, enforce multi-tier rate limits and meter credits,
in one atomic step.

    >>> import meterkit
    >>> meter = meterkit.Meter(meterkit.Policy.crane_ledger(), meterkit.MemoryBackend())
    >>> meter.check(key="key_1", org="org_1", operation="invoices.list").allowed
    True
"""

from __future__ import annotations

from meterkit._backend import AsyncBackend, Backend
from meterkit._credits import from_micro, to_micro
from meterkit._decision import Decision, KeyUsage, OperationUsage, TierState, Usage
from meterkit._errors import (
    AuthenticationError,
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    InvalidAmountError,
    InvalidIdentifierError,
    InvalidRequestError,
    MeterkitError,
    StateError,
    UnknownKeyError,
    UnknownOperationError,
)
from meterkit._keycache import AsyncCachedKeyStore, CachedKeyStore
from meterkit._keys import (
    ApiKey,
    AsyncKeyStore,
    AsyncMemoryKeyStore,
    KeyFormat,
    KeyStore,
    MemoryKeyStore,
    PlaintextKey,
    async_keystore_from_url,
    keystore_from_url,
)
from meterkit._keystore_redis import AsyncRedisKeyStore, RedisKeyStore
from meterkit._memory import MemoryBackend
from meterkit._meter import AsyncMeter, Meter
from meterkit._plan import Plan
from meterkit._policy import Category, CostTable, CreditPlan, Operation, Policy, Tier
from meterkit._redis import AsyncRedisBackend, RedisBackend
from meterkit._simulate import SimulationReport, TraceError, read_trace, simulate
from meterkit._url import async_backend_from_url, backend_from_url

__version__ = "0.1.0"

__all__ = [
    "ApiKey",
    "AsyncBackend",
    "AsyncCachedKeyStore",
    "AsyncKeyStore",
    "AsyncMemoryKeyStore",
    "AsyncMeter",
    "AsyncRedisBackend",
    "AsyncRedisKeyStore",
    "AuthenticationError",
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "CachedKeyStore",
    "Category",
    "ConfigurationError",
    "CostTable",
    "CreditPlan",
    "Decision",
    "InvalidAmountError",
    "InvalidIdentifierError",
    "InvalidRequestError",
    "KeyFormat",
    "KeyStore",
    "KeyUsage",
    "MemoryBackend",
    "MemoryKeyStore",
    "Meter",
    "MeterkitError",
    "Operation",
    "OperationUsage",
    "PlaintextKey",
    "Plan",
    "Policy",
    "RedisBackend",
    "RedisKeyStore",
    "SimulationReport",
    "StateError",
    "Tier",
    "TierState",
    "TraceError",
    "UnknownKeyError",
    "UnknownOperationError",
    "Usage",
    "async_backend_from_url",
    "async_keystore_from_url",
    "backend_from_url",
    "from_micro",
    "keystore_from_url",
    "read_trace",
    "simulate",
    "to_micro",
]
