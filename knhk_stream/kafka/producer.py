"""Writing deltas to the deltas topic: a small API for producers, and synthetic load."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from knhk_stream.kafka.topics import load_topics
from knhk_stream.protocol.decode import Delta, Triple, encode_avro, encode_json


class DeltaProducer:
    """Produce deltas (as Avro or JSON) to the deltas topic; `flush()` before exit.

    >>> with DeltaProducer("127.0.0.1:9092") as p:
    ...     p.send(Delta(additions=(Triple("urn:a", "urn:knows", "urn:b"),), removals=()))
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str | None = None,
        fmt: str = "avro",
        kafka_config: dict[str, Any] | None = None,
    ) -> None:
        if fmt not in ("avro", "json"):
            raise ValueError(f"format must be 'avro' or 'json', got {fmt!r}")
        self.topic = topic or load_topics().deltas.name
        self.encode = encode_avro if fmt == "avro" else encode_json
        self.producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "acks": "all",
                "linger.ms": 5,
                "enable.idempotence": True,
                "batch.num.messages": 10000,
                **(kafka_config or {}),
            }
        )
        self.errors: list[str] = []
        self.sent = 0

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.errors.append(str(err))

    def send_raw(self, value: bytes | None, key: bytes | None = None, partition: int | None = None) -> None:
        """Produce a value as it is (also for testing how peers treat bad input)."""
        kwargs: dict[str, Any] = {"key": key, "value": value, "on_delivery": self._delivered}
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self.producer.produce(self.topic, **kwargs)
                break
            except BufferError:
                self.producer.poll(0.05)
        self.sent += 1
        if self.sent % 1000 == 0:
            self.producer.poll(0)

    def send(self, delta: Delta, key: bytes | None = None, partition: int | None = None) -> None:
        self.send_raw(self.encode(delta), key, partition)

    def flush(self, timeout: float = 60) -> None:
        left = self.producer.flush(timeout)
        if left or self.errors:
            raise RuntimeError(f"{left} deltas not delivered; errors: {self.errors[:5]}")

    def __enter__(self) -> DeltaProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


def synthetic_deltas(n: int, seed: int = 7, malformed_every: int = 0) -> Iterator[bytes | Delta]:
    """n small deltas (about 100 bytes as JSON); every k-th one malformed bytes when k > 0."""
    rng = random.Random(seed)
    for i in range(n):
        if malformed_every and i % malformed_every == malformed_every - 1:
            yield b'{"additions": [not json'
            continue
        s = f"urn:s{rng.randrange(10_000)}"
        yield Delta(
            additions=(Triple(s, "urn:p", f"v{rng.randrange(1_000_000)}"),),
            removals=(Triple(s, "urn:q", "old"),) if i % 3 == 0 else (),
            id=f"d{i}",
        )


def read_json_lines(lines: Iterable[str]) -> Iterator[bytes]:
    """Each non-blank line is one JSON delta, passed on as its UTF-8 bytes (peers validate)."""
    for line in lines:
        line = line.strip()
        if line:
            yield line.encode("utf-8")


def parse_delta_json(text: str) -> Delta:
    """A JSON delta (for programs that build Delta objects from JSON)."""
    obj = json.loads(text)

    def triples(items: list[dict[str, Any]]) -> tuple[Triple, ...]:
        return tuple(Triple(t["s"], t["p"], t["o"], t.get("g")) for t in items)

    return Delta(triples(obj.get("additions", [])), triples(obj.get("removals", [])), obj.get("id"), obj.get("actor"))
