"""One table from redis-py's exceptions to meterkit's, for the backends and the key
stores alike: the same Redis condition is the same meterkit error everywhere.

- ``BackendUnavailable``: the server cannot answer now (connection refused or lost,
  timeout, ``BUSY``, ``LOADING``, ``MASTERDOWN``, ``READONLY``, ``CLUSTERDOWN``,
  ``TRYAGAIN``, ``OOM``, cluster routing failures); HTTP shells answer 503.
- ``StateError``: a key holds something meterkit did not write (``WRONGTYPE``, a
  script's ``METERKIT_STATE``).
- ``BackendError``: anything else Redis refused (credentials, permissions, an
  unknown command).

Anything that is not a driver error is a bug and is raised as it is.
"""

from __future__ import annotations

from meterkit.errors import BackendError, BackendUnavailable, MeterkitError, StateError

__all__ = ["translate", "translate_all"]

_UNAVAILABLE_CODES = ("BUSY", "LOADING", "MASTERDOWN", "READONLY", "CLUSTERDOWN", "TRYAGAIN")


def translate(exc: BaseException) -> MeterkitError:
    """meterkit's error for a driver's exception (which never leaks to callers)."""
    if isinstance(exc, MeterkitError):
        return exc
    from redis import exceptions as rx
    from redis.exceptions import RedisClusterException

    name = type(exc).__name__
    message = str(exc)
    if isinstance(exc, (rx.AuthenticationError, rx.AuthorizationError, rx.NoPermissionError)):
        return BackendError(f"redis refused meterkit's credentials or permissions ({name})")
    if isinstance(exc, rx.ResponseError) and not isinstance(
        exc, (rx.ReadOnlyError, rx.ClusterError, rx.TryAgainError, rx.AskError, rx.OutOfMemoryError)
    ):
        # (a counter that reads as a number but is no integer fails HINCRBY itself)
        if message.startswith(("WRONGTYPE", "METERKIT_STATE")) or "not an integer" in message:
            detail = message.split(" script: ", 1)[0]
            return StateError(f"redis holds state meterkit did not write: {detail}")
        if not message.startswith(_UNAVAILABLE_CODES):
            return BackendError(f"redis answered with an error: {message}")
    if isinstance(exc, (rx.RedisError, RedisClusterException, OSError)):
        return BackendUnavailable(f"redis is unavailable: {name}: {message}")
    raise exc  # a bug, not an outage: let it show


def translate_all(exc: BaseException) -> BaseException:
    """What every caller of a failed batch gets: meterkit's error, caused by ``exc``
    (a bug stays itself; a cancelled batch is ``BackendUnavailable``)."""
    if not isinstance(exc, Exception):
        return BackendUnavailable("request cancelled")
    try:
        error: BaseException = translate(exc)
    except BaseException as bug:
        return bug
    if error is not exc:
        error.__cause__ = exc
    return error
