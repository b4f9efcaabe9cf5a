"""The standalone worker: the Kafka shell around one peer's logic (`node.PeerNode`).

Per step: read a batch of deltas and feed the node; publish the votes of closed
beats and, once they are on the votes topic, let the node checkpoint and commit
consumer offsets at those beat boundaries; read votes of the shards held;
publish the roots the node committed; write the tick markers it asks for.
Everything but the Kafka I/O lives in node.py, shared with embedding pipelines.

Before it joins its consumer group (and so before it takes a shard from anyone),
a worker checks everything it can: Redis answers, the topics exist with one
partition per shard, the deltas topic uses LogAppendTime. Every wait honours
`stop()` (and the `until` of `run`) within a second; while it stops, pending
deliveries get at most `STOP_FLUSH_S` seconds.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    TIMESTAMP_LOG_APPEND_TIME,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from redis import ConnectionError as RedisConnectionError
from redis import TimeoutError as RedisTimeoutError

from knhk_stream.errors import TopicsError
from knhk_stream.kafka.admin import Admin, ClientLog, check_peer_topics, partition_counts, require_log_append_time
from knhk_stream.kafka.topics import Topics, load_topics
from knhk_stream.protocol.committed import CommittedEntry
from knhk_stream.protocol.engine import PeerEngine
from knhk_stream.protocol.quorum import Vote
from knhk_stream.protocol.settings import ChainSettings
from knhk_stream.runtime.latency_trace import LatencyTrace
from knhk_stream.runtime.node import (
    ROOTS_TAIL,
    Interrupt,
    NodeLimits,
    Outbound,
    PeerNode,
    Record,
    marker_out,
    now_ms,
    root_out,
)
from knhk_stream.runtime.telemetry import Telemetry

__all__ = ["Stopped", "Worker", "WorkerOptions", "from_message", "now_ms", "records"]

log = logging.getLogger("knhk_stream.runtime.worker")
STOP_FLUSH_S = 3.0  # once asked to stop: the longest the worker waits, in all, for deliveries to finish
# librdkafka errors that mean "cannot talk to the brokers" (reported once per interval, retried for ever)
_UNREACHABLE = {
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._RESOLVE,
    KafkaError._TIMED_OUT,
    KafkaError._AUTHENTICATION,
    KafkaError._SSL,
}


KAFKA_CHECK_S = 5.0  # one start-up request to Kafka
# What the worker's own share of commit latency depends on (issue 14); --kafka-config overrides both settings.
FETCH_WAIT_MS = 10  # fetch.wait.max.ms: a broker that holds a fetch for the whole wait (Tansu) adds up to this
VOTE_LINGER_MS = 1  # linger.ms: votes of one step leave together (fewer requests for a busy broker)
FETCH_STALL_S = 10.0  # no record read past an offset this long, with this worker's marker acknowledged after it
STEP_WAIT_S = 0.002  # a step gathers deltas this long (or a full batch): at most ~500 steps a second


class Stopped(Interrupt):
    """Raised out of a wait that does not look at the stop flag itself, when the worker is asked to stop."""


class KafkaUnreachable(TopicsError):
    """Kafka did not answer the worker's start-up checks in time."""


def from_message(m: Message) -> Record | None:
    """A confluent-kafka message as a node `Record`; None for an error event (logged unless EOF)."""
    out = records((m,))
    return out[0] if out else None


def records(msgs: Iterable[Message]) -> list[Record]:
    """The records among a batch of consumed messages (error events dropped, logged unless EOF).

    Once per delta: the tuple is built directly (`Record`'s own constructor is a Python function
    call more, a sixth of this loop's time measured on the embedded broker)."""
    out: list[Record] = []
    add, new = out.append, tuple.__new__
    for m in msgs:
        err = m.error()
        if err is None:
            add(new(Record, (m.partition(), m.offset(), m.timestamp()[1], m.headers(), m.value(), m.key())))
        elif err.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer: %s", err)
    return out


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
    # At start: how long to wait for Redis and Kafka to answer before giving up (the group is joined only
    # after both did, so a worker waiting here takes no shard from anyone); 0: give up at the first failure.
    start_timeout_s: float = 30.0
    limits: NodeLimits = field(default_factory=NodeLimits)  # open-beat bounds, republishing, head checks
    report_interval_s: float = 30.0  # while Kafka is unreachable: one line per interval


