"""What `knhk-stream status` reports: per shard, the head, each peer's progress, lag and flags.

Everything read back is checked before it is shown as a fact: a checkpoint by
its peer's signature, equivocation evidence by both of its signatures (Redis
and the append-only evidence topic; anyone can write either). What peers
report about themselves (halts, alarms) is shown as their report.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from typing import Any

from knhk_stream.kafka.topics import Topics
from knhk_stream.protocol.engine import is_marker
from knhk_stream.protocol.jsontext import loads_json
from knhk_stream.protocol.settings import ChainSettings
from knhk_stream.store.lockchain import (
    LockchainStore,
    checkpoint_verifies,
    evidence_key,
    evidence_problem,
    get_evidence,
    get_health,
    get_stall,
    load_checkpoint,
)

ALARM_SHOWN_MS = 3_600_000  # alarms a peer reported within the last hour are shown (and make status exit 3)
REPORT_STALE_MS = 60_000  # a peer's report older than this is shown as stale
LAG_SCAN_MAX = 200_000  # records read per shard to count lag in deltas; a peer further behind: offsets


@dataclass
class PeerProgress:
    peer_id: str
    voted_cycle: int | None = None
    state: str = "no vote yet"  # agrees | DISSENTS | ahead | no vote yet | BAD CHECKPOINT
    lag: int | None = None  # deltas behind the high watermark (tick markers and control records not counted)
    lag_lso: int | None = None  # deltas behind the last stable offset (what read_committed peers can read)
    report: dict[str, Any] | None = None  # what the peer wrote about the shard (halts, alarms, counts)


@dataclass
class ShardStatus:
    shard: int
    head_cycle: int | None = None
    head_age_s: float | None = None
    entries: int = 0
    high_watermark: int | None = None
    last_stable_offset: int | None = None
    waits_on_lso: str | None = None  # why read_committed peers cannot read further, if an open transaction
    stalled: dict[str, str] | None = None
    equivocations: list[dict[str, Any]] = field(default_factory=list)  # verified evidence only
    invalid_evidence: int = 0  # evidence records that do not verify (ignored)
    alarms: list[dict[str, Any]] = field(default_factory=list)  # {peer_id, kind, message, at_ms}
    # {peer_id, since_ms, receipts, by_code}: rejected receipts per code in the beats a peer closed since it took
    # the shard (its own report: the peer holding the shard longest among the fresh reports)
    rejected: dict[str, Any] | None = None
    peers: list[PeerProgress] = field(default_factory=list)

    @property
    def needs_attention(self) -> bool:
        """A stall, equivocation evidence or a peer's alarm: `status` exits 3."""
        return bool(self.stalled or self.equivocations or self.alarms)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class KafkaView:
    """What status reads from Kafka: positions of the deltas topic, and the evidence topic."""

    watermarks: dict[int, int] = field(default_factory=dict)  # deltas topic high watermarks
    stable: dict[int, int] = field(default_factory=dict)  # deltas topic last stable offsets
    committed: dict[tuple[str, int], int] = field(default_factory=dict)  # (peer, shard) -> group offset
    evidence: dict[int, list[Any]] = field(default_factory=dict)  # shard -> evidence objects (unverified)
    scanned_from: dict[int, int] = field(default_factory=dict)  # shard -> first offset read to count deltas
    delta_offsets: dict[int, list[int]] = field(default_factory=dict)  # shard -> offsets of deltas read (sorted)

    def lag(self, shard: int, committed: int) -> tuple[int | None, int | None]:
        """(lag from the high watermark, lag from the last stable offset) of a group at `committed`, in deltas.

        Kafka users read lag 0 as "caught up": tick markers (which a peer's committed
        offset stays behind while its beat is open) and transaction control records
        are not input, so only deltas are counted. Where the scan did not reach back
        to `committed`, or records past the last stable offset cannot be read, those
        are counted as offsets.
        """
        hw, lso = self.watermarks.get(shard), self.stable.get(shard)
        start = self.scanned_from.get(shard)
        if start is None or committed < start or lso is None:
            return (None if hw is None else max(0, hw - committed)), (None if lso is None else max(0, lso - committed))
        offsets = self.delta_offsets.get(shard, [])
        behind = len(offsets) - bisect_left(offsets, committed)
        return (None if hw is None else behind + max(0, hw - max(lso, committed))), behind


