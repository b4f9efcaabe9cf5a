"""Auditing a lockchain against Kafka: proof bundles, replay audits, export and import.

An auditor trusts only the chain settings (peers' public keys, threshold,
hook): entries are checked by their hashes and quorum signatures, and beats
by replaying the shard's records from Kafka through the same core the peers
run. Kafka is read by one function, `DeltaLog.read`, for both proofs and
audits; `confluent_kafka` is imported only when a log is actually read.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

from knhk_stream.errors import AuditError, ChainImportError, LockchainError, ProofUnavailable, RecordsGone
from knhk_stream.protocol.beats import Beat, BeatAssembler, beat_end_ms, beat_ms
from knhk_stream.protocol.committed import STORED_FIELDS, STORED_INT_FIELDS, CommittedEntry
from knhk_stream.protocol.encoding import ZERO_HASH
from knhk_stream.protocol.engine import is_marker
from knhk_stream.protocol.entry import Entry
from knhk_stream.protocol.jsontext import loads_json
from knhk_stream.protocol.proof import BundleCheck, StepResult, make_bundle, verify_bundle, vote_problems
from knhk_stream.protocol.receipts import ReceiptMaker, receipt_offset, rejections_by_code
from knhk_stream.protocol.settings import ChainSettings
from knhk_stream.store.lockchain import LockchainStore, VerifyReport, check_entry, verify_range

if TYPE_CHECKING:
    from knhk_stream.kafka.roots import RootsCheck

__all__ = [
    "AuditError",
    "AuditReport",
    "BundleCheck",
    "ChainImportError",
    "DeltaLog",
    "Difference",
    "Gone",
    "ImportResult",
    "Location",
    "ProofUnavailable",
    "Record",
    "RecordsGone",
    "StepResult",
    "audit_shard",
    "build_bundle",
    "compare_beat",
    "cross_check_roots",
    "export_chain",
    "import_chain",
    "locate_offset",
    "rebuild_beat",
    "replay_beats",
    "verify_bundle",
]


# -- reading the deltas topic ---------------------------------------------------------------


class Record(NamedTuple):
    offset: int
    timestamp_ms: int
    marker: bool
    value: bytes | None


@dataclass(frozen=True)
class DeltaLog:
    """Where a chain's deltas are: bootstrap servers, the deltas topic, extra librdkafka settings."""

    bootstrap: str
    topic: str
    kafka_config: Mapping[str, str] = field(default_factory=dict)
    idle_timeout_s: float = 20.0

    def read(self, shard: int, first_offset: int, through_offset: int) -> Iterator[Record]:
        """Records of `shard` in offset order from `first_offset` through the first one after `through_offset`.

        The record after `through_offset` is what closed the beat ending there; the
        iterator also ends early at the end of the log. Raises RecordsGone when the
        first record Kafka returns is beyond `first_offset` (the log was truncated).
        """
        from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

        config = {
            "bootstrap.servers": self.bootstrap,
            "group.id": f"knhk-audit-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",  # a truncated log shows as a later first offset
            "isolation.level": "read_committed",  # what peers read
            **self.kafka_config,
        }
        try:
            consumer = Consumer(config)
        except KafkaException as e:
            raise AuditError(f"cannot read Kafka at {self.bootstrap}: {e} (check --kafka-config)") from None
        try:
            consumer.assign([TopicPartition(self.topic, shard, first_offset)])
            first = True
            idle_since = time.monotonic()
            while True:
                msgs = consumer.consume(10_000, timeout=0.05)
                if not msgs:
                    if time.monotonic() - idle_since > self.idle_timeout_s:
                        raise AuditError(
                            f"Kafka returned nothing for {self.topic}[{shard}] from offset {first_offset} in "
                            f"{self.idle_timeout_s:.0f} s: is {self.bootstrap} reachable, and is the topic name right "
                            "(--topic-prefix, --declarations)?"
                        )
                    continue
                idle_since = time.monotonic()
                for m in msgs:
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            if first:
                                self._nothing_at(shard, first_offset, m.offset())
                            return
                        raise AuditError(f"reading {self.topic}[{shard}] from {self.bootstrap}: {err.str()}")
                    if first:
                        if m.offset() > first_offset:
                            raise RecordsGone(self.topic, shard, first_offset, m.offset())
                        if m.offset() < first_offset:  # out of range past the end: Kafka reset to the start
                            self._nothing_at(shard, first_offset, None)
                        first = False
                    yield Record(m.offset(), m.timestamp()[1], is_marker(m.headers(), m.value()), m.value())
                    if m.offset() > through_offset:
                        return
        finally:
            consumer.close()

    def _nothing_at(self, shard: int, wanted: int, end: int | None) -> None:
        if end is not None and end > wanted:
            raise RecordsGone(self.topic, shard, wanted, None)
        ends = f" (its log ends at offset {end})" if end is not None else ""
        raise ProofUnavailable(
            f"{self.topic}[{shard}] has no record at or after offset {wanted}{ends}: "
            "is this the chain's deltas topic (--topic-prefix, --declarations)?"
        )


