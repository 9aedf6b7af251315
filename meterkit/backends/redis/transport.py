"""Transports: the only code that differs between sync and async. Each moves commands
to Redis and replies back, and nothing else: :class:`Pool` and :class:`AsyncPool` for
a standalone server (their own connection handling and pipelining, see their
docstrings and docs/redis.md for the figures that keep them), :class:`Cluster` and
:class:`AsyncCluster` for Redis Cluster (redis-py's cluster client, batches grouped
by node).
"""

from __future__ import annotations

import asyncio
import math
import os
import select
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from meterkit.backends.redis.scripts import RAW, Command, as_eval, pack
from meterkit.errors import BackendUnavailable, ConfigurationError

__all__ = [
    "AsyncCluster",
    "AsyncPool",
    "Cluster",
    "OnReply",
    "Pool",
    "async_transport",
    "sync_transport",
]

#: Called with each command's index and final reply as the reply is read.
OnReply = Callable[[int, Any], None]
_CHUNK = 16
_CHUNK_BYTES = 8192  # (a batch script call is one command of many requests)


# -- transports: the only code that differs between sync and async ---------------------


def _slot(base: str) -> int:
    """The Cluster hash slot of an organization's keys (all share its hash tag)."""
    from redis.crc import key_slot

    return int(key_slot(base.encode("utf-8")))


def _node_key(cmd: Command) -> Any:
    """The key that routes a command on Cluster: the first key of a script call."""
    return cmd[3] if cmd[0] in ("EVALSHA", "EVAL") else cmd[1]


class _Connections:
    """The connections meterkit made from one redis-py pool: idle ones, and all of them."""

    __slots__ = ("__weakref__", "all", "idle", "pid")

    def __init__(self) -> None:
        self.idle: list[Any] = []
        self.all: list[Any] = []
        self.pid = os.getpid()


# Per pool, shared by every backend on it, gone with the pool.
_CONNECTIONS: weakref.WeakKeyDictionary[Any, _Connections] = weakref.WeakKeyDictionary()


