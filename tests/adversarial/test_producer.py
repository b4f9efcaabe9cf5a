"""Attacks by a party that can only produce to the topics (it holds no key)."""

from __future__ import annotations

import json
import struct
import time

import pytest
from confluent_kafka import Producer

from knhk_stream.kafka.roots import RootsReader
from knhk_stream.protocol.encoding import H, str16, u32, u64
from knhk_stream.protocol.wire import ROOT, VOTE
from knhk_stream.store.lockchain import load_checkpoint
from tests.adversarial.helpers import Attacker, health, status, wait
from tests.support.cluster import SHARDS, Cluster

pytestmark = pytest.mark.integration


def _fields(shard: int, cycle: int, chain_id: str = "knhk", root: bytes = b"\x11" * 32) -> dict:
    prev = bytes(32)
    try:  # the entry hash of fields in range; poison gets any 32 bytes (the decoder must refuse it first)
        entry_hash = H(b"\x02" + str16(chain_id) + u32(shard) + u64(cycle) + root + u64(1) + u64(0) + u64(0) + prev)
    except struct.error:
        entry_hash = H(b"poison")
    return {"chain_id": chain_id, "shard": shard, "cycle": cycle, "root": root, "receipt_count": 1,
            "first_offset": 0, "last_offset": 0, "prev_entry_hash": prev, "entry_hash": entry_hash}  # fmt: skip


def _poison_votes(shard: int) -> list[bytes | None]:
    """Vote records that fail to decode or are out of range (no key needed to write them)."""
    vote = {"epoch": 0, "peer_id": "peer-a", "signature": bytes(64), "voted_at_ms": 0}
    return [
        VOTE.encode({**_fields(2**32 + 1, 5), **vote}),  # shard above u32: struct.error in the decoder before
        VOTE.encode({**_fields(shard, 5, chain_id="x" * 70_000), **vote}),  # a 70,000-character chain id
        VOTE.encode({**_fields(shard, -3), **vote}),  # negative cycle
        VOTE.encode({**_fields(shard, 5), **vote, "epoch": 2**40}),  # epoch above u32
        VOTE.encode({**_fields(shard, 5), **vote, "peer_id": "p" * 300}),  # peer id above 64 bytes
        VOTE.encode({**_fields(shard, 5), **vote})[:-3],  # truncated body
        VOTE.encode({**_fields(shard, 5), **vote}) + b"tail",  # trailing bytes
        b"\xc3\x01" + bytes(8) + b"garbage",  # unknown fingerprint
        None,  # a tombstone
        b"",
    ]


def _poison_roots(shard: int) -> list[bytes | None]:
    root = {"epoch": 0, "votes": [{"peer_id": "peer-a", "signature": bytes(64)}], "committed_by": "x",
            "committed_at_ms": 0}  # fmt: skip
    return [
        ROOT.encode({**_fields(2**32 + 1, 5), **root}),
        ROOT.encode({**_fields(shard, 5, chain_id="y" * 70_000), **root}),
        ROOT.encode({**_fields(shard, 5), **root, "epoch": -1}),
        ROOT.encode({**_fields(shard, 5), **root})[:-1],
        b"\xc3\x01" + bytes(8),
        None,
        b"\x00" * 1000,
    ]