def replay_beats(records: Iterable[Record], shard: int, tick_ms: int, processor: ReceiptMaker) -> Iterator[Beat]:
    """The beats a peer starting at the first record would cut, in order.

    The first record must be at a beat boundary (an entry's first_offset). At the
    end, a virtual marker of the next cycle closes the open beat, so the caller
    gets every beat whose records it fed.
    """
    asm = BeatAssembler(shard, tick_ms, processor)
    last: int | None = None
    for r in records:
        beat = asm.feed(r.offset, r.timestamp_ms, r.marker, r.value)
        last = r.offset
        if beat is not None:
            yield beat
    if last is not None and asm.open_cycle is not None:
        beat = asm.feed(last + 1, beat_end_ms(asm.open_cycle, tick_ms), True, None)
        if beat is not None:
            yield beat


def rejections(
    settings: ChainSettings, log: DeltaLog, shard: int, entries: Sequence[CommittedEntry]
) -> dict[int, dict[str, int]]:
    """Rejected receipts per code of each given entry of `shard` (oldest first), by cycle.

    Redis keeps only each beat's Merkle root, not its receipts, so the counts come
    from replaying the entries' records from Kafka: one sequential read from the
    first entry's first offset through the last one's last offset.
    """
    if not entries:
        return {}
    wanted = {ce.entry.cycle for ce in entries}
    last_cycle = max(wanted)
    out: dict[int, dict[str, int]] = {c: {} for c in wanted}
    records = log.read(shard, entries[0].entry.first_offset, entries[-1].entry.last_offset)
    try:
        for beat in replay_beats(records, shard, settings.tick_ms, settings.processor()):
            if beat.cycle > last_cycle:
                break
            if beat.cycle in wanted:
                out[beat.cycle] = rejections_by_code(beat.receipts)
    finally:
        records.close()
    return out


# -- comparing a replayed beat with its entry -----------------------------------------------


@dataclass(frozen=True)
class Difference:
    """The first place where the replay and the chain disagree."""

    cycle: int
    offset: int
    field: str
    expected: str  # what the chain says
    found: str  # what the replay of Kafka gives

    def __str__(self) -> str:
        return f"cycle {self.cycle}, offset {self.offset}: {self.field}: chain has {self.expected}, replay {self.found}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def compare_beat(e: Entry, beat: Beat | None, log_end: int | None) -> Difference | None:
    """None when the replayed beat is exactly the committed entry's beat."""
    if beat is None:
        return Difference(
            e.cycle,
            e.first_offset,
            "beat",
            f"a beat of {e.receipt_count} receipts at offsets {e.first_offset}..{e.last_offset}",
            f"no such beat: the records read end at offset {log_end}",
        )
    if beat.cycle < e.cycle:
        return Difference(
            beat.cycle,
            beat.first_offset,
            "cycle",
            f"no entry for cycle {beat.cycle} (the next entry is cycle {e.cycle} from offset {e.first_offset})",
            f"a beat of cycle {beat.cycle} with {beat.receipt_count} deltas at offsets "
            f"{beat.first_offset}..{beat.last_offset}: the chain skipped it",
        )
    if beat.cycle > e.cycle:
        return Difference(
            e.cycle,
            e.first_offset,
            "cycle",
            f"cycle {e.cycle} at offsets {e.first_offset}..{e.last_offset}",
            f"no deltas in cycle {e.cycle}; the next beat is cycle {beat.cycle} at offsets "
            f"{beat.first_offset}..{beat.last_offset}",
        )
    for name, mine, theirs, at in (
        ("first_offset", e.first_offset, beat.first_offset, min(e.first_offset, beat.first_offset)),
        ("last_offset", e.last_offset, beat.last_offset, min(e.last_offset, beat.last_offset) + 1),
        ("receipt_count", e.receipt_count, beat.receipt_count, e.first_offset),
        ("root", e.root.hex(), beat.root().hex(), e.first_offset),
    ):
        if mine != theirs:
            return Difference(e.cycle, at, name, str(mine), str(theirs))
    return None


