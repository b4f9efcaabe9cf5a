"""Attacks by one byzantine peer: it holds one valid key and, like every peer, write access to the shared Redis."""

from __future__ import annotations

import dataclasses
import json
import time
import tracemalloc

import pytest
from confluent_kafka import Consumer, TopicPartition

from knhk_stream.kafka.roots import RootsReader
from knhk_stream.protocol.committed import CommittedEntry
from knhk_stream.protocol.encoding import ZERO_HASH, H
from knhk_stream.protocol.entry import Entry
from knhk_stream.protocol.quorum import MAX_HELD_PER_PEER, WINDOW, load_private_key, public_key_bytes
from knhk_stream.protocol.wire import decode_root
from knhk_stream.runtime.node import EPOCH_POLL_S, PeerNode, Record, now_ms
from knhk_stream.store.keys import epochs_key
from knhk_stream.store.lockchain import (
    Checkpoint,
    checkpoint_message,
    checkpoint_verifies,
    get_evidence,
    get_published,
    load_checkpoint,
    save_checkpoint,
    verify_range,
)
from tests.adversarial.helpers import Attacker, cli, health, kafka_args, settings_args, start_launched, status, wait
from tests.support.cluster import SHARDS, Cluster

pytestmark = pytest.mark.integration


def _signed(cluster: Cluster, peer_id: str, shard: int, cp: Checkpoint) -> Checkpoint:
    key = load_private_key(cluster.workdir / f"{peer_id}.pem")
    return dataclasses.replace(cp, signature=key.sign(checkpoint_message("knhk", peer_id, shard, cp)))


def _receipts(cluster: Cluster, shards=range(SHARDS)) -> int:
    return sum(ce.entry.receipt_count for s in shards for ce in cluster.store.range(s))


# -- 4. checkpoints and heads read back from Redis ------------------------------------------


def test_forged_checkpoints_cannot_make_peers_skip_input(cluster: Cluster):
    """Before any peer runs, the byzantine peer writes checkpoints for three honest peers (a quorum)."""
    d_key = load_private_key(cluster.workdir / "peer-d.pem")
    for shard in range(SHARDS):
        for peer in ("peer-a", "peer-b", "peer-c"):
            # shards 0, 1: skip offsets 0..299; shards 2, 3: so far ahead that honest writes would be refused
            cp = Checkpoint(300 if shard < 2 else 10**9, ZERO_HASH, None, 0, now_ms())
            signature = bytes(64) if peer != "peer-c" else d_key.sign(checkpoint_message("knhk", peer, shard, cp))
            save_checkpoint(cluster.store, peer, shard, dataclasses.replace(cp, signature=signature))
    cluster.produce(2000, rate=4000)
    cluster.start_all()
    cluster.wait_all_committed()
    assert "does not verify under this peer's key" in cluster.log("peer-a")
    # A peer that took a shard after the others had committed all of it resumes after the head and has
    # nothing to vote on there yet: more deltas, so that every peer votes (and checkpoints) on every shard.
    cluster.produce(400, rate=2000)
    cluster.wait_all_committed()
    # Honest checkpoint writes were not refused: each peer's checkpoint is its own, signed, and moves on.
    for peer in ("peer-a", "peer-b", "peer-c"):
        pub = public_key_bytes(load_private_key(cluster.workdir / f"{peer}.pem"))

        def own(p: str = peer, k: bytes = pub) -> bool:
            cps = [load_checkpoint(cluster.store, p, s) for s in range(SHARDS)]
            return all(cp is not None and cp.next_offset < 10**9 and checkpoint_verifies("knhk", p, s, cp, [k])
                       for s, cp in enumerate(cps))  # fmt: skip

        wait(own, 30, f"{peer}'s own checkpoints")
    cluster.stop("peer-a")  # and it resumes from its own checkpoint, not from the forged one it replaced
    cluster.start("peer-a")
    cluster.wait_until(lambda: cluster.log("peer-a").count("resume at offset") >= 2 * SHARDS, 60, "peer-a back")
    assert "resume at offset 1000000000 after" not in cluster.log("peer-a")
    cluster.produce(400, rate=2000)
    cluster.wait_all_committed()
    cluster.stop_all()
    cluster.assert_chains_match_replay()  # every chain starts at offset 0: nothing skipped
    assert cluster.committed_receipts() == 2800
    result = cli("audit", *settings_args(cluster), *kafka_args(cluster), "--all-shards")
    assert result.exit_code == 0, result.output


