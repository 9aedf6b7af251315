"""Charge ids: unique across processes and servers without a syscall per check.

64 random bits per process (16 hex digits), then a counter in decimal (``str()`` is
~0.1 µs cheaper than formatting it in hex). A forked child draws a new prefix so that
parent and child never share ids (sibling workers with the same ids would block each
other's refunds).
"""

from __future__ import annotations

import itertools
import os

__all__ = ["new_charge_id"]

_CHARGE_PREFIX = os.urandom(8).hex()
_charge_counter = itertools.count(1)


def _reseed() -> None:
    global _CHARGE_PREFIX, _charge_counter
    _CHARGE_PREFIX = os.urandom(8).hex()
    _charge_counter = itertools.count(1)


os.register_at_fork(after_in_child=_reseed)


def new_charge_id() -> str:
    """A fresh id for one admitted charge, used to refund it exactly once."""
    return _CHARGE_PREFIX + str(next(_charge_counter))
