"""No money lost or doubled: 4 processes x 8 threads of checks, refunds and idempotent
retries on a Redis that persists every write (AOF, appendfsync always) and is killed
and restarted mid-run, while two drains run and one of them is killed (SIGKILL) and
restarted twice. Afterwards the SQL store holds exactly the charges and refunds the
clients were told of, and its sums equal the counters, to the micro-credit."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests import _servers

PROCESSES = 4
THREADS = 8
ORGS = [f"org_{i}" for i in range(6)]
PREFIX = "mkloss"
#: A policy generous enough that most checks are admitted (a key's burst of 50 denies
#: some: a denial writes no event).
POLICY = """
name = "no-money-lost"
[credits]
allowance = "1000000"
[[tiers]]
name = "key-burst"
scope = "key"
rate = "500/second"
algorithm = "gcra"
burst = 50
[[tiers]]
name = "org-hour"
scope = "org"
rate = "1000000/hour"
algorithm = "fixed_window"
[categories.read]
min = "0.01"
max = "0.01"
[categories.write]
min = "0.03"
max = "0.15"
[categories.report]
min = "0.10"
max = "0.15"
[operations."invoices.list"]
category = "read"
price = "0.01"
[operations."invoices.create"]
category = "write"
price = "0.03"
[operations."reports.generate"]
category = "report"
price = "0.125"
"""


def _worker(url: str, stop_file: str, out_file: str, seed: int) -> None:
    """One process: THREADS threads of checks (each with an idempotency key, retried
    until answered), some refunded, some retried after success too; writes what it
    was told (charge ids admitted, charge ids refunded) to ``out_file``."""
    import random
    import threading

    from meterkit import Meter, Policy
    from meterkit.connect import backend_from_url
    from meterkit.errors import BackendError

    policy = Policy.from_toml(POLICY)
    charges: dict[str, int] = {}
    refunds: set[str] = set()
    lock = threading.Lock()
    errors = [0]

    def thread(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        backend = backend_from_url(url, prefix=PREFIX, ledger=True, timeout=2)
        meter = Meter(policy, backend)
        ops = ("invoices.list", "invoices.create", "reports.generate")
        i = 0
        while not os.path.exists(stop_file):
            i += 1
            org = rng.choice(ORGS)
            key = f"key_{rng.randrange(20)}"
            idem = f"p{seed}t{n}r{i}"
            op = ops[rng.randrange(3)]
            decision = None
            while decision is None:
                try:
                    decision = meter.check(key, org=org, operation=op, idempotency_key=idem)
                except BackendError:
                    with lock:
                        errors[0] += 1
                    time.sleep(0.02)  # (Redis is restarting: try the same request again)
            if i == 1 and n == 0:
                Path(out_file + ".ready").write_text("ready")
            if decision.allowed:
                if rng.random() < 0.1:  # an idempotent retry of an answered request
                    again = None
                    while again is None:
                        try:
                            again = meter.check(key, org=org, operation=op, idempotency_key=idem)
                        except BackendError:
                            time.sleep(0.02)
                    assert again.charge_id == decision.charge_id, "a retry was charged again"
                with lock:
                    charges[decision.charge_id] = round(decision.charged * 1_000_000)
                if rng.random() < 0.15:
                    done = None
                    unsure = False
                    while done is None:
                        try:
                            done = meter.refund(decision)
                        except BackendError:
                            unsure = True  # (it may have run: a retry then says False)
                            time.sleep(0.02)
                    # A refund is once per charge: True, or False after an attempt that
                    # failed on the way back, both mean it was refunded, once.
                    if done or unsure:
                        with lock:
                            refunds.add(decision.charge_id)
        meter.close()

    threads = [threading.Thread(target=thread, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    Path(out_file).write_text(
        json.dumps({"charges": charges, "refunds": sorted(refunds), "errors": errors[0]})
    )


#: What ``meterkit ledger drain`` says once it catches SIGTERM (and SIGINT).
DRAINING = b"meterkit: draining into"


def _drain(url: str, store: str, name: str, folder: Path) -> subprocess.Popen[bytes]:
    """``meterkit ledger drain`` in a process of its own, logging to the folder; returned
    once it is draining, so that a SIGTERM it gets later is one it handles (a slow
    machine may take a second to import it)."""
    path = folder / f"drain-{name}.log"
    said = path.read_bytes().count(DRAINING) if path.exists() else 0
    with open(path, "ab") as log:  # (the child keeps its copy)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meterkit",
                "ledger",
                "drain",
                "--url",
                url,
                "--to",
                store,
                "--prefix",
                PREFIX,
                "--consumer",
                name,
                "--claim-idle",
                "1",
                "--idle",
                "0.02",
                "--batch",
                "200",
            ],
            stdout=log,
            stderr=log,
        )
    deadline = time.monotonic() + 60
    while path.read_bytes().count(DRAINING) == said:
        assert proc.poll() is None, path.read_text()
        assert time.monotonic() < deadline, "the drain did not start"
        time.sleep(0.01)
    return proc


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_no_money_lost_or_doubled(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Kill Redis and a drain mid-run: every charge and refund the clients were told of
    is in the store exactly once, and the ledger reconciles with the counters."""
    if _servers.redis_binary() is None:
        pytest.skip("no redis-server")
    from meterkit import Policy
    from meterkit.connect import backend_from_url
    from meterkit.ledger import reconcile, store_from_url

    if kind == "sqlite":
        store_url = f"sqlite:///{tmp_path}/ledger.db"
    else:
        store_url = request.getfixturevalue("postgres_server")()
    folder = tmp_path / "redis"
    server = _servers.RedisServer(
        folder, _servers.free_port(), "--appendonly", "yes", "--appendfsync", "always"
    )
    server.start()
    drains: dict[str, subprocess.Popen[bytes]] = {}
    workers: list[Any] = []
    stop_file = tmp_path / "stop"
    try:
        url = server.url
        for name in ("a", "b"):
            drains[name] = _drain(url, store_url, name, tmp_path)
        spawn = multiprocessing.get_context("spawn")
        outs = [tmp_path / f"worker-{i}.json" for i in range(PROCESSES)]
        for i in range(PROCESSES):
            p = spawn.Process(target=_worker, args=(url, str(stop_file), str(outs[i]), i))
            p.start()
            workers.append(p)
        deadline = time.monotonic() + 60
        while not all(Path(str(o) + ".ready").exists() for o in outs):  # (all checking)
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.02)
        schedule = [
            (0.7, "kill drain"),
            (1.4, "restart redis"),
            (2.1, "kill drain"),
            (3.0, "stop"),
        ]
        start = time.monotonic()
        for at, what in schedule:
            time.sleep(max(0.0, start + at - time.monotonic()))
            if what == "kill drain":
                drains["a"].send_signal(signal.SIGKILL)
                drains["a"].wait(10)
                drains["a"] = _drain(url, store_url, "a", tmp_path)
            elif what == "restart redis":
                server.kill()  # SIGKILL: only what the AOF holds survives
                server.start()
            else:
                stop_file.write_text("stop")
        for p in workers:
            p.join(60)
            assert p.exitcode == 0, "a worker failed"
        for proc in drains.values():
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        # A last drain claims whatever a killed one still held, at once.
        final = subprocess.run(
            [
                sys.executable,
                "-m",
                "meterkit",
                "ledger",
                "drain",
                "--url",
                url,
                "--to",
                store_url,
                "--prefix",
                PREFIX,
                "--consumer",
                "final",
                "--claim-idle",
                "0",
                "--once",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert final.returncode == 0, final.stderr

        told_charges: dict[str, int] = {}
        told_refunds: set[str] = set()
        retried = 0
        for out in outs:
            seen = json.loads(out.read_text())
            told_charges.update(seen["charges"])
            told_refunds.update(seen["refunds"])
            retried += seen["errors"]
        assert retried > 0, "the Redis restart was not felt: the test proved nothing"
        store = store_from_url(store_url)
        try:
            events = list(store.events())
            charged = {e.charge: e.micro for e in events if e.kind == "charge"}
            refunded = {e.charge for e in events if e.kind == "refund"}
            assert charged == told_charges
            assert refunded == told_refunds
            assert len(events) == len({e.id for e in events})
            backend = backend_from_url(url, prefix=PREFIX, ledger=True)
            result = reconcile(backend, store)
            backend.close()
            assert result.ok, [str(d) for d in result.differences[:10]]
            assert result.orgs == len(ORGS)
            assert result.undrained == 0
        finally:
            store.close()
        import redis

        client = redis.Redis(port=server.port)
        assert client.xlen(f"{PREFIX}:ledger") == 0  # all confirmed, all trimmed
        client.close()
        assert len(told_charges) > 1_000, len(told_charges)
        assert told_refunds
        _ = Policy
    finally:
        stop_file.write_text("stop")
        for p in workers:
            p.join(10)
            if p.is_alive():
                p.kill()
        for proc in drains.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        server.stop()