class Worker:
    """One worker process of one peer. Several with the same peer id share its shards."""

    def __init__(
        self,
        settings: ChainSettings,
        peer_id: str,
        key: Ed25519PrivateKey | Sequence[Ed25519PrivateKey],
        options: WorkerOptions,
        telemetry: Telemetry | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        # `stop`: set by whoever ends the worker (a signal handler), looked at by its waits from the start:
        # a `Stopped` raised by the handler is lost when it lands in a finalizer (redis-py's __del__).
        self._stop = stop if stop is not None else threading.Event()
        self._until: Callable[[], bool] | None = None
        self._stop_deadline: float | None = None
        self.waiting = False  # inside a wait that only `Stopped` (raised by a signal handler) can end
        self._kafka_trouble: tuple[float, str] | None = None  # (first seen, last error) while unreachable
        self._kafka_last_error = 0.0
        self._kafka_reported = 0.0
        self.settings = settings
        self.peer_id = peer_id
        self.opts = options
        self.topics = options.topics
        # The start-up checks, before the consumer group is joined. The peer id and keys first (no I/O) ...
        self.telemetry = telemetry or Telemetry(None)
        PeerEngine(settings, peer_id, key)  # ValueError: not a peer of the settings, or the wrong key
        deadline = time.monotonic() + options.start_timeout_s
        self.client_log = ClientLog()
        config: dict[str, Any] = {**self.client_log.config(), **options.kafka_config}
        admin = Admin(options.bootstrap, config, self.client_log)
        # ... then (protocol "Beats") a deltas topic whose timestamps the broker's clock sets, before
        # anything is set up; a broker that does not answer is waited for ...
        if options.allow_producer_timestamps:
            log.warning(
                "--allow-producer-timestamps: not checking that %s uses LogAppendTime; producers' timestamps "
                "drive the beats (only for a development broker whose producers are trusted)",
                options.topics.deltas.name,
            )
        else:
            self._await_start("Kafka", options.bootstrap, deadline, (KafkaUnreachable,),
                              lambda: self._log_append_time(config))  # fmt: skip
        # ... then Redis: without it no shard can be taken, and a worker that joined anyway would hold
        # shards it cannot serve. An outage (a restart while Redis is down) is waited out, up to
        # start_timeout_s; then redis.ConnectionError, with the address, goes to the caller ...

        def connect() -> None:
            node = PeerNode.connect(
                settings, peer_id, key, options.redis_url, options.prefix, self.telemetry, options.limits
            )
            node.store.client.ping()
            self.node = node

        self._await_start("Redis", options.redis_url, deadline, (RedisConnectionError, RedisTimeoutError), connect)
        # ... then the three topics, one partition per shard each (Kafka waited for, if it has not been yet).
        self._await_start("Kafka", options.bootstrap, deadline, (KafkaUnreachable,),
                          lambda: self._kafka_answers(admin, deadline))  # fmt: skip
        check_peer_topics(admin, options.topics, KAFKA_CHECK_S)
        self._watch_timestamps = not options.allow_producer_timestamps
        self.group_id = options.group_id or f"knhk.{settings.chain_id}.{peer_id}"
        common: dict[str, Any] = {"bootstrap.servers": options.bootstrap, "error_cb": self._on_kafka_error, **config}
        self.deltas = Consumer(
            {
                **common,
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": config.get("fetch.wait.max.ms", FETCH_WAIT_MS),
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
                "fetch.wait.max.ms": config.get("fetch.wait.max.ms", FETCH_WAIT_MS),
            }
        )
        self.producer = Producer(
            {**common, "acks": "all", "linger.ms": config.get("linger.ms", VOTE_LINGER_MS), "enable.idempotence": True}
        )
        self._common = {k: v for k, v in common.items() if k != "error_cb"}
        self.node.roots_source = self._roots_of  # to restore entries Redis lost
        self._tails: dict[int, list[bytes | None]] = {}  # roots-topic tails read for the shards being taken
        # The fetch watch: librdkafka's fetcher for a partition was seen to stop for good on the embedded
        # broker while a fresh consumer read on (docs/tansu.md). A marker this worker wrote and the broker
        # acknowledged proves there is a record to read; a position that stays behind it is fetched again.
        self._marker_acked: dict[int, int] = {}  # shard -> offset of the newest acknowledged marker
        self._fetch_seen: dict[int, tuple[int, float]] = {}  # shard -> (position, since when)
        self._fetch_said: set[tuple[int, int]] = set()  # (shard, position) already logged
        self._fetch_checked = 0.0
        self._paused: set[int] = set()  # halted shards (their position stays put on purpose)
        self._undelivered: list[Vote] = []  # produced, not yet given to node.votes_delivered (in produce order)
        self._acked: set[int] = set()  # id() of the votes in _undelivered the broker acknowledged
        self._failed: list[str] = []
        self._roots_acked: list[CommittedEntry] = []
        self._trace = LatencyTrace.from_env()  # off unless KNHK_STREAM_LATENCY_TRACE is set (the bench sets it)
        if self._trace is not None and self.node.on_commit is None:
            trace = self._trace
            self.node.on_commit = lambda ce, _lat: trace.appended(ce.entry.shard, ce.entry.cycle, trace.now())

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

    def _await_start(
        self,
        what: str,
        where: str,
        deadline: float,
        errors: tuple[type[Exception], ...],
        check: Callable[[], object],
    ) -> None:
        """Run `check` until it passes; while `what` is unreachable say so once and retry until `deadline`."""
        said = False
        while True:
            try:
                check()
                if said:
                    log.warning("%s at %s answers; going on", what, where)
                return
            except errors as e:
                if self._stop.is_set():
                    raise Stopped(f"stop requested while waiting for {what}") from None
                left = deadline - time.monotonic()
                if left <= 0:
                    if said:
                        waited = f"waited {self.opts.start_timeout_s:g} s, --start-timeout"
                        raise type(e)(f"{str(e).rstrip('.')} ({waited})") from None
                    raise
                if not said:
                    said = True
                    log.warning(
                        "cannot reach %s at %s (%s): waiting up to %.0f s for it (--start-timeout) before giving "
                        "up; the worker joins its consumer group only once it answers. Ctrl-C stops.",
                        what,
                        where,
                        str(e).rstrip("."),
                        left,
                    )
                self._stop.wait(min(0.5, left))

    def _log_append_time(self, config: dict[str, Any]) -> None:
        """require_log_append_time; a broker that did not answer (its configs unreadable) is KafkaUnreachable."""
        try:
            require_log_append_time(self.opts.bootstrap, self.topics.deltas.name, config, KAFKA_CHECK_S)
        except TopicsError as e:
            if str(e).startswith("cannot read"):  # log_append_time_problem of an exception: no answer
                raise KafkaUnreachable(str(e)) from None
            raise

    @staticmethod
    def _kafka_answers(admin: Admin, deadline: float) -> None:
        try:
            partition_counts(admin, max(0.5, min(KAFKA_CHECK_S, deadline - time.monotonic())))
        except TopicsError as e:
            raise KafkaUnreachable(str(e)) from None

    def stop(self) -> None:
        """Ask the loop to finish its current step and exit (safe from a signal handler).

        A signal handler that finds `waiting` true should raise `Stopped` too: that ends
        a wait that does not look at the flag (the node's wait for Redis while taking a shard).
        """
        self._stop.set()

    def stopping(self) -> bool:
        """True once `stop()` was called or the `until` of `run` says so."""
        if self._stop.is_set() or (self._until is not None and self._until()):
            if self._stop_deadline is None:
                self._stop_deadline = time.monotonic() + STOP_FLUSH_S
            return True
        return False

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Work until `stop()` or `until()`; then deliver what is pending (at most STOP_FLUSH_S s) and close."""
        self._until = until
        self.deltas.subscribe(
            [self.topics.deltas.name], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )
        log.info("worker of peer %s started (group %s)", self.peer_id, self.group_id)
        # What start-up made (modules, settings, clients) lives as long as the process: kept out of the
        # collector's full passes, each of which otherwise walks it all (~100 ms a pass, measured).
        gc.freeze()
        try:
            while not self.stopping():
                self.step()
        except Stopped:
            log.info("stop requested while waiting")
        finally:
            self._stop.set()
            self.stopping()
            self._close()

    def _close(self) -> None:
        try:
            self._deliver_votes()
        finally:
            self.deltas.close()  # revokes: checkpoints the shards held
            self.votes.close()
            self._flush(10)
            self._confirm_roots()
            if self._trace is not None:
                self._trace.close()
            self.telemetry.shutdown()
            log.info("worker of peer %s stopped", self.peer_id)

    def _flush(self, timeout: float) -> int:
        """producer.flush in short slices: returns early (what is left) once stopping and its budget is spent."""
        deadline = time.monotonic() + timeout
        while True:
            if self.stopping():
                assert self._stop_deadline is not None
                deadline = min(deadline, self._stop_deadline)
            left = int(self.producer.flush(max(0.0, min(0.5, deadline - time.monotonic()))))
            self._report_kafka()
            if left == 0 or time.monotonic() >= deadline:
                return left

    # -- Kafka reachability ---------------------------------------------------------------

    def _on_kafka_error(self, err: KafkaError) -> None:
        """librdkafka's error callback (on poll/consume/flush): note that the brokers cannot be reached."""
        if err.code() in _UNREACHABLE:
            now = time.monotonic()
            self._kafka_last_error = now
            first = self._kafka_trouble[0] if self._kafka_trouble else now
            self._kafka_trouble = (first, err.str())

    def _report_kafka(self) -> None:
        """While Kafka is unreachable: one warning per report interval (librdkafka's own lines are at DEBUG)."""
        trouble = self._kafka_trouble
        if trouble is None:
            return
        now = time.monotonic()
        if now - self._kafka_last_error > max(10.0, self.opts.report_interval_s / 3):
            self._kafka_trouble = None
            log.warning("Kafka at %s answers again", self.opts.bootstrap)
            self._kafka_reported = 0.0
            return
        if now - self._kafka_reported >= self.opts.report_interval_s:
            self._kafka_reported = now
            log.warning(
                "cannot reach Kafka at %s for %.0f s (%s); retrying, next report in %.0f s",
                self.opts.bootstrap,
                now - trouble[0],
                trouble[1],
                self.opts.report_interval_s,
            )

    # -- one step -------------------------------------------------------------------------

    def step(self) -> None:
        """One round: deltas in, votes out, votes in, appends, roots and markers out; nothing waits for the broker.

        consume(n, timeout) returns after n records or the whole timeout: STEP_WAIT_S bounds both a
        record's wait and how often the loop turns. Votes are confirmed to the node (checkpoints,
        offsets) as their acknowledgements come, never waited for here.
        """
        msgs = self.deltas.consume(self.opts.batch, timeout=STEP_WAIT_S)
        trace = self._trace
        arrived = trace.now() if trace is not None else None
        self._report_kafka()
        if msgs:
            if self._watch_timestamps:
                self._check_timestamp_type(msgs)
            for vote in self.node.process_iter(records(msgs)):  # each vote out as soon as it is made
                if trace is not None and arrived is not None:
                    trace.vote(vote.entry.shard, vote.entry.cycle, arrived, trace.now())
                self._publish_vote(vote)
            for shard in self.node.take_halted():  # its open beat passed its bounds: read no more of it
                self.deltas.pause([TopicPartition(self.topics.deltas.name, shard)])
                self._paused.add(shard)
        if self._failed:
            self._deliver_votes()  # retried, waiting: no checkpoint moves past a vote not delivered
        vote_records = records(self.votes.consume(10_000, timeout=0))
        if trace is not None and vote_records:
            trace.votes_read(((r.partition, r.offset) for r in vote_records), trace.now())
        self.node.on_vote_records(vote_records)
        for shard, offset in self.node.votes_to_reread().items():
            try:
                self.votes.seek(TopicPartition(self.topics.votes.name, shard, offset))
            except KafkaException as e:
                log.warning("shard %d: reading votes again from offset %d failed (%s); tried again", shard, offset, e)
                continue
            self.node.reading_votes_again(shard, offset)
        for ce in self.node.commit_ready():
            self._publish_root(ce)
        if self.opts.markers:
            for shard in self.node.markers_due(now_ms()):
                self._produce(self.topics.deltas.name, marker_out(shard), self._on_marker_delivery)
        for out in self.node.evidence_due():
            self._publish_evidence(out)
        self.producer.poll(0)
        if self._undelivered:
            self._confirm_votes()
        self._watch_fetching()
        self._confirm_roots()

    def _on_marker_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None and msg.offset() is not None and msg.offset() >= 0:
            p = msg.partition()
            self._marker_acked[p] = max(self._marker_acked.get(p, -1), msg.offset())

    def _watch_fetching(self) -> None:
        """Once a second: a held shard whose position has not moved for FETCH_STALL_S although a marker of
        this worker is on the topic at or after it is fetched again from that position (a seek)."""
        now = time.monotonic()
        if now - self._fetch_checked < 1.0:
            return
        self._fetch_checked = now
        held = [s for s in self.node.shards if s not in self._paused]
        if not held:
            return
        try:
            positions = self.deltas.position([TopicPartition(self.topics.deltas.name, s) for s in held])
        except KafkaException:
            return  # during a rebalance: looked at again in a second
        for tp in positions:
            shard, pos = tp.partition, tp.offset
            seen = self._fetch_seen.get(shard)
            acked = self._marker_acked.get(shard, -1)
            if pos < 0 or acked < pos or seen is None or seen[0] != pos:
                self._fetch_seen[shard] = (pos, now)
                continue
            if now - seen[1] < FETCH_STALL_S:
                continue
            if (shard, pos) not in self._fetch_said:
                self._fetch_said.add((shard, pos))
                log.warning(
                    "shard %d: nothing read past offset %d for %.0f s although this worker's marker at offset %d "
                    "is on the topic: fetching again from %d. If it recurs at the same offset, an open "
                    "transaction holds the last stable offset there (see `knhk-stream status`)",
                    shard, pos, now - seen[1], acked, pos,
                )  # fmt: skip
            self.node.stats["fetch_restarts"] = self.node.stats.get("fetch_restarts", 0) + 1
            try:
                self.deltas.seek(TopicPartition(self.topics.deltas.name, shard, pos))
            except KafkaException as e:
                log.warning("shard %d: fetching again from offset %d failed (%s); tried again", shard, pos, e)
            self._fetch_seen[shard] = (pos, now)

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
        def delivered(err: KafkaError | None, msg: Message) -> None:
            self._on_vote_delivery(err, msg, vote)

        self._produce(self.topics.votes.name, self.node.vote_record(vote), delivered)
        self._undelivered.append(vote)

    def _on_vote_delivery(self, err: KafkaError | None, msg: Message, vote: Vote | None = None) -> None:
        if err is not None:
            self._failed.append(f"{msg.key()!r}: {err}")
            return
        if vote is not None:
            self._acked.add(id(vote))
        if self._trace is not None:
            self._trace.vote_acked(msg.partition(), msg.offset(), (msg.latency() or 0.0) * 1000)

    def _deliver_votes(self) -> None:
        """Wait until the votes are on the topic; only then move checkpoints and offsets.

        While stopping, it gives up after STOP_FLUSH_S: no checkpoint or offset moves past
        an undelivered vote, so the next holder of the shard makes it again.
        """
        while self._undelivered:
            remaining = self._flush(30)
            if remaining == 0 and not self._failed:
                break
            if self.stopping():
                log.warning(
                    "stopping with %d vote(s) not delivered (%s): no checkpoint moves past them, the next holder "
                    "of the shard signs them again",
                    len(self._undelivered),
                    self._failed[:1] or f"{remaining} in flight",
                )
                self._undelivered, self._failed = [], []
                self._acked.clear()
                return
            log.error("votes not delivered (%s); retrying", self._failed or f"{remaining} in flight")
            self._failed.clear()
            votes, self._undelivered = self._undelivered, []
            for v in votes:
                self._publish_vote(v)
            self._stop.wait(0.5)
        votes, self._undelivered = self._undelivered, []
        self._acked.clear()
        self._votes_confirmed(votes)

    def _confirm_votes(self) -> None:
        """Give the node the acknowledged votes from the oldest on (a vote still in flight stops the run,
        so no checkpoint or offset moves past it)."""
        n = 0
        for v in self._undelivered:
            if id(v) not in self._acked:
                break
            self._acked.discard(id(v))
            n += 1
        if n:
            votes = self._undelivered[:n]
            del self._undelivered[:n]
            self._votes_confirmed(votes)

    def _votes_confirmed(self, votes: list[Vote]) -> None:
        """The votes are on the topic: the node checkpoints; the consumer commits those beat boundaries."""
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

    def _publish_evidence(self, out: Outbound) -> None:
        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                log.error("equivocation evidence for shard %d not delivered (%s); retried", out.partition, err)
                self.node.evidence_failed([out])

        self._produce(self.topics.evidence.name, out, delivered)

    def _roots_of(self, shard: int, last: int | None = None) -> Iterable[bytes | None]:
        """The roots topic's records of a shard, oldest first, or only the newest `last` of them (the node
        restores and re-appends entries Redis lost from it). Tails of the shards being taken are read once
        for all of them (`_on_assign`)."""
        from knhk_stream.kafka.roots import partition_values  # kafka.roots imports this module

        tail = self._tails.pop(shard, None)
        if last is not None and tail is not None and last <= ROOTS_TAIL:
            return tail[-last:]
        return partition_values(self._common, self.topics.roots.name, shard, last=last)

    def _read_tails(self, shards: list[int]) -> None:
        """The newest ROOTS_TAIL roots of every shard taken, in one read: taking shards stays quick."""
        from knhk_stream.kafka.roots import partitions_values  # kafka.roots imports this module

        try:
            self._tails = partitions_values(self._common, self.topics.roots.name, shards, last=ROOTS_TAIL)
        except Stopped:
            raise
        except Exception as e:  # the node reads each shard again itself (and says so if it cannot)
            log.warning("cannot read the roots topic's newest records of shards %s: %s", shards, e)
            self._tails = {}

    def _confirm_roots(self) -> None:
        if self._roots_acked:
            acked, self._roots_acked = self._roots_acked, []
            self.node.roots_delivered(acked)

    # -- rebalances -----------------------------------------------------------------------

    def _wait_for_redis(self) -> None:
        """Before taking shards: wait until Redis answers, looking at the stop flag (`Stopped` when asked)."""
        said = False
        while True:
            try:
                self.node.store.client.ping()
                if said:
                    log.warning("Redis answers again; taking the shards")
                return
            except (RedisConnectionError, RedisTimeoutError) as e:
                if not said:
                    said = True
                    log.error("Redis unavailable (%s): waiting for it before taking shards", e)
            if self.stopping():
                raise Stopped("stop requested while waiting for Redis")
            self._stop.wait(0.5)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self.stopping():
            raise Stopped("stop requested before the shards were taken")
        self._wait_for_redis()
        votes_parts = []
        self.waiting = True  # a signal also ends a Kafka read of the roots topic (Stopped)
        taken: list[int] = []
        try:
            self._read_tails([p.partition for p in partitions])
            for p in partitions:
                at = self.node.assign(p.partition, stop=self.stopping)
                taken.append(p.partition)
                p.offset = at.next_offset
                votes_parts.append(TopicPartition(self.topics.votes.name, p.partition, at.votes_offset))
        except BaseException:
            for shard in taken:  # stopped halfway: give back what the consumers never got assigned
                self.node.revoke(shard)
            raise
        finally:
            self.waiting = False
            self._tails = {}
        consumer.assign(partitions)
        self.votes.incremental_assign(votes_parts)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._deliver_votes()
        self._flush(30)  # roots in flight, so the published mark covers them
        self._confirm_roots()
        held = set(self.node.shards)
        gone = [p.partition for p in partitions if p.partition in held]
        for shard in gone:
            self.node.revoke(shard)
            self._paused.discard(shard)
            self._fetch_seen.pop(shard, None)
        if gone:
            self.votes.incremental_unassign([TopicPartition(self.topics.votes.name, s) for s in gone])
            log.info("shards %s revoked", gone)
        consumer.unassign()
