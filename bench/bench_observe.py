"""What observers cost a check and a request (issue 18).

    python -m pytest bench/bench_observe.py --benchmark-only -q -s -p no:cacheprovider
    METERKIT_BENCH_QUICK=1 python -m pytest bench/bench_observe.py --benchmark-only -q \
        -p no:cacheprovider
    python bench/bench_observe.py --instructions   # callgrind: instructions per check
    python bench/bench_observe.py --instructions --baseline ../main   # and another checkout's

Targets: with a :class:`~meterkit.prometheus.PrometheusObserver` (default labels) a
memory check costs at most 1.3x the check without observers, and a request under
uvicorn at most 1.05x (measured by ``bench_http.py``); without observers, nothing
(the meter runs the class's own ``check``, the one measured before observers existed).

Two measurements here, each interleaved (``bench/_interleave.py``), and one in
``bench/bench_http.py``:

* **the check**: ``bench_core``'s workload (the seed policy on ``MemoryBackend``, 10,000
  keys in 100 organizations, the simulated clock, every check admitted) without
  observers, with a do-nothing observer (what the hook alone costs: the event and the
  timing), with Prometheus, and with Prometheus labelling the 100 busiest
  organizations;
* **the middleware in process**: ``bench_middleware``'s ASGI request (route, key,
  check, headers; no server), without observers and with Prometheus;
* **the request under uvicorn**: ``bench_http.py``'s ``fastapi+meterkit+prom`` side
  (its ``fastapi+meterkit`` app reporting to Prometheus, serving ``/metrics``) against
  ``fastapi+meterkit``, one uvicorn worker each, driven by ``wrk`` in interleaved
  rounds (``python bench/bench_http.py --only fastapi+meterkit fastapi+meterkit+prom``).

``--instructions`` counts the instructions of a check under callgrind (valgrind's
``--tool=callgrind``; two runs of 10,000 and 30,000 checks, the difference over
20,000): a figure that does not move with the machine's load, for a machine too busy
for timings. Ratios are printed and recorded, never asserted.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from bench._interleave import interleave  # noqa: E402
from bench.bench_core import KEYS, OPERATION, ROUND_SECONDS, ROUNDS, Side, sim_clock, traffic  # noqa: E402
from meterkit import MemoryBackend, Meter, Policy  # noqa: E402

QUICK = os.environ.get("METERKIT_BENCH_QUICK", "") not in ("", "0")
CHECK_TARGET = 1.3
REQUEST_TARGET = 1.05

Report = Callable[[str], None]


# -- the check ------------------------------------------------------------------------------


def observed_side(name: str, observers: Callable[[], Any], n_keys: int = KEYS) -> Side:
    """bench_core's meterkit side, its meter made with ``on_decision=observers()``."""
    warm, timed = traffic(n_keys)
    nxt = itertools.cycle(timed).__next__
    denied = [0]
    check: Callable[..., Any]

    def fresh() -> None:
        nonlocal check
        meter = Meter(
            Policy.crane_ledger(), MemoryBackend(clock=sim_clock(n_keys)), on_decision=observers()
        )
        check = meter.check
        for key, org in warm:
            check(key, org=org, operation=OPERATION)

    fresh()

    def run() -> None:
        key, org = nxt()
        if not check(key, org=org, operation=OPERATION).allowed:
            denied[0] += 1

    return Side(name, run, fresh, denied)


def _prometheus(**options: Any) -> Callable[[], Any]:
    from prometheus_client import CollectorRegistry

    from meterkit.prometheus import PrometheusObserver

    return lambda: PrometheusObserver(CollectorRegistry(), **options)


def check_sides() -> list[Side]:
    return [
        observed_side("meterkit", lambda: None),
        observed_side("+hook", lambda: lambda event: None),
        observed_side("+prometheus", _prometheus()),
        observed_side("+prometheus(org top-100)", _prometheus(org_label=100)),
    ]


def test_check_with_observers(benchmark: Any, figures: Report) -> None:
    """Print what the hook and the Prometheus observer add to a memory check."""
    sides = check_sides()
    result = benchmark.pedantic(
        lambda: interleave(
            {s.name: s.run for s in sides}, rounds=ROUNDS, round_seconds=ROUND_SECONDS
        ),
        rounds=1,
        iterations=1,
    )
    figures(
        f"OBSERVE the check, interleaved rounds (µs per check), {'quick' if QUICK else 'full'}:"
    )
    figures(result.table())
    for side in sides[1:]:
        ratio = result.ratio(side.name, "meterkit")
        target = f"  [target <= {CHECK_TARGET}x: {'met' if ratio <= CHECK_TARGET else 'NOT met'}]"
        figures(
            f"RATIO meterkit{side.name} costs {ratio:.2f}x the check without observers"
            f"{target if side.name == '+prometheus' else ''}"
        )
        benchmark.extra_info[f"check{side.name}/check"] = round(ratio, 3)
    for side in sides:
        assert side.denied[0] == 0, f"{side.name} was denied {side.denied[0]} times"


