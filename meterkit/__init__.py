"""meterkit: authenticate API keys, enforce multi-tier rate limits and meter credits,
in one atomic step.

    >>> import meterkit
    >>> meter = meterkit.Meter(meterkit.Policy.crane_ledger(), meterkit.MemoryBackend())
    >>> meter.check(key="key_1", org="org_1", operation="invoices.list").allowed
    True
"""

from __future__ import annotations

from meterkit.backends.memory.backend import MemoryBackend
from meterkit.backends.redis.backend import AsyncRedisBackend, RedisBackend
from meterkit.connect import (
    async_backend_from_url,
    async_keystore_from_url,
    backend_from_url,
    keystore_from_url,
)
from meterkit.core.backend import AsyncBackend, Backend
from meterkit.core.credits import from_micro, to_micro
from meterkit.core.decision import (
    Decision,
    KeyUsage,
    OperationUsage,
    PlanAssignment,
    TierState,
    Usage,
)
from meterkit.core.plan import Plan
from meterkit.core.policy import (
    Category,
    CostTable,
    CreditPlan,
    CustomerPlan,
    Operation,
    Policy,
    Tier,
)
from meterkit.errors import (
    AuthenticationError,
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    IdempotencyConflictError,
    InvalidAmountError,
    InvalidIdentifierError,
    InvalidRequestError,
    LedgerFullError,
    MeterkitError,
    StateError,
    UnknownKeyError,
    UnknownOperationError,
    UnknownPlanError,
)
from meterkit.keys.cache import AsyncCachedKeyStore, CachedKeyStore
from meterkit.keys.memory import AsyncMemoryKeyStore, MemoryKeyStore
from meterkit.keys.model import ApiKey, AsyncKeyStore, KeyFormat, KeyStore, PlaintextKey
from meterkit.keys.redis import AsyncRedisKeyStore, RedisKeyStore
from meterkit.meter import AsyncMeter, Meter
from meterkit.simulate import SimulationReport, TraceError, read_trace, simulate

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
    "CustomerPlan",
    "Decision",
    "IdempotencyConflictError",
    "InvalidAmountError",
    "InvalidIdentifierError",
    "InvalidRequestError",
    "KeyFormat",
    "KeyStore",
    "KeyUsage",
    "LedgerFullError",
    "MemoryBackend",
    "MemoryKeyStore",
    "Meter",
    "MeterkitError",
    "Operation",
    "OperationUsage",
    "PlaintextKey",
    "Plan",
    "PlanAssignment",
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
    "UnknownPlanError",
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
