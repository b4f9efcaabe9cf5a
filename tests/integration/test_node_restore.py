"""A `PeerNode` taking a shard against a Redis that lost data, on a real Redis.

The roots topic is stood in for by the node's `roots_source` hook (the worker
reads the topic through it; `test_redis_lost_data.py` runs the real thing):
here it serves the encoded root records of a chain, as the topic holds them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from knhk_stream.protocol.committed import CommittedEntry
from knhk_stream.protocol.encoding import H
from knhk_stream.protocol.epochs import Epoch
from knhk_stream.protocol.quorum import Vote, sign
from knhk_stream.protocol.wire import encode_root
from knhk_stream.runtime.node import ROOTS_TAIL, PeerNode
from knhk_stream.store.epochs import epochs_key, load_epochs, store_epoch
from knhk_stream.store.lockchain import LockchainStore
from tests.integration.test_store import make_chain


class RootsPartition:
    """A roots-topic partition's records, and which reads the node asked for (`last` of each)."""

    def __init__(self, chain: list[CommittedEntry]) -> None:
        self.values: list[bytes | None] = [encode_root(ce) for ce in chain]
        self.reads: list[int | None] = []

    def __call__(self, shard: int, last: int | None) -> Iterable[bytes | None]:
        self.reads.append(last)
        return self.values if last is None else self.values[-last:]


def _node(settings, peer_keys, store: LockchainStore, roots: RootsPartition | None) -> PeerNode:
    node = PeerNode(settings, "peer-a", peer_keys["peer-a"], store)
    node.roots_source = roots
    return node


def _store(redis_url: str, redis_prefix: str, settings) -> LockchainStore:
    return LockchainStore.from_url(redis_url, settings.chain_id, redis_prefix)


def test_an_old_backup_is_restored_before_the_shard_resumes(redis_url, redis_prefix, settings, peer_keys):
    chain = make_chain(settings, peer_keys, 100)
    store = _store(redis_url, redis_prefix, settings)
    for ce in chain[:3]:  # what an old backup held
        store.append(ce)
    node = _node(settings, peer_keys, store, RootsPartition(chain))
    at = node.assign(0)
    assert store.range(0) == chain
    assert at.next_offset == chain[-1].entry.last_offset + 1  # after the restored head, not after cycle 3
    assert node.stats["restored"] == 97
    alarms = node.health(0)["alarms"]
    assert [a["kind"] for a in alarms] == ["restored_from_roots"]
    said = f"up to cycle {chain[2].entry.cycle} but the roots topic proves cycle {chain[-1].entry.cycle}"
    assert said in alarms[0]["message"]


def test_an_empty_redis_is_restored_not_started_at_a_new_genesis(redis_url, redis_prefix, settings, peer_keys):
    chain = make_chain(settings, peer_keys, 5)
    store = _store(redis_url, redis_prefix, settings)
    node = _node(settings, peer_keys, store, RootsPartition(chain))
    at = node.assign(0)
    assert store.range(0) == chain and at.next_offset == chain[-1].entry.last_offset + 1
    assert node.stats["restored"] == 5


def test_the_usual_case_reads_only_the_newest_roots(redis_url, redis_prefix, settings, peer_keys):
    chain = make_chain(settings, peer_keys, 3 * ROOTS_TAIL)
    store = _store(redis_url, redis_prefix, settings)
    for ce in chain:
        store.append(ce)
    roots = RootsPartition(chain)
    node = _node(settings, peer_keys, store, roots)
    node.assign(0)
    assert roots.reads == [ROOTS_TAIL]  # Redis holds the newest root: the whole partition is not read
    assert node.stats["restored"] == 0 and node.health(0)["alarms"] == []


def test_a_conflicting_chain_in_redis_is_never_written_over(redis_url, redis_prefix, settings, peer_keys):
    chain = make_chain(settings, peer_keys, 5)
    store = _store(redis_url, redis_prefix, settings)
    other = dataclasses.replace(chain[0].entry, root=H(b"another history"))
    votes = [Vote(other, pid, sign(peer_keys[pid], settings.genesis.epoch_hash, other.entry_hash))
             for pid in ("peer-b", "peer-c", "peer-d")]  # fmt: skip
    forged = CommittedEntry.from_quorum(other, votes, "peer-b", 1)  # a quorum-signed other history
    store.append(forged)
    node = _node(settings, peer_keys, store, RootsPartition(chain))
    node.assign(0)
    assert [ce.entry_hash for ce in store.range(0)] == [forged.entry_hash]
    report = node.health(0)
    assert "conflicting chain" in report["blocked"]
    assert "conflicting_chain" in [a["kind"] for a in report["alarms"]]
    node.limits = dataclasses.replace(node.limits, head_check_s=0)
    node.commit_ready()  # the head check finds the head in Redis as this peer adopted it: still blocked
    assert node.health(0)["blocked"] and [ce.entry_hash for ce in store.range(0)] == [forged.entry_hash]


def test_running_peers_store_the_epochs_redis_lost_again(redis_url, redis_prefix, settings, peer_keys):
    genesis = settings.genesis
    statement = Epoch(settings.chain_id, settings.tick_ms, 1, genesis.from_cycle + 10**9, genesis.threshold,
                      genesis.hook, genesis.max_triples, genesis.peers, genesis.epoch_hash)  # fmt: skip
    for pid in ("peer-a", "peer-b", "peer-c", "peer-d"):
        statement = statement.signed_by(pid, peer_keys[pid])
    store = _store(redis_url, redis_prefix, settings)
    assert store_epoch(store, statement)
    node = _node(settings, peer_keys, store, None)
    assert node.refresh_epochs() and node.settings.epoch_chain.newest.number == 1
    store.client.delete(epochs_key(store.prefix, store.chain_id))  # Redis lost it
    node.refresh_epochs()
    assert [e.epoch_hash for e in load_epochs(store)[0]] == [statement.epoch_hash]
    later = _node(settings, peer_keys, store, None)  # a peer that starts afterwards finds it again
    assert later.refresh_epochs() and later.settings.epoch_chain.newest.epoch_hash == statement.epoch_hash
