"""Synthetic load: deltas (100 B JSON, the same as Avro, 1 KB JSON), producing them as fast as
possible or at a steady rate, and signed chains of committed entries for the store and audit cases."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Producer

from bench.cluster import PEERS, SHARDS
from knhk_stream.kafka.producer import synthetic_deltas
from knhk_stream.protocol.committed import CommittedEntry
from knhk_stream.protocol.decode import Delta, Triple, encode_avro, encode_json
from knhk_stream.protocol.encoding import H
from knhk_stream.protocol.entry import Entry
from knhk_stream.protocol.quorum import Vote, generate_key, public_key_bytes, sign
from knhk_stream.protocol.settings import ChainSettings, Peer


def json_values(n: int, seed: int = 7) -> list[bytes]:
    """n synthetic deltas as compact JSON, about 100 bytes each."""
    return [encode_json(d) for d in synthetic_deltas(n, seed=seed) if isinstance(d, Delta)]


def avro_values(n: int, seed: int = 7) -> list[bytes]:
    """The same deltas as Avro single-object encoding (about 53 bytes each)."""
    return [encode_avro(d) for d in synthetic_deltas(n, seed=seed) if isinstance(d, Delta)]


def kb_values(n: int, seed: int = 7) -> list[bytes]:
    """About 1 KB JSON deltas: eight additions with longer terms, and the removal."""
    out = []
    for d in synthetic_deltas(n, seed=seed):
        assert isinstance(d, Delta)
        t = d.additions[0]
        adds = tuple(Triple(f"{t.s}/{'x' * 48}/{i}", t.p, f"{t.o}{'y' * 40}") for i in range(8))
        out.append(encode_json(Delta(adds, d.removals, d.id)))
    return out


def make_producer(bootstrap: str, linger_ms: int = 5) -> Producer:
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": linger_ms,
            "batch.num.messages": 10000,
            "queue.buffering.max.messages": 500000,
        }
    )


def produce_all(bootstrap: str, topic: str, values: Sequence[bytes]) -> float:
    """Produce as fast as possible, round robin over the shards; returns seconds taken."""
    p = make_producer(bootstrap)
    t0 = time.monotonic()
    for i, v in enumerate(values):
        while True:
            try:
                p.produce(topic, v, partition=i % SHARDS)
                break
            except BufferError:
                p.poll(0.01)
        if i % 1000 == 999:
            p.poll(0)
    left = p.flush(120)
    if left:
        raise RuntimeError(f"{left} deltas not delivered")
    return time.monotonic() - t0


class SteadyProducer:
    """Produces deltas at a steady rate (in a thread) and keeps each record's acknowledgement time.

    Each delta carries the time it is due as its timestamp, so every run cuts the same beats (the
    embedded broker keeps producer timestamps): a producer thread that the busy machine starves for a
    few ms sends a burst, and stamped with the send time the burst would fall into fewer, larger beats
    (19,352 instead of 26,417 entries in two runs of the same 60 s at tick_ms 1)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        rate: float,
        seconds: float,
        seed: int = 11,
        linger_ms: int = 0,
        keep_acks: bool = True,
    ) -> None:
        """linger_ms 0 for latency runs (each delta leaves at once); more batches them (less broker load).
        keep_acks False keeps no per-record acknowledgement (a long soak would hold millions)."""
        self.keep_acks = keep_acks
        self.bootstrap, self.topic, self.rate, self.seconds = bootstrap, topic, rate, seconds
        self.linger_ms = linger_ms
        # A pool of distinct deltas, produced round and round (long runs need not hold them all).
        self.values = json_values(min(int(rate * seconds) + 1, 100_000), seed=seed)
        self.acked: dict[tuple[int, int], float] = {}  # (partition, offset) -> ms when acknowledged
        self.ack_latency: list[float] = []  # produce() -> acknowledgement, ms
        self.produced = 0
        self.delivered = 0
        self.errors: list[str] = []
        self.started_ms = 0.0
        self.ended_ms = 0.0
        self.behind_s = 0.0  # how far the producer fell behind its schedule at worst
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _delivered(self, err: Any, msg: Any, sent_ms: float) -> None:
        if err is not None:
            self.errors.append(str(err))
            return
        # librdkafka's own produce() -> acknowledgement time: not delayed by when this callback runs
        self.delivered += 1
        if not self.keep_acks:
            return
        lat = msg.latency()
        lat_ms = lat * 1000 if lat is not None else time.time() * 1000 - sent_ms
        self.acked[(msg.partition(), msg.offset())] = sent_ms + lat_ms
        self.ack_latency.append(lat_ms)

    def _run(self) -> None:
        p = make_producer(self.bootstrap, self.linger_ms)
        n = int(self.rate * self.seconds)
        self.started_ms = time.time() * 1000
        t0 = time.monotonic()
        for i in range(n):
            due = t0 + i / self.rate
            ahead = due - time.monotonic()
            if ahead > 0.0002:
                time.sleep(ahead)
            else:
                self.behind_s = max(self.behind_s, -ahead)
            sent = time.time() * 1000
            p.produce(
                self.topic,
                self.values[i % len(self.values)],
                partition=i % SHARDS,
                timestamp=int(self.started_ms + i * 1000 / self.rate),  # the schedule's, not the send's
                on_delivery=lambda err, msg, t=sent: self._delivered(err, msg, t),
            )
            p.poll(0)
            self.produced = i + 1
        p.flush(60)
        self.ended_ms = time.time() * 1000

    def start(self) -> SteadyProducer:
        self._thread.start()
        return self

    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()


def four_peer_keys() -> tuple[dict[str, Any], ChainSettings]:
    """A fresh Ed25519 key for each of the four peers, and chain settings with them (threshold 3)."""
    keys = {p: generate_key() for p in PEERS}
    settings = ChainSettings(peers=tuple(Peer(p, public_key_bytes(k)) for p, k in keys.items()), threshold=3)
    return keys, settings


def committed(entry: Entry, keys: dict[str, Any], settings: ChainSettings, at_ms: int) -> CommittedEntry:
    """The entry as committed by peer-a with the votes of the first three peers (a quorum of 3) in epoch 0."""
    epoch_hash = settings.genesis.epoch_hash
    votes = [Vote(entry, p, sign(keys[p], epoch_hash, entry.entry_hash)) for p in PEERS[:3]]
    return CommittedEntry.from_quorum(entry, votes, "peer-a", at_ms)


def signed_chain(
    keys: dict[str, Any], settings: ChainSettings, n: int, at_ms: int | None = None
) -> list[CommittedEntry]:
    """n linked entries of shard 0 (cycles 0..n-1, 10 receipts each), each committed with 3 votes;
    committed_at_ms is `at_ms`, or the time each entry was made."""
    entries = []
    prev = bytes(32)
    for c in range(n):
        e = Entry("knhk", 0, c, H(c.to_bytes(8, "big")), 10, c * 10, c * 10 + 9, prev)
        prev = e.entry_hash
        entries.append(committed(e, keys, settings, int(time.time() * 1000) if at_ms is None else at_ms))
    return entries
