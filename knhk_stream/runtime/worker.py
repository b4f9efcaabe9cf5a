"""The standalone worker: the Kafka shell around one peer's logic (`node.PeerNode`).

Per step: read a batch of deltas and feed the node; publish the votes of closed
beats and, once they are on the votes topic, let the node checkpoint and commit
consumer offsets at those beat boundaries; read votes of the shards held;
publish the roots the node committed; write the tick markers it asks for.
Everything but the Kafka I/O lives in node.py, shared with embedding pipelines.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME, Consumer, KafkaError, Message, Producer, TopicPartition
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from knhk_stream.kafka.admin import require_log_append_time
from knhk_stream.kafka.topics import Topics, load_topics
from knhk_stream.protocol.committed import CommittedEntry
from knhk_stream.protocol.quorum import Vote
from knhk_stream.protocol.settings import ChainSettings
from knhk_stream.runtime.node import Outbound, PeerNode, Record, marker_out, now_ms, root_out, vote_out
from knhk_stream.runtime.telemetry import Telemetry

__all__ = ["Worker", "WorkerOptions", "from_message", "now_ms", "records"]

log = logging.getLogger("knhk_stream.runtime.worker")


def from_message(m: Message) -> Record | None:
    """A confluent-kafka message as a node `Record`; None for an error event (logged unless EOF)."""
    err = m.error()
    if err is not None:
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer: %s", err)
        return None
    return Record(m.partition(), m.offset(), m.timestamp()[1], m.headers(), m.value(), m.key())


def records(msgs: Iterable[Message]) -> list[Record]:
    """The records among a batch of consumed messages (error events dropped)."""
    return [r for m in msgs if (r := from_message(m)) is not None]


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
    # Run although the deltas topic is not LogAppendTime (protocol "Beats"): only for a
    # development broker whose producers are trusted, such as the embedded Tansu.
    allow_producer_timestamps: bool = False


class Worker:
    """One worker process of one peer. Several with the same peer id share its shards."""

    def __init__(
        self,
        settings: ChainSettings,
        peer_id: str,
        key: Ed25519PrivateKey | Sequence[Ed25519PrivateKey],
        options: WorkerOptions,
        telemetry: Telemetry | None = None,
    ) -> None:
        # Protocol "Beats": the broker's clock drives the beats, so refuse a deltas topic
        # that lets producers set the timestamps, before anything else is set up.
        if options.allow_producer_timestamps:
            log.warning(
                "--allow-producer-timestamps: not checking that %s uses LogAppendTime; producers' timestamps "
                "drive the beats (only for a development broker whose producers are trusted)",
                options.topics.deltas.name,
            )
        else:
            require_log_append_time(options.bootstrap, options.topics.deltas.name, options.kafka_config)
        self._watch_timestamps = not options.allow_producer_timestamps
        self.settings = settings
        self.peer_id = peer_id
        self.opts = options
        self.telemetry = telemetry or Telemetry(None)
        self.node = PeerNode.connect(settings, peer_id, key, options.redis_url, options.prefix, self.telemetry)
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
        self._roots_acked: list[CommittedEntry] = []

    @property
    def stats(self) -> dict[str, int]:
        """Counters of this worker: deltas, votes, appended (entries it wrote), markers."""
        return self.node.stats

    @property
    def on_commit(self) -> Callable[[CommittedEntry, float], None] | None:
        """Called with (entry, latency ms) for each entry this worker appends."""
        return self.node.on_commit

    @on_commit.setter
    def on_commit(self, fn: Callable[[CommittedEntry, float], None] | None) -> None:
        self.node.on_commit = fn

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
            self._confirm_roots()
            self.telemetry.shutdown()
            log.info("worker of peer %s stopped", self.peer_id)

    # -- one step -------------------------------------------------------------------------

    def step(self) -> None:
        msgs = self.deltas.consume(self.opts.batch, timeout=0.05)
        if msgs:
            if self._watch_timestamps:
                self._check_timestamp_type(msgs)
            for vote in self.node.process(records(msgs)):
                self._publish_vote(vote)
        if self._undelivered:
            self._deliver_votes()
        self.node.on_vote_records(records(self.votes.consume(10_000, timeout=0)))
        for ce in self.node.commit_ready():
            self._publish_root(ce)
        if self.opts.markers:
            for shard in self.node.markers_due(now_ms()):
                self._produce(self.topics.deltas.name, marker_out(shard))
        self.producer.poll(0)
        self._confirm_roots()

    def _check_timestamp_type(self, msgs: list[Message]) -> None:
        """Once: say so if the first record carries a producer's timestamp although the topic is LogAppendTime.

        A broker may accept the setting and ignore it (the embedded Tansu does), and records
        written before the setting changed keep their CreateTime.
        """
        for m in msgs:
            if m.error() is None:
                self._watch_timestamps = False
                if m.timestamp()[0] != TIMESTAMP_LOG_APPEND_TIME:
                    log.warning(
                        "%s[%d] offset %d carries a producer timestamp (CreateTime) although the topic reports "
                        "LogAppendTime: records from before the setting changed do, and so does every record on a "
                        "broker that ignores the setting (the embedded Tansu does)",
                        m.topic(),
                        m.partition(),
                        m.offset(),
                    )
                return

    def _produce(self, topic: str, out: Outbound, on_delivery: Callable[..., None] | None = None) -> None:
        kwargs: dict[str, Any] = {"key": out.key, "value": out.value, "partition": out.partition}
        if out.headers:
            kwargs["headers"] = out.headers
        if on_delivery is not None:
            kwargs["on_delivery"] = on_delivery
        self.producer.produce(topic, **kwargs)

    def _publish_vote(self, vote: Vote) -> None:
        self._produce(self.topics.votes.name, vote_out(vote), self._on_vote_delivery)
        self._undelivered.append(vote)

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
        votes, self._undelivered = self._undelivered, []
        offsets = self.node.votes_delivered(votes)
        if offsets:
            tps = [TopicPartition(self.topics.deltas.name, s, o) for s, o in offsets.items()]
            try:
                self.deltas.commit(offsets=tps, asynchronous=True)
            except Exception as e:  # a commit during a rebalance may fail; the checkpoint rules
                log.warning("offset commit failed: %s", e)
        self._confirm_roots()

    # -- roots ----------------------------------------------------------------------------

    def _publish_root(self, ce: CommittedEntry) -> None:
        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is None:
                self._roots_acked.append(ce)
            else:
                e = ce.entry
                log.error("root of shard %d cycle %d not delivered (%s); republished later", e.shard, e.cycle, err)

        self._produce(self.topics.roots.name, root_out(ce), delivered)

    def _confirm_roots(self) -> None:
        if self._roots_acked:
            acked, self._roots_acked = self._roots_acked, []
            self.node.roots_delivered(acked)

    # -- rebalances -----------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        votes_parts = []
        for p in partitions:
            at = self.node.assign(p.partition)
            p.offset = at.next_offset
            votes_parts.append(TopicPartition(self.topics.votes.name, p.partition, at.votes_offset))
        consumer.assign(partitions)
        self.votes.incremental_assign(votes_parts)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._deliver_votes()
        self.producer.flush(30)  # roots in flight, so the published mark covers them
        self._confirm_roots()
        gone = [p.partition for p in partitions]
        for shard in gone:
            self.node.revoke(shard)
        if gone:
            self.votes.incremental_unassign([TopicPartition(self.topics.votes.name, s) for s in gone])
            log.info("shards %s revoked", gone)
        consumer.unassign()
