"""Peers on a real (Tansu) broker and a real Redis, run as `knhk-stream worker` processes."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from knhk_stream.kafka.producer import synthetic_deltas
from knhk_stream.store.lockchain import load_checkpoint, verify_range
from tests.support.cluster import SHARDS, Cluster

pytestmark = pytest.mark.integration


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
    cluster.wait_until(lambda: cluster.log("peer-b").count(" started ") == 2, 30, "peer-b restarted")
    cluster.wait_until(
        lambda: "resume at offset" in cluster.log("peer-b").split(" started ")[-1], 60, "peer-b rejoined"
    )
    cluster.produce(3000, rate=3000)
    cluster.wait_all_committed()
    cluster.wait_until(
        lambda: all(
            (cp := load_checkpoint(cluster.store, "peer-b", s)) is not None and cp.cycle == cluster.store.head(s).cycle
            for s in range(SHARDS)
        ),
        60,
        "peer-b to vote on every head",
        lambda: {s: (load_checkpoint(cluster.store, "peer-b", s), cluster.store.head(s)) for s in range(SHARDS)},
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
    import json

    from click.testing import CliRunner

    from knhk_stream.cli.main import main

    for peer in cluster.settings.peers:  # the default groups, which status reads the lag of
        cluster.start(peer.id, extra=("--group-id", f"knhk.{cluster.settings.chain_id}.{peer.id}"))
    cluster.wait_joined(*(p.id for p in cluster.settings.peers))
    cluster.produce(800, rate=2000)
    cluster.wait_all_committed()

    def run() -> tuple[int, list[dict]]:
        result = CliRunner().invoke(main, [
            "status", "--settings", str(cluster.workdir / "chain.toml"), "--redis", cluster.redis_url,
            "--prefix", cluster.prefix, "--bootstrap", cluster.bootstrap, "--topic-prefix", cluster.topic_prefix,
            "--json",
        ])  # fmt: skip
        assert result.exit_code == 0, result.output
        return result.exit_code, [json.loads(line) for line in result.stdout.splitlines()]  # one shard per line

    # Idle shards read lag 0, as Kafka users expect: the tick markers after the last delta are not input.
    cluster.wait_until(lambda: all(p["lag"] == 0 for st in run()[1] for p in st["peers"]), 60,
                       "every peer's lag to read 0 once idle", lambda: [st["peers"] for st in run()[1]])  # fmt: skip
    cluster.wait_until(lambda: all(st["rejected"]["receipts"] == 200 for st in run()[1]), 30,
                       "the peers' reports (every 5 s) to count every receipt",
                       lambda: [st["rejected"] for st in run()[1]])  # fmt: skip
    _code, shards = run()
    text = CliRunner().invoke(main, [
        "status", "--settings", str(cluster.workdir / "chain.toml"), "--redis", cluster.redis_url,
        "--prefix", cluster.prefix, "--bootstrap", cluster.bootstrap, "--topic-prefix", cluster.topic_prefix,
    ])  # fmt: skip
    assert text.exit_code == 0 and "  rejected: malformed " in text.stdout and " of 200 receipts since " in text.stdout
    markers = sum(1 for msgs in cluster.read_topic(cluster.topics.deltas.name).values() for m in msgs if m.headers())
    cluster.stop_all()
    assert markers > 0  # so the high watermark is ahead of what the groups committed
    assert len(shards) == SHARDS
    for st in shards:
        assert st["head_cycle"] is not None and not st["stalled"] and not st["equivocations"]
        assert all(p["state"] in ("agrees", "ahead") for p in st["peers"]), st["peers"]
        assert st["high_watermark"] > 0
        assert all(p["lag"] == p["lag_lso"] == 0 for p in st["peers"]), st["peers"]
    # Rejected receipts per code: in status (as the peers counted them) and in `chain show --rejected` (replayed).
    malformed = sum(1 for d in synthetic_deltas(800, seed=7, malformed_every=50) if isinstance(d, bytes))
    assert malformed > 0
    counted = [st["rejected"] for st in shards]
    assert sum(r["by_code"].get("malformed", 0) for r in counted) == malformed, counted
    assert all(set(st["rejected"]["by_code"]) <= {"malformed"} and st["rejected"]["receipts"] == 200 for st in shards)
    shown = CliRunner().invoke(main, [
        "chain", "show", "--settings", str(cluster.workdir / "chain.toml"), "--redis", cluster.redis_url,
        "--prefix", cluster.prefix, "--rejected", "--bootstrap", cluster.bootstrap,
        "--topic-prefix", cluster.topic_prefix, "--limit", "0", "--json",
    ])  # fmt: skip
    assert shown.exit_code == 0, shown.output
    rows = [json.loads(line) for line in shown.stdout.splitlines()]
    assert sum(r["rejected"].get("malformed", 0) for r in rows) == malformed
    assert any(r["rejected"] == {} for r in rows) or len(rows) == SHARDS
    table = CliRunner().invoke(main, [
        "chain", "show", "--settings", str(cluster.workdir / "chain.toml"), "--redis", cluster.redis_url,
        "--prefix", cluster.prefix, "--rejected", "--bootstrap", cluster.bootstrap,
        "--topic-prefix", cluster.topic_prefix,
    ])  # fmt: skip
    assert table.exit_code == 0 and "rejected" in table.stdout.splitlines()[0] and "malformed" in table.stdout


def _faulty_settings(cluster: Cluster):
    """The chain's settings but a buggy hook under the same name: a faulty replica."""
    import dataclasses

    faulty = dataclasses.replace(cluster.settings, hook_entrypoint="tests.support.hooks_example:upper")
    path = cluster.workdir / "faulty.toml"
    path.write_text(faulty.to_toml())
    return path


