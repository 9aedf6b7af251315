"""Real redis-server processes for the tests: one standalone, one 3-master cluster.

A test session uses ``METERKIT_REDIS_URL`` / ``METERKIT_REDIS_CLUSTER_URL`` when set;
otherwise it starts its own servers on free loopback ports in a temporary folder and
stops them at the end. Without a ``redis-server`` binary the Redis tests skip, unless
``METERKIT_REQUIRE_REDIS=1`` (set by ``.ci/run``), which makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_cluster_port() -> int:
    """A free port for a cluster node: its bus port (port + 10000) must be free too,
    so the port is at most 55535 (redis-server refuses higher ones)."""
    import random

    for _ in range(200):
        port = random.randint(20_000, 55_535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def redis_binary() -> str | None:
    return shutil.which("redis-server")


def _wait_ready(
    port: int, timeout: float = 10.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    cli = shutil.which("redis-cli")
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break  # it exited (see redis.log): waiting longer cannot help
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"redis-server on port {port} did not start (cli: {cli})")


class RedisServer:
    """One redis-server process we started; ``restart()`` keeps its port and folder."""

    def __init__(self, folder: Path, port: int, *extra: str) -> None:
        self.folder = folder
        self.port = port
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = redis_binary()
        assert binary is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.folder / "redis.log"),
            *self.extra,
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_ready(self.port, process=self.process)
        except RuntimeError:
            self.kill()
            raise

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextmanager
def standalone(*extra: str) -> Iterator[RedisServer]:
    """Start one redis-server on a free port for the duration of the block."""
    with tempfile.TemporaryDirectory(prefix="meterkit-redis-") as tmp:
        server = RedisServer(Path(tmp), free_port(), *extra)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@contextmanager
def cluster(
    masters: int = 3, replicas: int = 0, node_timeout_ms: int = 2000, *extra: str
) -> Iterator[list[RedisServer]]:
    """Start a cluster of ``masters`` nodes with ``replicas`` replicas each (masters
    first in the list, as ``redis-cli --cluster create`` pairs them) and wait until
    every node says it is ok. ``extra`` goes to every redis-server."""
    cli = shutil.which("redis-cli")
    assert cli is not None, "redis-cli is needed to create a cluster"
    with tempfile.TemporaryDirectory(prefix="meterkit-cluster-") as tmp:
        nodes: list[RedisServer] = []
        try:
            for i in range(masters * (1 + replicas)):
                port = free_cluster_port()
                node = RedisServer(
                    Path(tmp) / str(i),
                    port,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                    *extra,
                )
                node.start()
                nodes.append(node)
            subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *[f"127.0.0.1:{n.port}" for n in nodes],
                    "--cluster-replicas",
                    str(replicas),
                    "--cluster-yes",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=30,
            )
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                # Every node must agree: one that does not yet answers CLUSTERDOWN.
                states = [
                    subprocess.run(
                        [cli, "-p", str(n.port), "cluster", "info"],
                        capture_output=True,
                        text=True,
                        timeout=5,
                    ).stdout
                    for n in nodes
                ]
                if all("cluster_state:ok" in out for out in states) and all(
                    _synced(cli, n.port) for n in nodes[masters:]
                ):
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError("the test cluster did not reach cluster_state:ok")
            yield nodes
        finally:
            for node in nodes:
                node.stop()


def _synced(cli: str, port: int) -> bool:
    """A replica has finished its first sync with its master (it can take over)."""
    info = subprocess.run(
        [cli, "-p", str(port), "info", "replication"], capture_output=True, text=True, timeout=5
    ).stdout
    return "master_link_status:up" in info


def master_of(nodes: list[RedisServer], key: str) -> RedisServer:
    """The node that serves ``key``'s slot now (asked of the cluster itself)."""
    import redis

    client = redis.RedisCluster(host="127.0.0.1", port=next(n.port for n in nodes if n.process))
    try:
        port = client.get_node_from_key(key).port
    finally:
        client.close()
    return next(n for n in nodes if n.port == port)


def require_redis() -> bool:
    return os.environ.get("METERKIT_REQUIRE_REDIS") == "1"