# -- the middleware, in process ---------------------------------------------------------------


def test_middleware_with_prometheus(benchmark: Any, figures: Report) -> None:
    """Print what the Prometheus observer adds to a request through the ASGI middleware,
    in process (no server: meterkit's own time is all there is)."""
    from bench.bench_middleware import AsgiDriver, bare_asgi, make_keys
    from bench.bench_middleware import sim_clock as middleware_clock
    from meterkit.asgi import MeterMiddleware
    from meterkit.keys.memory import MemoryKeyStore

    store = MemoryKeyStore()
    keys = make_keys(store)

    def driver(observers: Any) -> AsgiDriver:
        meter = Meter(
            Policy.crane_ledger(), MemoryBackend(clock=middleware_clock()), on_decision=observers
        )
        return AsgiDriver(MeterMiddleware(bare_asgi, meter=meter, keystore=store), keys)

    plain, observed = driver(None), driver(_prometheus()())
    result = benchmark.pedantic(
        lambda: interleave(
            {"middleware": plain, "middleware+prometheus": observed},
            rounds=7 if QUICK else 31,
            round_seconds=0.02,
        ),
        rounds=1,
        iterations=1,
    )
    figures("OBSERVE the ASGI middleware in process (µs per request):")
    figures(result.table())
    ratio = result.ratio("middleware+prometheus", "middleware")
    figures(f"RATIO middleware+prometheus costs {ratio:.2f}x the request without observers")
    benchmark.extra_info["middleware+prometheus/middleware"] = round(ratio, 3)
    assert set(plain.statuses) == {200}, plain.statuses
    assert set(observed.statuses) == {200}, observed.statuses


# -- instructions per check (python bench/bench_observe.py --instructions) -------------------------

_PROGRAM = """
import itertools, sys
sys.path.insert(0, {root!r})
from bench.bench_core import traffic, sim_clock, OPERATION
from meterkit import MemoryBackend, Meter, Policy
kind, n, keys = sys.argv[1], int(sys.argv[2]), 2000
observers = None
if kind == "prometheus":
    from prometheus_client import CollectorRegistry
    from meterkit.prometheus import PrometheusObserver
    observers = PrometheusObserver(CollectorRegistry())
elif kind == "hook":
    observers = lambda event: None
warm, timed = traffic(keys)
backend = MemoryBackend(clock=sim_clock(keys))
if observers is None:  # (as a checkout from before observers can run it too)
    check = Meter(Policy.crane_ledger(), backend).check
else:
    check = Meter(Policy.crane_ledger(), backend, on_decision=observers).check
for key, org in warm:
    check(key, org=org, operation=OPERATION)
nxt = itertools.cycle(timed).__next__
for _ in range(n):
    key, org = nxt()
    assert check(key, org=org, operation=OPERATION).allowed
"""


def instructions(kind: str, checks: int, folder: Path, root: Path = ROOT) -> int:
    """Instructions callgrind counts for a program of ``checks`` checks, with the meterkit
    of the checkout at ``root``."""
    program = folder / "program.py"
    program.write_text(_PROGRAM.format(root=str(root)), encoding="utf-8")
    out = folder / f"callgrind.{kind}.{checks}"
    done = subprocess.run(
        [
            *["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"],
            *[sys.executable, str(program), kind, str(checks)],
        ],
        capture_output=True,
        text=True,
        check=True,
        # (nothing written into the checkout measured, which may be someone else's; one
        # hash seed for every run: dict probes, and so the counts, follow string hashes)
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"},
    )
    match = re.search(r"Collected : (\d+)", done.stderr)
    if match is None:
        raise RuntimeError(done.stderr)
    return int(match.group(1))


def instructions_per_check(baseline: Path | None = None) -> None:
    """Instructions per check without observers, with the hook alone, with Prometheus;
    and, given the ``baseline`` checkout (another worktree, such as the one before
    observers), its check's."""
    if shutil.which("valgrind") is None:
        print("valgrind is not installed")
        return
    runs = [("none", ROOT), ("hook", ROOT), ("prometheus", ROOT)]
    if baseline is not None:
        runs.insert(0, ("baseline", baseline))
    per: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mk-callgrind-") as tmp:
        for kind, root in runs:
            mode = "none" if kind == "baseline" else kind
            low, high = (instructions(mode, n, Path(tmp), root) for n in (10_000, 30_000))
            per[kind] = (high - low) / 20_000
            print(f"INSTRUCTIONS {kind:<10} {per[kind]:9,.0f} per check ({root})", flush=True)
    for kind in ("hook", "prometheus"):
        print(f"RATIO instructions {kind}/none: {per[kind] / per['none']:.3f}x")
    if baseline is not None:
        print(f"RATIO instructions none/baseline: {per['none'] / per['baseline']:.4f}x")


if __name__ == "__main__":
    if "--instructions" in sys.argv:
        given = sys.argv[sys.argv.index("--baseline") + 1] if "--baseline" in sys.argv else None
        instructions_per_check(None if given is None else Path(given))
    else:
        print(__doc__)
