"""Reading committed roots from the roots topic, each verified before it is handed out.

`RootsReader` is a consumer-group member (several members split the shards)
that yields `CommittedEntry`s in cycle order per shard, each one checked:
its entry hash recomputed from its fields, chain id, shard and key matching the
record, a valid quorum proof under the chain settings, and `prev_entry_hash`
linking to the root handed out before it on that shard. Duplicates (the topic
is at-least-once) are dropped and counted; a record that fails a check is
never handed out and is reported.

Where a reader starts on a shard (why no offset metadata): the previous root a
restarted member must link to would best travel in the committed offset's
metadata, but the embedded broker (Tansu) drops commit metadata, so the reader
re-derives it instead. It reads a look-back window of `lookback` records before
its start position (the group's committed offset, or the end of the topic for
`start="end"`) without handing them out, and anchors on the newest root there
that passes every check but the link (it carries a valid quorum proof, so it is
the committed entry of its cycle). Older records are read only when the window
holds no such root. With no committed offset and `start="beginning"` it anchors
on the genesis (32 zero bytes). Everything the reader hands out then links,
root by root, to that anchor.

Roots that arrive out of order (two peers' producers racing) are held back
until their predecessor arrives; nothing after a held root in its partition is
handed out before it resolves, and offsets never move past it. Offsets are
committed only for roots the caller has taken: a root counts as taken when the
next one is asked for, on `commit()` and on `close()`. After a `close()` (or a
rebalance) the member that takes the shards over therefore neither skips nor
repeats a root; after a crash, the roots handed out since the last commit
(every `commit_interval_s`) come again.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from knhk_stream.errors import AuditError, InvalidRoot
from knhk_stream.kafka.topics import load_topics
from knhk_stream.protocol.committed import CommittedEntry
from knhk_stream.protocol.encoding import ZERO_HASH
from knhk_stream.protocol.entry import record_key
from knhk_stream.protocol.quorum import QuorumCheck, check_quorum
from knhk_stream.protocol.settings import ChainSettings
from knhk_stream.protocol.wire import WireError, decode_root
from knhk_stream.runtime.node import Record
from knhk_stream.runtime.worker import from_message
from knhk_stream.store.lockchain import LockchainStore, Problem

__all__ = [
    "KINDS",
    "InvalidRoot",
    "RootsCheck",
    "RootsReader",
    "check_root",
    "cross_check",
    "end_offsets",
    "partition_values",
    "partitions_values",
    "read_upto",
]

log = logging.getLogger("knhk_stream.kafka.roots")

KINDS = ("bad_record", "wrong_chain", "wrong_shard", "wrong_key", "bad_quorum", "broken_link")
MAX_HELD = 10_000  # roots per shard waiting for their predecessor before they count as broken links
MAX_RECENT = 4096  # handed-out (cycle, entry hash) pairs kept per shard to tell duplicates from conflicts


@dataclass
class _Shard:
    """One partition's reading state."""

    history_end: int  # records before this offset are only read to find the anchor
    scan_from: int  # where the look-back started
    next_offset: int  # one past the last record taken in
    committed: int | None  # the group's committed offset as this member knows it
    anchored: bool = False
    last_cycle: int | None = None
    last_hash: bytes = ZERO_HASH
    candidates: list[CommittedEntry] = field(default_factory=list)
    recent: dict[int, bytes] = field(default_factory=dict)
    held: list[tuple[Record, CommittedEntry]] = field(default_factory=list)


