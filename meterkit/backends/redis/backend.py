"""The Redis backends: one ``EVALSHA`` per check, the same math as the memory backend.

:class:`RedisBackend` and :class:`AsyncRedisBackend` share everything but the I/O:
:class:`~meterkit.backends.redis.codec.Codec` turns a plan into a command and a reply
into an :class:`~meterkit.core.outcome.Outcome`, the scripts live in
:mod:`~meterkit.backends.redis.scripts`, and the transports
(:mod:`~meterkit.backends.redis.transport`) only move bytes. See the codec for the key
layout and docs/redis.md for the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from meterkit._twins import blocking
from meterkit.backends.redis.codec import BATCH, Clock, Codec, Sent
from meterkit.backends.redis.errors import translate, translate_all
from meterkit.backends.redis.eviction import eviction_error
from meterkit.backends.redis.scripts import Command
from meterkit.backends.redis.transport import (
    AsyncCluster,
    AsyncPool,
    Cluster,
    Pool,
    async_transport,
    sync_transport,
)
from meterkit.core.credits import top_up_too_large
from meterkit.core.idempotency import Claim
from meterkit.core.outcome import Outcome, RawUsage
from meterkit.core.plan import Plan
from meterkit.errors import BackendUnavailable, ConfigurationError, MeterkitError, _deprecated

if TYPE_CHECKING:
    from meterkit.core.policy import Deal, Policy

__all__ = ["AsyncRedisBackend", "RedisBackend", "refuse_eviction", "refuse_eviction_async"]


# -- the backends --------------------------------------------------------------------------


def _allowing(allow_eviction: object) -> bool:
    if not isinstance(allow_eviction, bool):
        raise ConfigurationError("allow_eviction is True or False", "allow_eviction")
    return allow_eviction


def _unreadable(exc: Exception) -> MeterkitError:
    """The error for an ``INFO memory`` that failed: an outage stays one."""
    error = translate(exc)
    if isinstance(error, BackendUnavailable):
        return error
    return ConfigurationError(
        f"could not read the server's maxmemory-policy ({error}); allow INFO, or pass "
        "allow_eviction=True if the server cannot evict keys",
        "allow_eviction",
    )


async def _refuse_eviction_async(io: AsyncPool | AsyncCluster) -> None:
    """Raise :class:`ConfigurationError` if the server, or any Cluster primary, may
    evict keys (see :mod:`meterkit.backends.redis.eviction`)."""
    try:
        infos = await io.info_memory()
    except Exception as exc:
        raise _unreadable(exc) from exc
    error = eviction_error(infos)
    if error is not None:
        raise error


async def refuse_eviction_async(client: Any) -> None:
    """:func:`_refuse_eviction_async` for a redis-py client (the key stores' check)."""
    await _refuse_eviction_async(async_transport(client))


_refuse_eviction = blocking(_refuse_eviction_async)
refuse_eviction = blocking(refuse_eviction_async)


class _RedisBackendBase:
    """What the blocking and the asyncio backend share: the codec, the transport, the
    eviction check still owed."""

    _io: Any
    #: The transport for a redis-py client (blocking or asyncio).
    _transport: Callable[[Any], Any]

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "mk",
        clock: Clock | None = None,
        clock_skew: float = 60.0,
        allow_eviction: bool = False,
        ledger: bool = False,
    ) -> None:
        self._io = self._transport(client)
        cluster = isinstance(self._io, (Cluster, AsyncCluster))
        self._codec = Codec(prefix, clock, clock_skew, ledger=ledger, cluster=cluster)
        self._owned = False  # backend_from_url hands its client over
        self._unverified = not _allowing(allow_eviction)
        self._opened()

    def _opened(self) -> None:
        """What the backend does once made (the blocking one checks eviction at once)."""

    def __repr__(self) -> str:
        kind = "cluster" if isinstance(self._io, (Cluster, AsyncCluster)) else "standalone"
        return f"{type(self).__name__}({kind}, prefix={self._codec.prefix!r})"

    @property
    def prefix(self) -> str:
        return self._codec.prefix

    def _abandon(self) -> None:
        """Fail the checks still waiting to be sent (asyncio's batches): at close."""