class Pool:
    """A standalone server through a redis-py connection pool's connections.

    Connections come from the pool's factory (its address, credentials, TLS and
    timeouts), but are taken and given back here, with a ``list.pop`` and an
    ``append``: ``ConnectionPool.get_connection`` polls the socket and keeps books on
    every call, which costs more than a tenth of a check. Backends on the same pool
    share these connections; there are as many as checks ever ran at once. A
    connection that failed is disconnected and reconnects on its next use.
    """

    slot = None  # one server: any keys go together

    def __init__(self, pool: Any) -> None:
        from redis.exceptions import NoScriptError, ResponseError

        self.pool = pool
        shared = _CONNECTIONS.get(pool)
        if shared is None:
            shared = _CONNECTIONS[pool] = _Connections()
        self._shared = shared
        self._noscript = NoScriptError
        self._response_error = ResponseError

    def _acquire(self) -> Any:
        shared = self._shared
        if shared.pid != os.getpid():  # a forked child: the parent's sockets are not ours
            shared.idle, shared.all, shared.pid = [], [], os.getpid()
        try:
            conn = shared.idle.pop()
        except IndexError:
            conn = self.pool.make_connection()
            shared.all.append(conn)
            return conn
        sock = getattr(conn, "_sock", None)
        if sock is not None:
            # An idle connection has nothing to read, unless the server closed it (it
            # went away, perhaps came back): then connect afresh instead of failing.
            try:
                stale = bool(select.select((sock,), (), (), 0)[0])
            except (OSError, ValueError):
                stale = True
            if stale:
                conn.disconnect()
        return conn

    def call(self, cmd: Command) -> Any:
        conn = self._acquire()
        try:
            conn.send_packed_command((pack(cmd),))
            try:
                return conn.read_response(disable_decoding=True)
            except self._noscript:
                conn.send_packed_command((pack(as_eval(cmd)),))
                return conn.read_response(disable_decoding=True)
        except self._response_error:
            raise
        except BaseException:
            conn.disconnect()
            raise
        finally:
            self._shared.idle.append(conn)

    def many(self, cmds: Iterable[Command], on_reply: OnReply | None = None) -> list[Any]:
        """Every command's reply, in order; ``on_reply(i, reply)`` is called as each
        final reply is read (while Redis still runs the commands after it)."""
        sent: list[Command] = []
        replies = self._pipeline(cmds, sent, on_reply)
        missing = [i for i, r in enumerate(replies) if isinstance(r, self._noscript)]
        if missing:
            # (each with its script's text: a SCRIPT LOAD first could lose the race with
            # another SCRIPT FLUSH before the EVALSHA that follows it)
            again = self._pipeline([as_eval(sent[i]) for i in missing], [], None)
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
                if on_reply is not None:
                    on_reply(i, reply)
        return replies

    def _pipeline(
        self, cmds: Iterable[Command], sent: list[Command], on_reply: OnReply | None
    ) -> list[Any]:
        """Send ``cmds`` a chunk at a time; while Redis runs one chunk, make and send
        the next and read (and hand to ``on_reply``) the replies of the one before: a
        batch then costs about what Redis spends on it."""
        conn = self._acquire()
        replies: list[Any] = []
        noscript = self._noscript

        def read_until(count: int) -> None:
            while len(replies) < count:
                try:
                    reply = conn.read_response(disable_decoding=True)
                except self._response_error as exc:
                    reply = exc
                replies.append(reply)
                if on_reply is not None and not isinstance(reply, noscript):
                    on_reply(len(replies) - 1, reply)

        try:
            chunk: list[bytes] = []
            size = 0
            for cmd in cmds:
                sent.append(cmd)
                packed = pack(cmd)
                chunk.append(packed)
                size += len(packed)
                if len(chunk) == _CHUNK or size >= _CHUNK_BYTES:
                    conn.send_packed_command((b"".join(chunk),))
                    read_until(len(sent) - len(chunk))
                    chunk, size = [], 0
            if chunk:
                conn.send_packed_command((b"".join(chunk),))
            read_until(len(sent))
            return replies
        except BaseException:
            conn.disconnect()
            raise
        finally:
            self._shared.idle.append(conn)

    def info_memory(self) -> list[Any]:
        """The server's ``INFO memory``, parsed (a list of one)."""
        import redis

        return [redis.Redis(connection_pool=self.pool).info("memory")]

    def close(self) -> None:
        shared = self._shared
        for conn in shared.all:
            conn.disconnect()
        shared.idle, shared.all = [], []
        self.pool.disconnect()


