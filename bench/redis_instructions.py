"""What a check costs Redis, in instructions: redis-server under callgrind.

    python bench/redis_instructions.py            # batched (check_many) and single checks
    python bench/redis_instructions.py --single 2000 --batches 50
    python bench/redis_instructions.py --plans    # and single checks under customer plans
    python bench/redis_instructions.py --ledger   # and checks with the ledger, and a drain

Time on a shared machine wanders; instruction counts do not (the same binary, inputs
and traffic give the same total to about 0.1%, whatever else the machine is doing).
So a change to the Lua scripts is measured here first, and in ``bench_redis.py`` after.

It starts ``redis-server`` (no persistence) under ``valgrind --tool=callgrind`` on a
free port, visits the benchmark's 20,000 keys of 2,000 organizations once with the
seed policy and the server's clock (so the measured checks update state instead of
creating it), zeroes the counters, runs the measured checks, dumps, and prints the
server's instructions per check: everything the server did, network included. Needs
``valgrind`` (``apt install valgrind``); about a minute.

With ``--plans`` it then measures single checks, each run on the emptied server warmed
afresh: of the seed policy; of the seed policy with a plan "pro" added
(bench_core.planned_policy) under the default plan, while another organization is on
pro; with every organization on pro; and with every organization on pro and one key
of each on the default plan (the script then reads that key's plan too).

With ``--ledger`` it measures single and batched checks of the seed policy without and
with the ledger (``ledger=True``: each admitted check also appends its event to the
stream), each on the emptied server warmed afresh; then what a drain costs the server
per event it moves (``XREADGROUP``, ``XACK`` and the trim script, in batches of 1,000)
once the stream holds every event of the run.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from bench.bench_core import planned_policy
from meterkit import Meter, Policy
from meterkit.connect import backend_from_url
from tests._servers import free_port


def _traffic() -> list[tuple[str, str, str]]:
    keys = [(f"key_{i:05d}", f"org_{i % 2000:04d}") for i in range(20_000)]
    random.Random(7).shuffle(keys)
    return [(key, "invoices.list", org) for key, org in keys]


def _total(path: Path) -> int:
    """The total of a callgrind output file (its ``totals:`` or ``summary:`` line)."""
    for line in path.read_text().splitlines():
        found = re.match(r"(?:totals|summary):\s+(\d+)", line)
        if found:
            return int(found.group(1))
    raise RuntimeError(f"no total in {path}")


def measure(
    single: int, batches: int, plans: bool = False, ledger: bool = False
) -> dict[str, float]:
    for tool in ("valgrind", "callgrind_control", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not on PATH")
    port = free_port()
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="meterkit-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        server = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                "redis-server",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(port=port)
            for _ in range(600):  # valgrind starts slowly
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.1)
            url = f"redis://127.0.0.1:{port}/0"
            meter = Meter(Policy.crane_ledger(), backend_from_url(url, prefix="cg", timeout=60))
            requests = _traffic()
            for i in range(0, len(requests), 100):
                meter.check_many(requests[i : i + 100])
            meter.check(*requests[0][:1], org=requests[0][2], operation=requests[0][1])

            def counted(label: str, checks: int, run: object) -> None:
                subprocess.run(
                    ["callgrind_control", "-z", str(server.pid)], check=True, capture_output=True
                )
                run()  # type: ignore[operator]
                subprocess.run(
                    ["callgrind_control", "-d", str(server.pid)], check=True, capture_output=True
                )
                dumps = sorted(
                    Path(tmp).glob("callgrind.out.*"), key=lambda p: int(p.name.rsplit(".", 1)[1])
                )
                figures[label] = _total(dumps[-1]) / checks

            def batched() -> None:
                for j in range(batches):
                    start = (j * 100) % len(requests)
                    meter.check_many(requests[start : start + 100])

            def one_by_one() -> None:
                for j in range(single):
                    key, operation, org = requests[(j * 7) % len(requests)]
                    meter.check(key, org=org, operation=operation)

            counted("per request of check_many(100)", batches * 100, batched)
            counted("per single check", single, one_by_one)
            meter.close()
            if plans:
                # Each on an emptied server (FLUSHALL), warmed the same way: a server
                # whose key table is growing pays for rehashing it, which would fall on
                # whichever run crosses a size.
                orgs = sorted({org for _, _, org in requests})
                for label, policy, assign in (
                    ("per single check, the seed policy", Policy.crane_ledger(), "none"),
                    ("per single check, default plan", planned_policy(), "none"),
                    ("per single check under an assigned plan", planned_policy(), "orgs"),
                    ("per single check under plans, keys with plans too", planned_policy(), "keys"),
                ):
                    client.flushall()
                    meter = Meter(policy, backend_from_url(url, prefix="cg", timeout=60))
                    if policy.plans:
                        meter.set_plan("org_elsewhere", "pro")
                    if assign != "none":
                        for org in orgs:
                            meter.set_plan(org, "pro")
                    if assign == "keys":
                        for key, _, org in requests[: len(orgs) * 2 : 2]:
                            meter.set_plan(org, "default", key=key)
                    for i in range(0, len(requests), 100):
                        meter.check_many(requests[i : i + 100])
                    key, operation, org = requests[0]  # (loads the one-check script)
                    meter.check(key, org=org, operation=operation)
                    counted(label, single, one_by_one)
                    meter.close()
            if ledger:
                from meterkit.ledger import Drain

                for on in (False, True):
                    client.flushall()
                    backend = backend_from_url(url, prefix="cg", timeout=60, ledger=on)
                    meter = Meter(Policy.crane_ledger(), backend)
                    for i in range(0, len(requests), 100):
                        meter.check_many(requests[i : i + 100])
                    key, operation, org = requests[0]  # (loads the one-check script)
                    meter.check(key, org=org, operation=operation)
                    word = "with" if on else "without"
                    counted(f"per single check {word} the ledger", single, one_by_one)
                    counted(
                        f"per request of check_many(100) {word} the ledger", batches * 100, batched
                    )
                    meter.close()
                events = client.xlen("cg:ledger")
                drain = Drain(url, f"sqlite:///{tmp}/ledger.db", prefix="cg", batch=1_000)
                counted("per event a drain moves", events, drain.run_once)
                drain.close()
        finally:
            server.terminate()
            server.wait(timeout=60)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--single", type=int, default=5_000, help="single checks measured")
    parser.add_argument("--batches", type=int, default=100, help="check_many(100) measured")
    parser.add_argument("--plans", action="store_true", help="also checks under plans")
    parser.add_argument("--ledger", action="store_true", help="also checks with the ledger")
    args = parser.parse_args()
    figures = measure(args.single, args.batches, args.plans, args.ledger)
    for label, value in figures.items():
        print(f"INSTRUCTIONS redis-server {label}: {value:,.0f}")
    if args.plans:
        default = figures["per single check, default plan"]
        for label in (
            "per single check under an assigned plan",
            "per single check under plans, keys with plans too",
        ):
            ratio = figures[label] / default
            met = "met" if ratio <= 1.15 else "NOT met"
            print(f"RATIO {label} / default plan: {ratio:.3f}x  [target <= 1.15x: {met}]")
        unused = default / figures["per single check, the seed policy"]
        print(f"RATIO default plan of a policy with plans / the seed policy: {unused:.3f}x")
    if args.ledger:
        for what in ("per single check", "per request of check_many(100)"):
            ratio = figures[f"{what} with the ledger"] / figures[f"{what} without the ledger"]
            met = "met" if ratio <= 1.15 else "NOT met"
            print(f"RATIO ledger {what}: {ratio:.3f}x  [target <= 1.15x: {met}]")


if __name__ == "__main__":
    main()
