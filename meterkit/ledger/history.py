"""Usage history from a ledger store: any past period, per key, operation, day, month.

The counters in the backend serve the current month in real time (``meter.usage(org)``)
and are gone when it ends; the ledger keeps every event. ``meter.usage(org,
period="2026-11")`` (or ``since=``/``until=`` dates) reads the store's rollups, which
the drain keeps in the same transaction as the events: a month of an organization
with a thousand keys is a few thousand rollup rows, never a scan of its events.

A period covers what the drain has moved so far: for a period that has not ended,
the counters (``meter.usage(org)``) are ahead of the ledger by what is undrained.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from meterkit.core.credits import from_micro
from meterkit.core.decision import KeyUsage, OperationUsage
from meterkit.errors import InvalidRequestError
from meterkit.ledger.store._sql import DAY_US

if TYPE_CHECKING:
    from meterkit.ledger.store import LedgerStore

__all__ = ["DayUsage", "MonthUsage", "UsageHistory", "history", "period_bounds"]

_EPOCH = date(1970, 1, 1)
_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
_DAY = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")


@dataclass(frozen=True)
class DayUsage:
    """Requests and credits (charged less refunded) of one UTC day."""

    day: date
    requests: int
    credits: Decimal


@dataclass(frozen=True)
class MonthUsage:
    """Requests and credits (charged less refunded) of one UTC calendar month."""

    month: str  # "2026-11"
    requests: int
    credits: Decimal


@dataclass(frozen=True)
class UsageHistory:
    """An organization's (or one key's) usage over [since, until) from the ledger.

    ``credits`` is what was charged less what was refunded, to the micro-credit;
    ``requests`` counts admitted charges (a refund does not take one back, as in the
    counters). ``days`` lists the days with usage, ``months`` the months.
    """

    org: str
    key: str | None
    mode: str
    since: date
    until: date
    requests: int
    credits: Decimal
    charged: Decimal
    refunded: Decimal
    refunds: int
    topped_up: Decimal
    operations: dict[str, OperationUsage]
    keys: dict[str, KeyUsage]
    days: list[DayUsage]
    months: list[MonthUsage]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (Decimals as strings, dates as ISO 8601)."""
        return {
            "org": self.org,
            "key": self.key,
            "mode": self.mode,
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "requests": self.requests,
            "credits": str(self.credits),
            "charged": str(self.charged),
            "refunded": str(self.refunded),
            "refunds": self.refunds,
            "topped_up": str(self.topped_up),
            "operations": {
                k: {"requests": v.requests, "credits": str(v.credits)}
                for k, v in self.operations.items()
            },
            "keys": {
                k: {"requests": v.requests, "credits": str(v.credits)} for k, v in self.keys.items()
            },
            "days": [
                {"day": d.day.isoformat(), "requests": d.requests, "credits": str(d.credits)}
                for d in self.days
            ],
            "months": [
                {"month": m.month, "requests": m.requests, "credits": str(m.credits)}
                for m in self.months
            ],
        }


def _date(value: object, what: str) -> date:
    if isinstance(value, datetime):
        raise InvalidRequestError(f"{what} is a date (or 'YYYY-MM-DD'), not a datetime")
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        found = _DAY.fullmatch(value)
        if found:
            try:
                return date(*map(int, found.groups()))
            except ValueError:
                pass
    raise InvalidRequestError(f"{what} is a date or 'YYYY-MM-DD', got {value!r}")


def period_bounds(
    period: object = None, since: object = None, until: object = None
) -> tuple[date, date]:
    """[since, until) as dates: ``period`` a month (``"2026-11"``) or a day
    (``"2026-11-05"``), or ``since`` and ``until`` (dates or ``"YYYY-MM-DD"``;
    ``until`` excluded). Anything else raises :class:`InvalidRequestError`."""
    if period is not None:
        if since is not None or until is not None:
            raise InvalidRequestError("give a period, or since and until, not both")
        if isinstance(period, str):
            found = _MONTH.fullmatch(period)
            if found:
                year, month = map(int, found.groups())
                if year >= 1 and 1 <= month <= 12:
                    start = date(year, month, 1)
                    end = date(year + 1, 1, 1) if month == 12 else date(year, month + 1, 1)
                    return start, end
            elif _DAY.fullmatch(period):
                day = _date(period, "period")
                return day, day + timedelta(days=1)
        raise InvalidRequestError(
            f"a period is a month 'YYYY-MM' or a day 'YYYY-MM-DD', got {period!r}"
        )
    if since is None or until is None:
        raise InvalidRequestError("a date range needs both since and until (until excluded)")
    start, end = _date(since, "since"), _date(until, "until")
    if end <= start:
        raise InvalidRequestError(f"until ({end}) must be after since ({start})")
    return start, end


def _days(d: date) -> int:
    return (d - _EPOCH).days


def history(
    store: LedgerStore, org: str, key: str | None, mode: str, since: date, until: date
) -> UsageHistory:
    """The :class:`UsageHistory` of ``org`` (or its ``key``) over [since, until)."""
    lo, hi = _days(since), _days(until)
    days = store.usage_by("day", org, mode, lo, hi, key)
    # (one read of the (key, operation) sums gives both breakdowns)
    ops: dict[str, list[int]] = {}
    keys: dict[str, list[int]] = {}
    for (k, op), n, _, _, _, net in store.usage_by("key,operation", org, mode, lo, hi, key):
        for name, into in ((op, ops), (k, keys)):
            acc = into.setdefault(name, [0, 0])
            acc[0] += n
            acc[1] += net
    if key is None:
        _, topped = store.topped_up(org, mode, lo * DAY_US, hi * DAY_US)
    else:
        topped = 0
    months: dict[str, list[int]] = {}
    requests = charged = refunds = refunded = 0
    day_list = []
    for day, n, c, rn, r, net in days:
        when = _EPOCH + timedelta(days=int(day))
        day_list.append(DayUsage(when, n, from_micro(net)))
        acc = months.setdefault(f"{when.year:04d}-{when.month:02d}", [0, 0])
        acc[0] += n
        acc[1] += net
        requests += n
        charged += c
        refunds += rn
        refunded += r
    return UsageHistory(
        org=org,
        key=key,
        mode=mode,
        since=since,
        until=until,
        requests=requests,
        credits=from_micro(charged - refunded),
        charged=from_micro(charged),
        refunded=from_micro(refunded),
        refunds=refunds,
        topped_up=from_micro(topped),
        operations={op: OperationUsage(n, from_micro(net)) for op, (n, net) in sorted(ops.items())},
        keys={k: KeyUsage(n, from_micro(net)) for k, (n, net) in sorted(keys.items())},
        days=day_list,
        months=[MonthUsage(m, n, from_micro(net)) for m, (n, net) in sorted(months.items())],
    )


def utc_start(day: date) -> datetime:
    """Midnight UTC of ``day``."""
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
