"""The bounds of the vote collector, one rule at a time (the flood itself: test_byzantine_peer.py)."""

from __future__ import annotations

from knhk_stream.protocol.encoding import ZERO_HASH, H
from knhk_stream.protocol.entry import Entry
from knhk_stream.protocol.quorum import (
    MAX_EQUIVOCATIONS,
    MAX_EVIDENCE_PER_ROUND,
    MAX_HELD_PER_PEER,
    WINDOW,
    QuorumCollector,
    Vote,
    VoteStatus,
    sign,
)


def _vote(settings, keys, pid: str, e: Entry) -> Vote:
    epoch = settings.epoch_for(e.cycle)
    return Vote(e, pid, sign(keys[pid], epoch.epoch_hash, e.entry_hash), 1, epoch.number)


def _entry(cycle: int, prev: bytes = ZERO_HASH, tag: bytes = b"", shard: int = 0) -> Entry:
    return Entry("knhk", shard, cycle, H(b"%d" % cycle + tag), 1, cycle, cycle, prev)


def test_a_chain_of_votes_for_one_cycle_is_not_held(settings, peer_keys):
    """Cycles strictly increase along a chain: a successor of the same (or an earlier) cycle does not link."""
    c = QuorumCollector(settings.epoch_for)
    first = _entry(10)
    assert c.add(_vote(settings, peer_keys, "peer-d", first), ZERO_HASH, 10) is VoteStatus.COUNTED
    prev = first.entry_hash
    for i in range(50):
        e = _entry(10, prev, b"same %d" % i)
        assert c.add(_vote(settings, peer_keys, "peer-d", e), ZERO_HASH, 10) is VoteStatus.UNLINKED
        prev = e.entry_hash
    earlier = _entry(9, first.entry_hash, b"earlier")
    assert c.add(_vote(settings, peer_keys, "peer-a", earlier), ZERO_HASH, 10) is VoteStatus.UNLINKED
    later = _entry(11, first.entry_hash)
    assert c.add(_vote(settings, peer_keys, "peer-a", later), ZERO_HASH, 10) is VoteStatus.COUNTED
    assert c.held_votes(0) == 2


def test_one_peer_holds_at_most_its_share(settings, peer_keys):
    """Chains of linked votes from one key, hanging off every held vote of another peer, stop at its share."""
    c = QuorumCollector(settings.epoch_for)
    prev = ZERO_HASH
    honest = []
    for cycle in range(1, WINDOW):  # an honest chain of peer-a's votes, in the window
        e = _entry(cycle, prev)
        assert c.add(_vote(settings, peer_keys, "peer-a", e), ZERO_HASH, 0) is VoteStatus.COUNTED
        honest.append(e)
        prev = e.entry_hash
    statuses = []
    for base in honest:  # peer-d: a chain of increasing cycles from each of them (about 1,900 votes)
        prev = base.entry_hash
        for cycle in range(base.cycle + 1, WINDOW):
            e = _entry(cycle, prev, b"d %d" % base.cycle)
            statuses.append(c.add(_vote(settings, peer_keys, "peer-d", e), ZERO_HASH, 0))
            prev = e.entry_hash
    assert statuses.count(VoteStatus.COUNTED) == MAX_HELD_PER_PEER
    assert statuses.count(VoteStatus.OVER_SHARE) > 0
    assert c.held_votes(0) == len(honest) + MAX_HELD_PER_PEER
    # Pruning gives the share back: what no longer links is dropped.
    c.prune(0, honest[-1].cycle, honest[-1].entry_hash)
    assert c.held_votes(0) == 0


def test_equivocation_evidence_is_bounded_and_reported_once(settings, peer_keys):
    c = QuorumCollector(settings.epoch_for)
    assert c.add(_vote(settings, peer_keys, "peer-d", _entry(5)), ZERO_HASH, 5) is VoteStatus.COUNTED
    for i in range(50):  # fifty more successors of the same entry
        assert c.add(_vote(settings, peer_keys, "peer-d", _entry(5, tag=b"fork %d" % i)), ZERO_HASH, 5) is (
            VoteStatus.EQUIVOCATION
        )
    assert len(c.equivocations) == MAX_EVIDENCE_PER_ROUND
    assert len(c.take_equivocations()) == MAX_EVIDENCE_PER_ROUND
    assert c.take_equivocations() == []  # each reported once
    assert c.add(_vote(settings, peer_keys, "peer-d", _entry(5, tag=b"fork 0")), ZERO_HASH, 5) is (
        VoteStatus.EQUIVOCATION
    )
    assert c.take_equivocations() == []
    assert MAX_EQUIVOCATIONS >= MAX_EVIDENCE_PER_ROUND


def test_finding_the_next_commit_looks_only_at_the_heads_successors(settings, peer_keys):
    """Rounds are indexed by the entry they follow: many pending rounds on another branch change nothing."""
    c = QuorumCollector(settings.epoch_for)
    head = _entry(1)
    for pid in ("peer-a", "peer-b"):
        c.add(_vote(settings, peer_keys, pid, head), ZERO_HASH, 1)
    prev = head.entry_hash
    for cycle in range(2, WINDOW):  # a long branch of pending votes after it
        e = _entry(cycle, prev)
        c.add(_vote(settings, peer_keys, "peer-a", e), ZERO_HASH, 1)
        prev = e.entry_hash
    assert c.quorum_after(0, ZERO_HASH, None) is None
    assert set(c.successors(0, ZERO_HASH)) == {head.entry_hash}  # one round, whatever else is pending
    assert c.add(_vote(settings, peer_keys, "peer-c", head), ZERO_HASH, 1) is VoteStatus.QUORUM
    assert c.quorum_after(0, ZERO_HASH, None)[0] == head
