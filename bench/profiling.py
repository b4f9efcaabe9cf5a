"""Profiles (--profile): py-spy of a worker, summarized as inclusive/self shares, and pyinstrument
(or cProfile) of the core."""

from __future__ import annotations

import argparse
import io
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from bench.baseline import CURRENT, Pkg
from bench.harness import log
from bench.load import avro_values, json_values


class PySpy:
    """py-spy record of a worker (raw collapsed stacks), summarized as inclusive/self percentages."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.proc: subprocess.Popen[bytes] | None = None
        if not Path(exe).exists():
            log("  py-spy not found: no worker profile (pip install py-spy)")
            return
        cmd = [exe, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--nonblocking", "-o", str(out)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def summarize_collapsed(path: Path, top: int = 30) -> str:
    """Inclusive and self sample shares per function from py-spy raw (collapsed) output."""
    incl: dict[str, int] = {}
    selfc: dict[str, int] = {}
    total = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no profile)"
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")" if " (" in f else f
                  for f in stack.split(";")]  # fmt: skip
        for f in set(frames):
            incl[f] = incl.get(f, 0) + k
        if frames:
            selfc[frames[-1]] = selfc.get(frames[-1], 0) + k
    if not total:
        return "(no samples)"
    out = [f"{total} samples", "", "inclusive %  function", "-----------  --------"]
    for f, k in sorted(incl.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"{100 * k / total:10.1f}%  {f}")
    out += ["", "self %       function", "-----------  --------"]
    for f, k in sorted(selfc.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"{100 * k / total:10.1f}%  {f}")
    return "\n".join(out)


def core_stages(n: int, repeats: int = 15) -> str:
    """Where a delta's time goes in this tree's core: each stage alone, µs per delta (the fastest of
    `repeats` runs over n deltas, GC off), for 100 B JSON and the same deltas as Avro."""
    import gc
    import time

    from bench.cases.core import core_feed
    from knhk_stream.protocol import beats, decode, hooks, merkle, receipts
    from knhk_stream.protocol.encoding import HASHERS

    pkg = Pkg(CURRENT)
    proc = receipts.DeltaProcessor(hooks.load_hook("canonical@1"))
    h = HASHERS.hasher

    class Constant:  # a receipt maker that costs nothing: what the beat assembler itself costs
        r = bytes(123)

        def receipt(self, *_: object) -> bytes:
            return self.r

    def feed_only(values: list[bytes]) -> None:
        feed = beats.BeatAssembler(0, 125, Constant()).feed
        for i, v in enumerate(values):
            feed(i, 1_700_000_000_000 + i // 10, False, v)

    def hashes(values: list[bytes]) -> None:
        for v in values:
            h.reset()
            h.update(v).digest()
            h.reset()
            h.update(v).digest()

    lines = [
        f"Core stages, µs per delta (fastest of {repeats} runs of {n:,} deltas, GC off), this tree:",
        "",
        "| stage | 100 B JSON | 100 B as Avro |",
        "| --- | ---: | ---: |",
    ]
    rows: dict[str, list[float]] = {}
    for values in (json_values(n), avro_values(n)):
        avro = values[0][:2] == decode.AVRO_MAGIC
        recs = [proc.receipt(0, 1, 2, i, v) for i, v in enumerate(values)]
        stages = {
            "whole core (BeatAssembler.feed + receipts + Beat.root)": lambda v=values: core_feed(pkg, v),
            "BeatAssembler.feed alone (a receipt that costs nothing)": lambda v=values: feed_only(v),
            "DeltaProcessor.receipt": lambda v=values: [proc.receipt(0, 1, 2, i, x) for i, x in enumerate(v)],
            "hooks.canonical_actions (decode + canonical@1 bytes)": lambda v=values: [
                hooks.canonical_actions(x) for x in v
            ],
            "decode.native_json (checks, msgspec, re-encoding)": (
                None if avro else (lambda v=values: [decode.native_json(x) for x in v])
            ),
            "msgspec decode alone": None if avro else (lambda v=values: [decode._NATIVE(x) for x in v]),
            "two BLAKE3 hashes (value, actions)": lambda v=values: hashes(v),
            "Merkle root, per receipt (leaf + node hash)": lambda r=recs: merkle.root(r),
        }
        for name, fn in stages.items():
            best = None
            if fn is not None:
                gc.collect()
                gc.disable()
                try:
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        fn()
                        t = (time.perf_counter() - t0) / n * 1e6
                        best = t if best is None or t < best else best
                finally:
                    gc.enable()
            rows.setdefault(name, []).append(best if best is not None else float("nan"))
    for name, (j, a) in rows.items():
        lines.append(f"| {name} | {j:.2f} | {'-' if a != a else f'{a:.2f}'} |")
    return "\n".join(lines) + "\n"


def profile_core(args: argparse.Namespace) -> None:
    from bench.cases.core import core_feed

    values = json_values(args.deltas)
    pkg = Pkg(CURRENT)
    out = args.out / "profile_core.txt"
    stages = core_stages(min(args.deltas, 20_000))
    try:
        from pyinstrument import Profiler
    except ImportError:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(core_feed, pkg, values)
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        out.write_text(stages + "\ncProfile of the whole core (100 B JSON):\n\n" + buf.getvalue())
        return
    p = Profiler(interval=0.0005)
    p.start()
    core_feed(pkg, values)
    p.stop()
    out.write_text(
        stages
        + "\npyinstrument of the whole core (100 B JSON):\n\n"
        + p.output_text(unicode=False, color=False, show_all=False)
    )
