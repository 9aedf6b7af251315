"""The drain: moves ledger events from a backend into a store, each exactly once.

From **Redis**, a drain is a consumer of a consumer group (``meterkit`` unless
named) on every ledger stream (see :mod:`meterkit.ledger.streams`). One batch is:

1. read entries (``XREADGROUP``): the server records them as pending for this
   consumer;
2. insert their events into the store in one transaction, each unless its id is
   there already, and commit;
3. acknowledge them (``XACK``), then trim the stream up to what every group has
   acknowledged (``ledger_trim.lua``).

Exactly once, whatever is killed when: an entry is acknowledged only after the
commit that holds its event. Killed before the commit, the transaction is rolled
back and the entry stays pending: the same consumer reads its pending entries
again when it starts (by name: ``consumer=``), and any other claims them once they
have been idle ``claim_idle`` seconds (``XAUTOCLAIM``). Killed after the commit
and before the acknowledgement, the entry is read again and its insert does
nothing (the id is there): the store holds the event once. Two drains that both
hold an entry (one slow, one that claimed it) insert it once between them, for the
same reason. The trim never drops an entry some group has not acknowledged. With
Redis persisting every write before it answers (AOF, ``appendfsync always``),
reads, acknowledgements and the events themselves survive a restart of Redis.

Several drains may run at once, in threads or processes on any machines: each
gets its own entries from the group, and the store serializes their commits.

From a **memory** backend (``MemoryBackend(ledger=True)``), a drain in the same
process reads the oldest events of the backend's log, commits them, and only then
removes them from the log.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meterkit.errors import BackendError, BackendUnavailable, ConfigurationError, StateError
from meterkit.ledger.events import Event, entry_event
from meterkit.ledger.streams import STANDALONE, cluster_streams

if TYPE_CHECKING:
    from meterkit.ledger.log import MemoryLog
    from meterkit.ledger.store import LedgerStore

__all__ = ["Drain", "DrainStats"]

log = logging.getLogger("meterkit.ledger")

#: Entries read per stream and command.
BATCH = 1000
#: Streams read in one round trip (Cluster: the slots' streams).
_STREAMS_PER_ROUND = 64
_FORGET_MS = 3_600_000  # consumers with nothing pending, idle an hour


@dataclass
class DrainStats:
    """What a drain has done since it was made."""

    #: events committed to the store and acknowledged
    moved: int = 0
    #: of those, events the store did not hold yet
    inserted: int = 0
    #: entries claimed from other consumers that had held them ``claim_idle`` seconds
    claimed: int = 0
    #: batches the store refused or the source failed on (retried by ``run``)
    failures: int = 0


class Drain:
    """Moves events from ``source`` into ``store``, each exactly once.

    ``source`` is a Redis URL (``redis://``, ``rediss://``, ``redis+cluster://``…), a
    redis-py client, a :class:`~meterkit.RedisBackend`, or a
    :class:`~meterkit.MemoryBackend` made with ``ledger=True``. ``store`` is a ledger
    store or its URL (``sqlite:///path.db``, ``postgresql://…``), see
    :func:`~meterkit.ledger.store_from_url`.

    Redis options: ``prefix`` (the backend's key prefix, default ``mk``), ``group``
    (the consumer group: drains into one store share one; another store needs its
    own), ``consumer`` (this drain's name in the group, default host and process id;
    a drain that restarts under the same name takes back its pending entries at
    once), ``claim_idle`` (seconds after which another consumer's pending entries are
    claimed), ``rescan`` (Cluster: seconds between looks for new slot streams).

    :meth:`run_once` moves what is there now; :meth:`run` keeps moving until
    stopped; :meth:`start` runs it in a thread (for an app, asyncio or not).
    """

    def __init__(
        self,
        source: Any,
        store: LedgerStore | str,
        *,
        prefix: str = "mk",
        group: str = "meterkit",
        consumer: str | None = None,
        batch: int = BATCH,
        claim_idle: float = 30.0,
        rescan: float = 10.0,
    ) -> None:
        from meterkit.ledger.store import store_from_url

        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 100_000:
            raise ConfigurationError("batch is 1-100000 events", "batch")
        if not isinstance(claim_idle, (int, float)) or claim_idle < 0:
            raise ConfigurationError("claim_idle is a number of seconds", "claim_idle")
        self._owns_store = isinstance(store, str)
        self.store: LedgerStore = store_from_url(store) if isinstance(store, str) else store
        self.batch = batch
        self.stats = DrainStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._attach(source, prefix, group, consumer, claim_idle, rescan)
        except BaseException:
            if self._owns_store:  # refused: the store it opened is closed again
                self.store.close()
            raise

    def _attach(
        self,
        source: Any,
        prefix: str,
        group: str,
        consumer: str | None,
        claim_idle: float,
        rescan: float,
    ) -> None:
        """Bind the drain to its source: a MemoryBackend's log or a Redis URL/client."""
        self._redis: _RedisSource | None = None
        memory_log = getattr(source, "ledger", None)
        if hasattr(source, "_accounts"):  # a MemoryBackend
            if memory_log is None:
                raise ConfigurationError(
                    "this MemoryBackend keeps no ledger: make it with MemoryBackend(ledger=True)",
                    "source",
                )
            memory = _MemorySource(memory_log, self, source._read_clock)
            self._pass: Callable[[], int] = memory.drain
            self._lag: Callable[[], float] = memory.lag
        else:
            redis_source = _RedisSource(
                source,
                self,
                prefix=prefix,
                group=group,
                consumer=consumer or f"{socket.gethostname()}-{os.getpid()}",
                claim_idle=claim_idle,
                rescan=rescan,
            )
            self._redis = redis_source
            self._pass = redis_source.drain
            self._lag = redis_source.lag

    def __repr__(self) -> str:
        return f"Drain(store={self.store!r}, moved={self.stats.moved})"

    def _commit(self, events: Sequence[Event]) -> None:
        """Hand a batch to the store (one transaction) and count it."""
        inserted = self.store.write(events)
        self.stats.inserted += inserted
        self.stats.moved += len(events)

    def run_once(self) -> int:
        """Move every event there is now (in batches); return how many were moved."""
        before = self.stats.moved
        self._pass()
        return self.stats.moved - before

    def lag(self) -> float:
        """How far this drain is behind, in seconds: the age of the oldest event its
        store does not hold yet (one no drain has read, or one read and not yet
        committed), 0 when it is caught up. Timed by the backend's clock (Redis:
        the server's, from the entry's id). For a gauge:
        ``PrometheusObserver(ledger_lag=drain.lag)``."""
        return self._lag()

    def run(
        self,
        *,
        idle: float = 0.2,
        until_empty: bool = False,
        stop: threading.Event | None = None,
    ) -> int:
        """Move events until :meth:`stop` (or ``stop`` is set); with ``until_empty``,
        until a pass finds nothing. Sleeps ``idle`` seconds when there is nothing
        to move; a source or store that fails is tried again after a pause
        (counted in ``stats.failures``). Returns how many events were moved."""
        before = self.stats.moved
        stopping = stop or self._stop
        pause = idle
        while not stopping.is_set() and not self._stop.is_set():
            try:
                moved = self.run_once()
            except Exception as exc:
                # A drain that stops leaves the log to fill and the checks to be refused:
                # whatever failed, it is logged and tried again (an outage as a warning,
                # anything else, a bug or the store's own error, with its traceback).
                self.stats.failures += 1
                if isinstance(exc, BackendError):
                    log.warning("ledger drain: %s; trying again in %.1f s", exc, pause)
                else:
                    log.exception("ledger drain failed; trying again in %.1f s", pause)
                stopping.wait(pause)
                pause = min(5.0, pause * 2 + 0.05)
                continue
            pause = idle
            if moved == 0:
                if until_empty:
                    break
                stopping.wait(idle)
        return self.stats.moved - before

    def start(self, *, idle: float = 0.2) -> Drain:
        """Run :meth:`run` in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            raise ConfigurationError("this drain is running already", "start")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.run, kwargs={"idle": idle}, name="meterkit-ledger-drain", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop :meth:`run` (and the thread of :meth:`start`) after its current batch."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        """Stop, and close the connections this drain made (and the store, if it
        was given as a URL)."""
        self.stop()
        if self._redis is not None:
            self._redis.close()
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> Drain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _MemorySource:
    """A memory backend's log, drained in the same process."""

    def __init__(self, memory_log: MemoryLog, drain: Drain, clock_us: Callable[[], int]) -> None:
        self.log = memory_log
        self.drain_ = drain
        self.clock_us = clock_us

    def lag(self) -> float:
        try:
            oldest = self.log.entries[0]
        except IndexError:
            return 0.0
        written: int = oldest[1]
        return max(0, self.clock_us() - written) / 1_000_000

    def drain(self) -> int:
        moved = 0
        with self.log._draining:  # one drain at a time: peek and confirm must pair
            while True:
                events = self.log.peek(self.drain_.batch)
                if not events:
                    return moved
                self.drain_._commit(events)
                self.log.confirm(len(events))
                moved += len(events)


def _redis_client(source: Any) -> tuple[Any, bool, bool]:
    """(a blocking redis-py client, whether it is a cluster's, whether we made it)."""
    try:
        import redis
        from redis.cluster import RedisCluster
    except ImportError as exc:  # pragma: no cover - redis comes with meterkit[redis]
        raise ConfigurationError(
            "draining Redis needs redis-py: pip install 'meterkit[redis]'"
        ) from exc
    if isinstance(source, str):
        from meterkit.connect import redis_client

        client = redis_client(source, timeout=30)
        return client, isinstance(client, RedisCluster), True
    io = getattr(source, "_io", None)
    if io is not None:  # a RedisBackend: its connections
        inner = getattr(io, "client", None)
        if inner is not None:
            if not isinstance(inner, RedisCluster):
                raise ConfigurationError("a drain needs a blocking backend or client", "source")
            return inner, True, False
        pool = getattr(io, "pool", None)
        if not isinstance(pool, redis.ConnectionPool):
            raise ConfigurationError("a drain needs a blocking backend or client", "source")
        return redis.Redis(connection_pool=pool), False, False
    if isinstance(source, RedisCluster):
        return source, True, False
    if isinstance(source, redis.Redis):
        return source, False, False
    raise ConfigurationError(
        "a drain's source is a Redis URL, a redis-py client, a RedisBackend or a "
        f"MemoryBackend with a ledger, not {type(source).__name__}",
        "source",
    )


class _RedisSource:
    """The ledger streams of one Redis (standalone: one stream; Cluster: one per slot)."""

    def __init__(
        self,
        source: Any,
        drain: Drain,
        *,
        prefix: str,
        group: str,
        consumer: str,
        claim_idle: float,
        rescan: float,
    ) -> None:
        from meterkit.backends.redis.scripts import script

        self.client, self.cluster, self._owned = _redis_client(source)
        self.drain_ = drain
        self.prefix = prefix
        self.group = group
        self.consumer = consumer
        self.claim_idle_ms = int(claim_idle * 1000)
        self.rescan = rescan
        self._trim = self.client.register_script(script("ledger_trim").text)
        #: streams read so far, with their group made; and those whose pending
        #: entries this consumer must read again (all, when it starts)
        self._streams: list[str] = []
        self._backlog: set[str] = set()
        self._claim_cursor: dict[str, bytes] = {}
        self._scanned = -1e9
        self._claimed = 0.0
        self._next = 0  # (the stream a read starts from: every stream gets its turn)
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        if self._owned:
            self.client.close()

    # -- discovering streams ------------------------------------------------------------

    def _discover(self) -> None:
        now = time.monotonic()
        if self._streams and (not self.cluster or now - self._scanned < self.rescan):
            return
        self._scanned = now
        if not self.cluster:
            candidates = [f"{self.prefix}:{STANDALONE}"]
        else:
            every = cluster_streams(self.prefix)
            pipe = self.client.pipeline()
            for name in every:
                pipe.exists(name)
            candidates = [n for n, there in zip(every, pipe.execute(), strict=True) if there]
        known = set(self._streams)
        for name in candidates:
            if name in known:
                continue
            self._group(name)
            self._streams.append(name)
            self._backlog.add(name)

    def _group(self, stream: str) -> None:
        from redis.exceptions import ResponseError

        try:
            # From the start of what the stream holds: a group made after the first
            # events still gets them (nothing trims a stream no group has read).
            self.client.xgroup_create(stream, self.group, id="0", mkstream=not self.cluster)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- one pass -------------------------------------------------------------------------

    def drain(self) -> int:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError, ResponseError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        try:
            return self._drain()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            # What was read and not acknowledged is read again from the pending list.
            self._backlog.update(self._streams)
            raise BackendUnavailable(f"the ledger's Redis is unavailable: {exc}") from exc
        except ResponseError as exc:
            self._backlog.update(self._streams)
            if "NOGROUP" in str(exc):
                self._streams = []  # the stream or its group went away: look again
            raise BackendError(f"the ledger's Redis refused a command: {exc}") from exc
        except RedisError as exc:
            self._backlog.update(self._streams)
            raise BackendUnavailable(f"the ledger's Redis failed: {exc}") from exc
        except BackendError:
            self._backlog.update(self._streams)
            raise

    def lag(self) -> float:
        """The age of the oldest entry of the group's streams not yet acknowledged: the
        first pending one, or the first after what the group was last given (an entry's
        id is the server's time, in ms)."""
        from redis.exceptions import RedisError

        try:
            self._discover()
            if not self._streams:
                return 0.0
            pipe = self.client.pipeline(transaction=False)
            for stream in self._streams:
                pipe.xpending(stream, self.group)
                pipe.xinfo_groups(stream)
            replies = pipe.execute()
            oldest: list[int] = []
            pipe = self.client.pipeline(transaction=False)
            for i, stream in enumerate(self._streams):
                pending, groups = replies[2 * i], replies[2 * i + 1]
                if pending and pending.get("pending"):
                    oldest.append(_ms(pending["min"]))
                given = next(
                    (g["last-delivered-id"] for g in groups if _text(g["name"]) == self.group),
                    b"0-0",
                )
                pipe.xrange(stream, min=b"(" + _bytes(given), count=1)
            for entries in pipe.execute():
                if entries:
                    oldest.append(_ms(entries[0][0]))
            if not oldest:
                return 0.0
            now = self.client.time()
            if isinstance(now, dict):  # (a cluster answers for each node: any will do)
                now = next(iter(now.values()))
            server_ms = int(now[0]) * 1000 + int(now[1]) // 1000
            return max(0, server_ms - min(oldest)) / 1000
        except RedisError as exc:
            raise BackendUnavailable(f"the ledger's Redis failed: {exc}") from exc

    def _drain(self) -> int:
        self._discover()
        moved = 0
        if time.monotonic() - self._claimed >= max(self.claim_idle_ms / 2000, 0.05):
            self._claimed = time.monotonic()
            for i in range(0, len(self._streams), _STREAMS_PER_ROUND):
                got = self._claim(self._streams[i : i + _STREAMS_PER_ROUND])
                if got:
                    self.drain_._commit(_flat(got))
                    moved += self._confirm(got)
        # One batch is written while the next is read: the store's commit and the
        # server's replies overlap. A batch is still acknowledged only once committed.
        writing: tuple[Future[None], dict[str, list[Event]]] | None = None
        try:
            while True:
                if writing is not None and self._backlog:
                    # (re-reading pending entries must not meet the batch in flight)
                    moved += self._finish(writing)
                    writing = None
                backlog = len(self._backlog)
                got = self._read()
                if writing is not None:
                    moved += self._finish(writing)
                    writing = None
                if got:
                    writing = (self._writer().submit(self.drain_._commit, _flat(got)), got)
                elif len(self._backlog) == backlog:
                    return moved
        finally:
            if writing is not None:  # (an error: let the batch in flight end, unconfirmed)
                wait([writing[0]])

    def _writer(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="meterkit-ledger-write")
        return self._pool

    def _finish(self, writing: tuple[Future[None], dict[str, list[Event]]]) -> int:
        future, got = writing
        future.result()  # (the store's error, if it refused the batch)
        return self._confirm(got)

    def _read(self) -> dict[str, list[Event]]:
        """About a batch of events (at least one stream's worth when any has some),
        from the streams in turn."""
        batch = self.drain_.batch
        streams = self._streams
        got: dict[str, list[Event]] = {}
        total = 0
        n = len(streams)
        for _ in range(0, n, _STREAMS_PER_ROUND):
            first = self._next % n if n else 0
            chunk = [streams[(first + j) % n] for j in range(min(_STREAMS_PER_ROUND, n))]
            self._next = first + len(chunk)
            pipe = self.client.pipeline(transaction=False)
            starts = []
            for stream in chunk:
                start = "0" if stream in self._backlog else ">"
                pipe.xreadgroup(self.group, self.consumer, {stream: start}, count=batch)
                starts.append(start)
            for stream, start, reply in zip(chunk, starts, pipe.execute(), strict=True):
                entries = _entries(reply)
                if start == "0" and len(entries) < batch:
                    self._backlog.discard(stream)  # (its pending entries are all in hand)
                if entries:
                    got.setdefault(stream, []).extend(self._events(stream, entries))
                    total += len(entries)
            if total >= batch:
                break
        return got

    def _claim(self, streams: list[str]) -> dict[str, list[Event]]:
        """Take over entries other consumers have held ``claim_idle`` seconds."""
        pipe = self.client.pipeline(transaction=False)
        for stream in streams:
            pipe.xautoclaim(
                stream,
                self.group,
                self.consumer,
                self.claim_idle_ms,
                start_id=self._claim_cursor.get(stream, b"0-0"),
                count=self.drain_.batch,
            )
        got: dict[str, list[Event]] = {}
        for stream, reply in zip(streams, pipe.execute(), strict=True):
            cursor, entries = reply[0], reply[1]
            deleted = reply[2] if len(reply) > 2 else []
            self._claim_cursor[stream] = cursor
            if deleted:
                # Pending entries that are no longer in the stream: something other
                # than meterkit trimmed or deleted them. Say so: money may be missing.
                log.error(
                    "ledger stream %s lost %d pending entries (trimmed by something else): "
                    "reconcile this period",
                    stream,
                    len(deleted),
                )
            entries = [e for e in entries if e[1] is not None]
            if entries:
                got[stream] = self._events(stream, entries)
                self.drain_.stats.claimed += len(entries)
        return got

    def _events(self, stream: str, entries: list[Any]) -> list[Event]:
        events = []
        for entry_id, fields in entries:
            if fields is None:
                raise StateError(
                    f"an entry pending in {stream!r} is no longer in the stream: something "
                    "other than meterkit trimmed it"
                )
            events.append(entry_event(stream, entry_id, fields))
        return events

    def _confirm(self, got: dict[str, list[Event]]) -> int:
        """Acknowledge and trim what a commit holds (never before it)."""
        pipe = self.client.pipeline(transaction=False)
        for stream, stream_events in got.items():
            ids = [f"{e.position[0]}-{e.position[1]}" for e in stream_events]
            pipe.xack(stream, self.group, *ids)
        pipe.execute()
        for stream in got:
            self._trim(keys=[stream], args=[_FORGET_MS])
        return sum(map(len, got.values()))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _ms(entry_id: Any) -> int:
    """The time (ms) in a stream entry's id, ``<ms>-<seq>``."""
    return int(_text(entry_id).partition("-")[0])


def _flat(got: dict[str, list[Event]]) -> list[Event]:
    return [e for stream_events in got.values() for e in stream_events]


def _entries(reply: Any) -> list[Any]:
    """The entries of one stream's XREADGROUP reply (RESP2 list or RESP3 dict)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        (entries,) = reply.values()
        return list(entries[0] if entries and isinstance(entries[0], list) else entries)
    ((_, entries),) = reply
    return list(entries)
