"""What meterkit and its peers add to a request on a real server, driven by wrk.

    python -m pytest bench/bench_http.py --benchmark-only -q -s -p no:cacheprovider
    METERKIT_BENCH_QUICK=1 python -m pytest bench/bench_http.py --benchmark-only -q -s \
        -p no:cacheprovider
    python bench/bench_http.py --rounds 11 --seconds 3        # the same, without pytest
    python bench/bench_http.py --uvicorn standard             # httptools and uvloop
    python bench/bench_http.py --profile fastapi fastapi+meterkit  # where the µs go (py-spy)

Eight servers, each one worker process on loopback, all started at once and driven in
turn by ``wrk -t1 -c32`` (one wrk thread, 32 connections) in short rounds, the first
server of a round rotating (A, B, C…, then B, C…, A): the machine's slow moments fall
on every server alike (``bench/_interleave.py``). The apps are in
``bench/_http_apps.py``:

===========================  ==============================================================
``fastapi``                  FastAPI under uvicorn, one route, nothing in front
``fastapi+slowapi``          the same route with slowapi holding the seed's three limits
``fastapi+meterkit``         the same app behind meterkit's ASGI middleware, in memory
``fastapi+meterkit-redis``   the same, with the meter and the key store on Redis
``fastapi+meterkit+prom``    ``fastapi+meterkit`` reporting to a Prometheus observer
``flask``                    Flask under gunicorn (one sync worker)
``flask+limiter``            the same route with Flask-Limiter holding the three limits
``flask+meterkit``           the same app behind meterkit's WSGI middleware, in memory
===========================  ==============================================================

meterkit does more than the peers per request (it authenticates the key, debits the
credits and sends the rate-limit and credit headers; the peers count three limits).

**What a side adds.** One worker saturated by 32 connections serves requests one after
another, so ``1 / throughput`` is the server's time per request. What a limiter adds
is its side's µs per request minus its framework's bare side's, in the same round;
the figure is the median over rounds. The ratio to the peer is the quotient of the two
medians.

**Everyone admitted.** wrk cycles through 4,000 API keys in 400 organizations (the
peers' limits key on the same token and organization), so no key nears 100 requests a
minute or 1,000 an hour, nor an organization 10,000, at these rates. wrk counts every
answer that is not 2xx or 3xx; the counts are printed for every side (and a run with
any is marked, since a refusal is cheaper than an admission).

Nothing is asserted: speed is printed, never a test's verdict.
"""

from __future__ import annotations

import argparse
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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from tests import _servers  # noqa: E402

QUICK = os.environ.get("METERKIT_BENCH_QUICK", "") not in ("", "0")
#: How uvicorn parses HTTP and runs its loop: "plain" is uvicorn as ``pip install
#: uvicorn`` (and meterkit's dev extra) gets it, h11 and asyncio; "standard" is
#: ``uvicorn[standard]`` (what ``fastapi[standard]`` installs), httptools and uvloop.
#: Pinned either way, so that installing httptools does not change the figures.
UVICORN_FLAGS = {
    "plain": ["--http", "h11", "--loop", "asyncio"],
    "standard": ["--http", "httptools", "--loop", "uvloop"],
}


def _uvicorn() -> str:
    """The uvicorn flavour of this run: ``METERKIT_BENCH_UVICORN`` (``--uvicorn``)."""
    flavour = os.environ.get("METERKIT_BENCH_UVICORN", "plain")
    if flavour not in UVICORN_FLAGS:
        raise SystemExit(f"METERKIT_BENCH_UVICORN is one of {', '.join(UVICORN_FLAGS)}")
    return flavour


CONNECTIONS = 32

# wrk's script: each thread reads the keys once and sends them in turn, forever.
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