def test_poison_records_on_the_votes_and_roots_topics_never_stop_a_peer_or_a_reader(cluster: Cluster):
    cluster.start_all()
    cluster.produce(800, rate=2000)
    cluster.wait_all_committed()
    # peer-a stops before the poison arrives: when it starts again it reads the poison from its checkpoint on.
    cluster.stop("peer-a")
    attacker = Attacker(cluster)
    per_shard_votes, per_shard_roots = len(_poison_votes(0)), len(_poison_roots(0))
    for shard in range(SHARDS):
        for value in _poison_votes(shard):
            attacker.put(cluster.topics.votes.name, shard, value, b"knhk/0/poison")
        for value in _poison_roots(shard):
            attacker.put(cluster.topics.roots.name, shard, value, b"knhk/0/poison")
    attacker.flush()
    cluster.produce(800, rate=2000)
    cluster.wait_all_committed()
    cluster.start("peer-a")
    cluster.wait_until(lambda: cluster.log("peer-a").count("resume at offset") >= 2 * SHARDS, 60, "peer-a back")
    cluster.produce(400, rate=2000)
    cluster.wait_all_committed()
    cluster.wait_until(
        lambda: all(
            (cp := load_checkpoint(cluster.store, "peer-a", s)) is not None and cp.cycle == cluster.store.head(s).cycle
            for s in range(SHARDS)
        ),
        60,
        "peer-a to vote on every head",
    )
    # Every peer read every poison record, counted it and went on; none died (wait_until would have said so).
    wait(lambda: all(h.get("peer-a", {}).get("bad_records", {}).get("votes", 0) >= per_shard_votes
                     for h in (health(cluster, s) for s in range(SHARDS))), 30, "peer-a's report")  # fmt: skip
    assert all(p.poll() is None for p in cluster.procs.values())
    for peer in ("peer-a", "peer-b", "peer-c", "peer-d"):
        log = cluster.log(peer)
        assert "votes topic shard 0 offset" in log and "skipped" in log, log[-2000:]
    for shard in range(SHARDS):
        assert health(cluster, shard)["peer-b"]["bad_records"]["votes"] >= per_shard_votes
    cluster.stop_all()
    cluster.assert_chains_match_replay()
    assert cluster.committed_receipts() == 2000

    # A reader of the roots topic hands out every committed root in order and counts the poison.
    committed = cluster.chains()
    with RootsReader(cluster.settings, cluster.bootstrap, group_id=f"g-{cluster.topic_prefix}",
                     topic=cluster.topics.roots.name, kafka_config={"session.timeout.ms": 6000}) as reader:  # fmt: skip
        got: dict[int, list] = {s: [] for s in range(SHARDS)}
        deadline = time.monotonic() + 60
        while sum(map(len, got.values())) < sum(map(len, committed.values())) and time.monotonic() < deadline:
            ce = reader.poll(0.5)
            if ce is not None:
                got[ce.entry.shard].append(ce.entry_hash)
        deadline = time.monotonic() + 5
        while reader.stats["invalid"] < SHARDS * per_shard_roots and time.monotonic() < deadline:
            reader.poll(0.2)
        assert reader.stats["invalid"] >= SHARDS * per_shard_roots
    assert got == {s: [ce.entry_hash for ce in committed[s]] for s in range(SHARDS)}


def test_far_future_timestamp_halts_the_shard_loudly_and_again_after_a_restart(cluster: Cluster):
    bound = 300
    for peer in cluster.settings.peers:
        cluster.start(peer.id, extra=("--max-open-beat-deltas", str(bound)))
    cluster.wait_joined(*(p.id for p in cluster.settings.peers))
    cluster.produce(400, rate=2000)
    cluster.wait_all_committed()
    before = [ce.entry_hash for ce in cluster.store.range(0)]
    attacker = Attacker(cluster)
    delta = json.dumps({"additions": [{"s": "urn:s", "p": "urn:p", "o": "far"}], "removals": []}).encode()
    attacker.put(cluster.topics.deltas.name, 0, delta, timestamp=2**62)  # keeps its beat open for ever
    attacker.flush()
    cluster.produce(4 * 2 * bound, rate=600)  # 2 * bound more deltas for every shard, fewer than bound a beat

    def halted() -> dict[str, str]:
        return {p: h["halted"] for p, h in health(cluster, 0).items() if h.get("halted")}

    wait(lambda: len(halted()) == len(cluster.settings.peers), 60, "every peer to halt shard 0", halted)

    def receipts(s: int) -> int:
        return sum(ce.entry.receipt_count for ce in cluster.store.range(s))

    wait(lambda: all(receipts(s) == 100 + 2 * bound for s in range(1, SHARDS)), 60, "the other shards to commit",
         lambda: {s: receipts(s) for s in range(SHARDS)})  # fmt: skip
    reports = health(cluster, 0)
    for peer, h in reports.items():
        assert h["open_beat"]["deltas"] <= bound + 5000, (peer, h["open_beat"])  # bounded: the bound and a batch
        assert "LogAppendTime" in h["halted"] and "stops reading" in h["halted"], h["halted"]
    first = reports["peer-a"]["open_beat"]["first_offset"]
    assert [ce.entry_hash for ce in cluster.store.range(0)] == before  # nothing skipped, nothing committed past it
    code, shards = status(cluster, with_kafka=False)
    assert code == 3
    assert any(a["kind"] == "halted" and a["peer_id"] == "peer-a" for a in shards[0]["alarms"]), shards[0]["alarms"]
    assert all(not shards[s]["alarms"] for s in range(1, SHARDS))
    assert "SHARD 0 HALTED" in cluster.log("peer-a")

    # After a restart it resumes at its last beat boundary and stops at the same place again.
    cluster.stop("peer-a")
    cluster.start("peer-a", extra=("--max-open-beat-deltas", str(bound)))
    wait(lambda: cluster.log("peer-a").count("SHARD 0 HALTED") >= 2, 60, "peer-a to halt shard 0 again")
    wait(lambda: health(cluster, 0)["peer-a"]["open_beat"]["first_offset"] == first, 30, "peer-a's report")
    assert [ce.entry_hash for ce in cluster.store.range(0)] == before
    cluster.stop_all()
    for s in range(SHARDS):
        assert cluster.store.head(s) is not None


