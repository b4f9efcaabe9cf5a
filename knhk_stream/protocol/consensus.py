"""Turning votes into commits: per shard, the next entry after the committed head.

A quorum is committed only for a successor of the committed head: votes for a
beat whose predecessor is not committed yet wait. When no successor of the
head can reach the threshold, the shard is stalled: safety before liveness.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from knhk_stream.protocol.encoding import ZERO_HASH
from knhk_stream.protocol.entry import Entry
from knhk_stream.protocol.epochs import Epoch
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
    newest_read: int | None = None  # cycle of the newest record this peer read on the shard

    @property
    def horizon(self) -> int | None:
        """The larger of the head's cycle and the newest record's: the vote window counts from it."""
        if self.head_cycle is None:
            return self.newest_read
        if self.newest_read is None:
            return self.head_cycle
        return max(self.head_cycle, self.newest_read)


class Consensus:
    def __init__(self, epoch_for: Callable[[int], Epoch]) -> None:
        self.collector = QuorumCollector(epoch_for)
        self.views: dict[int, ShardView] = {}
        self.latest_vote: dict[tuple[int, str], int] = {}  # (shard, peer) -> newest cycle voted

    def view(self, shard: int) -> ShardView:
        v = self.views.get(shard)
        if v is None:
            v = self.views[shard] = ShardView()
        return v

    def set_head(self, shard: int, cycle: int | None, entry_hash: bytes) -> None:
        view = self.view(shard)
        if cycle is None or view.head_cycle is None or cycle >= view.head_cycle:
            view.head_cycle, view.head_hash = cycle, entry_hash
            if cycle is not None:
                self.collector.prune(shard, cycle, entry_hash)
                if view.stalled_at is not None and view.stalled_at <= cycle:
                    view.stalled_at = None

    def read_up_to(self, shard: int, cycle: int) -> None:
        """This peer has read a record of `cycle` on the shard (widens the vote window)."""
        view = self.view(shard)
        if view.newest_read is None or cycle > view.newest_read:
            view.newest_read = cycle

    def add(self, vote: Vote, verified: bool = False) -> VoteStatus:
        """Take a vote (`verified`: its signature is known good, see `QuorumCollector.add`)."""
        shard, cycle = vote.entry.shard, vote.entry.cycle
        view = self.view(shard)
        if view.head_cycle is not None and cycle <= view.head_cycle:
            epoch = self.collector.epoch_for(cycle)
            # about committed history: nothing to decide
            return VoteStatus.REPEATED if vote.peer_id in epoch.public_keys else VoteStatus.UNKNOWN_PEER
        status = self.collector.add(vote, view.head_hash, view.horizon, verified)
        if status in (VoteStatus.COUNTED, VoteStatus.QUORUM):
            key = (shard, vote.peer_id)
            self.latest_vote[key] = max(self.latest_vote.get(key, cycle), cycle)
        return status

    def next_ready(self, shard: int) -> Ready | None:
        """The quorum entry that follows the head, if any; also updates the stall flag."""
        view = self.view(shard)
        found = self.collector.quorum_after(shard, view.head_hash, view.head_cycle)
        if found is not None:
            view.stalled_at = None
            return Ready(found[0], found[1])
        view.stalled_at = self.collector.stuck_after(shard, view.head_hash)
        return None

    def ready_run(self, shard: int, limit: int) -> list[Ready]:
        """The quorum entries that follow the head one after another (at most `limit`), oldest first:
        what one atomic append can take. Empty when nothing follows the head (the stall flag updated)."""
        first = self.next_ready(shard)
        if first is None:
            return []
        run = [first]
        while len(run) < limit:
            e = run[-1].entry
            found = self.collector.quorum_after(shard, e.entry_hash, e.cycle)
            if found is None:
                break
            run.append(Ready(found[0], found[1]))
        return run

    def successors(self, shard: int) -> dict[bytes, dict[str, Vote]]:
        """Counted votes for successors of the head (for status and stall reports)."""
        return self.collector.successors(shard, self.view(shard).head_hash)
