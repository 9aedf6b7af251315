"""The ``meterkit`` commands but the demo: policy check, simulate, usage, reset-limits,
plans, keys."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from meterkit.core.decision import PlanAssignment, Usage
    from meterkit.simulate import SimulationReport
from meterkit.cli.common import (
    EXIT_BACKEND,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_USAGE,
    _credits,
    _err,
    _Failure,
    _json,
    _load_policy,
    _out,
    _table,
    _utc,
)

# -- meterkit policy check --------------------------------------------------------------


def _cmd_policy_check(args: argparse.Namespace) -> int:
    try:
        policy = _load_policy(args.file)
    except _Failure as failure:
        if args.json and failure.code == EXIT_INVALID:
            _json({"valid": False, "file": args.file, "error": str(failure)})
        raise
    if args.json:
        _json({"valid": True, "file": args.file, **policy.to_dict()})
        return EXIT_OK
    _out(f"{args.file}: valid policy {policy.name!r}" + (" (shadow mode)" if policy.shadow else ""))
    _out()
    _out(f"tiers ({len(policy.tiers)}):")
    tier_rows: list[list[object]] = [
        ["name", "scope", "limit", "window", "algorithm", "applies to"]
    ]
    for t in policy.tiers:
        algorithm = t.algorithm + (f", burst {t.burst}" if t.algorithm == "gcra" else "")
        algorithm += ", shadow" if t.shadow else ""
        ops = ", ".join(t.operations) if t.operations else "every operation"
        tier_rows.append([t.name, t.scope, t.limit, f"{t.window}s", algorithm, ops])
    for line in _table(tier_rows, right=(2, 3)):
        _out(line)
    _out()
    cats = {c.name: c for c in policy.costs.categories}
    _out(f"prices ({len(policy.costs.operations)} operations, in credits):")
    op_rows: list[list[object]] = [["operation", "category", "price", "permission"]]
    for op in policy.costs.operations:
        op_rows.append([op.name, op.category, _credits(_dec(op.price_micro)), op.permission or "-"])
    for line in _table(op_rows, right=(2,)):
        _out(line)
    _out()
    _out("categories:")
    cat_rows = []
    for c in cats.values():
        lo, hi = _credits(_dec(c.min_micro)), _credits(_dec(c.max_micro))
        cat_rows.append([c.name, lo if lo == hi else f"{lo}-{hi}", c.description])
    for line in _table(cat_rows):
        _out(line)
    _out()
    allowance = _credits(_dec(policy.credits.allowance_micro))
    _out(f"credits: {allowance} per organization per calendar month (UTC), no rollover")
    if policy.credits.alert_percents:
        thresholds = ", ".join(f"{p}%" for p in policy.credits.alert_percents)
        _out(f"credit alerts at {thresholds} of the month's credits")
    if policy.plans:
        _out()
        _out(f"plans ({len(policy.plans)}, besides default):")
        plan_rows: list[list[object]] = [["plan", "allowance", "changes"]]
        own = {t.name: t for t in policy.tiers}
        for name in policy.plans:
            under = {t.name: t for t in policy.tiers_under(name)}
            changes = [f"{tier} off" for tier in own if tier not in under]
            changes += [
                f"{tier} {_rate_text(t.limit, t.window)}"
                + (f" burst {t.burst}" if t.algorithm == "gcra" else "")
                for tier, t in under.items()
                if t is not own[tier]
            ]
            allowance = _credits(_dec(policy.allowance_of(name)))
            plan_rows.append([name, allowance, ", ".join(changes) or "(the default tiers)"])
        for line in _table(plan_rows, right=(1,)):
            _out(line)
    if policy.routes:
        _out()
        _out(f"routes ({len(policy.routes)}):")
        for line in _table([[r, "->", op] for r, op in policy.routes.items()]):
            _out(line)
    return EXIT_OK


def _rate_text(limit: int, window: int) -> str:
    from meterkit.core.policy import _rate_text as rate_text

    return rate_text(limit, window)


def _dec(micro: int) -> Decimal:
    from meterkit.core.credits import from_micro

    return from_micro(micro)


# -- meterkit simulate ----------------------------------------------------------------


class _ProgressBar:
    """A one-line progress bar on a terminal, shown once a replay takes over half a second."""

    _WIDTH = 30

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.started = time.monotonic()
        self.drawn = 0.0
        self.shown = False

    def __call__(self, line: int) -> None:
        now = time.monotonic()
        if now - self.started < 0.5 or now - self.drawn < 0.1:
            return
        self.drawn = now
        self.shown = True
        fraction = min(line / self.total, 1.0)
        filled = int(fraction * self._WIDTH)
        bar = "#" * filled + "." * (self._WIDTH - filled)
        self.stream.write(
            f"\rreplaying [{bar}] {fraction:4.0%}  {line:,}/{self.total:,} lines  "
            f"{now - self.started:.0f}s"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * 79 + "\r")
            self.stream.flush()


def _cmd_simulate(args: argparse.Namespace) -> int:
    from meterkit.simulate import TraceError, count_lines, plot_timeline, simulate

    policy = _load_policy(args.policy)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise _Failure(
                "--plot needs matplotlib: pip install 'meterkit[plot]'", EXIT_USAGE
            ) from None
    bar: _ProgressBar | None = None
    stderr = sys.stderr
    if args.trace != "-" and not args.no_progress and stderr.isatty():
        try:
            bar = _ProgressBar(count_lines(args.trace), stderr)
        except OSError:
            bar = None  # reading it will report the problem
    try:
        report = simulate(
            args.trace,
            policy,
            skip_bad=args.skip_bad,
            timeline=bool(args.plot),
            progress=bar,
            plan=args.plan,
        )
    except TraceError as exc:
        raise _Failure(f"{args.trace}: {exc}" if exc.line else str(exc), EXIT_USAGE) from None
    finally:
        if bar is not None:
            bar.close()
    if args.plot:
        try:
            plot_timeline(report, args.plot)
        except OSError as exc:
            raise _Failure(f"cannot write {args.plot}: {exc.strerror}", EXIT_USAGE) from None
        except ValueError as exc:  # an image format matplotlib does not know, no requests
            raise _Failure(f"cannot plot to {args.plot}: {exc}", EXIT_USAGE) from None
    if args.json:
        data = report.to_dict(top=args.top)
        if args.plot:
            data["plot"] = args.plot
        _json(data)
    else:
        _print_report(report, args)
    return EXIT_OK


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _print_report(report: SimulationReport, args: argparse.Namespace) -> None:
    total = report.requests
    _out(f"replayed {args.trace} through policy {report.policy!r} (in-memory, virtual clock)")
    if report.plan != "default":
        _out(f"  every organization starting on plan {report.plan!r}")
    if report.start is not None and report.end is not None:
        _out(
            f"  {total:,} requests from {_utc(report.start)} to {_utc(report.end)} "
            f"({report.end - report.start:,.1f} s)"
        )
    else:
        _out("  no requests")
    _out(
        f"  admitted {report.admitted:,} ({_pct(report.admitted, total)}), "
        f"denied {report.denied:,} ({_pct(report.denied, total)})"
    )
    if report.skipped:
        _out(f"  skipped {report.skipped:,} bad rows")
    if report.out_of_order:
        _out(f"  {report.out_of_order:,} rows out of order (replayed at the latest time seen)")
    _out()
    shadow = any(c.would_deny for c in report.tiers.values())
    extra = ["would deny"] if shadow else []
    rows: list[list[str]] = [["tier", "admitted", "denied", *extra]]
    for name, c in report.tiers.items():
        extra = [f"{c.would_deny:,}"] if shadow else []
        rows.append([name, f"{c.admitted:,}", f"{c.denied:,}", *extra])
    for line in _table(rows, right=(1, 2, 3)):
        _out(line)
    if set(report.plans) - {"default"}:
        _out()
        plan_rows: list[list[str]] = [["plan in force", "admitted", "denied"]]
        for name, p in report.plans.items():
            plan_rows.append([name, f"{p.admitted:,}", f"{p.denied:,}"])
        for line in _table(plan_rows, right=(1, 2)):
            _out(line)
    _out()
    _out("denied by reason:")
    for line in _table([[r, f"{n:,}"] for r, n in report.denied_by_reason.items()], right=(1,)):
        _out(line)
    _out()
    orgs = sorted(report.orgs.items(), key=lambda kv: (-kv[1].charged, kv[0]))
    _out(f"credits per organization ({len(orgs):,}):")
    if orgs:
        org_rows: list[list[object]] = [
            ["org", "requests", "admitted", "denied", "charged", "left"]
        ]
        for org, o in orgs[: args.top]:
            org_rows.append(
                [
                    org,
                    f"{o.requests:,}",
                    f"{o.admitted:,}",
                    f"{o.denied:,}",
                    _credits(o.charged),
                    _credits(o.credits_left),
                ]
            )
        for line in _table(org_rows, right=(1, 2, 3, 4, 5)):
            _out(line)
        if len(orgs) > args.top:
            _out(f"  … and {len(orgs) - args.top:,} more (--top N, or --json for all)")
    _out()
    limited = report.most_limited(args.top)
    if limited:
        _out("most limited keys:")
        key_rows: list[list[object]] = [["key", "org", "admitted", "denied"]]
        key_rows += [[k.key, k.org, f"{k.admitted:,}", f"{k.denied:,}"] for k in limited]
        for line in _table(key_rows, right=(2, 3)):
            _out(line)
    else:
        _out("no key was limited")
    if args.plot:
        _out()
        _out(f"plot written to {args.plot}")


# -- meterkit usage ----------------------------------------------------------------------


def _meter_of(args: argparse.Namespace) -> Any:
    """The Meter of ``usage`` and ``reset-limits``: the policy and the backend named."""
    from meterkit.meter import Meter

    policy = _load_policy(args.policy, required=True)
    try:
        from meterkit.connect import backend_from_url
    except ImportError as exc:
        raise _Failure(f"no backend URLs in this installation: {exc}", EXIT_BACKEND) from None
    memory = args.url.lower().startswith("memory:")
    if memory:
        _err("note: a memory:// backend starts empty: it lives only as long as this command")
    options = {} if memory else {"prefix": args.prefix}
    return Meter(policy, _connect(lambda url: backend_from_url(url, **options), args.url))


def _backend_arguments(parser: argparse.ArgumentParser, *, key: str, policy: str) -> None:
    """The options of a command on a meter's backend (``usage``, ``reset-limits``)."""
    parser.add_argument("--url", required=True, help="the backend, e.g. redis://host:6379/0")
    parser.add_argument("--org", required=True, help="the organization id")
    parser.add_argument("--key", help=key)
    parser.add_argument(
        "--mode",
        choices=("live", "test"),
        default="live",
        help="live or test keys' state (default live)",
    )
    parser.add_argument("--policy", metavar="FILE", help=policy)
    parser.add_argument(
        "--prefix", default="mk", help="the prefix of the backend's Redis key names (default mk)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _cmd_usage(args: argparse.Namespace) -> int:
    meter = _meter_of(args)
    try:
        usage = meter.usage(args.org, key=args.key, mode=args.mode)
    finally:
        meter.close()
    if args.json:
        _json(usage.to_dict())
    else:
        _print_usage(usage)
    return EXIT_OK


def _cmd_reset_limits(args: argparse.Namespace) -> int:
    meter = _meter_of(args)
    try:
        meter.reset_limits(args.org, args.key, mode=args.mode)
    finally:
        meter.close()
    if args.json:
        _json({"org": args.org, "key": args.key, "mode": args.mode, "reset": True})
    else:
        scope = "organization-scoped" if args.key is None else "key-scoped"
        who = args.org if args.key is None else f"{args.key} of {args.org}"
        _out(f"rate limits of {who} ({args.mode}) reset: its {scope} tiers start afresh")
    return EXIT_OK


# -- meterkit plans ---------------------------------------------------------------------


def _limits(texts: list[str]) -> dict[str, str]:
    limits = {}
    for text in texts:
        tier, sep, rate = text.partition("=")
        if not sep or not tier.strip() or not rate.strip():
            raise _Failure(
                f"--limit {text!r}: write TIER=RATE, e.g. org-hour=50000/hour", EXIT_USAGE
            )
        limits[tier.strip()] = rate.strip()
    return limits


def _cmd_plans_set(args: argparse.Namespace) -> int:
    limits = _limits(args.limit)
    if args.plan is None and not limits:
        raise _Failure("name a PLAN, or give --limit TIER=RATE", EXIT_USAGE)
    if args.key is not None and limits:
        raise _Failure("negotiated limits are the organization's: drop --key", EXIT_USAGE)
    meter = _meter_of(args)
    try:
        # (both are checked before either is written)
        if args.plan is not None:
            meter.policy.check_plan(args.plan)
        if limits:
            from meterkit.core.policy import deal_of

            deal_of(meter.policy, limits)
        if args.plan is not None:
            meter.set_plan(args.org, args.plan, key=args.key, mode=args.mode)
        if limits:
            meter.set_limits(args.org, limits, mode=args.mode)
        assigned = meter.plan_of(args.org, key=args.key, mode=args.mode)
    finally:
        meter.close()
    return _show_plans(assigned, args)


def _cmd_plans_show(args: argparse.Namespace) -> int:
    meter = _meter_of(args)
    try:
        assigned = meter.plan_of(args.org, key=args.key, mode=args.mode)
    finally:
        meter.close()
    return _show_plans(assigned, args)


def _cmd_plans_clear(args: argparse.Namespace) -> int:
    if args.key is not None and args.limits:
        raise _Failure("negotiated limits are the organization's: drop --key", EXIT_USAGE)
    meter = _meter_of(args)
    try:
        if args.key is not None:
            meter.set_plan(args.org, None, key=args.key, mode=args.mode)
        else:
            if not args.limits:
                meter.set_plan(args.org, None, mode=args.mode)
            meter.set_limits(args.org, None, mode=args.mode)
        assigned = meter.plan_of(args.org, key=args.key, mode=args.mode)
    finally:
        meter.close()
    return _show_plans(assigned, args)


def _show_plans(assigned: PlanAssignment, args: argparse.Namespace) -> int:
    if args.json:
        _json(assigned.to_dict())
        return EXIT_OK
    who = assigned.org if assigned.key is None else f"{assigned.key} of {assigned.org}"
    _out(f"{who} ({args.mode}) is on plan {assigned.plan!r}")
    _out(f"  organization's plan  {assigned.org_plan}")
    if assigned.key is not None:
        _out(f"  key's own plan       {assigned.key_plan or '(none: its organization’s)'}")
    deal = ", ".join(
        f"{tier}={limit}"
        if isinstance(limit, str)
        else f"{tier}={limit['rate']} (burst {limit['burst']})"
        for tier, limit in assigned.limits.items()
    )
    _out(f"  negotiated limits    {deal or '(none)'}")
    _out(f"  monthly allowance    {_credits(assigned.allowance)} (unless set_allowance gave one)")
    _out()
    rows: list[list[object]] = [["tier", "scope", "limit", "window", "algorithm"]]
    for t in assigned.tiers:
        algorithm = t.algorithm + (f", burst {t.burst}" if t.algorithm == "gcra" else "")
        rows.append([t.name, t.scope, t.limit, f"{t.window}s", algorithm])
    for line in _table(rows, right=(2, 3)):
        _out(line)
    return EXIT_OK


def _connect(factory: Callable[[str], Any], url: str) -> Any:
    try:
        return factory(url)
    except ImportError as exc:
        raise _Failure(f"{exc} (pip install 'meterkit[redis]')", EXIT_BACKEND) from None


def _print_usage(usage: Usage, indent: str = "") -> None:
    who = usage.org if usage.key is None else f"{usage.key} of {usage.org}"
    _out(
        f"{indent}usage of {who}, {usage.period_start.date()} to {usage.period_end.date()} (UTC, "
        "credits reset monthly, no rollover)"
    )
    if usage.plan != "default":
        _out(f"{indent}  plan {usage.plan}")
    _out(
        f"{indent}  allowance {_credits(usage.allowance)}   used {_credits(usage.credits_used)}   "
        f"left {_credits(usage.credits_left)}   requests {usage.requests:,}"
    )
    if usage.operations:
        _out(f"{indent}  per operation:")
        rows = [[op, f"{u.requests:,}", _credits(u.credits)] for op, u in usage.operations.items()]
        for line in _table([["operation", "requests", "credits"], *rows], right=(1, 2)):
            _out(f"{indent}  " + line)
    if usage.keys and usage.key is None:
        _out(f"{indent}  per key:")
        rows = [[k, f"{u.requests:,}", _credits(u.credits)] for k, u in usage.keys.items()]
        for line in _table([["key", "requests", "credits"], *rows], right=(1, 2)):
            _out(f"{indent}  " + line)


# -- meterkit keys -------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _duration(text: str) -> float:
    """Seconds from ``3600``, ``90s``, ``30m``, ``24h``, ``7d`` or ``2w``."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (write 3600, 90s, 30m, 24h, 7d or 2w)"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


def _when(text: str) -> datetime:
    """A timezone-aware moment from ISO 8601 (naive means UTC)."""
    iso = text.strip()
    if iso.endswith(("Z", "z")):
        iso = iso[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time: {text!r} (write 2026-12-31 or 2026-12-31T23:59:59Z)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _store(args: argparse.Namespace) -> Any:
    try:
        from meterkit.connect import keystore_from_url
    except ImportError as exc:
        raise _Failure(f"no key stores in this installation: {exc}", EXIT_BACKEND) from None
    pepper = os.environ.get("METERKIT_PEPPER") or None
    if args.url.lower().startswith("memory:"):
        _err("note: a memory:// key store lives only as long as this command")
    return _connect(
        lambda url: keystore_from_url(url, pepper=pepper, namespace=args.namespace), args.url
    )


def _key_dict(record: Any, now: float) -> dict[str, Any]:
    return {
        "id": record.id,
        "org": record.org,
        "mode": record.mode,
        "status": record.status(now),
        "name": record.name,
        "permissions": list(record.permissions),
        "created_at": _utc(record.created_at),
        "expires_at": _utc(record.expires_at) if record.expires_at is not None else None,
        "revoked_at": _utc(record.revoked_at) if record.revoked_at is not None else None,
        "last_used_at": _utc(record.last_used_at) if record.last_used_at is not None else None,
        "last_four": record.last_four,
    }


def _print_key(record: Any, now: float) -> None:
    info = _key_dict(record, now)
    _out(f"  id           {info['id']}  (…{info['last_four']})")
    _out(f"  org          {info['org']}  ({info['mode']})")
    _out(f"  status       {info['status']}")
    if info["name"]:
        _out(f"  name         {info['name']}")
    _out(f"  permissions  {', '.join(info['permissions']) or '(none)'}")
    _out(f"  created      {info['created_at']}")
    if info["expires_at"]:
        _out(f"  expires      {info['expires_at']}")
    if info["revoked_at"]:
        _out(f"  revoked      {info['revoked_at']}")


def _with_store(run: Callable[[Any, argparse.Namespace], int]) -> Callable[..., int]:
    def command(args: argparse.Namespace) -> int:
        store = _store(args)
        try:
            return run(store, args)
        finally:
            store.close()

    return command


_SHOWN_ONCE = "store this key now: it is shown only once and cannot be recovered"


def _keys_create(store: Any, args: argparse.Namespace) -> int:
    expires: datetime | None = args.expires_at
    if args.expires_in is not None:
        expires = datetime.now(timezone.utc) + timedelta(seconds=args.expires_in)
    permissions = [p for chunk in args.permission for p in chunk.split(",") if p]
    plaintext, record = store.create(
        org=args.org, mode=args.mode, permissions=permissions, expires_at=expires, name=args.name
    )
    now = time.time()
    if args.json:
        _json({"plaintext": str(plaintext), "key": _key_dict(record, now)})
        return EXIT_OK
    _out(f"created {record.id} for {record.org}")
    return _show_new_key(record, plaintext, now)


def _show_new_key(record: Any, plaintext: object, now: float) -> int:
    """Print a new key's record, then its plaintext, the only time it is ever shown."""
    _print_key(record, now)
    _out()
    _out(str(plaintext))
    _out()
    _err(_SHOWN_ONCE)
    return EXIT_OK


def _keys_list(store: Any, args: argparse.Namespace) -> int:
    records = store.list(args.org)
    now = time.time()
    if args.json:
        _json([_key_dict(r, now) for r in records])
        return EXIT_OK
    if not records:
        _out(f"no keys for {args.org}")
        return EXIT_OK
    rows: list[list[object]] = [
        [
            "id",
            "last four",
            "mode",
            "status",
            "name",
            "permissions",
            "created",
            "expires",
            "last used",
        ]
    ]
    for r in records:
        d = _key_dict(r, now)
        rows.append(
            [
                d["id"],
                d["last_four"],
                d["mode"],
                d["status"],
                d["name"] or "-",
                ",".join(d["permissions"]) or "-",
                d["created_at"],
                d["expires_at"] or "-",
                d["last_used_at"] or "-",
            ]
        )
    for line in _table(rows):
        _out(line)
    return EXIT_OK


def _keys_rotate(store: Any, args: argparse.Namespace) -> int:
    plaintext, record = store.rotate(args.key_id, grace=args.grace)
    old = store.get(args.key_id)
    now = time.time()
    if args.json:
        _json(
            {
                "plaintext": str(plaintext),
                "key": _key_dict(record, now),
                "replaced": _key_dict(old, now) if old is not None else None,
            }
        )
        return EXIT_OK
    _out(f"rotated {args.key_id} -> {record.id}")
    if old is not None and old.expires_at is not None:
        _out(f"  {args.key_id} keeps working until {_utc(old.expires_at)}")
    return _show_new_key(record, plaintext, now)


def _keys_revoke(store: Any, args: argparse.Namespace) -> int:
    record = store.revoke(args.key_id)
    now = time.time()
    if args.json:
        _json(_key_dict(record, now))
        return EXIT_OK
    _out(f"revoked {record.id} of {record.org} at {_utc(record.revoked_at)}")
    return EXIT_OK
