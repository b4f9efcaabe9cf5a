"""Turning votes into commits: per shard, the next entry after the committed head.

A quorum for cycle c is committed only when its entry's prev_entry_hash is
the committed head's entry hash: votes for a beat whose predecessor is not
committed yet wait. When no entry hash of the next pending round can reach
the threshold, the shard is stalled: safety before liveness.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from knhk_stream.protocol.encoding import ZERO_HASH
from knhk_stream.protocol.entry import Entry
from knhk_stream.protocol.quorum import QuorumCollector, Vote, VoteStatus


@dataclass(frozen=True)
class Ready:
    entry: Entry
    votes: list[Vote]


@dataclass
class ShardView:
    head_cycle: int | None = None
    head_hash: bytes = ZERO_HASH
    stalled_at: int | None = None  # cycle that can no longer reach quorum


class Consensus:
    def __init__(self, peers: Mapping[str, bytes], threshold: int) -> None:
        self.collector = QuorumCollector(peers, threshold)
        self.views: dict[int, ShardView] = {}
        self._pending: dict[int, set[int]] = {}
        self.latest_vote: dict[tuple[int, str], int] = {}  # (shard, peer) -> newest cycle voted

    def set_head(self, shard: int, cycle: int | None, entry_hash: bytes) -> None:
        view = self.views.setdefault(shard, ShardView())
        if cycle is None or view.head_cycle is None or cycle >= view.head_cycle:
            view.head_cycle, view.head_hash = cycle, entry_hash
            if cycle is not None:
                self.collector.forget_until(shard, cycle)
                self._pending[shard] = {c for c in self._pending.get(shard, ()) if c > cycle}
                if view.stalled_at is not None and view.stalled_at <= cycle:
                    view.stalled_at = None

    def add(self, vote: Vote) -> VoteStatus:
        shard, cycle = vote.entry.shard, vote.entry.cycle
        view = self.views.setdefault(shard, ShardView())
        if view.head_cycle is not None and cycle <= view.head_cycle:
            status = VoteStatus.REPEATED  # about committed history: nothing to decide
            if self.collector.peers.get(vote.peer_id) is None:
                status = VoteStatus.UNKNOWN_PEER
            return status
        status = self.collector.add(vote)
        if status in (VoteStatus.COUNTED, VoteStatus.QUORUM):
            self._pending.setdefault(shard, set()).add(cycle)
            key = (shard, vote.peer_id)
            self.latest_vote[key] = max(self.latest_vote.get(key, cycle), cycle)
        return status

    def next_ready(self, shard: int) -> Ready | None:
        """The quorum entry that follows the head, if any; also updates the stall flag.

        Rounds without a quorum are passed over (a faulty peer may vote for beats
        nobody else has); a round that can no longer reach the threshold marks
        the shard stalled until something commits past it.
        """
        view = self.views.setdefault(shard, ShardView())
        view.stalled_at = None
        for cycle in sorted(self._pending.get(shard, ())):
            found = self.collector.quorum(shard, cycle)
            if found is not None and found[0].prev_entry_hash == view.head_hash:
                return Ready(found[0], found[1])
            if found is None and view.stalled_at is None and self.collector.stuck(shard, cycle):
                view.stalled_at = cycle
        return None
