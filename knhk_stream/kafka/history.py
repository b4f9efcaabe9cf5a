"""The roots topic read whole, as the second witness of the chain (protocol "Verification").

A root record is valid when its fields are in range, its entry_hash recomputes,
its epoch is the epoch of its cycle and its votes are a quorum of that epoch;
its record key is ignored, valid roots are deduplicated by entry_hash, and an
invalid record never hides a valid one. Everything invalid is a finding.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from knhk_stream.errors import KnhkError, WireError
from knhk_stream.protocol.committed import CommittedEntry
from knhk_stream.protocol.quorum import check_quorum
from knhk_stream.protocol.settings import ChainSettings
from knhk_stream.protocol.wire import decode_root


class RootsUnreadable(KnhkError):
    """The roots topic could not be read to its end."""


@dataclass
class RootsHistory:
    """Valid committed entries per shard (by entry hash), the findings, and where each partition ended."""

    valid: dict[int, dict[bytes, CommittedEntry]] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)
    end_offsets: dict[int, int] = field(default_factory=dict)

    def entries(self, shard: int) -> list[CommittedEntry]:
        return sorted(self.valid.get(shard, {}).values(), key=lambda ce: ce.entry.cycle)


def root_problem(ce: CommittedEntry, settings: ChainSettings, partition: int) -> str | None:
    """Why a decoded root is not a valid root of this chain (None when it is)."""
    e = ce.entry
    if e.chain_id != settings.chain_id:
        return f"chain {e.chain_id!r}, not {settings.chain_id!r}"
    if e.shard != partition:
        return f"a root of shard {e.shard} in partition {partition} (the roots of shard S live in partition S)"
    epoch = settings.epoch_for(e.cycle)
    if ce.epoch != epoch.number:
        return f"epoch {ce.epoch}, but cycle {e.cycle} is in epoch {epoch.number}"
    forked = settings.epoch_chain.problem_for_cycle(e.cycle)
    if forked:
        return forked
    q = check_quorum(ce.entry_hash, ce.votes, epoch)
    return None if q.valid else "no quorum: " + "; ".join(q.problems)


def add_record(
    history: RootsHistory, settings: ChainSettings, partition: int, offset: int, value: bytes | None
) -> None:
    where = f"roots partition {partition} offset {offset}"
    try:
        ce = decode_root(value)
    except WireError as e:
        history.findings.append(f"{where}: {e}")
        return
    bad = root_problem(ce, settings, partition)
    if bad:
        history.findings.append(f"{where}: {bad}")
        return
    history.valid.setdefault(partition, {}).setdefault(ce.entry_hash, ce)


def read_roots(
    bootstrap: str,
    topic: str,
    settings: ChainSettings,
    partitions: Iterable[int],
    kafka_config: dict[str, str] | None = None,
    idle_timeout_s: float = 20.0,
) -> RootsHistory:
    """Every record of the given partitions from the start to the end the broker reports at the read."""
    from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

    config = {
        "bootstrap.servers": bootstrap,
        "group.id": f"knhk-roots-history-{uuid.uuid4().hex[:12]}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
        **(kafka_config or {}),
    }
    history = RootsHistory()
    wanted = sorted(set(partitions))
    if not wanted:
        return history
    try:
        consumer = Consumer(config)
    except KafkaException as e:
        raise RootsUnreadable(f"cannot read Kafka at {bootstrap}: {e} (check --kafka-config)") from None
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in wanted])
        open_parts = set(wanted)
        idle_since = time.monotonic()
        while open_parts:
            msgs = consumer.consume(10_000, timeout=0.1)
            if not msgs:
                if time.monotonic() - idle_since > idle_timeout_s:
                    raise RootsUnreadable(
                        f"Kafka at {bootstrap} returned nothing for {topic} partitions {sorted(open_parts)} in "
                        f"{idle_timeout_s:.0f} s: is it reachable, and is the topic name right (--topic-prefix)?"
                    )
                continue
            idle_since = time.monotonic()
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        history.end_offsets[m.partition()] = m.offset()
                        open_parts.discard(m.partition())
                        continue
                    raise RootsUnreadable(f"reading {topic} from {bootstrap}: {err.str()}")
                if m.partition() in open_parts:
                    add_record(history, settings, m.partition(), m.offset(), m.value())
    finally:
        consumer.close()
    return history