class AsyncRedisBackend(_RedisBackendBase):
    """:class:`RedisBackend` for asyncio: the same scripts, keys and options.

    ``client`` is a ``redis.asyncio.Redis``, ``redis.asyncio.RedisCluster`` or
    ``redis.asyncio.ConnectionPool`` (or use :func:`meterkit.async_backend_from_url`).
    Its methods but :meth:`apply` and :meth:`apply_many` are the one source of
    :class:`RedisBackend`'s.
    """

    _io: AsyncPool | AsyncCluster
    _transport = staticmethod(async_transport)

    def _opened(self) -> None:
        # (The eviction check waits for the first command: a constructor cannot await.)
        # Checks of this loop iteration, not yet sent, with their callers' futures:
        self._queue: list[tuple[Plan, asyncio.Future[Outcome]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def apply(self, plan: Plan) -> Outcome:
        """See :meth:`RedisBackend.apply`.

        Checks that tasks start in the same turn of the event loop go to Redis
        together, as one batch script call per :data:`BATCH` of them (see
        :meth:`apply_many`); each is still atomic on its own, and each caller gets its
        own outcome or error. A check that starts alone goes alone.

        A batch goes as soon as it is full, not at the end of the turn, and its
        callers are answered when its reply comes: under load the client makes and
        reads batches while Redis runs others (one batch of a whole turn made the
        two take turns, and cost 45% of the throughput, see docs/redis.md).
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Outcome] = loop.create_future()
        queue = self._queue
        queue.append((plan, waiter))
        if len(queue) >= BATCH:
            # A full batch goes now: Redis runs it while this turn's other callers
            # (and the replies of batches before) keep the client busy.
            self._dispatch()
        elif len(queue) == 1:
            # Once this turn's callers have queued.
            loop.call_soon(self._dispatch)
        return await waiter

    def _dispatch(self) -> None:
        # (a caller cancelled before its check was sent: the check never happens)
        batch = [item for item in self._queue if not item[1].done()]
        self._queue = []
        if batch:
            task = asyncio.ensure_future(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[Plan, asyncio.Future[Outcome]]]) -> None:
        plans = [plan for plan, _ in batch]
        try:
            if self._unverified:
                await self._verify()
            if len(plans) == 1:
                cmd, charge = self._codec.check(plans[0])
                sent: list[Sent] = [([0], [charge], False)]
                replies = [await self._io.call(cmd)]
            else:
                cmds, sent = self._codec.check_many(plans, self._io.slot)
                replies = await self._io.many(cmds)
            results = self._codec.outcomes(plans, sent, replies)
        except BaseException as exc:
            error = translate_all(exc)
            for _, waiter in batch:
                if not waiter.done():
                    waiter.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, waiter), result in zip(batch, results, strict=True):
            if waiter.done():  # its caller gave up (cancelled)
                continue
            if isinstance(result, BaseException):
                waiter.set_exception(result)
            else:
                waiter.set_result(result)

    async def peek(self, plan: Plan) -> Outcome:
        """What :meth:`apply` would answer for ``plan`` now: the same script, which
        writes nothing (one ``EVALSHA``)."""
        cmd, _ = self._codec.check(plan, dry=True)
        return self._codec.outcome(plan, await self._run(cmd), "")

    async def reset_limits(
        self, policy: Policy, org: str, mode: str = "live", key: str | None = None
    ) -> None:
        """See :meth:`MemoryBackend.reset_limits` (one ``DEL``)."""
        cmd = self._codec.reset_limits(policy, org, mode, key)
        if cmd is not None:
            await self._run(cmd)

    async def apply_many(self, plans: Sequence[Plan]) -> list[Outcome | MeterkitError]:
        """See :meth:`RedisBackend.apply_many`."""
        if not plans:
            return []
        if self._unverified:
            await self._verify()
        cmds, sent = self._codec.check_many(plans, self._io.slot)
        try:
            replies = await self._io.many(cmds)
        except Exception as exc:
            raise translate(exc) from exc
        return self._codec.outcomes(plans, sent, replies)

    async def _verify(self) -> None:
        await _refuse_eviction_async(self._io)
        self._unverified = False

    async def _run(self, cmd: Command) -> Any:
        if self._unverified:
            await self._verify()
        try:
            return await self._io.call(cmd)
        except Exception as exc:
            raise translate(exc) from exc

    async def refund(self, plan: Plan, outcome: Outcome) -> bool:
        """Return an admitted outcome's credits once; False if already refunded or gone."""
        cmd = self._codec.refund(plan, outcome)
        return cmd is not None and bool(await self._run(cmd))

    async def usage(self, policy: Policy, org: str, mode: str = "live") -> RawUsage:
        """This month's credits and requests of ``org``, per (key, operation)."""
        return self._codec.raw_usage(policy, await self._run(self._codec.usage(org, mode)))

    async def claim_response(
        self, plan: Plan, outcome: Outcome, fingerprint: str, token: str, lock_us: int
    ) -> Claim:
        """See :meth:`MemoryBackend.claim_response` (one ``EVALSHA``)."""
        cmd = self._codec.claim_response(plan, outcome, fingerprint, token, lock_us)
        return self._codec.claimed(await self._run(cmd))

    async def keep_response(
        self, plan: Plan, outcome: Outcome, fingerprint: str, token: str, payload: bytes | None
    ) -> None:
        """See :meth:`MemoryBackend.keep_response` (one ``EVALSHA``)."""
        await self._run(self._codec.keep_response(plan, outcome, fingerprint, token, payload))

    async def set_allowance(self, org: str, mode: str, micro: int | None) -> None:
        """Set ``org``'s monthly allowance (None: back to the policy's). Kept without TTL."""
        await self._run(self._codec.set_allowance(org, mode, micro))

    async def top_up(self, org: str, mode: str, micro: int) -> None:
        """Add credits to ``org``'s current month only (no rollover)."""
        if not await self._run(self._codec.top_up(org, mode, micro)):
            raise top_up_too_large()

    async def set_plan(self, org: str, mode: str, plan: str | None, key: str | None = None) -> None:
        """See :meth:`MemoryBackend.set_plan` (one ``EVALSHA``; kept without TTL)."""
        await self._run(self._codec.set_plan(org, mode, plan, key))

    async def set_limits(self, org: str, mode: str, deal: Deal) -> None:
        """See :meth:`MemoryBackend.set_limits` (one ``EVALSHA``; kept without TTL)."""
        await self._run(self._codec.set_limits(org, mode, deal))

    async def assignment(
        self, org: str, mode: str, key: str | None = None
    ) -> tuple[str | None, str | None, Deal]:
        """See :meth:`MemoryBackend.assignment` (one ``HMGET``)."""
        reply = await self._run(self._codec.assignment(org, mode, key))
        return self._codec.parse_assignment(reply, key)

    async def close(self) -> None:
        """Deprecated: :meth:`aclose`."""
        _deprecated("AsyncRedisBackend.close()", "AsyncRedisBackend.aclose()")
        await self.aclose()

    def _abandon(self) -> None:
        for _, waiter in self._queue:
            if not waiter.done():
                waiter.set_exception(BackendUnavailable("the backend was closed"))
        self._queue = []

    async def aclose(self) -> None:
        """Close the client if this backend built it (a client you passed stays open)."""
        self._abandon()
        if self._owned:
            await self._io.close()


class RedisBackend(_RedisBackendBase):
    """Limits and credits in Redis (standalone or Cluster): one ``EVALSHA`` per check.

    ``client`` is a ``redis.Redis``, ``redis.RedisCluster`` or ``redis.ConnectionPool``
    (or build one with :func:`meterkit.backend_from_url`, which sets a 1 s timeout and
    no retries). With your own client, its timeouts and retries apply: give it
    ``socket_timeout`` ≤ 1 s and ``retry=Retry(NoBackoff(), 0)`` — a check retried after
    a timeout may have run once already.

    Time is the Redis server's ``TIME`` unless ``clock`` (UNIX seconds) is given; then
    every TTL is padded by ``clock_skew`` seconds for app servers whose clocks lag.
    Keys start with ``prefix`` and carry the organization as Cluster hash tag, so one
    organization's state lives on one shard.

    A server (or any Cluster primary) that may evict keys, with a ``maxmemory`` and a
    ``maxmemory-policy`` other than ``noeviction``, is refused with
    :class:`ConfigurationError` when the backend is made, or before its first command
    if Redis was down then (see :mod:`meterkit.backends.redis.eviction`);
    ``allow_eviction=True`` accepts it.

    ``ledger=True`` appends every admitted charge, refund, top-up, allowance and plan
    change to a Redis Stream, in the same script (still one ``EVALSHA`` per check), for
    a drain to move into SQL (see :mod:`meterkit.ledger` and docs/ledger.md). Off by
    default: a stream that no drain reads only grows.
    """

    _io: Pool | Cluster
    _transport = staticmethod(sync_transport)

    def _opened(self) -> None:
        if self._unverified:
            # (Redis down: checked again before the first command that reaches it)
            with contextlib.suppress(BackendUnavailable):
                self._verify()

    def apply(self, plan: Plan) -> Outcome:
        """Check every tier and the credits of ``plan`` in one ``EVALSHA``."""
        if self._unverified:
            self._verify()
        cmd, charge = self._codec.check(plan)
        try:
            reply = self._io.call(cmd)
        except Exception as exc:
            raise translate(exc) from exc
        return self._codec.outcome(plan, reply, charge)

    def apply_many(self, plans: Sequence[Plan]) -> list[Outcome | MeterkitError]:
        """Apply each plan atomically on its own, all in one round trip (per node)."""
        if not plans:
            return []
        if self._unverified:
            self._verify()
        codec = self._codec
        cmds, sent = codec.check_many(plans, self._io.slot)
        results: list[Outcome | MeterkitError] = [None] * len(plans)  # type: ignore[list-item]

        def on_reply(i: int, reply: Any) -> None:
            # (a batch's outcomes are made while Redis runs the next batch)
            codec.decode(plans, sent[i], reply, results)

        try:
            self._io.many(cmds, on_reply)
        except Exception as exc:
            raise translate(exc) from exc
        return results

    _verify = blocking(AsyncRedisBackend._verify)
    _run = blocking(AsyncRedisBackend._run)
    peek = blocking(AsyncRedisBackend.peek)
    reset_limits = blocking(AsyncRedisBackend.reset_limits)
    refund = blocking(AsyncRedisBackend.refund)
    usage = blocking(AsyncRedisBackend.usage)
    claim_response = blocking(AsyncRedisBackend.claim_response)
    keep_response = blocking(AsyncRedisBackend.keep_response)
    set_allowance = blocking(AsyncRedisBackend.set_allowance)
    top_up = blocking(AsyncRedisBackend.top_up)
    set_plan = blocking(AsyncRedisBackend.set_plan)
    set_limits = blocking(AsyncRedisBackend.set_limits)
    assignment = blocking(AsyncRedisBackend.assignment)
    close = blocking(AsyncRedisBackend.aclose)
