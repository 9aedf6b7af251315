"""Backends and key stores from URLs: ``memory://``, ``redis://``, ``rediss://``,
``redis+unix://``, ``redis+cluster://`` (and ``rediss+cluster://``), parsed here
alone, for both.

The Redis drivers are imported only when a Redis URL is used (``pip install
meterkit[redis]``). Clients built here time out after ``timeout`` seconds (default 1)
on connect and on every reply, and never retry: a check that timed out may have run,
and running it again could count it twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from meterkit.backends.memory.backend import MemoryBackend
from meterkit.backends.redis.backend import AsyncRedisBackend, RedisBackend
from meterkit.backends.redis.errors import translate
from meterkit.errors import ConfigurationError
from meterkit.keys.memory import AsyncMemoryKeyStore, MemoryKeyStore
from meterkit.keys.model import AsyncKeyStore, KeyOptions, KeyStore

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "async_backend_from_url",
    "async_keystore_from_url",
    "backend_from_url",
    "keystore_from_url",
    "redis_client",
]

_BACKEND_OPTIONS = ("prefix", "clock", "clock_skew", "allow_eviction", "ledger")
_SCHEMES = ("memory", "redis", "rediss", "redis+unix", "unix", "redis+cluster", "rediss+cluster")


def _split(url: object, options: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(scheme, meterkit's options, the driver's options), with the timeout applied."""
    if not isinstance(url, str):
        raise ConfigurationError(f"a backend URL is a str, not {type(url).__name__}", "url")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in _SCHEMES:
        # Never echo the URL: it may hold a password.
        raise ConfigurationError(
            f"unsupported backend URL scheme {scheme!r}; use one of "
            + ", ".join(f"{s}://" for s in _SCHEMES),
            "url",
        )
    ours = {k: options.pop(k) for k in _BACKEND_OPTIONS if k in options}
    if scheme == "memory":
        unknown = set(options) | (set(ours) - {"clock", "ledger"})
        if unknown:
            raise ConfigurationError(
                f"memory:// takes only clock= and ledger=, not {', '.join(sorted(unknown))}",
                "url",
            )
        return scheme, ours, {}
    timeout = options.pop("timeout", 1.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 60:
        raise ConfigurationError("timeout is a number of seconds in (0, 60]", "timeout")
    options.setdefault("socket_timeout", timeout)
    options.setdefault("socket_connect_timeout", timeout)
    return scheme, ours, options


def _cluster_nodes(url: str, node_class: Any) -> tuple[list[Any], dict[str, Any]]:
    from redis.connection import parse_url

    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":") if ":" in host else (host, "", "6379")
        try:
            nodes.append(node_class(unquote(name) or "localhost", int(port or 6379)))
        except ValueError:
            raise ConfigurationError("malformed host:port in the cluster URL", "url") from None
    if not nodes:
        raise ConfigurationError("a cluster URL names at least one host:port", "url")
    scheme = "rediss" if parts.scheme.lower().startswith("rediss") else "redis"
    auth = f"{userinfo}@" if userinfo else ""
    query = f"?{parts.query}" if parts.query else ""
    kwargs: dict[str, Any] = parse_url(  # type: ignore[no-untyped-call]
        f"{scheme}://{auth}localhost/0{query}"
    )
    # (a cluster client picks its own connection class from ssl=; it refuses one given)
    for name in ("host", "port", "db", "connection_class"):
        kwargs.pop(name, None)
    if scheme == "rediss":
        kwargs["ssl"] = True
    return nodes, kwargs


def _plain_url(scheme: str, url: str) -> str:
    return "unix://" + url.split("://", 1)[1] if scheme == "redis+unix" else url


def backend_from_url(url: str, **options: Any) -> MemoryBackend | RedisBackend:
    """A synchronous backend for ``url``.

    ``memory://`` → :class:`MemoryBackend` (options ``clock``, ``ledger``). ``redis://host:port/db``,
    ``rediss://…``, ``redis+unix:///path/to.sock?db=0`` and
    ``redis+cluster://host:port[,host:port…]`` → :class:`RedisBackend`, with options
    ``prefix``, ``clock``, ``clock_skew``, ``allow_eviction``, ``ledger`` (append money
    events to a stream, see docs/ledger.md), ``timeout`` (seconds,
    default 1) and any redis-py connection option (``password``, ``ssl_ca_certs``,
    ``max_connections``…).
    """
    scheme, ours, driver = _split(url, dict(options))
    if scheme == "memory":
        return MemoryBackend(clock=ours.get("clock"), ledger=ours.get("ledger", False))
    client = _sync_client(scheme, url, driver)
    try:
        backend = RedisBackend(client, **ours)
    except BaseException:
        client.close()
        raise
    backend._owned = True
    return backend


def async_backend_from_url(url: str, **options: Any) -> MemoryBackend | AsyncRedisBackend:
    """An asyncio backend for ``url`` (the same URLs and options as
    :func:`backend_from_url`); ``memory://`` gives a :class:`MemoryBackend`, which
    :class:`~meterkit.AsyncMeter` uses as it is."""
    scheme, ours, driver = _split(url, dict(options))
    if scheme == "memory":
        return MemoryBackend(clock=ours.get("clock"), ledger=ours.get("ledger", False))
    backend = AsyncRedisBackend(_async_client(scheme, url, driver), **ours)
    backend._owned = True
    return backend


