"""8. Audit: what an auditor's checks cost. A proof bundle's verification (with the value, and
hash-only) and its parts: the 3 Ed25519 verifications, the receipt recompute, the audit path;
chain verification with 3 signatures an entry: entry hash + check_quorum without Redis (one thread,
and a thread pool), and store.verify_range on Redis. Targets: a bundle verifies in < 1 ms; a chain
range verifies at >= 5,000 entries/s. (It was bench/bench_audit.py.)"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

from bench.cluster import Env
from bench.harness import Report, Result, log, per_call_us, timed_rate
from bench.load import committed, four_peer_keys, signed_chain
from knhk_stream.kafka.producer import synthetic_deltas
from knhk_stream.protocol import merkle
from knhk_stream.protocol.beats import BeatAssembler
from knhk_stream.protocol.committed import CommittedEntry
from knhk_stream.protocol.decode import encode_json
from knhk_stream.protocol.entry import entry_for_beat
from knhk_stream.protocol.proof import make_bundle, verify_bundle
from knhk_stream.protocol.quorum import check_quorum, verify_vote
from knhk_stream.protocol.receipts import DeltaProcessor
from knhk_stream.protocol.settings import ChainSettings
from knhk_stream.store.lockchain import LockchainStore, verify_range

NEEDS = "redis"
CASE = "8. Audit"


def run(env: Env, rep: Report, args: argparse.Namespace) -> None:
    keys, settings = four_peer_keys()
    bundle_rows(rep, args, settings, keys)
    chain_rows(env, rep, args, settings, keys)


def bundle_rows(rep: Report, args: argparse.Namespace, settings: ChainSettings, keys: dict) -> None:
    beat_size = args.audit_beat
    log(f"8. audit: proof bundle of a {beat_size}-receipt beat, 3 votes; then a chain of {args.audit_entries:,}")
    processor = DeltaProcessor(settings.load_hook(), settings.max_triples)
    values = [d if isinstance(d, bytes) else encode_json(d) for d in synthetic_deltas(beat_size, malformed_every=37)]
    asm = BeatAssembler(0, settings.tick_ms, processor)
    for i, v in enumerate(values):
        asm.feed(i, 1_000_000, False, v)
    beat = asm.feed(beat_size, 1_000_000 + 8 * settings.tick_ms, True, None)
    assert beat is not None
    ce = committed(entry_for_beat(settings.chain_id, beat), keys, settings, 0)
    leaf = beat_size // 2
    bundle = make_bundle(ce, beat.receipts, leaf, values[leaf])
    check = verify_bundle(bundle, settings)
    if not check.ok:
        rep.errors.append(f"{CASE}: the bench's bundle does not verify ({check.message})")
        return
    hashed = make_bundle(ce, beat.receipts, leaf, values[leaf], hash_only=True)
    pub = settings.public_keys["peer-a"]
    epoch_hash = settings.genesis.epoch_hash
    receipt = beat.receipts[leaf]
    path = merkle.inclusion_proof(beat.receipts, leaf)
    whole = f"verify_bundle (value), beat of {beat_size} receipts ({len(path)} path hashes), 3 votes"
    rows = (
        (whole, lambda: verify_bundle(bundle, settings), 2000),
        ("verify_bundle (hash-only)", lambda: verify_bundle(hashed, settings), 2000),
        (
            "of which 3 x Ed25519 verify",
            lambda: [verify_vote(pub, epoch_hash, ce.entry_hash, s) for _, s in ce.votes],
            2000,
        ),
        ("of which receipt recompute", lambda: processor.receipt(0, 0, 0, leaf, values[leaf]), 20000),
        ("of which audit path", lambda: merkle.root_from_proof(receipt, leaf, beat_size, path), 20000),
    )
    runs = {label: [per_call_us(fn, n) for _ in range(args.runs)] for label, fn, n in rows}
    for label, _, _ in rows:
        part = label != whole
        rep.add(
            Result(
                CASE,
                label,
                "us",
                runs[label],
                "verify_bundle (value), same run" if part else None,
                runs[whole] if part else [],
                higher_is_better=False,
                note="ratio = share of a bundle's verification" if label.startswith("of which") else "",
            )
        )
    value = rep.results[-len(rows)].median
    rep.targets.append(
        {"target": "a proof bundle verifies in < 1 ms", "value_us": value, "met": value is not None and value < 1000}
    )


def chain_rows(env: Env, rep: Report, args: argparse.Namespace, settings: ChainSettings, keys: dict) -> None:
    n = args.audit_entries
    chain = signed_chain(keys, settings, n)
    epoch = settings.genesis

    def check(part: list[CommittedEntry]) -> None:
        for ce in part:
            check_quorum(ce.entry.entry_hash, ce.votes, epoch)

    threads = os.cpu_count() or 1
    one = [timed_rate(lambda: check(chain), n) for _ in range(args.runs)]
    with ThreadPoolExecutor(threads) as pool:  # OpenSSL's Ed25519 verify releases the GIL
        par = [
            timed_rate(lambda: list(pool.map(check, [chain[i::threads] for i in range(threads)])), n)
            for _ in range(args.runs)
        ]
    prefix = f"knhkbench-kb{env.run_id}-audit"
    env.prefixes.append(prefix)
    store = LockchainStore.from_url(env.redis_url, settings.chain_id, prefix)
    try:
        pipe = store.client.pipeline(transaction=False)
        for ce in chain:  # bulk load: appending one by one would time the Lua script, not verification
            k = f"{store.key(0)}:root:{ce.entry.cycle:020d}"
            pipe.hset(k, mapping=ce.to_redis())
            pipe.zadd(f"{store.key(0)}:cycles", {f"{ce.entry.cycle:020d}": ce.entry.cycle})
        pipe.hset(f"{store.key(0)}:head", mapping={"cycle": chain[-1].entry.cycle,
                                                   "entry_hash": chain[-1].entry_hash.hex()})  # fmt: skip
        pipe.execute()
        verify = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            report = verify_range(store, settings, 0)
            verify.append(n / (time.perf_counter() - t0))
            if not report.ok or report.entries != n:
                rep.errors.append(f"{CASE}: verify_range failed: {report.problems[:3]}")
    finally:
        env.clean_redis()
    single = f"{n:,} entries, 3 signatures each: entry hash + check_quorum, no Redis, 1 thread"
    rep.add(Result(CASE, single, "entries/s", one, chart="throughput", label="audit check_quorum"))
    rep.add(
        Result(
            CASE,
            f"the same in a pool of {threads} threads (what a pool could give)",
            "entries/s",
            par,
            "1 thread, same run",
            one,
            chart="throughput",
            label=f"audit check_quorum, {threads} threads",
        )
    )
    rep.add(
        Result(
            CASE,
            f"store.verify_range on Redis, the same {n:,} entries",
            "entries/s",
            verify,
            "entry hash + check_quorum, no Redis, 1 thread",
            one,
            chart="throughput",
            label="audit verify_range",
        )
    )
    med = rep.results[-1].median
    rep.targets.append(
        {"target": "a chain range verifies at >= 5,000 entries/s", "value": med, "met": bool(med and med >= 5000)}
    )
