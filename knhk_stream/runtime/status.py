"""What `knhk-stream status` reports: per shard, the head, each peer's progress, lag and flags."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from knhk_stream.kafka.topics import Topics
from knhk_stream.protocol.settings import ChainSettings
from knhk_stream.store.lockchain import LockchainStore, get_evidence, get_stall, load_checkpoint


@dataclass
class PeerProgress:
    peer_id: str
    voted_cycle: int | None = None
    state: str = "no vote yet"  # agrees | DISSENTS | ahead | no vote yet
    lag: int | None = None


@dataclass
class ShardStatus:
    shard: int
    head_cycle: int | None = None
    head_age_s: float | None = None
    entries: int = 0
    high_watermark: int | None = None
    stalled: dict[str, str] | None = None
    equivocations: list[dict[str, Any]] = field(default_factory=list)
    peers: list[PeerProgress] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def kafka_positions(
    bootstrap: str, topics: Topics, settings: ChainSettings, kafka_config: dict[str, str] | None = None
) -> tuple[dict[int, int], dict[tuple[str, int], int]]:
    """High watermarks of the deltas topic (from fetches) and each peer group's committed offsets."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    common = {"bootstrap.servers": bootstrap, **(kafka_config or {})}
    n = topics.deltas.partitions
    committed: dict[tuple[str, int], int] = {}
    for peer in settings.epoch_chain.newest.peers:
        c = Consumer({**common, "group.id": f"knhk.{settings.chain_id}.{peer.id}", "enable.auto.commit": False})
        try:
            tps = c.committed([TopicPartition(topics.deltas.name, p) for p in range(n)], timeout=10)
            for tp in tps:
                if tp.offset >= 0:
                    committed[(peer.id, tp.partition)] = tp.offset
        finally:
            c.close()
    # Tansu's ListOffsets "latest" is wrong: take the high watermark a fetch returns.
    c = Consumer({**common, "group.id": "knhk.status", "enable.auto.commit": False, "enable.partition.eof": True})
    watermarks: dict[int, int] = {}
    try:
        starts = {}
        for p in range(n):
            known = [off for (pid, s), off in committed.items() if s == p]
            starts[p] = max(0, max(known) - 1) if known else OFFSET_BEGINNING
        c.assign([TopicPartition(topics.deltas.name, p, starts[p]) for p in range(n)])
        deadline = time.monotonic() + 10
        while len(watermarks) < n and time.monotonic() < deadline:
            for m in c.consume(500, timeout=0.2):
                p = m.partition()
                if p in watermarks:
                    continue
                _low, high = c.get_watermark_offsets(TopicPartition(topics.deltas.name, p), cached=True)
                if high >= 0:
                    watermarks[p] = high
    finally:
        c.close()
    return watermarks, committed


def shard_status(
    store: LockchainStore,
    settings: ChainSettings,
    shard: int,
    watermarks: dict[int, int] | None = None,
    committed: dict[tuple[str, int], int] | None = None,
) -> ShardStatus:
    st = ShardStatus(shard)
    head = store.head(shard)
    if head is not None:
        st.head_cycle = head.cycle
        st.entries = store.count(shard)
        ce = store.get(shard, head.cycle)
        if ce is not None:
            st.head_age_s = round(time.time() - ce.committed_at_ms / 1000, 1)
    st.stalled = get_stall(store, shard)
    st.equivocations = get_evidence(store, shard)
    st.high_watermark = (watermarks or {}).get(shard)
    for peer in settings.epoch_chain.newest.peers:
        pp = PeerProgress(peer.id)
        cp = load_checkpoint(store, peer.id, shard)
        if cp is not None and cp.cycle is not None:
            pp.voted_cycle = cp.cycle
            if head is None or cp.cycle > head.cycle:
                pp.state = "ahead"
            else:
                mine = store.get(shard, cp.cycle)
                pp.state = "agrees" if mine is not None and mine.entry_hash == cp.entry_hash else "DISSENTS"
        off = (committed or {}).get((peer.id, shard))
        if off is not None and st.high_watermark is not None:
            pp.lag = max(0, st.high_watermark - off)
        st.peers.append(pp)
    return st


def render(statuses: list[ShardStatus]) -> str:
    lines = []
    for st in statuses:
        head = "no commits yet" if st.head_cycle is None else f"head cycle {st.head_cycle} ({st.entries} entries"
        if st.head_age_s is not None:
            head += f", last commit {st.head_age_s}s ago)"
        elif st.head_cycle is not None:
            head += ")"
        hw = "" if st.high_watermark is None else f", high watermark {st.high_watermark}"
        lines.append(f"shard {st.shard}: {head}{hw}")
        if st.stalled:
            lines.append(f"  !! STALLED at cycle {st.stalled.get('cycle')}: {st.stalled.get('reason')}")
        for ev in st.equivocations:
            lines.append(f"  !! EQUIVOCATION by {ev['peer_id']} at cycle {ev['cycle']} (evidence kept in Redis)")
        for pp in st.peers:
            lag = "" if pp.lag is None else f", lag {pp.lag}"
            voted = "-" if pp.voted_cycle is None else str(pp.voted_cycle)
            flag = "  <-- dissent" if pp.state == "DISSENTS" else ""
            lines.append(f"  {pp.peer_id:<16} voted {voted:>12}  {pp.state}{lag}{flag}")
    return "\n".join(lines)
