"""The ``meterkit`` command: demo, policy check, simulate, usage, keys.

``main(argv)`` parses, runs one command and returns its exit code; it never calls
``sys.exit`` itself, so tests run it in-process. Exit codes are a contract:

    0  success
    1  invalid input: a policy file, an argument value, an unknown key
    2  usage error: bad command line, unreadable or malformed trace
    3  the backend or key store cannot be reached (or its driver is missing)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from meterkit.errors import (
    BackendError,
    ConfigurationError,
    MeterkitError,
)

if TYPE_CHECKING:
    from meterkit.core.decision import Decision, Usage
    from meterkit.core.policy import Policy
    from meterkit.simulate import SimulationReport

__all__ = ["EXIT_BACKEND", "EXIT_INVALID", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_BACKEND = 3

_EXIT_CODES = """\
exit codes:
  0  success
  1  invalid input: a policy file, an argument value, an unknown key
  2  usage error: a bad command line, an unreadable or malformed trace
  3  the backend or key store cannot be reached (or its driver is not installed)
"""


class _Failure(Exception):
    """A command gives up: message for stderr, exit code for the shell."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _json(data: object) -> None:
    _out(json.dumps(data, indent=2, ensure_ascii=False))


def _credits(amount: Decimal) -> str:
    """Credits with at least two decimals: ``9999.99``, ``0.125``."""
    if amount == amount.quantize(Decimal("0.01")):
        return f"{amount:.2f}"
    return str(amount.normalize())


