"""What observers cost a check and a request (issue 18).

    python -m pytest bench/bench_observe.py --benchmark-only -q -s -p no:cacheprovider
    METERKIT_BENCH_QUICK=1 python -m pytest bench/bench_observe.py --benchmark-only -q \
        -p no:cacheprovider
    python bench/bench_observe.py --instructions   # callgrind: instructions per check
    python bench/bench_observe.py --instructions --baseline ../main   # and another checkout's

Targets: with a :class:`~meterkit.prometheus.PrometheusObserver` (default labels) a
memory check costs at most 1.3x the check without observers, and a request under
uvicorn at most 1.05x; without observers, nothing (the meter runs the class's own
``check``, the one measured before observers existed).

Three measurements, each interleaved (``bench/_interleave.py``):

* **the check**: ``bench_core``'s workload (the seed policy on ``MemoryBackend``, 10,000
  keys in 100 organizations, the simulated clock, every check admitted) without
  observers, with a do-nothing observer (what the hook alone costs: the event and the
  timing), with Prometheus, and with Prometheus labelling the 100 busiest
  organizations;
* **the middleware in process**: ``bench_middleware``'s ASGI request (route, key,
  check, headers; no server), without observers and with Prometheus;
* **the request under uvicorn**: one FastAPI route behind the ASGI middleware
  (``bench/_observe_apps.py``), one uvicorn worker per side, driven by
  ``wrk -t1 -c32`` in rounds that alternate the sides; skipped without wrk.

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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

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


# -- the request under uvicorn -----------------------------------------------------------------

WRK_SCRIPT = """
local requests = {}
local next_request = 0

function init(args)
  for line in io.lines(args[1]) do
    local org, token = line:match("^(%S+) (%S+)$")
    requests[#requests + 1] = wrk.format("GET", "/organizations/" .. org .. "/invoices", {
      ["Authorization"] = "Bearer " .. token,
      ["X-Forwarded-Proto"] = "https",
    })
  end
end

function request()
  next_request = next_request % #requests + 1
  return requests[next_request]
end
"""
_COUNT = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m),")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
SERVERS = ("meterkit_plain", "meterkit_prometheus")


@contextmanager
def uvicorn_servers(folder: Path) -> Iterator[dict[str, tuple[str, Path]]]:
    """Each app of SERVERS under one uvicorn worker: name -> (URL, keys file). Stopped,
    by their own process ids, at the end."""
    from tests._servers import free_port

    started: dict[str, tuple[str, Path, subprocess.Popen[bytes]]] = {}
    try:
        for name in SERVERS:
            port = free_port()
            keys = folder / f"{name}.keys"
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                "METERKIT_BENCH_KEYS": str(keys),
            }
            command = [
                *[sys.executable, "-m", "uvicorn", f"bench._observe_apps:{name}", "--factory"],
                *["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                *["--log-level", "warning", "--no-access-log"],
            ]
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            started[name] = (f"http://127.0.0.1:{port}", keys, process)
        for name, (url, keys, process) in started.items():
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode}")
                if keys.exists():
                    try:
                        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))):
                            break
                    except OSError:
                        pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start in 60 s")
                time.sleep(0.05)
        yield {name: (url, keys) for name, (url, keys, _) in started.items()}
    finally:
        for _, _, process in started.values():
            process.terminate()
        for _, _, process in started.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wrk_round(url: str, keys: Path, script: Path, seconds: float) -> tuple[float, int]:
    """µs per request over one wrk run (one thread, 32 connections), and its non-2xx."""
    command = ["wrk", "-t1", "-c32", f"-d{round(seconds)}s", "-s", str(script), url, "--"]
    done = subprocess.run(
        [*command, str(keys)], capture_output=True, text=True, timeout=seconds + 60, check=True
    )
    match = _COUNT.search(done.stdout)
    if match is None:
        raise RuntimeError(f"unreadable wrk output:\n{done.stdout}")
    took = float(match.group(2)) * _UNITS[match.group(3)]
    non_2xx = _NON_2XX.search(done.stdout)
    return took / int(match.group(1)) * 1e6, int(non_2xx.group(1)) if non_2xx else 0


def request_ratio(
    rounds: int, seconds: float, report: Report
) -> tuple[float, dict[str, list[float]]]:
    """The median of per-round ratios (with Prometheus / without) of µs per request."""
    us: dict[str, list[float]] = {name: [] for name in SERVERS}
    refused = 0
    with tempfile.TemporaryDirectory(prefix="mk-observe-") as tmp:
        folder = Path(tmp)
        script = folder / "keys.lua"
        script.write_text(WRK_SCRIPT, encoding="utf-8")
        with uvicorn_servers(folder) as servers:
            for r in range(-1, rounds):  # round -1: warm-up, every key seen once
                order = SERVERS if r % 2 == 0 else SERVERS[::-1]
                for name in order:
                    url, keys = servers[name]
                    took, non_2xx = wrk_round(
                        url, keys, script, max(seconds, 2.0) if r < 0 else seconds
                    )
                    refused += non_2xx
                    if r >= 0:
                        us[name].append(took)
                if r >= 0:
                    report(
                        f"round {r + 1}/{rounds}: "
                        + ", ".join(f"{n} {us[n][-1]:.0f} µs/request" for n in SERVERS)
                    )
    if refused:
        report(f"WARNING: {refused} answers were not 2xx: the figures are not all admissions")
    ratios = [p / b for p, b in zip(us["meterkit_prometheus"], us["meterkit_plain"], strict=True)]
    return ratios, us


def test_request_under_uvicorn(benchmark: Any, figures: Report) -> None:
    """Print what the Prometheus observer adds to a request on a real server."""
    if shutil.which("wrk") is None:
        figures("OBSERVE under uvicorn skipped: wrk is not installed")
        pytest.skip("wrk is not installed")
    rounds, seconds = (3, 1.0) if QUICK else (11, 3.0)
    ratios, us = benchmark.pedantic(
        request_ratio, args=(rounds, seconds, print), rounds=1, iterations=1
    )
    ratio = statistics.median(ratios)
    verdict = "met" if ratio <= REQUEST_TARGET else "NOT met"
    figures(
        f"RATIO uvicorn+meterkit+prometheus costs {ratio:.3f}x the request without observers "
        f"(median of {rounds} interleaved wrk rounds, range {min(ratios):.3f}-{max(ratios):.3f}; "
        f"{statistics.median(us['meterkit_prometheus']):.1f} vs "
        f"{statistics.median(us['meterkit_plain']):.1f} µs/request)  "
        f"[target <= {REQUEST_TARGET}x: {verdict}]"
    )
    benchmark.extra_info["uvicorn prometheus/plain"] = round(ratio, 4)


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
        # (nothing written into the checkout measured, which may be someone else's)
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
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
