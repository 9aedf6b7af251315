"""Replay traffic through a policy: the in-memory backend on a virtual clock.

A trace is a sequence of requests ``(timestamp, key, org, operation)``, read from
CSV (header ``timestamp,key,org,operation``) or JSON Lines with the same fields.
Timestamps are UNIX seconds or ISO 8601 (a naive ISO time is UTC). Replaying sets
the virtual clock to each request's timestamp and applies it: nothing sleeps, so a
day of traffic replays in seconds, and the same trace always gives the same report.

Customer plans: ``simulate(..., plan="pro")`` puts every organization on a plan of
the policy; an optional ``plan`` column (field) moves the request's organization to
the plan it names from that request on (an empty one leaves it where it is), with the
rules of a switch in the middle of a window (docs/plans.md). The report counts
requests per plan in force, so replaying the same trace with ``plan="free"`` and
``plan="pro"`` shows what moving customers from one to the other would have admitted.

Requests are replayed in file order. A timestamp earlier than one before it is
replayed at the latest time seen so far, as a server's clock that never runs
backwards would see it; such rows are counted in ``out_of_order``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, Union

import msgspec

from meterkit.backends.memory.backend import MemoryBackend
from meterkit.core.credits import from_micro
from meterkit.core.outcome import REASON_CREDITS, REASON_RATE
from meterkit.core.plan import Plan
from meterkit.core.policy import DEFAULT_PLAN, OperationPlan, Policy
from meterkit.errors import InvalidRequestError, MeterkitError
from meterkit.meter import check_id

__all__ = [
    "KeyCounts",
    "OrgCredits",
    "PlanCounts",
    "SimulationReport",
    "TierCounts",
    "Timeline",
    "TraceError",
    "VirtualClock",
    "read_planned_trace",
    "read_trace",
    "simulate",
]

_FIELDS = ("timestamp", "key", "org", "operation")
_PROGRESS_EVERY = 8192
_PLAN_CACHE_MAX = 200_000

#: One request of a trace: (line number, UNIX seconds, key, org, operation).
TraceRow = tuple[int, float, str, str, str]
#: One request with the plan its row names (None: no plan column, or an empty one).
PlannedRow = tuple[int, float, str, str, str, "str | None"]
TraceSource = Union[str, "os.PathLike[str]", IO[str]]


class TraceError(InvalidRequestError):
    """A trace cannot be replayed: ``line`` is the bad row's line number (1-based), or 0
    when the file as a whole is at fault (then the message names it)."""

    def __init__(self, message: str, line: int) -> None:
        self.line = line
        self.detail = message
        super().__init__(f"line {line}: {message}" if line else message)


class VirtualClock:
    """A clock that reads whatever time it was set to: UNIX seconds as a float."""

    __slots__ = ("now",)

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- reading -------------------------------------------------------------------------


def _timestamp(text: str) -> float:
    """UNIX seconds from a number or an ISO 8601 string (naive means UTC)."""
    try:
        value = float(text)
    except ValueError:
        iso = text.strip()
        if iso.endswith(("Z", "z")):  # Python 3.10's fromisoformat refuses "Z"
            iso = iso[:-1] + "+00:00"
        try:
            moment = _from_iso(iso)
        except ValueError:
            raise ValueError(f"timestamp {text!r} is neither UNIX seconds nor ISO 8601") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return moment.timestamp()
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"timestamp {text!r} is not a time")
    return value


_FRACTION = re.compile(r"(\d\d:\d\d:\d\d)[.,](\d+)")


def _from_iso(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        # Python 3.10 reads only 3 or 6 fractional digits after a dot; 3.11 reads any.
        fixed = _FRACTION.sub(lambda m: f"{m[1]}.{(m[2] + '00000')[:6]}", text, count=1)
        if fixed == text:
            raise
        return datetime.fromisoformat(fixed)


class _JsonRow(msgspec.Struct):
    timestamp: float | str
    key: str
    org: str
    operation: str
    plan: str | None = None


def _csv_rows(lines: Iterable[str], bad: Callable[[int, str], None]) -> Iterator[PlannedRow]:
    reader = csv.reader(lines)
    header: list[str] | None = None
    for row in reader:
        if row:
            # A spreadsheet's CSV export may start with a byte order mark.
            header = [name.strip().lstrip("\ufeff").lower() for name in row]
            break
    if header is None:
        return
    missing = [name for name in _FIELDS if name not in header]
    if missing:
        raise TraceError(
            f"the CSV header must name the columns {','.join(_FIELDS)} "
            f"(missing: {', '.join(missing)})",
            reader.line_num,
        )
    t, k, o, p = (header.index(name) for name in _FIELDS)
    width = max(t, k, o, p) + 1
    n = header.index("plan") if "plan" in header else -1
    stamp = _timestamp
    for row in reader:
        if len(row) < width:
            if not row:
                continue
            bad(reader.line_num, f"expected {len(header)} fields, got {len(row)}")
            continue
        try:
            ts = float(row[t])
        except ValueError:
            try:
                ts = stamp(row[t])
            except ValueError as exc:
                bad(reader.line_num, str(exc))
                continue
        else:
            if not 0 <= ts < math.inf:
                bad(reader.line_num, f"timestamp {row[t]!r} is not a time")
                continue
        plan = row[n].strip() or None if 0 <= n < len(row) else None
        yield reader.line_num, ts, row[k], row[o], row[p], plan


def _json_rows(lines: Iterable[str], bad: Callable[[int, str], None]) -> Iterator[PlannedRow]:
    decode = msgspec.json.Decoder(_JsonRow).decode
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = decode(line)
            ts = row.timestamp
            if isinstance(ts, str):
                ts = _timestamp(ts)
            elif not 0 <= ts < math.inf:
                raise ValueError(f"timestamp {ts!r} is not a time")
        except (msgspec.DecodeError, ValueError) as exc:
            bad(number, str(exc))
            continue
        yield number, ts, row.key, row.org, row.operation, row.plan or None


def _is_json(path: str, first: str) -> bool:
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return True
    if suffix == ".csv":
        return False
    return first.lstrip().startswith("{")


def _raise(line: int, message: str) -> None:
    raise TraceError(message, line)


def read_trace(
    source: TraceSource, *, bad: Callable[[int, str], None] = _raise
) -> Iterator[TraceRow]:
    """Rows ``(line, timestamp, key, org, operation)`` of a CSV or JSON Lines trace
    (:func:`read_planned_trace`: with the plan each row names).

    ``source`` is a path (``"-"`` for standard input) or an open text file. The format
    follows the file's suffix (``.csv``; ``.jsonl``, ``.ndjson``, ``.json``), otherwise
    its first line. A row that cannot be read calls ``bad(line, message)``, which raises
    :class:`TraceError` unless another callable is given (to skip and count instead).
    """
    for row in read_planned_trace(source, bad=bad):
        yield row[:5]


def read_planned_trace(
    source: TraceSource, *, bad: Callable[[int, str], None] = _raise
) -> Iterator[PlannedRow]:
    """:func:`read_trace`'s rows with a sixth item: the plan the row's ``plan`` column
    (field) names, or None."""
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if name == "-":
            yield from _read(sys.stdin, "-", bad)
            return
        try:
            handle = open(name, encoding="utf-8", newline="")  # noqa: SIM115
        except OSError as exc:
            raise TraceError(f"cannot read {name}: {exc.strerror}", 0) from None
        with handle:
            yield from _read(handle, name, bad)
    else:
        yield from _read(source, getattr(source, "name", ""), bad)


def _read(handle: IO[str], name: str, bad: Callable[[int, str], None]) -> Iterator[PlannedRow]:
    label = "standard input" if name == "-" else name or "the trace"
    try:
        first = handle.readline()
    except UnicodeDecodeError:
        raise TraceError(f"{label} is not UTF-8 text", 0) from None
    lines = _chain(first, handle)
    rows = _json_rows(lines, bad) if _is_json(str(name), first) else _csv_rows(lines, bad)
    try:
        yield from rows
    except UnicodeDecodeError:
        raise TraceError(f"{label} is not UTF-8 text", 0) from None
    except csv.Error as exc:
        raise TraceError(f"{label} is malformed CSV: {exc}", 0) from None


def _chain(first: str, rest: IO[str]) -> Iterator[str]:
    if first:
        yield first
    yield from rest


def count_lines(path: str) -> int:
    """Lines in a file, counted in binary (cheap next to parsing them)."""
    lines = 0
    last = b"\n"
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


# -- the report ---------------------------------------------------------------------------


@dataclass
class TierCounts:
    """One tier over a replay: requests it applied to that were admitted, and its denials.

    A request refused by two tiers counts as a denial of both. ``would_deny`` counts
    the requests a shadow tier (or any tier of a shadow policy) said no to without
    denying them.
    """

    admitted: int = 0
    denied: int = 0
    would_deny: int = 0


@dataclass
class OrgCredits:
    """One organization over a replay: requests, and credits charged and left."""

    requests: int
    admitted: int
    denied: int
    charged: Decimal
    credits_left: Decimal
    """The balance after the organization's last request (in that request's month)."""


@dataclass
class KeyCounts:
    """One key over a replay: its organization, admitted and denied requests."""

    key: str
    org: str
    admitted: int
    denied: int


@dataclass
class PlanCounts:
    """Requests checked under one plan over a replay (the plan in force for each)."""

    admitted: int = 0
    denied: int = 0


@dataclass
class Timeline:
    """Requests per second of the replay, for plots.

    Keys of each dict are whole UNIX seconds. ``admitted[tier]`` counts admitted
    requests the tier applied to, ``denied[tier]`` the tier's denials; ``all_admitted``
    and ``all_denied`` count every request, whatever denied it (credits too).
    """

    admitted: dict[str, dict[int, int]]
    denied: dict[str, dict[int, int]]
    all_admitted: dict[int, int]
    all_denied: dict[int, int]


@dataclass
class SimulationReport:
    """What a replay admitted and denied, per tier, reason, organization and key."""

    policy: str
    requests: int = 0
    admitted: int = 0
    denied: int = 0
    skipped: int = 0
    out_of_order: int = 0
    start: float | None = None
    end: float | None = None
    tiers: dict[str, TierCounts] = field(default_factory=dict)
    denied_by_reason: dict[str, int] = field(default_factory=dict)
    orgs: dict[str, OrgCredits] = field(default_factory=dict)
    keys: dict[str, KeyCounts] = field(default_factory=dict)
    timeline: Timeline | None = None
    plan: str = DEFAULT_PLAN
    """The plan every organization started on."""
    plans: dict[str, PlanCounts] = field(default_factory=dict)
    """Requests per plan in force (the key's own, else its organization's)."""

    @property
    def denied_by_tier(self) -> dict[str, int]:
        """Denials per tier (a request refused by two tiers counts for both)."""
        return {name: counts.denied for name, counts in self.tiers.items()}

    def most_limited(self, count: int = 10) -> list[KeyCounts]:
        """The keys with the most denials (then by fewest admitted, then by id)."""
        limited = [k for k in self.keys.values() if k.denied]
        limited.sort(key=lambda k: (-k.denied, k.admitted, k.key))
        return limited[:count]

    def to_dict(self, top: int = 10) -> dict[str, Any]:
        """A JSON-ready dict (credits as strings, times as ISO 8601 UTC)."""
        return {
            "policy": self.policy,
            "plan": self.plan,
            "requests": self.requests,
            "admitted": self.admitted,
            "denied": self.denied,
            "skipped": self.skipped,
            "out_of_order": self.out_of_order,
            "start": _iso(self.start),
            "end": _iso(self.end),
            "denied_by_tier": self.denied_by_tier,
            "denied_by_reason": dict(self.denied_by_reason),
            "tiers": {
                name: {"admitted": c.admitted, "denied": c.denied, "would_deny": c.would_deny}
                for name, c in self.tiers.items()
            },
            "plans": {
                name: {"admitted": c.admitted, "denied": c.denied} for name, c in self.plans.items()
            },
            "orgs": {
                org: {
                    "requests": c.requests,
                    "admitted": c.admitted,
                    "denied": c.denied,
                    "credits_charged": str(c.charged),
                    "credits_left": str(c.credits_left),
                }
                for org, c in self.orgs.items()
            },
            "most_limited_keys": [
                {"key": k.key, "org": k.org, "admitted": k.admitted, "denied": k.denied}
                for k in self.most_limited(top)
            ],
        }


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat().replace("+00:00", "Z")


# -- replaying ----------------------------------------------------------------------------


class _Tally:
    """Counters of one (key, org, operation): admitted, denied, µ-credits, last row, balance."""

    __slots__ = ("admitted", "balance", "charged", "denied", "last", "plan")

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.admitted = 0
        self.denied = 0
        self.charged = 0
        self.last = -1
        self.balance = 0


def simulate(
    trace: TraceSource
    | Iterable[tuple[float, str, str, str]]
    | Iterable[tuple[float, str, str, str, str | None]],
    policy: Policy | None = None,
    *,
    skip_bad: bool = False,
    timeline: bool = False,
    progress: Callable[[int], None] | None = None,
    plan: str | None = None,
) -> SimulationReport:
    """Replay ``trace`` through ``policy`` (default: the seed's) and report what happened.

    ``trace`` is a path or open file (see :func:`read_trace`), or an iterable of
    ``(timestamp, key, org, operation)`` tuples (with a fifth item, the plan that
    request's organization moves to, or None). Every request runs on a fresh
    :class:`MemoryBackend` whose clock is set to the request's timestamp. ``plan``
    puts every organization on that plan of the policy at its first request
    (:class:`~meterkit.errors.UnknownPlanError` if the policy has no such plan). A bad
    row (a plan the policy does not have, too) raises :class:`TraceError` naming its
    line, or with ``skip_bad`` is counted in ``skipped``. ``timeline`` keeps
    per-second counts for plots; ``progress`` is called now and then with the number
    of the line reached.
    """
    if policy is None:
        policy = Policy.crane_ledger()
    start_plan = DEFAULT_PLAN if plan is None else policy.check_plan(plan)
    report = SimulationReport(policy=policy.name, plan=start_plan)
    skipped = 0

    def bad(line: int, message: str) -> None:
        nonlocal skipped
        if not skip_bad:
            raise TraceError(message, line)
        skipped += 1

    rows: Iterable[PlannedRow]
    if isinstance(trace, (str, os.PathLike, io.IOBase)) or hasattr(trace, "readline"):
        rows = read_planned_trace(trace, bad=bad)  # type: ignore[arg-type]
    else:
        rows = _numbered(trace)

    clock = VirtualClock()
    backend = MemoryBackend(clock=clock)
    apply = backend.apply
    plan_for = policy.plan_for
    tallies: dict[tuple[str, str, str], _Tally] = {}
    finished: list[dict[tuple[str, str, str], _Tally]] = []
    tiers = policy.tiers
    tier_denied = [0] * len(tiers)
    would_deny = [0] * len(tiers)
    shadow = [policy.shadow or t.shadow for t in tiers]
    watch_shadow = any(shadow)
    by_reason = [0, 0, 0]
    tl_admitted: dict[tuple[int, OperationPlan], int] = {}
    # The plan each organization is on; admitted requests by the tiers in force; denied
    # requests by plan.
    org_plans: dict[str, str] = {}
    set_plan = backend.set_plan
    plans = policy.plans
    admitted_by: dict[OperationPlan, int] = {}
    denied_by: dict[str, int] = {}
    tl_denied: dict[tuple[int, int], int] = {}
    tl_all_denied: dict[int, int] = {}
    latest = -math.inf
    first: float | None = None
    out_of_order = 0
    seq = 0
    next_progress = _PROGRESS_EVERY

    for line, ts, key, org, op, row_plan in rows:
        ident = (key, org, op)
        tally = tallies.get(ident)
        if tally is None:
            try:
                check_id(key, "key")
                check_id(org, "org")
                opplan = plan_for(op)
            except MeterkitError as exc:
                bad(line, str(exc))
                continue
            if len(tallies) >= _PLAN_CACHE_MAX:
                finished.append(tallies)
                tallies = {}
            request = Plan(policy, opplan, key, org, "live", opplan.price, None)
            tally = tallies[ident] = _Tally(request)
        current = org_plans.get(org)
        if current is None or (row_plan is not None and row_plan != current):
            wanted = start_plan if row_plan is None else row_plan
            if wanted != DEFAULT_PLAN and wanted not in plans:
                bad(
                    line,
                    f"unknown plan {wanted!r}: the policy's plans are "
                    + ", ".join([DEFAULT_PLAN, *plans]),
                )
                continue
            if wanted != (current or DEFAULT_PLAN):
                set_plan(org, "live", wanted)
            org_plans[org] = wanted
        if ts < latest:
            out_of_order += 1
            ts = latest
        else:
            latest = ts
        if first is None:
            first = ts
        clock.now = ts
        out = apply(tally.plan)
        seq += 1
        tally.last = seq
        tally.balance = out.balance
        limits = out.limits or tally.plan.op
        if out.allowed:
            tally.admitted += 1
            tally.charged += out.charged
            admitted_by[limits] = admitted_by.get(limits, 0) + 1
            if watch_shadow:
                index = limits.tier_index
                for i, tier_out in enumerate(out.tiers):
                    if tier_out[2]:
                        would_deny[index[i]] += 1
            if timeline:
                slot = (int(ts), limits)
                tl_admitted[slot] = tl_admitted.get(slot, 0) + 1
        else:
            tally.denied += 1
            by_reason[out.reason] += 1
            denied_by[limits.plan] = denied_by.get(limits.plan, 0) + 1
            index = limits.tier_index
            second = int(ts)
            for i, tier_out in enumerate(out.tiers):
                if tier_out[2]:
                    if shadow[index[i]]:
                        would_deny[index[i]] += 1
                        continue
                    tier_denied[index[i]] += 1
                    if timeline:
                        dslot = (second, index[i])
                        tl_denied[dslot] = tl_denied.get(dslot, 0) + 1
            if timeline:
                tl_all_denied[second] = tl_all_denied.get(second, 0) + 1
        if progress is not None and seq >= next_progress:
            next_progress = seq + _PROGRESS_EVERY
            progress(line)

    finished.append(tallies)
    report.skipped = skipped
    report.out_of_order = out_of_order
    report.start = first
    report.end = latest if first is not None else None
    report.denied_by_reason = {
        "rate_limited": by_reason[REASON_RATE],
        "insufficient_credits": by_reason[REASON_CREDITS],
    }
    _summarize(report, policy, finished, tier_denied, would_deny, admitted_by)
    named = sorted({*denied_by, *(limits.plan for limits in admitted_by)})
    report.plans = {name: PlanCounts(0, denied_by.get(name, 0)) for name in named}
    for limits, n in admitted_by.items():
        report.plans[limits.plan].admitted += n
    if timeline:
        report.timeline = _timeline(policy, tl_admitted, tl_denied, tl_all_denied)
    return report


def _numbered(rows: Iterable[tuple[Any, ...]]) -> Iterator[PlannedRow]:
    for number, row in enumerate(rows, 1):
        ts, key, org, op, *rest = row
        yield number, float(ts), key, org, op, rest[0] if rest else None


def _summarize(
    report: SimulationReport,
    policy: Policy,
    finished: list[dict[tuple[str, str, str], _Tally]],
    tier_denied: list[int],
    would_deny: list[int],
    admitted_by: dict[OperationPlan, int],
) -> None:
    op_admitted: dict[str, int] = {}
    orgs: dict[str, list[int]] = {}  # admitted, denied, charged µ, last seq, balance µ
    keys: dict[str, KeyCounts] = {}
    for tallies in finished:
        for (key, org, op), t in tallies.items():
            op_admitted[op] = op_admitted.get(op, 0) + t.admitted
            acct = orgs.get(org)
            if acct is None:
                acct = orgs[org] = [0, 0, 0, -1, 0]
            acct[0] += t.admitted
            acct[1] += t.denied
            acct[2] += t.charged
            if t.last > acct[3]:
                acct[3], acct[4] = t.last, t.balance
            counts = keys.get(key)
            if counts is None:
                keys[key] = KeyCounts(key, org, t.admitted, t.denied)
            else:
                counts.admitted += t.admitted
                counts.denied += t.denied
    # (a request counts for the tiers in force for it: a plan may turn tiers off)
    tier_admitted = [0] * len(policy.tiers)
    for limits, n in admitted_by.items():
        for i in limits.tier_index:
            tier_admitted[i] += n
    for i, tier in enumerate(policy.tiers):
        report.tiers[tier.name] = TierCounts(tier_admitted[i], tier_denied[i], would_deny[i])
    report.admitted = sum(op_admitted.values())
    report.denied = sum(a[1] for a in orgs.values())
    report.requests = report.admitted + report.denied
    report.orgs = {
        org: OrgCredits(a[0] + a[1], a[0], a[1], from_micro(a[2]), _signed_credits(a[4]))
        for org, a in sorted(orgs.items())
    }
    report.keys = dict(sorted(keys.items()))


def _signed_credits(micro: int) -> Decimal:
    # A shadow policy lets balances go below zero.
    return -from_micro(-micro) if micro < 0 else from_micro(micro)


def _timeline(
    policy: Policy,
    admitted: dict[tuple[int, OperationPlan], int],
    denied: dict[tuple[int, int], int],
    all_denied: dict[int, int],
) -> Timeline:
    per_tier_admitted: dict[str, dict[int, int]] = {t.name: {} for t in policy.tiers}
    all_admitted: dict[int, int] = {}
    for (second, limits), n in admitted.items():
        all_admitted[second] = all_admitted.get(second, 0) + n
        for tier in limits.tiers:
            series = per_tier_admitted[tier.name]
            series[second] = series.get(second, 0) + n
    per_tier_denied: dict[str, dict[int, int]] = {t.name: {} for t in policy.tiers}
    for (second, index), n in denied.items():
        per_tier_denied[policy.tiers[index].name][second] = n
    return Timeline(per_tier_admitted, per_tier_denied, all_admitted, dict(all_denied))


# -- plotting ------------------------------------------------------------------------------

_NICE_WIDTHS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)


def bucket_width(span: float, buckets: int = 200) -> int:
    """A round bucket width in seconds that cuts ``span`` into about ``buckets`` pieces."""
    for width in _NICE_WIDTHS:
        if span / width <= buckets:
            return width
    return math.ceil(span / buckets / 86400) * 86400


def rebin(series: dict[int, int], start: int, width: int, count: int) -> list[int]:
    """Per-second counts summed into ``count`` buckets of ``width`` seconds from ``start``."""
    bins = [0] * count
    for second, n in series.items():
        slot = (second - start) // width
        if 0 <= slot < count:
            bins[slot] += n
    return bins


def plot_timeline(report: SimulationReport, path: str | os.PathLike[str]) -> None:
    """Draw admitted and denied requests over time, one panel per tier, to an image file.

    Needs matplotlib (``pip install 'meterkit[plot]'``); raises :class:`ImportError` with
    that advice when it is missing.
    """
    if report.timeline is None:
        raise InvalidRequestError("this report has no timeline: simulate(..., timeline=True)")
    if report.start is None or report.end is None:
        raise InvalidRequestError("nothing to plot: the trace has no requests")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'meterkit[plot]'") from None

    tl = report.timeline
    start = int(report.start)
    span = int(report.end) - start + 1
    width = bucket_width(span)
    count = -(-span // width)
    scale, unit_name = (
        (1, "seconds") if span <= 600 else ((60, "minutes") if span <= 36_000 else (3600, "hours"))
    )
    # One more x than buckets, so that the last bucket is drawn with its width.
    xs = [i * width / scale for i in range(count + 1)]
    panels: list[tuple[str, dict[int, int], dict[int, int]]] = [
        ("all requests", tl.all_admitted, tl.all_denied)
    ]
    panels += [(name, tl.admitted[name], tl.denied[name]) for name in tl.admitted]
    fig = Figure(figsize=(9, 1.9 * len(panels) + 0.8), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, admitted, denied) in zip(axes, panels, strict=True):
        ok = rebin(admitted, start, width, count)
        no = rebin(denied, start, width, count)
        ax.step(xs, [*ok, ok[-1]], where="post", color="#2b8a3e", label="admitted")
        ax.step(xs, [*no, no[-1]], where="post", color="#c92a2a", label="denied")
        ax.set_ylim(0, max(1, *ok, *no) * 1.3)  # headroom for the legend
        ax.set_title(title, loc="left", fontsize=10)
        ax.set_ylabel(f"per {width} s", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=8, ncols=2)
    axes[-1].set_xlabel(f"{unit_name} since {_iso(start)}")
    fig.suptitle(f"policy {report.policy}: {report.admitted:,} admitted, {report.denied:,} denied")
    fig.savefig(os.fspath(path), dpi=90)