@dataclass(frozen=True)
class Side:
    """One server of the comparison: how to start it, and the bare side it adds to."""

    name: str
    factory: str
    server: str  # "uvicorn" or "gunicorn"
    baseline: str | None
    redis: bool = False

    def command(self, port: int) -> list[str]:
        target = f"bench._http_apps:{self.factory}"
        if self.server == "uvicorn":
            # uvicorn's defaults otherwise: believes X-Forwarded-Proto from 127.0.0.1.
            return [
                *[sys.executable, "-m", "uvicorn", target, "--factory"],
                *["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                *UVICORN_FLAGS[_uvicorn()],
                *["--log-level", "warning", "--no-access-log"],
            ]
        return [
            *[sys.executable, "-m", "gunicorn", f"{target}()", "--workers", "1"],
            *["--bind", f"127.0.0.1:{port}", "--log-level", "warning"],
        ]


SIDES = (
    Side("fastapi", "fastapi_bare", "uvicorn", None),
    Side("fastapi+slowapi", "fastapi_slowapi", "uvicorn", "fastapi"),
    Side("fastapi+meterkit", "fastapi_meterkit", "uvicorn", "fastapi"),
    Side("fastapi+meterkit-redis", "fastapi_meterkit", "uvicorn", "fastapi", redis=True),
    Side("fastapi+meterkit+prom", "fastapi_meterkit_prometheus", "uvicorn", "fastapi"),
    Side("flask", "flask_bare", "gunicorn", None),
    Side("flask+limiter", "flask_limiter", "gunicorn", "flask"),
    Side("flask+meterkit", "flask_meterkit", "gunicorn", "flask"),
)
#: (meterkit's side, the peer's side): the comparisons of the issue's targets.
PAIRS = (("fastapi+meterkit", "fastapi+slowapi"), ("flask+meterkit", "flask+limiter"))
TARGET_US = 30.0
TARGET_SHARE = 0.25
#: (a side with an observer, the same without, the target of its cost): issue 18.
OBSERVED = (("fastapi+meterkit+prom", "fastapi+meterkit", 1.05),)


@dataclass
class Server:
    """A server process this benchmark started, and the keys wrk sends to it."""

    side: Side
    port: int
    keys: Path
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Round:
    """One wrk run against one server."""

    requests: int
    seconds: float
    non_2xx: int
    socket_errors: int

    @property
    def us_per_request(self) -> float:
        return self.seconds / self.requests * 1e6


@dataclass
class Results:
    """Every timed round of every side, and every answer wrk counted as an error."""

    rounds: dict[str, list[Round]] = field(default_factory=dict)
    non_2xx: dict[str, int] = field(default_factory=dict)
    socket_errors: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)

    def us(self, name: str) -> list[float]:
        return [r.us_per_request for r in self.rounds[name]]

    def rps(self, name: str) -> float:
        return statistics.median(r.requests / r.seconds for r in self.rounds[name])

    def added(self, name: str, baseline: str) -> list[float]:
        """µs per request ``name`` adds to ``baseline``, round by round."""
        return [a - b for a, b in zip(self.us(name), self.us(baseline), strict=True)]

    def added_median(self, name: str, baseline: str) -> float:
        return statistics.median(self.added(name, baseline))

    def lines(self, sides: tuple[Side, ...]) -> list[str]:
        out = []
        for side in sides:
            if side.name not in self.rounds:
                continue
            us = self.us(side.name)
            text = (
                f"HTTP {side.name:<23} {self.rps(side.name):8.0f} req/s  "
                f"{statistics.median(us):7.1f} µs/request"
            )
            if side.baseline is not None and side.baseline in self.rounds:
                added = self.added(side.name, side.baseline)
                spread = sorted(added)
                text += (
                    f"  adds {statistics.median(added):6.1f} µs"
                    f" (rounds {spread[0]:.1f} .. {spread[-1]:.1f})"
                )
            text += (
                f"  non-2xx {self.non_2xx[side.name]} of {self.requests[side.name]}"
                f", socket errors {self.socket_errors[side.name]}"
            )
            out.append(text)
        for mine, peer in PAIRS:
            found = [s for s in sides if s.name in (mine, peer) and s.name in self.rounds]
            if len(found) != 2:
                continue
            baseline = found[0].baseline
            assert baseline is not None
            ours = self.added_median(mine, baseline)
            theirs = self.added_median(peer, baseline)
            share = ours / theirs if theirs > 0 else float("inf")
            if ours <= 0 or theirs <= 0:
                verdict = "unclear: the rounds were too noisy, run more or longer ones"
            elif ours <= TARGET_US and share <= TARGET_SHARE:
                verdict = "met"
            else:
                verdict = "MISSED"
            out.append(
                f"RATIO {mine} adds {ours:.1f} µs, {peer} {theirs:.1f} µs: "
                f"{share:.2f} of the peer's, {theirs / ours if ours > 0 else float('inf'):.1f}x "
                f"less (targets: <= {TARGET_US:.0f} µs and <= {TARGET_SHARE:.2f}: {verdict})"
            )
        for observed, plain, target in OBSERVED:
            if observed not in self.rounds or plain not in self.rounds:
                continue
            ratios = sorted(o / p for o, p in zip(self.us(observed), self.us(plain), strict=True))
            ratio = statistics.median(ratios)
            out.append(
                f"RATIO {observed} costs {ratio:.3f}x the request of {plain} (median of "
                f"{len(ratios)} rounds' ratios, range {ratios[0]:.3f}-{ratios[-1]:.3f}; "
                f"target <= {target}x: {'met' if ratio <= target else 'MISSED'})"
            )
        if any(self.non_2xx.values()):
            out.append("WARNING: some answers were not 2xx: the figures are not all admissions")
        return out


