"""Writing deltas to the deltas topic: a small API for producers, and synthetic load."""

from __future__ import annotations

import difflib
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from knhk_stream.errors import KnhkError
from knhk_stream.kafka.topics import load_topics
from knhk_stream.protocol.decode import TOO_LARGE, Delta, Rejected, Triple, decode_delta, encode_avro, encode_json
from knhk_stream.protocol.jsontext import loads_json

DELTA_FIELDS = ("additions", "removals", "id", "actor")
TRIPLE_FIELDS = ("s", "p", "o", "g")
DeliveryCallback = Callable[[KafkaError | None, Message], None]


class DeltaInputError(KnhkError, ValueError):
    """A JSON text that is not a delta; `field` names the field at fault ("" for the whole text)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"field {field!r}: {message}" if field else message)


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

    def send_raw(
        self,
        value: bytes | None,
        key: bytes | None = None,
        partition: int | None = None,
        on_delivery: DeliveryCallback | None = None,
    ) -> None:
        """Produce a value as it is (also for testing how peers treat bad input).

        `on_delivery(err, msg)` is called too once the broker acknowledged the record
        (`msg.partition()`, `msg.offset()`) or it failed; from `flush()` or a later send.
        """
        if on_delivery is None:
            callback: DeliveryCallback = self._delivered
        else:

            def callback(err: KafkaError | None, msg: Message) -> None:
                self._delivered(err, msg)
                on_delivery(err, msg)

        kwargs: dict[str, Any] = {"key": key, "value": value, "on_delivery": callback}
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


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise DeltaInputError(k, "appears twice in one object (peers reject the delta as 'malformed')")
            seen.add(k)
    return obj


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "true or false", type(None): "null"}
    return names.get(type(value), "a number")


def _unknown(field: str, name: str, known: tuple[str, ...], what: str) -> DeltaInputError:
    close = difflib.get_close_matches(name, known, 1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return DeltaInputError(field, f"unknown field{hint}; {what} has only {', '.join(known)}")


def _triples(obj: dict[str, Any], name: str) -> tuple[Triple, ...]:
    items = obj.get(name, [])
    if not isinstance(items, list):
        raise DeltaInputError(name, f"must be an array of triples, not {_kind(items)}")
    out = []
    for i, t in enumerate(items):
        where = f"{name}[{i}]"
        if not isinstance(t, dict):
            raise DeltaInputError(where, f'must be an object {{"s", "p", "o", "g"?}}, not {_kind(t)}')
        for k in t:
            if k not in TRIPLE_FIELDS:
                raise _unknown(f"{where}.{k}", k, TRIPLE_FIELDS, "a triple")
        for k in ("s", "p", "o"):
            if k not in t:
                raise DeltaInputError(f"{where}.{k}", "missing: a triple needs s, p and o (strings)")
            if not isinstance(t[k], str):
                raise DeltaInputError(f"{where}.{k}", f"must be a string, not {_kind(t[k])}")
            if not t[k]:
                raise DeltaInputError(f"{where}.{k}", "must not be empty")
        g = t.get("g")
        if g is not None and not isinstance(g, str):
            raise DeltaInputError(f"{where}.g", f"must be a string or null, not {_kind(g)}")
        out.append(Triple(t["s"], t["p"], t["o"], g))
    return tuple(out)


def delta_from_json(text: str | bytes) -> Delta:
    """A JSON delta, checked strictly: what `produce` sends unless --as-is.

    An object with `additions` and/or `removals` (arrays of {"s", "p", "o", "g"?},
    non-empty strings, g a string or null), optional `id` and `actor` strings, at
    least one triple, and no other field: peers ignore unknown fields, so a typo
    (`addtions`) would give a delta without triples, rejected as `empty`. Then the
    peers' own decoding must accept the text (no repeated key, depth, terms).
    Raises DeltaInputError naming the field.
    """
    raw = text.encode("utf-8") if isinstance(text, str) else text
    try:
        obj = loads_json(raw, object_pairs_hook=_no_repeats)
    except DeltaInputError:
        raise
    except UnicodeDecodeError as e:
        raise DeltaInputError("", f"is not UTF-8 ({e})") from None
    except ValueError as e:
        raise DeltaInputError("", f"is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise DeltaInputError("", f"a delta is a JSON object, not {_kind(obj)}")
    for k in obj:
        if k not in DELTA_FIELDS:
            raise _unknown(k, k, DELTA_FIELDS, "a delta")
    if "additions" not in obj and "removals" not in obj:
        raise DeltaInputError("additions", 'missing: a delta needs additions or removals, arrays of {"s", "p", "o"}')
    for k in ("id", "actor"):
        if k in obj and not isinstance(obj[k], str):
            raise DeltaInputError(k, f"must be a string, not {_kind(obj[k])}")
    delta = Delta(_triples(obj, "additions"), _triples(obj, "removals"), obj.get("id"), obj.get("actor"))
    if not delta.additions and not delta.removals:
        raise DeltaInputError("additions", "the delta has no triples (peers reject it as 'empty')")
    peers = decode_delta(raw, max_triples=1 << 62)  # the triple limit is the chain's (settings), not checked here
    if isinstance(peers, Rejected) and peers.code != TOO_LARGE:
        raise DeltaInputError("", f"peers reject it as {peers.code!r}: {peers.reason}")
    return delta


def parse_delta_json(text: str) -> Delta:
    """A JSON delta, leniently (missing fields are empty; see `delta_from_json` for the strict check)."""
    obj = loads_json(text)

    def triples(items: list[dict[str, Any]]) -> tuple[Triple, ...]:
        return tuple(Triple(t["s"], t["p"], t["o"], t.get("g")) for t in items)

    return Delta(triples(obj.get("additions", [])), triples(obj.get("removals", [])), obj.get("id"), obj.get("actor"))
