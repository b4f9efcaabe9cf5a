"""Redis Cluster for real: a local three-master cluster started from the redis-server binary.

One `--redis` URL (any node) serves peers, `chain verify`, export/import,
prove and audit; shards whose keys live on other masters are all seen.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from knhk_stream.cli.main import main
from knhk_stream.store import LockchainStore
from knhk_stream.store.connect import split_url
from tests.support.cluster import SHARDS, Cluster
from tests.support.redis_servers import RedisCluster, start_cluster


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory) -> Iterator[RedisCluster]:
    c = start_cluster(tmp_path_factory.mktemp("redis-cluster"), masters=3)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def committed(tmp_path_factory, broker, redis_cluster) -> Iterator[Cluster]:
    """Four peers on the cluster commit a load on every shard."""
    c = Cluster(tmp_path_factory.mktemp("peers"), broker.bootstrap, redis_cluster.url)
    c.start_all()
    c.produce(2000, rate=2000)
    c.wait_all_committed()
    c.stop_all()
    yield c
    c.close()


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _args(c: Cluster, prefix: str | None = None) -> list[str]:
    return ["--settings", str(c.workdir / "chain.toml"), "--redis", c.redis_url, "--prefix", prefix or c.prefix]


def _holds(master, key: str) -> bool:
    try:
        return bool(master.client().exists(key))
    except redis.exceptions.MovedError:
        return False


def test_the_shards_live_on_different_masters(committed, redis_cluster):
    holders = {
        shard: {m.port for m in redis_cluster.masters if _holds(m, committed.store.keys(shard).head)}
        for shard in range(SHARDS)
    }
    assert all(len(h) == 1 for h in holders.values()), holders
    assert len(set().union(*holders.values())) >= 2, "every shard on one master proves nothing"


def test_chain_verify_reports_every_shard_of_every_master(committed):
    result = _cli("chain", "verify", *_args(committed), "--json")
    assert result.exit_code == 0, result.output
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["shard"] for r in reports) == list(range(SHARDS))
    assert all(r["ok"] and r["entries"] > 0 for r in reports)
    one = _cli("chain", "verify", *_args(committed), "--shard", str(SHARDS - 1))
    assert one.exit_code == 0 and f"shard {SHARDS - 1}: OK" in one.stdout, one.output
    committed.assert_chains_match_replay()


def test_export_then_import_on_the_cluster(committed, tmp_path: Path):
    path = tmp_path / "chain.jsonl"
    assert _cli("chain", "export", *_args(committed), "--out", str(path)).exit_code == 0
    lines = path.read_text().splitlines()
    assert len(lines) == sum(len(committed.store.range(s)) for s in range(SHARDS))
    prefix = committed.prefix + "-copy"
    imported = _cli("chain", "import", str(path), *_args(committed, prefix))
    assert imported.exit_code == 0, imported.output
    copy = LockchainStore.from_url(committed.redis_url, committed.settings.chain_id, prefix)
    try:
        for shard in range(SHARDS):
            assert [ce.to_json() for ce in copy.range(shard)] == [ce.to_json() for ce in committed.store.range(shard)]
        assert _cli("chain", "verify", *_args(committed, prefix)).exit_code == 0
    finally:
        keys = list(copy.client.scan_iter(match=f"{prefix}:*"))
        if keys:
            copy.client.delete(*keys)


def test_prove_and_audit_on_the_cluster(committed, tmp_path: Path):
    kafka = ["--bootstrap", committed.bootstrap, "--topic-prefix", committed.topic_prefix]
    audit = _cli("audit", *_args(committed), *kafka, "--all-shards")
    assert audit.exit_code == 0, audit.output
    shard = SHARDS - 1
    entry = committed.store.range(shard)[-1].entry
    out = tmp_path / "proof.json"
    made = _cli("prove", *_args(committed), *kafka, "--shard", str(shard), "--offset", str(entry.first_offset),
                "--out", str(out))  # fmt: skip
    assert made.exit_code == 0, made.output
    assert _cli("verify-proof", str(out), "--settings", str(committed.workdir / "chain.toml")).exit_code == 0


def test_url_options_are_taken_out_before_redis_py_sees_them():
    url, durability = split_url(
        "redis://u:p@127.0.0.1:7000/0?wait_replicas=1&wait_timeout_ms=250&health_check_interval=5"
    )
    assert url == "redis://u:p@127.0.0.1:7000/0?health_check_interval=5"
    assert (durability.replicas, durability.timeout_ms) == (1, 250)
    result = _cli(
        "chain", "verify", "--settings", "/nonexistent.toml", "--redis", "redis://127.0.0.1:1/0?wait_replicas=x"
    )
    assert result.exit_code != 0


def test_master_killed_mid_run_replica_promoted_no_hole_no_fork(tmp_path, broker):
    """WAIT 1: a root is published only once a replica holds it; after the failover the peers go on."""
    rc = start_cluster(tmp_path / "redis", masters=3, replicas=1, node_timeout_ms=1500)
    try:
        (tmp_path / "peers").mkdir()
        c = Cluster(tmp_path / "peers", broker.bootstrap, rc.url + "?wait_replicas=1&wait_timeout_ms=2000")
        try:
            c.start_all()
            c.produce(1500, rate=1000)
            victim = next(m for m in rc.masters if _holds(m, c.store.keys(0).head))
            victim.kill()
            c.produce(500, rate=1000)
            # shard 0 waits: its promoted replica has no replica of its own, so WAIT 1 cannot hold ...
            c.wait_until(lambda: any(_role(r) == "master" for r in rc.replicas), 180, "a replica to be promoted")
            victim.start()  # ... until the old master is back, now a replica of the new one
            c.produce(1000, rate=1000)
            c.wait_until(lambda: _committed_or_none(c) == 3000, 300, "3000 receipts committed after the failover")
            c.stop_all()
            for shard, chain in c.chains().items():
                cycles = [ce.entry.cycle for ce in chain]
                assert cycles == sorted(set(cycles)), f"shard {shard}: repeated or unordered cycles"
            c.assert_chains_match_replay()
            c.assert_no_equivocation()
            assert c.committed_receipts() == c.delta_records() == 3000
            logs = "".join(c.log(p.id) for p in c.settings.peers)
            assert "Redis unavailable" in logs and "Redis back" in logs
        finally:
            with contextlib.suppress(redis.RedisError):  # the keys die with the private cluster
                c.close()
    finally:
        rc.stop()


def _role(server) -> str | None:
    try:
        return server.client().info("replication")["role"]
    except redis.RedisError:
        return None


def _committed_or_none(c: Cluster) -> int | None:
    """Committed receipts, or None while this test's own client still sees the failover."""
    try:
        return c.committed_receipts()
    except redis.RedisError:
        return None