def _status(cluster: Cluster) -> tuple[int, list[dict]]:
    import json

    from click.testing import CliRunner

    from knhk_stream.cli.main import main

    result = CliRunner().invoke(main, [
        "status", "--settings", str(cluster.workdir / "chain.toml"), "--redis", cluster.redis_url,
        "--prefix", cluster.prefix, "--no-kafka", "--json",
    ])  # fmt: skip
    return result.exit_code, [json.loads(line) for line in result.stdout.splitlines()]


def test_one_faulty_replica_dissents_and_commits_go_on(cluster):
    faulty = _faulty_settings(cluster)
    for peer in ("peer-a", "peer-b", "peer-c"):
        cluster.start(peer)
    cluster.start("peer-d", settings=faulty)
    # every peer holds shards before the first delta: one that joins after the others committed everything
    # resumes after their head and has nothing to vote on (its state stays "no vote yet")
    cluster.wait_joined(*(p.id for p in cluster.settings.peers))
    cluster.produce(2000, rate=2000)
    cluster.wait_all_committed()
    cluster.wait_until(lambda: all(p["state"] != "no vote yet" for s in _status(cluster)[1] for p in s["peers"]), 30,
                       "every peer to vote")  # fmt: skip
    code, shards = _status(cluster)
    cluster.stop_all()
    assert code == 0
    for st in shards:
        states = {p["peer_id"]: p["state"] for p in st["peers"]}
        assert states["peer-d"] == "DISSENTS", states
        assert {states[p] for p in ("peer-a", "peer-b", "peer-c")} <= {"agrees", "ahead"}
    cluster.assert_chains_match_replay()


def test_two_faulty_replicas_stall_the_shard_and_nothing_wrong_commits(cluster):
    faulty = _faulty_settings(cluster)
    cluster.start("peer-a")
    cluster.start("peer-b")
    cluster.start("peer-c", settings=faulty)
    cluster.start("peer-d", settings=faulty)
    cluster.wait_joined(*(p.id for p in cluster.settings.peers))
    cluster.produce(1000, rate=1000)
    cluster.wait_until(lambda: _status(cluster)[0] == 3 and all(s["stalled"] for s in _status(cluster)[1]), 60,
                       "every shard to report a stall")  # fmt: skip
    cluster.wait_until(lambda: "STALLED" in cluster.log("peer-a"), 30, "peer-a to log the stall")
    code, shards = _status(cluster)
    cluster.stop_all()
    assert code == 3
    assert all("can reach threshold" in s["stalled"]["reason"] for s in shards)
    assert "STALLED" in cluster.log("peer-a")
    assert cluster.committed_receipts() == 0  # no entry of the split beats is committed


def test_forged_votes_change_nothing(cluster):
    from confluent_kafka import Producer

    from knhk_stream.protocol.encoding import H
    from knhk_stream.protocol.entry import Entry, record_key
    from knhk_stream.protocol.quorum import Vote, generate_key, sign
    from knhk_stream.protocol.wire import encode_vote

    cluster.start_all()
    cluster.produce(1000, rate=2000)
    cluster.wait_all_committed()
    mallory = generate_key()
    p = Producer({"bootstrap.servers": cluster.bootstrap})
    for shard in range(SHARDS):
        head = cluster.store.head(shard)
        fake = Entry("knhk", shard, head.cycle + 1, H(b"forged"), 1, 10**9, 10**9, head.entry_hash)
        for peer_id in ("peer-a", "peer-b", "peer-c", "peer-x"):
            vote = Vote(fake, peer_id, sign(mallory, cluster.settings.genesis.epoch_hash, fake.entry_hash))
            p.produce(cluster.topics.votes.name, key=record_key("knhk", shard, fake.cycle).encode(),
                      value=encode_vote(vote), partition=shard)  # fmt: skip
        p.produce(cluster.topics.votes.name, value=b"garbage", partition=shard)
    assert p.flush(10) == 0
    cluster.produce(1000, rate=2000)
    cluster.wait_all_committed()
    cluster.stop_all()
    cluster.assert_chains_match_replay()
    assert cluster.committed_receipts() == 2000
    log = cluster.log("peer-a")
    assert "bad_signature" in log and "unknown_peer" in log and "not a vote.avsc record" in log


def test_redis_outage_commits_wait_and_resume(tmp_path, broker):
    import shutil
    import socket
    import subprocess

    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("needs a redis-server binary to stop and restart one of its own")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    cmd = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(redis_dir), "--appendonly", "yes",
           "--appendfsync", "always", "--save", ""]  # fmt: skip

    def start_redis() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        for _ in range(100):
            try:
                redis.Redis(port=port).ping()
                return proc
            except redis.ConnectionError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    rs = start_redis()
    cluster = Cluster(tmp_path, broker.bootstrap, f"redis://127.0.0.1:{port}/0")
    try:
        cluster.start_all()
        cluster.produce(2000, rate=2000)
        cluster.wait_until(lambda: cluster.committed_receipts() > 0, 30, "first commits")
        rs.kill()
        rs.wait()
        cluster.produce(3000, rate=1000)  # three seconds without Redis
        rs = start_redis()
        cluster.produce(1000, rate=2000)
        cluster.wait_all_committed()
        cluster.stop_all()
        cluster.assert_chains_match_replay()
        cluster.assert_no_equivocation()
        assert cluster.committed_receipts() == 6000
        assert "Redis unavailable" in cluster.log("peer-a") and "Redis back" in cluster.log("peer-a")
    finally:
        cluster.close()
        rs.kill()
