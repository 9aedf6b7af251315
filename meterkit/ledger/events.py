"""Ledger events: what one admitted charge, refund, top-up, allowance change or plan
change was, and how each is written where it first lands (sans-I/O).

An :class:`Event` is one money event. Its ``id`` is unique across every backend
and process, so that a store inserts each event once however often a drain
delivers it:

- a charge's id is its charge id (``Decision.charge_id`` on Redis: 64 random bits
  of its process, then a counter);
- a refund's id is ``r`` followed by the id of the charge it returns (a charge is
  refunded at most once);
- a top-up's, an allowance change's and a plan change's id is a fresh charge id.

The memory backend's charge ids are a counter of its process (see
:mod:`meterkit.backends.memory.backend`); its log qualifies them with the log's own
random id (``<log id>:<n>``), so that two processes draining into one store cannot
collide.

Where events first land:

- **Redis**: one Stream entry, appended by the same Lua script that decides (see
  :func:`entry_event` for the entry's fields and :mod:`meterkit.ledger.streams`
  for which stream).
- **Memory**: one tuple in the backend's :class:`~meterkit.ledger.log.MemoryLog`,
  appended under the backend's lock (see :func:`memory_event`).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple
from urllib.parse import unquote

from meterkit.errors import StateError

__all__ = [
    "ALLOWANCE",
    "CHARGE",
    "KINDS",
    "PLAN",
    "REFUND",
    "TOPUP",
    "Event",
    "Kind",
    "account_of",
    "deal_text",
    "entry_event",
    "memory_event",
    "plan_detail",
]

Kind = Literal["charge", "refund", "topup", "allowance", "plan"]
CHARGE: Kind = "charge"
REFUND: Kind = "refund"
TOPUP: Kind = "topup"
ALLOWANCE: Kind = "allowance"
PLAN: Kind = "plan"
KINDS: tuple[Kind, ...] = (CHARGE, REFUND, TOPUP, ALLOWANCE, PLAN)


class Event(NamedTuple):
    """One money event, as every store keeps it (times in µs, amounts in µ-credits)."""

    #: unique across backends and processes (see the module's docstring)
    id: str
    #: when it happened, on the backend's clock (the one its account was charged on)
    time: int
    org: str
    #: ``"live"`` or ``"test"``
    mode: str
    kind: Kind
    #: the key id ('' for an organization's top-up, allowance or plan)
    key: str
    #: the operation of a charge or refund ('' otherwise)
    operation: str
    #: µ-credits: charged, refunded or topped up; an allowance change's new allowance
    #: (-1: back to the policy's); 0 for a plan change
    micro: int
    #: the charge a charge or refund is about ('' for the other kinds)
    charge: str
    #: a plan change: ``plan <name>``, ``key <name>`` (the key's plan) or ``deal
    #: <lines>``, the name or lines empty when it was taken away; '' otherwise
    detail: str = ""
    #: where the drain read it: the stream's key ('memory:<log id>' for a memory log)
    source: str = ""
    #: its place there: the stream entry id's two numbers (a memory log: 0 and its
    #: sequence number); later events of one source have greater positions
    position: tuple[int, int] = (0, 0)


def deal_text(deal: Any) -> str:
    """A deal (see :func:`meterkit.core.policy.deal_of`) as the lines both backends
    keep and report: ``<tier> <algorithm> <window µs> <limit> <burst>`` each."""
    return "\n".join(" ".join(map(str, terms)) for terms in deal)


def plan_detail(what: str, value: str) -> str:
    """A plan change's ``detail``: ``plan <name>``, ``key <name>`` or ``deal <lines>``,
    only ``what`` when taken away."""
    return f"{what} {value}" if value else what


# -- Redis: one stream entry per event -------------------------------------------------
#
# An entry has one field, written by the scripts in meterkit/backends/redis/lua: its
# name is the kind's letter (c: a charge, r: a refund of it, t: a top-up, a: an
# allowance change, p: a plan change), its value lines joined by '\n':
#
#   the charge id (c, r) or the event's id (t, a, p);
#   the organization's account key, which names the organization and the mode;
#   the time in µs; then
#     c, r  the amount in µ-credits, the account's 'q|<op>|<key>' field
#     t     the amount in µ-credits
#     a     the new allowance in µ-credits, or '' for the policy's
#     p     what ('plan', 'key' or 'deal'), the key id, the value (a name, or a
#           deal's lines; '' when taken away)
#
# One field, built by one Lua concatenation, costs Redis fewer instructions than a
# field per value (see docs/ledger.md, "Cost").

_LETTERS: dict[bytes, Kind] = {
    b"c": CHARGE,
    b"r": REFUND,
    b"t": TOPUP,
    b"a": ALLOWANCE,
    b"p": PLAN,
}


def account_of(account: str) -> tuple[str, str]:
    """The organization and mode named by an account key (``mk:{org}:cr`` or
    ``mk:{org}:test:cr``; the tag's ``%``, ``{`` and ``}`` percent-encoded)."""
    open_ = account.find("{")
    close = account.find("}", open_ + 1)
    if open_ < 0 or close < 0:
        raise ValueError("no hash tag")
    org = account[open_ + 1 : close]
    if "%" in org:
        org = unquote(org)
    mode = "test" if account.startswith(":test:", close + 1) else "live"
    return org, mode


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def entry_event(source: str, entry_id: Any, fields: Any) -> Event:
    """The :class:`Event` of one stream entry (``fields``: the flat list or the dict
    redis-py gives). Raises :class:`StateError` for an entry meterkit did not write."""
    try:
        if isinstance(fields, dict):
            ((letter, body),) = fields.items()
        else:
            letter, body = fields
        if isinstance(letter, str):
            letter = letter.encode()
        kind = _LETTERS[letter]
        parts = _text(body).split("\n", 5 if kind == PLAN else 4)
        ident = parts[0]
        org, mode = account_of(parts[1])
        time = int(parts[2])
        ms, _, seq = _text(entry_id).partition("-")
        position = (int(ms), int(seq or 0))
        if kind in (CHARGE, REFUND):
            micro, field = int(parts[3]), parts[4]
            if not field.startswith("q|"):
                raise ValueError("field")
            operation, key = field[2:].split("|", 1)
            return Event(
                ident if kind == CHARGE else "r" + ident,
                time,
                org,
                mode,
                kind,
                key,
                operation,
                micro,
                ident,
                "",
                source,
                position,
            )
        if kind == TOPUP:
            (amount,) = parts[3:]
            return Event(
                ident, time, org, mode, kind, "", "", int(amount), "", "", source, position
            )
        if kind == ALLOWANCE:
            (value,) = parts[3:]
            micro = -1 if value == "" else int(value)
            return Event(ident, time, org, mode, kind, "", "", micro, "", "", source, position)
        what, key, value = parts[3:]
        if what not in ("plan", "key", "deal"):
            raise ValueError("plan change")
        return Event(
            ident, time, org, mode, kind, key, "", 0, "", plan_detail(what, value), source, position
        )
    except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError):
        raise StateError(
            f"the ledger stream {source!r} holds an entry meterkit did not write"
        ) from None


# -- memory: one tuple per event -------------------------------------------------------
#
# A check appends (n, now, org, mode, key, operation, cost): its charge counter n,
# the time, and what it charged, all strings and ints (no object kept alive until
# drained). Everything else appends (n, now, kind, org, mode, key, operation, micro,
# charge, detail), charge being the counter of the charge a refund returns.


def memory_event(log_id: str, item: tuple[Any, ...]) -> Event:
    """The :class:`Event` of one tuple of a memory log whose id is ``log_id``."""
    source = "memory:" + log_id
    n = item[0]
    if len(item) == 7:
        _, now, org, mode, key, operation, cost = item
        charge = f"{log_id}:{n}"
        return Event(
            charge, now, org, mode, CHARGE, key, operation, cost, charge, "", source, (0, n)
        )
    _, now, kind, org, mode, key, operation, micro, charge, detail = item
    if kind == REFUND:
        ref = f"{log_id}:{charge}"
        return Event(
            "r" + ref, now, org, mode, kind, key, operation, micro, ref, "", source, (0, n)
        )
    return Event(
        f"{log_id}:{n}", now, org, mode, kind, key, operation, micro, "", detail, source, (0, n)
    )