# -- proofs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """Where an offset sits in a shard's committed chain (found by binary search)."""

    entry: CommittedEntry | None  # the entry whose offsets hold it
    before: CommittedEntry | None  # the last entry that starts at or before it
    after: CommittedEntry | None  # the entry after `before`
    head: CommittedEntry
    fetched: int  # entries read from Redis


def _entry_at_rank(store: LockchainStore, shard: int, rank: int) -> CommittedEntry:
    cycle = store.cycle_at(shard, rank)
    if cycle is None:
        raise AuditError(f"shard {shard}: the cycles set changed during the search; try again")
    ce = store.get(shard, cycle)
    if ce is None:
        raise AuditError(
            f"shard {shard} cycle {cycle} is listed in the cycles set but its entry is missing: "
            f"run `knhk-stream chain verify --shard {shard}`"
        )
    return ce


def locate_offset(store: LockchainStore, shard: int, offset: int) -> Location:
    """Binary search over the cycles set: entries are in cycle order with increasing offsets."""
    n = store.count(shard)
    if not n:
        raise ProofUnavailable(
            f"shard {shard} of chain {store.chain_id!r} has no committed entries under Redis prefix "
            f"{store.prefix!r}: nothing is committed yet, or --prefix/--settings point elsewhere"
        )
    cache: dict[int, CommittedEntry] = {}

    def at(rank: int) -> CommittedEntry:
        if rank not in cache:
            cache[rank] = _entry_at_rank(store, shard, rank)
        return cache[rank]

    lo, hi, best = 0, n - 1, -1
    while lo <= hi:
        mid = (lo + hi) // 2
        if at(mid).entry.first_offset <= offset:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    head = at(n - 1)
    before = at(best) if best >= 0 else None
    after = at(best + 1) if best + 1 < n else None
    entry = before if before is not None and offset <= before.entry.last_offset else None
    return Location(entry, before, after, head, len(cache))


def _probe(log: DeltaLog, shard: int, offset: int) -> Record | None:
    """The record at `offset`, or None if Kafka returns none there."""
    records = log.read(shard, offset, offset)
    try:
        first = next(records, None)
    except RecordsGone:
        return None
    finally:
        records.close()
    return first if first is not None and first.offset == offset else None


def _delta_record(rec: Record | None, shard: int, offset: int, absent_because: str) -> Record:
    """The record if it holds a delta; otherwise ProofUnavailable saying why there is nothing to prove."""
    if rec is None:
        raise ProofUnavailable(
            f"Kafka returns no record at offset {offset} of shard {shard} ({absent_because}): there is nothing to prove"
        )
    if rec.marker:
        raise ProofUnavailable(
            f"offset {offset} of shard {shard} is a tick marker (header knhk-marker): markers carry no delta "
            "and get no receipt, so there is nothing to prove"
        )
    return rec