class Cluster:
    """A Redis Cluster through redis-py's cluster client; batches grouped by node.

    A batch writes every node's commands before it reads any reply: one round trip
    for the batch. What each command met is its own reply:

    - a node that could not be reached (connection refused, no node for the slot):
      nothing was written there, so the slot map is refreshed and those commands are
      sent once more; a second failure is their reply;
    - a connection that broke after its commands were written: their replies are
      that error (they may have run), the connection is closed, and they are not
      sent again;
    - a connection whose replies were not all read is closed, never reused: its
      next user would read them as its own.
    """

    def __init__(self, client: Any) -> None:
        from redis import exceptions as rx

        self.client = client
        self.slot = _slot
        self._noscript = rx.NoScriptError
        self._response_error = rx.ResponseError
        # Answers that mean "not run here, ask again": safe to send once more.
        self._resend = (rx.NoScriptError, rx.AskError, rx.TryAgainError)
        self._lost = (rx.ConnectionError, rx.TimeoutError, OSError)
        self._unrouted = rx.RedisClusterException

    def call(self, cmd: Command) -> Any:
        try:
            return self.client.execute_command(*cmd, **RAW)
        except self._noscript:
            return self.client.execute_command(*as_eval(cmd), **RAW)

    def many(self, commands: Iterable[Command], on_reply: OnReply | None = None) -> list[Any]:
        """Every command's reply (or the exception it met), in order (``on_reply`` as
        :meth:`Pool.many`'s, called once all are in)."""
        cmds = list(commands)
        replies: list[Any] = [None] * len(cmds)
        unsent, failed = self._round(cmds, range(len(cmds)), replies)
        if failed:
            self._refresh()
            if unsent:
                self._round(cmds, unsent, replies)
        for i, reply in enumerate(replies):
            if isinstance(reply, self._resend):
                try:
                    replies[i] = self.call(cmds[i])
                except Exception as exc:
                    replies[i] = exc
            if on_reply is not None:
                on_reply(i, replies[i])
        return replies

    def _round(
        self, cmds: list[Command], indexes: Iterable[int], replies: list[Any]
    ) -> tuple[list[int], bool]:
        """Send ``cmds[i]`` for each of ``indexes`` to its node and put each reply in
        ``replies[i]``; the indexes that reached no node, and whether a node failed."""
        client = self.client
        groups: dict[str, tuple[Any, list[int]]] = {}
        unsent: list[int] = []
        for i in indexes:
            try:
                node = client.get_node_from_key(_node_key(cmds[i]))
            except self._unrouted as exc:  # no node serves the slot now
                replies[i] = exc
                unsent.append(i)
                continue
            entry = groups.get(node.name)
            if entry is None:
                entry = groups[node.name] = (node, [])
            entry[1].append(i)
        failed = bool(unsent)
        taken: list[tuple[Any, Any]] = []
        unread: dict[int, tuple[Any, list[int]]] = {}  # id(conn) → (conn, its indexes)
        try:
            for node, group in groups.values():
                try:
                    pool = client.get_redis_connection(node).connection_pool
                    conn = pool.get_connection()  # (connects: nothing written yet)
                except (*self._lost, self._unrouted) as exc:
                    for i in group:
                        replies[i] = exc
                    unsent += group
                    failed = True
                    continue
                taken.append((pool, conn))
                unread[id(conn)] = (conn, group)
                try:
                    conn.send_packed_command(conn.pack_commands([cmds[i] for i in group]))
                except self._lost as exc:  # (some may have gone: they may run)
                    for i in group:
                        replies[i] = exc
                    failed = True
                    conn.disconnect()
                    del unread[id(conn)]
            for key, (conn, waiting) in list(unread.items()):
                if self._read(conn, waiting, replies):
                    del unread[key]
                else:
                    failed = True
        finally:
            for pool, conn in taken:
                if id(conn) in unread:
                    conn.disconnect()
                pool.release(conn)
        return unsent, failed

    def _read(self, conn: Any, group: list[int], replies: list[Any]) -> bool:
        """Read ``group``'s replies from ``conn``; False if the connection broke."""
        for n, i in enumerate(group):
            try:
                replies[i] = conn.read_response(disable_decoding=True)
            except self._response_error as exc:
                replies[i] = exc
            except self._lost as exc:  # the rest ran or did not: nobody knows
                for j in group[n:]:
                    replies[j] = exc
                return False
        return True

    def info_memory(self) -> list[Any]:
        """Each primary's ``INFO memory``, parsed."""
        client = self.client
        return [client.get_redis_connection(node).info("memory") for node in client.get_primaries()]

    def _refresh(self) -> None:
        """Read the slot map again (after a failover, another node serves the slots)."""
        try:
            self.client.nodes_manager.initialize()
        except Exception:  # no node answered: the commands' own errors say so
            return

    def close(self) -> None:
        client = self.client
        client.close()
        # A client from RedisCluster.from_url gives its nodes connection pools that its
        # close() leaves open (their sockets linger until the garbage collector).
        for node in client.get_nodes():
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect()


def _redis_timeout() -> type[Exception]:
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return RedisTimeoutError


