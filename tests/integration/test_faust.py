"""A Faust app hosting peer-d next to three standalone workers, on the embedded broker and real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition

from knhk_stream.kafka.producer import synthetic_deltas
from knhk_stream.kafka.topics import load_topics
from knhk_stream.protocol.decode import encode_json
from knhk_stream.protocol.encoding import ZERO_HASH, H
from knhk_stream.protocol.entry import Entry
from knhk_stream.protocol.quorum import MAX_HELD_PER_PEER
from knhk_stream.store.lockchain import load_checkpoint
from tests.adversarial.helpers import Attacker
from tests.support.cluster import SHARDS, Cluster

faust = pytest.importorskip("faust")

from faust.types import TP  # noqa: E402

from knhk_stream.integrations.faust import FaustPeer, _Held, add_peer, record_of  # noqa: E402
from knhk_stream.runtime.node import PeerNode  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def cluster(tmp_path, broker, redis_url) -> Iterator[Cluster]:
    c = Cluster(tmp_path, broker.bootstrap, redis_url)
    yield c
    c.close()


def start_faust(cluster: Cluster, peer_id: str = "peer-d", **extra_env: str) -> subprocess.Popen[bytes]:
    """`python -m tests.support.faust_app worker` for `peer_id`, logging to workdir/{peer_id}.log."""
    env = {
        **extra_env,
        **os.environ,
        "KNHK_BOOTSTRAP": cluster.bootstrap,
        "KNHK_REDIS": cluster.redis_url,
        "KNHK_SETTINGS": str(cluster.workdir / "chain.toml"),
        "KNHK_PEER_ID": peer_id,
        "KNHK_KEY": str(cluster.workdir / f"{peer_id}.pem"),
        "KNHK_PREFIX": cluster.prefix,
        "KNHK_TOPIC_PREFIX": cluster.topic_prefix,
        "KNHK_FAUST_DIR": str(cluster.workdir / "faust-data"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    log = open(cluster.workdir / f"{peer_id}.log", "ab")  # noqa: SIM115 - the child owns it
    cmd = [sys.executable, "-m", "tests.support.faust_app", "worker", "-l", "info", "--without-web"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    cluster.procs[peer_id] = p
    return p


def mislead(cluster: Cluster, peer_id: str, offsets: dict[int, int]) -> None:
    """Commit `offsets` to the Faust app's consumer group as a member of it (once the killed one expired)."""
    c = Consumer({"bootstrap.servers": cluster.bootstrap, "group.id": f"knhk.{cluster.topic_prefix}.{peer_id}",
                  "enable.auto.commit": False, "session.timeout.ms": 6000})  # fmt: skip
    tps = [TopicPartition(cluster.topics.deltas.name, s, o) for s, o in offsets.items()]
    tps += [TopicPartition(cluster.topics.votes.name, s, 0) for s in offsets]
    try:
        c.subscribe([cluster.topics.deltas.name, cluster.topics.votes.name])
        deadline = time.monotonic() + 30
        while True:
            c.poll(0.5)  # records read here are never committed
            try:
                c.commit(offsets=tps, asynchronous=False)
                break
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
    finally:
        c.close()
    assert committed_offsets(cluster, peer_id) == offsets


def committed_offsets(cluster: Cluster, peer_id: str) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": cluster.bootstrap, "group.id": f"knhk.{cluster.topic_prefix}.{peer_id}"})
    try:
        got = c.committed([TopicPartition(cluster.topics.deltas.name, s) for s in range(SHARDS)], timeout=10)
        return {tp.partition: tp.offset for tp in got}
    finally:
        c.close()


def holds_all(cluster: Cluster, peer_id: str, run: int) -> bool:
    """The `run`-th start (1, 2, ...) of the Faust worker holds every shard."""
    runs = cluster.log(peer_id).split("[^Worker]: Starting")
    return len(runs) > run and f"holds shards [{', '.join(str(s) for s in range(SHARDS))}]" in runs[run]


