"""Private redis-server processes: single servers and a local Redis Cluster, for `dev`, `demo` and the tests.

Started from the `redis-server` (and, for a cluster, `redis-cli`) binary on
this machine, on free loopback ports, memory only (`--save "" --appendonly no`):
what they hold is gone when they stop. `dev --redis-cluster` and
`demo --redis-cluster` use `start_cluster`, so a cluster is one flag away.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import redis

from knhk_stream.errors import KnhkError
from knhk_stream.kafka.embedded import _die_with_parent

__all__ = ["LocalCluster", "RedisServerError", "Server", "binaries", "free_cluster_port", "free_port", "start_cluster"]

CLUSTER_BUS_OFFSET = 10000  # a cluster node also listens on its port + 10000 (the cluster bus)


class RedisServerError(KnhkError):
    """A local redis-server could not be started (no binary, or it did not come up)."""


def binaries() -> tuple[str, str] | None:
    """The redis-server and redis-cli on PATH, or None when either is missing."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    return (server, cli) if server and cli else None


def _need_binaries() -> tuple[str, str]:
    found = binaries()
    if found is None:
        raise RedisServerError(
            "a local Redis Cluster needs the redis-server and redis-cli binaries on PATH (e.g. apt-get install "
            "redis-server, or brew install redis); or pass --redis URL of a cluster node you run yourself"
        )
    return found


def free_port(below: int = 65536) -> int:
    """A free loopback port under `below` (cluster nodes also listen on port + 10000)."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < below:
            return port
    raise RedisServerError(f"no free loopback port below {below}")


def free_cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000) is free too."""
    for _ in range(1000):
        port = free_port(65536 - CLUSTER_BUS_OFFSET)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))
            except OSError:
                continue
        return port
    raise RedisServerError("no free pair of loopback ports for a cluster node (port and port + 10000)")


@dataclass
class Server:
    """One redis-server on 127.0.0.1, memory only; `start()` again after `kill()` comes back empty."""

    port: int
    workdir: Path
    args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    die_with_parent: bool = False  # Linux: the server stops when this process dies, even by SIGKILL

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10) -> Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerError("no redis-server binary on PATH (e.g. apt-get install redis-server)")
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
               "--save", "", "--appendonly", "no", *self.args]  # fmt: skip
        log_path = self.workdir / "redis.log"
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent() if self.die_with_parent else None)  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.2).ping():
                    return self
            except redis.RedisError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        self.kill()
        raise RedisServerError(f"redis-server on port {self.port} did not start; its log ({log_path}):\n"
                               f"{log_path.read_text(errors='replace')[-2000:]}")  # fmt: skip

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=2)


@dataclass
class LocalCluster:
    """Masters (and replicas) of a local Redis Cluster; `url` points at the first master. A context
    manager: leaving it stops every node and deletes a work directory it made itself."""

    masters: list[Server]
    replicas: list[Server] = field(default_factory=list)
    own_workdir: Path | None = None

    @property
    def url(self) -> str:
        return self.masters[0].url

    def all(self) -> list[Server]:
        return [*self.masters, *self.replicas]

    def stop(self) -> None:
        for s in self.all():
            s.kill()
        if self.own_workdir is not None:
            shutil.rmtree(self.own_workdir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_cluster(
    workdir: Path | None = None,
    masters: int = 3,
    replicas: int = 0,
    node_timeout_ms: int = 2000,
    die_with_parent: bool = False,
    timeout_s: float = 30,
) -> LocalCluster:
    """Start `masters` x (1 + `replicas`) nodes on free ports, create the cluster and wait for
    cluster_state:ok. Without `workdir`, a temporary one is made (and deleted by `stop()`)."""
    _server, cli = _need_binaries()
    own = None
    if workdir is None:
        workdir = own = Path(tempfile.mkdtemp(prefix="knhk-redis-cluster-"))
    args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms))  # fmt: skip
    servers: list[Server] = []
    cluster = LocalCluster(servers, [], own)
    try:
        for i in range((1 + replicas) * masters):
            servers.append(Server(free_cluster_port(), workdir / f"node{i}", args, die_with_parent=die_with_parent))
            servers[-1].start()
        cmd = [cli, "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in servers),
               "--cluster-replicas", str(replicas), "--cluster-yes"]  # fmt: skip
        made = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
        if made.returncode != 0:
            raise RedisServerError(f"redis-cli --cluster create failed: {made.stdout.decode(errors='replace')[-1000:]}"
                                   f"{made.stderr.decode(errors='replace')[-1000:]}")  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = servers[0].client().execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" in text:
                break
            time.sleep(0.2)
        else:
            raise RedisServerError(f"the local Redis Cluster did not reach cluster_state:ok in {timeout_s:.0f} s "
                                   f"(its nodes' logs are under {workdir})")  # fmt: skip
        roles = {s.port: s.client().info("replication")["role"] for s in servers}
    except BaseException:
        cluster.stop()
        raise
    cluster.masters = [s for s in servers if roles[s.port] == "master"]
    cluster.replicas = [s for s in servers if roles[s.port] != "master"]
    return cluster