def rebuild_beat(
    log: DeltaLog, settings: ChainSettings, entry: Entry, want: int | None = None
) -> tuple[Beat, Record | None]:
    """Replay one committed beat from Kafka and check it is the entry's beat.

    Returns the beat and the record at offset `want` (if asked for and found).
    Raises AuditError with the first difference when the replay disagrees.
    """
    found: list[Record] = []
    end = [entry.first_offset]
    source = log.read(entry.shard, entry.first_offset, entry.last_offset)

    def records() -> Iterator[Record]:
        for r in source:
            if r.offset == want:
                found.append(r)
            end[0] = r.offset
            yield r

    try:
        beat = next(replay_beats(records(), entry.shard, settings.tick_ms, settings.processor()), None)
    finally:
        source.close()
    diff = compare_beat(entry, beat, end[0])
    if diff is not None or beat is None:
        raise AuditError(
            f"the replay of shard {entry.shard} from Kafka does not match the committed entry: {diff}. "
            f"Run `knhk-stream audit --shard {entry.shard} --from {entry.cycle} --to {entry.cycle}`"
        )
    return beat, (found[0] if found else None)


def build_bundle(
    store: LockchainStore,
    settings: ChainSettings,
    log: DeltaLog,
    shard: int,
    offset: int,
    hash_only: bool = False,
) -> dict[str, Any]:
    """The proof bundle for the delta at `offset` of `shard`, checked before it is returned.

    ProofUnavailable says why there is none (not committed yet, a tick marker, the
    record gone from Kafka); AuditError means the chain and Kafka disagree.
    """
    loc = locate_offset(store, shard, offset)
    if loc.entry is None:
        head = loc.head.entry
        if offset > head.last_offset:
            raise ProofUnavailable(
                f"offset {offset} of shard {shard} is not committed yet (or not written yet): the committed head "
                f"is cycle {head.cycle} (offsets {head.first_offset}..{head.last_offset}). Its beat is still open "
                "or waiting for a "
                f"quorum; try again once it closes (a beat is {beat_ms(settings.tick_ms)} ms), "
                "or see `knhk-stream status`"
            )
        _delta_record(
            _probe(log, shard, offset),
            shard,
            offset,
            "a transaction control record, an aborted record, or one deleted by retention",
        )
        if loc.before is None:
            first = loc.after.entry if loc.after else head
            raise ProofUnavailable(
                f"offset {offset} of shard {shard} is before the first committed beat (cycle {first.cycle}, from "
                f"offset {first.first_offset}): the chain of this shard starts at start_offset "
                f"{settings.start_offset(shard)}, and this delta is not part of it"
            )
        b, a = loc.before.entry, loc.after.entry if loc.after else head
        raise AuditError(
            f"offset {offset} of shard {shard} holds a delta, but no committed beat covers it (cycle {b.cycle} ends "
            f"at offset {b.last_offset}, cycle {a.cycle} starts at {a.first_offset}): the chain skipped a beat. "
            f"Run `knhk-stream audit --shard {shard}`"
        )
    ce = loc.entry
    beat, found = rebuild_beat(log, settings, ce.entry, want=offset)
    rec = _delta_record(found, shard, offset, "a transaction control record or an aborted record")
    leaf = next(i for i, r in enumerate(beat.receipts) if receipt_offset(r) == offset)
    bundle = make_bundle(ce, beat.receipts, leaf, rec.value, hash_only, settings.epoch_chain.epochs)
    check = verify_bundle(bundle, settings)
    if not check.ok:
        raise AuditError(
            f"the committed entry of cycle {ce.entry.cycle} does not stand up: {check.message}. "
            f"Run `knhk-stream chain verify --shard {shard}`"
        )
    return bundle


# -- replay audits --------------------------------------------------------------------------


@dataclass(frozen=True)
class Gone:
    """Committed beats whose records Kafka no longer holds (retention)."""

    first_available: int | None
    entries: int
    first_cycle: int
    last_cycle: int

    def __str__(self) -> str:
        where = f"its log now starts at offset {self.first_available}" if self.first_available is not None else (
            "it holds none of them")  # fmt: skip
        return (
            f"{self.entries} beats (cycles {self.first_cycle}..{self.last_cycle}) cannot be replayed: Kafka no longer "
            f"holds their records ({where}; retention). Their roots were not rechecked"
        )


