"""``meterkit demo``: the seed's API, its policy and its errors, in the terminal."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meterkit.core.decision import Decision
from meterkit.cli.commands import (
    _dec,
    _print_usage,
)
from meterkit.cli.common import (
    EXIT_OK,
    _credits,
    _out,
    _utc,
)

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
