"""What the campaign writes: the steady producer of deltas, bursts of malformed and oversized deltas,
and bursts of garbage on the votes topic. Every delta the broker acknowledges is remembered by
(shard, offset) with a hash of its value, so the checker can tell that each got exactly one receipt."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Producer

from knhk_stream.protocol.decode import Delta, Triple, encode_avro, encode_json
from knhk_stream.protocol.encoding import H
from knhk_stream.protocol.engine import MARKER_HEADER
from knhk_stream.protocol.entry import Entry, record_key
from knhk_stream.protocol.quorum import Vote, generate_key, sign
from knhk_stream.protocol.settings import ChainSettings
from knhk_stream.protocol.wire import encode_vote

SHARDS = 4


def value_hash(value: bytes | None) -> int:
    """What the checker compares a record with: 8 bytes of BLAKE3 of the value (None as empty)."""
    return int.from_bytes(H(value or b"")[:8], "big")


class Acked:
    """Every delta the broker acknowledged: shard -> offset -> value hash; and what failed."""

    def __init__(self) -> None:
        self.by_shard: dict[int, dict[int, int]] = {s: {} for s in range(SHARDS)}
        self.errors: list[str] = []
        self.kinds: dict[str, int] = {}
        self.lock = threading.Lock()

    def callback(self, value: bytes | None, kind: str, out: list[tuple[int, int]] | None = None) -> Callable[..., None]:
        h = value_hash(value)

        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                with self.lock:
                    self.errors.append(str(err))
                return
            with self.lock:
                self.by_shard[msg.partition()][msg.offset()] = h
                self.kinds[kind] = self.kinds.get(kind, 0) + 1
            if out is not None:
                out.append((msg.partition(), msg.offset()))

        return delivered

    @property
    def count(self) -> int:
        return sum(len(d) for d in self.by_shard.values())


def make_producer(bootstrap: str, linger_ms: int = 5) -> Producer:
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": linger_ms,
            "message.max.bytes": 2_000_000,
            "queue.buffering.max.messages": 1_000_000,
        }
    )


def steady_value(seed: int, i: int, rng: random.Random) -> bytes:
    """The i-th delta of the steady load: about 100 B of JSON with a unique id; every 97th is malformed."""
    if i % 97 == 96:
        return f'{{"id":"s{seed}-{i}","additions":[{{"s":"urn:x"'.encode()  # truncated JSON
    n = rng.randrange(1000)
    adds = (Triple(f"urn:chaos:order:{n}", "urn:chaos:status", rng.choice(("new", "paid", "shipped", "lost"))),)
    dels = (Triple(f"urn:chaos:order:{n}", "urn:chaos:status", "new"),) if i % 3 == 0 else ()
    d = Delta(additions=adds, removals=dels, id=f"s{seed}-{i}")
    return encode_avro(d) if i % 5 == 0 else encode_json(d)


class SteadyProducer:
    """`rate` deltas a second, round robin over the shards, in a thread, until `stop()`."""

    def __init__(self, bootstrap: str, topic: str, rate: float, acked: Acked, seed: int) -> None:
        self.bootstrap, self.topic, self.rate, self.acked, self.seed = bootstrap, topic, rate, acked, seed
        self.sent = 0
        self.behind_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-producer", daemon=True)
        self.left = 0

    def _run(self) -> None:
        p = make_producer(self.bootstrap)
        rng = random.Random(self.seed * 7919)
        t0 = time.monotonic()
        i = 0
        while not self._stop.is_set():
            due = t0 + i / self.rate
            ahead = due - time.monotonic()
            if ahead > 0:
                time.sleep(min(ahead, 0.05))
                continue
            self.behind_s = max(self.behind_s, -ahead)
            value = steady_value(self.seed, i, rng)
            while True:
                try:
                    p.produce(self.topic, value, partition=i % SHARDS, on_delivery=self.acked.callback(value, "steady"))
                    break
                except BufferError:
                    p.poll(0.05)
            p.poll(0)
            i += 1
            self.sent = i
        self.left = p.flush(120)

    def start(self) -> SteadyProducer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def bad_values(rng: random.Random, tag: str, max_triples: int) -> list[tuple[str, bytes | None, list | None]]:
    """One of each kind of malformed, rejected or oversized delta, all distinct: (kind, value, headers)."""
    u = f"{tag}-{rng.randrange(10**9)}"
    many = [{"s": f"urn:{u}:{i}", "p": "urn:p", "o": "o"} for i in range(max_triples + 1 + rng.randrange(500))]
    big_term = "x" * (5000 + rng.randrange(1000))
    huge = "y" * (300_000 + rng.randrange(200_000))
    deep = "[" * (70 + rng.randrange(50))
    ok = Delta(additions=(Triple(f"urn:{u}", "urn:p", "o"),), removals=(), id=u)
    avro = encode_avro(ok)

    def j(**kw: object) -> bytes:
        return json.dumps({"id": u, "removals": [], **kw}).encode()

    return [
        ("random_bytes", rng.randbytes(rng.randrange(1, 300)), None),
        ("truncated_json", encode_json(ok)[: -rng.randrange(1, 10)], None),
        ("trailing_bytes", encode_json(ok) + b" x", None),
        ("nan", j(additions=[{"s": "a", "p": "b", "o": "c"}])[:-1] + b', "n": NaN}', None),
        ("bom", b"\xef\xbb\xbf" + encode_json(ok), None),
        ("lone_surrogate", j(additions=[{"s": "a", "p": "b", "o": "c"}])[:-1] + b', "x": "\\ud800"}', None),
        ("deep_json", j(additions=[])[:-1] + b', "x": ' + deep.encode() + b"]" * len(deep) + b"}", None),
        ("repeated_key", j(additions=[])[:-1] + b', "id": "again"}', None),
        ("wrong_type", j(additions="nope"), None),
        ("empty", j(additions=[]), None),
        ("too_large", j(additions=many), None),
        ("invalid_term", j(additions=[{"s": "", "p": "p", "o": "o"}]), None),
        ("long_term", j(additions=[{"s": "s", "p": "p", "o": big_term}]), None),
        ("oversized", j(additions=[{"s": "s", "p": "p", "o": huge}]), None),
        ("unknown_fingerprint", avro[:2] + rng.randbytes(8) + avro[10:], None),
        ("avro_trailing", avro + b"\x00", None),
        ("empty_value", b"", None),
        ("null_value", None, None),
        ("marker_header_with_value", encode_json(ok), [(MARKER_HEADER, b"")]),
    ]


def bad_deltas_burst(
    bootstrap: str, topic: str, acked: Acked, rng: random.Random, n: int, max_triples: int, tag: str
) -> list[tuple[int, int]]:
    """`n` bad deltas on random shards; returns their (shard, offset) once all are acknowledged."""
    p = make_producer(bootstrap, linger_ms=1)
    out: list[tuple[int, int]] = []
    pool: list[tuple[str, bytes | None, list | None]] = []
    for _ in range(n):
        if not pool:
            pool = bad_values(rng, tag, max_triples)
            rng.shuffle(pool)
        kind, value, headers = pool.pop()
        kw: dict[str, Any] = {"partition": rng.randrange(SHARDS), "on_delivery": acked.callback(value, kind, out)}
        if headers:
            kw["headers"] = headers
        p.produce(topic, value, **kw)
        p.poll(0)
    left = p.flush(120)
    if left:
        acked.errors.append(f"{left} bad deltas not delivered within 120 s")
    return out


def vote_garbage_burst(
    bootstrap: str, topic: str, settings: ChainSettings, rng: random.Random, n: int, heads: dict[int, tuple[int, bytes]]
) -> dict[str, int]:
    """`n` records on the votes topic that no peer may count: bytes, truncated votes, forged and foreign votes."""
    mallory = generate_key()
    epoch_hash = settings.genesis.epoch_hash
    peers = [p.id for p in settings.peers]
    p = make_producer(bootstrap, linger_ms=1)
    kinds: dict[str, int] = {}
    for _ in range(n):
        shard = rng.randrange(SHARDS)
        cycle, prev = heads.get(shard, (0, bytes(32)))
        cycle += rng.randrange(1, 4)
        e = Entry(settings.chain_id, shard, cycle, H(rng.randbytes(8)), rng.randrange(1, 100), 10**9, 10**9 + 5, prev)
        kind = rng.choice(
            (
                "bytes",
                "empty",
                "null",
                "truncated",
                "bad_signature",
                "unknown_peer",
                "other_chain",
                "wrong_shard",
                "mallory_as_peer",
            )
        )
        if kind == "bytes":
            value: bytes | None = rng.randbytes(rng.randrange(1, 400))
        elif kind == "empty":
            value = b""
        elif kind == "null":
            value = None
        elif kind == "truncated":
            v = encode_vote(Vote(e, rng.choice(peers), sign(mallory, epoch_hash, e.entry_hash)))
            value = v[: rng.randrange(1, len(v))]
        elif kind == "bad_signature":
            value = encode_vote(Vote(e, rng.choice(peers), rng.randbytes(64), int(time.time() * 1000)))
        elif kind == "unknown_peer":
            value = encode_vote(Vote(e, "peer-x", sign(mallory, epoch_hash, e.entry_hash), int(time.time() * 1000)))
        elif kind == "other_chain":
            f = Entry("other-chain", shard, cycle, e.root, 1, 0, 0, prev)
            value = encode_vote(Vote(f, rng.choice(peers), sign(mallory, epoch_hash, f.entry_hash)))
        elif kind == "wrong_shard":
            f = Entry(settings.chain_id, (shard + 1) % SHARDS, cycle, e.root, 1, 0, 0, prev)
            value = encode_vote(Vote(f, rng.choice(peers), sign(mallory, epoch_hash, f.entry_hash)))
        else:  # signed, by a key that is not the named peer's
            value = encode_vote(Vote(e, rng.choice(peers), sign(mallory, epoch_hash, e.entry_hash)))
        kinds[kind] = kinds.get(kind, 0) + 1
        key = record_key(settings.chain_id, shard, cycle).encode() if rng.random() < 0.7 else rng.randbytes(12)
        p.produce(topic, value, key=key, partition=shard)
        p.poll(0)
    p.flush(60)
    return kinds