@dataclass
class AuditReport:
    chain_id: str
    shard: int
    from_cycle: int | None = None
    to_cycle: int | None = None
    entries: int = 0  # committed entries in the range
    replayed: int = 0  # beats replayed and found equal
    receipts: int = 0  # receipts in those beats
    records: int = 0  # Kafka records read
    first_cycle: int | None = None
    last_cycle: int | None = None
    verify: VerifyReport | None = None
    difference: Difference | None = None
    gone: Gone | None = None
    unchecked: str | None = None  # records before the first entry that Kafka no longer holds (retention)
    error: str | None = None  # the replay could not run (e.g. unreadable entries)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def status(self) -> str:
        """OK, FAILED (the chain or the replay is wrong) or INCOMPLETE (records gone from Kafka)."""
        if self.difference or self.error or (self.verify is not None and not self.verify.ok):
            return "FAILED"
        return "INCOMPLETE" if self.gone or self.unchecked else "OK"

    def problems(self) -> list[str]:
        """Each thing wrong, most precise first, as an auditor reads it."""
        out: list[str] = []
        if self.verify is not None and not self.verify.ok:
            out.append(f"chain verification: {self.verify.problems[0]}")
            if len(self.verify.problems) > 1:
                out.append(f"  ... and {len(self.verify.problems) - 1} more chain problems (`chain verify`)")
        if self.difference:
            out.append(f"replay differs at {self.difference}")
        if self.error:
            out.append(f"replay: {self.error}")
        if self.gone:
            out.append(str(self.gone))
        if self.unchecked:
            out.append(self.unchecked)
        return out

    def to_json(self) -> dict[str, Any]:
        counts = ("shard", "status", "entries", "replayed", "receipts", "records", "first_cycle", "last_cycle")
        out: dict[str, Any] = {"chain_id": self.chain_id, **{n: getattr(self, n) for n in counts}}
        out["chain"] = self.verify.to_json() if self.verify else None
        out["difference"] = self.difference.to_json() if self.difference else None
        out["gone"] = str(self.gone) if self.gone else None
        out["unchecked"] = self.unchecked
        out["error"] = self.error
        out["seconds"] = round(self.seconds, 3)
        return out


def audit_shard(
    store: LockchainStore,
    settings: ChainSettings,
    log: DeltaLog,
    shard: int,
    from_cycle: int | None = None,
    to_cycle: int | None = None,
    progress: Callable[[int], None] | None = None,
    roots: RootsCheck | None = None,
) -> AuditReport:
    """Verify the chain range, then replay its records from Kafka and compare every beat.

    Kafka is read once, sequentially: from the shard's `start_offset` (or, for a
    range, from the end of the entry before it), so that a delta before the first
    entry or between two entries that no committed receipt covers is a difference
    too. The first difference stops the replay and is reported precisely. `roots`
    (from `cross_check_roots`) adds what the roots topic says against Redis. Never
    raises on hostile data: everything wrong is in the report.
    """
    t0 = time.monotonic()
    report = AuditReport(settings.chain_id, shard, from_cycle, to_cycle)
    report.verify = verify_range(store, settings, shard, from_cycle, to_cycle)
    if roots is not None:
        report.verify.problems.extend(roots.problems.get(shard, []))
    tick = progress or (lambda _n: None)
    try:
        _replay_range(store, settings, log, report, tick)
    finally:
        report.seconds = time.monotonic() - t0
    return report


def _readable_entries(store: LockchainStore, report: AuditReport) -> Iterator[CommittedEntry]:
    for cycle, raw in store.raw_range(report.shard, report.from_cycle, report.to_cycle):
        try:
            yield CommittedEntry.from_mapping(raw)
        except (ValueError, KeyError, TypeError):
            raise _Stop(f"the entry of cycle {cycle} is missing or cannot be read, so the replay stops there") from None


class _Stop(Exception):
    pass


