"""What a memory check costs in instructions, without and with the ledger: Python
under callgrind.

    python bench/memory_instructions.py            # 2,000 keys, 20,000 checks measured

Time on a shared machine wanders; instruction counts do not. Each figure is the
difference between two runs of the same process under ``valgrind --tool=callgrind``
(the seed policy on ``MemoryBackend`` with the simulated clock, 2,000 keys in 20
organizations warmed up, then N checks): one with ``--checks`` checks and one with
none, divided by ``--checks``, so start-up and warm-up cancel out. With the ledger,
each admitted check also appends its event to the backend's log (emptied by nothing:
the log's capacity is the default, 1,000,000). Needs ``valgrind``; about a minute.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import itertools, sys
sys.path.insert(0, {root!r})
from meterkit import MemoryBackend, Meter, Policy
keys = [(f"key_{{i:05d}}", f"org_{{i % 20:03d}}") for i in range(2000)]
clock = itertools.count(1_767_225_600.0, 0.05).__next__
meter = Meter(Policy.crane_ledger(), MemoryBackend(clock, ledger={ledger}))
check = meter.check
for key, org in keys:
    check(key, org=org, operation="invoices.list")
for i in range({checks}):
    key, org = keys[i % 2000]
    assert check(key, org=org, operation="invoices.list").allowed
"""


def _instructions(checks: int, ledger: bool) -> int:
    root = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory(prefix="meterkit-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-c",
                _CHILD.format(root=root, ledger=ledger, checks=checks),
            ],
            check=True,
            capture_output=True,
        )
        for line in out.read_text().splitlines():
            found = re.match(r"(?:totals|summary):\s+(\d+)", line)
            if found:
                return int(found.group(1))
    raise RuntimeError("no total in the callgrind output")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", type=int, default=20_000, help="checks measured")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not on PATH")
    per_check = {}
    for ledger in (False, True):
        total = _instructions(args.checks, ledger) - _instructions(0, ledger)
        per_check[ledger] = total / args.checks
        word = "with" if ledger else "without"
        print(f"INSTRUCTIONS per memory check {word} the ledger: {per_check[ledger]:,.0f}")
    added = per_check[True] - per_check[False]
    print(
        f"RATIO ledger/no ledger memory: {per_check[True] / per_check[False]:.3f}x "
        f"({added:,.0f} instructions more per check)"
    )


if __name__ == "__main__":
    main()
