"""Votes dropped by the bounds are read again once they can count, and a flood is read twice, not forever.

A `PeerNode` on a real Redis, fed vote records by hand; the run against real
workers (two peers of four paused for hundreds of beats) is in test_long_outage.py.
"""

from __future__ import annotations

import time

import pytest

from knhk_stream.protocol.encoding import ZERO_HASH, H
from knhk_stream.protocol.entry import Entry
from knhk_stream.protocol.quorum import MAX_HELD_PER_PEER, Vote, sign
from knhk_stream.protocol.wire import encode_vote
from knhk_stream.runtime import node as node_module
from knhk_stream.runtime.node import PeerNode, Record
from knhk_stream.store.lockchain import LockchainStore

N = MAX_HELD_PER_PEER + 44  # votes of one peer: its share, and 44 dropped


def _chain(tag: bytes, n: int) -> list[Entry]:
    out, prev = [], ZERO_HASH
    for cycle in range(1, n + 1):
        e = Entry("knhk", 0, cycle, H(tag + b"%d" % cycle), 1, cycle, cycle, prev)
        out.append(e)
        prev = e.entry_hash
    return out


def _records(settings, peer_keys, pid: str, entries: list[Entry], first_offset: int) -> list[Record]:
    out = []
    for i, e in enumerate(entries):
        epoch = settings.epoch_for(e.cycle)
        v = Vote(e, pid, sign(peer_keys[pid], epoch.epoch_hash, e.entry_hash), 1, epoch.number)
        out.append(Record(0, first_offset + i, 0, None, encode_vote(v)))
    return out


@pytest.fixture(autouse=True)
def _no_rate_limit(monkeypatch):
    monkeypatch.setattr(node_module, "REREAD_S", 0.0)  # the rate limit is not what these tests are about


def _node(settings, peer_keys, redis_url: str, redis_prefix: str) -> PeerNode:
    node = PeerNode(settings, "peer-a", peer_keys["peer-a"], LockchainStore.from_url(redis_url, "knhk", redis_prefix))
    assert node.assign(0).votes_offset == 0
    return node


def test_votes_dropped_over_a_peers_share_are_read_again_once_the_head_moves(
    redis_url, redis_prefix, settings, peer_keys
):
    node = _node(settings, peer_keys, redis_url, redis_prefix)
    chain = _chain(b"honest", N)
    records = _records(settings, peer_keys, "peer-b", chain, 0)
    node.on_vote_records(records)
    assert node.consensus.collector.held_by(0, "peer-b") == MAX_HELD_PER_PEER
    assert node.votes_to_reread() == {}  # no room yet: reading again would drop them again
    head = chain[239]
    node.consensus.set_head(0, head.cycle, head.entry_hash)  # 240 committed: peer-b's share has room
    assert node.votes_to_reread() == {0: MAX_HELD_PER_PEER}
    node.reading_votes_again(0, MAX_HELD_PER_PEER)
    node.on_vote_records(records[MAX_HELD_PER_PEER:])
    assert node.consensus.collector.held_by(0, "peer-b") == N - 240  # every vote after the head, none lost
    assert node.votes_to_reread() == {}


def test_votes_read_again_beyond_the_window_are_kept_for_the_next_reading(redis_url, redis_prefix, settings, peer_keys):
    """Reading again while the head is still far behind: what lies past the window is dropped again, but
    remembered (its peer's votes count in that reading), and read once more when the window gets there."""
    node = _node(settings, peer_keys, redis_url, redis_prefix)
    chain = _chain(b"honest", N)
    records = _records(settings, peer_keys, "peer-b", chain, 0)
    node.on_vote_records(records)
    node.consensus.set_head(0, chain[199].cycle, chain[199].entry_hash)  # window: up to cycle 264
    node.reading_votes_again(0, node.votes_to_reread()[0])
    node.on_vote_records(records[MAX_HELD_PER_PEER:])
    assert node.consensus.collector.held_by(0, "peer-b") == 264 - 200
    assert node.votes_to_reread() == {}  # cycle 265 is still past the window
    node.consensus.set_head(0, chain[239].cycle, chain[239].entry_hash)
    node.reading_votes_again(0, node.votes_to_reread()[0])
    node.on_vote_records(records[264:])
    assert node.consensus.collector.held_by(0, "peer-b") == N - 240


def test_a_flood_that_can_never_count_is_read_twice_not_forever(redis_url, redis_prefix, settings, peer_keys):
    node = _node(settings, peer_keys, redis_url, redis_prefix)
    flood = _records(settings, peer_keys, "peer-d", _chain(b"flood", N), 0)
    node.on_vote_records(flood)  # peer-d fills its share with a chain of its own, and more
    honest = _chain(b"honest", 200)  # the window reaches the dropped cycles
    node.consensus.set_head(0, honest[-1].cycle, honest[-1].entry_hash)  # the flood no longer links: share freed
    assert node.consensus.collector.held_by(0, "peer-d") == 0
    assert node.votes_to_reread() == {0: MAX_HELD_PER_PEER}
    node.reading_votes_again(0, MAX_HELD_PER_PEER)
    node.on_vote_records(flood[MAX_HELD_PER_PEER:])  # read a second time: dropped, nothing of peer-d counts
    assert node.consensus.collector.held_by(0, "peer-d") == 0
    assert node.votes_to_reread() == {}  # not remembered for a third reading
    assert node.stats["votes_reread"] == 1


def test_a_checkpoint_keeps_dropped_votes_to_read_again_after_a_restart(redis_url, redis_prefix, settings, peer_keys):
    """Three peers' votes for 300 cycles: 256 of each held and committed; each peer's vote for cycle 257 is
    dropped over its share (the later ones do not link without it). The checkpoint written then points at
    the first dropped vote, so a restarted peer reads them again."""
    store = LockchainStore.from_url(redis_url, "knhk", redis_prefix)
    node = _node(settings, peer_keys, redis_url, redis_prefix)
    chain = _chain(b"honest", 300)
    by_peer = {p: _records(settings, peer_keys, p, chain, 0) for p in ("peer-b", "peer-c", "peer-d")}
    records = [Record(0, 3 * i + k, 0, None, by_peer[p][i].value)
               for i in range(300) for k, p in enumerate(by_peer)]  # fmt: skip
    node.on_vote_records(records)
    assert node.stats["votes_dropped"] == 3
    deadline = time.monotonic() + 10
    while (head := store.head(0)) is None or head.cycle < MAX_HELD_PER_PEER:
        assert time.monotonic() < deadline, "the held quorums were not committed"
        node.commit_ready()
        time.sleep(0.01)
    beat = 8 * settings.tick_ms
    votes = node.process([Record(0, i, (1000 + i) * beat, None, b'{"additions":[["s","p","o"]]}') for i in range(2)])
    assert votes
    node.votes_delivered(votes)  # writes the checkpoint

    restarted = PeerNode(settings, "peer-a", peer_keys["peer-a"], store)
    assert restarted.assign(0).votes_offset == 3 * MAX_HELD_PER_PEER  # the first dropped vote (cycle 257)
