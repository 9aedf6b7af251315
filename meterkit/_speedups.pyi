# Types of the compiled module meterkit/_speedups.c (optional: see meterkit/_native.py).
from collections.abc import Callable
from typing import Any

from meterkit._plan import Outcome, Plan

def setup(plan: type, account: type, pair: type, array: type, test_ns: str, /) -> None: ...
def new_charge_id() -> str: ...
def reseed(prefix: str, /) -> None: ...
def headers(op: object, outcome: Outcome, allowed: bool, /) -> dict[str, str] | None: ...

class Lane:
    """One operation's check on a MemoryBackend, compiled."""

    def __new__(
        cls,
        backend: object,
        policy: object,
        lock: Any,
        clock: Callable[[], float],
        fallback: Callable[[Plan], Outcome],
        op: str,
        allowance: int,
        credits: bool,
        tiers: tuple[tuple[int, int, int, int, int, int, int, int, object], ...],
        /,
    ) -> Lane: ...
    def __call__(self, plan: Plan, /) -> Outcome: ...
    @property
    def hits(self) -> int: ...
    @property
    def fallback(self) -> Callable[[Plan], Outcome]: ...

class Checker:
    """Meter.check on a MemoryBackend, compiled; anything unusual goes to ``slow``."""

    def __new__(
        cls,
        slow: Callable[..., Any],
        policy: object,
        routes: dict[str, tuple[object, int, Callable[[Plan], Outcome]]],
        decision: type,
        reasons: tuple[str | None, ...],
        watch: Callable[[Any], None] | None,
        /,
    ) -> Checker: ...
    def __call__(self, key: Any, **kwargs: Any) -> Any: ...
    @property
    def __wrapped__(self) -> Callable[..., Any]: ...

class Lock:
    """A non-reentrant lock, like threading.Lock, that compiled lanes take directly."""

    def acquire(self) -> bool: ...
    def release(self) -> None: ...
    def locked(self) -> bool: ...
    def __enter__(self) -> bool: ...
    def __exit__(self, *exc: object) -> None: ...

def sweep(states: dict[str, Any], cutoff: int, logs: bool, /) -> int | None: ...