def kafka_view(
    bootstrap: str,
    topics: Topics,
    settings: ChainSettings,
    kafka_config: dict[str, Any] | None = None,
    evidence: bool = True,
) -> KafkaView:
    """High watermarks and last stable offsets of the deltas topic, each peer group's committed offsets, and
    (with `evidence`) the records of the evidence topic."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    common = {"bootstrap.servers": bootstrap, **(kafka_config or {})}
    n = topics.deltas.partitions
    view = KafkaView()
    for peer in settings.epoch_chain.newest.peers:
        c = Consumer({**common, "group.id": f"knhk.{settings.chain_id}.{peer.id}", "enable.auto.commit": False})
        try:
            tps = c.committed([TopicPartition(topics.deltas.name, p) for p in range(n)], timeout=10)
            for tp in tps:
                if tp.offset >= 0:
                    view.committed[(peer.id, tp.partition)] = tp.offset
        finally:
            c.close()
    # Tansu's ListOffsets "latest" is wrong: take the high watermark a fetch returns. A read_committed
    # consumer reaches the end of a partition at its last stable offset, which an open transaction holds back.
    c = Consumer(
        {
            **common,
            "group.id": "knhk.status",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
        }
    )
    try:
        starts = {}
        for p in range(n):
            known = [off for (_pid, s), off in view.committed.items() if s == p]
            # from the group furthest behind (within LAG_SCAN_MAX of the furthest on), to count its lag in deltas
            near = [k for k in known if k >= max(known) - LAG_SCAN_MAX] if known else []
            starts[p] = max(0, min(near) - 1) if near else OFFSET_BEGINNING
        c.assign([TopicPartition(topics.deltas.name, p, starts[p]) for p in range(n)])
        deadline = time.monotonic() + 10
        while len(view.stable) < n and time.monotonic() < deadline:
            for m in c.consume(5000, timeout=0.2):
                p = m.partition()
                err = m.error()
                if p in view.stable or (err is not None and err.code() != KafkaError._PARTITION_EOF):
                    continue
                if err is None:
                    view.scanned_from.setdefault(p, max(0, starts[p]))
                    if not is_marker(m.headers(), m.value()):
                        view.delta_offsets.setdefault(p, []).append(m.offset())
                else:
                    view.scanned_from.setdefault(p, m.offset())  # nothing to read from the start
                _low, high = c.get_watermark_offsets(TopicPartition(topics.deltas.name, p), cached=True)
                if high >= 0:
                    view.watermarks[p] = high
                if err is not None:
                    view.stable[p] = m.offset()
    finally:
        c.close()
    if evidence:
        view.evidence = read_evidence(common, topics.evidence.name if topics.evidence else "", n)
    return view


def read_evidence(common: dict[str, Any], topic: str, partitions: int) -> dict[int, list[Any]]:
    """Every record of the evidence topic as JSON (unverified), per partition; {} when there is no such topic."""
    from confluent_kafka import Consumer

    from knhk_stream.kafka.roots import end_offsets, read_upto

    probe = Consumer({**common, "group.id": "knhk.status.evidence", "enable.auto.commit": False})
    try:
        known = probe.list_topics(timeout=10).topics
    finally:
        probe.close()
    if not topic or topic not in known:
        return {}
    parts = sorted(known[topic].partitions)[: max(partitions, len(known[topic].partitions))]
    out: dict[int, list[Any]] = {}
    for m in read_upto(common, topic, end_offsets(common, topic, parts)):
        try:
            obj = loads_json(m.value() or b"")
        except ValueError:
            obj = None  # counted as invalid evidence
        out.setdefault(m.partition(), []).append(obj)
    return out


def shard_status(
    store: LockchainStore,
    settings: ChainSettings,
    shard: int,
    kafka: KafkaView | None = None,
) -> ShardStatus:
    st = ShardStatus(shard)
    try:
        head = store.head(shard)
    except ValueError as e:
        head = None
        st.alarms.append({"peer_id": None, "kind": "unreadable_head", "message": str(e), "at_ms": None})
    if head is not None:
        st.head_cycle = head.cycle
        st.entries = store.count(shard)
        try:
            ce = store.get(shard, head.cycle)
        except (ValueError, KeyError, TypeError):
            ce = None
        if ce is not None:
            st.head_age_s = round(time.time() - ce.committed_at_ms / 1000, 1)
    st.stalled = get_stall(store, shard)
    _evidence(st, settings, get_evidence(store, shard) + list((kafka.evidence if kafka else {}).get(shard, [])))
    if kafka is not None:
        st.high_watermark = kafka.watermarks.get(shard)
        st.last_stable_offset = kafka.stable.get(shard)
    reports = get_health(store, shard)
    t = int(time.time() * 1000)
    for peer in settings.epoch_chain.newest.peers:
        pp = PeerProgress(peer.id)
        try:
            cp = load_checkpoint(store, peer.id, shard)
        except ValueError:
            cp, pp.state = None, "BAD CHECKPOINT"
        keys = [e.public_keys[peer.id] for e in settings.epoch_chain.epochs if peer.id in e.public_keys]
        if cp is not None and not checkpoint_verifies(settings.chain_id, peer.id, shard, cp, keys):
            pp.state = "BAD CHECKPOINT"  # not signed by the peer: someone else wrote it
        elif cp is not None and cp.cycle is not None:
            pp.voted_cycle = cp.cycle
            if head is None or cp.cycle > head.cycle:
                pp.state = "ahead"
            else:
                try:
                    mine = store.get(shard, cp.cycle)
                except (ValueError, KeyError, TypeError):
                    mine = None
                pp.state = "agrees" if mine is not None and mine.entry_hash == cp.entry_hash else "DISSENTS"
        off = None if kafka is None else kafka.committed.get((peer.id, shard))
        if off is not None and kafka is not None:
            pp.lag, pp.lag_lso = kafka.lag(shard, off)
        report = reports.get(peer.id)
        if report is not None:
            pp.report = report
            at = report.get("at_ms") if isinstance(report.get("at_ms"), int) else 0
            for a in report.get("alarms") or []:
                if isinstance(a, dict) and isinstance(a.get("at_ms"), int) and t - a["at_ms"] < ALARM_SHOWN_MS:
                    st.alarms.append({"peer_id": peer.id, "kind": str(a.get("kind")),
                                      "message": str(a.get("message")), "at_ms": a["at_ms"]})  # fmt: skip
            for kind in ("halted", "blocked"):
                if (
                    report.get(kind)
                    and t - at < ALARM_SHOWN_MS
                    and not any(x["peer_id"] == peer.id and x["message"] == str(report[kind]) for x in st.alarms)
                ):
                    st.alarms.append({"peer_id": peer.id, "kind": kind, "message": str(report[kind]), "at_ms": at})
        st.peers.append(pp)
        counted = _rejected_counts(report, t)
        if counted is not None and (st.rejected is None or counted["receipts"] > st.rejected["receipts"]):
            st.rejected = {"peer_id": peer.id, **counted}
    if (
        st.high_watermark is not None
        and st.last_stable_offset is not None
        and (st.last_stable_offset < st.high_watermark)
    ):
        waiting = [pp.peer_id for pp in st.peers if pp.lag_lso == 0 and pp.lag]
        st.waits_on_lso = (
            f"an open transaction on the deltas topic holds the last stable offset at {st.last_stable_offset} "
            f"(high watermark {st.high_watermark}): read_committed peers cannot read past it"
            + (f" ({', '.join(waiting)} have read everything up to it)" if waiting else "")
            + ". The peers are not slow: find the producer whose transaction is open (kafka-transactions.sh "
            "list / describe) and let it commit or abort, or wait for transaction.max.timeout.ms"
        )
    return st


def _rejected_counts(report: dict[str, Any] | None, t: int) -> dict[str, Any] | None:
    """A fresh peer report's rejection counts, if they have the expected shape (peers' reports are not trusted)."""
    if report is None or not isinstance(report.get("at_ms"), int) or t - report["at_ms"] >= REPORT_STALE_MS:
        return None
    counted = report.get("rejected")
    if not isinstance(counted, dict):
        return None
    by_code = counted.get("by_code")
    if not (
        isinstance(counted.get("since_ms"), int)
        and isinstance(counted.get("receipts"), int)
        and isinstance(by_code, dict)
        and all(isinstance(k, str) and isinstance(v, int) for k, v in by_code.items())
    ):
        return None
    return {"since_ms": counted["since_ms"], "receipts": counted["receipts"], "by_code": dict(by_code)}


def _evidence(st: ShardStatus, settings: ChainSettings, found: list[Any]) -> None:
    """Keep the evidence that verifies (once each), count the rest."""
    seen: set[str] = set()
    for obj in found:
        if evidence_problem(settings, obj) is not None or obj.get("shard") != st.shard:
            st.invalid_evidence += 1
            continue
        key = evidence_key(obj)
        if key not in seen:
            seen.add(key)
            st.equivocations.append(obj)


def render(statuses: list[ShardStatus]) -> str:
    lines = []
    now = int(time.time() * 1000)
    for st in statuses:
        head = "no commits yet" if st.head_cycle is None else f"head cycle {st.head_cycle} ({st.entries} entries"
        if st.head_age_s is not None:
            head += f", last commit {st.head_age_s}s ago)"
        elif st.head_cycle is not None:
            head += ")"
        hw = "" if st.high_watermark is None else f", high watermark {st.high_watermark}"
        if st.last_stable_offset is not None and st.last_stable_offset != st.high_watermark:
            hw += f", last stable offset {st.last_stable_offset}"
        lines.append(f"shard {st.shard}: {head}{hw}")
        if st.stalled:
            lines.append(f"  !! STALLED at cycle {st.stalled.get('cycle')}: {st.stalled.get('reason')}")
        if st.waits_on_lso:
            lines.append(f"  !! WAITS ON THE LAST STABLE OFFSET: {st.waits_on_lso}")
        for ev in st.equivocations:
            lines.append(f"  !! EQUIVOCATION by {ev['peer_id']} at cycle {ev['cycle']} (both signatures verify)")
        if st.invalid_evidence:
            lines.append(f"  {st.invalid_evidence} evidence record(s) that do not verify were ignored")
        if st.rejected is not None:
            r = st.rejected
            codes = ", ".join(f"{code} {k:,}" for code, k in sorted(r["by_code"].items())) or "none"
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["since_ms"] / 1000))
            lines.append(f"  rejected: {codes} of {r['receipts']:,} receipts since {since} "
                         f"(as {r['peer_id']} counted the beats it closed)")  # fmt: skip
        for a in st.alarms:
            age = "" if not isinstance(a.get("at_ms"), int) else f" ({(now - a['at_ms']) / 1000:.0f}s ago)"
            who = f"{a['peer_id']}: " if a.get("peer_id") else ""
            lines.append(f"  !! {who}{str(a['kind']).upper()}{age}: {a['message']}")
        for pp in st.peers:
            lag = "" if pp.lag is None else f", lag {pp.lag}"
            if pp.lag_lso is not None and pp.lag_lso != pp.lag:
                lag += f" ({pp.lag_lso} from the last stable offset)"
            voted = "-" if pp.voted_cycle is None else str(pp.voted_cycle)
            flag = "  <-- dissent" if pp.state == "DISSENTS" else ""
            if pp.state == "BAD CHECKPOINT":
                flag = "  <-- its checkpoint in Redis is not signed by it (the peer ignores it)"
            stale = ""
            if pp.report and isinstance(pp.report.get("at_ms"), int) and now - pp.report["at_ms"] > REPORT_STALE_MS:
                stale = f"  (last report {(now - pp.report['at_ms']) / 1000:.0f}s ago)"
            lines.append(f"  {pp.peer_id:<16} voted {voted:>12}  {pp.state}{lag}{flag}{stale}")
    return "\n".join(lines)