def test_audit_catches_input_that_a_colluding_quorum_skipped(cluster: Cluster):
    """Threshold peers sign checkpoints that skip offsets 0..299: the chain's own checks cannot know; the replay can."""
    for shard in range(SHARDS):
        for peer in ("peer-a", "peer-b", "peer-c"):
            cp = _signed(cluster, peer, shard, Checkpoint(300, ZERO_HASH, None, 0, now_ms()))
            save_checkpoint(cluster.store, peer, shard, cp)
    cluster.produce(2000, rate=4000)
    for peer in ("peer-a", "peer-b", "peer-c"):
        cluster.start(peer)
    cluster.wait_until(lambda: _receipts(cluster) == 2000 - SHARDS * 300, 90, "the shortened chains",
                       lambda: _receipts(cluster))  # fmt: skip
    cluster.stop_all()
    verified = cli("chain", "verify", *settings_args(cluster))
    assert verified.exit_code == 0, verified.output  # hashes, links and quorums all hold
    audited = cli("audit", *settings_args(cluster), *kafka_args(cluster), "--all-shards", "--json")
    assert audited.exit_code == 1, audited.output
    for line in audited.stdout.splitlines():
        report = json.loads(line)
        diff = report["difference"]
        assert report["status"] == "FAILED" and diff["field"] == "uncovered" and diff["offset"] == 0, report
        assert "no committed receipt covers" in diff["found"]


def test_forged_head_in_redis_is_never_adopted(cluster: Cluster):
    cluster.start_all()
    cluster.produce(800, rate=2000)
    cluster.wait_all_committed()
    real = cluster.store.range(0)[-1]
    attacker = Attacker(cluster, "peer-d")
    e = real.entry
    forged = Entry("knhk", 0, e.cycle + 10**6, H(b"forged"), 1, e.last_offset + 1, e.last_offset + 1, real.entry_hash)
    votes = [dataclasses.replace(attacker.vote(forged), peer_id=p) for p in ("peer-a", "peer-b", "peer-d")]
    cluster.store.append(CommittedEntry.from_quorum(forged, votes, "peer-d", now_ms()))  # Lua checks no votes
    cluster.produce(800, rate=2000)

    def blocked() -> dict[str, str | None]:
        return {p: h.get("blocked") for p, h in health(cluster, 0).items()}

    wait(lambda: all(b and "does not verify" in b for b in blocked().values()) and len(blocked()) == 4, 60,
         "every peer to refuse the forged head", blocked)  # fmt: skip
    wait(lambda: _receipts(cluster, range(1, SHARDS)) == 1200, 60, "the other shards")
    code, shards = status(cluster, with_kafka=False)
    assert code == 3 and any(a["kind"] == "unverified_head" for a in shards[0]["alarms"]), shards[0]["alarms"]
    assert cluster.store.range(0)[-1].entry == forged  # nobody built on it
    # The operator removes the forged entry: the peers go on from the real head, and nothing was lost.
    k = cluster.store.keys(0)
    cluster.store.client.delete(k.entry(forged.cycle))
    cluster.store.client.zrem(k.cycles, f"{forged.cycle:020d}")
    cluster.store.client.hset(k.head, mapping={"cycle": str(e.cycle), "entry_hash": real.entry_hash.hex()})
    cluster.wait_all_committed()
    cluster.stop_all()
    cluster.assert_chains_match_replay()
    assert cluster.committed_receipts() == 1600


