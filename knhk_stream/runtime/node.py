"""One peer's whole logic without Kafka: what the worker and any embedding pipeline share.

The caller owns the Kafka clients; `PeerNode` owns everything else (beats and
votes, quorums, Redis appends and checkpoints, resume points, stall and
equivocation reports, tick-marker decisions, and the checks that keep one
byzantine peer or a Redis writer from misleading it). The caller's loop:

1. `a = node.assign(shard)` when it takes a shard: read the shard's deltas from
   `a.next_offset` and its votes-topic partition from `a.votes_offset`.
2. `votes = node.process(records)` (or `node.process_iter`, each vote as soon as its
   beat closes): produce each `vote_out(vote)` to the votes
   topic; once the broker has them, `node.votes_delivered(votes)` gives the
   consumer offsets that are safe to commit (beat boundaries). Shards in
   `node.take_halted()` stopped reading (an open beat grew past its bound):
   pause them.
3. `node.on_vote_records(records)` with what it read from the votes topic.
4. `node.commit_ready()`: produce each `root_out(entry)` to the roots topic and
   report the delivered ones with `node.roots_delivered(entries)`.
5. `node.markers_due(now_ms)`: produce `marker_out(shard)` to the deltas topic.
6. `node.evidence_due()`: produce each record to the evidence topic; give the
   ones that failed back with `node.evidence_failed(records)`.
7. Before giving a shard up: deliver its pending votes (step 2), then
   `node.revoke(shard)`.

`roots_source(shard, last)`, if the caller sets it, returns the values of the
roots topic's partition of that shard, oldest first (only the newest `last`
records unless `last` is None): the node reads it to restore what Redis lost of
a chain, when it takes a shard and when a running peer sees the head move back.

The node never talks to Kafka, so any client library (or a test) can drive it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any, Literal, NamedTuple, TypeVar

import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from knhk_stream.protocol.beats import beat_end_ms, beat_ms
from knhk_stream.protocol.committed import CommittedEntry, votes_from_json
from knhk_stream.protocol.consensus import Consensus, Ready
from knhk_stream.protocol.encoding import ZERO_HASH
from knhk_stream.protocol.engine import MARKER_HEADER, PeerEngine, ResumePoint, is_marker
from knhk_stream.protocol.entry import record_key
from knhk_stream.protocol.epochs import Epoch
from knhk_stream.protocol.keys import sign_message
from knhk_stream.protocol.quorum import MAX_HELD_PER_PEER, Equivocation, Vote, VoteStatus, check_quorum, in_window
from knhk_stream.protocol.receipts import rejections_by_code
from knhk_stream.protocol.settings import ChainSettings
from knhk_stream.protocol.wire import WireError, decode_root, decode_vote, encode_root, encode_vote
from knhk_stream.runtime.telemetry import Telemetry
from knhk_stream.store.epochs import load_epochs, store_epoch
from knhk_stream.store.lockchain import (
    Checkpoint,
    ForkError,
    LockchainStore,
    NotNextError,
    StoredCopy,
    acknowledge_published,
    add_evidence,
    checkpoint_message,
    checkpoint_verifies,
    committed_problem,
    evidence_key,
    evidence_of,
    get_published,
    load_checkpoint,
    read_head_entry,
    read_verified,
    save_checkpoint,
    set_health,
    set_stall,
    stored_checkpoint_signature,
)
from knhk_stream.store.rebuild import ConflictingChain, RebuildResult, linked_chain, rebuild_shard

__all__ = [
    "REDIS_DOWN",
    "REDIS_ERRORS",
    "Assignment",
    "Interrupt",
    "NodeLimits",
    "Outbound",
    "PeerNode",
    "Record",
    "evidence_out",
    "marker_out",
    "now_ms",
    "root_out",
    "vote_out",
]

log = logging.getLogger("knhk_stream.runtime.node")
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)
UNVERIFIED_HEAD_ADVICE = (
    "it still offers its own verified entries to Redis every head check, which writes them over bad copies of "
    "the same entries, and commits nothing else on this shard (someone who can write Redis changed the head; "
    "see `knhk-stream chain verify`)"
)
EPOCH_POLL_S = 2.0  # how often a running peer looks for newly applied epochs in Redis
MAX_WAITING_ACKS = 10_000  # acknowledged roots per shard kept while Redis cannot take them
MAX_REPUBLISH = 1000  # unpublished roots queued per shard and round of republishing
MAX_EVIDENCE_DUE = 1000  # evidence records waiting for the evidence topic
BAD_LOGS_PER_MINUTE = 10  # hostile records logged one by one per topic and shard; the rest are summed up
ALARM_KEEP_MS = 3_600_000  # how long an alarm stays in this peer's report (status)
MAX_ALARMS = 10  # alarms kept per shard in the report
MAX_APPEND_RUN = 64  # consecutive ready entries of a shard appended in one Lua call (one round trip)
# At beats under TURNS_BELOW_BEAT_MS the first appender of a cycle is one peer, by turns (peer ids in
# order, cycle mod n); the others append it in their own next turn's run or after this wait (two beats,
# within these bounds), should it not: the wait is what a slow first appender adds to a commit.
FIRST_APPENDER_WAIT_S = (0.005, 0.02)
# Turns only pay while beats are short: from beats of this length on (tick_ms 13 and up), a round trip a
# beat per peer costs nothing, and every peer appends as soon as it holds a quorum (the first one writes,
# the others find it there), so a slow first appender adds no wait (the p99 of our share at tick_ms 125).
TURNS_BELOW_BEAT_MS = 100
REREAD_S = 1.0  # a shard's votes partition is read again (for votes dropped by the bounds) at most this often
MAX_OWN_VOTES = 4096  # own votes' records remembered until read back (so they are neither decoded nor verified)
ROOTS_TAIL = 64  # newest roots-topic records read when taking a shard, to see whether Redis lost entries
Headers = list[tuple[str, bytes | None]] | dict[str, bytes] | None
# (shard, last): the values of the shard's roots-topic partition, oldest first; only the newest `last` unless None
RootsSource = Callable[[int, int | None], Iterable[bytes | None]]
T = TypeVar("T")


class Interrupt(Exception):
    """Raised by the caller (from a signal handler) to end a wait inside the node: never swallowed."""


class Unreachable(Enum):
    """What a Redis call through `PeerNode._redis` gives during an outage (None is a real answer of some reads)."""

    REDIS_DOWN = "Redis is unreachable"


REDIS_DOWN = Unreachable.REDIS_DOWN


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class NodeLimits:
    """What a peer holds and how often it looks, whatever others send or write."""

    # An open beat (its receipts are held until it closes) that passes this bound stops the shard
    # loudly instead of exhausting memory (a record stamped far in the future keeps it open for ever).
    max_open_beat_deltas: int = 500_000
    republish_s: float = 5.0  # committed roots still unpublished after this long are published again
    head_check_s: float = 2.0  # how often the committed head in Redis is compared with this peer's
    health_s: float = 5.0  # how often this peer's report on its shards is written (status reads it)
    recent_entries: int = 1024  # committed entries kept per shard (about 1 KiB each), to re-append after a truncation
    roots_retry_s: float = 30.0  # reading the roots topic again to repair a shard, at most this often


MAX_MARKER_DELAY_MS = 1000  # the most a shard's delivery lag holds a marker back
# After a batch of fewer than this many deltas (a steady stream, not a backlog) the open beats of its
# shards hash their Merkle trees ahead, so that their close is quicker (`BeatAssembler.hash_ahead`);
# in a backlog that work would only slow the batch, so a larger batch leaves it to the close.
HASH_AHEAD_BELOW = 1000


@dataclass(slots=True)
class DeliveryLag:
    """How late this peer reads a shard's records (read time - T, the running maximum of their
    timestamps): a beat's closing record is not overdue before the beat's end plus `wait_ms`, so a
    marker earlier only adds records. Before, at tick_ms 1 with reads ~170 ms late, every peer wrote a
    marker for nearly every beat: half as many markers as deltas on the topic, and the deltas after a
    marker merged into fewer beats. It takes in a clock ahead of the broker's too.

    `floor_ms` follows the lag down at once and up slowly (1/8 a sample, as RFC 6298 smooths round trips),
    `spread_ms` how far reads come later than that: the wait is floor + 4 spreads. Down at once, so a
    backlog just read (lags of seconds) does not hold the next idle beat's marker back. T, not a record's
    own timestamp, so records stamped far back cannot hold markers back (T does not move back), and
    never more than MAX_MARKER_DELAY_MS."""

    floor_ms: float
    spread_ms: float = 0.0

    def note(self, lag_ms: int) -> None:
        if lag_ms <= self.floor_ms:
            self.floor_ms = lag_ms
            self.spread_ms -= self.spread_ms / 4
        else:
            self.spread_ms += (lag_ms - self.floor_ms - self.spread_ms) / 4
            self.floor_ms += (lag_ms - self.floor_ms) / 8

    @property
    def wait_ms(self) -> int:
        return int(min(MAX_MARKER_DELAY_MS, max(0.0, self.floor_ms + 4 * self.spread_ms)))


class Record(NamedTuple):
    """A consumed record as the node needs it (any Kafka client can build one)."""

    partition: int
    offset: int
    timestamp_ms: int
    headers: Headers
    value: bytes | None
    key: bytes | None = None


class _Dropped(NamedTuple):
    """Where a peer's votes dropped by one bound lie: the lowest offset, and the cycles they span."""

    offset: int
    low: int
    high: int