_RPS = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m),")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def wrk(server: Server, seconds: float, script: Path, connections: int) -> Round:
    """One wrk run against ``server``: its requests, duration and errors."""
    command = [
        *["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "-s", str(script)],
        *[server.url, "--", str(server.keys)],
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed on {server.side.name}: {done.stderr or done.stdout}")
    text = done.stdout
    match = _RPS.search(text)
    if match is None:
        raise RuntimeError(f"unreadable wrk output for {server.side.name}:\n{text}")
    non_2xx = _NON_2XX.search(text)
    socket_errors = _SOCKET.search(text)
    return Round(
        requests=int(match.group(1)),
        seconds=float(match.group(2)) * _UNITS[match.group(3)],
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(map(int, socket_errors.groups())) if socket_errors else 0,
    )


def _wait_ready(server: Server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.side.name} exited: {server.log.read_text('utf-8', 'replace')}"
            )
        if server.keys.exists():
            try:
                with socket.create_connection(("127.0.0.1", server.port), timeout=0.2):
                    return
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"{server.side.name} did not start in {timeout:.0f} s")


@contextmanager
def servers(sides: tuple[Side, ...], folder: Path, redis_url: str | None) -> Iterator[list[Server]]:
    """Start every side's server (stopped, by their own process ids, at the end)."""
    started: list[Server] = []
    try:
        for side in sides:
            port = _servers.free_port()
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                "METERKIT_BENCH_KEYS": str(folder / f"{side.name}.keys"),
            }
            env.pop("METERKIT_BENCH_REDIS", None)
            if side.redis:
                assert redis_url is not None
                env["METERKIT_BENCH_REDIS"] = redis_url
            log = folder / f"{side.name}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    side.command(port), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
                )
            started.append(Server(side, port, folder / f"{side.name}.keys", process, log))
        for server in started:
            _wait_ready(server)
        yield started
    finally:
        for server in started:
            server.process.terminate()
        for server in started:
            try:
                server.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()


def _keys() -> str:
    return os.environ.get("METERKIT_BENCH_HTTP_KEYS", "4000")