class AsyncPool:
    """:class:`Pool` for asyncio, pipelining on its own: commands issued while the
    event loop runs one iteration go out together in one write on one connection,
    and a reader task hands the replies back in order. Any number of concurrent
    checks share that connection; none waits for another's round trip.

    A reply that does not come within the connection's ``socket_timeout``, or a
    broken connection, fails every request in flight on it with that error; the next
    request connects afresh.
    """

    def __init__(self, pool: Any) -> None:
        from redis.exceptions import NoScriptError, ResponseError

        self.pool = pool
        self.slot = None
        self._noscript = NoScriptError
        self._response_error = ResponseError
        self._conn: Any = None
        self._pending: deque[asyncio.Future[Any]] = deque()  # sent, in order
        self._outbox: list[bytes] = []
        self._waiting: list[asyncio.Future[Any]] = []  # queued with the outbox
        self._flush: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[Any]] = set()

    def _submit(self, packed: bytes) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        self._outbox.append(packed)
        self._waiting.append(future)
        if self._flush is None:
            self._flush = asyncio.ensure_future(self._write())
        return future

    async def _write(self) -> None:
        # Runs once the callers of this loop iteration have queued their commands.
        await asyncio.sleep(0)
        while self._outbox:
            data, futures = b"".join(self._outbox), self._waiting
            self._outbox, self._waiting = [], []
            try:
                conn = self._conn
                if conn is None:
                    conn = self.pool.make_connection()
                    await conn.connect()
                    self._conn, self._pending = conn, deque()
                pending = self._pending
                pending.extend(futures)
                await conn.send_packed_command(data, check_health=False)
            except BaseException as exc:
                self._fail(conn, futures, exc)
                if not isinstance(exc, Exception):
                    self._flush = None
                    raise
                continue
            if self._reader is None:
                self._reader = asyncio.ensure_future(self._read(conn, pending))
        self._flush = None

    async def _read(self, conn: Any, pending: deque[asyncio.Future[Any]]) -> None:
        # One watchdog instead of a timer per reply (which costs a fifth of a check):
        # no reply for socket_timeout while requests wait means the server is stuck.
        loop = asyncio.get_running_loop()
        limit = conn.socket_timeout
        progress = [loop.time()]
        watchdog = None
        if limit:
            task = asyncio.current_task()

            def watch() -> None:
                nonlocal watchdog
                if not pending:
                    return
                if loop.time() - progress[0] >= limit:
                    stuck[0] = True
                    task.cancel()  # type: ignore[union-attr]
                    return
                watchdog = loop.call_later(limit / 4, watch)

            stuck = [False]
            watchdog = loop.call_later(limit / 4, watch)
        try:
            while pending:
                try:
                    reply = await conn.read_response(timeout=math.inf, disable_decoding=True)
                except self._response_error as exc:
                    reply = exc
                except asyncio.CancelledError:
                    if limit and stuck[0]:
                        raise _redis_timeout()(f"Timeout: no reply within {limit} s") from None
                    raise
                progress[0] = loop.time()
                future = pending.popleft()
                if future.done():  # its caller gave up (cancelled): the reply is dropped
                    continue
                if isinstance(reply, self._response_error):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except BaseException as exc:
            self._fail(conn, list(pending), exc)
            pending.clear()
            if not isinstance(exc, Exception):
                raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if self._reader is asyncio.current_task():
                self._reader = None

    def _fail(self, conn: Any, futures: list[asyncio.Future[Any]], exc: BaseException) -> None:
        """The connection is in an unknown state: everything in flight on it fails."""
        if conn is not None and conn is self._conn:
            self._conn = None
            failed = list(self._pending)
            self._pending.clear()
            self._pending = deque()
            task = asyncio.ensure_future(conn.disconnect(nowait=True))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        else:
            failed = []
        error = exc if isinstance(exc, Exception) else BackendUnavailable("request cancelled")
        for future in failed + futures:
            if not future.done():
                future.set_exception(error)

    async def call(self, cmd: Command) -> Any:
        try:
            return await self._submit(pack(cmd))
        except self._noscript:
            return await self._submit(pack(as_eval(cmd)))

    async def many(self, commands: Iterable[Command]) -> list[Any]:
        cmds = list(commands)
        replies = await self._gather(cmds)
        missing = [i for i, r in enumerate(replies) if isinstance(r, self._noscript)]
        if missing:
            again = await self._gather([as_eval(cmds[i]) for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _gather(self, cmds: list[Command]) -> list[Any]:
        futures = [self._submit(pack(cmd)) for cmd in cmds]
        replies = list(await asyncio.gather(*futures, return_exceptions=True))
        for reply in replies:
            if isinstance(reply, BaseException) and not isinstance(reply, self._response_error):
                raise reply
        return replies

    async def info_memory(self) -> list[Any]:
        """See :meth:`Pool.info_memory`."""
        import redis.asyncio as aredis

        return [await aredis.Redis(connection_pool=self.pool).info("memory")]

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        for task in (self._flush, self._reader):
            if task is not None:
                task.cancel()
        for future in list(self._pending) + self._waiting:
            if not future.done():
                future.set_exception(BackendUnavailable("the backend was closed"))
        self._pending, self._waiting, self._outbox = deque(), [], []
        if conn is not None:
            await conn.disconnect()
        await self.pool.disconnect()


class AsyncCluster:
    """:class:`Cluster` for asyncio: one redis-py cluster pipeline per node, all at
    once, so that a node that fails fails only its own commands (as their replies);
    after a node failed, the slot map is read again for the next batch."""

    def __init__(self, client: Any) -> None:
        from redis import exceptions as rx

        self.client = client
        self.slot = _slot
        self._noscript = rx.NoScriptError
        self._resend = (rx.NoScriptError, rx.AskError, rx.TryAgainError)
        self._lost = (rx.ConnectionError, rx.TimeoutError, OSError, rx.RedisClusterException)

    async def call(self, cmd: Command) -> Any:
        try:
            return await self.client.execute_command(*cmd, **RAW)
        except self._noscript:
            return await self.client.execute_command(*as_eval(cmd), **RAW)

    async def many(self, commands: Iterable[Command]) -> list[Any]:
        """Every command's reply (or the exception it met), in order."""
        cmds = list(commands)
        client = self.client
        await client.initialize()  # (the first batch, or a refresh an error asked for)
        replies: list[Any] = [None] * len(cmds)
        groups: dict[str, list[int]] = {}
        for i, cmd in enumerate(cmds):
            try:
                node = client.get_node_from_key(_node_key(cmd))
            except self._lost as exc:  # no node serves the slot now
                replies[i] = exc
                continue
            groups.setdefault(node.name, []).append(i)
        answers = await asyncio.gather(
            *(self._pipeline([cmds[i] for i in group]) for group in groups.values()),
            return_exceptions=True,
        )
        for group, answer in zip(groups.values(), answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, Exception):
                    raise answer
                answer = [answer] * len(group)
            for i, reply in zip(group, answer, strict=True):
                replies[i] = reply
        if any(isinstance(reply, self._lost) for reply in replies):
            await self._refresh()
        for i, reply in enumerate(replies):
            if isinstance(reply, self._resend):
                try:
                    replies[i] = await self.call(cmds[i])
                except Exception as exc:
                    replies[i] = exc
        return replies

    async def _pipeline(self, cmds: list[Command]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for cmd in cmds:
            pipe.execute_command(*cmd, **RAW)
        return list(await pipe.execute(raise_on_error=False))

    async def info_memory(self) -> list[Any]:
        """See :meth:`Cluster.info_memory`."""
        client = self.client
        await client.initialize()
        return [
            await client.execute_command("INFO", "memory", target_nodes=node)
            for node in client.get_primaries()
        ]

    async def _refresh(self) -> None:
        """Read the slot map again (after a failover, another node serves the slots)."""
        try:
            await self.client.nodes_manager.initialize()
        except Exception:  # no node answered: the commands' own errors say so
            return

    async def close(self) -> None:
        await self.client.aclose()


def _pick(client: Any, kinds: tuple[tuple[type, Callable[[Any], Any]], ...], refusal: str) -> Any:
    for kind, make in kinds:
        if isinstance(client, kind):
            return make(client)
    raise ConfigurationError(f"{refusal}, not {type(client).__name__}", "client")


def sync_transport(client: Any) -> Pool | Cluster:
    """The transport for a blocking redis-py client, cluster client or pool."""
    import redis
    from redis.cluster import RedisCluster

    kinds = (
        (RedisCluster, Cluster),
        (redis.Redis, lambda c: Pool(c.connection_pool)),
        (redis.ConnectionPool, Pool),
    )
    return _pick(  # type: ignore[no-any-return]
        client,
        kinds,
        "RedisBackend takes a redis.Redis, redis.RedisCluster or redis.ConnectionPool "
        "(for asyncio clients use AsyncRedisBackend)",
    )


def async_transport(client: Any) -> AsyncPool | AsyncCluster:
    """The transport for a redis-py asyncio client, cluster client or pool."""
    import redis.asyncio as aredis
    from redis.asyncio.cluster import RedisCluster

    kinds = (
        (RedisCluster, AsyncCluster),
        (aredis.Redis, lambda c: AsyncPool(c.connection_pool)),
        (aredis.ConnectionPool, AsyncPool),
    )
    return _pick(  # type: ignore[no-any-return]
        client,
        kinds,
        "AsyncRedisBackend takes a redis.asyncio.Redis, redis.asyncio.RedisCluster or "
        "redis.asyncio.ConnectionPool",
    )