def test_an_entry_written_first_with_a_bad_quorum_is_written_over_by_the_peers(cluster: Cluster):
    """Every vote carries its entry, so a byzantine peer can write an honest entry into Redis before the
    quorum does, with only its own signature. The quorum's appends found the entry hash there and took it
    as committed: the stored chain failed `chain verify` at each such cycle, and no peer said so."""
    for peer in ("peer-a", "peer-b"):
        cluster.start(peer)
    cluster.wait_joined("peer-a", "peer-b")
    cluster.produce(400, rate=2000)
    honest: dict[tuple[int, int], Entry] = {}

    def covered() -> int:  # two votes of threshold 3: nothing commits yet
        honest.update({(v.entry.shard, v.entry.cycle): v.entry for v in cluster.votes() if v.peer_id == "peer-a"})
        return sum(e.receipt_count for e in honest.values())

    wait(lambda: covered() == 400, 60, "peer-a's votes on every delta", covered)
    assert cluster.committed_receipts() == 0
    attacker = Attacker(cluster, "peer-d")
    for _, e in sorted(honest.items()):  # in cycle order per shard: each links to the one before
        assert cluster.store.append(CommittedEntry.from_quorum(e, [attacker.vote(e)], "peer-d", now_ms())) is True
    assert not verify_range(cluster.store, cluster.settings, 0).ok
    cluster.start("peer-c")

    def unverified() -> list:
        return [p for s in range(SHARDS) for p in verify_range(cluster.store, cluster.settings, s).problems]

    wait(lambda: not unverified(), 90, "the peers to write their verified copies over the bad ones", unverified)
    alarms = [a for h in health(cluster, 0).values() for a in h["alarms"] if a["kind"] == "unverified_copy"]
    assert alarms and "no valid quorum proof" in alarms[0]["message"], alarms
    cluster.produce(400, rate=2000)
    cluster.wait_all_committed()
    cluster.stop_all()
    cluster.assert_chains_match_replay()
    assert cluster.committed_receipts() == 800


# -- 5. a flood of votes ---------------------------------------------------------------------


def test_vote_flood_by_one_peer_keeps_every_peer_bounded(cluster: Cluster):
    """peer-d's key floods shard 0 with votes for future cycles: same-cycle chains, equivocations, far futures."""
    for peer in ("peer-a", "peer-b", "peer-c"):
        cluster.start(peer)
    cluster.wait_joined("peer-a", "peer-b", "peer-c")
    cluster.produce(400, rate=2000)
    cluster.wait_all_committed()
    head = cluster.store.range(0)[-1]
    attacker = Attacker(cluster, "peer-d")
    n = 20_000
    prev = head.entry_hash
    c = head.entry.cycle + 1
    for i in range(n):  # a chain of votes all for the same cycle, each after the one before
        entry = Entry("knhk", 0, c, H(b"chain %d" % i), 1, 10**9 + i, 10**9 + i, prev)
        attacker.send_vote(attacker.vote(entry))
        prev = entry.entry_hash
    for i in range(n):  # successors of the head: equivocation, again and again
        attacker.send_vote(attacker.vote(Entry("knhk", 0, c + 1 + i % WINDOW, H(b"fork %d" % i), 1, 0, 0,
                                               head.entry_hash)))  # fmt: skip
    for i in range(n):  # far beyond the window, and unlinked
        attacker.send_vote(attacker.vote(Entry("knhk", 0, c + 10**6 + i, H(b"far %d" % i), 1, 0, 0, H(b"x%d" % i))))
    attacker.flush()
    flood_end = cluster.read_topic(cluster.topics.votes.name)[0][-1].offset()
    cluster.produce(800, rate=2000)
    cluster.wait_all_committed(timeout=120)
    cluster.produce(40, rate=0)  # beats closed after the whole flood was read: checkpoints written then
    cluster.wait_all_committed()

    # Each worker read the whole flood and holds no more than its bound.
    def reports() -> dict[str, dict]:
        return health(cluster, 0)

    wait(lambda: all(h["bad_records"] is not None for h in reports().values()) and len(reports()) == 3, 30,
         "reports")  # fmt: skip
    for peer, h in reports().items():
        assert h["held_votes"] <= 4 * MAX_HELD_PER_PEER, (peer, h["held_votes"])
    evidence = get_evidence(cluster.store, 0)
    assert evidence and {ev["peer_id"] for ev in evidence} == {"peer-d"} and len(evidence) <= 64
    # The flood does not pin the votes offset peers re-read after a restart. A checkpoint is written
    # when a beat closes, and peer-a may still be reading the flood when the last one closed (its
    # votes are not needed for the others' commits): beats go on closing until one passes it.
    deadline = time.monotonic() + 60
    while (cp := load_checkpoint(cluster.store, "peer-a", 0)) is None or cp.votes_offset <= flood_end:
        assert time.monotonic() < deadline, f"peer-a's votes offset {cp and cp.votes_offset} never passed {flood_end}"
        cluster.produce(8, rate=0)
        cluster.wait_all_committed()
        time.sleep(1)

    # The same records through one more peer (peer-d's node, observing): memory measured, not guessed.
    node = PeerNode(cluster.settings, "peer-d", load_private_key(cluster.workdir / "peer-d.pem"), cluster.store)
    consumer = Consumer({"bootstrap.servers": cluster.bootstrap, "group.id": f"obs-{cluster.topic_prefix}",
                         "enable.partition.eof": True, "enable.auto.commit": False})  # fmt: skip
    records: list[Record] = []
    try:
        consumer.assign([TopicPartition(cluster.topics.votes.name, 0, 0)])
        while True:
            msgs = consumer.consume(5000, timeout=2)
            records += [Record(m.partition(), m.offset(), 0, None, m.value()) for m in msgs if m.error() is None]
            if any(m.error() is not None for m in msgs) or not msgs:
                break
    finally:
        consumer.close()
    assert len(records) >= 3 * n
    assert node.assign(0).votes_offset == 0  # peer-d never ran: no checkpoint, votes from the start
    tracemalloc.start()
    base = tracemalloc.take_snapshot()
    t0 = time.perf_counter()
    node.on_vote_records(records)
    spent = time.perf_counter() - t0
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename"))
    tracemalloc.stop()
    held = node.consensus.collector.held_votes(0)
    assert held <= 4 * MAX_HELD_PER_PEER, held
    assert grown < 8 * 2**20, f"{grown / 2**20:.1f} MiB held after {len(records)} votes"
    print(f"\nflood of {len(records)} votes: {held} held, {grown / 2**20:.2f} MiB, {spent:.2f} s to read")
    cluster.stop_all()
    cluster.assert_chains_match_replay()


