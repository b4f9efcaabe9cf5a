"""A node hashes its open beats' Merkle trees ahead after a small batch (a steady stream), not in a backlog.

A `PeerNode` on a real Redis, fed delta records by hand; the root is the same either way
(tests/unit/test_properties.py), only when the hashing happens differs.
"""

from __future__ import annotations

from knhk_stream.kafka.producer import synthetic_deltas
from knhk_stream.protocol import merkle
from knhk_stream.protocol.beats import ROOT_CHUNK
from knhk_stream.protocol.decode import encode_json
from knhk_stream.runtime.node import HASH_AHEAD_BELOW, PeerNode, Record
from knhk_stream.store.lockchain import LockchainStore

TS = 1_700_000_000_000


def _node(settings, peer_keys, redis_url: str, redis_prefix: str) -> PeerNode:
    node = PeerNode(settings, "peer-a", peer_keys["peer-a"], LockchainStore.from_url(redis_url, "knhk", redis_prefix))
    node.assign(0)
    return node


def _records(n: int, first: int = 0, ts: int = TS) -> list[Record]:
    return [Record(0, first + i, ts, None, encode_json(d)) for i, d in enumerate(synthetic_deltas(n, seed=first))]


def test_small_batches_hash_the_open_beat_ahead_and_the_close_gives_the_same_root(
    redis_url, redis_prefix, settings, peer_keys
):
    node = _node(settings, peer_keys, redis_url, redis_prefix)
    fed = 0
    for _ in range(12):  # 12 batches of 25: a steady stream into one long beat
        assert node.process(_records(25, fed)) == []
        fed += 25
    assert node.engine.open_hashed(0) == fed // ROOT_CHUNK * ROOT_CHUNK > 0
    (vote,) = node.process(_records(1, fed, TS + 10_000))  # the next beat: this one closes
    beat = node.engine.last_beat(0)
    assert beat is not None and beat.receipt_count == fed
    assert vote.entry.root == merkle.root(beat.receipts)


def test_a_backlog_batch_leaves_the_hashing_to_the_close(redis_url, redis_prefix, settings, peer_keys):
    node = _node(settings, peer_keys, redis_url, redis_prefix)
    big = HASH_AHEAD_BELOW + 200
    assert node.process(_records(big)) == []
    assert node.engine.open_hashed(0) == 0  # a backlog: hashing ahead would only slow the batch
    (vote,) = node.process(_records(1, big, TS + 10_000))
    beat = node.engine.last_beat(0)
    assert beat is not None and vote.entry.root == merkle.root(beat.receipts)