class RootsReader:
    """Verified committed roots from the roots topic, as one member of a consumer group.

    >>> with RootsReader(settings, "127.0.0.1:9092", group_id="billing") as reader:
    ...     for root in reader:
    ...         print(root.entry.shard, root.entry.cycle, root.entry.root.hex())

    `group_id`: members of one group split the shards; `start`: where a group
    without committed offsets begins ("beginning", or "end" to see only new
    roots); `on_invalid(record, problem)`: called for each record that fails a
    check (always logged and counted in `stats["invalid"]`); `errors="raise"`:
    `poll()` raises the `InvalidRoot` in its turn instead of calling
    `on_invalid`; `kafka_config`: any librdkafka setting (it wins over ours).
    """

    def __init__(
        self,
        settings: ChainSettings,
        bootstrap: str,
        *,
        group_id: str,
        topic: str | None = None,
        start: Literal["beginning", "end"] = "beginning",
        kafka_config: dict[str, Any] | None = None,
        on_invalid: Callable[[Record, InvalidRoot], None] | None = None,
        errors: Literal["report", "raise"] = "report",
        commit_interval_s: float = 1.0,
        session_timeout_ms: int = 10_000,
        lookback: int = 1000,
    ) -> None:
        if start not in ("beginning", "end"):
            raise ValueError(f"start must be 'beginning' or 'end', got {start!r}")
        if errors not in ("report", "raise"):
            raise ValueError(f"errors must be 'report' or 'raise', got {errors!r}")
        if lookback < 1:
            raise ValueError(f"lookback must be at least 1 record, got {lookback}")
        self.settings = settings
        self.topic = topic or load_topics().roots.name
        self.group_id = group_id
        self.start = start
        self.on_invalid = on_invalid
        self.errors = errors
        self.commit_interval_s = commit_interval_s
        self.lookback = lookback
        self.stats = {"roots": 0, "duplicates": 0, "invalid": 0}
        self._common: dict[str, Any] = {"bootstrap.servers": bootstrap, **(kafka_config or {})}
        self._consumer = Consumer(
            {
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": True,
                "fetch.wait.max.ms": 100,  # brokers may hold an empty fetch this long (Tansu does)
                "session.timeout.ms": session_timeout_ms,
                "heartbeat.interval.ms": min(1000, session_timeout_ms // 3),
                "partition.assignment.strategy": "range",
                **self._common,
                "group.id": group_id,
            }
        )
        try:
            known = self._consumer.list_topics(timeout=10).topics  # unnamed: naming it may auto-create it
        except KafkaException as e:
            self._consumer.close()
            raise ConnectionError(f"cannot read the topic list from Kafka at {bootstrap}: {e}") from None
        if self.topic not in known:
            self._consumer.close()
            raise LookupError(
                f"topic {self.topic!r} does not exist at {bootstrap}; create the topics with "
                "`knhk-stream topics apply`, or check the topic name (--topic-prefix)"
            )
        self._shards: dict[int, _Shard] = {}
        self._ready: deque[tuple[Record, CommittedEntry | InvalidRoot]] = deque()
        self._returned: Record | None = None  # handed out, not yet taken
        self._last_commit = time.monotonic()
        self._closed = False
        self._consumer.subscribe(
            [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )

    # -- the caller's side ----------------------------------------------------------------

    @property
    def assignment(self) -> list[int]:
        """The shards this member reads now."""
        return sorted(self._shards)

    def poll(self, timeout: float = 1.0) -> CommittedEntry | None:
        """The next verified root (taking the previous one), or None after `timeout` seconds.

        With `errors="raise"`, an invalid record raises `InvalidRoot` in its turn.
        """
        if self._closed:
            raise RuntimeError("the reader is closed")
        self._returned = None
        deadline = time.monotonic() + timeout
        while (nxt := self._next_ready()) is None:
            self._maybe_commit()
            remaining = deadline - time.monotonic()
            self._take_in(self._consumer.consume(500, timeout=max(0.0, min(remaining, 0.5))))
            if remaining <= 0 and (nxt := self._next_ready()) is None:
                return None
        self._maybe_commit()
        record, item = nxt
        if isinstance(item, InvalidRoot):
            raise item
        self._returned = record
        self.stats["roots"] += 1
        return item

    def _next_ready(self) -> tuple[Record, CommittedEntry | InvalidRoot] | None:
        """The oldest ready item that no held root precedes in its partition.

        Keeping what is handed out before every held root (in offset order) keeps
        the committed offset just after the last root handed out, which is what a
        restarted member anchors on.
        """
        for i, (r, item) in enumerate(self._ready):
            st = self._shards.get(r.partition)
            if st is None or not st.held or min(h.offset for h, _ in st.held) > r.offset:
                del self._ready[i]
                return r, item
        return None

    def __iter__(self) -> Iterator[CommittedEntry]:
        """Every verified root, forever (until `close()`); break out to stop."""
        while not self._closed:
            root = self.poll(1.0)
            if root is not None:
                yield root

    def commit(self) -> None:
        """Commit now, counting the root last handed out as taken."""
        self._returned = None
        self._commit(list(self._shards), asynchronous=False)

    def close(self, taken: bool = True) -> None:
        """Commit and leave the group; `taken=False` leaves the last root handed out uncommitted."""
        if self._closed:
            return
        if taken:
            self._returned = None
        try:
            self._commit(list(self._shards), asynchronous=False)
        finally:
            self._closed = True
            self._consumer.close()

    def __enter__(self) -> RootsReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(taken=exc_type is None)

    # -- offsets --------------------------------------------------------------------------

    def _safe_offset(self, shard: int, st: _Shard) -> int | None:
        """Where a restarted member must start: before every root not yet taken."""
        if not st.anchored:
            return None
        pos = [st.next_offset, *(r.offset for r, _ in st.held)]
        pos += [r.offset for r, _ in self._ready if r.partition == shard]
        if self._returned is not None and self._returned.partition == shard:
            pos.append(self._returned.offset)
        return min(pos)

    def _commit(self, shards: list[int], asynchronous: bool) -> None:
        tps = []
        for shard in shards:
            st = self._shards.get(shard)
            if st is None:
                continue
            safe = self._safe_offset(shard, st)
            if safe is not None and (st.committed is None or safe > st.committed):
                tps.append(TopicPartition(self.topic, shard, safe))
                st.committed = safe
        self._last_commit = time.monotonic()
        if tps:
            try:
                self._consumer.commit(offsets=tps, asynchronous=asynchronous)
            except Exception as e:  # e.g. during a rebalance; the next commit catches up
                log.warning("roots reader: offset commit failed: %s", e)

    def _maybe_commit(self) -> None:
        if time.monotonic() - self._last_commit >= self.commit_interval_s:
            self._commit(list(self._shards), asynchronous=True)

    # -- rebalances -----------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        committed = {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout=10)}
        fresh = [tp.partition for tp in partitions if committed.get(tp.partition, -1) < 0]
        ends = self._end_offsets(fresh) if fresh and self.start == "end" else {}
        for tp in partitions:
            shard = tp.partition
            c = committed.get(shard, -1)
            end = c if c >= 0 else ends.get(shard, 0)
            scan_from = max(0, end - self.lookback)
            st = _Shard(end, scan_from, scan_from, c if c >= 0 else None)
            if end == 0:
                st.anchored = True  # genesis
            self._shards[shard] = st
            tp.offset = scan_from
            log.info("roots reader %s: shard %d from offset %d (anchor from offsets %d..%d)",
                     self.group_id, shard, end, scan_from, end)  # fmt: skip
        consumer.assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {tp.partition for tp in partitions}
        self._commit(sorted(gone & set(self._shards)), asynchronous=False)
        for shard in gone:
            self._shards.pop(shard, None)
        self._ready = deque((r, x) for r, x in self._ready if r.partition not in gone)
        consumer.unassign()

    def _end_offsets(self, shards: list[int]) -> dict[int, int]:
        """High watermarks from a fetch (the broker's ListOffsets "latest" cannot be trusted)."""
        return end_offsets(self._common, self.topic, shards)

    # -- records in -----------------------------------------------------------------------

    def _take_in(self, msgs: list[Message]) -> None:
        reset: set[int] = set()  # partitions sought back in this batch: the rest of it is stale
        for m in msgs:
            shard = m.partition()
            st = self._shards.get(shard)
            if st is None or shard in reset:
                continue
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    if not st.anchored and not self._anchor(shard, st):  # the look-back reached the end
                        reset.add(shard)
                else:
                    log.warning("roots reader: %s", err)
                continue
            r = from_message(m)
            if r is None or r.offset < st.next_offset:
                continue
            if not st.anchored:
                if r.offset < st.history_end:
                    st.next_offset = r.offset + 1
                    ce = self._candidate(r)
                    if ce is not None:
                        st.candidates.append(ce)
                    if st.next_offset >= st.history_end and not self._anchor(shard, st):
                        reset.add(shard)
                    continue
                if not self._anchor(shard, st):
                    reset.add(shard)
                    continue
            st.next_offset = r.offset + 1
            self._place(st, r)

    def _candidate(self, r: Record) -> CommittedEntry | None:
        """A history record that may be the anchor (everything but the quorum checked)."""
        try:
            return self._fields_checked(r)
        except InvalidRoot:
            return None

    def _anchor(self, shard: int, st: _Shard) -> bool:
        """End of the look-back: anchor on its newest valid root; False if it sought further back."""
        by_hash = {ce.entry_hash: ce for ce in st.candidates}
        anchor = next((ce for ce in sorted(st.candidates, key=lambda c: -c.entry.cycle) if self._quorum_ok(ce)), None)
        st.candidates = []
        if anchor is None and st.scan_from > 0:
            log.info("roots reader: no valid root in offsets %d..%d of shard %d; looking back from 0",
                     st.scan_from, st.history_end, shard)  # fmt: skip
            st.scan_from = st.next_offset = 0
            self._consumer.seek(TopicPartition(self.topic, shard, 0))
            return False
        st.anchored = True
        if anchor is not None:
            st.last_cycle, st.last_hash = anchor.entry.cycle, anchor.entry_hash
            chain = [anchor]
            while len(chain) < MAX_RECENT and (prev := by_hash.get(chain[-1].entry.prev_entry_hash)) is not None:
                chain.append(prev)
            st.recent = {ce.entry.cycle: ce.entry_hash for ce in reversed(chain)}
        return True

    def _fields_checked(self, r: Record) -> CommittedEntry:
        return fields_checked(self.settings, r)

    def _quorum_ok(self, ce: CommittedEntry) -> bool:
        return root_quorum(self.settings, ce).valid

    def _place(self, st: _Shard, r: Record) -> None:
        """A live record: check it, then drop it as a duplicate, hold it, or hand it out."""
        try:
            ce = check_root(self.settings, r)
        except InvalidRoot as e:
            self._invalid(e)
            return
        if st.last_cycle is not None and ce.entry.cycle <= st.last_cycle:
            self._settle_old(st, r, ce)
            return
        st.held.append((r, ce))
        self._resolve(st)

    def _settle_old(self, st: _Shard, r: Record, ce: CommittedEntry) -> None:
        """A root for a cycle at or before the last one handed out: a duplicate, or not of this chain."""
        cycle = ce.entry.cycle
        known = st.recent.get(cycle)
        if known == ce.entry_hash or (known is None and (not st.recent or cycle < next(iter(st.recent)))):
            self.stats["duplicates"] += 1  # the same entry, or one from before what this reader remembers
            return
        chain = f"the chain's root of cycle {cycle} is {known.hex()}" if known else f"the chain has no cycle {cycle}"
        self._broken(r, ce, chain)

    def _broken(self, r: Record, ce: CommittedEntry, why: str) -> None:
        self._invalid(
            InvalidRoot(
                "broken_link",
                f"cycle {ce.entry.cycle} entry {ce.entry_hash.hex()[:16]} with prev_entry_hash "
                f"{ce.entry.prev_entry_hash.hex()[:16]} does not link: {why}",
                r,
            )
        )

    def _resolve(self, st: _Shard) -> None:
        """Hand out every held root that now links; roots overtaken by the chain are broken links."""
        linked = True
        while linked:
            linked = False
            for i, (r, ce) in enumerate(st.held):
                if ce.entry.prev_entry_hash == st.last_hash:
                    del st.held[i]
                    st.last_cycle, st.last_hash = ce.entry.cycle, ce.entry_hash
                    st.recent[ce.entry.cycle] = ce.entry_hash
                    if len(st.recent) > MAX_RECENT:
                        del st.recent[next(iter(st.recent))]
                    self._ready.append((r, ce))
                    linked = True
                    break
        if st.last_cycle is not None:
            overtaken = [(r, ce) for r, ce in st.held if ce.entry.cycle <= st.last_cycle]
            for r, ce in overtaken:
                st.held.remove((r, ce))
                self._broken(r, ce, f"the chain reached cycle {st.last_cycle} without its predecessor")
        while len(st.held) > MAX_HELD:
            r, ce = st.held.pop(0)
            self._broken(r, ce, f"its predecessor did not arrive within {MAX_HELD} roots")

    def _invalid(self, e: InvalidRoot) -> None:
        self.stats["invalid"] += 1
        log.warning("roots topic: INVALID record, not handed out: %s", e)
        if self.errors == "raise":
            self._ready.append((e.record, e))
        elif self.on_invalid is not None:
            self.on_invalid(e.record, e)


# -- checking one record, and the roots topic against Redis ---------------------------------


def fields_checked(settings: ChainSettings, r: Record, check_key: bool = True) -> CommittedEntry:
    """A roots-topic record decoded, its entry hash recomputed, its chain and shard those of the settings and
    its partition; InvalidRoot otherwise. `check_key=False` ignores the record key (protocol "Verification")."""
    try:
        ce = decode_root(r.value)
    except WireError as e:
        raise InvalidRoot("bad_record", str(e), r) from None
    e = ce.entry
    if e.chain_id != settings.chain_id:
        raise InvalidRoot("wrong_chain", f"chain_id {e.chain_id!r}, the settings say {settings.chain_id!r}", r)
    if e.shard != r.partition:
        raise InvalidRoot("wrong_shard", f"shard {e.shard} in partition {r.partition}", r)
    if check_key:
        key = record_key(e.chain_id, e.shard, e.cycle)
        if r.key != key.encode():
            raise InvalidRoot("wrong_key", f"key {r.key!r}, the fields say {key!r}", r)
    return ce


def root_quorum(settings: ChainSettings, ce: CommittedEntry) -> QuorumCheck:
    """The root's epoch is the epoch of its cycle and its votes are a quorum of that epoch."""
    epoch = settings.epoch_for(ce.entry.cycle)
    if ce.epoch != epoch.number:
        why = f"epoch {ce.epoch}, but cycle {ce.entry.cycle} is in epoch {epoch.number}"
        return QuorumCheck(False, (), (), (why,))
    return check_quorum(ce.entry_hash, ce.votes, epoch)


def check_root(settings: ChainSettings, r: Record, check_key: bool = True) -> CommittedEntry:
    """Every check of one roots-topic record but its link: the entry if valid, else InvalidRoot (nothing else)."""
    ce = fields_checked(settings, r, check_key)
    try:
        q = root_quorum(settings, ce)
    except (ValueError, TypeError) as e:  # hostile data is a finding, never a crash
        raise InvalidRoot("bad_quorum", f"cannot be checked: {e}", r) from None
    if not q.valid:
        raise InvalidRoot("bad_quorum", "; ".join(q.problems), r)
    return ce


def _probe_config(common: dict[str, Any]) -> dict[str, Any]:
    return {
        **common,
        "group.id": f"knhk.roots.probe.{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 100,
    }


def end_offsets(common: dict[str, Any], topic: str, partitions: Iterable[int], timeout_s: float = 30) -> dict[int, int]:
    """High watermarks from a fetch (a broker's ListOffsets "latest" cannot be trusted: Tansu's is wrong)."""
    shards = sorted(set(partitions))
    probe = Consumer(_probe_config(common))
    ends: dict[int, int] = {}
    try:
        probe.assign([TopicPartition(topic, s, 0) for s in shards])
        deadline = time.monotonic() + timeout_s
        while len(ends) < len(shards):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no high watermark of {topic} partitions {sorted(set(shards) - set(ends))}")
            for m in probe.consume(100, timeout=0.5):
                s = m.partition()
                if s in ends:
                    continue
                err = m.error()
                if err is not None and err.code() == KafkaError._PARTITION_EOF:
                    ends[s] = m.offset()
                elif err is None:
                    high = probe.get_watermark_offsets(TopicPartition(topic, s), cached=True)[1]
                    if high >= 0:
                        ends[s] = high
    finally:
        probe.close()
    return ends


def read_upto(
    common: dict[str, Any],
    topic: str,
    ends: dict[int, int],
    timeout_s: float = 30,
    starts: dict[int, int] | None = None,
) -> Iterator[Message]:
    """Every record of the partitions from `starts` (default 0) up to (not including) their noted end
    offsets, per partition in order."""
    first = starts or {}
    todo = {s: e for s, e in ends.items() if e > first.get(s, 0)}
    if not todo:
        return
    c = Consumer(_probe_config(common))
    try:
        c.assign([TopicPartition(topic, s, first.get(s, 0)) for s in todo])
        idle = time.monotonic()
        while todo:
            msgs = c.consume(1000, timeout=0.5)
            if not msgs and time.monotonic() - idle > timeout_s:
                raise AuditError(f"reading {topic}: partitions {sorted(todo)} gave nothing for {timeout_s:.0f} s")
            for m in msgs:
                idle = time.monotonic()
                s = m.partition()
                if s not in todo:
                    continue
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF and m.offset() >= todo[s]:
                        del todo[s]
                    elif err.code() != KafkaError._PARTITION_EOF:
                        raise AuditError(f"reading {topic}[{s}]: {err.str()}")
                    continue
                if m.offset() < todo[s]:
                    yield m
                if m.offset() + 1 >= todo[s]:
                    del todo[s]
    finally:
        c.close()


def partition_values(
    common: dict[str, Any], topic: str, partition: int, timeout_s: float = 30, last: int | None = None
) -> list[bytes | None]:
    """The values of one partition's records, oldest first, up to its end when called; with `last`, only
    the newest `last` records (a tail costs one fetch for the end offset and at most `last` records)."""
    return partitions_values(common, topic, [partition], timeout_s, last).get(partition, [])


def partitions_values(
    common: dict[str, Any], topic: str, partitions: Iterable[int], timeout_s: float = 30, last: int | None = None
) -> dict[int, list[bytes | None]]:
    """`partition_values` of several partitions at the cost of one (two consumers in all)."""
    ends = end_offsets(common, topic, partitions, timeout_s)
    starts = None if last is None else {s: max(0, e - last) for s, e in ends.items()}
    out: dict[int, list[bytes | None]] = {s: [] for s in ends}
    for m in read_upto(common, topic, ends, timeout_s, starts):
        out[m.partition()].append(m.value())
    return out


@dataclass
class RootsCheck:
    """The roots topic against Redis (protocol "Verification"), per shard."""

    topic: str
    ends: dict[int, int] = field(default_factory=dict)  # end offsets noted before Redis was read
    records: int = 0
    valid: int = 0
    invalid: int = 0  # records that are not valid roots: never a finding (anyone may write the topic)
    newest: dict[int, int] = field(default_factory=dict)  # shard -> cycle of its newest valid root
    problems: dict[int, list[Problem]] = field(default_factory=dict)

    @property
    def shards(self) -> list[int]:
        """Shards with valid roots."""
        return sorted(self.newest)


def cross_check(
    store: LockchainStore,
    settings: ChainSettings,
    bootstrap: str,
    topic: str,
    kafka_config: dict[str, Any] | None = None,
    shards: Iterable[int] | None = None,
    from_cycle: int | None = None,
    to_cycle: int | None = None,
    timeout_s: float = 30,
) -> RootsCheck:
    """Compare Redis with the roots topic: truncation, deletion and forks show here, not in Redis alone.

    The topic's end offsets are noted before Redis is read; every valid root up to
    them (fields, entry hash, epoch and quorum checked; the record key ignored;
    deduplicated by entry hash) must be in Redis with the same entry hash. A shard
    with valid roots and no chain in Redis is a finding too. Invalid records are
    counted, never findings, and never hide a valid root. AuditError when Kafka
    cannot be read.
    """
    common: dict[str, Any] = {"bootstrap.servers": bootstrap, **(kafka_config or {})}
    probe = Consumer(_probe_config(common))
    try:
        meta = probe.list_topics(timeout=10).topics  # unnamed: naming a topic may auto-create it
    except KafkaException as e:
        raise AuditError(f"cannot read the topic list from Kafka at {bootstrap}: {e}") from None
    finally:
        probe.close()
    if topic not in meta:
        raise AuditError(
            f"the roots topic {topic!r} does not exist at {bootstrap}: check --topic-prefix / --declarations "
            "(without --bootstrap, `chain verify` checks Redis alone)"
        )
    partitions = sorted(meta[topic].partitions)
    if shards is not None:
        partitions = [s for s in partitions if s in set(shards)]
    report = RootsCheck(topic)
    try:
        report.ends = end_offsets(common, topic, partitions, timeout_s)
    except TimeoutError as e:
        raise AuditError(f"{e} from {bootstrap}") from None
    valid: dict[int, dict[bytes, CommittedEntry]] = {}
    for m in read_upto(common, topic, report.ends, timeout_s):
        report.records += 1
        r = Record(m.partition(), m.offset(), 0, None, m.value(), m.key())
        try:
            ce = check_root(settings, r, check_key=False)
        except InvalidRoot:
            report.invalid += 1
            continue
        c = ce.entry.cycle
        if (from_cycle is not None and c < from_cycle) or (to_cycle is not None and c > to_cycle):
            continue
        valid.setdefault(r.partition, {}).setdefault(ce.entry_hash, ce)
    for shard, by_hash in sorted(valid.items()):
        report.valid += len(by_hash)
        report.problems[shard] = _compare(store, shard, sorted(by_hash.values(), key=lambda ce: ce.entry.cycle),
                                          topic)  # fmt: skip
        report.newest[shard] = max(ce.entry.cycle for ce in by_hash.values())
    return report


def _compare(store: LockchainStore, shard: int, roots: list[CommittedEntry], topic: str) -> list[Problem]:
    out: list[Problem] = []
    try:
        head = store.head(shard)
    except ValueError:
        head = None
    present = store.entry_hashes(shard, sorted({ce.entry.cycle for ce in roots}))
    first, last = roots[0].entry.cycle, roots[-1].entry.cycle
    if head is None and not present:
        out.append(Problem(None, ("head",), f"{len(roots)} valid roots of this shard are on {topic} (cycles "
                           f"{first}..{last}), but it has no chain in Redis: the shard was deleted"))  # fmt: skip
        return out
    by_cycle: dict[int, list[CommittedEntry]] = {}
    for ce in roots:
        by_cycle.setdefault(ce.entry.cycle, []).append(ce)
    missing = []
    for cycle, ces in sorted(by_cycle.items()):
        if len(ces) > 1:
            hashes = ", ".join(ce.entry_hash.hex()[:16] for ce in ces)
            why = f"{topic} holds {len(ces)} quorum-signed entries for this cycle ({hashes}): a fork"
            out.append(Problem(cycle, ("entry_hash",), why + " signed by more than threshold - 1 peers"))
        stored = present.get(cycle)
        if stored is None:
            missing.append(cycle)
        elif all(stored != ce.entry_hash for ce in ces):
            out.append(Problem(cycle, ("entry_hash",), f"Redis holds entry {stored.hex()}, but {topic} holds the "
                               f"quorum-signed entry {ces[0].entry_hash.hex()} for this cycle: a fork"))  # fmt: skip
    if missing:
        where = "no head" if head is None else f"its head is cycle {head.cycle}"
        shown = ", ".join(str(c) for c in missing[:10]) + (", ..." if len(missing) > 10 else "")
        out.append(Problem(missing[0], ("cycles",), f"{len(missing)} committed entries on {topic} (valid quorums; "
                           f"cycles {shown}) are missing from Redis ({where}; the newest valid root is cycle {last}): "
                           "the chain was cut short (truncated) or entries were deleted. Restore them from the "
                           "roots topic or an export (`knhk-stream chain import`)"))  # fmt: skip
    return out
