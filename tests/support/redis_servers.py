"""Private redis-server processes for tests: single servers, replicas and a local Redis Cluster.

The servers themselves are the package's (`knhk_stream.runtime.redis_servers`,
which `dev --redis-cluster` and `demo --redis-cluster` use too); here, tests
that need them skip with the reason where there is no binary.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from knhk_stream.runtime import redis_servers
from knhk_stream.runtime.redis_servers import LocalCluster, Server, binaries, free_cluster_port, free_port

RedisCluster = LocalCluster

__all__ = ["RedisCluster", "Server", "free_cluster_port", "free_port", "need_binaries", "start_cluster"]


def need_binaries() -> None:
    if binaries() is None:
        pytest.skip("needs the redis-server and redis-cli binaries to start servers of its own")


def start_cluster(workdir: Path, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 2000) -> LocalCluster:
    need_binaries()
    return redis_servers.start_cluster(workdir, masters, replicas, node_timeout_ms)