def _replay_range(
    store: LockchainStore, settings: ChainSettings, log: DeltaLog, report: AuditReport, tick: Callable[[int], None]
) -> None:
    shard = report.shard
    cycles = store.cycles(shard, report.from_cycle, report.to_cycle)
    report.entries = len(cycles)
    if not cycles:
        return
    report.first_cycle, report.last_cycle = cycles[0], cycles[-1]
    try:
        first, last = store.get(shard, cycles[0]), store.get(shard, cycles[-1])
        prev = store.previous(shard, cycles[0]) if report.from_cycle is not None else None
    except (ValueError, KeyError, TypeError) as e:
        report.error = f"the first or last entry of the range cannot be read ({e!r}), so nothing was replayed"
        return
    if first is None or last is None:
        report.error = "the first or last entry of the range is missing, so nothing was replayed"
        return
    # From where the chain (or the entry before the range) leaves off: every delta from there on must be covered.
    begin = prev.entry.last_offset + 1 if prev is not None else settings.start_offset(shard)
    if first.entry.first_offset < begin:
        report.difference = Difference(
            first.entry.cycle,
            first.entry.first_offset,
            "first_offset",
            str(first.entry.first_offset),
            f"the chain of shard {shard} starts at offset {begin} ("
            + ("the end of the entry before it)" if prev is not None else "its start_offset)"),
        )
        return
    entries = _readable_entries(store, report)
    start: int | None = begin
    last_offset = last.entry.last_offset
    processor = settings.processor()
    source: Iterator[Record] | None = None
    try:
        while start is not None:
            source = log.read(shard, start, last_offset)
            try:
                head = next(source, None)
                break
            except RecordsGone as gone:
                if start < first.entry.first_offset:  # the gap before the first entry is gone
                    upto = first.entry.first_offset - 1
                    if gone.first_available is not None:
                        upto = min(upto, gone.first_available - 1)
                    report.unchecked = (
                        f"Kafka no longer holds offsets {start}..{upto} of shard {shard} (retention): whether "
                        f"every delta before the first entry (cycle {first.entry.cycle}, from offset "
                        f"{first.entry.first_offset}) has a committed receipt cannot be checked"
                    )
                    if gone.first_available is not None and gone.first_available <= first.entry.first_offset:
                        start = first.entry.first_offset
                        continue
                entries, start = _skip_gone(report, entries, gone, tick)
        else:
            return  # every beat's records are gone
        assert source is not None
        end = [start]

        def counted() -> Iterator[Record]:
            for r in itertools.chain([head] if head else [], source):
                report.records += 1
                end[0] = r.offset
                yield r

        beats = replay_beats(counted(), shard, settings.tick_ms, processor)
        covered = start
        for ce in entries:
            beat = next(beats, None)
            diff = _uncovered(ce.entry, beat, covered) or compare_beat(ce.entry, beat, end[0])
            if diff is not None:
                report.difference = diff
                return
            covered = ce.entry.last_offset + 1
            report.replayed += 1
            report.receipts += ce.entry.receipt_count
            tick(1)
    except _Stop as stop:
        report.error = str(stop)
    except (AuditError, ProofUnavailable) as e:
        report.error = str(e)
    finally:
        if source is not None:
            source.close()


def _uncovered(e: Entry, beat: Beat | None, since: int) -> Difference | None:
    """A replayed beat that starts before the entry: deltas that no committed receipt covers (skipped input)."""
    if beat is None or beat.first_offset >= e.first_offset:
        return None
    return Difference(
        beat.cycle,
        beat.first_offset,
        "uncovered",
        f"no delta from offset {since} before offset {e.first_offset}, where the entry of cycle {e.cycle} starts",
        f"{beat.receipt_count} delta(s) in the beat of cycle {beat.cycle} at offsets "
        f"{beat.first_offset}..{beat.last_offset} that no committed receipt covers: input was skipped",
    )


def cross_check_roots(
    store: LockchainStore,
    settings: ChainSettings,
    log: DeltaLog,
    roots_topic: str,
    shards: Iterable[int] | None = None,
    from_cycle: int | None = None,
    to_cycle: int | None = None,
) -> RootsCheck:
    """The roots topic against Redis (protocol "Verification"), for `audit_shard(roots=...)`."""
    from knhk_stream.kafka.roots import cross_check

    return cross_check(store, settings, log.bootstrap, roots_topic, dict(log.kafka_config), shards, from_cycle,
                       to_cycle)  # fmt: skip