def test_open_transaction_on_the_deltas_topic_shows_as_waiting_on_the_lso(cluster: Cluster):
    for peer in cluster.settings.peers:  # the default groups, which status reads the lag of
        cluster.start(peer.id, extra=("--group-id", f"knhk.{cluster.settings.chain_id}.{peer.id}"))
    cluster.wait_joined(*(p.id for p in cluster.settings.peers))
    cluster.produce(400, rate=2000)
    cluster.wait_all_committed()
    txn = Producer({"bootstrap.servers": cluster.bootstrap, "transactional.id": f"open-{cluster.topic_prefix}"})
    txn.init_transactions(10)
    txn.begin_transaction()
    delta = json.dumps({"additions": [{"s": "urn:s", "p": "urn:p", "o": "in a transaction"}], "removals": []})
    txn.produce(cluster.topics.deltas.name, value=delta.encode(), partition=0)
    assert txn.flush(10) == 0  # produced, not committed: the last stable offset stays here
    cluster.produce(400, rate=2000)
    cluster.wait_until(lambda: sum(ce.entry.receipt_count for s in range(1, SHARDS) for ce in cluster.store.range(s))
                       == 600, 60, "the other shards")  # fmt: skip

    def shard0() -> dict:
        return status(cluster)[1][0]

    wait(lambda: shard0()["waits_on_lso"] is not None and all(p["lag"] for p in shard0()["peers"]), 30,
         "status to say shard 0 waits on the LSO", shard0)  # fmt: skip
    st = shard0()
    assert "open transaction" in st["waits_on_lso"] and "not slow" in st["waits_on_lso"], st["waits_on_lso"]
    assert st["last_stable_offset"] < st["high_watermark"]
    for p in st["peers"]:
        # behind the high watermark by the records after the transaction; at the LSO but for its open beat
        assert p["lag_lso"] is not None and p["lag_lso"] < p["lag"], p
    for s in range(1, SHARDS):
        assert status(cluster)[1][s]["waits_on_lso"] is None
    txn.abort_transaction(10)
    cluster.produce(4, rate=0)  # one more per shard after the abort
    cluster.wait_until(lambda: cluster.committed_receipts() >= 804, 60, "shard 0 to go on after the abort")
    wait(lambda: shard0()["waits_on_lso"] is None, 30, "the wait to end", shard0)
    cluster.stop_all()
    cluster.assert_chains_match_replay()
    # Every delta a read_committed reader sees got its receipt (on Kafka the aborted one is not seen;
    # the embedded Tansu hands it out all the same).
    assert cluster.committed_receipts() == cluster.delta_records() in (804, 805)