# -- 6. roots withheld -----------------------------------------------------------------------


def test_withheld_roots_are_published_by_the_other_peers(cluster: Cluster):
    start_launched(cluster, "peer-a", ("--withhold-roots",))  # it appends every entry (see launch.py)
    for peer in ("peer-b", "peer-c"):
        cluster.start(peer)
    cluster.wait_joined("peer-a", "peer-b", "peer-c")
    cluster.produce(1600, rate=1600)
    cluster.wait_all_committed()
    chains = cluster.chains()
    by_a = sum(1 for s in chains for ce in chains[s] if ce.committed_by == "peer-a")
    assert by_a > 0, "peer-a appended nothing, so it withheld nothing"

    def on_topic() -> set[bytes]:
        return {decode_root(m.value()).entry_hash for ms in cluster.read_topic(cluster.topics.roots.name).values()
                for m in ms}  # fmt: skip

    wanted = {ce.entry_hash for s in chains for ce in chains[s]}
    wait(lambda: wanted <= on_topic(), 60, f"every root ({by_a} appended by peer-a) on the roots topic",
         lambda: len(wanted - on_topic()))  # fmt: skip
    wait(lambda: all(get_published(cluster.store, s) == chains[s][-1].entry.cycle for s in range(SHARDS)), 30,
         "the published marks")  # fmt: skip
    assert any("still not on the roots topic" in cluster.log(p) for p in ("peer-b", "peer-c"))
    with RootsReader(cluster.settings, cluster.bootstrap, group_id=f"w-{cluster.topic_prefix}",
                     topic=cluster.topics.roots.name, kafka_config={"session.timeout.ms": 6000}) as reader:  # fmt: skip
        got: dict[int, list[bytes]] = {s: [] for s in range(SHARDS)}
        deadline = time.monotonic() + 60
        while sum(map(len, got.values())) < len(wanted) and time.monotonic() < deadline:
            ce = reader.poll(0.5)
            if ce is not None:
                got[ce.entry.shard].append(ce.entry_hash)
    assert got == {s: [ce.entry_hash for ce in chains[s]] for s in range(SHARDS)}  # every root once, in order
    cluster.stop_all()


# -- 7. evidence erased ----------------------------------------------------------------------


