"""What a check costs Redis, in instructions: redis-server under callgrind.

    python bench/redis_instructions.py            # batched (check_many) and single checks
    python bench/redis_instructions.py --single 2000 --batches 50

Time on a shared machine wanders; instruction counts do not (the same binary, inputs
and traffic give the same total to about 0.1%, whatever else the machine is doing).
So a change to the Lua scripts is measured here first, and in ``bench_redis.py`` after.

It starts ``redis-server`` (no persistence) under ``valgrind --tool=callgrind`` on a
free port, visits the benchmark's 20,000 keys of 2,000 organizations once with the
seed policy and the server's clock (so the measured checks update state instead of
creating it), zeroes the counters, runs the measured checks, dumps, and prints the
server's instructions per check: everything the server did, network included. Needs
``valgrind`` (``apt install valgrind``); about a minute.
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


def measure(single: int, batches: int) -> dict[str, float]:
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
        finally:
            server.terminate()
            server.wait(timeout=60)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--single", type=int, default=5_000, help="single checks measured")
    parser.add_argument("--batches", type=int, default=100, help="check_many(100) measured")
    args = parser.parse_args()
    for label, value in measure(args.single, args.batches).items():
        print(f"INSTRUCTIONS redis-server {label}: {value:,.0f}")


if __name__ == "__main__":
    main()