def voted_on_every_head(cluster: Cluster, peer_id: str) -> bool:
    for s in range(SHARDS):
        cp, head = load_checkpoint(cluster.store, peer_id, s), cluster.store.head(s)
        if cp is None or head is None or cp.cycle != head.cycle or cp.entry_hash != head.entry_hash:
            return False
    return True


# -- without a broker ------------------------------------------------------------------------


def msg(partition: int, offset: int, generation: int = 3, ts: float | None = 1_700_000_000.125, **kw):
    m = SimpleNamespace(partition=partition, offset=offset, generation_id=generation, timestamp=ts,
                        headers=kw.get("headers", []), value=kw.get("value", b"{}"), key=kw.get("key"))  # fmt: skip
    return SimpleNamespace(message=m)


@pytest.fixture()
def faust_peer(settings, peer_keys) -> FaustPeer:
    """A peer on an app that never starts: nothing here talks to Kafka or Redis."""
    app = faust.App("knhk-unit", broker="kafka://127.0.0.1:1", web_enabled=False, autodiscover=False)
    node = PeerNode.connect(settings, "peer-a", peer_keys["peer-a"], "redis://127.0.0.1:1/0", "unit")
    return FaustPeer(app, node, load_topics().renamed("unit"))


def test_record_of_gives_back_exact_milliseconds():
    for ms in (0, 1, 999, 1_700_000_000_125, 1_764_064_123_457, 4_102_444_800_999, 2**45 + 3):
        r = record_of(msg(2, 7, ts=ms / 1000.0).message)
        assert r.timestamp_ms == ms and (r.partition, r.offset) == (2, 7)
    assert record_of(msg(0, 0, ts=None).message).timestamp_ms == -1


def test_repeats_stale_generations_and_unheld_shards_are_dropped(faust_peer):
    faust_peer._held[0] = _Held(generation=3, last_delta=9, last_vote=4, first_delta=10)
    events = [msg(0, 8), msg(0, 9), msg(0, 10), msg(0, 11), msg(0, 10), msg(0, 12, generation=2), msg(1, 5),
              msg(0, 11), msg(0, 13)]  # fmt: skip
    got = faust_peer._accept(events, deltas=True)
    assert [r.offset for r in got] == [10, 11, 13]
    assert faust_peer._held[0].last_delta == 13 and faust_peer._held[0].last_vote == 4
    assert (faust_peer.dropped.repeated, faust_peer.dropped.stale, faust_peer.dropped.not_held) == (4, 1, 1)
    votes = faust_peer._accept([msg(0, 4), msg(0, 5), msg(0, 5), msg(0, 6)], deltas=False)
    assert [r.offset for r in votes] == [5, 6] and faust_peer._held[0].last_vote == 6


def test_faust_seek_to_committed_goes_to_the_peers_own_positions(faust_peer):
    topics = faust_peer.topics
    seeks: list[dict] = []

    class FakeConsumer:
        async def seek_to_committed(self):
            return {TP(topics.deltas.name, 0): 107, TP(topics.votes.name, 0): 50, TP("other", 0): 3}

        async def seek_wait(self, targets):
            seeks.append(dict(targets))

        def assignment(self):
            return {TP(topics.deltas.name, 0), TP(topics.votes.name, 0), TP(topics.deltas.name, 1), TP("other", 0)}

    consumer = FakeConsumer()
    faust_peer._patch_consumer(consumer)
    faust_peer._held[0] = _Held(generation=1, last_delta=99, last_vote=11, first_delta=100)
    got = asyncio.run(consumer.seek_to_committed())
    mine = {TP(topics.deltas.name, 0): 100, TP(topics.votes.name, 0): 12}
    assert seeks == [mine]
    assert got == {**mine, TP("other", 0): 3}  # Faust's offsets stay for the app's other topics
    assert faust_peer._held[0].seeked


def test_the_faust_consumer_reads_committed_and_exactly_once_apps_are_refused(faust_peer, settings, peer_keys):
    async def isolation():
        consumer = faust_peer.app.consumer._thread._create_consumer(asyncio.get_running_loop())
        await consumer.stop()
        return consumer._isolation_level

    assert asyncio.run(isolation()) == "read_committed"
    eos = faust.App("knhk-eos", broker="kafka://127.0.0.1:1", processing_guarantee="exactly_once")
    with pytest.raises(ValueError, match="at_least_once"):
        add_peer(eos, settings, "peer-a", peer_keys["peer-a"], redis_url="redis://127.0.0.1:1/0")


