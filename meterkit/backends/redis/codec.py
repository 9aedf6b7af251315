"""The sans-I/O codec of the Redis backends: plans to commands, replies to outcomes.

Nothing here does I/O. A check is one Lua script (``lua/check.lua``) run by one
``EVALSHA``: every tier, the credit debit, the idempotency record and the usage
counters, all or nothing. An operation's fixed parameters are the script's first
lines (one script per distinct set of tiers), so that Redis does not parse them on
every check. ``check_many`` sends the policy's batch script instead (the same check,
run for each request of up to :data:`BATCH` in turn, each all or nothing on its own):
one ``EVALSHA`` for many requests, which saves Redis a command, a reply and a
``TIME`` per request. Refunds, usage reports, top-ups and allowance overrides are a
script each (see :mod:`~meterkit.backends.redis.scripts`).

:class:`Codec` is what :class:`~meterkit.backends.redis.backend.RedisBackend` and
:class:`~meterkit.backends.redis.backend.AsyncRedisBackend` share: plans to commands,
replies to :class:`~meterkit.core.outcome.Outcome`; the transports only move bytes.

Key layout (``mk`` is the configurable prefix; ``{…}`` is the organization, the
Cluster hash tag, with ``%``, ``{`` and ``}`` percent-encoded; test mode inserts
``test:`` after the tag; ids are public ids, never secrets)::

    mk:{org}:fw:<tier>.<limit>.<window s>[:<key id>]     fixed window: STRING, 16 B
    mk:{org}:sw:<tier>.<limit>.<window s>[:<key id>]     sliding window: STRING, 24 B
    mk:{org}:gc:<tier>.<limit>.<window s>.<burst>[:<key id>]   gcra: the TAT in µs
    mk:{org}:sl:<tier>.<limit>.<window s>[:<key id>]     sliding log: STRING, 8 B per µs
    mk:{org}:cr                                          the month's account: HASH
    mk:{org}:al                                          allowance override (no TTL)
    mk:{org}:pl                                          plans and deal: HASH (no TTL)
    mk:{org}:id:<idempotency key>                        first decision, 24 h
    mk:{org}:rs:<n>:<key id>:<idempotency key>           the HTTP gate's response record
                                                         (n: the key id's length), 24 h
    mk:ledger  or  mk:{ledger.<n>}:ledger                the ledger stream (ledger=True):
                                                         standalone, or a Cluster slot's

A window is 8-byte little-endian integers: its id, its count and (sliding) the
count of the window before. Tier names hold no ``:``; the key id, when the tier
counts keys, is the last part. Org-scoped tiers end after the tier part. A tier's key
is named after the policy's own tier (the default plan's numbers) under every
customer plan: a customer moved to another plan keeps its counts. Every key but the
allowance override and the plans expires when its state can no longer matter (window
end, TAT, last log entry plus the window, month end, 24 h), padded by ``clock_skew``
when ``clock=`` is given. See docs/redis.md and docs/plans.md.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from meterkit.backends.charge_ids import new_charge_id
from meterkit.backends.redis.errors import translate
from meterkit.backends.redis.scripts import Command, script
from meterkit.core.idempotency import BUSY, DONE, REUSED, RUN, Claim
from meterkit.core.outcome import Outcome, RawUsage, replay, unspent
from meterkit.core.plan import Plan, clock_us, month_bounds
from meterkit.core.policy import DEFAULT_PLAN, enforces
from meterkit.errors import ConfigurationError, MeterkitError, StateError
from meterkit.ledger.events import deal_text
from meterkit.ledger.streams import stream_for

if TYPE_CHECKING:
    from meterkit.core.policy import Deal, OperationPlan, Policy, Tier

__all__ = ["BATCH", "Clock", "Codec", "Sent"]

Clock = Callable[[], float]
#: What one command of a batch brings: the indexes of its requests, their charge
#: ids, and whether it is the batch script (one reply per request) or a plain check.
Sent = tuple[list[int], list[str], bool]
_US = 1_000_000
#: A check's reply: 7 integers of the head, then 3 per tier (see check.lua).
_HEAD = struct.Struct("<7q")
_TIER = struct.Struct("<3q")
#: An account's 'h' (month start, used, top-ups, override or -1) and 'q|<op>|<key>'
#: (requests, µ-credits): see common.lua.
_ACCOUNT_HEAD = struct.Struct("<4q")
_ACCOUNT_PAIR = struct.Struct("<2q")
_KINDS = ("fw", "sw", "gc", "sl")  # by Tier.code
#: Requests per batch script call: enough to spread EVALSHA's own cost, few enough
#: that Redis runs other clients' commands in between and that a big check_many
#: still overlaps (the client makes a batch while Redis runs the one before).
BATCH = 50


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# -- the shared codec --------------------------------------------------------------------


class _Compiled:
    """What one operation's checks share: key suffixes, the check script (whose first
    lines hold the operation's fixed parameters, see check.lua), and the policy's
    batch script with the operation's tier set in it; the length of a reply under the
    default plan, and the tiers in force under each plan a reply names."""

    __slots__ = ("batch", "key_plan", "sha", "size", "suffixes", "tier_set", "variants")

    def __init__(
        self,
        sha: str,
        suffixes: tuple[tuple[str, bool], ...],
        batch: str,
        tier_set: str,
        key_plan: str | None = None,
    ) -> None:
        self.sha = sha
        self.suffixes = suffixes
        self.batch = batch
        self.tier_set = tier_set
        #: the key's plan that the operation's requests name (see Policy.keyed)
        self.key_plan = key_plan
        self.size = _HEAD.size + _TIER.size * len(suffixes)
        self.variants: dict[bytes, OperationPlan] = {}


class Codec:
    """Plans to commands and replies to outcomes: everything the two backends share."""

    __slots__ = (
        "_bases",
        "_clock",
        "_cluster",
        "_compiled",
        "_grace",
        "_period",
        "_streams",
        "ledger",
        "prefix",
    )

    def __init__(
        self,
        prefix: str,
        clock: Clock | None,
        clock_skew: float,
        *,
        ledger: bool = False,
        cluster: bool = False,
    ) -> None:
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
        if not isinstance(ledger, bool):
            raise ConfigurationError("ledger is True or False", "ledger")
        #: Whether money events are appended to the ledger streams (see meterkit.ledger).
        self.ledger = ledger
        self._cluster = cluster
        self._streams: dict[str, str] = {}

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

    def stream(self, base: str) -> str:
        """The ledger stream of the organization whose keys start with ``base``: one
        per hash slot on Cluster, one on a standalone server (see
        :mod:`meterkit.ledger.streams`)."""
        stream = self._streams.get(base)
        if stream is None:
            stream = stream_for(self.prefix, base, self._cluster)
            if len(self._streams) >= 65_536:
                self._streams.clear()
            self._streams[base] = stream
        return stream

    def _ledger(self, base: str) -> tuple[str, ...]:
        """The keys and arguments a money script adds for the ledger: the stream and a
        fresh event id, or nothing without a ledger."""
        if not self.ledger:
            return ()
        return (self.stream(base),)

    @staticmethod
    def _suffix(tier: Tier) -> tuple[str, bool]:
        """The end of a tier's state key (to which a key-scoped tier adds the key id),
        and whether it is key-scoped."""
        sig = f"{_KINDS[tier.code]}:{tier.name}.{tier.limit}.{tier.window}"
        if tier.algorithm == "gcra":
            sig += f".{tier.capacity}"
        scoped = tier.scope == "key"
        return (sig + ":" if scoped else sig), scoped

    def _params(self, policy: Policy, tier: Tier) -> list[str]:
        """A tier's four numbers in check.lua's ``P`` (Lua text)."""
        code = int(tier.code) + (0 if enforces(tier, policy.shadow) else 10)
        params = [str(code)]
        if tier.algorithm == "gcra":
            params += [str(int(tier.interval_us)), str(int(tier.tau_us)), "0"]
        else:
            params += [str(int(tier.limit)), str(int(tier.window_us))]
            # The log lives until its newest entry leaves the window (text: it goes to
            # SET ... PX as it is).
            params.append(
                f"'{int(-(-tier.window_us // 1000) + self._grace)}'"
                if tier.algorithm == "sliding_log"
                else "0"
            )
        return params

    def _tiers(self, policy: Policy, op: OperationPlan) -> tuple[str, tuple[tuple[str, bool], ...]]:
        """An operation's tiers as check.lua's ``n, P, R, I, V, S, M, F`` (Lua text) and
        its key suffixes."""
        params: list[str] = []
        suffixes = []
        for tier in op.tiers:
            suffixes.append(self._suffix(tier))
            params += self._params(policy, tier)
        # The reply's format: 8-byte integers, 7 of the head and 3 per tier.
        reply = "i8" * (7 + 3 * len(op.tiers))
        # The customer plans (see check.lua): their numbers packed in V (Lua text: every
        # byte escaped), where each starts in I, the tiers' scopes in S and windows in M.
        # Names and numbers only: nothing from outside reaches the scripts' text.
        index: list[str] = []
        packed = b""
        for name in policy.plans:
            limits = policy.limits_for(op, name)
            on = dict(zip(limits.on, limits.tiers, strict=True))
            numbers: list[int] = []
            for position, tier in enumerate(op.tiers):
                numbers += self._numbers(policy, on.get(position, tier), position not in on)
            numbers.append(limits.allowance)
            index.append(f"{name} {len(packed) + 1}")
            packed += struct.pack(f"<{len(numbers)}q", *numbers)
        plans = "'" + "".join(f"\\{b:03d}" for b in packed) + "'"
        lines = "\\n".join(index)
        scoped = "".join("1" if t.scope == "key" else "0" for t in op.tiers)
        windows = "\\n".join(f"{t.name} {int(t.window_us)}" for t in op.tiers)
        return (
            f"{len(op.tiers)}, {{{', '.join(params)}}}, '<{reply}', '\\n{lines}\\n', "
            f"{plans}, '{scoped}', '{windows}', '<{'i8' * (4 * len(op.tiers) + 1)}'",
            tuple(suffixes),
        )

    def _numbers(self, policy: Policy, tier: Tier, off: bool) -> list[int]:
        """A tier's four numbers in a customer plan's record of V (see check.lua)."""
        code = int(tier.code) + (0 if enforces(tier, policy.shadow) else 10) + (20 if off else 0)
        if tier.algorithm == "gcra":
            return [code, int(tier.interval_us), int(tier.tau_us), 0]
        ttl = (
            int(-(-tier.window_us // 1000) + self._grace) if tier.algorithm == "sliding_log" else 0
        )
        return [code, int(tier.limit), int(tier.window_us), ttl]

    def _compile(self, plan: Plan) -> _Compiled:
        """Compile every operation of ``plan``'s policy: a check script per distinct
        tier set, and one batch script holding all of them."""
        policy = plan.policy
        # Integers and booleans only: nothing from outside reaches the scripts' text.
        percents = policy.credits.alert_percents
        alerts = f"{{{', '.join(str(int(p)) for p in percents)}}}" if percents else "false"
        head = (
            f"local grace, allowance, shadow, A = {int(self._grace)}, "
            f"{int(policy.credits.allowance_micro)}, {'true' if policy.shadow else 'false'}, "
            f"{alerts}\n"
            # the ledger stream is a check's last key (see check.lua)
            f"local ledger = {'KEYS[#KEYS]' if self.ledger else 'false'}\n"
        )
        ops = [policy.plan_for(name) for name in policy.operations]
        if plan.op not in ops:
            ops.append(plan.op)
        tiers = {op: self._tiers(policy, op) for op in ops}
        sets = {lua: str(i) for i, lua in enumerate(dict.fromkeys(t for t, _ in tiers.values()), 1)}
        table = ", ".join(f"{{{lua}}}" for lua in sets)
        batch = script("check+check_many", f"{head}local T = {{{table}}}\n").sha
        compiled = None
        for op, (lua, suffixes) in tiers.items():
            sha = script("check+check_one", f"{head}local n, P, R, I, V, S, M, F = {lua}\n").sha
            self._compiled[op] = _Compiled(sha, suffixes, batch, sets[lua], op.key_plan)
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
        keys.append(base + "pl")
        if plan.idem is not None:
            keys.append(base + "id:" + plan.idem)
        ledger = self.ledger
        if ledger:
            keys.append(self.stream(base))
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
            # (only an idempotency record and a ledger event keep it)
            charge if ledger or plan.idem is not None else "",
            f"q|{plan.op.name}|{key}",
            start,
            end,
        ]
        if compiled.key_plan is not None or dry:
            cmd.append(compiled.key_plan or "")
        if dry:
            cmd.append("1")
        return cmd, charge

    def outcome(self, plan: Plan, reply: Any, charge: str) -> Outcome:
        """The :data:`Outcome` of one check's reply (raises on an idempotency conflict):
        8-byte integers packed in one string (see check.lua), then the plans in force
        if any; or a replay's table."""
        if not isinstance(reply, bytes):
            return self._replay(plan, reply[1])
        limits = plan.op
        alerts: tuple[int, ...] = ()
        try:
            head, retry, now, reset, charged, balance, end = _HEAD.unpack_from(reply)
            size = _HEAD.size + _TIER.size * len(limits.tiers)
            if len(reply) == size:
                # (each tier's three integers as one tuple, straight from the bytes)
                tiers = tuple(_TIER.iter_unpack(reply[56:]))
            else:
                rest = reply[size:]
                if rest[:1] == b"!":
                    # '!<reached before> <reached now>': the credit alerts reached first
                    mark, newline, rest = rest[1:].partition(b"\n")
                    before, reached = map(int, mark.split(b" "))
                    alerts = plan.policy.credits.alert_percents[before:reached]
                    rest = newline + rest
                if rest:
                    limits = self._limits(plan, rest[1:])
                every = tuple(_TIER.iter_unpack(reply[56:size]))
                tiers = tuple([every[i] for i in limits.on]) if rest else every
        except (struct.error, ValueError):
            raise StateError(
                "redis answered a check with something meterkit did not write"
            ) from None
        if head == 1:
            return Outcome(
                True, 0, now, 0, tiers, charged, balance, end, charge, False, limits, alerts
            )
        return Outcome(
            False, retry, now, reset, unspent(tiers), 0, balance, end, "", False, limits, alerts
        )

    def _limits(self, plan: Plan, named: bytes) -> OperationPlan:
        """The tiers in force that a reply names (``<key plan>\\n<plan>[\\n<deal>]``)."""
        compiled = self._compiled.get(plan.op)
        if compiled is None:
            compiled = self._compile(plan)
        found = compiled.variants.get(named)
        if found is None:
            key_plan, org_plan, deal = parse_plans(_text(named))
            found = plan.policy.limits_for(plan.op, org_plan, key_plan, deal)
            if len(compiled.variants) >= 4096:
                compiled.variants.clear()
            compiled.variants[named] = found
        return found

    def _replay(self, plan: Plan, record: Any) -> Outcome:
        try:
            head, charge, pair, *named = _text(record).split("\n", 3)
            operation, key = pair.split("|", 1)
            nums = [int(x) for x in head.split()]
            expires, now, cost, balance, end = nums[:5]
            t = nums[5:]
            if len(t) % 3:
                raise ValueError("tier count")
        except ValueError:
            raise StateError("redis holds an idempotency record meterkit did not write") from None
        tiers = tuple(zip(t[0::3], t[1::3], t[2::3], strict=False))
        first = Outcome(True, 0, now, 0, tiers, cost, balance, end, charge, False, plan.op)
        # (raises if this is another request: then the plans it names are not this one's)
        outcome = replay(plan, (expires, key, operation, cost, first))
        if not named:
            return outcome
        try:
            limits = self._limits(plan, named[0].encode("utf-8"))
            tiers = tuple([tiers[i] for i in limits.on])
        except IndexError:
            raise StateError("redis holds an idempotency record meterkit did not write") from None
        return outcome._replace(tiers=tiers, limits=limits)

    def check_many(
        self, plans: Sequence[Plan], slot: Callable[[str], int] | None = None
    ) -> tuple[Iterator[Command], list[Sent]]:
        """The checks' commands, made as they are consumed (so that the first can run
        while the rest are made), and the list that says, command by command, whose
        replies they bring.

        A command is one ``EVALSHA`` of the policy's batch script for up to
        :data:`BATCH` requests in a row of one policy (and on Cluster, one hash slot,
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
                current = ""
                for i in indexes:
                    batch = self._batch_of(plans[i])
                    if run and (len(run) == BATCH or batch != current):
                        yield self._batch(plans, run, sent)
                        run = []
                    run.append(i)
                    current = batch
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
        ledger = self.ledger
        for i in run:
            plan = plans[i]
            op = compiled[plan.op]
            base = self.base(plan.org, plan.mode)
            key = plan.key
            keys += [base + s + key if scoped else base + s for s, scoped in op.suffixes]
            keys.append(base + "cr")
            keys.append(base + "al")
            keys.append(base + "pl")
            charge = new_charge_id()
            charges.append(charge)
            if plan.idem is None:
                # (only an idempotency record and a ledger event keep it)
                tier_set, sent_charge = op.tier_set, charge if ledger else ""
            else:
                keys.append(base + "id:" + plan.idem)
                tier_set, sent_charge = "-" + op.tier_set, charge
            if op.key_plan is not None:
                tier_set += " " + op.key_plan
            if i != run[0]:
                now = self._now()
            args += (tier_set, now, plan.cost, sent_charge, f"q|{plan.op.name}|{key}")
        if ledger:
            # One stream for the batch: its requests share a hash slot (see check_many).
            first = plans[run[0]]
            keys.append(self.stream(self.base(first.org, first.mode)))
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
        keys += self._ledger(base)
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
            "1" if self.ledger else "",
        ]

    # -- the HTTP gate's responses of idempotency keys ------------------------------------

    def response_key(self, plan: Plan) -> str:
        """The key of ``plan``'s response record: per organization, mode, caller and
        idempotency key (the caller's id is prefixed by its length, so that no pair of
        ids can make another pair's name)."""
        key = plan.key
        return f"{self.base(plan.org, plan.mode)}rs:{len(key)}:{key}:{plan.idem}"

    def claim_response(
        self, plan: Plan, outcome: Outcome, fingerprint: str, token: str, lock_us: int
    ) -> Command:
        """The ``EVALSHA`` of a retry's claim (see ``lua/response.lua``)."""
        return self._response("claim", plan, outcome, fingerprint, token, lock_us)

    def keep_response(
        self, plan: Plan, outcome: Outcome, fingerprint: str, token: str, payload: bytes | None
    ) -> Command:
        """The ``EVALSHA`` that keeps a run's response (None: nothing) for its retries."""
        if payload is None:
            return self._response("keep", plan, outcome, fingerprint, token, "0", b"")
        return self._response("keep", plan, outcome, fingerprint, token, "1", payload)

    def _response(
        self, what: str, plan: Plan, outcome: Outcome, fingerprint: str, token: str, *tail: Any
    ) -> Command:
        key = self.response_key(plan)
        head = [what, self._now(), outcome.charge_id, outcome.now, fingerprint, token, self._grace]
        return ["EVALSHA", _RESPONSE.sha, 1, key, *head, *tail]

    @staticmethod
    def claimed(reply: Any) -> Claim:
        """The verdict of a claim's reply."""
        try:
            verdict = int(reply[0])
            if verdict == BUSY:
                return BUSY, int(reply[1])
            if verdict == DONE and isinstance(reply[1], bytes):
                return DONE, reply[1]
            if verdict in (RUN, REUSED) and len(reply) == 1:
                return verdict, None
        except (TypeError, ValueError, IndexError):
            pass
        raise StateError("redis answered a response claim with something meterkit did not write")

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
        return ["EVALSHA", _USAGE.sha, 3, base + "cr", base + "al", base + "pl", self._now()]

    def raw_usage(self, policy: Policy, reply: Any) -> RawUsage:
        """The usage tuple of a usage script's reply (see :data:`RawUsage`)."""
        start, end, override, flat, record = reply
        try:
            org_plan = None if record is None else parse_record(_text(record))[0]
            plan = org_plan if org_plan is not None and org_plan in policy.plans else DEFAULT_PLAN
            fields = dict(zip(flat[0::2], flat[1::2], strict=False))
            allowance = policy.allowance_of(org_plan) if override is None else int(override)
            head = fields.get(b"h")
            if head is None:
                return start, end, allowance, 0, 0, {}, plan
            period, used, topup, _ = _ACCOUNT_HEAD.unpack_from(head)
            if period != start:
                return start, end, allowance, 0, 0, {}, plan
            pairs: dict[tuple[str, str], list[int]] = {}
            for name, value in fields.items():
                if name[:2] == b"q|":
                    operation, key = _text(name[2:]).split("|", 1)
                    pairs[(key, operation)] = list(_ACCOUNT_PAIR.unpack(value))
            requests = sum(r for r, _ in pairs.values())
            return start, end, allowance + topup, used, requests, pairs, plan
        except (ValueError, struct.error):
            raise StateError("redis holds an account meterkit did not write") from None

    def _event(self, base: str) -> tuple[list[str], list[Any]]:
        """The stream key and the (event id, time) arguments a script that changes
        money or plans adds with a ledger; nothing without one."""
        if not self.ledger:
            return [], ["", ""]
        return [self.stream(base)], [new_charge_id(), self._now()]

    def set_allowance(self, org: str, mode: str, micro: int | None) -> Command:
        base = self.base(org, mode)
        value = "" if micro is None else micro
        keys, event = self._event(base)
        keys = [base + "al", base + "cr", *keys]
        return ["EVALSHA", _ALLOWANCE.sha, len(keys), *keys, value, *event]

    def top_up(self, org: str, mode: str, micro: int) -> Command:
        base = self.base(org, mode)
        keys, event = self._event(base)
        keys = [base + "cr", base + "al", base + "pl", *keys]
        return ["EVALSHA", _TOPUP.sha, len(keys), *keys, self._now(), micro, self._grace, event[0]]

    # -- plans -----------------------------------------------------------------------------

    def set_plan(self, org: str, mode: str, plan: str | None, key: str | None) -> Command:
        """Put ``org`` (or its ``key``) on ``plan``; None takes it off (see assign.lua)."""
        base = self.base(org, mode)
        keys, event = self._event(base)
        keys = [base + "pl", base + "cr", *keys]
        if key is None:
            value = "" if plan is None or plan == DEFAULT_PLAN else plan
            return ["EVALSHA", _ASSIGN.sha, len(keys), *keys, "plan", value, "", *event]
        value = plan or ""
        return ["EVALSHA", _ASSIGN.sha, len(keys), *keys, "key", value, key, *event]

    def set_limits(self, org: str, mode: str, deal: Deal) -> Command:
        """Give ``org`` its deal (``()`` takes it away)."""
        base = self.base(org, mode)
        keys, event = self._event(base)
        keys = [base + "pl", base + "cr", *keys]
        return ["EVALSHA", _ASSIGN.sha, len(keys), *keys, "deal", deal_text(deal), "", *event]

    def assignment(self, org: str, mode: str, key: str | None) -> Command:
        """The ``HMGET`` of ``org``'s plan record and ``key``'s plan."""
        base = self.base(org, mode)
        return ["HMGET", base + "pl", "o", "k|" + (key or "")]

    @staticmethod
    def parse_assignment(reply: Any, key: str | None) -> tuple[str | None, str | None, Deal]:
        """``(org plan, key plan, deal)`` from :meth:`assignment`'s reply."""
        record, key_plan = reply
        org_plan, deal = (None, ()) if record is None else parse_record(_text(record))
        return org_plan, _text(key_plan) if key is not None and key_plan else None, deal


def parse_record(record: str) -> tuple[str | None, Deal]:
    """An organization's plan and deal from its plan record (see assign.lua)."""
    plan, _, lines = record[1:].partition("\n")
    return plan or None, parse_deal(lines)


def parse_plans(named: str) -> tuple[str | None, str | None, Deal]:
    """``(key plan, org plan, deal)`` from what a check's reply names (see check.lua)."""
    key_plan, _, rest = named.partition("\n")
    plan, _, lines = rest.partition("\n")
    return key_plan or None, plan or None, parse_deal(lines)


def parse_deal(lines: str) -> Deal:
    """A deal from its lines ``<tier> <algorithm> <window µs> <limit> <burst>``."""
    if not lines:
        return ()
    try:
        deal = []
        for line in lines.split("\n"):
            name, code, window, limit, burst = line.split(" ")
            deal.append((name, int(code), int(window), int(limit), int(burst)))
    except ValueError:
        raise StateError("redis holds a plan record meterkit did not write") from None
    return tuple(deal)


_REFUND = script("refund")
_RESPONSE = script("response")
_USAGE = script("usage")
_TOPUP = script("topup")
_ALLOWANCE = script("allowance")
_ASSIGN = script("assign")