def _skip_gone(
    report: AuditReport, entries: Iterator[CommittedEntry], gone: RecordsGone, tick: Callable[[int], None]
) -> tuple[Iterator[CommittedEntry], int | None]:
    """Pass over the entries whose records were deleted; return the rest and where to read again."""
    skipped: list[Entry] = []
    for ce in entries:
        if gone.first_available is not None and ce.entry.first_offset >= gone.first_available:
            rest = itertools.chain([ce], entries)
            break
        skipped.append(ce.entry)
        tick(1)
    else:
        rest, ce = iter(()), None
    if skipped:
        prior = report.gone
        report.gone = Gone(
            gone.first_available,
            len(skipped) + (prior.entries if prior else 0),
            prior.first_cycle if prior else skipped[0].cycle,
            skipped[-1].cycle,
        )
    return rest, (ce.entry.first_offset if ce is not None else None)


# -- export and import ----------------------------------------------------------------------

JSON_KEYS = frozenset(STORED_FIELDS)
INT_KEYS = STORED_INT_FIELDS


def export_chain(
    store: LockchainStore,
    out: TextIO,
    shards: Iterable[int] | None = None,
    from_cycle: int | None = None,
    to_cycle: int | None = None,
) -> dict[int, int]:
    """Write committed entries as JSON Lines (one entry with its votes a line); entries per shard."""
    counts: dict[int, int] = {}
    for shard in store.shards() if shards is None else shards:
        counts[shard] = 0
        for cycle, raw in store.raw_range(shard, from_cycle, to_cycle):
            if not raw:
                raise AuditError(
                    f"shard {shard} cycle {cycle} is listed but its entry is missing: "
                    f"run `knhk-stream chain verify --shard {shard}`"
                )
            ce = CommittedEntry.from_mapping(raw)
            out.write(json.dumps(ce.to_json(), separators=(",", ":"), ensure_ascii=False) + "\n")
            counts[shard] += 1
    return counts


@dataclass
class ImportResult:
    appended: dict[int, int] = field(default_factory=dict)
    skipped: dict[int, int] = field(default_factory=dict)  # identical entries already in Redis

    @property
    def total_appended(self) -> int:
        return sum(self.appended.values())


