"""meterkit._twins: a synchronous twin made from an async method, and an async face
for code without I/O."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import traceback
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from meterkit._twins import awaitable, blocking


class _Resource:
    """What a twin's I/O goes to: the same names, blocking and asyncio."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def fetch(self, n: int) -> int:
        self.calls.append("fetch")
        return n * 2

    def close(self) -> None:
        self.calls.append("close")

    @contextlib.contextmanager
    def session(self) -> Iterator[str]:
        yield "sync session"

    def items(self) -> Iterator[int]:
        return iter([1, 2, 3])


class _AsyncResource:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def fetch(self, n: int) -> int:
        self.calls.append("fetch")
        return n * 2

    async def aclose(self) -> None:
        self.calls.append("close")

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[str]:
        yield "async session"

    async def items(self) -> AsyncIterator[int]:
        for i in (1, 2, 3):
            yield i


class AsyncClient:
    def __init__(self, resource: Any) -> None:
        self.resource = resource

    async def total(self, n: int, *, extra: int = 1) -> int:
        """Twice n, plus extra."""
        return await self.resource.fetch(n) + extra

    async def fail(self) -> None:
        await self.resource.fetch(1)
        raise ValueError("from the one source")

    async def in_session(self) -> str:
        async with self.resource.session() as name:
            return str(name)

    async def summed(self) -> int:
        total = 0
        async for item in self.resource.items():
            total += item
        return total

    async def aclose(self) -> None:
        await self.resource.aclose()


class Client:
    def __init__(self, resource: Any) -> None:
        self.resource = resource

    total = blocking(AsyncClient.total)
    fail = blocking(AsyncClient.fail)
    in_session = blocking(AsyncClient.in_session)
    close = blocking(AsyncClient.aclose)

    # (an async for over an iterator: the twin's for loop takes the sync one)
    summed = blocking(AsyncClient.summed)


def test_the_twin_does_what_the_async_method_does_without_awaiting() -> None:
    """The synchronous twin runs the same code, calling the blocking resource."""
    sync = Client(_Resource())
    assert sync.total(3) == 7
    assert sync.total(3, extra=10) == 16
    assert asyncio.run(AsyncClient(_AsyncResource()).total(3)) == 7
    assert not inspect.iscoroutinefunction(Client.total)


def test_async_with_and_async_for_become_with_and_for() -> None:
    """``async with`` and ``async for`` become their blocking forms."""
    sync = Client(_Resource())
    assert sync.in_session() == "sync session"
    assert sync.summed() == 6
    asynchronous = AsyncClient(_AsyncResource())
    assert asyncio.run(asynchronous.in_session()) == "async session"
    assert asyncio.run(asynchronous.summed()) == 6


def test_aclose_becomes_close_in_names_and_calls() -> None:
    """``aclose`` is renamed to ``close``: the method, and the call inside it."""
    resource = _Resource()
    Client(resource).close()
    assert resource.calls == ["close"]
    assert Client.close.__name__ == "close"


def test_the_twin_has_the_signature_docstring_and_a_name_of_its_class() -> None:
    """Signature and docstring are the async method's; the name is the twin class's."""
    assert inspect.signature(Client.total) == inspect.signature(AsyncClient.total)
    assert Client.total.__doc__ == "Twice n, plus extra."
    assert Client.total.__qualname__ == "Client.total"
    assert Client.total.__module__ == __name__


def test_tracebacks_point_at_the_one_source() -> None:
    """A failure in the twin is reported at the async method's own file and line."""
    with pytest.raises(ValueError, match="from the one source") as info:
        Client(_Resource()).fail()
    frame = traceback.extract_tb(info.tb)[-1]
    _, first = inspect.getsourcelines(AsyncClient.fail)
    assert frame.filename == __file__
    assert frame.lineno == first + 2
    assert frame.line == 'raise ValueError("from the one source")'


def test_what_cannot_have_a_twin_is_refused_at_import_time() -> None:
    """A closure, a decorated method, a private name or a plain def is a TypeError."""
    captured = 1

    async def closure() -> int:
        return captured

    class Decorated:
        @staticmethod
        async def method() -> None:
            return None

    class Private:
        async def method(self) -> None:
            self.__secret = 1

    def plain(self: Any) -> None:
        return None

    with pytest.raises(TypeError, match="closes over captured"):
        blocking(closure)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="decorated"):
        blocking(Decorated.method)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="private name"):
        blocking(Private.method)
    with pytest.raises(TypeError, match="not an async def"):
        blocking(plain)  # type: ignore[arg-type]


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def add(self, k: int) -> int:
        """Add k."""
        self.n += k
        return self.n


class _AsyncCounter:
    def __init__(self) -> None:
        self.sync = _Counter()

    add = awaitable(_Counter.add)


def test_awaitable_runs_the_blocking_method_on_self_sync() -> None:
    """An async face calls the method on ``self.sync`` and keeps its docstring."""
    counter = _AsyncCounter()
    assert asyncio.run(counter.add(2)) == 2
    assert counter.sync.n == 2
    assert inspect.iscoroutinefunction(_AsyncCounter.add)
    assert _AsyncCounter.add.__doc__ == "Add k."


async def _imports_inside() -> str:
    from meterkit.backends.redis.backend import refuse_eviction_async

    return refuse_eviction_async.__name__


def test_a_renamed_name_is_renamed_where_it_is_imported_too() -> None:
    """An import inside the function takes the renamed name (its sync twin)."""
    assert blocking(_imports_inside)() == "refuse_eviction"  # type: ignore[arg-type]
