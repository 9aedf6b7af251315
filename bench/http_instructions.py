"""What meterkit and slowapi add to a request on a real uvicorn server, in instructions:
the server under callgrind.

    python bench/http_instructions.py                    # uvicorn plain and standard
    python bench/http_instructions.py --uvicorn plain    # h11 and asyncio only

``bench/bench_http.py`` times the same servers with wrk; its figures move with the
machine's load by tens of µs. Instructions do not: each side's server (the apps of
``bench/_http_apps.py``, one uvicorn worker) runs under ``valgrind --tool=callgrind``;
a client on loopback warms it up (every key twice), the counters are zeroed
(``callgrind_control -z``), ``--requests`` requests follow on one keep-alive
connection, and the counters are dumped. What a side adds is its instructions per
request minus the bare app's. The hash seed is fixed (``PYTHONHASHSEED=0``): with
random seeds the dicts' probes alone move a figure by about 1%.

An instruction is not a µs: the same count costs more in a server than in a tight
loop (the code and data are out of the caches after the framework's work), and more
for code that touches more memory. Read these figures for what a change saves, not
for the time a request takes. Needs valgrind; about four minutes.

``--uvicorn plain`` is uvicorn as meterkit's dev extra installs it (h11, asyncio);
``standard`` is ``uvicorn[standard]``'s HTTP parser (httptools; the loop stays
asyncio, since callgrind counts uvloop's C like any other). Each header meterkit adds
to a response costs the server's HTTP layer too; ``--headers`` sets the groups of the
meterkit side (``ietf,x-ratelimit,x-credits``; by default every group).
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from tests import _servers  # noqa: E402

SIDES = {
    "fastapi": "fastapi_bare",
    "fastapi+slowapi": "fastapi_slowapi",
    "fastapi+meterkit": "fastapi_meterkit",
}
FLAVOURS = {
    "plain": ["--http", "h11", "--loop", "asyncio"],
    "standard": ["--http", "httptools", "--loop", "asyncio"],
}
KEYS = 400


def _requests(port: int, keys: list[tuple[str, str]], count: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for i in range(count):
            org, token = keys[i % len(keys)]
            connection.request(
                "GET",
                f"/organizations/{org}/invoices",
                headers={"Authorization": f"Bearer {token}", "X-Forwarded-Proto": "https"},
            )
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"answered {response.status}: every request must be admitted")
    finally:
        connection.close()


def instructions(factory: str, flavour: str, requests: int, headers: str | None) -> float:
    """Instructions per request of one side's uvicorn worker, after its warm-up."""
    with tempfile.TemporaryDirectory(prefix="meterkit-http-callgrind-") as tmp:
        folder = Path(tmp)
        keys_file = folder / "keys"
        port = _servers.free_port()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "METERKIT_BENCH_KEYS": str(keys_file),
            "METERKIT_BENCH_HTTP_KEYS": str(KEYS),
            "PYTHONHASHSEED": "0",
        }
        if headers is not None:
            env["METERKIT_BENCH_HEADERS"] = headers
        env.pop("METERKIT_BENCH_REDIS", None)
        command = [
            *["valgrind", "--tool=callgrind", f"--callgrind-out-file={folder}/out.%p"],
            *[sys.executable, "-m", "uvicorn", f"bench._http_apps:{factory}", "--factory"],
            *["--host", "127.0.0.1", "--port", str(port), *FLAVOURS[flavour]],
            *["--log-level", "warning", "--no-access-log"],
        ]
        with (folder / "log").open("wb") as log:
            server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 600
            while True:
                if server.poll() is not None:
                    raise RuntimeError((folder / "log").read_text()[-2000:])
                if keys_file.exists():
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                        break
                    except OSError:
                        pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{factory} did not start under valgrind")
                time.sleep(0.5)
            keys = [(org, token) for org, token in (ln.split() for ln in keys_file.open())]
            _requests(port, keys, 2 * len(keys))  # warm-up: every key seen twice
            control = ["callgrind_control"]
            subprocess.run([*control, "-z", str(server.pid)], check=True, capture_output=True)
            _requests(port, keys, requests)
            subprocess.run([*control, "-d", str(server.pid)], check=True, capture_output=True)
            for _ in range(100):
                dumps = sorted(folder.glob("out.*.*"))  # the dump, not the final file
                if dumps:
                    break
                time.sleep(0.2)
            text = dumps[-1].read_text()
        finally:
            server.terminate()
            server.wait(timeout=120)
    found = re.search(r"^(?:totals|summary):\s+(\d+)", text, re.M)
    if found is None:
        raise RuntimeError("no total in the callgrind dump")
    return int(found.group(1)) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests measured")
    parser.add_argument("--uvicorn", choices=sorted(FLAVOURS), nargs="*", default=["plain"])
    parser.add_argument("--headers", help="meterkit's header groups, comma-separated")
    parser.add_argument(
        "--no-peer", action="store_true", help="leave slowapi out (the bare app and meterkit)"
    )
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not on PATH (apt-get install valgrind)")
    for flavour in args.uvicorn:
        figures = {}
        for side, factory in SIDES.items():
            if args.no_peer and side == "fastapi+slowapi":
                continue
            headers = args.headers if side == "fastapi+meterkit" else None
            figures[side] = instructions(factory, flavour, args.requests, headers)
            line = f"INSTRUCTIONS uvicorn {flavour} {side:18s} {figures[side]:11,.0f} per request"
            if side != "fastapi":
                line += f"  adds {figures[side] - figures['fastapi']:9,.0f}"
            print(line, flush=True)
        mine = figures["fastapi+meterkit"] - figures["fastapi"]
        if args.no_peer:
            continue
        peer = figures["fastapi+slowapi"] - figures["fastapi"]
        print(
            f"RATIO uvicorn {flavour}: meterkit adds {mine:,.0f} instructions, slowapi "
            f"{peer:,.0f}: {mine / peer:.2f} of the peer's"
            + (f" (meterkit's headers: {args.headers})" if args.headers is not None else "")
        )


if __name__ == "__main__":
    main()
