"""The ``meterkit`` command: demo, policy check, simulate, usage, plans, keys, ledger.

``main(argv)`` parses, runs one command and returns its exit code; it never calls
``sys.exit`` itself, so tests run it in-process. Exit codes are a contract:

    0  success
    1  invalid input: a policy file, an argument value, an unknown key
    2  usage error: bad command line, unreadable or malformed trace
    3  the backend or key store cannot be reached (or its driver is missing)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from meterkit.errors import (
    BackendError,
    MeterkitError,
)

if TYPE_CHECKING:
    pass
from meterkit.cli.commands import (
    _backend_arguments,
    _cmd_plans_clear,
    _cmd_plans_set,
    _cmd_plans_show,
    _cmd_policy_check,
    _cmd_reset_limits,
    _cmd_simulate,
    _cmd_usage,
    _duration,
    _keys_create,
    _keys_list,
    _keys_revoke,
    _keys_rotate,
    _when,
    _with_store,
)
from meterkit.cli.common import (
    _EXIT_CODES,
    EXIT_BACKEND,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_USAGE,
    _err,
    _Failure,
)
from meterkit.cli.demo import (
    _cmd_demo,
)
from meterkit.cli.ledger import add_ledger_commands

__all__ = ["main"]


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
        "UNIX seconds or ISO 8601 (naive means UTC); an optional column plan moves the "
        "request's organization to that plan. '-' reads standard input.",
        **common,
    )
    sim.add_argument("trace", metavar="TRACE", help="the trace file (.csv or .jsonl), or -")
    sim.add_argument(
        "--policy",
        metavar="FILE",
        help="a policy file (default: $METERKIT_POLICY, else the seed's; the report names it)",
    )
    sim.add_argument(
        "--plan",
        metavar="NAME",
        help="put every organization on this plan of the policy (default: the default "
        "plan); a trace's plan column, where it names one, moves the request's "
        "organization to that plan from then on",
    )
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
        policy="the policy whose allowance applies (required, or $METERKIT_POLICY)",
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
        policy="the policy whose tiers to clear (required, or $METERKIT_POLICY)",
    )
    reset.set_defaults(run=_cmd_reset_limits)

    plans = commands.add_parser(
        "plans",
        help="put organizations and keys on plans, give negotiated limits",
        description="Read and change the plans a backend keeps: an organization's plan, "
        "a key's own plan, and an organization's negotiated limits. A check uses them "
        "from its next request on, and keeps the counts of the current windows.",
        **common,
    )
    plan_commands = plans.add_subparsers(dest="plans_command", metavar="COMMAND", required=True)
    plans_policy = "the policy whose plans to use (required, or $METERKIT_POLICY)"
    plan_set = plan_commands.add_parser(
        "set",
        help="put an organization (or a key) on a plan, or give it negotiated limits",
        description="Put the organization (or with --key, one of its keys) on PLAN, and/or "
        "give the organization negotiated limits with --limit (they replace its limits "
        "before; a key has no limits of its own).",
        **common,
    )
    plan_set.add_argument("plan", metavar="PLAN", nargs="?", help="a plan of the policy")
    _backend_arguments(plan_set, key="put only this key on PLAN", policy=plans_policy)
    plan_set.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="TIER=RATE",
        help="a negotiated limit, e.g. org-hour=50000/hour or trial=off (repeat)",
    )
    plan_set.set_defaults(run=_cmd_plans_set)
    plan_show = plan_commands.add_parser(
        "show",
        help="the plans, limits, tiers and allowance in force",
        description="Print the plan an organization (or one of its keys) is on, its "
        "negotiated limits, and the tiers and allowance they give.",
        **common,
    )
    _backend_arguments(plan_show, key="and this key's own plan", policy=plans_policy)
    plan_show.set_defaults(run=_cmd_plans_show)
    plan_clear = plan_commands.add_parser(
        "clear",
        help="take an organization (or a key) off its plan",
        description="Take the organization off its plan and its negotiated limits (the "
        "default plan again), or with --key, the key off its own plan (its "
        "organization's again), or with --limits, only the negotiated limits.",
        **common,
    )
    _backend_arguments(plan_clear, key="take only this key off its plan", policy=plans_policy)
    plan_clear.add_argument(
        "--limits", action="store_true", help="take away only the negotiated limits"
    )
    plan_clear.set_defaults(run=_cmd_plans_clear)

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

    add_ledger_commands(commands, common)
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
