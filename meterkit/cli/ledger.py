"""``meterkit ledger``: drain events into a store, read history, reconcile, export."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from meterkit.cli.common import (
    EXIT_BACKEND,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_USAGE,
    _credits,
    _err,
    _Failure,
    _json,
    _out,
    _table,
)
from meterkit.errors import MeterkitError

__all__ = ["add_ledger_commands"]


def _store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--to",
        "--ledger",
        dest="to",
        required=True,
        metavar="STORE",
        help="the ledger store: sqlite:///path.db (sqlite:////absolute.db) or postgresql://…",
    )


def _range_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--period", help="a month YYYY-MM or a day YYYY-MM-DD (UTC)")
    parser.add_argument("--since", metavar="DATE", help="the first day, YYYY-MM-DD (UTC)")
    parser.add_argument("--until", metavar="DATE", help="the day after the last, YYYY-MM-DD")


def add_ledger_commands(commands: Any, common: dict[str, Any]) -> None:
    """Add ``meterkit ledger drain|usage|reconcile|export`` to the command parser."""
    ledger = commands.add_parser(
        "ledger",
        help="the usage ledger: drain, history, reconcile, export",
        description="Move ledger events from Redis into SQL, read usage history of any "
        "past period, reconcile the ledger with the counters, export events for billing. "
        "See docs/ledger.md.",
        **common,
    )
    sub = ledger.add_subparsers(dest="ledger_command", metavar="COMMAND", required=True)

    drain = sub.add_parser(
        "drain",
        help="move ledger events from Redis into a store, exactly once",
        description="Move the ledger events of a Redis backend (made with ledger=True) into "
        "a SQLite or PostgreSQL store, each exactly once, until interrupted (SIGINT, "
        "SIGTERM: the current batch is finished first) or, with --once, until nothing is "
        "left. Several drains may run at once; a drain killed at any point loses nothing.",
        **common,
    )
    drain.add_argument("--url", required=True, help="the backend, e.g. redis://host:6379/0")
    _store_argument(drain)
    drain.add_argument("--prefix", default="mk", help="the backend's key prefix (default mk)")
    drain.add_argument("--group", default="meterkit", help="the consumer group (default meterkit)")
    drain.add_argument(
        "--consumer",
        help="this drain's name in the group (default host-pid; a drain restarted under "
        "the same name takes its pending events back at once)",
    )
    drain.add_argument("--batch", type=int, default=1000, help="events per batch (default 1000)")
    drain.add_argument(
        "--claim-idle",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="claim another drain's events after they were pending this long (default 30)",
    )
    drain.add_argument(
        "--idle", type=float, default=0.2, metavar="SECONDS", help="pause when idle (default 0.2)"
    )
    drain.add_argument("--once", action="store_true", help="drain what is there, then exit")
    drain.add_argument("--json", action="store_true", help="print the summary as JSON")
    drain.set_defaults(run=_cmd_drain)

    usage = sub.add_parser(
        "usage",
        help="usage history of an organization from the ledger",
        description="Print an organization's (or one key's) requests and credits over a "
        "past period, per operation, key, day and month, from the ledger store.",
        **common,
    )
    _store_argument(usage)
    usage.add_argument("--org", required=True, help="the organization id")
    usage.add_argument("--key", help="only this key id")
    usage.add_argument("--mode", choices=("live", "test"), default="live")
    _range_arguments(usage)
    usage.add_argument("--json", action="store_true", help="print one JSON object")
    usage.set_defaults(run=_cmd_usage)

    rec = sub.add_parser(
        "reconcile",
        help="prove the ledger's sums equal the counters' (exit 0), or name differences (1)",
        description="For the current month, compare every organization's counters in "
        "Redis with the ledger (the store's events plus those not yet drained, read in "
        "the same step as the counters): requests and credits per key and operation, "
        "top-ups per organization. Exit 0 when all agree, 1 otherwise (each difference "
        "is printed).",
        **common,
    )
    rec.add_argument("--url", required=True, help="the backend, e.g. redis://host:6379/0")
    _store_argument(rec)
    rec.add_argument("--prefix", default="mk", help="the backend's key prefix (default mk)")
    rec.add_argument(
        "--org", action="append", default=[], help="only this organization (repeat for more)"
    )
    rec.add_argument("--mode", choices=("live", "test"), help="with --org: its mode (default both)")
    rec.add_argument("--json", action="store_true", help="print one JSON object")
    rec.set_defaults(run=_cmd_reconcile)

    export = sub.add_parser(
        "export",
        help="export ledger events as CSV or CloudEvents JSON lines",
        description="Write the ledger's events of a period (oldest first) as CSV or as "
        "JSON lines shaped like CloudEvents 1.0 (type dev.meterkit.<kind>, subject the "
        "organization), for a billing system.",
        **common,
    )
    _store_argument(export)
    _range_arguments(export)
    export.add_argument("--org", help="only this organization")
    export.add_argument("--mode", choices=("live", "test"), help="only this mode")
    export.add_argument(
        "--format", choices=("csv", "cloudevents"), default="csv", help="(default csv)"
    )
    export.add_argument("--output", "-o", metavar="FILE", help="write here (default stdout)")
    export.set_defaults(run=_cmd_export)


def _store(url: str) -> Any:
    from meterkit.ledger.store import store_from_url

    return store_from_url(url)


@contextmanager
def _stopping_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set ``stop`` (the batch in hand is finished) while inside."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _cmd_drain(args: argparse.Namespace) -> int:
    from meterkit.ledger.drain import Drain

    store = _store(args.to)
    try:
        drain = Drain(
            args.url,
            store,
            prefix=args.prefix,
            group=args.group,
            consumer=args.consumer,
            batch=args.batch,
            claim_idle=args.claim_idle,
        )
    except BaseException:
        store.close()
        raise
    stop = threading.Event()
    try:
        if args.once:
            drain.run_once()
        else:
            with _stopping_on_signals(stop):
                # Said once the signals are caught: a SIGTERM from then on finishes
                # the batch in hand and exits 0.
                if not args.json:
                    _err(f"meterkit: draining into {store.url} (Ctrl-C or SIGTERM stops)")
                drain.run(idle=args.idle, stop=stop)
    finally:
        drain.close()
        store.close()
    stats = drain.stats
    if args.json:
        _json(
            {
                "moved": stats.moved,
                "inserted": stats.inserted,
                "claimed": stats.claimed,
                "failures": stats.failures,
            }
        )
    else:
        _out(
            f"moved {stats.moved:,} events ({stats.inserted:,} new, {stats.claimed:,} claimed "
            f"from other drains, {stats.failures:,} failed batches retried)"
        )
    return EXIT_OK


def _bounds(args: argparse.Namespace) -> Any:
    from meterkit.ledger.history import period_bounds

    if args.period is None and args.since is None and args.until is None:
        raise _Failure("give --period, or --since and --until", EXIT_USAGE)
    return period_bounds(args.period, args.since, args.until)


def _cmd_usage(args: argparse.Namespace) -> int:
    from meterkit.ledger.history import history
    from meterkit.meter import check_id

    check_id(args.org, "org")
    if args.key is not None:
        check_id(args.key, "key")
    since, until = _bounds(args)
    store = _store(args.to)
    try:
        found = history(store, args.org, args.key, args.mode, since, until)
    finally:
        store.close()
    if args.json:
        _json(found.to_dict())
        return EXIT_OK
    who = found.org if found.key is None else f"{found.key} of {found.org}"
    _out(
        f"usage of {who} ({found.mode}), {since} to {until} (UTC, until excluded), from the ledger"
    )
    _out(
        f"  requests {found.requests:,}   credits {_credits(found.credits)}   "
        f"(charged {_credits(found.charged)}, refunded {_credits(found.refunded)} in "
        f"{found.refunds:,} refunds)   topped up {_credits(found.topped_up)}"
    )
    sections: list[tuple[str, list[list[str]]]] = [
        (
            "operation",
            [[k, f"{v.requests:,}", _credits(v.credits)] for k, v in found.operations.items()],
        ),
        ("key", [[k, f"{v.requests:,}", _credits(v.credits)] for k, v in found.keys.items()]),
        ("month", [[m.month, f"{m.requests:,}", _credits(m.credits)] for m in found.months]),
        ("day", [[str(d.day), f"{d.requests:,}", _credits(d.credits)] for d in found.days]),
    ]
    for name, rows in sections:
        if rows and not (name == "key" and found.key is not None):
            _out(f"  per {name}:")
            for line in _table([[name, "requests", "credits"], *rows], right=(1, 2)):
                _out("  " + line)
    return EXIT_OK


def _cmd_reconcile(args: argparse.Namespace) -> int:
    from meterkit.connect import backend_from_url
    from meterkit.ledger.reconcile import reconcile

    if args.mode and not args.org:
        raise _Failure("--mode goes with --org", EXIT_USAGE)
    orgs = None
    if args.org:
        modes = [args.mode] if args.mode else ["live", "test"]
        orgs = [(org, mode) for org in args.org for mode in modes]
    if args.url.lower().startswith("memory:"):
        raise _Failure("a memory:// backend lives in its process: reconcile it there", EXIT_USAGE)
    backend = _connect(lambda: backend_from_url(args.url, prefix=args.prefix, timeout=30))
    store = _store(args.to)
    try:
        result = reconcile(backend, store, orgs=orgs)
    finally:
        store.close()
        backend.close()
    if args.json:
        _json(result.to_dict())
    else:
        month = result.period_start.strftime("%Y-%m")
        for difference in result.differences:
            _out(f"DIFFERENT {difference}")
        verdict = "agree" if result.ok else f"disagree in {len(result.differences):,} places"
        _out(
            f"{month}: counters and ledger {verdict} ({result.orgs:,} organizations, "
            f"{result.pairs:,} key and operation pairs, {result.undrained:,} events not yet "
            "drained counted from Redis)"
        )
    return EXIT_OK if result.ok else EXIT_INVALID


def _connect(make: Callable[[], Any]) -> Any:
    try:
        return make()
    except ImportError as exc:
        raise _Failure(f"{exc} (pip install 'meterkit[redis]')", EXIT_BACKEND) from None


def _cmd_export(args: argparse.Namespace) -> int:
    from meterkit.ledger.history import utc_start
    from meterkit.ledger.reconcile import write_cloudevents, write_csv

    since, until = _bounds(args)
    lo = int(utc_start(since).timestamp()) * 1_000_000
    hi = int(utc_start(until).timestamp()) * 1_000_000
    store = _store(args.to)
    try:
        events = store.events(org=args.org, mode=args.mode, since=lo, until=hi)
        write = write_csv if args.format == "csv" else write_cloudevents
        if args.output:
            try:
                with open(args.output, "w", encoding="utf-8", newline="") as out:
                    n = write(events, out)
            except OSError as exc:
                raise _Failure(f"cannot write {args.output}: {exc.strerror}", EXIT_USAGE) from None
            _err(f"meterkit: {n:,} events written to {args.output}")
        else:
            write(events, sys.stdout)
    except MeterkitError:
        raise
    finally:
        store.close()
    return EXIT_OK