def _parse_line(n: int, line: str) -> CommittedEntry:
    try:
        obj = loads_json(line)
    except ValueError as e:
        raise ChainImportError(n, f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ChainImportError(n, "each line must be one JSON object (an entry with its votes)")
    missing, unknown = JSON_KEYS - obj.keys(), obj.keys() - JSON_KEYS
    if missing or unknown:
        what = [f"lacks {', '.join(sorted(missing))}"] if missing else []
        what += [f"has unknown field(s) {', '.join(sorted(unknown))}"] if unknown else []
        raise ChainImportError(n, f"the entry {' and '.join(what)}")
    for k in INT_KEYS:
        if type(obj[k]) is not int or obj[k] < 0:
            raise ChainImportError(n, f"field {k!r} must be a non-negative integer, got {obj[k]!r}")
    if not isinstance(obj["votes"], list) or not all(isinstance(v, dict) for v in obj["votes"]):
        raise ChainImportError(n, "field 'votes' must be a list of {peer_id, signature}")
    try:
        return CommittedEntry.from_mapping(obj)
    except (ValueError, KeyError, TypeError) as e:
        raise ChainImportError(n, f"the entry cannot be read: {e}") from None


def import_chain(
    store: LockchainStore, settings: ChainSettings, lines: Iterable[str], dry_run: bool = False
) -> ImportResult:
    """Verify every line, then append the new entries; refuse anything that would fork or leave a hole.

    Lines may hold several shards; each shard's lines must be in cycle order and
    link to each other, and the first entry not yet in Redis must link to the
    shard's head (or to genesis on an empty chain). Entries already in Redis with
    the same entry hash are skipped. Nothing is written unless every line passes.
    """
    by_shard: dict[int, list[tuple[int, CommittedEntry]]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        ce = _parse_line(n, line)
        if ce.entry.chain_id != settings.chain_id:
            raise ChainImportError(
                n, f"the entry is of chain {ce.entry.chain_id!r}, the settings are for chain {settings.chain_id!r}"
            )
        by_shard.setdefault(ce.entry.shard, []).append((n, ce))
    plan: list[tuple[int, CommittedEntry]] = []
    result = ImportResult()
    for shard, items in sorted(by_shard.items()):
        new = _check_shard(store, settings, shard, items)
        plan += new
        result.appended[shard] = len(new)
        result.skipped[shard] = len(items) - len(new)
    if dry_run:
        return result
    for written, (n, ce) in enumerate(plan):
        try:
            store.append(ce)
        except LockchainError as e:
            raise ChainImportError(
                n, f"Redis refused the append ({e}): the chain changed during the import; {written} entries were "
                "written before it, all verified and linked"
            ) from None  # fmt: skip
    return result


def _check_shard(
    store: LockchainStore, settings: ChainSettings, shard: int, items: list[tuple[int, CommittedEntry]]
) -> list[tuple[int, CommittedEntry]]:
    """Every check for one shard's lines; returns the lines to append."""
    present = store.entry_hashes(shard, (ce.entry.cycle for _, ce in items))
    head = store.head(shard)
    head_entry = store.get(shard, head.cycle) if head else None
    new: list[tuple[int, CommittedEntry]] = []
    prev: CommittedEntry | None = None
    for n, ce in items:
        e = ce.entry
        if prev is not None and e.cycle <= prev.entry.cycle:
            raise ChainImportError(n, f"shard {shard} cycle {e.cycle} comes after cycle {prev.entry.cycle}: "
                                      "each shard's lines must be in cycle order")  # fmt: skip
        problems, _ = check_entry(ce.to_redis(), e.cycle, shard, settings, None, None)
        if problems:
            raise ChainImportError(n, f"shard {shard} " + "; ".join(str(p) for p in problems))
        bad_votes = vote_problems(ce.entry_hash, ce.votes, settings.epoch_for(ce.entry.cycle))
        if bad_votes:
            raise ChainImportError(n, f"shard {shard} cycle {e.cycle}: " + "; ".join(bad_votes))
        if prev is not None and e.prev_entry_hash != prev.entry_hash:
            raise ChainImportError(
                n, f"shard {shard} cycle {e.cycle}: prev_entry_hash {e.prev_entry_hash.hex()} is not the entry hash "
                f"of the line before ({prev.entry_hash.hex()}, cycle {prev.entry.cycle}): an entry is missing or "
                "was changed"
            )  # fmt: skip
        if prev is not None and e.first_offset <= prev.entry.last_offset:
            raise ChainImportError(n, f"shard {shard} cycle {e.cycle}: first_offset {e.first_offset} is not after "
                                      f"the previous entry's last_offset {prev.entry.last_offset}")  # fmt: skip
        if e.cycle in present:
            if present[e.cycle] != ce.entry_hash:
                raise ChainImportError(
                    n, f"shard {shard} cycle {e.cycle} already holds entry {present[e.cycle].hex()} in Redis, this "
                    f"line has entry {ce.entry_hash.hex()}: importing it would fork the chain"
                )  # fmt: skip
        elif not new:
            _check_follows_head(n, shard, ce, head_entry)
            new.append((n, ce))
        else:
            new.append((n, ce))
        prev = ce
    return new


def _check_follows_head(n: int, shard: int, ce: CommittedEntry, head: CommittedEntry | None) -> None:
    e = ce.entry
    if head is None:
        if e.prev_entry_hash != ZERO_HASH:
            raise ChainImportError(
                n, f"shard {shard} has no chain in Redis, so its first entry must link to genesis (32 zero bytes), "
                f"but cycle {e.cycle} links to {e.prev_entry_hash.hex()}: the file starts in the middle of a chain"
            )  # fmt: skip
        return
    h = head.entry
    if e.prev_entry_hash != head.entry_hash or e.cycle <= h.cycle:
        raise ChainImportError(
            n, f"shard {shard} cycle {e.cycle} does not follow the head in Redis (cycle {h.cycle}, entry "
            f"{head.entry_hash.hex()}); it links to {e.prev_entry_hash.hex()}: importing it would fork the chain "
            "or leave a hole"
        )  # fmt: skip
    if e.first_offset <= h.last_offset:
        raise ChainImportError(n, f"shard {shard} cycle {e.cycle}: first_offset {e.first_offset} is not after the "
                                  f"head's last_offset {h.last_offset}")  # fmt: skip