# -- mixed peers on the broker ----------------------------------------------------------------


@pytest.mark.integration
def test_faust_peer_votes_like_a_worker_and_survives_kill_9(cluster):
    for peer in ("peer-a", "peer-b", "peer-c"):
        cluster.start(peer)
    start_faust(cluster)
    cluster.wait_joined("peer-a", "peer-b", "peer-c")
    cluster.wait_until(lambda: holds_all(cluster, "peer-d", 1), 60, "the Faust peer to hold every shard")

    producing = threading.Thread(target=cluster.produce, args=(5000,), kwargs={"rate": 1500})
    producing.start()
    cluster.wait_until(lambda: all(load_checkpoint(cluster.store, "peer-d", s) for s in range(SHARDS)), 30,
                       "the Faust peer to vote on every shard")  # fmt: skip
    cluster.kill("peer-d")  # mid-run: deltas keep coming, peer-a..c commit alone
    before = {s: load_checkpoint(cluster.store, "peer-d", s) for s in range(SHARDS)}
    producing.join()
    # Faust's committed offsets must not matter: point the app's group into the middle of a beat.
    mislead(cluster, "peer-d", {s: cp.next_offset + 7 for s, cp in before.items()})

    start_faust(cluster)
    cluster.wait_until(lambda: holds_all(cluster, "peer-d", 2), 60, "the restarted Faust peer to hold every shard")
    cluster.produce(2000, rate=2000)
    cluster.wait_all_committed()
    cluster.wait_until(lambda: voted_on_every_head(cluster, "peer-d"), 60, "the Faust peer to vote on every head",
                       lambda: {s: (load_checkpoint(cluster.store, "peer-d", s), cluster.store.head(s))
                                for s in range(SHARDS)})  # fmt: skip

    faust_proc = cluster.procs["peer-d"]
    faust_proc.send_signal(signal.SIGTERM)
    assert faust_proc.wait(30) == 0
    cluster.stop_all()
    log = cluster.log("peer-d")
    # Its consumer offsets moved only to beat boundaries, after the votes: its checkpoints.
    assert committed_offsets(cluster, "peer-d") == {s: load_checkpoint(cluster.store, "peer-d", s).next_offset
                                                    for s in range(SHARDS)}  # fmt: skip
    assert "peer peer-d stopped (shards [0, 1, 2, 3] checkpointed" in log
    assert "Traceback" not in log and "not sent" not in log and "not delivered" not in log

    assert cluster.committed_receipts() == cluster.produced == 7000
    cluster.assert_chains_match_replay()
    cluster.assert_no_equivocation()
    # peer-d's votes are the replay's entries, byte for byte, on every beat it voted on.
    replay = {(s, e.cycle): e for s, entries in cluster.replay().items() for e in entries}
    mine = [v for v in cluster.votes() if v.peer_id == "peer-d"]
    assert mine and all(v.entry == replay[(v.entry.shard, v.entry.cycle)] for v in mine)
    # It resumed from its checkpoints: after the restart it voted on beats after them, never before.
    restarted = log.split("[^Worker]: Starting")[2]
    for s in range(SHARDS):
        assert f"shard {s}: resume at offset {before[s].next_offset} " in restarted, before[s]
        assert f"deltas[{s}]@{before[s].next_offset}," in restarted, "not seeked to the checkpoint"
        assert max(v.entry.cycle for v in mine if v.entry.shard == s) > before[s].cycle


# -- what the worker's loop does beside the agents: the same for a Faust peer -------------------


def _faust_alone(cluster: Cluster, peer_id: str = "peer-a", **extra_env: str) -> None:
    """The Faust peer as the only peer running: the test plays the others (it holds their keys)."""
    start_faust(cluster, peer_id, **extra_env)
    cluster.wait_until(lambda: holds_all(cluster, peer_id, 1), 60, f"the Faust {peer_id} to hold every shard")


