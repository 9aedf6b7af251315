"""Sync and asyncio twins, each written once.

meterkit offers most objects twice: ``Meter`` and ``AsyncMeter``, ``RedisKeyStore``
and ``AsyncRedisKeyStore``, and so on. Each twin method is written once, in one of
two ways, and the other side is made from it when the module is imported:

- Code that does I/O is written **asynchronously**. :func:`blocking` makes its
  synchronous twin the way httpcore's unasync does, but from the function itself:
  it parses the function's source, removes every ``await`` (and the ``async`` of
  ``def``, ``with`` and ``for``), renames the few names that differ
  (:data:`RENAMES`: ``aclose`` is ``close``, ``__aenter__`` is ``__enter__``, …)
  and compiles the result under the original file name and line numbers. Nothing is
  generated on disk and nothing runs per call: the synchronous method is a plain
  function, as fast as one written by hand, and its tracebacks, coverage and
  ``inspect.getsource`` point at the one source.
- Code that does no I/O (the in-memory key store) is written **synchronously**;
  :func:`awaitable` gives it an ``async`` face.

A twin function must be self-contained: no closure (and so no zero-argument
``super()``), no decorator, no private ``__name`` (Python mangles those by class).
:func:`blocking` refuses anything else with :class:`TypeError` at import time, so a
mistake cannot reach a user.

Typing: both return a callable with the same parameters (``ParamSpec``), so
``check = blocking(AsyncMeter.check)`` in a class body gives ``Meter.check`` the
signature of ``AsyncMeter.check`` without its coroutine, overloads included.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Concatenate, ParamSpec, TypeVar

__all__ = ["RENAMES", "awaitable", "blocking"]

P = ParamSpec("P")
R = TypeVar("R")

#: Names that differ between an asyncio object and its synchronous twin.
RENAMES: Mapping[str, str] = {
    "aclose": "close",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    "StopAsyncIteration": "StopIteration",
    # meterkit's own pairs
    "refuse_eviction_async": "refuse_eviction",
    "_refuse_eviction_async": "_refuse_eviction",
    "async_transport": "sync_transport",
}


_ASYNC_NAMES = {sync: name for name, sync in RENAMES.items()}


class _Unasync(ast.NodeTransformer):
    """Turn an ``async`` function's syntax tree into its synchronous twin's."""

    def __init__(self, renames: Mapping[str, str]) -> None:
        self.renames = renames

    def _plain(self, node: ast.AST, kind: type[ast.AST]) -> ast.AST:
        self.generic_visit(node)
        plain = kind(**{field: getattr(node, field) for field in node._fields})
        return ast.copy_location(plain, node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> ast.AST:
        node.name = self.renames.get(node.name, node.name)
        return self._plain(node, ast.FunctionDef)

    def visit_AsyncWith(self, node: ast.AsyncWith) -> ast.AST:
        return self._plain(node, ast.With)

    def visit_AsyncFor(self, node: ast.AsyncFor) -> ast.AST:
        return self._plain(node, ast.For)

    def visit_Await(self, node: ast.Await) -> ast.AST:
        value: ast.AST = self.visit(node.value)
        return value

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        node.attr = self.renames.get(node.attr, node.attr)
        self.generic_visit(node)
        return node

    def visit_alias(self, node: ast.alias) -> ast.AST:
        node.name = self.renames.get(node.name, node.name)
        return node

    def visit_Name(self, node: ast.Name) -> ast.AST:
        node.id = self.renames.get(node.id, node.id)
        return node


def _refuse(fn: Callable[..., Any], why: str) -> TypeError:
    return TypeError(f"{fn.__qualname__} cannot have a synchronous twin: {why}")


def _function_tree(fn: Callable[..., Any]) -> ast.Module:
    """``fn``'s source as a module whose one statement defines it, at its own lines and
    columns (the source stays indented: it is parsed inside an ``if`` block)."""
    lines, first = inspect.getsourcelines(fn)
    if lines[0][:1].isspace():  # a method: parse it indented, as it stands in its class
        tree = ast.parse("if 1:\n" + "".join(lines))
        ast.increment_lineno(tree, first - 2)
        block = tree.body[0]
        assert isinstance(block, ast.If)
        (definition,) = tree.body = block.body
    else:
        tree = ast.parse("".join(lines))
        ast.increment_lineno(tree, first - 1)
        (definition,) = tree.body
    if not isinstance(definition, ast.AsyncFunctionDef):
        raise _refuse(fn, "it is not an async def")
    if definition.decorator_list:
        raise _refuse(fn, "it is decorated")
    for node in ast.walk(definition):
        name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
        if name.startswith("__") and not name.endswith("__"):
            raise _refuse(fn, f"it uses the private name {name}")
    return tree


def blocking(
    fn: Callable[Concatenate[Any, P], Coroutine[Any, Any, R]],
    renames: Mapping[str, str] = RENAMES,
) -> Callable[Concatenate[Any, P], R]:
    """The synchronous twin of the ``async`` method ``fn``: its source without
    ``await`` and ``async``, names renamed by ``renames``, compiled once, now."""
    if not inspect.iscoroutinefunction(fn):
        raise _refuse(fn, "it is not an async def")
    if fn.__code__.co_freevars:
        raise _refuse(fn, f"it closes over {', '.join(fn.__code__.co_freevars)}")
    tree = _Unasync(renames).visit(_function_tree(fn))
    ast.fix_missing_locations(tree)
    namespace: dict[str, Any] = {}
    exec(compile(tree, fn.__code__.co_filename, "exec"), fn.__globals__, namespace)
    (twin,) = namespace.values()
    # Named for where it is made: in a class body, that class (``Meter.check``).
    owner = sys._getframe(1).f_locals.get("__qualname__")
    if isinstance(owner, str):
        twin.__qualname__ = f"{owner}.{twin.__name__}"
    twin.__module__ = fn.__module__
    twin.__defaults__ = fn.__defaults__
    twin.__kwdefaults__ = fn.__kwdefaults__
    return twin  # type: ignore[no-any-return]


def awaitable(
    fn: Callable[Concatenate[Any, P], R],
) -> Callable[Concatenate[Any, P], Coroutine[Any, Any, R]]:
    """An ``async`` face for the method ``fn``, which does no I/O: it is called on
    ``self.sync`` (the synchronous object that holds the state) and never blocks."""

    @functools.wraps(fn)
    async def method(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return fn(self.sync, *args, **kwargs)

    method.__name__ = _ASYNC_NAMES.get(fn.__name__, fn.__name__)
    owner = sys._getframe(1).f_locals.get("__qualname__")
    if isinstance(owner, str):
        method.__qualname__ = f"{owner}.{method.__name__}"
    return method
