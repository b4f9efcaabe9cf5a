"""`demo --redis-cluster` and `dev --redis-cluster`: the same commands on a local three-master Redis Cluster.

The cluster is started by the commands themselves from the redis-server binary
(skipped with the reason where there is none) and stopped when they end.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import redis

from knhk_stream.kafka.embedded import port_in_use
from knhk_stream.runtime.redis_servers import binaries
from tests.cli.conftest import free_port, knhk, spawn, stop, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(binaries() is None, reason="needs the redis-server and redis-cli binaries"),
]


def test_demo_on_a_local_redis_cluster_verifies_every_shard():
    ran = knhk("demo", "--deltas", "200", "--rate", "0", "--malformed-every", "7", "--timeout", "90",
               "--redis-cluster", timeout=180)  # fmt: skip
    assert ran.rc == 0, ran.out[-3000:] + ran.err[-3000:]
    first = ran.out.splitlines()[0]
    assert "a local Redis Cluster of 3 masters" in first, first
    port = int(re.search(r"Redis redis://127\.0\.0\.1:(\d+)/0", first)[1])
    rows = {int(m[1]): m[2] for m in re.finditer(r"^\s*(\d+)\s+\d+\s+.*\s(verifies|FAILED.*)$", ran.out, re.M)}
    assert rows == {s: "verifies" for s in range(4)}, ran.out[-2000:]
    assert "200 receipts for 200 deltas (all" in ran.out and "demo OK" in ran.out
    assert "stopped the local Redis Cluster" in ran.out
    assert not port_in_use(port), "the demo left its cluster running"


def test_demo_refuses_redis_and_redis_cluster_together():
    ran = knhk("demo", "--redis", "redis://127.0.0.1:6379/0", "--redis-cluster")
    assert ran.rc == 2 and "--redis-cluster starts a cluster of its own" in ran.err


def test_dev_on_a_local_redis_cluster_and_it_stops_with_dev(tmp_path: Path):
    log = tmp_path / "dev.log"
    proc = spawn("dev", "--port", str(free_port()), "--redis-cluster", log=log)
    try:
        wait_for(lambda: "stops everything" in log.read_text(), 90, "dev to be ready")
        text = log.read_text()
        url = text.split("KNHK_REDIS=", 1)[1].split()[0]
        assert "a local Redis Cluster" in text
        client = redis.Redis.from_url(url)
        assert client.info("cluster")["cluster_enabled"] == 1  # the export line names a cluster node
        assert "cluster_known_nodes:3" in client.execute_command("CLUSTER", "INFO").decode()
        port = client.connection_pool.connection_kwargs["port"]
        assert stop(proc, signal.SIGTERM, within=15) == 0, log.read_text()
        wait_for(lambda: not port_in_use(port), 10, "the cluster to stop with dev")
    finally:
        if proc.poll() is None:
            proc.kill()
