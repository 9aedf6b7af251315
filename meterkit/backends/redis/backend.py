"""The Redis backends: one EVALSHA per check, the same math as the memory backend.

A check is one Lua script (``meterkit/lua/check.lua``) run by one ``EVALSHA``: every
tier, the credit debit, the idempotency record and the usage counters, all or
nothing. An operation's fixed parameters are the script's first lines (one script
per distinct set of tiers), so that Redis does not parse them on every check.
``check_many`` sends the policy's batch script instead (the same check, run for each
request of up to :data:`_BATCH` in turn, each all or nothing on its own): one
``EVALSHA`` for many requests, which saves Redis a command, a reply and a ``TIME``
per request. Refunds, usage reports, top-ups and allowance overrides are a script each.
Scripts are package data, sent by SHA; after ``NOSCRIPT`` (``SCRIPT FLUSH``, a
restart, a failover to a replica that never saw them) the same command goes again as
``EVAL`` with the script's text, which registers it again (a pipeline sends one
``SCRIPT LOAD`` first instead).

Everything but the I/O is shared by :class:`RedisBackend` and
:class:`AsyncRedisBackend`: :class:`_Codec` turns a plan into a command and a reply
into an :data:`~meterkit.core.plan.Outcome`; the four transports below only move bytes.

Key layout (``mk`` is the configurable prefix; ``{…}`` is the organization, the
Cluster hash tag, with ``%``, ``{`` and ``}`` percent-encoded; test mode inserts
``test:`` after the tag; ids are public ids, never secrets)::

    mk:{org}:fw:<tier>.<limit>.<window s>[:<key id>]     fixed window: STRING, 16 B
    mk:{org}:sw:<tier>.<limit>.<window s>[:<key id>]     sliding window: STRING, 24 B
    mk:{org}:gc:<tier>.<limit>.<window s>.<burst>[:<key id>]   gcra: the TAT in µs
    mk:{org}:sl:<tier>.<limit>.<window s>[:<key id>]     sliding log: STRING, 8 B per µs
    mk:{org}:cr                                          the month's account: HASH
    mk:{org}:al                                          allowance override (no TTL)
    mk:{org}:id:<idempotency key>                        first decision, 24 h

A window is 8-byte little-endian integers: its id, its count and (sliding) the
count of the window before. Tier names hold no ``:``; the key id, when the tier
counts keys, is the last part. Org-scoped tiers end after the tier part. Every key
but the allowance override expires when its state can no longer matter (window end,
TAT, last log entry plus the window, month end, 24 h), padded by ``clock_skew`` when
``clock=`` is given. See docs/redis.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import select
import struct
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

from meterkit.backends.charge_ids import new_charge_id
from meterkit.backends.redis.errors import translate, translate_all
from meterkit.backends.redis.eviction import eviction_error
from meterkit.core.credits import top_up_too_large
from meterkit.core.outcome import Outcome, RawUsage, replay, unspent
from meterkit.core.plan import Plan, clock_us, month_bounds
from meterkit.errors import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    MeterkitError,
    StateError,
)

if TYPE_CHECKING:
    from meterkit.core.policy import OperationPlan, Policy, Tier

__all__ = ["AsyncRedisBackend", "RedisBackend"]

Clock = Callable[[], float]
Command = list[Any]
#: What one command of a batch brings: the indexes of its requests, their charge
#: ids, and whether it is the batch script (one reply per request) or a plain check.
Sent = tuple[list[int], list[str], bool]
#: Called with each command's index and final reply as the reply is read.
OnReply = Callable[[int, Any], None]
_US = 1_000_000
#: A check's reply: 7 integers of the head, then 3 per tier (see check.lua).
_HEAD = struct.Struct("<7q")
_TIER = struct.Struct("<3q")
#: An account's 'h' (month start, used, top-ups, override or -1) and 'q|<op>|<key>'
#: (requests, µ-credits): see common.lua.
_ACCOUNT_HEAD = struct.Struct("<4q")
_ACCOUNT_PAIR = struct.Struct("<2q")
_KINDS = ("fw", "sw", "gc", "sl")  # by Tier.code


def _lua(name: str) -> str:
    return (
        resources.files("meterkit.backends.redis")
        .joinpath("lua")
        .joinpath(f"{name}.lua")
        .read_text("utf-8")
    )


_CHECK = "local function check("


def _inline(check: str, driver: str) -> str:
    """check.lua with its function's body run inline after ``driver`` (which binds the
    parameters): one request per call needs no function, which Redis would make anew
    on every call."""
    helpers, rest = check.split(_CHECK, 1)
    body, end = rest.split(")\n", 1)[1].rsplit("\nend", 1)
    assert not end.strip(), "check.lua ends with its check function"
    return helpers + driver + body + "\n"


class _Script:
    """One Lua script: the shared helpers, generated lines (a check's parameters),
    then its own files; sent by SHA."""

    __slots__ = ("sha", "text")

    def __init__(self, name: str, line: str = "") -> None:
        if name == "check+check_one":
            body = _inline(_lua("check"), _lua("check_one"))
        else:
            body = "".join(_lua(part) for part in name.split("+"))
        self.text = _lua("common") + "\n" + line + body
        self.sha = hashlib.sha1(self.text.encode("utf-8")).hexdigest()


_SCRIPTS: dict[str, _Script] = {}


def _script(name: str, line: str = "") -> _Script:
    """The script ``name`` (files joined by ``+``, after ``line``), made once."""
    script = _SCRIPTS.get(name + line)
    if script is None:
        script = _SCRIPTS[name + line] = _Script(name, line)
    return script


#: What redis-py's clients are told so that replies come as bytes even from a client
#: made with ``decode_responses=True`` (a check's reply is binary).
_RAW: dict[str, Any] = {"NEVER_DECODE": []}


def _as_eval(cmd: Command) -> Command:
    """The same script call with the script's text: the answer to ``NOSCRIPT``."""
    for script in _SCRIPTS.values():
        if script.sha == cmd[1]:
            return ["EVAL", script.text, *cmd[2:]]
    raise BackendError("NOSCRIPT for a script meterkit does not know")  # pragma: no cover


def _pack(cmd: Command) -> bytes:
    """One command in the Redis protocol (hiredis's C packer when it is installed)."""
    return _hiredis_pack(tuple(cmd))  # type: ignore[no-any-return]


def _pack_python(cmd: Command) -> bytes:
    out = [b"*%d\r\n" % len(cmd)]
    for arg in cmd:
        data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8")
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis comes with meterkit[redis]
    _pack = _pack_python


_CHUNK = 16
_CHUNK_BYTES = 8192  # (a batch script call is one command of many requests)
#: Requests per batch script call: enough to spread EVALSHA's own cost, few enough
#: that Redis runs other clients' commands in between and that a big check_many
#: still overlaps (the client makes a batch while Redis runs the one before).
_BATCH = 50


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# -- the shared codec --------------------------------------------------------------------


class _Compiled:
    """What one operation's checks share: key suffixes, the check script (whose first
    lines hold the operation's fixed parameters, see check.lua), and the policy's
    batch script with the operation's tier set in it."""

    __slots__ = ("batch", "sha", "suffixes", "tier_set")

    def __init__(
        self, sha: str, suffixes: tuple[tuple[str, bool], ...], batch: str, tier_set: str
    ) -> None:
        self.sha = sha
        self.suffixes = suffixes
        self.batch = batch
        self.tier_set = tier_set


class _Codec:
    """Plans to commands and replies to outcomes: everything the two backends share."""

    __slots__ = ("_bases", "_clock", "_compiled", "_grace", "_period", "prefix")

    def __init__(self, prefix: str, clock: Clock | None, clock_skew: float) -> None:
        if (
            not isinstance(prefix, str)
            or not 0 < len(prefix) <= 64
            or not prefix.isprintable()
            or any(c in prefix for c in "{} ")
        ):
            raise ConfigurationError(
                "a key prefix is 1-64 printable characters without spaces or braces, "
                f"got {prefix!r}",
                "prefix",
            )
        if clock is not None and not callable(clock):
            raise ConfigurationError("clock is a callable returning UNIX seconds", "clock")
        if (
            isinstance(clock_skew, bool)
            or not isinstance(clock_skew, (int, float))
            or not (0 <= clock_skew <= 86_400)
        ):
            raise ConfigurationError("clock_skew is 0-86400 seconds", "clock_skew")
        self.prefix = prefix
        self._clock = clock
        # The server's clock is one clock; app servers' clocks may disagree, so their
        # state lives a little past its end for the one that lags.
        self._grace = 0 if clock is None else round(clock_skew * 1000)
        self._compiled: dict[OperationPlan, _Compiled] = {}
        self._bases: dict[tuple[str, str], str] = {}
        self._period = (0, 0)

    # -- keys --------------------------------------------------------------------------

    def base(self, org: str, mode: str) -> str:
        """``mk:{org}:`` (or ``mk:{org}:test:``): the start of every key of ``org``."""
        base = self._bases.get((org, mode))
        if base is None:
            tag = org
            if "{" in tag or "}" in tag or "%" in tag:
                tag = tag.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
            base = f"{self.prefix}:{{{tag}}}:" + ("" if mode == "live" else "test:")
            if len(self._bases) >= 65_536:
                self._bases.clear()
            self._bases[(org, mode)] = base
        return base

    @staticmethod
    def _suffix(tier: Tier) -> tuple[str, bool]:
        """The end of a tier's state key (to which a key-scoped tier adds the key id),
        and whether it is key-scoped."""
        sig = f"{_KINDS[tier.code]}:{tier.name}.{tier.limit}.{tier.window}"
        if tier.algorithm == "gcra":
            sig += f".{tier.capacity}"
        scoped = tier.scope == "key"
        return (sig + ":" if scoped else sig), scoped

    def _tiers(self, policy: Policy, op: OperationPlan) -> tuple[str, tuple[tuple[str, bool], ...]]:
        """An operation's tiers as check.lua's ``n, P, R`` (Lua text) and its key suffixes."""
        params: list[str] = []
        suffixes = []
        for tier in op.tiers:
            suffix = self._suffix(tier)
            suffixes.append(suffix)
            params.append(str(int(tier.code) + (10 if tier.shadow or policy.shadow else 0)))
            if tier.algorithm == "gcra":
                tau = int(tier.capacity * tier.interval_us)
                params += [str(int(tier.interval_us)), str(tau), "0"]
            else:
                params += [str(int(tier.limit)), str(int(tier.window_us))]
                # The log lives until its newest entry leaves the window (text: it
                # goes to SET ... PX as it is).
                params.append(
                    f"'{int(-(-tier.window_us // 1000) + self._grace)}'"
                    if tier.algorithm == "sliding_log"
                    else "0"
                )
        # The reply's format: 8-byte integers, 7 of the head and 3 per tier.
        reply = "i8" * (7 + 3 * len(op.tiers))
        return f"{len(op.tiers)}, {{{', '.join(params)}}}, '<{reply}'", tuple(suffixes)

    def _compile(self, plan: Plan) -> _Compiled:
        """Compile every operation of ``plan``'s policy: a check script per distinct
        tier set, and one batch script holding all of them."""
        policy = plan.policy
        # Integers and booleans only: nothing from outside reaches the scripts' text.
        head = (
            f"local grace, allowance, shadow = {int(self._grace)}, "
            f"{int(policy.credits.allowance_micro)}, {'true' if policy.shadow else 'false'}\n"
        )
        ops = [policy.plan_for(name) for name in policy.operations]
        if plan.op not in ops:
            ops.append(plan.op)
        tiers = {op: self._tiers(policy, op) for op in ops}
        sets = {lua: str(i) for i, lua in enumerate(dict.fromkeys(t for t, _ in tiers.values()), 1)}
        table = ", ".join(f"{{{lua}}}" for lua in sets)
        batch = _script("check+check_many", f"{head}local T = {{{table}}}\n").sha
        compiled = None
        for op, (lua, suffixes) in tiers.items():
            sha = _script("check+check_one", f"{head}local n, P, R = {lua}\n").sha
            self._compiled[op] = _Compiled(sha, suffixes, batch, sets[lua])
            if op is plan.op:
                compiled = self._compiled[op]
        assert compiled is not None
        return compiled

    def _now(self) -> int | str:
        clock = self._clock
        return "" if clock is None else clock_us(clock())

    def _month(self, now: int | str) -> tuple[int, int]:
        """The month the script will most likely find (it checks, and works it out
        itself when wrong): saves it the calendar arithmetic on nearly every check."""
        t = round(time.time() * _US) if now == "" else now
        period = self._period
        if not period[0] <= t < period[1]:  # type: ignore[operator]
            period = self._period = month_bounds(t)  # type: ignore[arg-type]
        return period

    # -- check -------------------------------------------------------------------------

    def check(self, plan: Plan, *, dry: bool = False) -> tuple[Command, str]:
        """The ``EVALSHA`` of one check, and the charge id it will carry if admitted
        (``dry``: of a peek, which writes nothing and carries none)."""
        compiled = self._compiled.get(plan.op)
        if compiled is None:
            compiled = self._compile(plan)
        base = self.base(plan.org, plan.mode)
        key = plan.key
        keys = [base + s + key if scoped else base + s for s, scoped in compiled.suffixes]
        keys.append(base + "cr")
        keys.append(base + "al")
        if plan.idem is not None:
            keys.append(base + "id:" + plan.idem)
        charge = "" if dry else new_charge_id()
        now = self._now()
        start, end = self._month(now)
        cmd = [
            "EVALSHA",
            compiled.sha,
            len(keys),
            *keys,
            now,
            plan.cost,
            "" if plan.idem is None else charge,  # (only an idempotency record keeps it)
            f"q|{plan.op.name}|{key}",
            start,
            end,
        ]
        if dry:
            cmd.append("1")
        return cmd, charge

    def outcome(self, plan: Plan, reply: Any, charge: str) -> Outcome:
        """The :data:`Outcome` of one check's reply (raises on an idempotency conflict):
        8-byte integers packed in one string (see check.lua), or a replay's table."""
        if not isinstance(reply, bytes):
            return self._replay(plan, reply[1])
        head, retry, now, reset, charged, balance, end = _HEAD.unpack_from(reply)
        # (each tier's three integers as one tuple, straight from the bytes)
        tiers = tuple(_TIER.iter_unpack(reply[56:]))
        if head == 1:
            return Outcome(True, 0, now, 0, tiers, charged, balance, end, charge, False)
        return Outcome(False, retry, now, reset, unspent(tiers), 0, balance, end, "", False)

    def _replay(self, plan: Plan, record: Any) -> Outcome:
        try:
            head, charge, pair = _text(record).split("\n", 2)
            operation, key = pair.split("|", 1)
            nums = [int(x) for x in head.split()]
            expires, now, cost, balance, end = nums[:5]
            t = nums[5:]
            if len(t) % 3:
                raise ValueError("tier count")
        except ValueError:
            raise StateError("redis holds an idempotency record meterkit did not write") from None
        tiers = tuple(zip(t[0::3], t[1::3], t[2::3], strict=False))
        first = Outcome(True, 0, now, 0, tiers, cost, balance, end, charge, False)
        return replay(plan, (expires, key, operation, cost, first))

    def check_many(
        self, plans: Sequence[Plan], slot: Callable[[str], int] | None = None
    ) -> tuple[Iterator[Command], list[Sent]]:
        """The checks' commands, made as they are consumed (so that the first can run
        while the rest are made), and the list that says, command by command, whose
        replies they bring.

        A command is one ``EVALSHA`` of the policy's batch script for up to
        :data:`_BATCH` requests in a row of one policy (and on Cluster, one hash slot,
        given by ``slot`` of an organization's key base: a script's keys share one), or
        the plain check script when a group holds one request. Requests of one slot
        keep their order; requests of different slots share no key.
        """
        groups: dict[int, list[int]] = {}
        if slot is None:
            groups[0] = list(range(len(plans)))
        else:
            for i, plan in enumerate(plans):
                groups.setdefault(slot(self.base(plan.org, plan.mode)), []).append(i)
        sent: list[Sent] = []

        def commands() -> Iterator[Command]:
            for indexes in groups.values():
                run: list[int] = []
                script = ""
                for i in indexes:
                    batch = self._batch_of(plans[i])
                    if run and (len(run) == _BATCH or batch != script):
                        yield self._batch(plans, run, sent)
                        run = []
                    run.append(i)
                    script = batch
                if run:
                    yield self._batch(plans, run, sent)

        return commands(), sent

    def _batch_of(self, plan: Plan) -> str:
        compiled = self._compiled.get(plan.op)
        if compiled is None:
            compiled = self._compile(plan)
        return compiled.batch

    def _batch(self, plans: Sequence[Plan], run: list[int], sent: list[Sent]) -> Command:
        if len(run) == 1:
            cmd, charge = self.check(plans[run[0]])
            sent.append((run, [charge], False))
            return cmd
        keys: list[str] = []
        args: list[Any] = []
        charges: list[str] = []
        compiled = self._compiled
        now = self._now()
        for i in run:
            plan = plans[i]
            op = compiled[plan.op]
            base = self.base(plan.org, plan.mode)
            key = plan.key
            keys += [base + s + key if scoped else base + s for s, scoped in op.suffixes]
            keys.append(base + "cr")
            keys.append(base + "al")
            charge = new_charge_id()
            charges.append(charge)
            if plan.idem is None:
                tier_set, sent_charge = op.tier_set, ""  # (only an idempotency record keeps it)
            else:
                keys.append(base + "id:" + plan.idem)
                tier_set, sent_charge = "-" + op.tier_set, charge
            if i != run[0]:
                now = self._now()
            args += (tier_set, now, plan.cost, sent_charge, f"q|{plan.op.name}|{key}")
        start, end = self._month(now)
        sent.append((run, charges, True))
        sha = compiled[plans[run[0]].op].batch
        return ["EVALSHA", sha, len(keys), *keys, start, end, *args]

    def outcomes(
        self, plans: Sequence[Plan], sent: Sequence[Sent], replies: Sequence[Any]
    ) -> list[Outcome | MeterkitError]:
        """Each request's outcome, or the meterkit error of that request alone."""
        results: list[Outcome | MeterkitError] = [None] * len(plans)  # type: ignore[list-item]
        for entry, reply in zip(sent, replies, strict=True):
            self.decode(plans, entry, reply, results)
        return results

    def decode(
        self,
        plans: Sequence[Plan],
        entry: Sent,
        reply: Any,
        results: list[Outcome | MeterkitError],
    ) -> None:
        """Put the outcomes (or errors) of one command's reply in ``results``."""
        indexes, charges, batch = entry
        if not batch:
            items = [reply]
        elif isinstance(reply, BaseException):
            items = [reply] * len(indexes)  # the batch did not run at all
        else:
            items = reply
        for i, charge, item in zip(indexes, charges, items, strict=True):
            if isinstance(item, BaseException):
                results[i] = translate(item)
                continue
            try:
                results[i] = self.outcome(plans[i], item, charge)
            except MeterkitError as exc:
                results[i] = exc

    # -- refunds, usage, allowances ------------------------------------------------------

    def refund(self, plan: Plan, outcome: Outcome) -> Command | None:
        """The refund's ``EVALSHA``, or None when there is nothing to refund."""
        charge = outcome.charge_id
        if not outcome.allowed or not charge:
            return None
        base = self.base(plan.org, plan.mode)
        keys = [base + "cr"]
        if plan.idem is not None:
            keys.append(base + "id:" + plan.idem)
        start, _ = month_bounds(outcome.now)
        field = f"q|{plan.op.name}|{plan.key}"
        return [
            "EVALSHA",
            _REFUND.sha,
            len(keys),
            *keys,
            self._now(),
            start,
            charge,
            outcome.charged,
            field,
        ]

    def reset_limits(self, policy: Policy, org: str, mode: str, key: str | None) -> Command | None:
        """The ``DEL`` of the state keys :meth:`RedisBackend.reset_limits` forgets (all
        in the organization's slot), or None when no tier has that scope."""
        base = self.base(org, mode)
        keys = []
        for tier in policy.tiers:
            suffix, scoped = self._suffix(tier)
            if scoped == (key is not None):
                keys.append(base + suffix + key if key is not None else base + suffix)
        return ["DEL", *keys] if keys else None

    def usage(self, org: str, mode: str) -> Command:
        base = self.base(org, mode)
        return ["EVALSHA", _USAGE.sha, 2, base + "cr", base + "al", self._now()]

    def raw_usage(self, policy: Policy, reply: Any) -> RawUsage:
        """The usage tuple of a usage script's reply (see :data:`RawUsage`)."""
        start, end, override, flat = reply
        try:
            fields = dict(zip(flat[0::2], flat[1::2], strict=False))
            allowance = policy.credits.allowance_micro if override is None else int(override)
            head = fields.get(b"h")
            if head is None:
                return start, end, allowance, 0, 0, {}
            period, used, topup, _ = _ACCOUNT_HEAD.unpack(head)
            if period != start:
                return start, end, allowance, 0, 0, {}
            pairs: dict[tuple[str, str], list[int]] = {}
            for name, value in fields.items():
                if name[:2] == b"q|":
                    operation, key = _text(name[2:]).split("|", 1)
                    pairs[(key, operation)] = list(_ACCOUNT_PAIR.unpack(value))
            requests = sum(r for r, _ in pairs.values())
            return start, end, allowance + topup, used, requests, pairs
        except (ValueError, struct.error):
            raise StateError("redis holds an account meterkit did not write") from None

    def set_allowance(self, org: str, mode: str, micro: int | None) -> Command:
        base = self.base(org, mode)
        value = "" if micro is None else micro
        return ["EVALSHA", _ALLOWANCE.sha, 2, base + "al", base + "cr", value]

    def top_up(self, org: str, mode: str, micro: int) -> Command:
        base = self.base(org, mode)
        return ["EVALSHA", _TOPUP.sha, 2, base + "cr", base + "al", self._now(), micro, self._grace]


_REFUND = _script("refund")
_USAGE = _script("usage")
_TOPUP = _script("topup")
_ALLOWANCE = _script("allowance")


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


class _Pool:
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
            conn.send_packed_command((_pack(cmd),))
            try:
                return conn.read_response(disable_decoding=True)
            except self._noscript:
                conn.send_packed_command((_pack(_as_eval(cmd)),))
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
            again = self._pipeline([_as_eval(sent[i]) for i in missing], [], None)
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
                packed = _pack(cmd)
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


class _Cluster:
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
            return self.client.execute_command(*cmd, **_RAW)
        except self._noscript:
            return self.client.execute_command(*_as_eval(cmd), **_RAW)

    def many(self, commands: Iterable[Command], on_reply: OnReply | None = None) -> list[Any]:
        """Every command's reply (or the exception it met), in order (``on_reply`` as
        :meth:`_Pool.many`'s, called once all are in)."""
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


class _AsyncPool:
    """:class:`_Pool` for asyncio, pipelining on its own: commands issued while the
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
            return await self._submit(_pack(cmd))
        except self._noscript:
            return await self._submit(_pack(_as_eval(cmd)))

    async def many(self, commands: Iterable[Command]) -> list[Any]:
        cmds = list(commands)
        replies = await self._gather(cmds)
        missing = [i for i, r in enumerate(replies) if isinstance(r, self._noscript)]
        if missing:
            again = await self._gather([_as_eval(cmds[i]) for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _gather(self, cmds: list[Command]) -> list[Any]:
        futures = [self._submit(_pack(cmd)) for cmd in cmds]
        replies = list(await asyncio.gather(*futures, return_exceptions=True))
        for reply in replies:
            if isinstance(reply, BaseException) and not isinstance(reply, self._response_error):
                raise reply
        return replies

    async def info_memory(self) -> list[Any]:
        """See :meth:`_Pool.info_memory`."""
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


class _AsyncCluster:
    """:class:`_Cluster` for asyncio: one redis-py cluster pipeline per node, all at
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
            return await self.client.execute_command(*cmd, **_RAW)
        except self._noscript:
            return await self.client.execute_command(*_as_eval(cmd), **_RAW)

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
            pipe.execute_command(*cmd, **_RAW)
        return list(await pipe.execute(raise_on_error=False))

    async def info_memory(self) -> list[Any]:
        """See :meth:`_Cluster.info_memory`."""
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


def _sync_transport(client: Any) -> _Pool | _Cluster:
    import redis
    from redis.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        return _Cluster(client)
    if isinstance(client, redis.Redis):
        return _Pool(client.connection_pool)
    if isinstance(client, redis.ConnectionPool):
        return _Pool(client)
    raise ConfigurationError(
        "RedisBackend takes a redis.Redis, redis.RedisCluster or redis.ConnectionPool, "
        f"not {type(client).__name__}; for asyncio clients use AsyncRedisBackend",
        "client",
    )


def _async_transport(client: Any) -> _AsyncPool | _AsyncCluster:
    import redis.asyncio as aredis
    from redis.asyncio.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        return _AsyncCluster(client)
    if isinstance(client, aredis.Redis):
        return _AsyncPool(client.connection_pool)
    if isinstance(client, aredis.ConnectionPool):
        return _AsyncPool(client)
    raise ConfigurationError(
        "AsyncRedisBackend takes a redis.asyncio.Redis, redis.asyncio.RedisCluster or "
        f"redis.asyncio.ConnectionPool, not {type(client).__name__}",
        "client",
    )


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


def _refuse_eviction(io: _Pool | _Cluster) -> None:
    """Raise :class:`ConfigurationError` if the server, or any Cluster primary, may
    evict keys (see :mod:`meterkit.backends.redis.eviction`)."""
    try:
        infos = io.info_memory()
    except Exception as exc:
        raise _unreadable(exc) from exc
    error = eviction_error(infos)
    if error is not None:
        raise error


async def _refuse_eviction_async(io: _AsyncPool | _AsyncCluster) -> None:
    """:func:`_refuse_eviction` for asyncio."""
    try:
        infos = await io.info_memory()
    except Exception as exc:
        raise _unreadable(exc) from exc
    error = eviction_error(infos)
    if error is not None:
        raise error


def refuse_eviction(client: Any) -> None:
    """:func:`_refuse_eviction` for a redis-py client (the key stores' check)."""
    _refuse_eviction(_sync_transport(client))


async def refuse_eviction_async(client: Any) -> None:
    """:func:`refuse_eviction` for a redis-py asyncio client."""
    await _refuse_eviction_async(_async_transport(client))


class RedisBackend:
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
    """

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "mk",
        clock: Clock | None = None,
        clock_skew: float = 60.0,
        allow_eviction: bool = False,
    ) -> None:
        self._codec = _Codec(prefix, clock, clock_skew)
        self._io = _sync_transport(client)
        self._owned = False  # backend_from_url hands its client over
        self._unverified = not _allowing(allow_eviction)
        if self._unverified:
            # (Redis down: checked again before the first command that reaches it)
            with contextlib.suppress(BackendUnavailable):
                self._verify()

    def _verify(self) -> None:
        _refuse_eviction(self._io)
        self._unverified = False

    def __repr__(self) -> str:
        kind = "cluster" if isinstance(self._io, _Cluster) else "standalone"
        return f"RedisBackend({kind}, prefix={self._codec.prefix!r})"

    @property
    def prefix(self) -> str:
        return self._codec.prefix

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

    def peek(self, plan: Plan) -> Outcome:
        """What :meth:`apply` would answer for ``plan`` now: the same script, which
        writes nothing (one ``EVALSHA``)."""
        cmd, _ = self._codec.check(plan, dry=True)
        return self._codec.outcome(plan, self._run(cmd), "")

    def reset_limits(
        self, policy: Policy, org: str, mode: str = "live", key: str | None = None
    ) -> None:
        """See :meth:`MemoryBackend.reset_limits` (one ``DEL``)."""
        cmd = self._codec.reset_limits(policy, org, mode, key)
        if cmd is not None:
            self._run(cmd)

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

    def _run(self, cmd: Command) -> Any:
        if self._unverified:
            self._verify()
        try:
            return self._io.call(cmd)
        except Exception as exc:
            raise translate(exc) from exc

    def refund(self, plan: Plan, outcome: Outcome) -> bool:
        """Return an admitted outcome's credits once; False if already refunded or gone."""
        cmd = self._codec.refund(plan, outcome)
        return cmd is not None and bool(self._run(cmd))

    def usage(self, policy: Policy, org: str, mode: str = "live") -> RawUsage:
        """This month's credits and requests of ``org``, per (key, operation)."""
        return self._codec.raw_usage(policy, self._run(self._codec.usage(org, mode)))

    def set_allowance(self, org: str, mode: str, micro: int | None) -> None:
        """Set ``org``'s monthly allowance (None: back to the policy's). Kept without TTL."""
        self._run(self._codec.set_allowance(org, mode, micro))

    def top_up(self, org: str, mode: str, micro: int) -> None:
        """Add credits to ``org``'s current month only (no rollover)."""
        if not self._run(self._codec.top_up(org, mode, micro)):
            raise top_up_too_large()

    def close(self) -> None:
        """Close the client if this backend built it (a client you passed stays open)."""
        if self._owned:
            self._io.close()


class AsyncRedisBackend:
    """:class:`RedisBackend` for asyncio: the same scripts, keys and options.

    ``client`` is a ``redis.asyncio.Redis``, ``redis.asyncio.RedisCluster`` or
    ``redis.asyncio.ConnectionPool`` (or use :func:`meterkit.async_backend_from_url`).
    """

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "mk",
        clock: Clock | None = None,
        clock_skew: float = 60.0,
        allow_eviction: bool = False,
    ) -> None:
        self._codec = _Codec(prefix, clock, clock_skew)
        self._io = _async_transport(client)
        self._owned = False
        # (checked before the first command, as a constructor cannot wait for Redis)
        self._unverified = not _allowing(allow_eviction)
        # Checks of this loop iteration, not yet sent, with their callers' futures.
        self._queue: list[tuple[Plan, asyncio.Future[Outcome]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        kind = "cluster" if isinstance(self._io, _AsyncCluster) else "standalone"
        return f"AsyncRedisBackend({kind}, prefix={self._codec.prefix!r})"

    @property
    def prefix(self) -> str:
        return self._codec.prefix

    async def apply(self, plan: Plan) -> Outcome:
        """See :meth:`RedisBackend.apply`.

        Checks that tasks start in the same turn of the event loop go to Redis
        together, as one batch script call per :data:`_BATCH` of them (see
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
        if len(queue) >= _BATCH:
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

    async def _verify(self) -> None:
        await _refuse_eviction_async(self._io)
        self._unverified = False

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
        """See :meth:`RedisBackend.peek`."""
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

    async def _run(self, cmd: Command) -> Any:
        if self._unverified:
            await self._verify()
        try:
            return await self._io.call(cmd)
        except Exception as exc:
            raise translate(exc) from exc

    async def refund(self, plan: Plan, outcome: Outcome) -> bool:
        """See :meth:`RedisBackend.refund`."""
        cmd = self._codec.refund(plan, outcome)
        return cmd is not None and bool(await self._run(cmd))

    async def usage(self, policy: Policy, org: str, mode: str = "live") -> RawUsage:
        """See :meth:`RedisBackend.usage`."""
        return self._codec.raw_usage(policy, await self._run(self._codec.usage(org, mode)))

    async def set_allowance(self, org: str, mode: str, micro: int | None) -> None:
        """See :meth:`RedisBackend.set_allowance`."""
        await self._run(self._codec.set_allowance(org, mode, micro))

    async def top_up(self, org: str, mode: str, micro: int) -> None:
        """See :meth:`RedisBackend.top_up`."""
        if not await self._run(self._codec.top_up(org, mode, micro)):
            raise top_up_too_large()

    async def close(self) -> None:
        """See :meth:`RedisBackend.close`."""
        for _, waiter in self._queue:
            if not waiter.done():
                waiter.set_exception(BackendUnavailable("the backend was closed"))
        self._queue = []
        if self._owned:
            await self._io.close()
