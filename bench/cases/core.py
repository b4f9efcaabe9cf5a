"""2. Core alone: decode + hook + receipt + Merkle without Kafka or Redis (100 B JSON, the same as
Avro, 1 KB JSON); Merkle root; vote signing and verification; proof-bundle verification.
Baseline: the same code at --baseline-ref (the core before this round of optimizations), measured in
turns with this tree's, in the same process. Ends with the `core:` summary line."""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.baseline import BASE, CURRENT, Pkg, extract_ref
from bench.cluster import Env
from bench.harness import Report, Result, log, paired_rates, quiet_rate
from bench.load import avro_values, committed, four_peer_keys, json_values, kb_values

NEEDS = None


def core_feed(pkg: Any, values: Sequence[bytes]) -> None:
    asm = pkg.beats.BeatAssembler(0, 125, pkg.receipts.DeltaProcessor(pkg.hooks.load_hook("canonical@1")))
    ts = 1_700_000_000_000
    feed = asm.feed
    for i, v in enumerate(values):
        b = feed(i, ts + i // 10, False, v)  # 10 deltas per ms: 10,000 per beat
        if b is not None:
            b.root()


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
            b_feed = (lambda v=values: core_feed(before, v)) if before else None
            runs, bruns = paired_rates(lambda v=values: core_feed(after, v), b_feed, n, args.runs)
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