def test_erased_equivocation_evidence_is_still_reported(cluster: Cluster):
    for peer in ("peer-a", "peer-b", "peer-c"):
        cluster.start(peer)
    cluster.wait_joined("peer-a", "peer-b", "peer-c")
    cluster.produce(400, rate=2000)
    cluster.wait_all_committed()
    head = cluster.store.range(0)[-1]
    attacker = Attacker(cluster, "peer-d")
    for root, ahead in ((b"one", 1), (b"two", 2)):  # two successors of the head, signed by peer-d
        entry = Entry("knhk", 0, head.entry.cycle + ahead, H(root), 1, 10**9, 10**9, head.entry_hash)
        attacker.send_vote(attacker.vote(entry))
    attacker.flush()
    wait(lambda: any(ev["peer_id"] == "peer-d" for ev in status(cluster, with_kafka=False)[1][0]["equivocations"]),
         30, "the equivocation to be reported")  # fmt: skip
    wait(lambda: any(ev["peer_id"] == "peer-d" for ev in status(cluster)[1][0]["equivocations"]), 30,
         "the evidence on the evidence topic")  # fmt: skip
    # The byzantine peer erases the evidence in Redis, and frames peer-b with evidence that does not verify.
    cluster.store.client.delete(cluster.store.keys(0).evidence)
    framed = {"kind": "equivocation", "chain_id": "knhk", "peer_id": "peer-b", "shard": 0, "cycle": 5, "epoch": 0,
              "first": {**head.entry.to_fields(), "entry_hash": head.entry_hash.hex(), "signature": "00" * 64},
              "second": {**Entry("knhk", 0, 6, H(b"x"), 1, 0, 0, head.entry.prev_entry_hash).to_fields(),
                         "signature": "11" * 64}}  # fmt: skip
    attacker.put(cluster.topics.evidence.name, 0, json.dumps(framed).encode(), b"framed")
    attacker.flush()
    cluster.store.client.hset(cluster.store.keys(0).evidence, "framed", json.dumps(framed))
    code, shards = status(cluster)
    assert code == 3
    assert {ev["peer_id"] for ev in shards[0]["equivocations"]} == {"peer-d"}, shards[0]["equivocations"]
    assert shards[0]["invalid_evidence"] >= 2  # the framing, from Redis and from the topic
    assert status(cluster, with_kafka=False)[1][0]["equivocations"] == []  # Redis alone lost it
    cluster.produce(400, rate=2000)
    cluster.wait_all_committed()  # an equivocation stops nothing
    cluster.stop_all()
    cluster.assert_chains_match_replay()


# -- 10. JSON nested past the interpreter's limit -------------------------------------------


def test_json_nested_too_deeply_in_redis_or_on_the_evidence_topic_is_a_finding(cluster: Cluster):
    """`json.loads` raises RecursionError, not ValueError, on `[[[[…` nested past Python's limit. Written
    where peers and auditors read JSON back (an epoch statement every peer polls, a stored entry's votes,
    health and evidence in Redis, the evidence topic), it crashed every peer and `chain verify`."""
    cluster.start_all()
    cluster.produce(400, rate=2000)
    cluster.wait_all_committed()
    deep = "[" * 100_000
    client, k = cluster.store.client, cluster.store.keys(0)
    client.hset(epochs_key(cluster.prefix, cluster.settings.chain_id), "7", deep)
    client.hset(k.health, "peer-x", deep)
    client.hset(k.evidence, "deep", deep)
    attacker = Attacker(cluster)
    attacker.put(cluster.topics.evidence.name, 0, deep.encode(), b"deep")
    attacker.flush()
    time.sleep(2 * EPOCH_POLL_S)  # every peer has read the epochs again
    cluster.produce(400, rate=2000)
    cluster.wait_all_committed()
    assert all(p.poll() is None for p in cluster.procs.values()), {n: p.poll() for n, p in cluster.procs.items()}
    first = cluster.store.range(0)[0].entry.cycle
    client.hset(k.entry(first), "votes", deep)
    verify = cli("chain", "verify", *settings_args(cluster), "--shard", "0")
    assert verify.exit_code == 1 and not isinstance(verify.exception, RecursionError), verify.output
    assert f"cycle {first}" in verify.output and "nested too deeply" in verify.output, verify.output
    _code, shards = status(cluster)  # exit 0 or 3, never a traceback
    assert shards[0]["invalid_evidence"] >= 1, shards[0]  # the topic's record (Redis' unreadable ones are skipped)
    assert "nested too deeply" in cluster.log("peer-a")  # the epoch finding, logged once
    cluster.stop_all()
