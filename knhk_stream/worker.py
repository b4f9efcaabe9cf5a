"""The standalone worker: one process of one peer, wiring Kafka and Redis around the engine.

Per step: read a batch of deltas and feed the engine; publish the votes of
closed beats and, once they are on the votes topic, checkpoint (Redis) and
commit consumer offsets at those beat boundaries; read votes of the shards
held; append every quorum that follows the head (Lua, atomic) and publish
the committed root; write tick markers into shards whose open beat is over.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .chain import record_key
from .committed import CommittedEntry
from .consensus import Consensus
from .peer import MARKER_HEADER, PeerEngine, ResumePoint, is_marker
from .quorum import Vote, VoteStatus
from .receipts import rejections_by_code
from .settings import ChainSettings
from .store import (
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
from .telemetry import Telemetry
from .topics import Topics, load_topics
from .wire import WireError, decode_vote, encode_root, encode_vote

log = logging.getLogger("knhk_stream.worker")
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class WorkerOptions:
    bootstrap: str
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "knhk"
    topics: Topics = field(default_factory=load_topics)
    kafka_config: dict[str, str] = field(default_factory=dict)
    group_id: str | None = None  # default: knhk.{chain_id}.{peer_id}
    session_timeout_ms: int = 10_000
    markers: bool = True
    batch: int = 5000


class Worker:
    """One worker process of one peer. Several with the same peer id share its shards."""

    def __init__(
        self,
        settings: ChainSettings,
        peer_id: str,
        key: Ed25519PrivateKey,
        options: WorkerOptions,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.peer_id = peer_id
        self.opts = options
        self.engine = PeerEngine(settings, peer_id, key)
        self.consensus = Consensus(settings.public_keys, settings.threshold)
        self.store = LockchainStore.from_url(
            options.redis_url, settings.chain_id, options.prefix, socket_timeout=5, socket_connect_timeout=5
        )
        self.telemetry = telemetry or Telemetry(None)
        self.topics = options.topics
        self.group_id = options.group_id or f"knhk.{settings.chain_id}.{peer_id}"
        common: dict[str, Any] = {"bootstrap.servers": options.bootstrap, **options.kafka_config}
        self.deltas = Consumer(
            {
                **common,
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 20,
                "isolation.level": "read_committed",
                "session.timeout.ms": options.session_timeout_ms,
                "heartbeat.interval.ms": min(1000, options.session_timeout_ms // 3),
                "partition.assignment.strategy": "range",
            }
        )
        # Votes are read by assignment (the shards this worker holds), never committed.
        self.votes = Consumer(
            {
                **common,
                "group.id": f"{self.group_id}.votes.{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 20,
            }
        )
        self.producer = Producer({**common, "acks": "all", "linger.ms": 2, "enable.idempotence": True})
        self._stop = threading.Event()
        self._undelivered: list[Vote] = []
        self._failed: list[str] = []
        self._checkpoint_due: dict[int, ResumePoint] = {}
        self._vote_offsets: dict[int, dict[int, int]] = {}  # shard -> cycle -> lowest votes offset
        self._votes_pos: dict[int, int] = {}  # shard -> next votes offset to read
        self._marker_for: dict[int, int] = {}  # shard -> open cycle a marker was written for
        self._published_due: dict[int, int] = {}
        self._redis_down_since: float | None = None
        self._stalled: dict[int, int] = {}
        self.stats = {"deltas": 0, "votes": 0, "appended": 0, "markers": 0}
        self.on_commit: Callable[[CommittedEntry, float], None] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish its current step and exit (safe from a signal handler)."""
        self._stop.set()

    def run(self, until: Callable[[], bool] | None = None) -> None:
        self.deltas.subscribe(
            [self.topics.deltas.name], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )
        log.info("worker of peer %s started (group %s)", self.peer_id, self.group_id)
        try:
            while not self._stop.is_set() and not (until and until()):
                self.step()
        finally:
            self._close()

    def _close(self) -> None:
        try:
            self._deliver_votes()
        finally:
            self.deltas.close()  # revokes: checkpoints the shards held
            self.votes.close()
            self.producer.flush(10)
            self.telemetry.shutdown()
            log.info("worker of peer %s stopped", self.peer_id)

    # -- one step -------------------------------------------------------------------------

    def step(self) -> None:
        msgs = self.deltas.consume(self.opts.batch, timeout=0.05)
        if msgs:
            self._feed(msgs)
        if self._undelivered:
            self._deliver_votes()
        self._flush_checkpoints()
        self._read_votes()
        self._commit_ready()
        if self.opts.markers:
            self._write_markers()

    def _feed(self, msgs: list[Message]) -> None:
        feed = self.engine.feed
        held = set(self.engine.shards)
        rejected: dict[str, int] = {}
        n = 0
        for m in msgs:
            if m.error() is not None:
                if m.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("deltas consumer: %s", m.error())
                continue
            shard = m.partition()
            if shard not in held:
                continue
            marker = is_marker(m.headers())
            vote = feed(shard, m.offset(), m.timestamp()[1], marker, m.value())
            if not marker:
                n += 1
            if vote is not None:
                self._publish_vote(vote)
                beat = self.engine.last_beat(shard)
                if self.telemetry.enabled and beat is not None:
                    for code, k in rejections_by_code(beat.receipts).items():
                        rejected[code] = rejected.get(code, 0) + k
        self.stats["deltas"] += n
        self.telemetry.deltas_processed(n, rejected)

    def _publish_vote(self, vote: Vote) -> None:
        e = vote.entry
        self.producer.produce(
            self.topics.votes.name,
            key=record_key(e.chain_id, e.shard, e.cycle).encode(),
            value=encode_vote(vote),
            partition=e.shard,
            on_delivery=self._on_vote_delivery,
        )
        self._undelivered.append(vote)
        self.stats["votes"] += 1

    def _on_vote_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._failed.append(f"{msg.key()!r}: {err}")

    def _deliver_votes(self) -> None:
        """Wait until the votes are on the topic; only then move checkpoints and offsets."""
        while self._undelivered:
            remaining = self.producer.flush(30)
            if remaining == 0 and not self._failed:
                break
            log.error("votes not delivered (%s); retrying", self._failed or f"{remaining} in flight")
            self._failed.clear()
            votes, self._undelivered = self._undelivered, []
            for v in votes:
                self._publish_vote(v)
            time.sleep(0.5)
        offsets = []
        for vote in self._undelivered:
            point = self.engine.delivered(vote)
            self._checkpoint_due[vote.entry.shard] = point
        for shard, point in self._checkpoint_due.items():
            offsets.append(TopicPartition(self.topics.deltas.name, shard, point.next_offset))
        self._undelivered.clear()
        if offsets:
            try:
                self.deltas.commit(offsets=offsets, asynchronous=True)
            except Exception as e:  # a commit during a rebalance may fail; the checkpoint rules
                log.warning("offset commit failed: %s", e)
        for shard, cycle in self._published_due.items():
            self._redis(set_published, self.store, shard, cycle)
        self._published_due.clear()

    def _flush_checkpoints(self) -> None:
        for shard in list(self._checkpoint_due):
            point = self._checkpoint_due[shard]
            cp = Checkpoint(
                point.next_offset, point.prev_entry_hash, point.last_cycle, self._votes_hint(shard), now_ms()
            )
            if self._redis(save_checkpoint, self.store, self.peer_id, shard, cp) is not False:
                del self._checkpoint_due[shard]

    def _votes_hint(self, shard: int) -> int:
        """Lowest votes offset that may still matter: votes for cycles after the head."""
        pending = self._vote_offsets.get(shard)
        if pending:
            return min(pending.values())
        return self._votes_pos.get(shard, 0)

    # -- votes and commits ----------------------------------------------------------------

    def _read_votes(self) -> None:
        msgs = self.votes.consume(10_000, timeout=0)
        for m in msgs:
            if m.error() is not None:
                continue
            shard = m.partition()
            self._votes_pos[shard] = m.offset() + 1
            try:
                vote = decode_vote(m.value())
            except WireError as e:
                log.warning("votes topic shard %d offset %d: %s; ignored", shard, m.offset(), e)
                continue
            if vote.entry.chain_id != self.settings.chain_id or vote.entry.shard != shard:
                log.warning(
                    "vote at votes offset %d names chain %r shard %d; ignored",
                    m.offset(),
                    vote.entry.chain_id,
                    vote.entry.shard,
                )
                continue
            status = self.consensus.add(vote)
            if status in (VoteStatus.COUNTED, VoteStatus.QUORUM):
                per = self._vote_offsets.setdefault(shard, {})
                per.setdefault(vote.entry.cycle, m.offset())
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

    def _commit_ready(self) -> None:
        for shard in self.engine.shards:
            while (ready := self.consensus.next_ready(shard)) is not None:
                ce = CommittedEntry.from_quorum(ready.entry, ready.votes, self.peer_id, now_ms())
                try:
                    written = self.store.append(ce)
                except NotNextError:
                    head = self._redis(self.store.head, shard)
                    if head is None or head is False:
                        return
                    if head.cycle >= ce.entry.cycle:
                        self._advance(shard, head.cycle, head.entry_hash)
                        continue
                    log.error(
                        "shard %d: cannot commit cycle %d after head %d: %s",
                        shard,
                        ce.entry.cycle,
                        head.cycle,
                        "a predecessor is missing",
                    )
                    return
                except ForkError as e:
                    log.critical("shard %d: %s", shard, e)
                    self._redis(set_stall, self.store, shard, ce.entry.cycle, f"fork refused: {e}", now_ms())
                    return
                except REDIS_ERRORS as e:
                    self._redis_unavailable(e)
                    return
                self._redis_available()
                if written:
                    self._publish_root(ce)
                self._advance(shard, ce.entry.cycle, ce.entry_hash)
            self._note_stall(shard)

    def _advance(self, shard: int, cycle: int, entry_hash: bytes) -> None:
        self.consensus.set_head(shard, cycle, entry_hash)
        per = self._vote_offsets.get(shard)
        if per:
            for c in [c for c in per if c <= cycle]:
                del per[c]

    def _publish_root(self, ce: CommittedEntry) -> None:
        e = ce.entry
        self.producer.produce(
            self.topics.roots.name,
            key=record_key(e.chain_id, e.shard, e.cycle).encode(),
            value=encode_root(ce),
            partition=e.shard,
        )
        self._published_due[e.shard] = e.cycle
        self.stats["appended"] += 1
        latency = ce.committed_at_ms - self.engine.beat_end_ms(e.cycle)
        self.telemetry.beat_committed(e, len(ce.votes), self.settings.threshold, latency)
        if self.on_commit:
            self.on_commit(ce, latency)
        self.producer.poll(0)

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
        votes = self.consensus.collector.votes(shard, stalled)
        split = ", ".join(f"{h.hex()[:12]}: {sorted(v)}" for h, v in votes.items())
        reason = f"no entry of cycle {stalled} can reach threshold {self.settings.threshold} ({split})"
        log.error("SHARD %d STALLED: %s. Nothing more is committed on it until peers agree.", shard, reason)
        self._redis(set_stall, self.store, shard, stalled, reason, now_ms())
        self.telemetry.stalled(shard)

    # -- markers --------------------------------------------------------------------------

    def _write_markers(self) -> None:
        t = now_ms()
        for shard in self.engine.shards:
            cycle, _first, deltas = self.engine.open_beat(shard)
            if cycle is None or not deltas or self._marker_for.get(shard) == cycle:
                continue
            if t > self.engine.beat_end_ms(cycle) + self.settings.tick_ms:
                self.producer.produce(
                    self.topics.deltas.name, value=None, partition=shard, headers=[(MARKER_HEADER, b"")]
                )
                self._marker_for[shard] = cycle
                self.stats["markers"] += 1
        self.producer.poll(0)

    # -- rebalances -----------------------------------------------------------------------

    def _resume(self, shard: int) -> tuple[ResumePoint, int]:
        """Where this peer resumes a shard (protocol: "Where a shard starts, commits and resumes")."""
        cp = load_checkpoint(self.store, self.peer_id, shard)
        if cp is not None:
            return ResumePoint(cp.next_offset, cp.entry_hash, cp.cycle), cp.votes_offset
        head = self.store.head(shard)
        if head is not None:
            ce = self.store.get(shard, head.cycle)
            if ce is not None:
                return ResumePoint.after(ce.entry), 0
        return ResumePoint(self.settings.start_offset(shard)), 0

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        votes_parts = []
        for p in partitions:
            shard = p.partition
            while True:
                try:
                    point, votes_from = self._resume(shard)
                    head = self.store.head(shard)
                    self._republish(shard)
                    break
                except REDIS_ERRORS as e:
                    self._redis_unavailable(e)
                    time.sleep(1)
            self._redis_available()
            self.engine.assign(shard, point)
            if head is not None:
                self._advance(shard, head.cycle, head.entry_hash)
            p.offset = point.next_offset
            votes_parts.append(TopicPartition(self.topics.votes.name, shard, votes_from))
            self._votes_pos[shard] = votes_from
            log.info(
                "shard %d: resume at offset %d after cycle %s; votes from offset %d",
                shard,
                point.next_offset,
                point.last_cycle,
                votes_from,
            )
        consumer.assign(partitions)
        self.votes.incremental_assign(votes_parts)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._deliver_votes()
        self._flush_checkpoints()
        gone = [p.partition for p in partitions]
        for shard in gone:
            self.engine.revoke(shard)
            self._vote_offsets.pop(shard, None)
            self._votes_pos.pop(shard, None)
            self._marker_for.pop(shard, None)
        if gone:
            self.votes.incremental_unassign([TopicPartition(self.topics.votes.name, s) for s in gone])
            log.info("shards %s revoked", gone)
        consumer.unassign()

    def _republish(self, shard: int) -> None:
        """Roots that a crashed appender may not have published reach the roots topic."""
        head = self.store.head(shard)
        if head is None:
            return
        published = get_published(self.store, shard)
        if published is not None and published >= head.cycle:
            return
        start = None if published is None else published + 1
        for ce in self.store.range(shard, start, head.cycle):
            e = ce.entry
            self.producer.produce(
                self.topics.roots.name,
                key=record_key(e.chain_id, e.shard, e.cycle).encode(),
                value=encode_root(ce),
                partition=shard,
            )
        self.producer.flush(30)
        set_published(self.store, shard, head.cycle)

    # -- Redis availability ---------------------------------------------------------------

    def _redis(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call a Redis operation; on an outage log once, return False, and retry later."""
        try:
            out = fn(*args)
        except REDIS_ERRORS as e:
            self._redis_unavailable(e)
            return False
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
