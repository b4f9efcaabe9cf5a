"""Core throughput, no Kafka or Redis: decode + hook + receipt + Merkle per delta, and vote crypto.

Run by hand: `.venv/bin/python bench/bench_core.py`. Prints deltas/s per case (median of 5 runs).
The full benchmark (Kafka, Redis, four peers, baselines, chart) is bench/run.py (`make bench`).
"""

from __future__ import annotations

import statistics
import time

from knhk_stream.kafka.producer import synthetic_deltas
from knhk_stream.protocol import merkle
from knhk_stream.protocol.beats import BeatAssembler
from knhk_stream.protocol.decode import Delta, Triple, encode_avro, encode_json
from knhk_stream.protocol.hooks import load_hook
from knhk_stream.protocol.quorum import generate_key, public_key_bytes, sign, verify_signature
from knhk_stream.protocol.receipts import DeltaProcessor

N = 100_000


def _median_rate(fn, n: int, runs: int = 5) -> tuple[float, float]:
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates), (max(rates) - min(rates)) / statistics.median(rates)


def _values(fmt: str, big: bool = False) -> list[bytes]:
    out = []
    for d in synthetic_deltas(N):
        assert isinstance(d, Delta)
        if big:  # about 1 KB: ten triples with longer terms
            d = Delta(tuple(Triple(f"{t.s}/{'x' * 40}/{i}", t.p, f"{t.o}{'y' * 40}") for i, t in
                            enumerate(d.additions * 10)), d.removals, d.id)  # fmt: skip
        out.append(encode_json(d) if fmt == "json" else encode_avro(d))
    return out


def bench_beats(values: list[bytes]) -> None:
    asm = BeatAssembler(0, 125, DeltaProcessor(load_hook("canonical@1")))
    ts = 1_700_000_000_000
    beats = []
    for i, v in enumerate(values):
        b = asm.feed(i, ts + i // 10, False, v)  # 10 deltas per ms: 10,000 per beat
        if b is not None:
            beats.append(b.root())


def main() -> None:
    for name, vals in (("100 B JSON", _values("json")), ("100 B Avro", _values("avro")),
                       ("1 KB JSON", _values("json", big=True))):  # fmt: skip
        size = sum(map(len, vals)) / len(vals)
        rate, spread = _median_rate(lambda v=vals: bench_beats(v), N)
        print(f"decode+hook+receipt+merkle, {name} (avg {size:.0f} B): {rate:,.0f} deltas/s (spread {spread:.0%})")
    leaves = [bytes(123)] * N
    rate, spread = _median_rate(lambda: merkle.root(leaves), N)
    print(f"merkle root of {N:,} receipts: {rate:,.0f} leaves/s ({N / rate * 1000:.0f} ms)")
    key = generate_key()
    pub = public_key_bytes(key)
    h = bytes(32)
    sig = sign(key, h)
    rate, _ = _median_rate(lambda: [sign(key, h) for _ in range(5000)], 5000)
    print(f"vote signing: {rate:,.0f}/s")
    rate, _ = _median_rate(lambda: [verify_signature(pub, h, sig) for _ in range(5000)], 5000)
    print(f"vote verification: {rate:,.0f}/s")


if __name__ == "__main__":
    main()