def _utc(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    text = moment.isoformat(timespec="milliseconds" if seconds % 1 else "seconds")
    return text.replace("+00:00", "Z")


def _table(rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> Iterator[str]:
    """Rows as aligned columns; columns in ``right`` are right-aligned (numbers)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for row in cells:
        parts = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        yield "  " + "  ".join(parts).rstrip()


def _load_policy(path: str | None) -> Policy:
    from meterkit.core.policy import Policy

    if path is None:
        return Policy.crane_ledger()
    try:
        text = Path(path).read_text("utf-8")
    except OSError as exc:
        raise _Failure(f"cannot read policy file {path}: {exc.strerror}", EXIT_USAGE) from None
    except UnicodeDecodeError:
        raise _Failure(f"policy file {path} is not UTF-8 text", EXIT_INVALID) from None
    try:
        return Policy.from_toml(text)
    except ConfigurationError as exc:
        raise _Failure(_policy_error(path, text, exc), EXIT_INVALID) from None


# -- where in a TOML file a policy error is ------------------------------------------


def _split_dotted(header: str) -> list[str]:
    """``operations."invoices.pdf"`` -> ``["operations", "invoices.pdf"]``."""
    parts: list[str] = []
    for match in re.finditer(r'\s*("(?:[^"\\]|\\.)*"|\'[^\']*\'|[^.\s]+)\s*(?:\.|$)', header):
        token = match.group(1)
        parts.append(token[1:-1] if token[:1] in "\"'" else token)
    return parts


def locate(text: str, location: str) -> int | None:
    """The line (1-based) of ``text`` that a policy error's ``location`` points to.

    ``location`` is what :class:`ConfigurationError` names: ``tiers[2].rate``,
    ``operations.invoices.pdf.price``, ``credits.allowance``, ``name``. Table headers
    are matched first, then the key inside the table. None when not found (a policy
    written with inline tables, say).
    """
    if not location:
        return None
    lines = text.splitlines()
    # (location prefix of the table, first line index, end line index)
    tables: list[tuple[str, int, int]] = [("", 0, len(lines))]
    counts: dict[str, int] = {}
    for number, line in enumerate(lines):
        stripped = line.strip()
        match = re.match(r"^(\[\[?)\s*(.+?)\s*\]\]?\s*(#.*)?$", stripped)
        if not match:
            continue
        name = ".".join(_split_dotted(match.group(2)))
        if match.group(1) == "[[":
            index = counts.get(name, 0)
            counts[name] = index + 1
            name = f"{name}[{index}]"
        prev = tables[-1]
        tables[-1] = (prev[0], prev[1], number)
        tables.append((name, number, len(lines)))
    best: tuple[str, int, int] | None = None
    for table in tables:
        prefix = table[0]
        inside = (
            prefix == "" or location == prefix or location.startswith((prefix + ".", prefix + "["))
        )
        if inside and (best is None or len(prefix) > len(best[0])):
            best = table
    if best is None:
        return None
    prefix, first, end = best
    rest = location[len(prefix) :].lstrip(".")
    if not rest:
        return first + 1
    key = re.split(r"[.\[]", rest, maxsplit=1)[0] if rest[:1] not in "'\"" else rest
    key = key.strip("'\"")
    pattern = re.compile(r'^\s*(?:"' + re.escape(key) + r'"|' + re.escape(key) + r")\s*=")
    for number in range(first, end):
        if pattern.match(lines[number]):
            return number + 1
    return first + 1 if prefix else None


def _resolve_entry(text: str, exc: ConfigurationError) -> str:
    """Name the table entry msgspec shows as ``[...]``: ``operations[...].price`` becomes
    ``operations.invoices.pdf.price``, found by validating one entry at a time."""
    import msgspec

    from meterkit.core.policy import _PolicySpec

    head, _, rest = exc.location.partition("[...]")
    try:
        data = msgspec.toml.decode(text)
    except msgspec.DecodeError:
        return exc.location
    table = data.get(head) if isinstance(data, dict) else None
    if not isinstance(table, dict):
        return exc.location
    for name, entry in table.items():
        try:
            msgspec.convert({**data, head: {name: entry}}, _PolicySpec)
        except msgspec.ValidationError as err:
            if str(err).partition(" - at `$")[0] == exc.detail:
                return f"{head}.{name}{rest}"
    return exc.location


def _policy_error(path: str, text: str, exc: ConfigurationError) -> str:
    location = exc.location
    if "[...]" in location:
        location = _resolve_entry(text, exc)
    unknown = re.search(r"unknown field `([^`]+)`", exc.detail)
    line = locate(text, f"{location}.{unknown.group(1)}".lstrip(".")) if unknown else None
    line = line or locate(text, location)
    if line is None:  # a TOML syntax error names its line in its message
        match = re.search(r"\(at line (\d+), column \d+\)", exc.detail)
        line = int(match.group(1)) if match else None
    where = f"{path}:{line}" if line else path
    what = f"{location}: {exc.detail}" if location else exc.detail
    return f"{where}: invalid policy: {what}"


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
    if policy.routes:
        _out()
        _out(f"routes ({len(policy.routes)}):")
        for line in _table([[r, "->", op] for r, op in policy.routes.items()]):
            _out(line)
    return EXIT_OK


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
            args.trace, policy, skip_bad=args.skip_bad, timeline=bool(args.plot), progress=bar
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

    policy = _load_policy(args.policy)
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


# -- meterkit demo ------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from meterkit.backends.memory.backend import MemoryBackend
    from meterkit.core.policy import Policy
    from meterkit.meter import Meter
    from meterkit.simulate import VirtualClock

    policy = Policy.crane_ledger()
    # The top of the current hour: hour windows then read the same in every run.
    start = time.time() // 3600 * 3600
    clock = VirtualClock(start)
    meter = Meter(policy, MemoryBackend(clock=clock))
    app, reports, org = "key_acme_app", "key_acme_reports", "org_acme"

    def at() -> str:
        return f"t+{clock.now - start:.2f}s"

    def line(d: Decision) -> None:
        tiers = " ".join(f"{t.remaining:>{len(t.name)}}" for t in d.tiers)
        _out(
            f"  {at():>8}  {d.operation:<17} {d.status:<6} {_credits(d.charged):>7}"
            f"  {_credits(d.balance):>8}  {tiers}"
        )

    def columns() -> None:
        names = " ".join(t.name for t in policy.tiers)
        _out(
            f"  {'clock':>8}  {'operation':<17} {'status':<6} {'charged':>7}  {'left':>8}  "
            f"{names} (remaining)"
        )

    _out("meterkit demo: the seed's policy on the in-memory backend, with a virtual clock")
    for i, tier in enumerate(policy.tiers):
        _out(f"  {'tiers' if i == 0 else '':<8} {tier.describe()}")
    _out(
        f"  {'credits':<8} {_credits(_dec(policy.credits.allowance_micro))} per organization "
        "per calendar month (UTC), no rollover"
    )
    _out(f"  {'clock':<8} starts at {_utc(start)}; waiting moves it, nothing sleeps")
    _out()
    _out(f"1. {app} of {org} lists invoices: meter.check(key, org=org, operation=op)")
    columns()
    first = None
    for _ in range(3):
        d = meter.check(app, org=org, operation="invoices.list")
        first = first or d
        line(d)
        clock.advance(1)
    assert first is not None
    _out("  headers of the first answer:")
    for name, value in first.headers.items():
        _out(f"    {name}: {value}")
    _out()

    _out("2. a burst: invoices.get every 50 ms until the key-burst tier (100/minute) says no")
    admitted = 0
    denied = None
    for _ in range(200):
        d = meter.check(app, org=org, operation="invoices.get")
        if not d.allowed:
            denied = d
            break
        admitted += 1
        clock.advance(0.05)
    assert denied is not None
    _out(f"  {admitted} more admitted (100 in the last minute with the 3 above), then at {at()}:")
    _out(f"  HTTP {denied.status} Too Many Requests")
    for name in ("Retry-After", "RateLimit", "RateLimit-Policy"):
        _out(f"    {name}: {denied.headers[name]}")
    for text in json.dumps(denied.error, indent=2).splitlines():
        _out("    " + text)
    rest = [meter.check(app, org=org, operation="invoices.get") for _ in range(20)]
    _out(
        f"  20 more calls at once: {sum(not r.allowed for r in rest)} denied, nothing charged "
        f"(balance still {_credits(rest[-1].balance)})"
    )
    _out()

    wait = denied.retry_after
    _out(f"3. wait retry_after = {wait:g} s (Retry-After rounds up) on the virtual clock; retry")
    clock.advance(wait)
    columns()
    line(meter.check(app, org=org, operation="invoices.get"))
    _out()

    _out(f"4. priced operations, with {reports} (its own key tiers, the same org's credits)")
    columns()
    for op in (
        "invoices.list",
        "invoices.create",
        "invoices.pdf",
        "currency.convert",
        "reports.generate",
    ):
        clock.advance(0.5)
        line(meter.check(reports, org=org, operation=op))
    _out()

    small = "org_tiny"
    meter.set_allowance(small, "0.30")
    _out(f"5. {small} may spend 0.30 credits this month: meter.set_allowance({small!r}, '0.30')")
    columns()
    last = None
    for op in ("reports.generate", "reports.generate", "invoices.list"):
        clock.advance(0.5)
        last = meter.check("key_tiny_app", org=small, operation=op)
        line(last)
    assert last is not None
    assert last.error is not None
    _out(
        f"  HTTP {last.status} Payment Required: credits reset at "
        f"{last.resets_at.isoformat().replace('+00:00', 'Z')}"
    )
    for text in json.dumps(last.error, indent=2).splitlines():
        _out("    " + text)
    _out()

    usage = meter.usage(org)
    _out(f"6. the usage report: meter.usage({org!r})")
    _print_usage(usage, indent="  ")
    return EXIT_OK


# -- the parser ---------------------------------------------------------------------------


class _Formatter(argparse.HelpFormatter):
    """Wraps prose; keeps text with line breaks (the exit codes) as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" not in text:
            return super()._fill_text(text, width, indent)
        paragraphs = text.split("\n\n")
        return "\n\n".join(
            p if "\n" in p else super(_Formatter, self)._fill_text(p, width, indent)
            for p in paragraphs
        )


def _parser() -> argparse.ArgumentParser:
    from meterkit import __version__

    common: dict[str, Any] = {"formatter_class": _Formatter, "epilog": _EXIT_CODES}
    parser = argparse.ArgumentParser(
        prog="meterkit",
        description="Authenticate API keys, enforce rate tiers and meter credits: "
        "try a policy, replay traffic, inspect usage, manage keys.",
        **common,
    )
    parser.add_argument("--version", action="version", version=f"meterkit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="show the seed's policy at work on simulated traffic",
        description="Run the Crane Ledger policy on the in-memory backend with a virtual "
        "clock and print what a client sees: admitted calls and their headers, a burst "
        "until the 429, a retry after retry_after, priced operations, a 402 when credits "
        "run out, and the usage report.",
        **common,
    )
    demo.set_defaults(run=_cmd_demo)

    policy = commands.add_parser(
        "policy", help="work with policy files", description="Work with policy files.", **common
    )
    policy_commands = policy.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)
    check = policy_commands.add_parser(
        "check",
        help="validate a policy file and print what it compiles to",
        description="Validate a policy file (TOML) and print its compiled tiers, prices and "
        "credit plan. An error names the line and the field, e.g. "
        "'policy.toml:21: invalid policy: tiers[2].rate: malformed rate'.",
        **common,
    )
    check.add_argument("file", metavar="FILE", help="the policy file (TOML)")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(run=_cmd_policy_check)

    sim = commands.add_parser(
        "simulate",
        help="replay a traffic trace through a policy",
        description="Replay a trace through a policy on the in-memory backend, with a virtual "
        "clock set to each request's timestamp (nothing sleeps). The trace is CSV with the "
        "header timestamp,key,org,operation or JSON Lines with those fields; timestamps are "
        "UNIX seconds or ISO 8601 (naive means UTC). '-' reads standard input.",
        **common,
    )
    sim.add_argument("trace", metavar="TRACE", help="the trace file (.csv or .jsonl), or -")
    sim.add_argument("--policy", metavar="FILE", help="a policy file (default: the seed's)")
    sim.add_argument("--json", action="store_true", help="print one JSON object")
    sim.add_argument(
        "--plot",
        metavar="OUT.png",
        help="draw admitted and denied requests over time (needs matplotlib)",
    )
    sim.add_argument(
        "--skip-bad", action="store_true", help="skip rows that cannot be replayed, and count them"
    )
    sim.add_argument(
        "--top",
        type=_positive,
        default=10,
        metavar="N",
        help="how many keys and organizations to list (default 10)",
    )
    sim.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    sim.set_defaults(run=_cmd_simulate)

    usage = commands.add_parser(
        "usage",
        help="this period's usage of an organization",
        description="Print the current period's requests and credits of an organization "
        "(or one of its keys) from a backend.",
        **common,
    )
    _backend_arguments(
        usage,
        key="only this key id",
        policy="the policy whose allowance applies (default: the seed's)",
    )
    usage.set_defaults(run=_cmd_usage)

    reset = commands.add_parser(
        "reset-limits",
        help="clear a key's or an organization's rate limits",
        description="Forget the rate-limit state of a key of an organization (its "
        "key-scoped tiers) or, without --key, of the organization (its org-scoped "
        "tiers). Credits and usage stay as they are.",
        **common,
    )
    _backend_arguments(
        reset,
        key="the key id (without it: the organization's own tiers)",
        policy="the policy whose tiers to clear (default: the seed's)",
    )
    reset.set_defaults(run=_cmd_reset_limits)

    keys_epilog = (
        "The server's pepper, if it uses one, is read from the METERKIT_PEPPER environment "
        "variable (never from the command line).\n\n" + _EXIT_CODES
    )
    keys_common: dict[str, Any] = {"formatter_class": _Formatter, "epilog": keys_epilog}
    keys = commands.add_parser(
        "keys",
        help="create, list, rotate and revoke API keys",
        description="Manage API keys in a key store.",
        **keys_common,
    )
    key_commands = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)

    def store_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", required=True, help="the key store, e.g. redis://host:6379/0")
        p.add_argument(
            "--namespace",
            default="mk",
            help="the prefix of the store's Redis key names (default mk)",
        )
        p.add_argument("--json", action="store_true", help="print JSON")

    create = key_commands.add_parser(
        "create",
        help="create a key and print its plaintext once",
        description="Create an API key. Its plaintext is printed once and never again.",
        **keys_common,
    )
    store_arg(create)
    create.add_argument("--org", required=True, help="the organization id (org_…)")
    create.add_argument(
        "--mode",
        choices=("live", "test"),
        default="live",
        help="a cl_live_ or cl_test_ key (default live)",
    )
    create.add_argument(
        "--permission",
        action="append",
        default=[],
        metavar="PERM",
        help="a permission such as invoices:read (repeat, or comma-separate)",
    )
    create.add_argument("--name", help="a label for people")
    expiry = create.add_mutually_exclusive_group()
    expiry.add_argument(
        "--expires-at", type=_when, metavar="WHEN", help="expiry as ISO 8601 (naive means UTC)"
    )
    expiry.add_argument(
        "--expires-in",
        type=_duration,
        metavar="DURATION",
        help="expiry from now: 3600, 30m, 24h, 90d",
    )
    create.set_defaults(run=_with_store(_keys_create))

    listing = key_commands.add_parser(
        "list",
        help="list an organization's keys",
        description="List an organization's keys (revoked and expired ones too), oldest first.",
        **keys_common,
    )
    store_arg(listing)
    listing.add_argument("--org", required=True, help="the organization id")
    listing.set_defaults(run=_with_store(_keys_list))

    rotate = key_commands.add_parser(
        "rotate",
        help="replace a key, keeping the old one for a grace period",
        description="Create a key like KEY_ID (same org, mode, permissions) and let KEY_ID "
        "keep working for the grace period. The new plaintext is printed once.",
        **keys_common,
    )
    store_arg(rotate)
    rotate.add_argument("key_id", metavar="KEY_ID", help="the key's public id (key_…)")
    rotate.add_argument(
        "--grace",
        type=_duration,
        default=86400.0,
        metavar="DURATION",
        help="how long the old key keeps working (default 24h)",
    )
    rotate.set_defaults(run=_with_store(_keys_rotate))

    revoke = key_commands.add_parser(
        "revoke",
        help="revoke a key at once",
        description="Revoke a key at once.",
        **keys_common,
    )
    store_arg(revoke)
    revoke.add_argument("key_id", metavar="KEY_ID", help="the key's public id (key_…)")
    revoke.set_defaults(run=_with_store(_keys_revoke))
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``meterkit`` command; return its exit code (see the module docstring)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a bad command line (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except _Failure as failure:
        _err(f"meterkit: error: {failure}")
        return failure.code
    except BackendError as exc:
        _err(f"meterkit: error: backend: {exc}")
        return EXIT_BACKEND
    except MeterkitError as exc:
        _err(f"meterkit: error: {exc}")
        return EXIT_INVALID
    except BrokenPipeError:
        # The reader went away (`meterkit simulate big.csv | head`): not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        _err("meterkit: interrupted")
        return 130