@dataclass(slots=True)
class _Reread:
    """One reading again of a votes partition: up to where, when, and whose votes counted in it."""

    end: int  # the offset reading had reached when it went back
    at: float
    counted: set[str] = field(default_factory=set)


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


def evidence_out(evidence: dict[str, Any]) -> Outbound:
    """The evidence-topic record of an equivocation (JSON; readers check both signatures)."""
    key = f"{evidence['chain_id']}/{evidence_key(evidence)}".encode("utf-8", "replace")
    return Outbound(evidence["shard"], key, json.dumps(evidence, separators=(",", ":")).encode())


@dataclass
class RejectedCount:
    """The receipts of the beats a peer closed on a shard since it took it, and how many were rejected, by code:
    what `status` shows (Redis keeps only the beats' roots)."""

    since_ms: int
    receipts: int = 0
    by_code: dict[str, int] = field(default_factory=dict)


class PeerNode:
    """One peer's logic for the shards it holds, driven by a caller that owns the Kafka I/O."""

    def __init__(
        self,
        settings: ChainSettings,
        peer_id: str,
        key: Ed25519PrivateKey | Sequence[Ed25519PrivateKey],
        store: LockchainStore,
        telemetry: Telemetry | None = None,
        limits: NodeLimits | None = None,
        roots_source: RootsSource | None = None,
    ) -> None:
        if store.chain_id != settings.chain_id:
            raise ValueError(f"the store is for chain {store.chain_id!r}, the settings for {settings.chain_id!r}")
        self.settings = settings
        self.peer_id = peer_id
        self.engine = PeerEngine(settings, peer_id, key)
        self.consensus = Consensus(lambda cycle: self.settings.epoch_for(cycle))
        self.store = store
        self.telemetry = telemetry or Telemetry(None)
        self.limits = limits or NodeLimits()
        self.roots_source = roots_source
        self.stats = {"deltas": 0, "votes": 0, "appended": 0, "markers": 0, "bad_records": 0, "reappended": 0,
                      "restored": 0, "votes_dropped": 0, "votes_reread": 0}  # fmt: skip
        self.on_commit: Callable[[CommittedEntry, float], None] | None = None
        self._checkpoint_due: dict[int, ResumePoint] = {}
        self._vote_offsets: dict[int, dict[int, int]] = {}  # shard -> cycle -> lowest votes offset
        self._votes_pos: dict[int, int] = {}  # shard -> next votes offset to read
        # votes dropped by the window or a peer's share, read again once they can count (`votes_to_reread`)
        self._dropped: dict[int, dict[tuple[str, VoteStatus], _Dropped]] = {}  # shard -> (peer, bound) -> where
        self._reread: dict[int, _Reread] = {}  # shard -> the latest reading again
        self._marker_for: dict[int, tuple[int, int]] = {}  # shard -> (open cycle, ms) of the last marker
        self._lag: dict[int, DeliveryLag] = {}  # shard -> how late its records are read here
        self._to_publish: list[CommittedEntry] = []  # roots found unpublished
        self._prior: dict[tuple[int, int], int | None] = {}  # (shard, cycle) of a root to publish -> cycle before it
        self._acked: dict[int, dict[int, int | None]] = {}  # shard -> acknowledged cycle -> cycle before it
        self._marks_tried = 0.0
        self._redis_down_since: float | None = None
        self._stalled: dict[int, int] = {}
        self._revotes: list[Vote] = []  # re-signed after a dissent, to produce with the next votes
        self._epochs_checked = 0.0
        self._epoch_findings: set[str] = set()
        # what keeps hostile input and hostile storage from stopping or misleading this peer
        self._bad: dict[tuple[str, int], list[int]] = {}  # (topic, shard) -> [minute, logged, skipped, count]
        self._halted: dict[int, str] = {}  # shard -> why it stopped reading (open beat too large)
        self._new_halts: list[int] = []
        self._blocked: dict[int, str] = {}  # shard -> why nothing is committed on it (untrusted Redis state)
        self._blocked_kind: dict[int, str] = {}  # shard -> the alarm kind of its block
        self._blocked_until_retaken: set[int] = set()  # Redis holds a conflicting chain: no check lifts it
        self._alarms: dict[int, list[dict[str, Any]]] = {}
        self._recent: dict[int, dict[int, CommittedEntry]] = {}  # shard -> cycle -> verified committed entry
        self._forged_checkpoint: dict[int, str] = {}  # shard -> stored signature text of a checkpoint refused
        self._heads_checked = 0.0
        self._republished = time.monotonic()
        self._republish_upto: dict[int, int | None] = {}  # shard -> head cycle at the last round
        self._roots_read: dict[int, float] = {}  # shard -> when the roots topic was last read to repair it
        self._health_written = 0.0
        self._evidence_due: list[Outbound] = []
        self._own_votes: dict[bytes, Vote] = {}  # value of a vote record this node made -> the vote (vote_record)
        self._checked_stored: dict[int, dict[int, CommittedEntry]] = {}  # shard -> cycle -> stored copy verified
        self._ready_since: dict[int, tuple[int, float]] = {}  # shard -> (cycle, since when) of the oldest ready entry
        self._turns: dict[int, tuple[str, ...]] = {}  # epoch number -> its peer ids in order (first appenders)
        self._rejected: dict[int, RejectedCount] = {}  # shard -> receipts of the beats closed since it was taken

    @classmethod
    def connect(
        cls,
        settings: ChainSettings,
        peer_id: str,
        key: Ed25519PrivateKey | Sequence[Ed25519PrivateKey],
        redis_url: str = "redis://127.0.0.1:6379/0",
        prefix: str = "knhk",
        telemetry: Telemetry | None = None,
        limits: NodeLimits | None = None,
    ) -> PeerNode:
        """A node on the Redis at `redis_url`, with timeouts so an outage is noticed, not waited out."""
        store = LockchainStore.from_url(
            redis_url, settings.chain_id, prefix, socket_timeout=5, socket_connect_timeout=5
        )
        return cls(settings, peer_id, key, store, telemetry, limits)

    @property
    def shards(self) -> list[int]:
        return self.engine.shards

    # -- shards -----------------------------------------------------------------------------

    def assign(self, shard: int, stop: Callable[[], bool] | None = None) -> Assignment:
        """Take a shard: find this peer's resume point (waiting for Redis if it is down).

        While Redis is down this waits, looking at `stop` every 0.1 s: once it says
        so, `Interrupt` ends the wait (a caller stopping must not hang on an outage).
        Committed roots that may never have reached the roots topic (their appender
        crashed) come out of the next `commit_ready()` to be published again.
        """
        while True:
            try:
                point, votes_from, head = self._resume(shard)
                self._queue_unpublished(shard, head.entry.cycle if head else None)
                break
            except REDIS_ERRORS as e:
                self._redis_unavailable(e)
                for _ in range(10):
                    if stop is not None and stop():
                        raise Interrupt(f"stopped while waiting for Redis to take shard {shard}") from None
                    time.sleep(0.1)
        self._redis_available()
        self.engine.assign(shard, point)
        self._halted.pop(shard, None)
        if head is not None:
            self._remember(head)
            self._advance(shard, head.entry.cycle, head.entry_hash)
        self._votes_pos[shard] = votes_from
        self._republish_upto[shard] = None
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
        self._write_health([shard])
        self.engine.revoke(shard)
        for per_shard in (self._vote_offsets, self._votes_pos, self._dropped, self._reread, self._marker_for, self._lag,
                          self._acked, self._halted, self._blocked, self._recent, self._forged_checkpoint,
                          self._republish_upto, self._roots_read, self._alarms, self._rejected,
                          self._ready_since, self._checked_stored):  # fmt: skip
            per_shard.pop(shard, None)
        self._blocked_until_retaken.discard(shard)
        self._to_publish = [ce for ce in self._to_publish if ce.entry.shard != shard]
        for k in [k for k in self._prior if k[0] == shard]:
            del self._prior[k]

    def _resume(self, shard: int) -> tuple[ResumePoint, int, CommittedEntry | None]:
        """Own checkpoint (if its signature verifies), else right after the committed head (if its quorum
        verifies), else the chain's start offset. Also returns the verified committed head.

        First, what Redis lost of the chain is restored from the roots topic (`_restore_from_roots`)."""
        self._restore_from_roots(shard)
        head, problem = read_head_entry(self.store, self.settings, shard)
        if problem is not None and self.refresh_epochs():  # signed in an epoch applied since this peer looked
            head, problem = read_head_entry(self.store, self.settings, shard)
        if problem is not None:
            self._block(shard, "unverified_head", f"{problem}. It is not adopted: this peer neither resumes from "
                        f"it nor builds on it until the head in Redis verifies again; "
                        f"{UNVERIFIED_HEAD_ADVICE}")  # fmt: skip
        cp = self._own_checkpoint(shard)
        if cp is not None:
            prev = cp.entry_hash
            if cp.cycle is not None:
                ce, _ = read_verified(self.store, self.settings, shard, cp.cycle)
                if ce is not None and ce.entry.last_offset + 1 == cp.next_offset:
                    prev = ce.entry_hash  # committed: chain from it, not from an own dissenting vote
            return ResumePoint(cp.next_offset, prev, cp.cycle), cp.votes_offset, head
        if head is not None:
            return ResumePoint.after(head.entry), 0, head
        return ResumePoint(self.settings.start_offset(shard)), 0, head

    def _own_checkpoint(self, shard: int) -> Checkpoint | None:
        """This peer's checkpoint of the shard, only if it is there and its signature verifies."""
        try:
            cp = load_checkpoint(self.store, self.peer_id, shard)
        except ValueError as e:
            cp, why = None, f"cannot be read ({e})"
        else:
            if cp is None:
                return None
            if checkpoint_verifies(self.settings.chain_id, self.peer_id, shard, cp, self.engine.keys):
                return cp
            why = "does not verify under this peer's key"
        self._forged_checkpoint[shard] = stored_checkpoint_signature(self.store, self.peer_id, shard) or ""
        where = "" if cp is None else f" (it says: resume at offset {cp.next_offset}, after cycle {cp.cycle})"
        self._alarm(
            shard,
            "forged_checkpoint",
            f"the checkpoint of peer {self.peer_id} in Redis {why}{where}: ignored, so no input is skipped; "
            "resuming after the verified committed head or at start_offset instead, and replacing it with a "
            "signed one. Someone who can write Redis wrote it (or a version of knhk-stream before 0.2 that did "
            "not sign checkpoints)",
        )
        return None

    def _queue_unpublished(self, shard: int, head_cycle: int | None) -> None:
        """Queue the committed roots after the published mark up to `head_cycle` (verified) for publishing."""
        if head_cycle is None:
            return
        published = get_published(self.store, shard)
        if published is not None and published >= head_cycle:
            return
        start = None if published is None else published + 1
        found: list[CommittedEntry] = []
        # stored entries checked in an earlier round (the mark lags while peers take turns): not checked again
        checked = self._checked_stored.setdefault(shard, {})
        for c in [c for c in checked if start is not None and c < start]:
            del checked[c]
        for cycle, raw in self.store.raw_range(shard, start, head_cycle):  # all read before anything is queued
            try:
                ce = CommittedEntry.from_mapping(raw)
            except (ValueError, KeyError, TypeError):
                break  # the mark cannot move over an entry that cannot be read
            if checked.get(cycle) != ce:
                if ce.entry.cycle != cycle or committed_problem(self.settings, ce, shard) is not None:
                    break
                checked[cycle] = ce
                while len(checked) > MAX_REPUBLISH:
                    del checked[next(iter(checked))]
            found.append(ce)
            if len(found) >= MAX_REPUBLISH:
                break
        prior = published
        queued = {(c.entry.shard, c.entry.cycle) for c in self._to_publish}
        for ce in found:
            if (shard, ce.entry.cycle) not in queued:
                self._to_publish.append(ce)
            self._prior[(shard, ce.entry.cycle)] = prior
            prior = ce.entry.cycle

    # -- deltas and own votes ---------------------------------------------------------------

    def process(self, records: Iterable[Record]) -> list[Vote]:
        """Delta records in offset order per shard; returns the votes of the beats they close."""
        return list(self.process_iter(records))

    def process_iter(self, records: Iterable[Record]) -> Iterator[Vote]:
        """`process`, yielding each vote as soon as its beat closes: a caller that produces it at once does
        not hold it back while the rest of a large batch (a backlog) is processed. Exhaust it."""
        feed = self.engine.feed
        held = set(self.engine.shards).difference(self._halted)
        rejected: dict[str, int] = {}
        revotes, self._revotes = self._revotes, []
        yield from revotes
        n, made = 0, len(revotes)
        read: set[int] = set()  # the shards of this batch (their delivery lag, below)
        for r in records:
            shard = r.partition
            if shard not in held:
                continue
            read.add(shard)
            marker = is_marker(r.headers, r.value)
            vote = feed(shard, r.offset, r.timestamp_ms, marker, r.value)
            if not marker:
                n += 1
            if vote is not None:
                made += 1
                self.consensus.read_up_to(shard, vote.entry.cycle)
                beat = self.engine.last_beat(shard)
                if beat is not None:
                    counted = self._rejected.setdefault(shard, RejectedCount(now_ms()))
                    counted.receipts += len(beat.receipts)
                    for code, k in rejections_by_code(beat.receipts).items():
                        rejected[code] = rejected.get(code, 0) + k
                        counted.by_code[code] = counted.by_code.get(code, 0) + k
                yield vote
        for shard in held:  # once a batch: an open beat overshoots its bound by at most one batch
            self._check_open_beat(shard)
        if n < HASH_AHEAD_BELOW:
            for shard in read:
                self.engine.hash_ahead(shard)
        at = now_ms()
        for shard in read:
            t = self.engine.last_tick_ms(shard)  # T, not the record's own timestamp, which may lie far back
            if t is None:
                continue
            lag = self._lag.get(shard)
            if lag is None:
                self._lag[shard] = DeliveryLag(at - t)
            else:
                lag.note(at - t)
        self.stats["deltas"] += n
        self.stats["votes"] += made
        self.telemetry.deltas_processed(n, rejected)

    def _check_open_beat(self, shard: int) -> bool:
        """Whether the shard's open beat holds more deltas than its bound (then the shard halts)."""
        cycle, first, deltas = self.engine.open_beat(shard)
        lim = self.limits
        if deltas <= lim.max_open_beat_deltas:
            return False
        assert cycle is not None
        starts = cycle * beat_ms(self.settings.tick_ms)
        ahead = starts - now_ms()
        when = f"{ahead / 86_400_000:,.0f} days in the future" if ahead > 86_400_000 else f"{-ahead} ms ago"
        reason = (
            f"the open beat of cycle {cycle} (from offset {first}) holds {deltas} deltas, more than the bound "
            f"(--max-open-beat-deltas {lim.max_open_beat_deltas}); that beat starts {when}. A record stamped far in "
            "the future keeps a beat open until a record of a later cycle comes. This shard stops reading here, "
            "skipping nothing: check that the deltas topic uses message.timestamp.type=LogAppendTime and the "
            f"producers' clocks, and look at offset {first}. After a restart it resumes at its last beat boundary "
            "and stops here again unless the bound is raised"
        )
        self._halted[shard] = reason
        self._new_halts.append(shard)
        log.error("SHARD %d HALTED: %s", shard, reason)
        self._alarm(shard, "halted", reason, logged=True)
        self.telemetry.stalled(shard)
        return True

    def take_halted(self) -> list[int]:
        """Shards that stopped reading since the last call: the caller may pause them (nothing more is fed)."""
        out, self._new_halts = self._new_halts, []
        return out

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
            cp = self._signed(
                shard,
                Checkpoint(point.next_offset, point.prev_entry_hash, point.last_cycle, self._votes_hint(shard),
                           now_ms()),
            )  # fmt: skip
            if self._redis(self._save_checkpoint, shard, cp) is REDIS_DOWN:
                return False
            del self._checkpoint_due[shard]
        return True

    def _signed(self, shard: int, cp: Checkpoint) -> Checkpoint:
        epoch = self.settings.epoch_for(cp.cycle if cp.cycle is not None else 0)
        pub = epoch.public_keys.get(self.peer_id)
        key = self.engine.keys.get(pub) if pub is not None else None
        if key is None:
            key = next(iter(self.engine.keys.values()))
        message = checkpoint_message(self.settings.chain_id, self.peer_id, shard, cp)
        return replace(cp, signature=sign_message(key, message))

    def _save_checkpoint(self, shard: int, cp: Checkpoint) -> bool:
        """Write a signed checkpoint; one that does not verify never stands in the way, and a refusal is said."""
        replace_sig = self._forged_checkpoint.get(shard)
        if save_checkpoint(self.store, self.peer_id, shard, cp, replace_sig):
            if replace_sig is not None:
                self._forged_checkpoint.pop(shard, None)
                log.warning("shard %d: replaced the checkpoint that did not verify with this peer's own", shard)
            return True
        try:
            stored = load_checkpoint(self.store, self.peer_id, shard)
        except ValueError:
            stored = None
        if stored is not None and checkpoint_verifies(
            self.settings.chain_id, self.peer_id, shard, stored, self.engine.keys
        ):
            log.warning(
                "shard %d: checkpoint at offset %d not written: this peer's signed checkpoint in Redis is further "
                "on (offset %d), written by another worker of this peer that holds the shard now",
                shard,
                cp.next_offset,
                stored.next_offset,
            )
            return False
        self._forged_checkpoint[shard] = stored_checkpoint_signature(self.store, self.peer_id, shard) or ""
        self._alarm(
            shard,
            "forged_checkpoint",
            f"a checkpoint of peer {self.peer_id} that does not verify under its key (offset "
            f"{stored.next_offset if stored else '?'}) stood in the way of its own at offset {cp.next_offset}: "
            "replaced. Someone who can write Redis wrote it",
        )
        return save_checkpoint(self.store, self.peer_id, shard, cp, self._forged_checkpoint.pop(shard))

    def _votes_hint(self, shard: int) -> int:
        """Lowest votes offset that may still matter: votes for cycles after the head, held or dropped
        by the bounds (read again after a restart too); never a flood beyond the window."""
        offsets = list(self._vote_offsets.get(shard, {}).values())
        offsets += [d.offset for d in self._may_count(shard).values()]
        return min(offsets) if offsets else self._votes_pos.get(shard, 0)

    # -- everyone's votes and commits -------------------------------------------------------

    def vote_record(self, vote: Vote) -> Outbound:
        """`vote_out(vote)`, remembered: read back byte for byte, this peer's own vote is neither decoded
        nor verified again (a record that differs in any byte is decoded and verified like any other)."""
        out = vote_out(vote)
        assert out.value is not None
        own = self._own_votes
        own[out.value] = vote
        if len(own) > MAX_OWN_VOTES:  # never read back (a revoked shard, a lost record): oldest first
            del own[next(iter(own))]
        return out

    def on_vote_records(self, records: Iterable[Record]) -> None:
        """Records read from the votes topic (of held shards; others are ignored).

        A record that does not decode, is out of range or names another chain or
        shard, and a vote that does not count (bad signature, unknown peer, wrong
        epoch, over its peer's share) is counted and logged with its offset, and
        skipped: nothing on the topic can stop this peer.
        """
        for r in records:
            shard = r.partition
            if shard not in self._votes_pos:
                continue
            self._votes_pos[shard] = r.offset + 1
            mine = self._own_votes.pop(r.value, None) if r.value else None
            if mine is not None and mine.entry.shard == shard:
                vote, status = mine, self.consensus.add(mine, verified=True)
            else:
                try:
                    vote = decode_vote(r.value)
                except WireError as e:
                    self._bad_record("votes", shard, r.offset, str(e))
                    continue
                if vote.entry.chain_id != self.settings.chain_id or vote.entry.shard != shard:
                    why = f"a vote for chain {vote.entry.chain_id!r} shard {vote.entry.shard}, not this chain's shard"
                    self._bad_record("votes", shard, r.offset, why)
                    continue
                status = self.consensus.add(vote)
            if status in (VoteStatus.COUNTED, VoteStatus.QUORUM):
                self._vote_offsets.setdefault(shard, {}).setdefault(vote.entry.cycle, r.offset)
                again = self._reread.get(shard)
                if again is not None and r.offset < again.end:
                    again.counted.add(vote.peer_id)
            elif status in (VoteStatus.OUT_OF_WINDOW, VoteStatus.OVER_SHARE):
                self.stats["votes_dropped"] += 1
                self._note_dropped(shard, vote, r.offset, status)
            elif status in (VoteStatus.BAD_SIGNATURE, VoteStatus.UNKNOWN_PEER, VoteStatus.WRONG_EPOCH):
                why = f"vote for cycle {vote.entry.cycle} from {vote.peer_id!r}: {status.value}"
                self._bad_record("votes", shard, r.offset, why)
        for ev in self.consensus.collector.take_equivocations():
            self._report_equivocation(ev)

    def _note_dropped(self, shard: int, vote: Vote, offset: int, status: VoteStatus) -> None:
        """Remember where votes dropped by the bounds lie, to read them again once they can count.

        Kept per peer and bound (window, share): a far-future flood does not widen the range of
        an honest peer's over-share votes. A vote read again and dropped again is remembered only
        if a vote of its peer counted in that reading (its share is moving): a flood that can
        never count is read twice, not forever.
        """
        spots = self._dropped.setdefault(shard, {})
        key = (vote.peer_id, status)
        cycle = vote.entry.cycle
        was = spots.get(key)
        if was is not None:
            spots[key] = _Dropped(min(was.offset, offset), min(was.low, cycle), max(was.high, cycle))
            return
        again = self._reread.get(shard)
        if again is not None and offset < again.end and vote.peer_id not in again.counted:
            return
        spots[key] = _Dropped(offset, cycle, cycle)

    def _may_count(self, shard: int) -> dict[tuple[str, VoteStatus], _Dropped]:
        """Dropped votes on the shard that could still count: some in the window and after the head."""
        spots = self._dropped.get(shard)
        if not spots:
            return {}
        view = self.consensus.view(shard)
        head = view.head_cycle if view.head_cycle is not None else -1
        return {key: d for key, d in spots.items() if d.high > head and in_window(d.low, view.horizon)}

    def _rereadable(self, shard: int) -> dict[tuple[str, VoteStatus], _Dropped]:
        """Dropped votes that could count now: `_may_count`, and room in their peer's share."""
        room = MAX_HELD_PER_PEER // 2
        held = self.consensus.collector.held_by
        return {key: d for key, d in self._may_count(shard).items() if held(shard, key[0]) < room}

    def votes_to_reread(self) -> dict[int, int]:
        """Shards whose votes partition the caller should read again, and from which offset.

        Votes dropped by the protocol's bounds (the 64-cycle window, a peer's share of held
        votes) are what a quorum may need once the head moves: a backlog of hundreds of beats
        (a Redis outage, peers paused) would otherwise stall every shard. At most once per
        REREAD_S a shard; the caller seeks there and calls `reading_votes_again`.
        """
        now = time.monotonic()
        out: dict[int, int] = {}
        for shard in list(self._dropped):
            again = self._reread.get(shard)
            if again is not None and now - again.at < REREAD_S:
                continue
            ready = self._rereadable(shard)
            if ready:
                out[shard] = min(d.offset for d in ready.values())
        return out

    def reading_votes_again(self, shard: int, offset: int) -> None:
        """The caller went back to `offset` on the shard's votes partition (see `votes_to_reread`)."""
        ready = [key for key, d in self._rereadable(shard).items() if d.offset >= offset]
        for key in ready:
            del self._dropped[shard][key]
        end = self._votes_pos.get(shard, offset)
        self._reread[shard] = _Reread(max(end, offset), time.monotonic())
        self._votes_pos[shard] = offset
        self.stats["votes_reread"] += 1
        log.info("shard %d: read the votes partition again from offset %d to %d: votes of %s were dropped "
                 "by the window or their share of held votes, and can count now", shard, offset, end,
                 ", ".join(sorted({peer for peer, _ in ready})) or "nobody")  # fmt: skip

    def _bad_record(self, topic: str, shard: int, offset: int, why: str) -> None:
        """Count a hostile record; log it with its offset (at most BAD_LOGS_PER_MINUTE a minute, then a sum)."""
        self.stats["bad_records"] += 1
        minute = int(time.monotonic() // 60)
        st = self._bad.setdefault((topic, shard), [minute, 0, 0, 0])
        st[3] += 1
        if st[0] != minute:
            if st[2]:
                log.warning("%s topic shard %d: %d more bad records skipped in the last minute", topic, shard, st[2])
            st[0], st[1], st[2] = minute, 0, 0
        if st[1] < BAD_LOGS_PER_MINUTE:
            st[1] += 1
            log.warning("%s topic shard %d offset %d: %s; skipped", topic, shard, offset, why)
        else:
            st[2] += 1

    def _report_equivocation(self, ev: Equivocation) -> None:
        log.error(
            "EQUIVOCATION: peer %s signed two successors of entry %s on shard %d (cycles %d and %d): %s and %s",
            ev.peer_id,
            ev.prev_entry_hash.hex()[:16],
            ev.shard,
            ev.first.entry.cycle,
            ev.second.entry.cycle,
            ev.first.entry_hash.hex(),
            ev.second.entry_hash.hex(),
        )
        evidence = evidence_of(ev, self.peer_id, now_ms())
        self._redis(add_evidence, self.store, ev.shard, evidence)
        self._evidence_due.append(evidence_out(evidence))
        del self._evidence_due[:-MAX_EVIDENCE_DUE]
        self.telemetry.equivocation(ev.shard, ev.peer_id)

    def evidence_due(self) -> list[Outbound]:
        """Evidence records for the evidence topic (append-only: Redis can be wiped, the topic cannot)."""
        out, self._evidence_due = self._evidence_due, []
        return out

    def evidence_failed(self, records: Iterable[Outbound]) -> None:
        """Evidence records the broker did not take: they come out of the next `evidence_due()`."""
        self._evidence_due = [*records, *self._evidence_due][-MAX_EVIDENCE_DUE:]

    def commit_ready(self) -> list[CommittedEntry]:
        """Append every quorum that follows a held shard's head; returns the roots to publish.

        Also retries checkpoints that waited for Redis, compares the committed heads
        in Redis with this peer's (a head that moved back is re-appended), and
        republishes committed roots that stayed unpublished. The list holds the
        entries this node wrote (in cycle order per shard), after any found unpublished.
        """
        out, self._to_publish = self._to_publish, []
        if self._checkpoint_due and not self.flush_checkpoints():
            return out
        for shard in self.engine.shards:  # the quorums first: the rounds of checks below wait, they don't
            if shard in self._blocked:
                continue
            if not self._commit_shard(shard, out):
                return out  # Redis is down: the other shards wait too
            self._note_stall(shard)
        now = time.monotonic()
        if now - self._epochs_checked > EPOCH_POLL_S:
            self._epochs_checked = now
            self.refresh_epochs()
        if self._acked and now - self._marks_tried > 1:
            self._marks_tried = now
            self._move_marks(list(self._acked))
        if now - self._heads_checked > self.limits.head_check_s:
            self._heads_checked = now
            for shard in self.engine.shards:
                # A head that does not verify may be a bad copy of this peer's own entries, written there
                # before the quorum's append: appending them (the Lua script arbitrates) writes the
                # verified copies over the bad ones, and the head verifies again.
                if self._blocked_kind.get(shard) == "unverified_head" and not self._commit_shard(shard, out):
                    return out
                if self._check_head(shard) is REDIS_DOWN:
                    return out
        if now - self._republished > self.limits.republish_s:
            self._republished = now
            self._republish()
            out, self._to_publish = out + self._to_publish, []
        if now - self._health_written > self.limits.health_s:
            self._health_written = now
            self._write_health(self.engine.shards)
        return out

    def _commit_shard(self, shard: int, out: list[CommittedEntry]) -> bool:
        """Commit what is ready on one shard, in this peer's turns (`_my_part`); False only when Redis is
        unreachable. Two or more consecutive entries go in one atomic Lua call (`_append_run`)."""
        while run := self.consensus.ready_run(shard, MAX_APPEND_RUN):
            run = self._my_part(shard, run)
            if not run:
                return True  # another peer's turn: it appends first
            head = self.consensus.views[shard].head_cycle
            ok = self._commit_one_by_one(shard, out, 1) if len(run) == 1 else self._append_run(shard, run, out)
            if not ok:
                return False
            if self.consensus.views[shard].head_cycle == head:
                return True  # refused and reported: tried again at the next step
        return True

    def _append_run(self, shard: int, run: Sequence[Ready], out: list[CommittedEntry]) -> bool:
        """Append consecutive ready entries in one call; should the run be refused (a fork or a hole
        anywhere writes nothing), append them one by one, which finds and reports what is wrong."""
        at = now_ms()
        ces = [CommittedEntry.from_quorum(r.entry, r.votes, self.peer_id, at) for r in run]
        try:
            written = self.store.append_run(ces)
        except (NotNextError, ForkError):
            return self._commit_one_by_one(shard, out, len(ces))
        except REDIS_ERRORS as e:
            self._redis_unavailable(e)
            return False
        self._redis_available()
        for ce, w in zip(ces, written, strict=True):
            if isinstance(w, StoredCopy):
                self._check_stored_copy(shard, ce, w)
            self._appended(shard, ce, w is True, self.consensus.views[shard].head_cycle, out)
        return True

    def _my_part(self, shard: int, run: list[Ready]) -> list[Ready]:
        """What of the ready run this peer appends now: all of it at beats of TURNS_BELOW_BEAT_MS or more;
        else up to its last turn as first appender in it, or all of it once the oldest has waited for
        another (dead, slow) first appender; else nothing.
        Any peer may append and the Lua script stays the arbiter: the turns spare the others a round
        trip a beat (they find the entries there when they append later, in one call)."""
        if beat_ms(self.settings.tick_ms) >= TURNS_BELOW_BEAT_MS:
            return run
        mine = [i for i, r in enumerate(run) if self._first_appender(r.entry.cycle) == self.peer_id]
        if mine:
            self._ready_since.pop(shard, None)
            return run[: mine[-1] + 1]
        oldest = run[0].entry.cycle
        since = self._ready_since.get(shard)
        t = time.monotonic()
        if since is None or since[0] != oldest:
            self._ready_since[shard] = since = (oldest, t)
        low, high = FIRST_APPENDER_WAIT_S
        if t - since[1] < min(high, max(low, 2 * beat_ms(self.settings.tick_ms) / 1000)):
            return []
        self._ready_since.pop(shard, None)
        return run

    def _first_appender(self, cycle: int) -> str:
        """The peer that appends `cycle` first: the epoch's peer ids in order, by turns (cycle mod n)."""
        epoch = self.settings.epoch_for(cycle)
        turns = self._turns.get(epoch.number)
        if turns is None:
            turns = self._turns[epoch.number] = tuple(sorted(epoch.public_keys))
        return turns[cycle % len(turns)]

    def _commit_one_by_one(self, shard: int, out: list[CommittedEntry], limit: int | None = None) -> bool:
        """Commit what is ready on one shard (at most `limit` entries), an append per entry; False only
        when Redis is unreachable."""
        tries = 0
        while (limit is None or tries < limit) and (ready := self.consensus.next_ready(shard)) is not None:
            tries += 1
            ce = CommittedEntry.from_quorum(ready.entry, ready.votes, self.peer_id, now_ms())
            prior = self.consensus.views[shard].head_cycle
            try:
                written = self.store.append(ce)
            except NotNextError:
                moved = self._check_head(shard)
                if moved is REDIS_DOWN:
                    return False
                if moved:
                    continue  # the head in Redis is further on (verified): go on from there
                if shard not in self._blocked:
                    log.error("shard %d: cannot commit cycle %d: it does not follow the committed head in Redis",
                              shard, ce.entry.cycle)  # fmt: skip
                return True
            except ForkError as e:
                log.critical("shard %d: %s", shard, e)
                self._redis(set_stall, self.store, shard, ce.entry.cycle, f"fork refused: {e}", now_ms())
                return True
            except REDIS_ERRORS as e:
                self._redis_unavailable(e)
                return False
            self._redis_available()
            if isinstance(written, StoredCopy):
                self._check_stored_copy(shard, ce, written)
            self._appended(shard, ce, written is True, prior, out)
        return True

    def _check_stored_copy(self, shard: int, ce: CommittedEntry, found: StoredCopy) -> None:
        """An append found this peer's entry at its cycle, as another copy. Another quorum is fine; a copy
        that does not verify (written there first by someone who can write Redis) is not trusted: it is
        written over with this peer's verified copy, loudly, so that the stored chain verifies."""
        e = ce.entry
        if found.votes is None:
            why = "a hashed field differs from the entry's, so it does not hash to its entry_hash"
        else:
            try:
                votes = votes_from_json(found.votes)
            except ValueError as err:
                why = f"its votes cannot be read ({err})"
            else:
                q = check_quorum(ce.entry_hash, votes, self.settings.epoch_for(e.cycle), verified=ce.votes)
                if q.valid:
                    return
                why = "its votes are no valid quorum proof: " + "; ".join(q.problems)
        repaired = self._redis(self.store.repair, ce)
        self.stats["copies_repaired"] = self.stats.get("copies_repaired", 0) + (repaired is True)
        done = (
            "written over with this peer's verified copy"
            if repaired is True
            else "NOT written over (Redis did not answer, or the cycle changed meanwhile): `chain verify` shows it"
        )
        self._alarm(shard, "unverified_copy", f"cycle {e.cycle}: the entry stored in Redis has this peer's "
                    f"entry hash, but {why}. Someone who can write Redis wrote it before the quorum's append; "
                    f"{done}")  # fmt: skip

    def _appended(self, shard: int, ce: CommittedEntry, written: bool, prior: int | None,
                  out: list[CommittedEntry]) -> None:  # fmt: skip
        """After an append of `ce` (by this peer when `written`, else found there): remember it, queue its
        root to publish if this peer wrote it, and move the head on."""
        self._remember(ce)
        if written:
            out.append(ce)
            self._prior[(shard, ce.entry.cycle)] = prior
            self._committed(ce)
        self._advance(shard, ce.entry.cycle, ce.entry_hash)

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

    def _remember(self, ce: CommittedEntry) -> None:
        """Keep a verified committed entry, to re-append it should it be deleted from Redis."""
        recent = self._recent.setdefault(ce.entry.shard, {})
        recent[ce.entry.cycle] = ce
        while len(recent) > self.limits.recent_entries:
            del recent[next(iter(recent))]

    # -- the committed head in Redis against this peer's -----------------------------------

    def _check_head(self, shard: int) -> bool | Literal[Unreachable.REDIS_DOWN]:
        """Compare the head in Redis with this peer's; True when a verified head further on was adopted.

        A head that does not verify is never adopted (the shard is blocked, loudly); a
        head behind this peer's (entries deleted from Redis) raises an alarm and the
        missing entries are re-appended, verified, rather than built on.
        """
        view = self.consensus.view(shard)
        quick = self._redis(self._head_is, shard, view.head_cycle, view.head_hash)
        if quick is REDIS_DOWN:
            return REDIS_DOWN
        if quick:
            self._unblock(shard)
            return False
        got = self._redis(read_head_entry, self.store, self.settings, shard)
        if got is REDIS_DOWN:
            return REDIS_DOWN
        head, problem = got
        if problem is not None and self.refresh_epochs():  # signed in an epoch applied since this peer looked
            return self._check_head(shard)
        if problem is not None:
            self._block(shard, "unverified_head", f"{problem}. It is not adopted: this peer builds on nothing "
                        f"after it until the head in Redis verifies again; {UNVERIFIED_HEAD_ADVICE}")  # fmt: skip
            return False
        mine = view.head_cycle
        if head is not None and (mine is None or head.entry.cycle > mine):
            self._unblock(shard)
            self._remember(head)
            self._advance(shard, head.entry.cycle, head.entry_hash)
            return True
        if head is not None and head.entry.cycle == mine:
            if head.entry_hash == view.head_hash:
                self._unblock(shard)
                return False
            self._block(shard, "fork", f"the committed head in Redis at cycle {mine} is entry "
                        f"{head.entry_hash.hex()}, but this peer saw entry {view.head_hash.hex()} committed there: "
                        "two quorums for one cycle (more than threshold - 1 peers are faulty). Nothing more is "
                        "committed on this shard")  # fmt: skip
            return False
        if mine is None:
            return False
        self._head_moved_back(shard, head)
        return False

    def _head_is(self, shard: int, cycle: int | None, entry_hash: bytes) -> bool:
        """Whether the head in Redis is exactly this peer's (one read; the usual case)."""
        try:
            head = self.store.head(shard)
        except ValueError:
            return False
        return head is not None and cycle is not None and (head.cycle, head.entry_hash) == (cycle, entry_hash)

    def _head_moved_back(self, shard: int, head: CommittedEntry | None) -> None:
        view = self.consensus.view(shard)
        where = "gone (no head)" if head is None else f"cycle {head.entry.cycle}"
        self._alarm(
            shard,
            "head_moved_back",
            f"HEAD MOVED BACK: the committed head in Redis is {where}, but this peer saw the chain committed up to "
            f"cycle {view.head_cycle}: entries were deleted from Redis (truncation). Re-appending the missing "
            "entries (each quorum verified) rather than building on the shortened chain; check who can write Redis",
        )
        self._repair(shard, head)

    def _repair(self, shard: int, base: CommittedEntry | None) -> None:
        """Re-append the committed entries from `base` (None: genesis) up to this peer's head."""
        view = self.consensus.view(shard)
        base_hash = base.entry_hash if base is not None else ZERO_HASH
        by_hash = {ce.entry_hash: ce for ce in self._recent.get(shard, {}).values()}
        chain = self._walk(by_hash, view.head_hash, base_hash)
        if chain is None and self.roots_source is not None:
            last = self._roots_read.get(shard)
            if last is None or time.monotonic() - last > self.limits.roots_retry_s:
                self._roots_read[shard] = time.monotonic()
                by_hash.update(self._roots_of(shard, base, view.head_cycle))
                chain = self._walk(by_hash, view.head_hash, base_hash)
        if chain is None:
            self._block(shard, "head_moved_back", f"cannot re-append the entries after {base_hash.hex()[:16]} up "
                        f"to cycle {view.head_cycle}: they are neither in this peer's memory nor on the roots topic. "
                        "Nothing more is committed on this shard until they are restored (`knhk-stream chain "
                        "import` of an export)")  # fmt: skip
            return
        result = self._redis(self._append_verified, shard, chain)
        if result is REDIS_DOWN or result is None:
            return
        written = result.appended
        self.stats["reappended"] += written
        self._unblock(shard)
        by = f"re-appended {written} deleted entries" if written else "the deleted entries were re-appended (by others)"
        log.warning("shard %d: %s (cycles %d..%d); the committed head is cycle %d again",
                    shard, by, chain[0].entry.cycle, chain[-1].entry.cycle, view.head_cycle)  # fmt: skip

    @staticmethod
    def _walk(by_hash: dict[bytes, CommittedEntry], top: bytes, base: bytes) -> list[CommittedEntry] | None:
        """The entries from just after `base` up to `top`, oldest first, if `by_hash` holds the whole way."""
        chain: list[CommittedEntry] = []
        h = top
        while h != base:
            ce = by_hash.get(h)
            if ce is None:
                return None
            chain.append(ce)
            h = ce.entry.prev_entry_hash
        chain.reverse()
        return chain

    def _append_verified(self, shard: int, chain: list[CommittedEntry]) -> RebuildResult | None:
        """Append what Redis lacks of a verified chain linked from genesis or from the Redis head
        (`rebuild_shard`, as `chain rebuild` does); None when Redis refused it: the shard is blocked, loudly,
        and a conflicting chain is never written over. Redis errors go to the caller."""
        try:
            return rebuild_shard(self.store, shard, chain)
        except ConflictingChain as e:
            self._blocked_until_retaken.add(shard)
            self._block(shard, "conflicting_chain", f"{e}. Nothing is written over it, and nothing more is "
                        "committed on this shard until it is taken again: find out which history is right "
                        "(`knhk-stream chain verify --bootstrap ...` compares Redis with the roots topic), then "
                        "restart the workers")  # fmt: skip
        except (NotNextError, ForkError) as e:
            self._block(shard, "head_moved_back", f"re-appending was refused ({e}); the chain in Redis changed "
                        "meanwhile: tried again shortly")  # fmt: skip
        return None

    def _restore_from_roots(self, shard: int) -> None:
        """Before resuming a shard: restore from the roots topic (every root verified) what Redis lost of its
        chain, so that a peer never starts a new genesis, or builds on an older head, where the roots topic
        proves the chain went further (Redis restarted without persistence, was flushed, or an old backup).

        Cost in the usual case (Redis not behind): one fetch for the end of the roots partition and its
        newest ROOTS_TAIL records (the worker reads them for all the shards it takes at once), one read of the
        Redis head and one entry hash from Redis. The whole partition
        is read (and every root in it verified) only when that tail proves the chain went further than Redis,
        disagrees with it, or holds no valid root (a new chain: its partition is empty). Redis errors go to
        the caller (`assign` waits for Redis and tries again).
        """
        if self.roots_source is None:
            return
        tail = self._read_roots(shard, ROOTS_TAIL)  # before the head: a root is published only after its append
        try:
            head = self.store.head(shard)
        except ValueError:
            return  # an unreadable head: `_resume` blocks the shard on it
        whole = len(tail) < ROOTS_TAIL  # the tail is the whole partition
        newest = max(self._roots_of(shard, None, None, tail).values(), key=lambda ce: ce.entry.cycle, default=None)
        if newest is not None and head is not None and newest.entry.cycle <= head.cycle:
            c = newest.entry.cycle
            if self.store.entry_hashes(shard, [c]).get(c) == newest.entry_hash:
                return  # Redis holds the newest root
        if newest is None and whole:
            return  # nothing committed yet (or nothing valid on the topic)
        chain = linked_chain(self._roots_of(shard, None, None, tail if whole else None).values())
        for finding in chain.findings:
            log.warning("shard %d: on the roots topic: %s", shard, finding)
        if not chain.entries:
            return
        result = self._append_verified(shard, chain.entries)
        top = chain.entries[-1].entry.cycle
        if result is None or (head is not None and top <= head.cycle):
            return
        held = "no chain" if head is None else f"the chain up to cycle {head.cycle}"
        done = (f"restored {result.appended} entries from the roots topic" if result.appended else
                "another peer restored the missing entries from the roots topic meanwhile")  # fmt: skip
        message = f"Redis held {held} but the roots topic proves cycle {top}: {done} before resuming"
        log.warning("shard %d: %s", shard, message)
        self.stats["restored"] += result.appended
        self._alarm(shard, "restored_from_roots", f"{message}. Redis lost data (a restart without persistence, "
                    "a flush, an old backup): turn on persistence (appendonly yes)", logged=True)  # fmt: skip

    def _read_roots(self, shard: int, last: int | None = None) -> list[bytes | None]:
        """The shard's roots-topic records (only the newest `last` unless None); none when it cannot be read."""
        assert self.roots_source is not None
        try:
            return list(self.roots_source(shard, last))
        except Interrupt:
            raise
        except Exception as e:  # the roots topic may be unreachable: tried again later
            log.error("shard %d: cannot read the roots topic to restore entries Redis lost: %s", shard, e)
            return []

    def _roots_of(
        self, shard: int, base: CommittedEntry | None, upto: int | None, values: list[bytes | None] | None = None
    ) -> dict[bytes, CommittedEntry]:
        """Valid roots of the shard after `base` up to `upto`, by entry hash, among `values` (default: the
        whole roots-topic partition)."""
        after = base.entry.cycle if base is not None else -1
        found: dict[bytes, CommittedEntry] = {}
        invalid = 0
        for value in self._read_roots(shard) if values is None else values:
            try:
                ce = decode_root(value)
            except WireError:
                invalid += 1
                continue
            c = ce.entry.cycle
            if not after < c <= (upto if upto is not None else c) or ce.entry_hash in found:
                continue
            if committed_problem(self.settings, ce, shard) is None:
                found[ce.entry_hash] = ce
            else:
                invalid += 1
        log.info("shard %d: %d valid roots on the roots topic after cycle %d (%d records not valid)",
                 shard, len(found), after, invalid)  # fmt: skip
        return found

    def _block(self, shard: int, kind: str, reason: str) -> None:
        if self._blocked.get(shard) != reason:
            log.critical("shard %d: %s", shard, reason)
        self._blocked[shard] = reason
        self._blocked_kind[shard] = kind
        self._alarm(shard, kind, reason, logged=True)

    def _unblock(self, shard: int) -> None:
        if shard in self._blocked_until_retaken:
            return  # a conflicting chain: only taking the shard again checks it again
        self._blocked_kind.pop(shard, None)
        if self._blocked.pop(shard, None) is not None:
            log.warning("shard %d: the committed head in Redis verifies and follows this peer's again", shard)

    # -- this peer's report (status) --------------------------------------------------------

    def _alarm(self, shard: int, kind: str, message: str, logged: bool = False) -> None:
        """Raise an alarm: log (unless `logged`), metric, and this peer's report that `status` reads."""
        alarms = self._alarms.setdefault(shard, [])
        if alarms and alarms[-1]["kind"] == kind and alarms[-1]["message"] == message:
            alarms[-1]["at_ms"] = now_ms()
            return
        if not logged:
            log.critical("shard %d: %s", shard, message)
        alarms.append({"kind": kind, "message": message, "at_ms": now_ms()})
        del alarms[:-MAX_ALARMS]
        self.telemetry.alarm(shard, kind)
        self._health_written = 0.0  # report it at the next step

    def health(self, shard: int) -> dict[str, Any]:
        """This peer's report on a held shard (what `status` shows per peer)."""
        t = now_ms()
        alarms = [a for a in self._alarms.get(shard, []) if t - a["at_ms"] < ALARM_KEEP_MS]
        self._alarms[shard] = alarms
        cycle, first, deltas = self.engine.open_beat(shard) if shard in self.engine.shards else (None, None, 0)
        bad = {topic: st[3] for (topic, s), st in self._bad.items() if s == shard}
        return {
            "at_ms": t,
            "halted": self._halted.get(shard),
            "blocked": self._blocked.get(shard),
            "alarms": alarms,
            "bad_records": bad,
            "held_votes": self.consensus.collector.held_votes(shard),
            "open_beat": {"cycle": cycle, "first_offset": first, "deltas": deltas},
            "rejected": asdict(self._rejected.get(shard, RejectedCount(t))),
        }

    def _write_health(self, shards: Iterable[int]) -> None:
        for shard in shards:
            if shard in self.engine.shards and self._redis(set_health, self.store, shard, self.peer_id,
                                                           self.health(shard)) is REDIS_DOWN:  # fmt: skip
                return

    # -- publishing roots -------------------------------------------------------------------

    def roots_delivered(self, entries: Iterable[CommittedEntry]) -> None:
        """Roots the broker acknowledged: move the shard's "published up to" mark.

        The mark only moves over an unbroken run of acknowledged roots from where it
        stands, this node's and other peers' alike (Redis keeps the acknowledgements
        beyond it), so a root whose appender died (or never publishes) is published
        again by every peer once it has stayed unpublished for `republish_s`: the
        protocol's at-least-once rule. Acknowledgements Redis could not take are
        retried from `commit_ready()`.
        """
        touched = set()
        for ce in entries:
            shard, cycle = ce.entry.shard, ce.entry.cycle
            if (shard, cycle) in self._prior:
                self._acked.setdefault(shard, {})[cycle] = self._prior.pop((shard, cycle))
                touched.add(shard)
        self._move_marks(touched)

    def _republish(self) -> None:
        """Queue the roots that were committed a round ago and are still not published (withheld, or lost)."""
        for shard in self.engine.shards:
            upto = self._republish_upto.get(shard)
            self._republish_upto[shard] = self.consensus.view(shard).head_cycle
            if upto is None or shard in self._blocked:
                continue
            before = len(self._to_publish)
            if self._redis(self._queue_unpublished, shard, upto) is REDIS_DOWN:
                return
            if len(self._to_publish) > before:
                log.warning("shard %d: %d committed roots up to cycle %d were still not on the roots topic after "
                            "%.0f s (their appender did not publish them): publishing them", shard,
                            len(self._to_publish) - before, upto, self.limits.republish_s)  # fmt: skip

    def _move_marks(self, shards: Iterable[int]) -> None:
        """Hand the acknowledged roots to Redis, which moves the mark over them and over the other peers';
        kept here only while Redis does not answer."""
        for shard in shards:
            acked = self._acked.get(shard)
            if not acked:
                self._acked.pop(shard, None)
                continue
            pairs = [(prior, cycle) for cycle, prior in acked.items()]
            if self._redis(acknowledge_published, self.store, shard, pairs) is REDIS_DOWN:
                while len(acked) > MAX_WAITING_ACKS:
                    del acked[min(acked)]  # the next round of republishing covers them anyway
                return
            del self._acked[shard]

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
        self._restore_epochs(statements)
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
        log.warning(
            "adopted epoch %d (from cycle %d, %d peers, threshold %d)",
            newest.number,
            newest.from_cycle,
            len(newest.peers),
            newest.threshold,
        )
        return True

    def _restore_epochs(self, stored: list[Epoch]) -> None:
        """Store again the verified epochs this peer holds that Redis lost (a restart without persistence, a
        flush), so that peers starting later find them. HSETNX: a statement in Redis is never overwritten."""
        have = {e.number for e in stored}
        for e in self.settings.epoch_chain.epochs:
            if e.number > 0 and e.number not in have and self._redis(store_epoch, self.store, e) is True:
                log.warning("epoch %d was missing from Redis (it lost data?): stored it again from this peer's "
                            "verified epochs", e.number)  # fmt: skip

    # -- tick markers -----------------------------------------------------------------------

    def markers_due(self, at_ms: int | None = None) -> list[int]:
        """Shards whose open beat (holding deltas) is over by wall clock: write a marker into each.

        A marker is written a tick after the beat's end by this peer's clock plus the
        shard's delivery lag (`DeliveryLag`: records read that late could still close it),
        and again every beat while the beat stays open: a clock that runs ahead of the
        broker's by more than the lag shows puts the first marker into the same beat.
        The caller must produce them.
        """
        t = now_ms() if at_ms is None else at_ms
        tick = self.settings.tick_ms
        again = beat_ms(tick)
        due: list[int] = []
        for shard in self.engine.shards:
            if shard in self._halted:
                continue
            cycle, _first, deltas = self.engine.open_beat(shard)
            if cycle is None or not deltas:
                continue
            lag = self._lag.get(shard)
            if t <= beat_end_ms(cycle, tick) + tick + (lag.wait_ms if lag is not None else 0):
                continue
            last = self._marker_for.get(shard)
            if last is not None and last[0] == cycle and t - last[1] < again:
                continue
            self._marker_for[shard] = (cycle, t)
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
