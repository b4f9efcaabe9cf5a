"""One peer's whole logic without Kafka: what the worker and any embedding pipeline share.

The caller owns the Kafka clients; `PeerNode` owns everything else (beats and
votes, quorums, Redis appends and checkpoints, resume points, stall and
equivocation reports, tick-marker decisions). The caller's loop:

1. `a = node.assign(shard)` when it takes a shard: read the shard's deltas from
   `a.next_offset` and its votes-topic partition from `a.votes_offset`.
2. `votes = node.process(records)`: produce each `vote_out(vote)` to the votes
   topic; once the broker has them, `node.votes_delivered(votes)` gives the
   consumer offsets that are safe to commit (beat boundaries).
3. `node.on_vote_records(records)` with what it read from the votes topic.
4. `node.commit_ready()`: produce each `root_out(entry)` to the roots topic and
   report the delivered ones with `node.roots_delivered(entries)`.
5. `node.markers_due(now_ms)`: produce `marker_out(shard)` to the deltas topic.
6. Before giving a shard up: deliver its pending votes (step 2), then
   `node.revoke(shard)`.

The node never talks to Kafka, so any client library (or a test) can drive it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from enum import Enum
from typing import Any, Literal, NamedTuple, TypeVar

import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from knhk_stream.protocol.committed import CommittedEntry
from knhk_stream.protocol.consensus import Consensus
from knhk_stream.protocol.engine import MARKER_HEADER, PeerEngine, ResumePoint, is_marker
from knhk_stream.protocol.entry import record_key
from knhk_stream.protocol.quorum import Vote, VoteStatus
from knhk_stream.protocol.receipts import rejections_by_code
from knhk_stream.protocol.settings import ChainSettings
from knhk_stream.protocol.wire import WireError, decode_vote, encode_root, encode_vote
from knhk_stream.runtime.telemetry import Telemetry
from knhk_stream.store.epochs import load_epochs
from knhk_stream.store.lockchain import (
    Checkpoint,
    ForkError,
    LockchainStore,
    NotNextError,
    add_evidence,
    get_published,
    load_checkpoint,
    save_checkpoint,
    set_published,
    set_stall,
)

__all__ = [
    "REDIS_DOWN",
    "REDIS_ERRORS",
    "Assignment",
    "Outbound",
    "PeerNode",
    "Record",
    "marker_out",
    "now_ms",
    "root_out",
    "vote_out",
]

log = logging.getLogger("knhk_stream.runtime.node")
# an outage, a failover in progress (cluster down, try again, master down) or lagging replicas: retried later
REDIS_ERRORS = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
    redis.exceptions.MasterDownError,
)
EPOCH_POLL_S = 2.0  # how often a running peer looks for newly applied epochs in Redis
MAX_WAITING_ACKS = 10_000  # acknowledged roots per shard waiting for the published mark to reach them
Headers = list[tuple[str, bytes | None]] | dict[str, bytes] | None
T = TypeVar("T")


class Unreachable(Enum):
    """What a Redis call through `PeerNode._redis` gives during an outage (None is a real answer of some reads)."""

    REDIS_DOWN = "Redis is unreachable"


REDIS_DOWN = Unreachable.REDIS_DOWN


def now_ms() -> int:
    return int(time.time() * 1000)


class Record(NamedTuple):
    """A consumed record as the node needs it (any Kafka client can build one)."""

    partition: int
    offset: int
    timestamp_ms: int
    headers: Headers
    value: bytes | None
    key: bytes | None = None


class Assignment(NamedTuple):
    """Where to read a newly held shard from (protocol: "Where a shard starts, commits and resumes")."""

    next_offset: int  # deltas topic, a beat boundary of this peer
    votes_offset: int  # votes topic: the oldest vote that may still matter


class Outbound(NamedTuple):
    """One record to produce: the partition is always the shard."""

    partition: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None = None


def vote_out(vote: Vote) -> Outbound:
    """The votes-topic record of a vote."""
    e = vote.entry
    return Outbound(e.shard, record_key(e.chain_id, e.shard, e.cycle).encode(), encode_vote(vote))


def root_out(ce: CommittedEntry) -> Outbound:
    """The roots-topic record of a committed entry."""
    e = ce.entry
    return Outbound(e.shard, record_key(e.chain_id, e.shard, e.cycle).encode(), encode_root(ce))


def marker_out(shard: int) -> Outbound:
    """A tick marker for the deltas topic: no value, only its timestamp counts."""
    return Outbound(shard, None, None, [(MARKER_HEADER, b"")])


class PeerNode:
    """One peer's logic for the shards it holds, driven by a caller that owns the Kafka I/O."""

    def __init__(
        self,
        settings: ChainSettings,
        peer_id: str,
        key: Ed25519PrivateKey | Sequence[Ed25519PrivateKey],
        store: LockchainStore,
        telemetry: Telemetry | None = None,
    ) -> None:
        if store.chain_id != settings.chain_id:
            raise ValueError(f"the store is for chain {store.chain_id!r}, the settings for {settings.chain_id!r}")
        self.settings = settings
        self.peer_id = peer_id
        self.engine = PeerEngine(settings, peer_id, key)
        self.consensus = Consensus(lambda cycle: self.settings.epoch_for(cycle))
        self.store = store
        self.telemetry = telemetry or Telemetry(None)
        self.stats = {"deltas": 0, "votes": 0, "appended": 0, "markers": 0}
        self.on_commit: Callable[[CommittedEntry, float], None] | None = None
        self._checkpoint_due: dict[int, ResumePoint] = {}
        self._vote_offsets: dict[int, dict[int, int]] = {}  # shard -> cycle -> lowest votes offset
        self._votes_pos: dict[int, int] = {}  # shard -> next votes offset to read
        self._marker_for: dict[int, int] = {}  # shard -> open cycle a marker was written for
        self._to_publish: list[CommittedEntry] = []  # roots found unpublished at assign
        self._prior: dict[tuple[int, int], int | None] = {}  # (shard, cycle) of a root to publish -> cycle before it
        self._acked: dict[int, dict[int, int | None]] = {}  # shard -> acknowledged cycle -> cycle before it
        self._marks_tried = 0.0
        self._redis_down_since: float | None = None
        self._stalled: dict[int, int] = {}
        self._revotes: list[Vote] = []  # re-signed after a dissent, to produce with the next votes
        self._epochs_checked = 0.0
        self._epoch_findings: set[str] = set()

    @classmethod
    def connect(
        cls,
        settings: ChainSettings,
        peer_id: str,
        key: Ed25519PrivateKey | Sequence[Ed25519PrivateKey],
        redis_url: str = "redis://127.0.0.1:6379/0",
        prefix: str = "knhk",
        telemetry: Telemetry | None = None,
    ) -> PeerNode:
        """A node on the Redis at `redis_url`, with timeouts so an outage is noticed, not waited out."""
        store = LockchainStore.from_url(
            redis_url, settings.chain_id, prefix, socket_timeout=5, socket_connect_timeout=5
        )
        return cls(settings, peer_id, key, store, telemetry)

    @property
    def shards(self) -> list[int]:
        return self.engine.shards

    # -- shards -----------------------------------------------------------------------------

    def assign(self, shard: int) -> Assignment:
        """Take a shard: find this peer's resume point (waiting for Redis if it is down).

        Committed roots that may never have reached the roots topic (their appender
        crashed) come out of the next `commit_ready()` to be published again.
        """
        while True:
            try:
                point, votes_from = self._resume(shard)
                head = self.store.head(shard)
                self._queue_unpublished(shard, head.cycle if head else None)
                break
            except REDIS_ERRORS as e:
                self._redis_unavailable(e)
                time.sleep(1)
        self._redis_available()
        self.engine.assign(shard, point)
        if head is not None:
            self._advance(shard, head.cycle, head.entry_hash)
        self._votes_pos[shard] = votes_from
        log.info(
            "shard %d: resume at offset %d after cycle %s; votes from offset %d",
            shard,
            point.next_offset,
            point.last_cycle,
            votes_from,
        )
        return Assignment(point.next_offset, votes_from)

    def revoke(self, shard: int) -> None:
        """Give a shard up (deliver its pending votes first); its open beat is rebuilt by the next holder."""
        self.flush_checkpoints()
        self.engine.revoke(shard)
        self._vote_offsets.pop(shard, None)
        self._votes_pos.pop(shard, None)
        self._marker_for.pop(shard, None)
        self._to_publish = [ce for ce in self._to_publish if ce.entry.shard != shard]
        self._acked.pop(shard, None)
        for k in [k for k in self._prior if k[0] == shard]:
            del self._prior[k]

    def _resume(self, shard: int) -> tuple[ResumePoint, int]:
        """Own checkpoint, else right after the committed head, else the chain's start offset."""
        cp = load_checkpoint(self.store, self.peer_id, shard)
        if cp is not None:
            prev = cp.entry_hash
            if cp.cycle is not None:
                ce = self.store.get(shard, cp.cycle)  # committed: chain from it, not from an own dissenting vote
                if ce is not None and ce.entry.last_offset + 1 == cp.next_offset:
                    prev = ce.entry_hash
            return ResumePoint(cp.next_offset, prev, cp.cycle), cp.votes_offset
        head = self.store.head(shard)
        if head is not None:
            ce = self.store.get(shard, head.cycle)
            if ce is not None:
                return ResumePoint.after(ce.entry), 0
        return ResumePoint(self.settings.start_offset(shard)), 0

    def _queue_unpublished(self, shard: int, head_cycle: int | None) -> None:
        if head_cycle is None:
            return
        published = get_published(self.store, shard)
        if published is not None and published >= head_cycle:
            return
        start = None if published is None else published + 1
        found = self.store.range(shard, start, head_cycle)  # all read before anything is queued
        prior = published
        for ce in found:
            self._to_publish.append(ce)
            self._prior[(shard, ce.entry.cycle)] = prior
            prior = ce.entry.cycle

    # -- deltas and own votes ---------------------------------------------------------------

    def process(self, records: Iterable[Record]) -> list[Vote]:
        """Delta records in offset order per shard; returns the votes of the beats they close."""
        feed = self.engine.feed
        held = set(self.engine.shards)
        rejected: dict[str, int] = {}
        votes, self._revotes = self._revotes, []
        n = 0
        for r in records:
            shard = r.partition
            if shard not in held:
                continue
            marker = is_marker(r.headers, r.value)
            vote = feed(shard, r.offset, r.timestamp_ms, marker, r.value)
            if not marker:
                n += 1
            if vote is not None:
                votes.append(vote)
                self.consensus.read_up_to(shard, vote.entry.cycle)
                beat = self.engine.last_beat(shard)
                if self.telemetry.enabled and beat is not None:
                    for code, k in rejections_by_code(beat.receipts).items():
                        rejected[code] = rejected.get(code, 0) + k
        self.stats["deltas"] += n
        self.stats["votes"] += len(votes)
        self.telemetry.deltas_processed(n, rejected)
        return votes

    def votes_delivered(self, votes: Sequence[Vote]) -> dict[int, int]:
        """The votes are on the votes topic: checkpoint, and return per shard the offset safe to commit."""
        offsets: dict[int, int] = {}
        for vote in votes:
            point = self.engine.delivered(vote)
            self._checkpoint_due[vote.entry.shard] = point
            offsets[vote.entry.shard] = point.next_offset
        self.flush_checkpoints()
        return offsets

    def flush_checkpoints(self) -> bool:
        """Write due checkpoints to Redis; False while Redis is down (they are retried later)."""
        for shard in list(self._checkpoint_due):
            point = self._checkpoint_due[shard]
            cp = Checkpoint(
                point.next_offset, point.prev_entry_hash, point.last_cycle, self._votes_hint(shard), now_ms()
            )
            if self._redis(save_checkpoint, self.store, self.peer_id, shard, cp) is REDIS_DOWN:
                return False
            del self._checkpoint_due[shard]
        return True

    def _votes_hint(self, shard: int) -> int:
        """Lowest votes offset that may still matter: votes for cycles after the head."""
        pending = self._vote_offsets.get(shard)
        if pending:
            return min(pending.values())
        return self._votes_pos.get(shard, 0)

    # -- everyone's votes and commits -------------------------------------------------------

    def on_vote_records(self, records: Iterable[Record]) -> None:
        """Records read from the votes topic (of held shards; others are ignored)."""
        for r in records:
            shard = r.partition
            if shard not in self._votes_pos:
                continue
            self._votes_pos[shard] = r.offset + 1
            try:
                vote = decode_vote(r.value)
            except WireError as e:
                log.warning("votes topic shard %d offset %d: %s; ignored", shard, r.offset, e)
                continue
            if vote.entry.chain_id != self.settings.chain_id or vote.entry.shard != shard:
                log.warning(
                    "vote at votes offset %d names chain %r shard %d; ignored",
                    r.offset,
                    vote.entry.chain_id,
                    vote.entry.shard,
                )
                continue
            status = self.consensus.add(vote)
            if status in (VoteStatus.COUNTED, VoteStatus.QUORUM):
                self._vote_offsets.setdefault(shard, {}).setdefault(vote.entry.cycle, r.offset)
            elif status is VoteStatus.EQUIVOCATION:
                self._report_equivocation(vote)
            elif status in (VoteStatus.BAD_SIGNATURE, VoteStatus.UNKNOWN_PEER):
                log.warning(
                    "vote for shard %d cycle %d from %r: %s; ignored",
                    shard,
                    vote.entry.cycle,
                    vote.peer_id,
                    status.value,
                )

    def _report_equivocation(self, vote: Vote) -> None:
        for ev in self.consensus.collector.equivocations:
            if ev.second is vote:
                log.error(
                    "EQUIVOCATION: peer %s signed two entries for shard %d cycle %d: %s and %s",
                    ev.peer_id,
                    ev.shard,
                    ev.cycle,
                    ev.first.entry_hash.hex(),
                    ev.second.entry_hash.hex(),
                )
                evidence = {
                    "peer_id": ev.peer_id,
                    "shard": ev.shard,
                    "cycle": ev.cycle,
                    "first": {**ev.first.entry.to_fields(), "signature": ev.first.signature.hex()},
                    "second": {**ev.second.entry.to_fields(), "signature": ev.second.signature.hex()},
                }
                self._redis(add_evidence, self.store, ev.shard, evidence)
                self.telemetry.equivocation(ev.shard, ev.peer_id)

    def commit_ready(self) -> list[CommittedEntry]:
        """Append every quorum that follows a held shard's head; returns the roots to publish.

        Also retries checkpoints that waited for Redis. The list holds the entries
        this node wrote (in cycle order per shard), after any found unpublished at
        `assign`.
        """
        out, self._to_publish = self._to_publish, []
        if time.monotonic() - self._epochs_checked > EPOCH_POLL_S:
            self._epochs_checked = time.monotonic()
            self.refresh_epochs()
        if self._checkpoint_due and not self.flush_checkpoints():
            return out
        if self._acked and time.monotonic() - self._marks_tried > 1:
            self._marks_tried = time.monotonic()
            self._move_marks(list(self._acked))
        for shard in self.engine.shards:
            if not self._commit_shard(shard, out):
                return out  # Redis is down: the other shards wait too
            self._note_stall(shard)
        return out

    def _commit_shard(self, shard: int, out: list[CommittedEntry]) -> bool:
        """Commit what is ready on one shard; False only when Redis is unreachable."""
        while (ready := self.consensus.next_ready(shard)) is not None:
            ce = CommittedEntry.from_quorum(ready.entry, ready.votes, self.peer_id, now_ms())
            prior = self.consensus.views[shard].head_cycle
            try:
                written = self.store.append(ce)
            except NotNextError:
                head = self._redis(self.store.head, shard)
                if head is REDIS_DOWN:
                    return False
                if head is not None and head.cycle >= ce.entry.cycle:
                    self._advance(shard, head.cycle, head.entry_hash)
                    continue
                log.error(
                    "shard %d: cannot commit cycle %d after head %s: a predecessor is missing",
                    shard,
                    ce.entry.cycle,
                    None if head is None else head.cycle,
                )
                return True
            except ForkError as e:
                log.critical("shard %d: %s", shard, e)
                self._redis(set_stall, self.store, shard, ce.entry.cycle, f"fork refused: {e}", now_ms())
                return True
            except REDIS_ERRORS as e:
                self._redis_unavailable(e)
                return False
            self._redis_available()
            if written:
                out.append(ce)
                self._prior[(shard, ce.entry.cycle)] = prior
                self._committed(ce)
            self._advance(shard, ce.entry.cycle, ce.entry_hash)
        return True

    def _committed(self, ce: CommittedEntry) -> None:
        e = ce.entry
        self.stats["appended"] += 1
        latency = ce.committed_at_ms - self.engine.beat_end_ms(e.cycle)
        self.telemetry.beat_committed(e, len(ce.votes), self.settings.epoch_for(e.cycle).threshold, latency)
        if self.on_commit:
            self.on_commit(ce, latency)

    def _advance(self, shard: int, cycle: int, entry_hash: bytes) -> None:
        self.consensus.set_head(shard, cycle, entry_hash)
        revotes = self.engine.on_committed(shard, cycle, entry_hash)
        if revotes:
            log.warning(
                "shard %d: cycle %d was committed as %s, not as this peer voted: re-signing %d later vote(s) "
                "on the committed entry",
                shard,
                cycle,
                entry_hash.hex()[:16],
                len(revotes),
            )
            self._revotes += revotes
        per = self._vote_offsets.get(shard)
        if per:
            for c in [c for c in per if c <= cycle]:
                del per[c]

    def roots_delivered(self, entries: Iterable[CommittedEntry]) -> None:
        """Roots the broker acknowledged: move the shard's "published up to" mark.

        The mark only moves over an unbroken run of acknowledged roots from where it
        stands (this node's and, once they move it, other peers'), so a root whose
        appender died before publishing it is published again by whoever next takes
        the shard: the protocol's at-least-once rule. Runs that wait for another
        peer's acknowledgement are retried from `commit_ready()`.
        """
        touched = set()
        for ce in entries:
            shard, cycle = ce.entry.shard, ce.entry.cycle
            if (shard, cycle) in self._prior:
                self._acked.setdefault(shard, {})[cycle] = self._prior.pop((shard, cycle))
                touched.add(shard)
        self._move_marks(touched)

    def _move_marks(self, shards: Iterable[int]) -> None:
        for shard in shards:
            acked = self._acked.get(shard)
            if not acked:
                continue
            mark = self._redis(get_published, self.store, shard)
            if mark is REDIS_DOWN:
                return
            reached = mark
            for cycle in sorted(acked):
                if reached is not None and cycle <= reached:
                    del acked[cycle]
                elif acked[cycle] == reached:
                    reached = cycle
                    del acked[cycle]
                else:
                    break
            if reached != mark:
                self._redis(set_published, self.store, shard, reached)
            while len(acked) > MAX_WAITING_ACKS:
                del acked[min(acked)]  # the next holder of the shard republishes from the mark anyway

    def _note_stall(self, shard: int) -> None:
        stalled = self.consensus.views[shard].stalled_at if shard in self.consensus.views else None
        before = self._stalled.get(shard)
        if stalled == before:
            return
        if stalled is None:
            self._stalled.pop(shard, None)
            self._redis(set_stall, self.store, shard, None)
            log.warning("shard %d commits again", shard)
            return
        self._stalled[shard] = stalled
        votes = self.consensus.successors(shard)
        split = ", ".join(f"{h.hex()[:12]}: {sorted(v)}" for h, v in votes.items())
        threshold = self.settings.epoch_for(stalled).threshold
        reason = f"no entry of cycle {stalled} can reach threshold {threshold} ({split})"
        log.error("SHARD %d STALLED: %s. Nothing more is committed on it until peers agree.", shard, reason)
        self._redis(set_stall, self.store, shard, stalled, reason, now_ms())
        self.telemetry.stalled(shard)

    # -- epochs -----------------------------------------------------------------------------

    def refresh_epochs(self) -> bool:
        """Adopt epochs applied in Redis since start, each verified from epoch 0; True when one was adopted."""
        found = self._redis(load_epochs, self.store)
        if found is REDIS_DOWN:
            return False  # Redis is down: tried again later
        statements, findings = found
        for f in findings:
            if f not in self._epoch_findings:
                self._epoch_findings.add(f)
                log.error("%s; ignored", f)
        newer = self.settings.with_epochs(statements)
        if newer is self.settings:
            return False
        chain = newer.epoch_chain
        for e, why in chain.refused:
            msg = f"epoch {e.number} in Redis is not accepted from epoch 0: {'; '.join(why)}"
            if msg not in self._epoch_findings:
                self._epoch_findings.add(msg)
                log.error("%s; ignored", msg)
        for fork in chain.forks:
            log.critical("EPOCH FORK: two valid statements for epoch %d (signed by both: %s)", fork.number, fork.peers)
        accepted = [e for e in newer.epochs if e in chain.epochs]
        if len(chain.epochs) == len(self.settings.epoch_chain.epochs):
            return False
        candidate = replace(self.settings, epochs=tuple(accepted))
        try:
            self.engine.update_settings(candidate)
        except ValueError as e:
            msg = str(e)
            if msg not in self._epoch_findings:
                self._epoch_findings.add(msg)
                log.error("%s", msg)
            return False
        self.settings = candidate
        newest = candidate.epoch_chain.newest
        log.warning("adopted epoch %d (from cycle %d, %d peers, threshold %d)",
                    newest.number, newest.from_cycle, len(newest.peers), newest.threshold)
        return True

    # -- tick markers -----------------------------------------------------------------------

    def markers_due(self, at_ms: int | None = None) -> list[int]:
        """Shards whose open beat (holding deltas) is over by wall clock: write a marker into each.

        Each open beat gets one marker from this node; the caller must produce it.
        """
        t = now_ms() if at_ms is None else at_ms
        due: list[int] = []
        for shard in self.engine.shards:
            cycle, _first, deltas = self.engine.open_beat(shard)
            if cycle is None or not deltas or self._marker_for.get(shard) == cycle:
                continue
            if t > self.engine.beat_end_ms(cycle) + self.settings.tick_ms:
                self._marker_for[shard] = cycle
                due.append(shard)
        self.stats["markers"] += len(due)
        return due

    # -- Redis availability -----------------------------------------------------------------

    def _redis(self, fn: Callable[..., T], *args: Any) -> T | Literal[Unreachable.REDIS_DOWN]:
        """Call a Redis operation; on an outage log once and return REDIS_DOWN (the caller retries later)."""
        try:
            out = fn(*args)
        except REDIS_ERRORS as e:
            self._redis_unavailable(e)
            return REDIS_DOWN
        self._redis_available()
        return out

    def _redis_unavailable(self, e: Exception) -> None:
        if self._redis_down_since is None:
            self._redis_down_since = time.monotonic()
            log.error("Redis unavailable (%s): commits and checkpoints wait; votes go on", e)

    def _redis_available(self) -> None:
        if self._redis_down_since is not None:
            log.warning("Redis back after %.1fs", time.monotonic() - self._redis_down_since)
            self._redis_down_since = None