def available(sides: tuple[Side, ...] = SIDES) -> tuple[tuple[Side, ...], list[str]]:
    """The sides this machine can run, and why any other is left out."""
    missing = []
    if shutil.which("wrk") is None:
        return (), ["wrk is not installed (apt-get install wrk)"]
    kept = []
    for side in sides:
        if side.redis and _servers.redis_binary() is None:
            missing.append(f"{side.name}: no redis-server")
            continue
        module = {"uvicorn": "uvicorn", "gunicorn": "gunicorn"}[side.server]
        peer = {"fastapi+slowapi": "slowapi", "flask+limiter": "flask_limiter"}.get(side.name)
        standard = module == "uvicorn" and _uvicorn() == "standard"
        extra = ("httptools", "uvloop") if standard else ()
        for needed in (module, peer, *extra):
            if needed is not None and _importable(needed) is False:
                missing.append(f"{side.name}: {needed} is not installed")
                break
        else:
            kept.append(side)
    return tuple(kept), missing


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run(
    rounds: int,
    seconds: float,
    connections: int = CONNECTIONS,
    sides: tuple[Side, ...] = SIDES,
    report: Callable[[str], None] = print,
) -> Results:
    """Start the servers, warm each up once, then time ``rounds`` interleaved rounds."""
    results = Results()
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mk-http-")))
        script = folder / "keys.lua"
        script.write_text(WRK_SCRIPT, encoding="utf-8")
        redis_url = None
        if any(side.redis for side in sides):
            redis_url = stack.enter_context(_servers.standalone()).url
        started = stack.enter_context(servers(sides, folder, redis_url))
        for server in started:
            name = server.side.name
            results.rounds[name] = []
            results.non_2xx[name] = results.socket_errors[name] = results.requests[name] = 0
        # Warm-up (untimed): every key is seen once, so timed requests update state.
        for r in range(-1, rounds):
            shift = r % len(started)
            for server in started[shift:] + started[:shift]:
                measured = wrk(server, max(seconds, 2.0) if r < 0 else seconds, script, connections)
                name = server.side.name
                results.non_2xx[name] += measured.non_2xx
                results.socket_errors[name] += measured.socket_errors
                results.requests[name] += measured.requests
                if r >= 0:
                    results.rounds[name].append(measured)
            if r >= 0:
                report(
                    f"round {r + 1}/{rounds}: "
                    + ", ".join(
                        f"{s.side.name} {results.rounds[s.side.name][-1].us_per_request:.0f}"
                        for s in started
                    )
                    + " µs/request"
                )
    return results


def test_http_overhead(benchmark: Any, figures: Callable[[str], None]) -> None:
    """Print what meterkit, slowapi and Flask-Limiter add per request on real servers."""
    import pytest

    sides, missing = available()
    for reason in missing:
        figures(f"HTTP skipped: {reason}")
    if not sides:
        pytest.skip("; ".join(missing))
    rounds, seconds = (3, 1.0) if QUICK else (11, 3.0)
    results = benchmark.pedantic(
        run, args=(rounds, seconds), kwargs={"sides": sides}, rounds=1, iterations=1
    )
    figures(
        f"HTTP wrk -t1 -c{CONNECTIONS}, {rounds} interleaved rounds of {seconds:g} s "
        f"per server, {_keys()} API keys, uvicorn {_uvicorn()} (medians):"
    )
    for line in results.lines(sides):
        figures(line)
    for mine, peer in PAIRS:
        if mine in results.rounds and peer in results.rounds:
            baseline = next(s.baseline for s in sides if s.name == mine)
            assert baseline is not None
            benchmark.extra_info[f"{mine} added us"] = results.added_median(mine, baseline)
            benchmark.extra_info[f"{peer} added us"] = results.added_median(peer, baseline)


#: Code of the server and the framework: a sample in it is not meterkit's own time,
#: even when meterkit called it (the app, behind the middleware).
_FRAMEWORK = re.compile(r"[(/](starlette|fastapi|uvicorn|h11|asyncio|anyio|pydantic\w*)/")


