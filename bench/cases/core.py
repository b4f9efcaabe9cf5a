"""2. Core alone: decode + hook + receipt + Merkle without Kafka or Redis (100 B JSON, the same as
Avro, 1 KB JSON); Merkle root; vote signing and verification; proof-bundle verification.
Baseline: the same code at --baseline-ref (the core before this round of optimizations), measured in
short turns with this tree's, in the same process. Ends with the `core:` summary line."""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.baseline import BASE, CURRENT, Pkg, extract_ref
from bench.cluster import Env
from bench.harness import Report, Result, log, paired, paired_rates, quiet_rate
from bench.load import avro_values, committed, four_peer_keys, json_values, kb_values

NEEDS = None


def core_feed(pkg: Any, values: Sequence[bytes]) -> None:
    """values through a beat assembler (10 deltas a ms at tick_ms 125: 10,000 a beat), each closed
    beat's Merkle root, and the last beat closed by a marker too."""
    asm = pkg.beats.BeatAssembler(0, 125, pkg.receipts.DeltaProcessor(pkg.hooks.load_hook("canonical@1")))
    ts = 1_700_000_000_000
    feed = asm.feed
    for i, v in enumerate(values):
        b = feed(i, ts + i // 10, False, v)
        if b is not None:
            b.root()
    b = feed(len(values), ts + len(values) // 10 + 1000, True, None)
    if b is not None:
        b.root()


CHUNK = 2_000  # deltas a turn in core_rates (a beat of its own): 5..20 ms


def core_rates(after: Pkg, before: Pkg | None, values: Sequence[bytes], runs: int) -> tuple[list[float], list[float]]:
    """`runs` rates (deltas/s) of this tree's core and of the baseline's over `values`, measured
    in short turns: each run feeds the values a CHUNK at a time, after and before in turns
    (alternating which goes first), and a side's rate is one over its median time per delta of
    a turn. The machine is shared: a burst of someone else's work then falls on a few turns of
    both sides alike, and the medians leave those out, instead of on one side's whole run."""
    chunks = [values[i : i + CHUNK] for i in range(0, len(values), CHUNK)]
    core_feed(after, chunks[0])  # warm-up
    if before is not None:
        core_feed(before, chunks[0])
    a_runs: list[float] = []
    b_runs: list[float] = []
    for r in range(runs):
        per_delta: dict[int, list[float]] = {id(after): [], id(before): []}
        gc.collect()
        gc.disable()
        try:
            for j, chunk in enumerate(chunks):
                for pkg in (after, before) if (j + r) % 2 == 0 else (before, after):
                    if pkg is None:
                        continue
                    t0 = time.perf_counter()
                    core_feed(pkg, chunk)
                    per_delta[id(pkg)].append((time.perf_counter() - t0) / len(chunk))
        finally:
            gc.enable()
        a_runs.append(1 / statistics.median(per_delta[id(after)]))
        if before is not None:
            b_runs.append(1 / statistics.median(per_delta[id(before)]))
    return a_runs, b_runs


VOTE_NOTE = "same Ed25519 work; protocol v2 signs 75 bytes, the baseline ref a 32-byte hash: shows the noise"


def vote_calls(quorum: Any, key: Any) -> tuple[Callable[[], object], Callable[[], object]]:
    """Signing and verifying one vote with a quorum module: protocol v2 signs
    "knhk-vote/2" || epoch_hash || entry_hash, the core at the baseline ref the entry hash."""
    pub = quorum.public_key_bytes(key)
    h = bytes(32)
    if hasattr(quorum, "verify_vote"):
        sig = quorum.sign(key, h, h)
        return (lambda: quorum.sign(key, h, h)), (lambda: quorum.verify_vote(pub, h, h, sig))
    sig = quorum.sign(key, h)
    return (lambda: quorum.sign(key, h)), (lambda: quorum.verify_signature(pub, h, sig))


def run(env: Env | None, rep: Report, args: argparse.Namespace) -> None:
    n = args.deltas
    log(f"2. core alone: {n:,} deltas per run through decode, hook, receipt, beat and Merkle")
    after = Pkg(CURRENT)
    before: Pkg | None = None
    tmp = Path(tempfile.mkdtemp(prefix="knhk-bench-ref-"))
    try:
        if args.baseline_ref and extract_ref(args.baseline_ref, tmp):
            sys.path.insert(0, str(tmp))
            before = Pkg(BASE)
        bname = f"same, core at {args.baseline_ref} (before)" if before else None
        kinds = (
            ("json_100b", "100 B JSON", json_values(n)),
            ("avro_100b", "100 B JSON as Avro", avro_values(n)),
            ("json_1kb", "1 KB JSON", kb_values(n)),
        )
        rows: dict[str, Result] = {}
        for key, label, values in kinds:
            size = sum(map(len, values)) / len(values)
            runs, bruns = core_rates(after, before, values, args.runs)
            rows[key] = rep.add(
                Result(
                    "2. Core alone",
                    f"{label} (avg {size:.0f} B): decode+hook+receipt+Merkle",
                    "deltas/s",
                    runs,
                    bname,
                    bruns,
                    chart="throughput",
                    label=f"core {label}".replace(" as Avro", " Avro"),
                    extra={"avg_bytes": size, "us_per_delta": 1e6 / statistics.median(runs)}
                    | ({"before_us_per_delta": 1e6 / statistics.median(bruns)} if bruns else {}),
                )
            )
        rep.summary["core"] = summary_line(rows["json_100b"], rows["avro_100b"])
        leaves = [i.to_bytes(123, "big") for i in range(n)]
        b_root = (lambda: before.merkle.root(leaves)) if before else None
        runs, bruns = paired_rates(lambda: after.merkle.root(leaves), b_root, n, args.runs)
        rep.add(Result("2. Core alone", f"Merkle root of {n:,} receipts", "leaves/s", runs, bname, bruns))
        key = after.quorum.generate_key()
        k = 5000
        calls_after = vote_calls(after.quorum, key)
        calls_before = vote_calls(before.quorum, key) if before else (None, None)
        for label, fn_after, fn_before in zip(
            ("vote signing (Ed25519)", "vote verification (Ed25519)"), calls_after, calls_before, strict=True
        ):
            b_votes = (lambda f=fn_before: [f() for _ in range(k)]) if fn_before else None
            runs, bruns = paired_rates(lambda f=fn_after: [f() for _ in range(k)], b_votes, k, args.runs)
            rep.add(Result("2. Core alone", label, "votes/s", runs, bname, bruns, note=VOTE_NOTE))
        share_case(rep, args, after, before, bname)
        prune_case(rep, args, after, before, bname)
        bundle_case(rep, args)
    finally:
        if before:
            sys.path.remove(str(tmp))
            for name in [m for m in sys.modules if m == BASE or m.startswith(BASE + ".")]:
                del sys.modules[name]  # a later run may extract another ref under the same name
        shutil.rmtree(tmp, ignore_errors=True)


def summary_line(json_row: Result, avro_row: Result) -> str:
    """`core: json_100b=<deltas/s> avro_100b=<deltas/s> speedup_vs_before=<x.xx>`: the medians of
    this tree's core, and the smaller of the two same-run ratios to the core at --baseline-ref
    (`nan` without a baseline)."""
    ratios = [r.ratio for r in (json_row, avro_row)]
    speedup = min(ratios) if None not in ratios else float("nan")  # type: ignore[type-var]
    return (
        f"core: json_100b={json_row.median or 0:.0f} avro_100b={avro_row.median or 0:.0f} "
        f"speedup_vs_before={speedup:.2f}"
    )


# Our own share of the commit latency that lies in the core (issue 14, item 2): a beat's vote waits
# for its beat to close (the closing record's receipt, the Merkle root, the entry hash and the
# vote's signature), and the records of the consume batch it closes in; a commit waits for the
# quorum's votes to verify. At 2,000 deltas/s over 4 shards a beat holds 500 receipts at
# tick_ms 125 and 4 at tick_ms 1.
SHARE_BEATS = ((125, 500), (1, 4))
SHARE_BATCH = 5000  # the worker's consume batch
SHARE_STEADY_BATCH = 25  # records a worker's step brings in a steady stream (fetch.wait.max.ms 10 at 2,000/s)


def beat_close_s(pkg: Any, values: Sequence[bytes], n: int, key: Any) -> float:
    """Seconds to close a beat of n receipts: the closing record's feed, root, entry hash, signature."""
    asm = pkg.beats.BeatAssembler(0, 125, pkg.receipts.DeltaProcessor(pkg.hooks.load_hook("canonical@1")))
    ts = 1_700_000_000_000
    ahead = getattr(asm, "hash_ahead", None)  # as a node does after each small batch (not in a backlog)
    for i in range(n):
        asm.feed(i, ts, False, values[i])
        if ahead is not None and i % SHARE_STEADY_BATCH == SHARE_STEADY_BATCH - 1:
            ahead()
    zero = bytes(32)
    t0 = time.perf_counter()
    beat = asm.feed(n, ts + 1000, False, values[n])  # the next beat: this one closes
    root = beat.root()
    e = pkg.encoding
    entry_hash = e.H(
        b"\x02" + e.str16("knhk") + e.u32(0) + e.u64(beat.cycle) + root + e.u64(n) + e.u64(0) + e.u64(n - 1) + zero
    )
    if hasattr(pkg.quorum, "verify_vote"):
        pkg.quorum.sign(key, zero, entry_hash)
    else:
        pkg.quorum.sign(key, entry_hash)
    return time.perf_counter() - t0


def share_case(rep: Report, args: argparse.Namespace, after: Pkg, before: Pkg | None, bname: str | None) -> None:
    values = json_values(SHARE_BATCH + 1)
    key = after.quorum.generate_key()
    for tick_ms, n in SHARE_BEATS:
        k = 40 if n > 100 else 400  # closes per run

        def close_us(pkg: Pkg, n: int = n, k: int = k) -> float:
            return statistics.median(beat_close_s(pkg, values, n, key) for _ in range(k)) * 1e6

        a_runs, b_runs = paired(lambda: close_us(after), (lambda: close_us(before)) if before else None, args.runs)
        rep.add(
            Result(
                "2. Core alone",
                f"our share in the core at tick_ms {tick_ms}: closing a beat of {n} receipts "
                "(closing record, Merkle root, entry hash, vote signature)",
                "µs",
                a_runs,
                bname,
                b_runs,
                higher_is_better=False,
                note="2,000 deltas/s over 4 shards; median close of each run",
            )
        )
    batch = values[:SHARE_BATCH]
    b_feed = (lambda: core_feed(before, batch)) if before else None
    runs, bruns = paired_rates(lambda: core_feed(after, batch), b_feed, 1, args.runs)
    rep.add(
        Result(
            "2. Core alone",
            f"our share in the core: a full consume batch ({SHARE_BATCH:,} deltas of 100 B JSON) through the core",
            "ms",
            [1e3 / r for r in runs],
            bname,
            [1e3 / r for r in bruns],
            higher_is_better=False,
            note="the longest a beat's vote can wait for the rest of the batch it closes in",
        )
    )
    pub = after.quorum.public_key_bytes(key)
    zero = bytes(32)
    sig = after.quorum.sign(key, zero, zero)
    k = 300
    runs = [
        1e6 / quiet_rate(lambda: [after.quorum.verify_vote(pub, zero, zero, sig) for _ in range(3 * k)], k)
        for _ in range(args.runs)
    ]
    rep.add(
        Result(
            "2. Core alone",
            "our share in the core at quorum completion: verifying 3 votes (Ed25519)",
            "µs",
            runs,
            higher_is_better=False,
            note="the votes a commit needs at threshold 3; the Lua append's round trip is Redis's",
        )
    )


PRUNE_SHARDS = (4, 16)  # shards a peer holds
PRUNE_AHEAD = 64  # cycles of votes held after the head (the window), 3 voters each
PRUNE_COMMITS = 200
PRUNE_VOTERS = ("peer-b", "peer-c", "peer-d")


def prune_s(quorum: Any, chains: dict[int, list[Any]], votes: dict[tuple[int, int], list[bytes]], epoch: Any) -> float:
    """Median time of the collector's prune after a commit, shard after shard, each holding PRUNE_AHEAD
    cycles of 3 voters' votes: the work after every commit, which at tick_ms 1 was 8% of a peer."""
    col = quorum.QuorumCollector(lambda _cycle: epoch)
    head = {s: (None, bytes(32)) for s in chains}

    def add(s: int, i: int) -> None:
        e = chains[s][i]
        for p, sig in zip(PRUNE_VOTERS, votes[(s, i)], strict=True):
            col.add(quorum.Vote(e, p, sig, 1, epoch.number), head[s][1], head[s][0])

    for s in chains:
        for i in range(PRUNE_AHEAD):
            add(s, i)
    times = []
    for k in range(PRUNE_COMMITS):
        for s in chains:
            e = chains[s][k]
            head[s] = (e.cycle, e.entry_hash)
            t = time.perf_counter()
            col.prune(s, e.cycle, e.entry_hash)
            times.append(time.perf_counter() - t)
            add(s, k + PRUNE_AHEAD)
    if hasattr(col, "held_votes") and col.held_votes() != len(chains) * 3 * PRUNE_AHEAD:  # (the baseline's cannot say)
        raise RuntimeError(f"prune bench: {col.held_votes()} votes held, not {len(chains) * 3 * PRUNE_AHEAD}")
    return statistics.median(times)


def prune_case(rep: Report, args: argparse.Namespace, after: Pkg, before: Pkg | None, bname: str | None) -> None:
    from knhk_stream.protocol.entry import Entry

    keys, settings = four_peer_keys()
    epoch = settings.genesis
    for shards in PRUNE_SHARDS:
        chains: dict[int, list[Any]] = {}
        votes: dict[tuple[int, int], list[bytes]] = {}
        for s in range(shards):
            prev, chain = bytes(32), []
            for i in range(PRUNE_COMMITS + PRUNE_AHEAD):
                e = Entry("knhk", s, i + 1, after.encoding.H(b"%d-%d" % (s, i)), 1, i, i, prev)
                chain.append(e)
                votes[(s, i)] = [after.quorum.sign(keys[p], epoch.epoch_hash, e.entry_hash) for p in PRUNE_VOTERS]
                prev = e.entry_hash
            chains[s] = chain

        def prune_us(pkg: Pkg, chains: dict[int, list[Any]] = chains, votes: dict = votes) -> float:
            return prune_s(pkg.quorum, chains, votes, epoch) * 1e6

        a_runs, b_runs = paired(lambda: prune_us(after), (lambda: prune_us(before)) if before else None, args.runs)
        rep.add(
            Result(
                "2. Core alone",
                f"vote collection after a commit (prune), {shards} shards held, {PRUNE_AHEAD} cycles x 3 votes each",
                "µs",
                a_runs,
                bname,
                b_runs,
                higher_is_better=False,
                note="median of a run's prunes; now walks the committed shard's rounds only",
            )
        )


def bundle_case(rep: Report, args: argparse.Namespace) -> None:
    from knhk_stream.protocol import proof
    from knhk_stream.protocol.entry import Entry
    from knhk_stream.protocol.hooks import load_hook
    from knhk_stream.protocol.merkle import root
    from knhk_stream.protocol.receipts import DeltaProcessor

    keys, settings = four_peer_keys()
    values = json_values(1000)
    proc = DeltaProcessor(load_hook("canonical@1"))
    receipts = [proc.receipt(0, 7, 0, i, v) for i, v in enumerate(values)]
    entry = Entry("knhk", 0, 7, root(receipts), len(receipts), 0, len(receipts) - 1, bytes(32))
    ce = committed(entry, keys, settings, 0)
    bundle = proof.make_bundle(ce, receipts, 123, values[123])
    check = proof.verify_bundle(bundle, settings)
    if not check.ok:
        rep.notes.append(
            f"2. Core alone: bundle verification skipped: the bench's bundle does not verify ({check.message})"
        )
        return
    k = 500
    runs = [quiet_rate(lambda: [proof.verify_bundle(bundle, settings) for _ in range(k)], k) for _ in range(args.runs)]
    rep.add(
        Result(
            "2. Core alone",
            "proof bundle verification (1,000-receipt beat, 3 of 4 signatures)",
            "bundles/s",
            runs,
            note="new in this tree: no before; bounded by the 3 Ed25519 verifications",
        )
    )
