"""A knhk-stream peer inside a faust-streaming app: `add_peer(app, ...)`.

The app hosts one peer (all workers of the app are worker processes of that
peer and share its shards). `add_peer` adds two agents, a timer and two
rebalance handlers that drive the same `node.PeerNode` as the standalone
worker, in the same order (see node.py's module docstring), so the votes and
entries are byte-identical to the worker's:

- agent on the deltas topic: `node.process(batch)`; each vote is produced to the
  votes topic and, once the broker acknowledged it, `node.votes_delivered`
  writes the checkpoint (and the beat-boundary offset is committed); a shard in
  `node.take_halted()` is paused (resumed when it is assigned again);
- agent on the votes topic: `node.on_vote_records(batch)`, then `commit_ready()`
  and the roots it returns go to the roots topic (`roots_delivered` on ack);
- timer: `commit_ready()` again (retries), the tick markers of `markers_due()`,
  the equivocation evidence of `evidence_due()` (to the evidence topic), and the
  votes `votes_to_reread()` asks for: votes the protocol's bounds dropped are
  read again with a consumer of the peer's own (`VotesRereader`), from that
  offset up to where the agent is, and handed to the node before anything else
  (Faust's stream cannot go back: records it already fetched would come first,
  and its read-offset filter would then drop the older ones);
- `app.on_partitions_assigned`: `node.assign(shard)`; `app.on_partitions_revoked`:
  deliver pending votes, then `node.revoke(shard)`.

Nothing the chain depends on lives in Faust: no tables, and Faust's committed
offsets are never used. Faust seeks every partition to its committed offset
after a rebalance (`Consumer.perform_seek`, through `seek_to_committed`); the
peer wraps that call so the deltas partition of each held shard goes to
`Assignment.next_offset` (the peer's own beat boundary from its Redis
checkpoint) and the votes partition to `Assignment.votes_offset`. The topics
are declared with `acks=False`, so Faust tracks no acknowledgements for them
and never commits their offsets itself; the peer commits deltas offsets only
at beat boundaries after the vote is on the votes topic (informational: the
`status` command's lag), exactly like the worker.

Faust delivers at least once. Per held shard the peer remembers the consumer
generation it took the shard in and the last offset it fed (deltas) or read
(votes), and drops any record of another generation (buffered before a
rebalance) or at or below that offset (a repeat or a replay after a seek).
`PeerEngine` itself skips offsets before its resume point, and the beat
assembler raises on an offset that does not move forward; the filter keeps
both from ever seeing a repeat, so a redelivery costs nothing.

Produced records go through the app's own (aiokafka) producer: acks=all, not
idempotent (idempotent and transactional aiokafka producers do not work on
every broker, e.g. the embedded Tansu). A retried send can therefore write a
vote, root or marker twice; that is harmless: a repeated vote counts once, roots
are deduplicated by key, and a tick marker carries no receipt.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer
from aiokafka import TopicPartition as KafkaTP
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from faust.types import TP

from knhk_stream.errors import MissingExtra
from knhk_stream.kafka.topics import Topics, load_topics
from knhk_stream.protocol.committed import CommittedEntry
from knhk_stream.protocol.quorum import Vote
from knhk_stream.protocol.settings import ChainSettings
from knhk_stream.runtime.node import (
    NodeLimits,
    Outbound,
    PeerNode,
    Record,
    marker_out,
    now_ms,
    root_out,
    vote_out,
)
from knhk_stream.runtime.telemetry import Telemetry

__all__ = ["FaustPeer", "VotesRereader", "add_peer", "bootstrap_of", "record_of"]

log = logging.getLogger("knhk_stream.integrations.faust")


def record_of(message: Any) -> Record:
    """A Faust message as a node `Record`.

    Faust keeps Kafka's millisecond timestamp as float seconds; `round` gives the
    milliseconds back exactly (the float error is far below half a millisecond).
    A record without a timestamp gets -1, as confluent-kafka reports it; like every
    negative timestamp it counts as 0 (protocol "Beats"), as in the worker.
    """
    ts = message.timestamp
    ms = -1 if ts is None else round(ts * 1000)
    return Record(message.partition, message.offset, ms, message.headers, message.value, message.key)


REREAD_TIMEOUT_S = 10.0  # reading votes again that takes longer is given up, and tried again after this long


class VotesRereader:
    """Reads a range of the votes topic again, with a consumer of its own (no group, nothing committed).

    Created on first use with the app's brokers and credentials, and read_committed like the
    peer's other reads; `read` returns the records of one partition from `start` up to `end`
    (exclusive), or None when they did not all come within `timeout` s.
    """

    def __init__(self, app: faust.App, topic: str) -> None:
        self.app = app
        self.topic = topic
        self._consumer: AIOKafkaConsumer | None = None

    async def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            conf = self.app.conf
            consumer = AIOKafkaConsumer(
                bootstrap_servers=bootstrap_of(self.app).split(","),
                client_id=f"{conf.broker_client_id}-votes-reread",
                group_id=None,
                enable_auto_commit=False,
                isolation_level="read_committed",
                auto_offset_reset="earliest",
                **credentials_to_aiokafka_auth(conf.broker_credentials, conf.ssl_context),
            )
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def read(
        self, partition: int, start: int, end: int, timeout: float = REREAD_TIMEOUT_S
    ) -> list[Record] | None:
        consumer = await self._started()
        tp = KafkaTP(self.topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, start)
        out: list[Record] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while await consumer.position(tp) < end:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return None
            got = await consumer.getmany(tp, timeout_ms=int(min(left, 0.5) * 1000), max_records=10_000)
            for m in got.get(tp, ()):
                if start <= m.offset < end:
                    out.append(Record(partition, m.offset, m.timestamp, m.headers, m.value, m.key))
        return out

    async def stop(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()


@dataclass
class _Held:
    """A shard this app holds: the consumer generation it was taken in and the read positions."""

    generation: int
    last_delta: int  # last deltas offset fed to the node (next_offset - 1 at assign)
    last_vote: int  # last votes offset handed to the node
    first_delta: int  # the resume point, for the gap warning
    seeked: bool = False


@dataclass
class _Counters:
    stale: int = 0  # records of an earlier consumer generation (before a rebalance)
    repeated: int = 0  # records at or below the last offset fed: Faust's at-least-once repeats
    not_held: int = 0  # records of shards this app does not hold (yet)


class FaustPeer:
    """One knhk-stream peer hosted by a Faust app (see the module docstring)."""

    def __init__(
        self,
        app: faust.App,
        node: PeerNode,
        topics: Topics,
        *,
        markers: bool = True,
        batch: int = 2000,
        within: float = 0.05,
        commit_offsets: bool = True,
    ) -> None:
        self.app = app
        self.node = node
        self.topics = topics
        self.markers = markers
        self.batch = batch
        self.within = within
        self.commit_offsets = commit_offsets
        self.dropped = _Counters()
        self._held: dict[int, _Held] = {}
        self._pending: list[tuple[Vote, Awaitable[Any]]] = []
        self._roots_in_flight: list[Awaitable[Any]] = []
        self._roots_acked: list[CommittedEntry] = []
        self._lock: asyncio.Lock | None = None
        self._stopping = False
        self._paused: set[int] = set()  # shards halted by the node, their deltas partition paused
        self._reread_failed: dict[int, float] = {}  # shard -> when reading its votes again last failed
        deltas, votes = topics.deltas.name, topics.votes.name
        self.rereader = VotesRereader(app, votes)
        self.deltas_topic = app.topic(deltas, key_serializer="raw", value_serializer="raw", acks=False)
        self.votes_topic = app.topic(votes, key_serializer="raw", value_serializer="raw", acks=False)
        name = f"knhk.{node.settings.chain_id}.{node.peer_id}"
        app.agent(self.deltas_topic, name=f"{name}.deltas")(self._deltas_agent)
        app.agent(self.votes_topic, name=f"{name}.votes")(self._votes_agent)
        app.timer(max(0.05, node.settings.tick_ms / 1000), name=f"{name}.tick")(self._tick)
        app.on_partitions_assigned.connect(self._on_assigned)
        app.on_partitions_revoked.connect(self._on_revoked)
        app.on_before_shutdown.connect(self._on_shutdown)
        self._hook_consumer()

    # -- public -----------------------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self.node.peer_id

    @property
    def shards(self) -> list[int]:
        """The shards this app (worker process) holds now."""
        return sorted(self._held)

    @property
    def stats(self) -> dict[str, int]:
        """Node counters (deltas, votes, appended, markers) and the records dropped as stale or repeated."""
        d = self.dropped
        return {**self.node.stats, "stale": d.stale, "repeated": d.repeated, "not_held": d.not_held}

    @property
    def on_commit(self) -> Callable[[CommittedEntry, float], None] | None:
        """Called with (entry, latency ms) for each entry this peer appends."""
        return self.node.on_commit

    @on_commit.setter
    def on_commit(self, fn: Callable[[CommittedEntry, float], None] | None) -> None:
        self.node.on_commit = fn

    # -- the consumer: our own seek positions and read_committed ----------------------------

    def _hook_consumer(self) -> None:
        """Wrap the app's consumer factory (or the consumer, if it exists already)."""
        existing = getattr(self.app, "_consumer", None)
        if existing is not None:
            self._patch_consumer(existing)
            return
        make = self.app._new_consumer

        def new_consumer() -> Any:
            consumer = make()
            self._patch_consumer(consumer)
            return consumer

        self.app._new_consumer = new_consumer  # type: ignore[method-assign]

    def _patch_consumer(self, consumer: Any) -> None:
        # 1. Every "seek to committed" Faust performs (after each rebalance, and when a
        #    fetch returns while the flow is stopped) puts our partitions where the
        #    peer's checkpoints say instead.
        original = consumer.seek_to_committed

        async def seek_to_committed() -> dict[TP, int]:
            committed = dict(await original())
            targets = self._seek_targets(consumer.assignment())
            if targets:
                await consumer.seek_wait(targets)
                committed.update(targets)
                for tp in targets:
                    if tp.topic == self.topics.deltas.name and tp.partition in self._held:
                        self._held[tp.partition].seeked = True
                log.info("seeked %s", ", ".join(f"{tp.topic}[{tp.partition}]@{o}" for tp, o in sorted(targets.items())))
            return committed

        consumer.seek_to_committed = seek_to_committed
        # 2. The protocol reads deltas with read_committed; Faust only asks for it in
        #    exactly-once mode, so set it on the aiokafka consumer it creates.
        thread = getattr(consumer, "_thread", None)
        create = getattr(thread, "_create_worker_consumer", None)
        if create is None:
            log.warning("cannot set isolation.level=read_committed on this Faust consumer; reading uncommitted")
            return

        def create_worker_consumer(transport: Any) -> Any:
            c = create(transport)
            if getattr(c, "_isolation_level", None) is not None:
                c._isolation_level = "read_committed"
            return c

        thread._create_worker_consumer = create_worker_consumer

    def _seek_targets(self, assignment: Iterable[TP]) -> dict[TP, int]:
        deltas, votes = self.topics.deltas.name, self.topics.votes.name
        out: dict[TP, int] = {}
        for tp in assignment:
            h = self._held.get(tp.partition)
            if h is None:
                continue
            if tp.topic == deltas:
                out[tp] = h.last_delta + 1
            elif tp.topic == votes:
                out[tp] = h.last_vote + 1
        return out

    # -- rebalances -------------------------------------------------------------------------

    def _guard(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def _on_assigned(self, _sender: Any, assigned: set[TP], **_kw: Any) -> None:
        deltas, votes = self.topics.deltas.name, self.topics.votes.name
        shards = sorted(tp.partition for tp in assigned if tp.topic == deltas)
        vote_parts = {tp.partition for tp in assigned if tp.topic == votes}
        async with self._guard():
            if self._stopping:
                return
            generation = self.app.consumer_generation_id
            await self._give_up(list(self._held))  # a rebalance without its revoke: start over cleanly
            for shard in shards:
                if shard not in vote_parts:
                    log.warning(
                        "shard %d: the votes partition went to another worker of this app; this worker "
                        "votes on the shard but cannot see quorums (use Faust's assignor: keep "
                        "table_standby_replicas > 0, or run one worker)",
                        shard,
                    )
                at = self.node.assign(shard, stop=lambda: self._stopping)
                if shard in self._paused:  # halted before; taken again, it is read again (and halts again)
                    self.app.consumer.resume_partitions([TP(deltas, shard)])
                    self._paused.discard(shard)
                self._held[shard] = _Held(generation, at.next_offset - 1, at.votes_offset - 1, at.next_offset)
            if shards:
                log.info("peer %s holds shards %s (generation %s)", self.peer_id, shards, generation)

    async def _on_revoked(self, _sender: Any, revoked: set[TP], **_kw: Any) -> None:
        shards = sorted({tp.partition for tp in revoked if tp.topic == self.topics.deltas.name} & set(self._held))
        async with self._guard():
            await self._give_up(shards)
        if shards:
            log.info("shards %s revoked", shards)

    async def _on_shutdown(self, _sender: Any, **_kw: Any) -> None:
        """Faust stops without revoking: deliver the votes and checkpoint, like a revoke."""
        async with self._guard():
            self._stopping = True
            held = list(self._held)
            await self._give_up(held)
            await self.rereader.stop()
        self.node.telemetry.shutdown()
        d = self.dropped
        log.info(
            "peer %s stopped (shards %s checkpointed); records dropped: %d repeated, %d stale, %d of shards not held",
            self.peer_id,
            held,
            d.repeated,
            d.stale,
            d.not_held,
        )

    async def _give_up(self, shards: Sequence[int]) -> None:
        """Deliver pending votes (checkpoints), settle roots in flight, then revoke."""
        if not shards:
            return
        await self._deliver_votes()
        await self._settle_roots()
        for shard in shards:
            self.node.revoke(shard)
            self._held.pop(shard, None)

    # -- records in -------------------------------------------------------------------------

    def _accept(self, events: Iterable[Any], deltas: bool) -> list[Record]:
        """The records to hand to the node: fresh ones of held shards, each offset once, in order."""
        out: list[Record] = []
        for ev in events:
            m = ev.message
            h = self._held.get(m.partition)
            if h is None:
                self.dropped.not_held += 1
                continue
            if m.generation_id != h.generation:
                self.dropped.stale += 1
                continue
            last = h.last_delta if deltas else h.last_vote
            if m.offset <= last:
                self.dropped.repeated += 1
                continue
            if deltas:
                if last + 1 == h.first_delta and m.offset != h.first_delta:
                    log.warning(
                        "shard %d: first record after resuming is offset %d, not %d (%s)",
                        m.partition,
                        m.offset,
                        h.first_delta,
                        "records missing or a control record" if h.seeked else "the resume seek was not applied",
                    )
                h.last_delta = m.offset
            else:
                h.last_vote = m.offset
            out.append(record_of(m))
        return out

    async def _deltas_agent(self, stream: Any) -> None:
        async for events in stream.take_events(self.batch, within=self.within):
            async with self._guard():
                records = self._accept(events, deltas=True)
                if not records:
                    continue
                for vote in self.node.process(records):
                    await self._publish_vote(vote)
                await self._deliver_votes()
                self._pause_halted()

    async def _votes_agent(self, stream: Any) -> None:
        async for events in stream.take_events(self.batch, within=self.within):
            async with self._guard():
                records = self._accept(events, deltas=False)
                if records:
                    self.node.on_vote_records(records)
                    await self._commit_ready()

    async def _tick(self) -> None:
        async with self._guard():
            await self._reread_votes()
            await self._commit_ready()
            if self.markers and self._held:
                for shard in self.node.markers_due(now_ms()):
                    await self._marker(shard)
            for out in self.node.evidence_due():
                await self._publish_evidence(out)
            self._confirm_roots()

    def _pause_halted(self) -> None:
        """Stop fetching the deltas of shards whose open beat passed its bound (the node reads no more of them)."""
        halted = self.node.take_halted()  # held shards only: the node halts nothing else
        if halted:
            self.app.consumer.pause_partitions([TP(self.topics.deltas.name, s) for s in halted])
            self._paused.update(halted)
            log.info("shards %s halted: their deltas partitions are paused until they are assigned again", halted)

    async def _reread_votes(self) -> None:
        """Read again the votes the node asks for (`votes_to_reread`) and hand them to it."""
        loop_time = asyncio.get_running_loop().time
        for shard, offset in self.node.votes_to_reread().items():
            h = self._held.get(shard)
            failed = self._reread_failed.get(shard)
            if h is None or (failed is not None and loop_time() - failed < REREAD_TIMEOUT_S):
                continue
            end = h.last_vote + 1  # where the agent is: what comes after, it hands over itself
            try:
                records = await self.rereader.read(shard, offset, end)
            except Exception as e:  # the broker is away: the node asks again later
                records, why = None, str(e)
            else:
                why = f"not all read within {REREAD_TIMEOUT_S:.0f} s"
            if records is None:
                self._reread_failed[shard] = loop_time()
                log.warning("shard %d: reading votes %d..%d again failed (%s); tried again in %.0f s",
                            shard, offset, end - 1, why, REREAD_TIMEOUT_S)  # fmt: skip
                continue
            self._reread_failed.pop(shard, None)
            self.node.reading_votes_again(shard, offset)
            self.node.on_vote_records(records)

    # -- records out ------------------------------------------------------------------------

    async def _send(self, topic: str, out: Outbound) -> Awaitable[Any]:
        producer = await self.app.maybe_start_producer()
        return await producer.send(topic, out.key, out.value, out.partition, None, out.headers)

    async def _publish_vote(self, vote: Vote) -> None:
        while True:
            try:
                self._pending.append((vote, await self._send(self.topics.votes.name, vote_out(vote))))
                return
            except Exception as e:  # enqueueing failed: retry, the vote must get out
                log.error("vote for shard %d cycle %d not sent (%s); retrying", vote.entry.shard, vote.entry.cycle, e)
                await asyncio.sleep(0.5)

    async def _deliver_votes(self) -> None:
        """Wait until the votes are on the topic; only then checkpoint and commit offsets."""
        delivered: list[Vote] = []
        while self._pending:
            pending, self._pending = self._pending, []
            failed: list[Vote] = []
            for vote, fut in pending:
                try:
                    await fut
                    delivered.append(vote)
                except Exception as e:
                    log.error("vote for shard %d cycle %d not delivered (%s); retrying", vote.entry.shard,
                              vote.entry.cycle, e)  # fmt: skip
                    failed.append(vote)
            if failed:
                await asyncio.sleep(0.5)
                for vote in failed:
                    await self._publish_vote(vote)
        if not delivered:
            return
        offsets = self.node.votes_delivered(delivered)
        if offsets and self.commit_offsets:
            tps = {TP(self.topics.deltas.name, s): o for s, o in offsets.items() if s in self._held}
            try:
                if tps:
                    await self.app.consumer._commit(tps)
            except Exception as e:  # a commit during a rebalance may fail; the checkpoint rules
                log.warning("offset commit failed: %s", e)

    async def _commit_ready(self) -> None:
        for ce in self.node.commit_ready():
            await self._publish_root(ce)

    async def _publish_root(self, ce: CommittedEntry) -> None:
        try:
            fut = await self._send(self.topics.roots.name, root_out(ce))
        except Exception as e:
            e_ = ce.entry
            log.error("root of shard %d cycle %d not sent (%s); republished later", e_.shard, e_.cycle, e)
            return

        def done(f: asyncio.Future[Any]) -> None:
            if not f.cancelled() and f.exception() is None:
                self._roots_acked.append(ce)
            else:
                e_ = ce.entry
                log.error("root of shard %d cycle %d not delivered; republished later", e_.shard, e_.cycle)

        f = asyncio.ensure_future(fut)
        f.add_done_callback(done)
        self._roots_in_flight.append(f)

    async def _settle_roots(self) -> None:
        in_flight, self._roots_in_flight = self._roots_in_flight, []
        if in_flight:
            await asyncio.wait([asyncio.ensure_future(f) for f in in_flight], timeout=30)
        self._confirm_roots()

    def _confirm_roots(self) -> None:
        self._roots_in_flight = [f for f in self._roots_in_flight if not f.done()]  # type: ignore[attr-defined]
        if self._roots_acked:
            acked, self._roots_acked = self._roots_acked, []
            self.node.roots_delivered(acked)

    async def _publish_evidence(self, out: Outbound) -> None:
        """Evidence to the evidence topic; what the broker does not take comes back in `evidence_due`."""
        try:
            fut = await self._send(self.topics.evidence.name, out)
        except Exception as e:
            log.error("equivocation evidence for shard %d not sent (%s); retried", out.partition, e)
            self.node.evidence_failed([out])
            return

        def done(f: asyncio.Future[Any]) -> None:
            if f.cancelled() or f.exception() is not None:
                log.error("equivocation evidence for shard %d not delivered; retried", out.partition)
                self.node.evidence_failed([out])

        asyncio.ensure_future(fut).add_done_callback(done)

    async def _marker(self, shard: int) -> None:
        producer = await self.app.maybe_start_producer()
        if not getattr(producer, "allow_headers", True):
            log.error("the Faust producer drops headers (producer_api_version < 0.11): no tick markers written")
            self.markers = False
            return
        # aiokafka refuses a record with neither key nor value; the key is the producer's
        # choice (PROTOCOL.md, Topics), so the marker names the peer that wrote it.
        out = marker_out(shard)._replace(key=self.peer_id.encode())
        try:
            await self._send(self.topics.deltas.name, out)
        except Exception as e:  # the next markers_due() does not repeat it; the next delta closes the beat
            log.warning("tick marker for shard %d not sent: %s", shard, e)


def add_peer(
    app: faust.App,
    settings: ChainSettings,
    peer_id: str,
    key: Ed25519PrivateKey | Sequence[Ed25519PrivateKey],
    *,
    redis_url: str = "redis://127.0.0.1:6379/0",
    prefix: str = "knhk",
    topics: Topics | None = None,
    telemetry: Telemetry | None = None,
    markers: bool = True,
    commit_offsets: bool = True,
    allow_producer_timestamps: bool = False,
    kafka_config: Mapping[str, str] | None = None,
    limits: NodeLimits | None = None,
) -> FaustPeer:
    """Make `app` a knhk-stream peer: agents on the deltas and votes topics, a timer, rebalance hooks.

    Call before the app starts. One app (one Faust consumer group) is one peer; name
    it `knhk.{chain_id}.{peer_id}` for `knhk-stream status` to show its lag. The
    topics must exist (`knhk-stream topics apply`), with the same partition count.

    Like the worker, it refuses (TopicsError) a deltas topic whose
    `message.timestamp.type` is not LogAppendTime (protocol "Beats"), unless
    `allow_producer_timestamps` (a development broker whose producers are trusted,
    such as the embedded Tansu, which ignores the setting). The check asks the app's
    brokers with confluent-kafka (the `kafka` extra); `kafka_config` holds that
    client's security settings (librdkafka names) when the brokers need them.
    `limits` are the node's bounds (`NodeLimits`: the open-beat bound, how often
    unpublished roots are republished, ...), the worker's defaults when None.
    """
    if str(getattr(app.conf.processing_guarantee, "value", app.conf.processing_guarantee)) == "exactly_once":
        raise ValueError(
            "add_peer needs processing_guarantee='at_least_once': the peer's votes must reach the votes "
            "topic before its checkpoint moves, not when a Faust transaction commits"
        )
    topics = topics or load_topics()
    if allow_producer_timestamps:
        log.warning(
            "allow_producer_timestamps: not checking that %s uses LogAppendTime; producers' timestamps drive the "
            "beats (only for a development broker whose producers are trusted)",
            topics.deltas.name,
        )
    else:
        try:
            from knhk_stream.kafka.admin import require_log_append_time
        except ImportError:
            raise MissingExtra("add_peer's LogAppendTime check of the deltas topic", "kafka") from None
        require_log_append_time(bootstrap_of(app), topics.deltas.name, kafka_config)
    node = PeerNode.connect(settings, peer_id, key, redis_url, prefix, telemetry, limits)
    return FaustPeer(app, node, topics, markers=markers, commit_offsets=commit_offsets)


def bootstrap_of(app: faust.App) -> str:
    """The app's brokers as a bootstrap list: `kafka://h1:9092;h2` -> `h1:9092,h2:9092`."""
    return ",".join(f"{url.host}:{url.port or 9092}" for url in app.conf.broker)