@pytest.mark.integration
def test_faust_peer_publishes_equivocation_evidence_and_pauses_a_halted_shard(cluster):
    """Redis can be wiped; the evidence topic cannot: a Faust peer writes what it finds there too.
    A shard whose open beat passed its bound halts, and its deltas partition is paused, as in the worker."""
    _faust_alone(cluster, KNHK_MAX_OPEN_BEAT_DELTAS="50")
    attacker = Attacker(cluster, "peer-d")
    far = json.dumps({"additions": [{"s": "urn:s", "p": "urn:p", "o": "far"}], "removals": []}).encode()
    attacker.put(cluster.topics.deltas.name, 1, far, timestamp=2**62)  # keeps its beat open for ever
    for d in synthetic_deltas(120, seed=5):
        attacker.put(cluster.topics.deltas.name, 1, encode_json(d))
    for root, cycle in ((b"one", 5), (b"two", 6)):  # two successors of genesis, both signed by peer-d
        attacker.send_vote(attacker.vote(Entry("knhk", 0, cycle, H(root), 1, 10**9, 10**9, ZERO_HASH)))
    attacker.flush()

    found = cluster.store.keys(0).evidence
    cluster.wait_until(lambda: cluster.store.client.hlen(found) > 0, 30, "peer-a to find the equivocation")

    def reported() -> list[dict]:
        records = cluster.read_topic(cluster.topics.evidence.name)[0]
        return [json.loads(m.value()) for m in records]

    cluster.wait_until(lambda: any(ev["reported_by"] == "peer-a" for ev in reported()), 30,
                       "peer-a's evidence on the evidence topic", reported)  # fmt: skip
    ev = next(ev for ev in reported() if ev["reported_by"] == "peer-a")
    assert ev["peer_id"] == "peer-d" and {ev["first"]["cycle"], ev["second"]["cycle"]} == {5, 6}
    cluster.wait_until(lambda: "shards [1] halted: their deltas partitions are paused" in cluster.log("peer-a"), 30,
                       "peer-a to halt shard 1 and pause it")  # fmt: skip
    assert "SHARD 1 HALTED" in cluster.log("peer-a") and "Traceback" not in cluster.log("peer-a")


@pytest.mark.integration
def test_faust_peer_reads_votes_dropped_by_a_peers_share_again_and_commits_them(cluster):
    """More beats voted than a peer's share of held votes (MAX_HELD_PER_PEER) before any quorum: the
    votes over the share are dropped, and only reading the votes partition again commits them."""
    cluster.use_tick_ms(1)
    _faust_alone(cluster)
    beats = MAX_HELD_PER_PEER + 60
    producer = Attacker(cluster)
    start = (int(time.time() * 1000) // 8 - beats - 100) * 8  # a delta per 8 ms beat, all in the past
    for i, d in enumerate(synthetic_deltas(beats, seed=3, malformed_every=0)):
        producer.put(cluster.topics.deltas.name, 0, encode_json(d), timestamp=start + 8 * i)
    producer.flush()
    cluster.produced = beats

    def voted() -> list:
        return [v for v in cluster.votes() if v.peer_id == "peer-a" and v.entry.shard == 0]

    cluster.wait_until(lambda: len(voted()) == beats, 60, f"peer-a to vote on all {beats} beats",
                       lambda: len(voted()))  # fmt: skip
    mine = voted()
    for peer in ("peer-b", "peer-c"):  # one after the other: peer-b's votes past its share are dropped
        other = Attacker(cluster, peer)
        for v in mine:
            other.send_vote(other.vote(v.entry))
        other.flush()
        time.sleep(2)
    last = max(v.entry.cycle for v in mine)
    cluster.wait_until(lambda: (cluster.store.head(0) or mine[0].entry).cycle == last, 60,
                       f"every beat committed up to cycle {last}", lambda: cluster.store.head(0))  # fmt: skip
    assert cluster.committed_receipts() == beats
    assert [ce.entry for ce in cluster.store.range(0)] == [v.entry for v in mine]
    assert "read the votes partition again" in cluster.log("peer-a")
