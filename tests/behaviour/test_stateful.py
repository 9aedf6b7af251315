"""A Meter driven by Hypothesis against a small reference model written here.

The model keeps the admitted history per tier and identity, a ledger of charges and
refunds, allowances, top-ups and idempotency records, and derives every verdict,
``retry_after``, balance and usage figure from them. The clock starts two minutes
before a month ends, so month rollovers happen often.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from meterkit import (
    Category,
    CostTable,
    CreditPlan,
    InvalidRequestError,
    KeyUsage,
    MemoryBackend,
    Meter,
    Operation,
    OperationUsage,
    Policy,
    Tier,
)
from tests.behaviour.test_algorithms import admits, earliest
from tests.conftest import FakeClock

US = 1_000_000
HOUR = 3600 * US
START_US = 1_769_903_880 * US  # 2026-01-31T23:58:00Z
KEYS = {"k1": "org_a", "k2": "org_a", "k3": "org_b"}
ORGS = ("org_a", "org_b")
MODES = ("live", "test")
PRICES = {"items.list": 10_000, "items.create": 50_000}
ALLOWANCE = 2 * US
REASONS = {"rate_limited", "insufficient_credits"}

POLICY = Policy(
    [
        Tier("key-fixed", "key", "4 per 10 seconds", "fixed_window"),
        Tier("org-log", "org", "6 per 10 seconds", "sliding_log"),
        Tier("key-gcra", "key", "3 per 6 seconds", "gcra", burst=2),
        Tier(
            "org-window", "org", "5 per 10 seconds", "sliding_window", operations=("items.create",)
        ),
    ],
    CostTable(
        (Category("read", "0.01", "0.01"), Category("write", "0.03", "0.15")),
        (Operation("items.list", "read", "0.01"), Operation("items.create", "write", "0.05")),
    ),
    CreditPlan("2"),
)


def _month(us: int) -> tuple[int, int]:
    """[start, end) in µs of the UTC calendar month holding ``us``, computed independently."""
    day = datetime.fromtimestamp(us // US, tz=timezone.utc)
    start = calendar.timegm((day.year, day.month, 1, 0, 0, 0))
    days = calendar.monthrange(day.year, day.month)[1]
    return start * US, (start + days * 86400) * US


def _micro(text: str) -> int:
    return int(Decimal(text) * US)


def _credits(micro: int) -> Decimal:
    return Decimal(micro) / US


@dataclass
class Charge:
    """One admitted, charged request in the model's ledger."""

    mode: str
    org: str
    key: str
    op: str
    month: int
    cost: int
    refunded: bool = False


@dataclass
class Record:
    """The model's idempotency record: what the first request was and what it got."""

    expiry: int
    key: str
    op: str
    cost: int
    decision: Any