def redis_client(url: str, *, asyncio: bool = False, **options: Any) -> Any:
    """The redis-py client :func:`backend_from_url` would build for a Redis ``url``
    (with ``asyncio=True``, the one :func:`async_backend_from_url` would build)."""
    scheme, _, driver = _split(url, dict(options))
    if scheme == "memory":
        raise ConfigurationError("memory:// has no redis client", "url")
    return (_async_client if asyncio else _sync_client)(scheme, url, driver)


def _sync_client(scheme: str, url: str, driver: dict[str, Any]) -> Any:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    driver.setdefault("retry", Retry(NoBackoff(), 0))
    if scheme.endswith("+cluster"):
        from redis.cluster import ClusterNode, RedisCluster

        nodes, kwargs = _cluster_nodes(url, ClusterNode)
        kwargs.update(driver)
        try:
            return RedisCluster(startup_nodes=nodes, **kwargs)
        except Exception as exc:  # it connects at once: the cluster may be down
            raise translate(exc) from exc
    import redis

    return redis.Redis.from_url(_plain_url(scheme, url), **driver)


def _async_client(scheme: str, url: str, driver: dict[str, Any]) -> Any:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    driver.setdefault("retry", Retry(NoBackoff(), 0))
    if scheme.endswith("+cluster"):
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        nodes, kwargs = _cluster_nodes(url, ClusterNode)
        kwargs.update(driver)
        return RedisCluster(startup_nodes=nodes, **kwargs)
    import redis.asyncio as aredis

    return aredis.Redis.from_url(_plain_url(scheme, url), **driver)


# -- key stores: the same URLs ---------------------------------------------------------


def _store_scheme(url: object) -> str:
    """The scheme of a key store URL (one of :data:`_SCHEMES`); ``memory://`` is bare."""
    if not isinstance(url, str):
        raise ConfigurationError(f"a key store URL is a str, not {type(url).__name__}", "url")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in _SCHEMES:
        # Never echo the URL: it may hold a password.
        raise ConfigurationError(
            f"unsupported key store URL scheme {scheme!r}; use one of "
            + ", ".join(f"{s}://" for s in _SCHEMES),
            "url",
        )
    if scheme == "memory" and url.lower().rstrip("/") != "memory:":
        raise ConfigurationError("the memory store takes no host or options: 'memory://'", "url")
    return scheme


def keystore_from_url(
    url: str,
    *,
    namespace: str = "mk",
    timeout: float = 1.0,
    allow_eviction: bool = False,
    **options: Unpack[KeyOptions],
) -> KeyStore:
    """A key store for ``memory://`` or ``redis://…`` (``rediss://``, ``unix://``,
    ``redis+cluster://host:port[,host:port…]``, ``rediss+cluster://``).

    A cluster URL makes the client :func:`~meterkit.backend_from_url` would make for it
    (connected at once: an unreachable cluster raises ``BackendUnavailable`` here).
    ``pepper`` is the server-side secret keyed into every hash (keep it out of URLs and
    of the store), ``previous_peppers`` those being retired (their keys still work and
    are rehashed under ``pepper`` when presented); ``namespace`` prefixes Redis key
    names; ``timeout`` (seconds, default 1) bounds connecting and every answer, as
    for :func:`~meterkit.backend_from_url` (no retries); ``status_codes`` overrides
    the HTTP status of refusals (401 each by default), e.g. ``{"insufficient_permissions": 403}``.
    A Redis that may evict keys is refused before the first command, as by the
    backends, unless ``allow_eviction=True``.
    """
    return _store(False, url, namespace, timeout, allow_eviction, options)  # type: ignore[no-any-return]


def async_keystore_from_url(
    url: str,
    *,
    namespace: str = "mk",
    timeout: float = 1.0,
    allow_eviction: bool = False,
    **options: Unpack[KeyOptions],
) -> AsyncKeyStore:
    """The asynchronous variant of :func:`keystore_from_url` (``redis.asyncio`` for Redis)."""
    return _store(True, url, namespace, timeout, allow_eviction, options)  # type: ignore[no-any-return]


def _store(
    asynchronous: bool,
    url: str,
    namespace: str,
    timeout: float,
    allow_eviction: bool,
    options: KeyOptions,
) -> Any:
    """The store of :func:`keystore_from_url` (``asynchronous``: of its asyncio twin)."""
    if _store_scheme(url) == "memory":
        return (AsyncMemoryKeyStore if asynchronous else MemoryKeyStore)(**options)
    from meterkit.keys.redis import AsyncRedisKeyStore, RedisKeyStore

    shell = AsyncRedisKeyStore if asynchronous else RedisKeyStore
    return shell.from_url(
        url, namespace=namespace, timeout=timeout, allow_eviction=allow_eviction, **options
    )
