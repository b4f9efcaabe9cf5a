"""Committed roots for consumers (RootsReader, `roots tail`) and a peer embedded in a pipeline."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from knhk_stream.kafka.embedded import create_topics
from knhk_stream.kafka.roots import InvalidRoot, RootsReader
from knhk_stream.kafka.topics import Topics
from knhk_stream.protocol.committed import CommittedEntry
from knhk_stream.protocol.encoding import ZERO_HASH, H
from knhk_stream.protocol.entry import Entry, record_key
from knhk_stream.protocol.quorum import Vote, load_private_key, sign
from knhk_stream.protocol.settings import ChainSettings
from knhk_stream.protocol.wire import encode_root
from knhk_stream.runtime.node import Outbound, PeerNode, marker_out, root_out, vote_out
from knhk_stream.runtime.worker import records
from knhk_stream.store.lockchain import load_checkpoint
from tests.support.cluster import SHARDS, Cluster

pytestmark = pytest.mark.integration

SESSION = {"session.timeout.ms": 6000}


@pytest.fixture()
def cluster(tmp_path, broker, redis_url) -> Iterator[Cluster]:
    c = Cluster(tmp_path, broker.bootstrap, redis_url)
    yield c
    c.close()


# -- a synthetic chain on a roots topic of our own ----------------------------------------


def signed(entry: Entry, keys, signers=("peer-a", "peer-b", "peer-c")) -> CommittedEntry:
    """Signed in epoch 0 of the conftest `settings` made from these keys."""
    from knhk_stream.protocol.keys import public_key_bytes
    from knhk_stream.protocol.settings import Peer

    peers = tuple(Peer(pid, public_key_bytes(k)) for pid, k in keys.items())
    epoch_hash = ChainSettings(peers=peers, threshold=3).genesis.epoch_hash
    votes = tuple(sorted((p, sign(keys[p], epoch_hash, entry.entry_hash)) for p in signers))
    return CommittedEntry(entry, entry.entry_hash, votes, signers[0], 1_700_000_000_000)


def chain_of(settings: ChainSettings, keys, shard: int, n: int) -> list[CommittedEntry]:
    """n linked committed entries; cycles skip (beats without deltas commit nothing)."""
    out, prev = [], ZERO_HASH
    for i in range(n):
        e = Entry(settings.chain_id, shard, 100 + 3 * i, H(b"root %d %d" % (shard, i)), 1 + i, 10 * i, 10 * i + 5, prev)
        out.append(signed(e, keys))
        prev = e.entry_hash
    return out


class RootsTopic:
    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.prefix = f"r{uuid.uuid4().hex[:8]}"
        self.name = f"{self.prefix}.roots"
        create_topics(bootstrap, {self.name: (2, {})})
        self.producer = Producer({"bootstrap.servers": bootstrap})

    def put(self, partition: int, value: bytes, key: bytes) -> None:
        self.producer.produce(self.name, key=key, value=value, partition=partition)

    def root(self, ce: CommittedEntry, partition: int | None = None, key: bytes | None = None) -> None:
        e = ce.entry
        k = key if key is not None else record_key(e.chain_id, e.shard, e.cycle).encode()
        self.put(e.shard if partition is None else partition, encode_root(ce), k)

    def flush(self) -> None:
        assert self.producer.flush(10) == 0


def reader(settings, topic: RootsTopic, group: str, **kw) -> RootsReader:
    return RootsReader(settings, topic.bootstrap, group_id=group, topic=topic.name, kafka_config=SESSION, **kw)


def take(r: RootsReader, n: int, timeout: float = 30) -> list[CommittedEntry]:
    got: list[CommittedEntry] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        ce = r.poll(0.2)
        if ce is not None:
            got.append(ce)
    return got


def bad_records(settings: ChainSettings, keys, topic: RootsTopic) -> tuple[list[CommittedEntry], list[str]]:
    """Genuine roots of shard 0 mixed with every kind of bad record; returns (genuine, expected kinds)."""
    good = chain_of(settings, keys, 0, 7)
    e = [ce.entry for ce in good]
    topic.root(good[0])
    topic.root(good[1])
    topic.root(good[1])  # duplicate
    forged = dict(good[2].votes)
    forged["peer-c"] = sign(keys["peer-c"], settings.genesis.epoch_hash, H(b"something else"))
    topic.root(dataclasses.replace(good[2], votes=tuple(sorted(forged.items()))))  # bad signature
    topic.root(dataclasses.replace(good[2], entry=dataclasses.replace(e[2], root=H(b"changed"))))  # changed root
    topic.root(signed(dataclasses.replace(e[3], prev_entry_hash=H(b"elsewhere")), keys))  # broken link, held
    topic.root(good[2])
    topic.root(good[3])  # overtakes the broken link
    topic.root(good[4], key=record_key("knhk", 0, e[4].cycle + 1).encode())  # wrong key
    topic.root(chain_of(settings, keys, 1, 1)[0], partition=0)  # a shard-1 root in partition 0
    topic.root(signed(dataclasses.replace(e[4], chain_id="other"), keys), key=b"other/0/x")  # wrong chain
    topic.put(0, b"\xc3\x01garbage", record_key("knhk", 0, 1).encode())  # not a root at all
    topic.root(good[5])  # before its predecessor: held back, then handed out in order
    topic.root(good[4])
    topic.root(signed(dataclasses.replace(e[1], root=H(b"rewritten history")), keys))  # conflicts with cycle 1
    topic.root(good[6])
    topic.flush()
    kinds = ["bad_quorum", "bad_record", "broken_link", "wrong_key", "wrong_shard", "wrong_chain", "bad_record",
             "broken_link"]  # fmt: skip
    return good, kinds


def test_bad_records_are_never_handed_out_and_are_reported(broker, settings, peer_keys, tmp_path):
    topic = RootsTopic(broker.bootstrap)
    good, kinds = bad_records(settings, peer_keys, topic)
    seen: list[InvalidRoot] = []
    with reader(settings, topic, f"g-{uuid.uuid4().hex[:6]}", on_invalid=lambda _r, p: seen.append(p)) as r:
        got = take(r, len(good))
        assert r.poll(1.0) is None
        assert [ce.entry_hash for ce in got] == [ce.entry_hash for ce in good]
        assert [p.kind for p in sorted(seen, key=lambda p: p.record.offset)] == kinds, [str(p) for p in seen]
        assert r.stats == {"roots": len(good), "duplicates": 1, "invalid": len(kinds)}

    # errors="raise": the same records raise in their turn; the roots still come in order.
    raised, roots = [], []
    with reader(settings, topic, f"g-{uuid.uuid4().hex[:6]}", errors="raise") as r:
        deadline = time.monotonic() + 30
        while len(roots) < len(good) and time.monotonic() < deadline:
            try:
                ce = r.poll(0.2)
            except InvalidRoot as e:
                raised.append(e.kind)
                continue
            if ce is not None:
                roots.append(ce)
    assert [ce.entry_hash for ce in roots] == [ce.entry_hash for ce in good]
    assert sorted(raised) == sorted(kinds)

    # `roots tail` shows the same roots, reports the bad records and exits 1.
    from click.testing import CliRunner

    from knhk_stream.cli.main import main

    (tmp_path / "chain.toml").write_text(settings.to_toml())
    result = CliRunner().invoke(main, [
        "roots", "tail", "--settings", str(tmp_path / "chain.toml"), "--bootstrap", broker.bootstrap,
        "--topic-prefix", topic.prefix, "--kafka-config", "session.timeout.ms=6000", "--from-beginning",
        "--max", str(len(good)), "--json",
    ])  # fmt: skip
    assert result.exit_code == 1, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [x["entry_hash"] for x in lines] == [ce.entry_hash.hex() for ce in good]
    assert result.stderr.count("INVALID") == len(kinds)


def test_restarted_member_neither_skips_nor_repeats_and_tail_starts_at_the_end(broker, settings, peer_keys):
    topic = RootsTopic(broker.bootstrap)
    good = chain_of(settings, peer_keys, 1, 12)
    for ce in good[:9]:
        topic.root(ce)
    topic.root(good[3])  # a late duplicate
    topic.flush()
    group = f"g-{uuid.uuid4().hex[:6]}"
    first = reader(settings, topic, group)
    got = take(first, 4)
    first.close()
    second = reader(settings, topic, group)
    got += take(second, 5)
    assert second.poll(1.0) is None
    assert [ce.entry.cycle for ce in got] == [ce.entry.cycle for ce in good[:9]]
    assert second.stats["duplicates"] == 1

    # A fresh group that starts at the end hands out only what comes next, linked to the root before it.
    live = reader(settings, topic, f"g-{uuid.uuid4().hex[:6]}", start="end")
    assert live.poll(5.0) is None
    for ce in good[9:]:
        topic.root(ce)
    topic.flush()
    assert [ce.entry.cycle for ce in take(live, 3)] == [ce.entry.cycle for ce in good[9:]]
    assert [ce.entry.cycle for ce in take(second, 3)] == [ce.entry.cycle for ce in good[9:]]
    live.close()
    second.close()


def test_roots_out_of_order_wait_for_their_predecessor_across_a_restart(broker, settings, peer_keys):
    topic = RootsTopic(broker.bootstrap)
    good = chain_of(settings, peer_keys, 0, 5)
    for ce in (good[0], good[1], good[4], good[2]):  # 4 comes before 3: it waits, and so does 2 behind it
        topic.root(ce)
    topic.flush()
    group = f"g-{uuid.uuid4().hex[:6]}"
    first = reader(settings, topic, group)
    got = take(first, 2)
    assert first.poll(2.0) is None
    first.close()
    topic.root(good[3])
    topic.flush()
    second = reader(settings, topic, group)
    got += take(second, 3)
    assert second.poll(1.0) is None
    second.close()
    assert [ce.entry.cycle for ce in got] == [ce.entry.cycle for ce in good]
    assert second.stats == {"roots": 3, "duplicates": 0, "invalid": 0}


# -- a live four-peer run -----------------------------------------------------------------


class Member(threading.Thread):
    """One reader of a group, polling in its own thread until stopped."""

    def __init__(self, cluster: Cluster, group: str) -> None:
        super().__init__(daemon=True)
        self.reader = RootsReader(cluster.settings, cluster.bootstrap, group_id=group,
                                  topic=cluster.topics.roots.name, kafka_config=SESSION)  # fmt: skip
        self.got: list[CommittedEntry] = []
        self.halt = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.halt.is_set():
            ce = self.reader.poll(0.2)
            if ce is not None:
                self.got.append(ce)
        self.reader.close()

    def stop(self) -> None:
        self.halt.set()
        self.join(30)


def test_reader_group_sees_every_root_once_in_order_across_a_restart(cluster):
    cluster.start_all()
    group = f"roots-{uuid.uuid4().hex[:6]}"
    a, b = Member(cluster, group), Member(cluster, group)
    cluster.produce(3000, rate=1500)
    cluster.wait_until(lambda: len(a.got) >= 3 and len(b.got) >= 3, 60, "both members reading roots")
    a.stop()  # mid-way: a new member takes over its share
    c = Member(cluster, group)
    cluster.produce(3000, rate=1500)
    cluster.wait_all_committed()
    cluster.stop_all()
    chains = cluster.chains()
    total = sum(len(v) for v in chains.values())
    cluster.wait_until(lambda: len(a.got) + len(b.got) + len(c.got) >= total, 60, f"{total} roots read")
    time.sleep(2)  # a repeat would show up now
    b.stop()
    c.stop()
    assert c.got, "the new member read nothing"
    seen = [(ce.entry.shard, ce.entry.cycle) for m in (a, b, c) for ce in m.got]
    assert len(seen) == len(set(seen)) == total, "a root was skipped or handed out twice"
    for m in (a, b, c):
        for shard in range(SHARDS):
            cycles = [ce.entry.cycle for ce in m.got if ce.entry.shard == shard]
            assert cycles == sorted(cycles), f"shard {shard} out of order"
    by_key = {(ce.entry.shard, ce.entry.cycle): ce.entry_hash for m in (a, b, c) for ce in m.got}
    for shard, entries in chains.items():
        assert all(by_key[(shard, ce.entry.cycle)] == ce.entry_hash for ce in entries)


# -- a peer embedded in a pipeline's own consumer loop ------------------------------------


def run_pipeline_peer(node: PeerNode, bootstrap: str, topics: Topics, group: str, stop: threading.Event) -> None:
    """What a pipeline does to act as one peer: its own consumers and producer around a PeerNode."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 2})
    deltas = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                       "isolation.level": "read_committed", "partition.assignment.strategy": "range",
                       **SESSION})  # fmt: skip
    votes = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{group}.votes", "enable.auto.commit": False})
    pending: list[Vote] = []
    acked: list[CommittedEntry] = []

    def send(topic: str, out: Outbound, on_delivery=None) -> None:
        producer.produce(topic, key=out.key, value=out.value, partition=out.partition,
                         headers=out.headers or [], on_delivery=on_delivery)  # fmt: skip

    def deliver_votes() -> None:
        if producer.flush(30) != 0:
            raise RuntimeError("votes not delivered")
        offsets = node.votes_delivered(pending)
        pending.clear()
        if offsets:
            deltas.commit(offsets=[TopicPartition(topics.deltas.name, s, o) for s, o in offsets.items()])

    def on_assign(consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for p in partitions:
            at = node.assign(p.partition)
            p.offset = at.next_offset
            votes.incremental_assign([TopicPartition(topics.votes.name, p.partition, at.votes_offset)])
        consumer.assign(partitions)

    def on_revoke(consumer: Consumer, partitions: list[TopicPartition]) -> None:
        deliver_votes()
        for p in partitions:
            node.revoke(p.partition)
            votes.incremental_unassign([TopicPartition(topics.votes.name, p.partition)])
        consumer.unassign()

    def root_acked(ce: CommittedEntry):
        return lambda err, _msg: acked.append(ce) if err is None else None

    deltas.subscribe([topics.deltas.name], on_assign=on_assign, on_revoke=on_revoke)
    try:
        while not stop.is_set():
            batch: list[Message] = deltas.consume(1000, timeout=0.05)
            # ... the pipeline's own work on `batch` goes here ...
            for vote in node.process(records(batch)):
                send(topics.votes.name, vote_out(vote))
                pending.append(vote)
            if pending:
                deliver_votes()
            node.on_vote_records(records(votes.consume(1000, timeout=0)))
            for ce in node.commit_ready():
                send(topics.roots.name, root_out(ce), root_acked(ce))
            for shard in node.markers_due():
                send(topics.deltas.name, marker_out(shard))
            producer.poll(0)
            if acked:
                node.roots_delivered(acked)
                acked.clear()
    finally:
        deliver_votes()
        deltas.close()
        votes.close()
        producer.flush(10)


def test_pipeline_with_its_own_consumer_loop_is_one_of_four_peers(cluster):
    for peer in ("peer-a", "peer-b", "peer-c"):
        cluster.start(peer)
    key = load_private_key(Path(cluster.workdir) / "peer-d.pem")
    node = PeerNode.connect(cluster.settings, "peer-d", key, cluster.redis_url, cluster.prefix)
    stop = threading.Event()
    errors: list[BaseException] = []

    def pipeline() -> None:
        try:
            run_pipeline_peer(node, cluster.bootstrap, cluster.topics, f"pipeline.{cluster.topic_prefix}", stop)
        except BaseException as e:
            errors.append(e)
            raise

    thread = threading.Thread(target=pipeline, daemon=True)
    thread.start()
    cluster.wait_joined("peer-a", "peer-b", "peer-c")
    cluster.produce(4000, rate=2000)
    cluster.wait_all_committed()
    cluster.wait_until(
        lambda: (
            errors
            or all(
                (cp := load_checkpoint(cluster.store, "peer-d", s)) is not None
                and cp.cycle == cluster.store.head(s).cycle
                for s in range(SHARDS)
            )
        ),
        60,
        "the embedded peer to vote on every head",
    )
    stop.set()
    thread.join(30)
    cluster.stop_all()
    assert not errors, errors
    assert node.stats["deltas"] == 4000
    cluster.assert_chains_match_replay()
    cluster.assert_no_equivocation()
    voters = {v.peer_id for v in cluster.votes()}
    assert voters == {"peer-a", "peer-b", "peer-c", "peer-d"}
