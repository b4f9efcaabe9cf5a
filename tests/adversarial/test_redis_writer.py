"""Attacks by someone with write access to Redis (any peer, or the Redis operator), and a peer's clock skew."""

from __future__ import annotations

import json

import pytest

from knhk_stream.store.lockchain import LockchainStore, get_published
from tests.adversarial.helpers import cli, kafka_args, settings_args, start_launched, status, wait
from tests.support.cluster import SHARDS, Cluster

pytestmark = pytest.mark.integration


def _truncate(store: LockchainStore, shard: int, n: int) -> int:
    """Delete the newest n entries and move the head back: what is left still verifies. Returns the old head cycle."""
    chain = store.range(shard)
    k = store.keys(shard)
    for ce in chain[-n:]:
        store.client.delete(k.entry(ce.entry.cycle))
        store.client.zrem(k.cycles, f"{ce.entry.cycle:020d}")
    keep = chain[-n - 1]
    store.client.hset(k.head, mapping={"cycle": str(keep.entry.cycle), "entry_hash": keep.entry_hash.hex()})
    return chain[-1].entry.cycle


def _delete_shard(store: LockchainStore, shard: int) -> None:
    keys = list(store.client.scan_iter(match=store.keys(shard).k + "*", count=1000))
    store.client.delete(*keys)


def _all_published(cluster: Cluster) -> bool:
    return all(get_published(cluster.store, s) == cluster.store.head(s).cycle for s in range(SHARDS))


def test_truncation_and_deletion_fail_verification_against_the_roots_topic_and_the_pins(cluster: Cluster):
    cluster.start_all()
    cluster.produce(1200, rate=200)  # six seconds: several beats per shard
    cluster.wait_all_committed()
    wait(lambda: _all_published(cluster), 30, "every root on the roots topic")
    cluster.stop_all()
    assert all(len(cluster.store.range(s)) >= 4 for s in range(SHARDS))
    pins = cluster.workdir / "pins.json"
    first = cli("chain", "verify", *settings_args(cluster), "--pin", str(pins))
    assert first.exit_code == 0, first.output
    assert set(json.loads(pins.read_text())["shards"]) == {str(s) for s in range(SHARDS)}
    clean = cli("chain", "verify", *settings_args(cluster), *kafka_args(cluster))
    assert clean.exit_code == 0, clean.output

    cut = _truncate(cluster.store, 0, 3)
    _delete_shard(cluster.store, 1)
    alone = cli("chain", "verify", *settings_args(cluster))
    assert alone.exit_code == 0, alone.output  # what is left verifies on its own: Redis alone cannot tell
    assert "shard 1" not in alone.output

    pinned = cli("chain", "verify", *settings_args(cluster), "--pin", str(pins))
    assert pinned.exit_code == 1, pinned.output
    assert f"pinned head of shard 0, cycle {cut}" in pinned.output and "pinned head of shard 1" in pinned.output

    crossed = cli("chain", "verify", *settings_args(cluster), *kafka_args(cluster), "--json")
    assert crossed.exit_code == 1, crossed.output
    reports = {r["shard"]: r for r in map(json.loads, crossed.stdout.splitlines())}
    assert not reports[0]["ok"] and any("3 committed entries" in p["message"] and "missing from Redis" in p["message"]
                                        for p in reports[0]["problems"]), reports[0]  # fmt: skip
    assert not reports[1]["ok"] and any("no chain in Redis" in p["message"] for p in reports[1]["problems"])
    assert reports[2]["ok"] and reports[3]["ok"]

    audited = cli("audit", *settings_args(cluster), *kafka_args(cluster), "--all-shards", "--json")
    assert audited.exit_code == 1, audited.output
    by_shard = {r["shard"]: r for r in map(json.loads, audited.stdout.splitlines())}
    assert by_shard[0]["status"] == by_shard[1]["status"] == "FAILED"
    assert by_shard[2]["status"] == by_shard[3]["status"] == "OK"


def test_running_peers_reappend_entries_deleted_from_redis(cluster: Cluster):
    # Peers that remember only the last two committed entries of a shard: a longer cut needs the roots topic.
    for peer in cluster.settings.peers:
        start_launched(cluster, peer.id, ("--recent-entries", "2"))
    cluster.wait_joined(*(p.id for p in cluster.settings.peers))
    cluster.produce(1200, rate=200)
    cluster.wait_all_committed()
    wait(lambda: _all_published(cluster), 30, "every root on the roots topic")
    before = cluster.chains()
    assert all(len(before[s]) >= 3 for s in range(SHARDS))
    _truncate(cluster.store, 0, 2)  # within the peers' memory
    _delete_shard(cluster.store, 1)  # all of it: from the roots topic

    def back() -> bool:
        now = cluster.chains()
        return all([ce.entry_hash for ce in now[s][: len(before[s])]] == [ce.entry_hash for ce in before[s]]
                   for s in range(SHARDS))  # fmt: skip

    wait(back, 60, "the peers to re-append the deleted entries",
         lambda: {s: len(cluster.store.range(s)) for s in range(SHARDS)})  # fmt: skip
    assert any("HEAD MOVED BACK" in cluster.log(p.id) for p in cluster.settings.peers)
    assert any("re-appended" in cluster.log(p.id) for p in cluster.settings.peers)
    code, shards = status(cluster, with_kafka=False)
    assert code == 3
    for s in (0, 1):
        assert any(a["kind"] == "head_moved_back" for a in shards[s]["alarms"]), shards[s]["alarms"]
    cluster.produce(400, rate=2000)
    cluster.wait_all_committed()
    cluster.stop_all()
    cluster.assert_chains_match_replay()
    assert cluster.committed_receipts() == 1600
    crossed = cli("chain", "verify", *settings_args(cluster), *kafka_args(cluster))
    assert crossed.exit_code == 0, crossed.output


def test_clock_ahead_of_the_broker_markers_are_retried_until_the_beat_closes(cluster: Cluster):
    # Every peer's clock runs 3 s ahead of the broker's (a beat is 1 s): the first marker for a beat
    # lands in that same beat, which stays open unless markers are written again.
    for peer in cluster.settings.peers:
        start_launched(cluster, peer.id, ("--clock-skew-ms", "3000"))
    cluster.wait_joined(*(p.id for p in cluster.settings.peers))
    cluster.produce(400, rate=0)  # and then nothing: only markers can close the last beats
    cluster.wait_all_committed(timeout=45)
    cluster.stop_all()
    cluster.assert_chains_match_replay()
    assert cluster.committed_receipts() == 400
