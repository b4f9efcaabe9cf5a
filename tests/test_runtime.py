"""Peers on a real (Tansu) broker and a real Redis, run as `knhk-stream worker` processes."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from knhk_stream.embedded import EmbeddedBroker
from knhk_stream.store import load_checkpoint, verify_range
from tests.cluster import SHARDS, Cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        print(f"\nknhk tests use the embedded Tansu broker at {b.bootstrap}")
        yield b


@pytest.fixture()
def cluster(tmp_path, broker, redis_url) -> Iterator[Cluster]:
    c = Cluster(tmp_path, broker.bootstrap, redis_url)
    yield c
    c.close()


def test_four_peers_commit_every_beat_once_and_match_replay(cluster):
    cluster.start_all()
    cluster.produce(20_000, malformed_every=37, rate=8000)
    cluster.wait_all_committed()
    cluster.stop_all()
    cluster.assert_chains_match_replay()
    assert cluster.committed_receipts() == cluster.delta_records() == 20_000
    cluster.assert_no_equivocation()
    # Every closed beat is committed exactly once: replay and chain agree cycle for cycle.
    replay = cluster.replay()
    for shard in range(SHARDS):
        cycles = [ce.entry.cycle for ce in cluster.store.range(shard)]
        assert cycles == sorted(set(cycles))
        assert cycles == [e.cycle for e in replay[shard]][: len(cycles)]


def test_sigkilled_peer_restarts_without_hole_fork_or_second_vote(cluster):
    cluster.start_all()
    cluster.produce(3000, rate=1500)
    cluster.wait_until(lambda: load_checkpoint(cluster.store, "peer-b", 0) is not None, 30, "peer-b voting")
    cluster.kill("peer-b")
    cluster.produce(3000, rate=3000)
    cluster.start("peer-b")
    cluster.wait_until(lambda: "resume at offset" in cluster.log("peer-b").split("started")[-1], 60, "peer-b rejoined")
    cluster.produce(3000, rate=3000)
    cluster.wait_all_committed()
    cluster.wait_until(
        lambda: all(
            (cp := load_checkpoint(cluster.store, "peer-b", s)) is not None
            and cp.cycle == cluster.store.head(s).cycle
            for s in range(SHARDS)
        ),
        60,
        "peer-b to vote on every head",
    )
    cluster.stop_all()
    cluster.assert_chains_match_replay()
    cluster.assert_no_equivocation()
    assert cluster.committed_receipts() == 9000


def test_two_workers_of_one_peer_split_shards_and_survive_a_stop(cluster):
    for peer in ("peer-a", "peer-c", "peer-d"):
        cluster.start(peer)
    cluster.start("peer-b", name="peer-b-1")
    cluster.start("peer-b", name="peer-b-2")
    cluster.produce(4000, rate=4000)
    cluster.wait_until(lambda: "resume at offset" in cluster.log("peer-b-1"), 60, "peer-b-1 holding shards")
    cluster.stop("peer-b-1")
    cluster.produce(2000, rate=4000)
    cluster.wait_until(lambda: cluster.log("peer-b-2").count("resume at offset") >= 4, 60, "peer-b-2 taking over")
    cluster.produce(2000, rate=4000)
    cluster.wait_all_committed()
    cluster.wait_until(
        lambda: all(
            (cp := load_checkpoint(cluster.store, "peer-b", s)) is not None and cp.cycle == cluster.store.head(s).cycle
            for s in range(SHARDS)
        ),
        60,
        "peer-b's remaining worker to vote on every head",
    )
    cluster.stop_all()
    log1 = cluster.log("peer-b-1")
    assert "resume at offset" in log1 and "revoked" in log1
    cluster.assert_chains_match_replay()
    cluster.assert_no_equivocation()


def test_markers_close_beats_when_no_deltas_come(cluster):
    cluster.start_all()
    cluster.produce(400, rate=0)
    # No more deltas: only the tick markers the peers write can close the last beats.
    cluster.wait_all_committed(timeout=30)
    assert cluster.committed_receipts() == 400
    markers = sum(1 for msgs in cluster.read_topic(cluster.topics.deltas.name).values() for m in msgs if m.headers())
    assert markers > 0
    cluster.stop_all()
    for s in range(SHARDS):
        assert verify_range(cluster.store, cluster.settings, s).ok


def test_status_reports_heads_and_agreement(cluster):
    from click.testing import CliRunner

    from knhk_stream.cli import main

    cluster.start_all()
    cluster.produce(800, rate=2000)
    cluster.wait_all_committed()
    time.sleep(1)
    result = CliRunner().invoke(main, [
        "status", "--settings", str(cluster.workdir / "chain.toml"), "--redis", cluster.redis_url,
        "--prefix", cluster.prefix, "--bootstrap", cluster.bootstrap, "--topic-prefix", cluster.topic_prefix, "--json",
    ])  # fmt: skip
    cluster.stop_all()
    assert result.exit_code == 0, result.output
    import json

    shards = json.loads(result.stdout)
    assert len(shards) == SHARDS
    for st in shards:
        assert st["head_cycle"] is not None and not st["stalled"] and not st["equivocations"]
        assert all(p["state"] in ("agrees", "ahead") for p in st["peers"]), st["peers"]
        assert st["high_watermark"] > 0
