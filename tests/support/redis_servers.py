"""Private redis-server processes for tests: single servers, replicas and a local Redis Cluster.

Started from the `redis-server` binary on this machine on free loopback ports;
tests that need them skip with the reason where there is no binary.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def need_binaries() -> None:
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("needs the redis-server and redis-cli binaries to start servers of its own")


def free_port(below: int = 65536) -> int:
    """A free loopback port under `below` (cluster nodes also listen on port + 10000)."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < below:
            return port
    raise AssertionError(f"no free port below {below}")


def free_cluster_port() -> int:
    while True:
        port = free_port(55536)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@dataclass
class Server:
    port: int
    workdir: Path
    args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [str(REDIS_SERVER), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
               "--save", "", "--appendonly", "no", *self.args]  # fmt: skip
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.2).ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        raise AssertionError(
            f"redis-server on port {self.port} did not start: {(self.workdir / 'redis.log').read_text()}"
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=2)


@dataclass
class RedisCluster:
    """Masters (and replicas) of a local Redis Cluster; `url` points at the first master."""

    masters: list[Server]
    replicas: list[Server] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.masters[0].url

    def all(self) -> list[Server]:
        return [*self.masters, *self.replicas]

    def stop(self) -> None:
        for s in self.all():
            s.kill()


def start_cluster(workdir: Path, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 2000) -> RedisCluster:
    need_binaries()
    args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms))  # fmt: skip
    servers = [Server(free_cluster_port(), workdir / f"node{i}", args).start() for i in range((1 + replicas) * masters)]
    cmd = [str(REDIS_CLI), "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in servers),
           "--cluster-replicas", str(replicas), "--cluster-yes"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = servers[0].client().execute_command("CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        if "cluster_state:ok" in text:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the local Redis Cluster did not reach cluster_state:ok")
    roles = {s.port: s.client().info("replication")["role"] for s in servers}
    return RedisCluster([s for s in servers if roles[s.port] == "master"],
                        [s for s in servers if roles[s.port] != "master"])  # fmt: skip