class MeterMachine(RuleBasedStateMachine):
    """Checks, retries, refunds, clock steps and allowances agree with the model throughout."""

    def __init__(self) -> None:
        super().__init__()
        self.t = START_US
        self.clock = FakeClock(START_US / US)
        self.meter = Meter(POLICY, MemoryBackend(clock=self.clock))
        self.history: dict[tuple[str, str, str], list[int]] = {}
        self.ledger: dict[str, Charge] = {}  # by charge id
        self.allowances: dict[tuple[str, str], int] = {}
        self.topups: dict[tuple[str, str, int], int] = {}
        self.records: dict[tuple[str, str, str], Record] = {}
        self.decisions: list[Any] = []
        self.sent: list[tuple[str, str, str | None, str, str]] = []  # idempotent requests

    # -- model helpers -------------------------------------------------------------------

    def _balance(self, mode: str, org: str) -> tuple[int, int]:
        """(allowance, credits used) of ``org`` this month, from the model's ledger."""
        month = _month(self.t)[0]
        allowance = self.allowances.get((mode, org), ALLOWANCE)
        allowance += self.topups.get((mode, org, month), 0)
        used = sum(
            c.cost
            for c in self.ledger.values()
            if (c.mode, c.org, c.month) == (mode, org, month) and not c.refunded
        )
        return allowance, used

    # -- rules ---------------------------------------------------------------------------

    @rule(
        key=st.sampled_from(sorted(KEYS)),
        op=st.sampled_from(sorted(PRICES)),
        cost=st.sampled_from([None, None, None, "0", "0.000001", "0.33", "1.5"]),
        mode=st.sampled_from(["live", "live", "test"]),
    )
    def check(self, key: str, op: str, cost: str | None, mode: str) -> None:
        self._send(key, op, cost, mode, None)

    @rule(
        key=st.sampled_from(sorted(KEYS)),
        op=st.sampled_from(sorted(PRICES)),
        cost=st.sampled_from([None, "0.33"]),
        mode=st.sampled_from(MODES),
        idem=st.sampled_from(["i1", "i2", "i3"]),
    )
    def check_idempotent(self, key: str, op: str, cost: str | None, mode: str, idem: str) -> None:
        self._send(key, op, cost, mode, idem)

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data(), conflict=st.booleans())
    def resend(self, data: st.DataObject, conflict: bool) -> None:
        """Send an earlier idempotent request again, as it was or with another cost."""
        key, op, cost, mode, idem = data.draw(st.sampled_from(self.sent))
        self._send(key, op, ("0.07" if cost != "0.07" else None) if conflict else cost, mode, idem)

    def _send(self, key: str, op: str, cost: str | None, mode: str, idem: str | None) -> None:
        org = KEYS[key]
        now = self.t
        price = PRICES[op] if cost is None else _micro(cost)
        args: dict[str, Any] = {
            "org": org,
            "operation": op,
            "cost": cost,
            "mode": mode,
            "idempotency_key": idem,
        }
        if idem is not None:
            self.sent.append((key, op, cost, mode, idem))
        record = self.records.get((mode, org, idem)) if idem else None
        if record is not None and record.expiry > now:
            if (record.key, record.op, record.cost) != (key, op, price):
                with pytest.raises(InvalidRequestError):
                    self.meter.check(key, **args)
                return
            d = self.meter.check(key, **args)
            assert d.replayed
            assert d.outcome[:9] == record.decision.outcome[:9]
            self.decisions.append(d)
            return

        tiers = POLICY.plan_for(op).tiers
        denied, waits = [], []
        for tier in tiers:
            ident = key if tier.scope == "key" else org
            history = self.history.get((tier.name, mode, ident), [])
            ok = admits(tier, history, now)
            denied.append(not ok)
            if not ok:
                waits.append(earliest(tier, history, now))
        allowance, used = self._balance(mode, org)
        balance = allowance - used
        d = self.meter.check(key, **args)
        self.decisions.append(d)
        assert [t.denied for t in d.tiers] == denied
        assert not d.replayed
        if price > balance:
            assert d.reason == "insufficient_credits"
            assert round(d.retry_after * US) == max([_month(now)[1] - now, *waits])
        elif waits:
            assert d.reason == "rate_limited"
            assert round(d.retry_after * US) == max(waits)
        else:
            assert d.allowed
            assert d.charged == _credits(price)
            assert d.balance == _credits(balance - price)
            for tier in tiers:
                ident = key if tier.scope == "key" else org
                self.history.setdefault((tier.name, mode, ident), []).append(now)
            self.ledger[d.charge_id] = Charge(mode, org, key, op, _month(now)[0], price)
            if idem is not None:
                self.records[(mode, org, idem)] = Record(now + 24 * HOUR, key, op, price, d)
            return
        assert d.charged == 0
        assert d.balance == _credits(balance)
        assert d.status == (429 if d.reason == "rate_limited" else 402)

    @precondition(lambda self: bool(self.decisions))
    @rule(data=st.data())
    def refund(self, data: st.DataObject) -> None:
        d = data.draw(st.sampled_from(self.decisions))
        charge = self.ledger.get(d.charge_id) if d.allowed else None
        expected = charge is not None and not charge.refunded and charge.month == _month(self.t)[0]
        assert self.meter.refund(d) is expected
        if charge is not None and expected:
            charge.refunded = True
            where = (charge.mode, charge.org, d.request.idem)
            record = self.records.get(where)  # type: ignore[arg-type]
            if record is not None and record.decision.charge_id == d.charge_id:
                del self.records[where]  # type: ignore[arg-type]

    @rule(
        dt=st.one_of(
            st.integers(0, 3 * US), st.integers(0, 30 * US), st.sampled_from([HOUR, 25 * HOUR])
        )
    )
    def advance(self, dt: int) -> None:
        self._go(self.t + dt)

    @rule(delta=st.integers(-2, 2))
    def to_month_end(self, delta: int) -> None:
        """Step to within two microseconds of the month's end (never backwards)."""
        self._go(max(self.t, _month(self.t)[1] + delta))

    def _go(self, t: int) -> None:
        self.t = t
        self.clock.now = t / US

    @rule(
        org=st.sampled_from(ORGS),
        mode=st.sampled_from(MODES),
        amount=st.sampled_from([None, "0", "0.5", "3"]),
    )
    def set_allowance(self, org: str, mode: str, amount: str | None) -> None:
        self.meter.set_allowance(org, amount, mode=mode)  # type: ignore[arg-type]
        if amount is None:
            self.allowances.pop((mode, org), None)
        else:
            self.allowances[(mode, org)] = _micro(amount)

    @rule(
        org=st.sampled_from(ORGS),
        mode=st.sampled_from(MODES),
        amount=st.sampled_from(["0.01", "1", "0.000001"]),
    )
    def top_up(self, org: str, mode: str, amount: str) -> None:
        self.meter.top_up(org, amount, mode=mode)  # type: ignore[arg-type]
        where = (mode, org, _month(self.t)[0])
        self.topups[where] = self.topups.get(where, 0) + _micro(amount)

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def usage_is_charges_minus_refunds(self) -> None:
        """Per org and per key, usage equals the ledger's charges minus refunds, exactly."""
        month = _month(self.t)[0]
        for mode in MODES:
            for org in ORGS:
                allowance, used = self._balance(mode, org)
                charges = [
                    c
                    for c in self.ledger.values()
                    if (c.mode, c.org, c.month) == (mode, org, month)
                ]
                usage = self.meter.usage(org, mode=mode)  # type: ignore[arg-type]
                assert usage.allowance == _credits(allowance)
                assert usage.credits_used == _credits(used)
                assert usage.credits_left == _credits(allowance - used)
                assert usage.requests == len(charges)
                keys: dict[str, list[int]] = {}
                ops: dict[str, list[int]] = {}
                for c in charges:
                    for table, name in ((keys, c.key), (ops, c.op)):
                        row = table.setdefault(name, [0, 0])
                        row[0] += 1
                        row[1] += 0 if c.refunded else c.cost
                assert usage.keys == {k: KeyUsage(n, _credits(m)) for k, (n, m) in keys.items()}
                assert usage.operations == {
                    k: OperationUsage(n, _credits(m)) for k, (n, m) in ops.items()
                }
                for key in (k for k, o in KEYS.items() if o == org):
                    mine = self.meter.usage(org, key=key, mode=mode)  # type: ignore[arg-type]
                    n, m = keys.get(key, [0, 0])
                    assert (mine.requests, mine.credits_used) == (n, _credits(m))


MeterMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=50)
TestMeterMachine = MeterMachine.TestCase