def _stacks(path: Path) -> tuple[dict[str, int], dict[str, int], int]:
    """py-spy's raw output: samples per meterkit line (meterkit's own time: the line
    and what it calls outside the framework, such as hmac or msgspec), samples per
    function (its own time), and the total."""
    ours: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text("utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        total += samples
        frames = stack.split(";")
        function = re.sub(r":\d+\)$", ")", frames[-1])
        own[function] = own.get(function, 0) + samples
        mine = [i for i, frame in enumerate(frames) if "meterkit" in frame]
        if mine and not any(_FRAMEWORK.search(f) for f in frames[mine[-1] + 1 :]):
            where = frames[mine[-1]]
            ours[where] = ours.get(where, 0) + samples
    return ours, own, total


def profile(names: list[str], seconds: int, top: int = 25) -> None:
    """Sample each side's server with py-spy while wrk drives it, then print where its
    time per request goes, against the first side's: meterkit's functions (inclusive)
    and every function's own time, each as its share of the samples times the side's
    µs per request (idle samples included: a saturated server's wall time is its
    requests' time)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    chosen = tuple(s for s in SIDES if s.name in names)
    if any(s.server != "uvicorn" for s in chosen):
        raise SystemExit("profile uvicorn sides: gunicorn's worker is a forked child")
    profiles = {}
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mk-http-prof-")))
        script = folder / "keys.lua"
        script.write_text(WRK_SCRIPT, encoding="utf-8")
        redis_url = None
        if any(side.redis for side in chosen):
            redis_url = stack.enter_context(_servers.standalone()).url
        for server in stack.enter_context(servers(chosen, folder, redis_url)):
            wrk(server, 3, script, CONNECTIONS)  # warm-up: every key seen once
            raw = folder / f"{server.side.name}.raw"
            # (py-spy pauses the server for each sample, ~1% at 250 Hz: exact stacks.)
            sampler = subprocess.Popen(
                [
                    *[spy, "record", "--pid", str(server.process.pid), "--rate", "250"],
                    *["--duration", str(seconds), "--idle", "--format", "raw"],
                    *["--output", str(raw)],
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            measured = wrk(server, seconds + 1, script, CONNECTIONS)
            sampler.wait(timeout=seconds + 30)
            profiles[server.side.name] = (*_stacks(raw), measured.us_per_request)
            print(
                f"{server.side.name}: {measured.us_per_request:.1f} µs/request, "
                f"non-2xx {measured.non_2xx} of {measured.requests}"
            )
    base_name = names[0]
    _, base_own, base_total, base_us = profiles[base_name]
    for name in names[1:]:
        ours, own, total, us = profiles[name]
        spent = sum(ours.values()) / total * us
        print(f"\n{name}: meterkit's own time, {spent:.1f} µs per request, by function")
        functions: dict[str, int] = {}
        for frame, n in ours.items():
            function = re.sub(r":\d+\)$", ")", frame)
            functions[function] = functions.get(function, 0) + n
        for frame, n in sorted(functions.items(), key=lambda item: -item[1])[:top]:
            print(f"{n / total * us:8.1f}  {frame}")
        print(f"\n{name}: the same by line")
        for frame, n in sorted(ours.items(), key=lambda item: -item[1])[:top]:
            print(f"{n / total * us:8.1f}  {frame}")
        print(f"\n{name} against {base_name}: own time per function, µs per request")
        print(f"{'more':>8} {base_name[:8]:>8} {name[:8]:>8}  function")
        rows = []
        for frame in set(own) | set(base_own):
            mine = own.get(frame, 0) / total * us
            theirs = base_own.get(frame, 0) / base_total * base_us
            rows.append((mine - theirs, theirs, mine, frame))
        rows.sort(reverse=True)
        for more, theirs, mine, frame in rows[:top]:
            print(f"{more:8.1f} {theirs:8.1f} {mine:8.1f}  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--only", nargs="*", help="side names (default: all)")
    parser.add_argument(
        "--keys",
        type=int,
        help="API keys wrk cycles through (default 4000); fewer may reach the limits",
    )
    parser.add_argument(
        "--uvicorn",
        choices=sorted(UVICORN_FLAGS),
        default=_uvicorn(),
        help="plain: h11 and asyncio (the default); standard: httptools and uvloop, as "
        "uvicorn[standard] runs (pip install httptools uvloop)",
    )
    parser.add_argument(
        "--profile",
        nargs="+",
        metavar="SIDE",
        help="instead: sample these uvicorn sides with py-spy and compare each to the first",
    )
    args = parser.parse_args()
    os.environ["METERKIT_BENCH_UVICORN"] = args.uvicorn
    if args.keys:
        os.environ["METERKIT_BENCH_HTTP_KEYS"] = str(args.keys)  # (the servers read it)
    if args.profile:
        profile(args.profile, max(5, round(args.seconds * 3)))
        return
    sides, missing = available(tuple(s for s in SIDES if not args.only or s.name in args.only))
    for reason in missing:
        print("skipped:", reason)
    results = run(args.rounds, args.seconds, args.connections, sides)
    print(
        f"wrk -t1 -c{args.connections}, {args.rounds} interleaved rounds of "
        f"{args.seconds:g} s per server, {_keys()} API keys, uvicorn {args.uvicorn} "
        f"({' '.join(UVICORN_FLAGS[args.uvicorn])}) (medians):"
    )
    for line in results.lines(sides):
        print(line)


if __name__ == "__main__":
    main()
